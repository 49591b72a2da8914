//! Helpers shared by the snapshot tests (`snapshot.rs`, `snapshot_live.rs`): the counter guest
//! with a control socket, `skiff ctl` and raw HTTP requests, and the check that a snapshotted
//! run and its restore read as one uninterrupted counter run.

#![allow(dead_code)] // each test file uses its own subset

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use skiff_tests::{require_kvm, skiff_bin, testguest, Finished, Skiff};

pub const T: Duration = Duration::from_secs(60);
pub const LINES: u64 = 25;

pub fn guest() -> String {
    testguest().to_string_lossy().into_owned()
}

/// Starts the counter guest with a control socket in `dir`.
pub fn start_counter(dir: &Path, extra: &[&str]) -> (Skiff, PathBuf) {
    require_kvm();
    let sock = dir.join("api.sock");
    let kernel = guest();
    let cmdline = format!("counter={LINES}");
    let mut args = vec![
        "run",
        "--kernel",
        &kernel,
        "--cmdline",
        &cmdline,
        "--api-socket",
        sock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let vm = Skiff::spawn(&args);
    (vm, sock)
}

/// Runs `skiff ctl --api-socket SOCK ARGS...`: (exit code, stdout, stderr).
/// A 1 GiB guest whose memory is fully written (memcheck), idling with the control API on
/// `dir/api.sock`: snapshotting it copies 1 GiB, long enough to overlap a second request.
pub fn start_touched_1gib(dir: &Path) -> (Skiff, PathBuf) {
    require_kvm();
    let sock = dir.join("api.sock");
    let kernel = guest();
    let mut vm = Skiff::spawn(&[
        "run",
        "--kernel",
        &kernel,
        "--cmdline",
        "memcheck spin",
        "--memory",
        "size=1G",
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    vm.wait_for_line("testguest: spinning", T);
    (vm, sock)
}

pub fn ctl(sock: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(skiff_bin())
        .arg("ctl")
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .output()
        .expect("run skiff ctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn ctl_ok(sock: &Path, args: &[&str]) -> serde_json::Value {
    let (code, out, err) = ctl(sock, args);
    assert_eq!(code, 0, "skiff ctl {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// A raw HTTP/1.1 request on the socket, as curl would send it: (status, body).
pub fn http(sock: &Path, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut s = UnixStream::connect(sock).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).expect("a JSON body"))
}

/// The line numbers of every `testguest: counter N round=R ok` line in `text`.
pub fn counter_lines(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("testguest: counter "))
        .filter(|rest| rest.ends_with(" ok"))
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect()
}

/// Asserts that `before` (the snapshotted run) then `after` (a restore) read as one run of the
/// counter guest: lines 1..=LINES once each, in order, then the verdict.
pub fn assert_one_run(before: &str, after: &Finished) {
    after.assert_code(0);
    let joined = format!("{before}{}", after.stdout);
    let lines = counter_lines(&joined);
    let expected: Vec<u64> = (1..=LINES).collect();
    assert_eq!(
        lines, expected,
        "counter lines do not continue\n--- before ---\n{before}\n--- after ---\n{}\n--- stderr ---\n{}",
        after.stdout, after.stderr
    );
    assert!(
        !counter_lines(&after.stdout).is_empty(),
        "the restored guest printed nothing of its own"
    );
    after
        .assert_stdout_has(&format!("testguest: counter done lines={LINES}"))
        .assert_stdout_has("testguest: done");
}

pub fn restore(snap: &Path, extra: &[&str]) -> Finished {
    let mut args = vec!["restore", snap.to_str().unwrap()];
    args.extend_from_slice(extra);
    Skiff::spawn(&args).wait(T)
}

pub fn file_digest(p: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(p).unwrap().hash(&mut h);
    h.finish()
}

pub fn assert_restore_fails(dir: &Path, needle: &str) {
    let r = restore(dir, &[]);
    r.assert_code(1);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one stderr line expected:\n{}", r.stderr);
    assert!(
        lines[0].starts_with("skiff: ") && lines[0].contains(needle),
        "{:?} lacks {needle:?}",
        lines[0]
    );
    assert!(!r.stderr.contains("panicked"));
}
