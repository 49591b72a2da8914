//! Restore's checks of an untrusted snapshot directory: files, layout, resources, the MAC, the
//! overrides, and a property test of random damage.

use super::*;
use crate::snapshot::auth::KEY_BYTES;
use crate::snapshot::authorize::{authorize, ResourceOverrides};
use crate::snapshot::manifest::{SnapshotManifest, MANIFEST_FILE, STATE_FILE};
use crate::snapshot::state_file::{encode, tests::sample_state, SnapshotState};

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

// ---- A snapshot is untrusted input -------------------------------------------------------

use crate::snapshot::auth::Authentication;
use crate::snapshot::manifest::{ParentRef, DIFF_FORMAT_VERSION};
use crate::snapshot::state_file::tests::sample_virtio_state;
use crate::virtio_devices::VirtioDeviceState;
use devices::virtio::{blk::BlkState, blk::IoEngineKind, net::NetState, rng::RngState};
use std::os::unix::fs::MetadataExt;

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
fn a_symlink_or_special_file_as_a_memory_file_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let d = root.path().join("snap");
    std::fs::create_dir(&d).unwrap();
    write_sample(&d);
    let outside = root.path().join("host-file");
    File::create(&outside).unwrap().set_len(8 << 20).unwrap();
    std::fs::remove_file(d.join("memory-0.bin")).unwrap();
    std::os::unix::fs::symlink(&outside, d.join("memory-0.bin")).unwrap();
    let e = load_err(&d);
    assert!(e.contains("memory-0.bin is a symbolic link"), "{e}");
    // A link to a file inside the directory is refused just the same.
    File::create(d.join("real.bin"))
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    std::fs::remove_file(d.join("memory-0.bin")).unwrap();
    std::os::unix::fs::symlink("real.bin", d.join("memory-0.bin")).unwrap();
    assert!(load_err(&d).contains("is a symbolic link"));
    std::fs::remove_file(d.join("memory-0.bin")).unwrap();
    mkfifo(&d.join("memory-0.bin"));
    let e = load_err(&d);
    assert!(e.contains("is a FIFO, not a regular file"), "{e}");
    std::fs::remove_file(d.join("memory-0.bin")).unwrap();
    std::fs::create_dir(d.join("memory-0.bin")).unwrap();
    assert!(load_err(&d).contains("is a directory, not a regular file"));
}

#[test]
fn a_fifo_manifest_or_state_file_is_refused_without_blocking() {
    let d = tempfile::tempdir().unwrap();
    write_sample(d.path());
    std::fs::rename(d.path().join(STATE_FILE), d.path().join("state.saved")).unwrap();
    mkfifo(&d.path().join(STATE_FILE));
    let started = std::time::Instant::now();
    let e = load_err(d.path());
    assert!(
        e.contains("cannot read state file") && e.contains("is a FIFO"),
        "{e}"
    );
    std::fs::remove_file(d.path().join(MANIFEST_FILE)).unwrap();
    mkfifo(&d.path().join(MANIFEST_FILE));
    let e = load_err(d.path());
    assert!(e.contains("manifest.json is a FIFO"), "{e}");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn a_2_gib_state_file_is_refused_before_it_is_read() {
    let d = tempfile::tempdir().unwrap();
    write_sample(d.path());
    let state = d.path().join(STATE_FILE);
    File::options()
        .write(true)
        .open(&state)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    edit_manifest(d.path(), |m| m["state"]["size"] = (2u64 << 30).into());
    let started = std::time::Instant::now();
    let e = load_err(d.path());
    assert!(
        e.contains("is 2147483648 bytes, larger than a state file may be"),
        "{e}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_millis(500),
        "took {:?}",
        started.elapsed()
    );
    // A manifest larger than its limit likewise.
    File::options()
        .write(true)
        .open(d.path().join(MANIFEST_FILE))
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    assert!(load_err(d.path()).contains("larger than a manifest may be"));
}

#[test]
fn regions_must_be_the_layout_and_memory_must_fit_the_host() {
    let d = tempfile::tempdir().unwrap();
    write_sample(d.path());
    edit_manifest(d.path(), |m| {
        m["memory"][0]["guest_address"] = 0xe000_0000u64.into()
    });
    let e = load_err(d.path());
    assert!(
        e.contains("[0xe0000000+0x800000] are not the layout of a 0x800000-byte VM [0x0+0x800000]"),
        "{e}"
    );
    // A VM larger than the host, laid out as `run` would: refused like `run` refuses it.
    let size = (crate::builder::host_ram_bytes() + (1 << 30)) & !((2 << 20) - 1);
    let ranges = arch::layout::ram_ranges(size).unwrap();
    edit_manifest(d.path(), |m| {
        m["vm"]["memory_size"] = size.into();
        m["memory"] = ranges
            .iter()
            .enumerate()
            .map(|(i, r)| {
                serde_json::json!({"guest_address": r.start, "size": r.size,
                    "file": format!("memory-{i}.bin"), "page_size": 4096, "method": "sparse-copy"})
            })
            .collect();
    });
    let e = load_err(d.path());
    assert!(e.contains("exceeds the host's"), "{e}");
}

#[test]
fn an_edited_state_naming_another_host_file_is_refused_and_an_override_wins() {
    let d = tempfile::tempdir().unwrap();
    write_sample(d.path());
    assert_eq!(
        load_ok(d.path()).authentication,
        Authentication::Authenticated
    );
    // Edit the state: the disk now points at a host file; CRC and manifest fixed up to match
    // (resources too), as an attacker would. The MAC no longer matches.
    let mut state = sample_state();
    if let VirtioDeviceState::Blk(disk) = &mut state.devices.virtio[0].device {
        disk.path = "/etc/shadow".into();
    }
    write_snapshot(d.path(), manifest::tests::sample(), &state, None);
    let snap = load_ok(d.path());
    let e = crate::error_chain(&authorize(&snap, &ResourceOverrides::default()).unwrap_err());
    assert_eq!(
        e,
        format!(
            "snapshot {} is not authenticated for this user (it carries no MAC); refusing to \
             open disk \"disk0\" at /etc/shadow (name it again with --disk id=disk0,path=PATH)",
            d.path().display()
        )
    );
    // Sealed by another user's key: refused too.
    let other = SnapshotKey::from_bytes([1; KEY_BYTES]);
    write_snapshot(d.path(), manifest::tests::sample(), &state, Some(&other));
    let snap = load_ok(d.path());
    let e = crate::error_chain(&authorize(&snap, &ResourceOverrides::default()).unwrap_err());
    assert!(
        e.contains("does not match this user's key") && e.contains("/etc/shadow"),
        "{e}"
    );
    // Without any key: refused.
    let snap = load(d.path(), None).unwrap();
    assert!(authorize(&snap, &ResourceOverrides::default()).is_err());
    // Named again: allowed, and the device opens the override.
    let overrides = ResourceOverrides {
        disks: vec![("disk0".into(), "/tmp/mine.img".into())],
        ..Default::default()
    };
    let plan = authorize(&snap, &overrides).unwrap();
    assert_eq!(
        plan.host_opens,
        [HostResource::Disk {
            id: "disk0".into(),
            path: "/tmp/mine.img".into(),
            readonly: false
        }]
    );
    assert!(
        matches!(&plan.devices[0].device, VirtioDeviceState::Blk(disk) if disk.path == Path::new("/tmp/mine.img"))
    );
    // An override wins for an authenticated snapshot too.
    write_sample(d.path());
    let plan = authorize(&load_ok(d.path()), &overrides).unwrap();
    assert_eq!(plan.host_opens[0].location(), "/tmp/mine.img");
    // An unknown id is an error.
    let bad = ResourceOverrides {
        nets: vec![("net0".into(), "tap1".into())],
        ..Default::default()
    };
    let e = crate::error_chain(&authorize(&load_ok(d.path()), &bad).unwrap_err());
    assert!(
        e.contains("--net id=\"net0\": the snapshot has no net device with that id (it has: none)"),
        "{e}"
    );
}

#[test]
fn the_first_refused_resource_is_named_in_bus_order_and_each_kind_has_its_option() {
    let d = tempfile::tempdir().unwrap();
    write_snapshot(
        d.path(),
        manifest::tests::sample(),
        &three_resource_state(),
        None,
    );
    File::create(d.path().join("memory-0.bin"))
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let snap = load_ok(d.path());
    let mut o = ResourceOverrides::default();
    let err = |o: &ResourceOverrides| crate::error_chain(&authorize(&snap, o).unwrap_err());
    assert!(err(&o).contains("refusing to open disk \"disk0\""));
    o.disks.push(("disk0".into(), "/d".into()));
    assert!(err(&o).contains("refusing to open net \"net0\" at tap \"tap-victim\" (name it again with --net id=net0,tap=TAP)"), "{}", err(&o));
    o.nets.push(("net0".into(), "tap1".into()));
    assert!(err(&o).contains("vhost-user \"vhost-user0\" at /run/v.sock (name it again with --vhost-user id=vhost-user0,socket=PATH)"));
    o.vhost_user.push(("vhost-user0".into(), "/s".into()));
    let plan = authorize(&snap, &o).unwrap();
    assert_eq!(plan.host_opens.len(), 3);
    o.disks.push(("disk0".into(), "/e".into()));
    assert!(err(&o).contains("given twice"));
}

#[test]
fn an_unauthenticated_snapshot_without_host_resources_restores() {
    let d = tempfile::tempdir().unwrap();
    write_snapshot(d.path(), manifest::tests::sample(), &rng_only_state(), None);
    File::create(d.path().join("memory-0.bin"))
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let snap = load(d.path(), None).unwrap();
    assert!(!snap.authentication.is_authenticated());
    let plan = authorize(&snap, &ResourceOverrides::default()).unwrap();
    assert!(plan.host_opens.is_empty() && plan.parents.is_empty());
    // A manifest hiding a resource the state names is refused.
    write_snapshot(d.path(), manifest::tests::sample(), &sample_state(), None);
    edit_manifest(d.path(), |m| {
        m["resources"].as_array_mut().unwrap().remove(0);
    });
    assert!(load_err(d.path()).contains("its resources list"));
}

#[test]
fn an_unauthenticated_diffs_parent_is_opened_only_when_named() {
    let root = tempfile::tempdir().unwrap();
    let (base, diff) = (root.path().join("base"), root.path().join("diff"));
    std::fs::create_dir(&base).unwrap();
    std::fs::create_dir(&diff).unwrap();
    write_sample(&base);
    let crc = crc32fast::hash(&std::fs::read(base.join(MANIFEST_FILE)).unwrap());
    let mut m = manifest::tests::sample();
    m.format_version = DIFF_FORMAT_VERSION;
    m.parent = Some(ParentRef {
        dir: base.clone(),
        manifest_crc32: crc,
    });
    write_snapshot(&diff, m, &rng_only_state(), None);
    File::create(diff.join("memory-0.bin"))
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let snap = load_ok(&diff);
    let e = crate::error_chain(&authorize(&snap, &ResourceOverrides::default()).unwrap_err());
    assert!(
        e.contains(&format!(
            "refusing to open parent \"parent\" at {} (name it again with --parent DIR)",
            base.display()
        )),
        "{e}"
    );
    let o = ResourceOverrides {
        parent: Some(base.clone()),
        ..Default::default()
    };
    let plan = authorize(&snap, &o).unwrap();
    assert_eq!(plan.parents.len(), 1);
    assert_eq!(plan.host_opens, [HostResource::Parent { path: base }]);
}

// ---- Property: random damage never panics, never opens or maps anything not the snapshot's

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// How the base snapshot of a round was sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    /// Disk, net and vhost-user, sealed by another user's key.
    Foreign,
    /// Only an rng, no MAC.
    NoResources,
    /// Disk, net and vhost-user, sealed with this user's key.
    Own,
}

/// Rewrites the state file with its header CRC recomputed, and the manifest's size and CRC to
/// match (and, when the payload still decodes, its resource list), as a forger would.
fn fix_up(dir: &Path, payload: &[u8], relist: bool) {
    use crate::snapshot::state_file::{HEADER_LEN, STATE_FORMAT_VERSION, STATE_MAGIC};
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(&STATE_MAGIC);
    bytes.extend_from_slice(&STATE_FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let crc = crc32fast::hash(payload);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes.extend_from_slice(payload);
    std::fs::write(dir.join(STATE_FILE), &bytes).unwrap();
    let decoded = state_file::decode(&bytes).ok();
    edit_manifest(dir, |m| {
        if !m["state"].is_object() {
            return;
        }
        m["state"]["size"] = (bytes.len() as u64).into();
        m["state"]["crc32"] = crc.into();
        if let (true, Some(state)) = (relist, decoded) {
            if let Ok(manifest) = serde_json::from_value::<SnapshotManifest>(m.clone()) {
                m["resources"] = serde_json::to_value(resources::list(&manifest, &state)).unwrap();
            }
        }
    });
}

fn mutate_state(rng: &mut Rng, dir: &Path, outside: &Path) {
    use crate::snapshot::state_file::HEADER_LEN;
    let bytes = std::fs::read(dir.join(STATE_FILE)).unwrap();
    let mut payload = bytes[HEADER_LEN..].to_vec();
    match rng.below(4) {
        0 => {
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(payload.len());
                payload[i] ^= 1 << rng.below(8);
            }
        }
        1 => payload.truncate(rng.below(payload.len())),
        2 => {
            let n = rng.below(64);
            payload.extend((0..n).map(|_| rng.next() as u8));
        }
        _ => {
            // A well-formed state naming host resources: what an attacker really writes.
            let mut state = state_file::decode(&bytes).unwrap_or_else(|_| rng_only_state());
            let path = outside.to_path_buf();
            let saved = match rng.below(4) {
                0 => VirtioDeviceState::Blk(BlkState {
                    path,
                    readonly: rng.below(2) == 0,
                    id: None,
                    queues: 1,
                    engine: IoEngineKind::Auto,
                }),
                1 => VirtioDeviceState::Net(NetState {
                    tap: "evil0".into(),
                    mac: [2, 0, 0, 0, 0, 9],
                }),
                2 => VirtioDeviceState::VhostUser(devices::vhost_user::VhostUserState {
                    config: devices::vhost_user::VhostUserConfig::new(
                        devices::vhost_user::VhostUserKind::Blk,
                        path,
                    ),
                }),
                _ => VirtioDeviceState::Rng(RngState),
            };
            let mut device = sample_virtio_state();
            device.device = saved;
            if state.devices.virtio.is_empty() || rng.below(2) == 0 {
                state.devices.virtio.push(device);
            } else {
                let i = rng.below(state.devices.virtio.len());
                state.devices.virtio[i] = device;
            }
            payload = encode(&state).unwrap()[HEADER_LEN..].to_vec();
        }
    }
    fix_up(dir, &payload, rng.below(4) != 0);
}

fn mutate_manifest(rng: &mut Rng, dir: &Path, outside: &Path, victim: &Path, victim_crc: u32) {
    let path = dir.join(MANIFEST_FILE);
    if rng.below(6) == 0 {
        // Raw byte damage.
        let mut text = std::fs::read(&path).unwrap();
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(text.len());
            text[i] = rng.next() as u8;
        }
        std::fs::write(&path, text).unwrap();
        return;
    }
    let names = [
        "../memory-0.bin",
        "/etc/passwd",
        "link",
        "inside-link",
        "fifo",
        "sub",
        "memory-0.bin",
        "state.bin",
        "manifest.json",
        "",
    ];
    let outside_str = outside.display().to_string();
    let huge = crate::builder::host_ram_bytes().saturating_mul(4) & !0xfff;
    edit_manifest(dir, |m| {
        // Earlier damage may have changed the shape; index only a well-shaped manifest.
        let shaped = m["memory"]
            .as_array()
            .is_some_and(|a| a.first().is_some_and(|r| r.is_object()))
            && m["state"].is_object()
            && m["vm"].is_object();
        mutate_shaped(
            rng,
            m,
            shaped,
            &names,
            &outside_str,
            huge,
            victim,
            victim_crc,
        );
    });
}

#[allow(clippy::too_many_arguments)]
fn mutate_shaped(
    rng: &mut Rng,
    m: &mut serde_json::Value,
    shaped: bool,
    names: &[&str],
    outside_str: &str,
    huge: u64,
    victim: &Path,
    victim_crc: u32,
) {
    let choice = if shaped { rng.below(12) } else { 11 };
    match choice {
        0 => m["memory"][0]["file"] = (*rng.pick(names)).into(),
        1 => m["state"]["file"] = (*rng.pick(names)).into(),
        2 => {
            m["memory"][0]["guest_address"] =
                (*rng.pick(&[0xe000_0000u64, 0xc000_0000, 0x1_0000_0000, 0x1000, 0])).into()
        }
        3 => m["memory"][0]["size"] = (*rng.pick(&[4096u64, 16 << 20, 1 << 40, 0])).into(),
        4 => {
            let size = *rng.pick(&[huge, 1u64 << 40, 16 << 30, 4 << 20]);
            m["vm"]["memory_size"] = size.into();
            m["memory"][0]["size"] = size.into();
        }
        5 => {
            m["format_version"] = 2.into();
            m["parent"] = serde_json::json!({"dir": victim, "manifest_crc32": victim_crc});
            m["memory"][0]["data_bytes"] = 0.into();
        }
        6 => {
            m["resources"] = serde_json::json!([
                {"kind": "disk", "id": "disk0", "path": outside_str, "readonly": false}
            ])
        }
        7 => m["resources"] = serde_json::json!([]),
        8 => {
            let hex: String = (0..64).map(|_| format!("{:x}", rng.below(16))).collect();
            m["authentication"] = hex.into();
        }
        9 => {
            m["vm"]["kernel"] = outside_str.into();
            m["vm"]["memory_file"] = outside_str.into();
        }
        10 => {
            let extra = m["memory"][0].clone();
            m["memory"].as_array_mut().unwrap().push(extra);
        }
        _ => {
            let keys: Vec<String> = m.as_object().unwrap().keys().cloned().collect();
            let key = rng.pick(&keys).clone();
            m[key.as_str()] = match rng.below(3) {
                0 => serde_json::Value::Null,
                1 => (rng.next() as u32).into(),
                _ => "x".into(),
            };
        }
    }
}

/// (device, inode) of every regular file directly in `dir`.
fn own_files(dir: &Path) -> Vec<(u64, u64)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| std::fs::symlink_metadata(e.unwrap().path()).unwrap())
        .filter(|m| m.file_type().is_file())
        .map(|m| (m.dev(), m.ino()))
        .collect()
}

#[test]
fn a_thousand_forged_snapshots_never_panic_open_outside_or_map_foreign_files() {
    let root = tempfile::tempdir().unwrap();
    let outside = root.path().join("host-secret.img");
    File::create(&outside).unwrap().set_len(8 << 20).unwrap();
    // This user's own snapshot, which a forged diff may name as its parent.
    let victim = root.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    write_sample(&victim);
    let victim_crc = crc32fast::hash(&std::fs::read(victim.join(MANIFEST_FILE)).unwrap());
    let other = SnapshotKey::from_bytes([0x11; KEY_BYTES]);
    let own_resources = resources::list(&manifest::tests::sample(), &three_resource_state());
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (mut loaded, mut authorized) = (0, 0);
    for round in 0..1000 {
        let base = *rng.pick(&[Base::Foreign, Base::NoResources, Base::Own]);
        let dir = root.path().join(format!("round-{round}"));
        std::fs::create_dir(&dir).unwrap();
        let (state, key) = match base {
            Base::Foreign => (three_resource_state(), Some(&other)),
            Base::NoResources => (rng_only_state(), None),
            Base::Own => (three_resource_state(), None),
        };
        let own_key = test_key();
        let key = if base == Base::Own {
            Some(&own_key)
        } else {
            key
        };
        write_snapshot(&dir, manifest::tests::sample(), &state, key);
        File::create(dir.join("memory-0.bin"))
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();
        std::os::unix::fs::symlink("memory-0.bin", dir.join("inside-link")).unwrap();
        mkfifo(&dir.join("fifo"));
        std::fs::create_dir(dir.join("sub")).unwrap();
        for _ in 0..1 + rng.below(3) {
            if rng.below(2) == 0 {
                mutate_state(&mut rng, &dir, &outside);
            } else {
                mutate_manifest(&mut rng, &dir, &outside, &victim, victim_crc);
            }
        }
        let own = own_files(&dir);
        let Ok(snap) = load(&dir, Some(&test_key())) else {
            std::fs::remove_dir_all(&dir).unwrap();
            continue;
        };
        loaded += 1;
        for f in &snap.memory_files {
            assert!(
                own.contains(&f.identity) && f.path.parent() == Some(dir.as_path()),
                "round {round}: memory file {} is not the snapshot's own",
                f.path.display()
            );
        }
        if let Ok(plan) = authorize(&snap, &ResourceOverrides::default()) {
            authorized += 1;
            match base {
                // Whatever was forged, nothing outside the directory is opened...
                Base::Foreign | Base::NoResources => {
                    assert!(
                        plan.host_opens.is_empty() && plan.parents.is_empty(),
                        "round {round} ({base:?}): would open {:?}",
                        plan.host_opens
                    );
                }
                // ...and an authenticated snapshot opens only what its owner sealed.
                Base::Own => {
                    for r in &plan.host_opens {
                        assert!(own_resources.contains(r), "round {round}: would open {r:?}");
                    }
                    assert!(plan.parents.is_empty(), "round {round}");
                }
            }
            // The memory it would map is the files `load` opened; building it must not panic.
            let _ = build_ram(&snap, &plan.parents, MemoryMode::Cow, 32);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // The rounds reach every stage: some forgeries load, some are even allowed (harmlessly).
    eprintln!("loaded {loaded}, authorized {authorized}");
    assert!(
        loaded > 100 && authorized > 20,
        "loaded {loaded}, authorized {authorized}"
    );
}
