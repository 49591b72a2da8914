//! Snapshot progress and linking end to end: the counters `GET /vm/snapshot/progress` shows
//! while a fully touched 1 GiB guest is written, `skiff ctl snapshot`'s progress bar on a
//! terminal (and its absence without one), and a `file=`-backed guest that ends with its
//! snapshot (`--stop`), whose memory file is then the backing itself, hard-linked, and restores.

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use skiff_tests::{open_pty, require_kvm, skiff_bin, Skiff};

mod snapshot_support;
use snapshot_support::*;

/// `(bytes_done, bytes_total)` from one `GET /vm/snapshot/progress`, `None` when no snapshot runs.
fn progress(sock: &Path) -> Option<(u64, u64)> {
    let (status, v) = http(sock, "GET", "/vm/snapshot/progress", "");
    assert_eq!(status, 200, "{v}");
    if v["in_progress"] != true {
        assert!(v.get("bytes_done").is_none(), "{v}");
        return None;
    }
    assert!(v["elapsed_ms"].as_f64().unwrap() >= 0.0, "{v}");
    Some((
        v["bytes_done"].as_u64().unwrap(),
        v["bytes_total"].as_u64().unwrap(),
    ))
}

#[test]
fn progress_counters_grow_to_the_touched_total_while_a_snapshot_is_written() {
    let root = tempfile::tempdir().unwrap();
    let (vm, sock) = start_touched_1gib(root.path());
    assert_eq!(progress(&sock), None, "no snapshot runs yet");
    let snap = root.path().join("snap");
    let request = {
        let (sock, snap) = (sock.clone(), snap.clone());
        std::thread::spawn(move || ctl(&sock, &["snapshot", snap.to_str().unwrap()]))
    };
    let mut readings = Vec::new();
    while !request.is_finished() {
        if let Some(r) = progress(&sock) {
            readings.push(r);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, out, err) = request.join().unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(err.is_empty(), "no terminal, no bar: {err:?}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    let copied = summary["regions"][0]["copied_bytes"].as_u64().unwrap();
    assert!(
        copied >= 1000 << 20,
        "the guest touched all 1 GiB: {summary}"
    );
    assert!(readings.len() >= 3, "too few readings: {readings:?}");
    for pair in readings.windows(2) {
        let ((d0, t0), (d1, t1)) = (pair[0], pair[1]);
        assert!(d1 >= d0 && t1 >= t0, "counters went down: {readings:?}");
    }
    for &(done, total) in &readings {
        assert!(done <= total, "done passed total: {readings:?}");
        // Measured before the copy starts (0 until then): the backing's data extents, i.e.
        // exactly what is copied.
        assert!(total == copied || (done, total) == (0, 0), "{readings:?}");
    }
    assert!(
        readings.iter().any(|&(d, t)| d > 0 && d < t),
        "never seen mid-way: {readings:?}"
    );
    assert_eq!(progress(&sock), None, "the snapshot has ended");
    ctl_ok(&sock, &["shutdown"]);
    vm.wait(T).assert_code(0);
}

/// Runs `skiff ctl` with stderr on a fresh pseudo-terminal and stdout on a pipe: (exit code,
/// stdout, what the terminal received).
fn ctl_on_terminal(sock: &Path, args: &[&str]) -> (i32, String, String) {
    let (master, slave) = open_pty();
    let mut child = Command::new(skiff_bin())
        .arg("ctl")
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    // Read the terminal while ctl runs: a full pty buffer would block its writes.
    let terminal = std::thread::spawn(move || {
        let mut f = std::fs::File::from(master);
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the last holder of the slave (ctl) has exited.
        while let Ok(n @ 1..) = f.read(&mut buf) {
            text.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&text).into_owned()
    });
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let status = child.wait().unwrap();
    (status.code().unwrap_or(-1), out, terminal.join().unwrap())
}

#[test]
fn the_progress_bar_is_drawn_on_a_terminal_and_not_without_one() {
    let root = tempfile::tempdir().unwrap();
    let (vm, sock) = start_touched_1gib(root.path());
    let first = root.path().join("first");
    let (code, out, err) = ctl(&sock, &["snapshot", first.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.is_empty(), "a bar without a terminal: {err:?}");
    assert_eq!(out.lines().count(), 1, "only the JSON answer: {out}");
    serde_json::from_str::<serde_json::Value>(&out).unwrap();

    let second = root.path().join("second");
    let (code, out, terminal) =
        ctl_on_terminal(&sock, &["snapshot", second.to_str().unwrap(), "--stop"]);
    assert_eq!(code, 0, "{terminal}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["stopped"], true);
    assert!(
        terminal.contains("snapshot [") && terminal.contains("MiB/s"),
        "no progress bar on the terminal: {terminal:?}"
    );
    // The finished bar shows the whole touched memory written.
    let gib = terminal.contains("1023.") || terminal.contains("1.00 GiB");
    assert!(gib, "the bar does not reach the total: {terminal:?}");
    vm.wait(T).assert_code(0);
}

#[test]
fn a_file_backed_vm_ending_with_its_snapshot_is_hard_linked_and_restores() {
    require_kvm();
    let root = tempfile::tempdir().unwrap();
    let sock = root.path().join("api.sock");
    let backing = root.path().join("ram.img");
    let kernel = guest();
    let memory = format!("size=1G,file={}", backing.display());
    let cmdline = format!("memcheck counter={LINES},timer");
    // memcheck writes all 1 GiB first, so the backing is fully allocated.
    let mut vm = Skiff::spawn(&[
        "run",
        "--kernel",
        &kernel,
        "--cmdline",
        &cmdline,
        "--memory",
        &memory,
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    vm.wait_for_line("testguest: counter 3 ", T);
    // A VM that runs on after its snapshot would write the same inode: never linked.
    let kept = root.path().join("kept");
    let summary = ctl_ok(&sock, &["snapshot", kept.to_str().unwrap()]);
    let method = summary["regions"][0]["method"].as_str().unwrap();
    assert!(method == "sparse-copy" || method == "reflink", "{summary}");
    assert_eq!(std::fs::metadata(&backing).unwrap().nlink(), 1);
    let snap = root.path().join("snap");
    let started = Instant::now();
    let summary = ctl_ok(&sock, &["snapshot", snap.to_str().unwrap(), "--stop"]);
    let wall = started.elapsed();
    let region = &summary["regions"][0];
    assert_eq!(region["method"], "hard-link", "{summary}");
    assert_eq!(region["copied_bytes"], 0, "{summary}");
    let mem = snap.join("memory-0.bin");
    let (a, b) = (
        std::fs::metadata(&backing).unwrap(),
        std::fs::metadata(&mem).unwrap(),
    );
    assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()), "not the same file");
    assert_eq!(b.nlink(), 2);
    assert!(
        a.blocks() * 512 >= 1000 << 20,
        "the backing is not fully touched"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["memory"][0]["method"], "hard-link");
    eprintln!(
        "linked snapshot of a fully touched 1 GiB file= guest: {:.1} ms in skiff (write {:.1} ms, \
         which fsyncs the backing's dirty pages), {:.1} ms for `skiff ctl`",
        summary["time_ms"].as_f64().unwrap(),
        summary["write_ms"].as_f64().unwrap(),
        wall.as_secs_f64() * 1000.0
    );
    let r = vm.wait(T);
    r.assert_code(0);
    let after = std::fs::metadata(&backing).unwrap();
    assert_eq!(
        (after.ino(), after.mtime(), after.mtime_nsec(), after.len()),
        (b.ino(), b.mtime(), b.mtime_nsec(), b.len()),
        "skiff touched the linked file after the snapshot"
    );
    assert_one_run(&r.stdout, &restore(&snap, &[]));
    let restored = std::fs::metadata(&mem).unwrap();
    assert_eq!(
        (restored.mtime(), restored.mtime_nsec()),
        (b.mtime(), b.mtime_nsec()),
        "a copy-on-write restore leaves the file alone"
    );
}
