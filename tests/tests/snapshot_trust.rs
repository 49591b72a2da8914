//! A snapshot is untrusted input, end to end: `skiff snapshot-info` lists what a snapshot would
//! make skiff open; an edited or foreign snapshot is refused in one line naming the first host
//! resource, unless the user names it again (`restore --disk id=,path=`), and then the guest
//! really uses the disk named; an unauthenticated snapshot without host resources restores;
//! memory files that are links, regions in the MMIO hole, a VM larger than the host, a huge
//! state file and FIFOs are refused at once.

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use skiff_tests::{require_kvm, skiff_bin, Finished, Skiff};

mod snapshot_support;
use snapshot_support::*;

const ROUNDS: u64 = 16;
/// Every u64 the loop guest writes to its disk is its offset XOR this.
const PATTERN: u64 = 0xa5a5_a5a5_a5a5_a5a5;

/// A virtio-loop guest (disk + rng) snapshotted with `--stop` after round 3: (snapshot, disk).
fn snapshot_loop(root: &Path) -> (PathBuf, PathBuf) {
    require_kvm();
    let disk = root.join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 << 10]).unwrap();
    let sock = root.join("api.sock");
    let cmdline = format!("virtio-loop={ROUNDS}");
    let disk_arg = format!("path={}", disk.display());
    let kernel = guest();
    let mut vm = Skiff::spawn(&[
        "run",
        "--kernel",
        &kernel,
        "--cmdline",
        &cmdline,
        "--disk",
        &disk_arg,
        "--rng",
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    vm.wait_for_line("testguest: virtio-loop round=3 ok", T);
    let snap = root.join("snap");
    ctl_ok(&sock, &["snapshot", snap.to_str().unwrap(), "--stop"]);
    vm.wait(T).assert_code(0);
    (snap, disk)
}

/// `skiff ARGS...` with `XDG_STATE_HOME` set to `state` when given (another user's key).
fn skiff_with_state(args: &[&str], state: Option<&Path>) -> Finished {
    let mut cmd = Command::new(skiff_bin());
    cmd.args(args);
    if let Some(state) = state {
        cmd.env("XDG_STATE_HOME", state);
    }
    Skiff::spawn_command(&mut cmd).wait(T)
}

fn one_line_failure(r: &Finished, needle: &str) {
    r.assert_code(1);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one stderr line expected:\n{}", r.stderr);
    assert!(
        lines[0].starts_with("skiff: ") && lines[0].contains(needle),
        "{:?} lacks {needle:?}",
        lines[0]
    );
}

fn sector_has_pattern(disk: &Path, sector: u64) -> bool {
    let bytes = std::fs::read(disk).unwrap();
    (0..512).step_by(8).all(|off| {
        let at = (sector * 512 + off) as usize;
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) == (sector * 512 + off) ^ PATTERN
    })
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

fn copy_snapshot(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for f in ["manifest.json", "state.bin"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    std::fs::hard_link(from.join("memory-0.bin"), to.join("memory-0.bin")).unwrap();
}

#[test]
fn snapshot_info_lists_the_host_resources_as_text_and_json() {
    let root = tempfile::tempdir().unwrap();
    let (snap, disk) = snapshot_loop(root.path());
    let text = skiff_with_state(&["snapshot-info", snap.to_str().unwrap()], None);
    text.assert_code(0);
    for needle in [
        "format version 1 (full)".to_string(),
        "authenticated: yes".into(),
        "memory: 268435456 bytes (256 MiB)".into(),
        "vcpus: 1".into(),
        "region 0: guest 0x0..0x10000000 (256 MiB) in memory-0.bin".into(),
        "parent: none".into(),
        format!("  disk \"disk0\": {}", disk.display()),
        format!("  kernel \"kernel\": {} (recorded only", guest()),
    ] {
        text.assert_stdout_has(&needle);
    }
    let json = skiff_with_state(&["snapshot-info", snap.to_str().unwrap(), "--json"], None);
    json.assert_code(0);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["format_version"], 1);
    assert_eq!(v["memory_size"], 256u64 << 20);
    assert_eq!(v["vcpus"], 1);
    assert_eq!(v["authenticated"], true);
    assert_eq!(v["regions"][0]["size"], 256u64 << 20);
    assert_eq!(v["parent"], serde_json::Value::Null);
    let r = &v["resources"][0];
    assert_eq!((&r["kind"], &r["id"]), (&"disk".into(), &"disk0".into()));
    assert_eq!(r["path"], disk.to_str().unwrap());
    assert_eq!(r["opened_on_restore"], true);
    assert_eq!(v["resources"][1]["kind"], "kernel");
    // The manifest lists the same resources.
    assert_eq!(
        manifest(&snap)["resources"][0]["path"],
        disk.to_str().unwrap()
    );
    // Another user sees it as not authenticated.
    let other = tempfile::tempdir().unwrap();
    let foreign = skiff_with_state(
        &["snapshot-info", snap.to_str().unwrap(), "--json"],
        Some(other.path()),
    );
    let v: serde_json::Value = serde_json::from_str(&foreign.stdout).unwrap();
    assert_eq!(v["authenticated"], false);
}

#[test]
fn an_edited_state_pointing_the_disk_at_another_host_file_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let (snap, disk) = snapshot_loop(root.path());
    // A host file the forger wants the guest to read and write: a path of the same length as
    // the disk's, so the state's encoding keeps its shape.
    let victim = root.path().join("vict.img");
    std::fs::write(&victim, vec![0x77u8; 64 << 10]).unwrap();
    let forged = root.path().join("forged");
    copy_snapshot(&snap, &forged);
    let mut state = std::fs::read(forged.join("state.bin")).unwrap();
    let needle = disk.to_str().unwrap().as_bytes();
    let at = state
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("the disk path in the state");
    state[at..at + needle.len()].copy_from_slice(victim.to_str().unwrap().as_bytes());
    let crc = crc32fast::hash(&state[24..]);
    state[20..24].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(forged.join("state.bin"), &state).unwrap();
    let mut m = manifest(&forged);
    m["state"]["crc32"] = crc.into();
    m["resources"][0]["path"] = victim.to_str().unwrap().into();
    std::fs::write(forged.join("manifest.json"), m.to_string()).unwrap();

    let r = restore(&forged, &[]);
    one_line_failure(
        &r,
        &format!(
            "snapshot {} is not authenticated for this user (its MAC does not match this user's \
             key: it was changed, or made by another user or host); refusing to open disk \
             \"disk0\" at {} (name it again with --disk id=disk0,path=PATH)",
            forged.display(),
            victim.display()
        ),
    );
    assert!(std::fs::read(&victim).unwrap().iter().all(|&b| b == 0x77));
    // The untouched snapshot is, for another user, refused the same way.
    let other = tempfile::tempdir().unwrap();
    let r = skiff_with_state(&["restore", snap.to_str().unwrap()], Some(other.path()));
    one_line_failure(
        &r,
        "(this user has no snapshot key); refusing to open disk \"disk0\"",
    );
    // An override naming an id the snapshot lacks is an error.
    let r = restore(&forged, &["--disk", "id=disk7,path=/tmp/x.img"]);
    one_line_failure(
        &r,
        "--disk id=\"disk7\": the snapshot has no disk device with that id (it has: disk0)",
    );
}

#[test]
fn an_override_disk_is_the_one_the_restored_guest_uses() {
    let root = tempfile::tempdir().unwrap();
    let (snap, disk) = snapshot_loop(root.path());
    // Two forks of the same snapshot, each with its own copy of the disk: one as this user,
    // one as another user (unauthenticated, allowed because the disk is named again).
    let other = tempfile::tempdir().unwrap();
    for (name, state) in [("mine.img", None), ("theirs.img", Some(other.path()))] {
        let copy = root.path().join(name);
        std::fs::copy(&disk, &copy).unwrap();
        let spec = format!("id=disk0,path={}", copy.display());
        let r = skiff_with_state(&["restore", snap.to_str().unwrap(), "--disk", &spec], state);
        r.assert_code(0)
            .assert_stdout_has(&format!("testguest: virtio-loop done rounds={ROUNDS}"));
        // The guest's later rounds went to the copy (it also read back, in the copy, a sector
        // written before the snapshot).
        assert!(
            sector_has_pattern(&copy, ROUNDS),
            "{name}: last round not in the copy"
        );
    }
    assert!(
        !sector_has_pattern(&disk, ROUNDS),
        "the snapshot's own disk was written by a restore that named another"
    );
}

/// A snapshot of the counter guest (no host resources but its kernel, recorded only).
fn snapshot_counter(root: &Path) -> (PathBuf, String) {
    let (mut vm, sock) = start_counter(root, &[]);
    vm.wait_for_line("testguest: counter 3 ", T);
    let snap = root.join("snap");
    ctl_ok(&sock, &["snapshot", snap.to_str().unwrap(), "--stop"]);
    let r = vm.wait(T);
    r.assert_code(0);
    (snap, r.stdout)
}

#[test]
fn an_unauthenticated_snapshot_without_host_resources_restores_and_bad_files_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let (snap, before) = snapshot_counter(root.path());
    // Another user (no key at all) restores it: there is nothing it could make skiff open.
    let other = tempfile::tempdir().unwrap();
    let r = skiff_with_state(&["restore", snap.to_str().unwrap()], Some(other.path()));
    assert_one_run(&before, &r);

    // A memory file that is a symbolic link (to a host file of the right size).
    let outside = root.path().join("host.img");
    std::fs::File::create(&outside)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let d = root.path().join("link");
    copy_snapshot(&snap, &d);
    std::fs::remove_file(d.join("memory-0.bin")).unwrap();
    std::os::unix::fs::symlink(&outside, d.join("memory-0.bin")).unwrap();
    assert_restore_fails(&d, "memory-0.bin is a symbolic link");

    // A region in the MMIO hole.
    let d = root.path().join("hole");
    copy_snapshot(&snap, &d);
    let mut m = manifest(&d);
    m["memory"][0]["guest_address"] = 0xe000_0000u64.into();
    std::fs::write(d.join("manifest.json"), m.to_string()).unwrap();
    assert_restore_fails(
        &d,
        "memory regions [0xe0000000+0x10000000] are not the layout",
    );

    // A VM larger than the host, laid out as `run` would lay it out: refused like `run`.
    let d = root.path().join("huge");
    copy_snapshot(&snap, &d);
    let mut m = manifest(&d);
    let size: u64 = 1 << 40;
    m["vm"]["memory_size"] = size.into();
    m["memory"] = serde_json::json!([
        {"guest_address": 0, "size": 0xc000_0000u64, "file": "memory-0.bin",
         "page_size": 4096, "method": "sparse-copy"},
        {"guest_address": 1u64 << 32, "size": size - 0xc000_0000, "file": "memory-1.bin",
         "page_size": 4096, "method": "sparse-copy"}
    ]);
    std::fs::write(d.join("manifest.json"), m.to_string()).unwrap();
    assert_restore_fails(&d, "exceeds the host's");
    let run = Skiff::spawn(&["run", "--kernel", &guest(), "--memory", "size=1T"]).wait(T);
    one_line_failure(&run, "exceeds the host's");

    // A 2 GiB (sparse) state file: refused before a byte is read.
    let d = root.path().join("big-state");
    copy_snapshot(&snap, &d);
    std::fs::File::options()
        .write(true)
        .open(d.join("state.bin"))
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let mut m = manifest(&d);
    m["state"]["size"] = (2u64 << 30).into();
    std::fs::write(d.join("manifest.json"), m.to_string()).unwrap();
    let started = Instant::now();
    assert_restore_fails(
        &d,
        "state.bin is 2147483648 bytes, larger than a state file may be",
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // FIFOs as state file and manifest: refused, not waited on.
    for name in ["state.bin", "manifest.json"] {
        let d = root.path().join(format!("fifo-{name}"));
        copy_snapshot(&snap, &d);
        std::fs::remove_file(d.join(name)).unwrap();
        let status = Command::new("mkfifo").arg(d.join(name)).status().unwrap();
        assert!(status.success());
        let started = Instant::now();
        assert_restore_fails(&d, &format!("{name} is a FIFO, not a regular file"));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
