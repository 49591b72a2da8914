//! Snapshots of VMs with virtio devices, end to end: the test guest's `virtio-loop` scenario
//! initialises virtio-blk and virtio-rng once and then keeps using the same queues; it is
//! snapshotted mid-run (paused full, live and diff), the original stops, and the restored
//! guest, in a new process, goes on issuing requests on the same queues without
//! re-initialising anything: random bytes keep coming, a sector written before the snapshot is
//! read back after it, and every sector the guest wrote is in the host file afterwards.

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};

use skiff_tests::{require_kvm, Skiff};

mod snapshot_support;
use snapshot_support::*;

const ROUNDS: u64 = 16;
/// Every u64 on the disk is its offset XOR this (the test guest's `PATTERN`).
const PATTERN: u64 = 0xa5a5_a5a5_a5a5_a5a5;

fn new_disk(dir: &Path) -> PathBuf {
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 << 10]).unwrap();
    disk
}

/// Starts the loop guest, after the scenarios in `before` (may be empty).
fn start_loop(dir: &Path, disk: &Path, before: &str) -> (Skiff, PathBuf) {
    require_kvm();
    let sock = dir.join("api.sock");
    let kernel = guest();
    let cmdline = format!("{before} virtio-loop={ROUNDS}");
    let disk_arg = format!("path={}", disk.display());
    let vm = Skiff::spawn(&[
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
    (vm, sock)
}

fn rounds(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("testguest: virtio-loop round="))
        .filter_map(|rest| rest.strip_suffix(" ok")?.parse().ok())
        .collect()
}

/// Sectors 1..=ROUNDS of the host file hold the guest's pattern.
fn assert_disk_pattern(disk: &Path) {
    let bytes = std::fs::read(disk).unwrap();
    for sector in 1..=ROUNDS {
        for off in (0..512).step_by(8) {
            let at = (sector * 512 + off) as usize;
            let word = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
            assert_eq!(
                word,
                (sector * 512 + off) ^ PATTERN,
                "sector {sector} offset {off} of the host file"
            );
        }
    }
    assert!(bytes[..512].iter().all(|&b| b == 0), "sector 0 untouched");
}

/// Snapshots the loop guest (started after the scenarios in `first`) after round 3 with
/// `snapshot_args` (plus `--stop`), restores it in a new process and checks the two runs read
/// as one.
fn snapshot_and_restore(first: &str, snapshot_args: &[&str], take_full_first: bool) {
    let root = tempfile::tempdir().unwrap();
    let disk = new_disk(root.path());
    let (mut vm, sock) = start_loop(root.path(), &disk, first);
    vm.wait_for_line("testguest: virtio-loop round=3 ok", T);
    if take_full_first {
        let base = root.path().join("base");
        ctl_ok(&sock, &["snapshot", base.to_str().unwrap()]);
        vm.wait_for_line("testguest: virtio-loop round=5 ok", T);
    }
    let snap = root.path().join("snap");
    let mut args = vec!["snapshot", snap.to_str().unwrap(), "--stop"];
    args.extend_from_slice(snapshot_args);
    let summary = ctl_ok(&sock, &args);
    assert_eq!(summary["stopped"], true, "{summary}");
    let before = vm.wait(T);
    before.assert_code(0);
    if first == "virtio-bar-move" {
        before.assert_stdout_has("testguest: virtio-bar-move moved 0xc0008000 -> 0xd0000000");
    }
    let done_before = rounds(&before.stdout);
    assert!(
        !done_before.is_empty() && *done_before.last().unwrap() < ROUNDS,
        "the snapshot was not taken mid-run:\n{}",
        before.stdout
    );

    let after = restore(&snap, &[]);
    after.assert_code(0);
    assert!(
        !after.stdout.contains("virtio-loop start"),
        "the restored guest started over:\n{}",
        after.stdout
    );
    let mut all = done_before.clone();
    all.extend(rounds(&after.stdout));
    assert_eq!(
        all,
        (1..=ROUNDS).collect::<Vec<_>>(),
        "rounds do not continue\n--- before ---\n{}\n--- after ---\n{}\n--- stderr ---\n{}",
        before.stdout,
        after.stdout,
        after.stderr
    );
    after
        .assert_stdout_has(&format!("testguest: virtio-loop done rounds={ROUNDS}"))
        .assert_stdout_has("testguest: done");
    assert_disk_pattern(&disk);
}

#[test]
fn paused_snapshot_of_blk_and_rng_continues_the_same_queues_after_restore() {
    snapshot_and_restore("", &[], false);
}

#[test]
fn a_bar_the_guest_moved_is_restored_where_the_guest_put_it() {
    // virtio-bar-move leaves the rng's BAR at 0xd0000000 (skiff placed it at 0xc0008000,
    // after the disk's), where the loop then drives it, before and after the restore.
    snapshot_and_restore("virtio-bar-move", &[], false);
}

#[test]
fn live_snapshot_of_blk_and_rng_continues_after_restore() {
    snapshot_and_restore("", &["--live"], false);
}

#[test]
fn diff_snapshot_of_blk_and_rng_continues_after_restore() {
    snapshot_and_restore("", &["--diff"], true);
}

#[test]
fn the_original_keeps_using_its_devices_after_a_snapshot() {
    let root = tempfile::tempdir().unwrap();
    let disk = new_disk(root.path());
    let (mut vm, sock) = start_loop(root.path(), &disk, "");
    vm.wait_for_line("testguest: virtio-loop round=2 ok", T);
    ctl_ok(
        &sock,
        &["snapshot", root.path().join("a").to_str().unwrap()],
    );
    vm.wait_for_line("testguest: virtio-loop round=4 ok", T);
    ctl_ok(
        &sock,
        &[
            "snapshot",
            root.path().join("b").to_str().unwrap(),
            "--live",
        ],
    );
    let r = vm.wait(T);
    r.assert_code(0)
        .assert_stdout_has(&format!("testguest: virtio-loop done rounds={ROUNDS}"));
    assert_eq!(rounds(&r.stdout), (1..=ROUNDS).collect::<Vec<_>>());
    assert_disk_pattern(&disk);
}

#[test]
fn a_snapshot_with_tampered_device_state_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let disk = new_disk(root.path());
    let (mut vm, sock) = start_loop(root.path(), &disk, "");
    vm.wait_for_line("testguest: virtio-loop round=2 ok", T);
    let snap = root.path().join("snap");
    ctl_ok(&sock, &["snapshot", snap.to_str().unwrap(), "--stop"]);
    vm.wait(T).assert_code(0);
    // The disk the snapshot names is gone: one clear line naming it.
    std::fs::rename(&disk, root.path().join("moved.img")).unwrap();
    assert_restore_fails(&snap, "disk.img");
}

#[test]
fn the_disk_is_free_for_a_restore_as_soon_as_the_stopped_vm_has_exited() {
    // skiff leaves the kernel's VM teardown to a detached process after it exits; that process
    // must hold nothing but the VM, or a restore right after `--stop` finds the disk locked.
    for live in [false, true] {
        let root = tempfile::tempdir().unwrap();
        let disk = new_disk(root.path());
        let (mut vm, sock) = start_loop(root.path(), &disk, "");
        vm.wait_for_line("testguest: virtio-loop round=1 ok", T);
        let snap = root.path().join("snap");
        let mut args = vec!["snapshot", snap.to_str().unwrap(), "--stop"];
        if live {
            args.push("--live");
        }
        ctl_ok(&sock, &args);
        vm.wait(T).assert_code(0);
        let file = std::fs::File::open(&disk).unwrap();
        // SAFETY: flock on a descriptor this test owns.
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        assert_eq!(
            rc, 0,
            "live={live}: the disk is still locked after skiff exited"
        );
    }
}
