//! Helpers shared by the snapshot tests (`snapshot.rs`, `snapshot_live.rs`): the counter guest
//! (with its LAPIC timer running) with a control socket, `skiff ctl` and raw HTTP requests, and
//! the check that a snapshotted run and its restore read as one uninterrupted counter run, timer
//! interrupts and TSC included.

#![allow(dead_code)] // each test file uses its own subset

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use skiff_tests::{require_kvm, skiff_bin, testguest, Finished, Skiff};

pub const T: Duration = Duration::from_secs(60);
pub const LINES: u64 = 25;
/// The counter guest's time per line (TSC), and the most a line may take in a restored run: a
/// line spans the restore, so this bounds the TSC time the guest saw pass across it.
const LINE_MS: u64 = 100;
const MAX_LINE_TSC_MS: u64 = LINE_MS + 1400;

pub fn guest() -> String {
    testguest().to_string_lossy().into_owned()
}

/// Starts the counter guest, with its timer interrupts, and a control socket in `dir`.
pub fn start_counter(dir: &Path, extra: &[&str]) -> (Skiff, PathBuf) {
    require_kvm();
    let sock = dir.join("api.sock");
    let kernel = guest();
    let cmdline = format!("counter={LINES},timer");
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
/// Starts the `counter` guest (API socket `DIR/api.sock`) in a mount namespace of its own with
/// an 8 MiB tmpfs at `DIR/full`: the guest's 16 MiB buffer cannot fit there, so a snapshot into
/// it runs out of space. Returns the VM, the tmpfs directory and the socket.
pub fn start_counter_over_full_tmpfs(dir: &Path) -> (Skiff, PathBuf, PathBuf) {
    let full = dir.join("full");
    std::fs::create_dir(&full).unwrap();
    let sock = dir.join("api.sock");
    let script = format!(
        "mount -t tmpfs -o size=8m skiff-test {} && exec \"$0\" run --kernel {} --cmdline counter={LINES} --api-socket {}",
        full.display(),
        guest(),
        sock.display()
    );
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(skiff_tests::skiff_bin());
    (Skiff::spawn_command(&mut cmd), full, sock)
}

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
    assert_ticks_continue(before, &after.stdout);
}

/// One `testguest: counter N round=R ticks=T tsc_ms=M ok` line: (N, T, M).
fn timer_line(line: &str) -> Option<(u64, u64, u64)> {
    let rest = line
        .strip_prefix("testguest: counter ")?
        .strip_suffix(" ok")?;
    let mut words = rest.split(' ');
    let n = words.next()?.parse().ok()?;
    let field = |w: Option<&str>, key: &str| w?.strip_prefix(key)?.parse().ok();
    let _round = words.next()?;
    let ticks = field(words.next(), "ticks=")?;
    let ms = field(words.next(), "tsc_ms=")?;
    Some((n, ticks, ms))
}

/// Asserts that the counter guest's timer interrupts and TSC ran on through the snapshot and
/// restore (`before`, then the restored run's `after`). The guest itself fails if ticks go back
/// or stop while it runs, or if its TSC goes back; here, from its lines:
/// - every counter line carries `ticks=` and `tsc_ms=`;
/// - ticks grow with every line (the first restored one may equal the last saved one, when it
///   came before the restored timer's next tick; the following ones must grow): the restored
///   LAPIC timer fires (no stall), and never more than twice what the line's TSC time allows (no
///   storm);
/// - no restored line saw more than `MAX_LINE_TSC_MS` of TSC time: the guest's clock does not
///   jump across the restore, however long after the snapshot it came. Except on PVM hosts for
///   the line that spans the restore: there the guest reads the host's TSC, which KVM's TSC
///   offset cannot move back, so that line shows the real time between snapshot and restore.
pub fn assert_ticks_continue(before: &str, after: &str) {
    let hz: u64 = before
        .lines()
        .find_map(|l| l.split(" timer_hz=").nth(1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no `timer_hz=` on the counter's start line:
{before}"
            )
        });
    let parse = |text: &str| -> Vec<(u64, u64, u64)> {
        text.lines()
            .filter(|l| l.starts_with("testguest: counter ") && l.ends_with(" ok"))
            .map(|l| timer_line(l).unwrap_or_else(|| panic!("no timer fields in {l:?}")))
            .collect()
    };
    let (old, new) = (parse(before), parse(after));
    let context = || format!("--- before ---\n{before}\n--- after ---\n{after}");
    let mut ticks = 0;
    for (i, &(n, t, ms)) in old.iter().chain(&new).enumerate() {
        // The first restored line may come before the restored timer's next tick: a guest
        // whose TSC moved on (PVM, see below) prints it after its first round.
        let first_restored = i == old.len();
        assert!(
            t > ticks || (first_restored && t == ticks),
            "line {n}: ticks {t} did not advance from {ticks}\n{}",
            context()
        );
        let allowed = 2 * ms * hz / 1000 + 2;
        assert!(
            t - ticks <= allowed,
            "line {n}: {} ticks in {ms} ms at {hz} Hz\n{}",
            t - ticks,
            context()
        );
        ticks = t;
    }
    let pvm = skiff_tests::pvm_host();
    for (i, &(n, _, ms)) in new.iter().enumerate() {
        if i == 0 && pvm {
            continue;
        }
        assert!(
            ms <= MAX_LINE_TSC_MS,
            "line {n}: the guest saw {ms} ms of TSC time pass (a clock jump)\n{}",
            context()
        );
    }
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
