//! Restore's checks of an untrusted snapshot directory. This file holds the sample snapshots and
//! the tests of a good directory; `untrusted` the refusals (files, layout, resources, the MAC,
//! the overrides); `forged` a property test of random damage.

mod forged;
mod untrusted;

use super::*;
use crate::snapshot::auth::Authentication;
use crate::snapshot::auth::KEY_BYTES;
use crate::snapshot::authorize::{authorize, ResourceOverrides};
use crate::snapshot::manifest::{ParentRef, DIFF_FORMAT_VERSION};
use crate::snapshot::manifest::{SnapshotManifest, MANIFEST_FILE, STATE_FILE};
use crate::snapshot::state_file::tests::sample_virtio_state;
use crate::snapshot::state_file::{encode, tests::sample_state, SnapshotState};
use crate::virtio_devices::VirtioDeviceState;
use devices::virtio::{blk::BlkState, blk::IoEngineKind, net::NetState, rng::RngState};
use std::os::unix::fs::MetadataExt;

/// The key the samples are sealed with ("this user's").
pub(super) fn test_key() -> SnapshotKey {
    SnapshotKey::from_bytes([0x5a; KEY_BYTES])
}

/// Writes `state` and a matching manifest (resources listed, sealed with `key` when given).
pub(super) fn write_snapshot(
    dir: &Path,
    mut m: SnapshotManifest,
    state: &SnapshotState,
    key: Option<&SnapshotKey>,
) {
    let bytes = encode(state).unwrap();
    m.state.size = bytes.len() as u64;
    m.state.crc32 = u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
    m.resources = resources::list(&m, state);
    m.authentication = None;
    if let Some(key) = key {
        key.seal(&mut m, &bytes).unwrap();
    }
    std::fs::write(dir.join(STATE_FILE), &bytes).unwrap();
    std::fs::write(
        dir.join(MANIFEST_FILE),
        serde_json::to_vec_pretty(&m).unwrap(),
    )
    .unwrap();
}

/// A snapshot directory on disk with a 2-vCPU state (a disk at /var/tmp/disk.img) and one
/// 8 MiB memory file, sealed with `test_key`.
fn write_sample(dir: &Path) {
    write_snapshot(
        dir,
        manifest::tests::sample(),
        &sample_state(),
        Some(&test_key()),
    );
    let f = File::create(dir.join("memory-0.bin")).unwrap();
    f.set_len(8 << 20).unwrap();
}

fn load_ok(dir: &Path) -> LoadedSnapshot {
    load(dir, Some(&test_key())).unwrap()
}

fn load_err(dir: &Path) -> String {
    crate::error_chain(&load(dir, Some(&test_key())).unwrap_err())
}

fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; mkfifo has no memory effects.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Edits the manifest as JSON (left alone when it is no longer JSON).
fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join(MANIFEST_FILE);
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&std::fs::read(&path).unwrap())
    else {
        return;
    };
    if !v.is_object() {
        return;
    }
    edit(&mut v);
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
}

/// A state whose only virtio device is an rng: no host resources at all.
fn rng_only_state() -> SnapshotState {
    let mut s = sample_state();
    let mut rng = sample_virtio_state();
    rng.device = VirtioDeviceState::Rng(RngState);
    s.devices.virtio = vec![rng];
    s
}

/// A state with a disk, a net device and a vhost-user device.
fn three_resource_state() -> SnapshotState {
    use devices::vhost_user::{VhostUserConfig, VhostUserKind, VhostUserState};
    let mut s = sample_state();
    let mut net = sample_virtio_state();
    net.device = VirtioDeviceState::Net(NetState {
        tap: "tap-victim".into(),
        mac: [2, 0, 0, 0, 0, 1],
    });
    let mut vu = sample_virtio_state();
    vu.device = VirtioDeviceState::VhostUser(VhostUserState {
        config: VhostUserConfig::new(VhostUserKind::Blk, "/run/v.sock"),
    });
    s.devices.virtio.push(net);
    s.devices.virtio.push(vu);
    s
}

#[test]
fn a_snapshot_with_a_vhost_user_device_is_restored_by_copying_and_refuses_cow() {
    use devices::vhost_user::{VhostUserConfig, VhostUserKind, VhostUserState};
    let d = tempfile::tempdir().unwrap();
    write_sample(d.path());
    let mut snap = load_ok(d.path());
    assert_eq!(
        memory_mode(&snap.state.devices.virtio, None).unwrap(),
        MemoryMode::Cow
    );
    let cfg = VhostUserConfig::new(VhostUserKind::Blk, "/run/blk.sock");
    let vhost_user = VirtioDeviceState::VhostUser(VhostUserState { config: cfg });
    snap.state.devices.virtio[0].device = vhost_user.clone();
    // The device's state survives the state file.
    let again = state_file::decode(&encode(&snap.state).unwrap()).unwrap();
    assert_eq!(again.devices.virtio[0].device, vhost_user);
    assert_eq!(
        memory_mode(&snap.state.devices.virtio, None).unwrap(),
        MemoryMode::Copy
    );
    assert_eq!(
        memory_mode(&snap.state.devices.virtio, Some(MemoryMode::Copy)).unwrap(),
        MemoryMode::Copy
    );
    let e = crate::error_chain(
        &memory_mode(&snap.state.devices.virtio, Some(MemoryMode::Cow)).unwrap_err(),
    );
    assert!(
        e.contains("--memory-mode cow") && e.contains("/run/blk.sock"),
        "{e}"
    );
}

#[test]
fn loads_a_good_directory_and_names_each_bad_file() {
    let d = tempfile::tempdir().unwrap();
    write_sample(d.path());
    let snap = load_ok(d.path());
    assert_eq!(snap.state.vcpus.len(), 2);

    let mem = d.path().join("memory-0.bin");
    File::options()
        .write(true)
        .open(&mem)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    assert!(load_err(d.path()).contains("is 4194304 bytes but its region is 8388608"));
    std::fs::remove_file(&mem).unwrap();
    assert!(load_err(d.path()).contains("cannot open memory file"));

    write_sample(d.path());
    let state = d.path().join(STATE_FILE);
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 4;
    std::fs::write(&state, &bytes).unwrap();
    assert!(
        load_err(d.path()).contains("CRC-32"),
        "{}",
        load_err(d.path())
    );
    bytes.truncate(100);
    std::fs::write(&state, &bytes).unwrap();
    assert!(load_err(d.path()).contains("but the manifest says"));
    std::fs::remove_file(&state).unwrap();
    assert!(load_err(d.path()).contains("cannot read state file"));
    std::fs::remove_file(d.path().join(MANIFEST_FILE)).unwrap();
    assert!(load_err(d.path()).contains("manifest.json"));
}

#[test]
fn both_memory_modes_show_the_file_contents_and_leave_the_file_alone() {
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress};
    let d = tempfile::tempdir().unwrap();
    write_sample(d.path());
    let mem = File::options()
        .read(true)
        .write(true)
        .open(d.path().join("memory-0.bin"))
        .unwrap();
    mem.write_all_at(&0xfeed_u64.to_le_bytes(), 0x10_0000)
        .unwrap();
    let snap = load_ok(d.path());
    for mode in [MemoryMode::Cow, MemoryMode::Copy] {
        let ram = build_ram(&snap, &[], mode, 32).unwrap();
        assert_eq!(ram.is_private(), mode == MemoryMode::Cow);
        let v: u64 = ram.memory().read_obj(GuestAddress(0x10_0000)).unwrap();
        assert_eq!(v, 0xfeed);
        ram.memory()
            .write_obj(1u64, GuestAddress(0x10_0000))
            .unwrap();
    }
    let mut buf = [0u8; 8];
    mem.read_exact_at(&mut buf, 0x10_0000).unwrap();
    assert_eq!(
        u64::from_le_bytes(buf),
        0xfeed,
        "the snapshot file is unchanged"
    );
}
