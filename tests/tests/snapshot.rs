//! Snapshots end to end: the control API (`skiff ctl` and raw HTTP on the socket), full
//! snapshots of the `counter` test guest, restore in new processes (copy-on-write and copy),
//! restoring twice, and every bad input: damaged or foreign snapshot files, an existing target,
//! a second snapshot while one is written.
//!
//! The counter guest checks its own memory against its ledger and registers before every line,
//! so a restored guest that prints `counter N ... ok` has consistent memory. The original run's
//! output followed by the restored run's output must read as one uninterrupted run: every line
//! number exactly once, in order.

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use skiff_tests::{require_kvm, Skiff};

mod snapshot_support;
use snapshot_support::*;

/// Takes a snapshot of a counter guest after line 3 and stops it; returns the snapshot
/// directory and the original run's output.
fn snapshot_counter(root: &Path, extra: &[&str]) -> (PathBuf, String) {
    let (mut vm, sock) = start_counter(root, extra);
    vm.wait_for_line("testguest: counter 3 ", T);
    let paused = ctl_ok(&sock, &["pause"]);
    assert_eq!(paused["state"], "paused");
    let status = ctl_ok(&sock, &["status"]);
    assert_eq!(status["state"], "paused");
    let snap = root.join("snap");
    let summary = ctl_ok(&sock, &["snapshot", snap.to_str().unwrap(), "--stop"]);
    assert_eq!(summary["stopped"], true);
    // A `file=` backing becomes the memory file (the VM ends with the snapshot): nothing copied.
    let linked = extra.iter().any(|a| a.contains("file="));
    let method = if linked { "hard-link" } else { "sparse-copy" };
    assert_eq!(summary["regions"][0]["method"], method, "{summary}");
    // The guest touched its 16 MiB buffer and its image; the rest of 256 MiB stays a hole.
    let written = summary["bytes_written"].as_u64().unwrap();
    let expected = if linked {
        0..1 << 20
    } else {
        16 << 20..48 << 20
    };
    assert!(
        expected.contains(&written),
        "wrote {written} bytes: {summary}"
    );
    let r = vm.wait(T);
    r.assert_code(0)
        .assert_stderr_has("stopped through the control API");
    let mem = snap.join("memory-0.bin");
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), 256 << 20);
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&mem).unwrap()) * 512;
    assert!(
        allocated < 64 << 20,
        "memory file is not sparse: {allocated} bytes allocated"
    );
    (snap, r.stdout)
}

#[test]
fn restored_counter_continues_where_the_snapshot_was_taken_twice() {
    let root = tempfile::tempdir().unwrap();
    let (snap, before) = snapshot_counter(root.path(), &[]);
    let files = ["manifest.json", "state.bin", "memory-0.bin"];
    let digests: Vec<u64> = files.iter().map(|f| file_digest(&snap.join(f))).collect();
    // Copy-on-write restore, twice from the same files, then a copying restore.
    for extra in [&[][..], &[][..], &["--memory-mode", "copy"][..]] {
        let r = restore(&snap, extra);
        assert_one_run(&before, &r);
    }
    let after: Vec<u64> = files.iter().map(|f| file_digest(&snap.join(f))).collect();
    assert_eq!(digests, after, "restoring must not change the snapshot");
}

#[test]
fn a_vm_restored_copy_on_write_can_be_snapshotted_again() {
    let root = tempfile::tempdir().unwrap();
    let (first, before) = snapshot_counter(root.path(), &[]);
    // The restored guest rewrites its whole buffer every round; those pages live only in the
    // private mapping, not in `first`'s memory file, and must reach the second snapshot.
    let sock = root.path().join("api2.sock");
    let mut vm = Skiff::spawn(&[
        "restore",
        first.to_str().unwrap(),
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    vm.wait_for_line("testguest: counter 7 ", T);
    assert_eq!(ctl_ok(&sock, &["status"])["memory_private"], true);
    let second = root.path().join("second");
    let summary = ctl_ok(&sock, &["snapshot", second.to_str().unwrap(), "--stop"]);
    assert!(
        summary["bytes_written"].as_u64().unwrap() >= 16 << 20,
        "{summary}"
    );
    let middle = vm.wait(T);
    middle.assert_code(0);
    let after = restore(&second, &[]);
    let joined = format!("{before}{}", middle.stdout);
    assert_one_run(&joined, &after);
}

#[test]
fn two_vcpu_guest_with_a_file_backing_restores() {
    let root = tempfile::tempdir().unwrap();
    let ram = root.path().join("guest.ram");
    let spec = format!("size=256M,file={}", ram.display());
    let (snap, before) = snapshot_counter(root.path(), &["--cpus", "2", "--memory", &spec]);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["vm"]["cpus"], 2);
    assert_eq!(m["vm"]["memory_backing"], "file");
    // The VM ended with the snapshot: the backing itself, linked.
    assert_eq!(m["memory"][0]["method"], "hard-link");
    assert_one_run(&before, &restore(&snap, &[]));
}

#[test]
fn api_answers_curl_style_requests_and_errors() {
    let root = tempfile::tempdir().unwrap();
    let (mut vm, sock) = start_counter(root.path(), &[]);
    vm.wait_for_line("testguest: counter 1 ", T);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket is owner-only");
    let (status, body) = http(&sock, "GET", "/vm", "");
    assert_eq!(status, 200);
    assert_eq!(body["state"], "running");
    assert_eq!(body["vcpus"], 1);
    assert_eq!(body["memory_bytes"], 256u64 << 20);
    assert_eq!(http(&sock, "GET", "/nope", "").0, 404);
    assert_eq!(http(&sock, "GET", "/vm/pause", "").0, 405);
    let (status, body) = http(&sock, "PUT", "/vm/snapshot", r#"{"dir": "relative/snap"}"#);
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not an absolute path"),
        "{body}"
    );
    assert_eq!(http(&sock, "PUT", "/vm/snapshot", "{bad json").0, 400);
    // A second server on the same socket is refused while this one runs.
    let kernel = guest();
    let second = skiff_tests::run_skiff(
        &[
            "run",
            "--kernel",
            &kernel,
            "--api-socket",
            sock.to_str().unwrap(),
        ],
        T,
    );
    second
        .assert_code(1)
        .assert_stderr_has("is in use by another process");
    // The VM still runs after all that, and shuts down on request.
    vm.wait_for_line("testguest: counter 4 ", T);
    let (status, body) = http(&sock, "PUT", "/vm/shutdown", "");
    assert_eq!((status, body["state"].as_str()), (200, Some("stopping")));
    vm.wait(T).assert_code(0);
    assert!(!sock.exists(), "the socket is removed when skiff ends");
}

#[test]
fn snapshot_into_an_existing_directory_is_refused_and_the_vm_runs_on() {
    let root = tempfile::tempdir().unwrap();
    let (mut vm, sock) = start_counter(root.path(), &[]);
    vm.wait_for_line("testguest: counter 2 ", T);
    let snap = root.path().join("snap");
    let first = ctl_ok(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(first["stopped"], false);
    let digest = file_digest(&snap.join("manifest.json"));
    let (code, out, err) = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with("skiff: ") && err.contains("already exists"),
        "{err}"
    );
    assert_eq!(
        digest,
        file_digest(&snap.join("manifest.json")),
        "earlier snapshot intact"
    );
    let leftovers: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary directories left: {leftovers:?}"
    );
    assert_eq!(ctl_ok(&sock, &["status"])["state"], "running");
    // The guest keeps counting (and checking its memory) after both requests.
    vm.wait_for_line("testguest: counter done", T);
    vm.wait(T)
        .assert_code(0)
        .assert_stdout_has("testguest: done");
}

#[test]
fn a_full_filesystem_fails_the_snapshot_cleanly() {
    require_kvm();
    let root = tempfile::tempdir().unwrap();
    let (mut vm, full, sock) = start_counter_over_full_tmpfs(root.path());
    vm.wait_for_line("testguest: counter 2 ", T);
    let snap = full.join("snap");
    let (code, _, err) = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    // Nothing is left in the full filesystem, as skiff sees it.
    let inside = PathBuf::from(format!("/proc/{}/root{}", vm.pid(), full.display()));
    let left: Vec<_> = std::fs::read_dir(&inside).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_eq!(ctl_ok(&sock, &["status"])["state"], "running");
    vm.wait_for_line("testguest: counter done", T);
    vm.wait(T)
        .assert_code(0)
        .assert_stdout_has("testguest: done");
}

#[test]
fn a_second_snapshot_while_one_is_written_is_a_conflict() {
    require_kvm();
    let root = tempfile::tempdir().unwrap();
    // memcheck writes every page of 1 GiB, so the snapshot copies 1 GiB and takes a while.
    let (vm, sock) = start_touched_1gib(root.path());
    let snap = root.path().join("big");
    let first = {
        let (sock, snap) = (sock.clone(), snap.clone());
        std::thread::spawn(move || ctl(&sock, &["snapshot", snap.to_str().unwrap()]))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !http(&sock, "GET", "/vm", "").1["snapshot_in_progress"]
        .as_bool()
        .unwrap_or(false)
    {
        assert!(Instant::now() < deadline, "the snapshot never started");
        assert!(
            !first.is_finished(),
            "the snapshot ended before a second could be tried"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let second = root.path().join("second");
    let (status, body) = http(
        &sock,
        "PUT",
        "/vm/snapshot",
        &format!(r#"{{"dir": "{}"}}"#, second.display()),
    );
    assert_eq!(status, 409, "{body}");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("already being written"));
    assert_eq!(http(&sock, "PUT", "/vm/resume", "").0, 409);
    let (code, out, err) = first.join().unwrap();
    assert_eq!(code, 0, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        summary["bytes_written"].as_u64().unwrap() > 1000 << 20,
        "{summary}"
    );
    assert!(!second.exists());
    assert_eq!(ctl_ok(&sock, &["status"])["state"], "running");
    // SIGTERM while paused still ends the VM.
    ctl_ok(&sock, &["pause"]);
    // SAFETY: sending a signal to a child we own.
    unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) };
    vm.wait(T).assert_code(143).assert_stderr_has("signal 15");
}

/// A good snapshot to damage: shared by the bad-input cases (made once per test).
fn damaged_copy(good: &Path, root: &Path, name: &str) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir(&d).unwrap();
    for f in ["manifest.json", "state.bin"] {
        std::fs::copy(good.join(f), d.join(f)).unwrap();
    }
    std::fs::hard_link(good.join("memory-0.bin"), d.join("memory-0.bin")).unwrap();
    d
}

#[test]
fn damaged_or_foreign_snapshots_give_one_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let (good, _) = snapshot_counter(root.path(), &[]);

    let d = damaged_copy(&good, root.path(), "no-state");
    std::fs::remove_file(d.join("state.bin")).unwrap();
    assert_restore_fails(&d, "cannot read state file");

    let d = damaged_copy(&good, root.path(), "truncated");
    let bytes = std::fs::read(d.join("state.bin")).unwrap();
    std::fs::write(d.join("state.bin"), &bytes[..bytes.len() / 2]).unwrap();
    assert_restore_fails(&d, "but the manifest says");

    // Truncated, with the manifest edited to match: the header catches it.
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("manifest.json")).unwrap()).unwrap();
    m["state"]["size"] = (bytes.len() / 2).into();
    std::fs::write(d.join("manifest.json"), m.to_string()).unwrap();
    assert_restore_fails(&d, "state file is truncated");

    let d = damaged_copy(&good, root.path(), "flipped");
    let mut bytes = std::fs::read(d.join("state.bin")).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x08;
    std::fs::write(d.join("state.bin"), &bytes).unwrap();
    assert_restore_fails(&d, "CRC-32");

    let d = damaged_copy(&good, root.path(), "version");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("manifest.json")).unwrap()).unwrap();
    m["format_version"] = 99.into();
    std::fs::write(d.join("manifest.json"), m.to_string()).unwrap();
    assert_restore_fails(&d, "snapshot format version 99 is not supported");

    let d = damaged_copy(&good, root.path(), "short-memory");
    std::fs::remove_file(d.join("memory-0.bin")).unwrap();
    let f = std::fs::File::create(d.join("memory-0.bin")).unwrap();
    f.set_len(128 << 20).unwrap();
    assert_restore_fails(&d, "is 134217728 bytes but its region is 268435456");

    assert_restore_fails(
        &root.path().join("missing"),
        "cannot open snapshot directory",
    );

    // None of that touched the good snapshot, which still restores (and runs until stopped).
    restore(&good, &["--serial", "off", "--timeout", "0.5"]).assert_code(124);
}
