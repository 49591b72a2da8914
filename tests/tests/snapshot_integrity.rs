//! Snapshots lose no data, end to end: memory-file checksums (`skiff snapshot-verify`,
//! `restore --verify`), the hard-link rule for `--memory file=` and its override, the shared
//! locks of copy-on-write restores, SIGKILL at random moments of full and live snapshots
//! (the old snapshot stays intact, the new one is complete or absent, and the next snapshot
//! removes the dead writers' temporary directories), and a full filesystem during a live
//! snapshot.

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use skiff_tests::{require_kvm, run_skiff, Finished, Skiff};

mod snapshot_support;
use snapshot_support::*;

fn verify(dir: &Path) -> Finished {
    run_skiff(&["snapshot-verify", dir.to_str().unwrap()], T)
}

fn assert_verified(dir: &Path) {
    let r = verify(dir);
    assert_eq!(
        r.code,
        Some(0),
        "snapshot-verify {}: {}{}",
        dir.display(),
        r.stdout,
        r.stderr
    );
    assert!(r.stdout.contains(": ok ("), "{}", r.stdout);
}

fn one_line(r: &Finished, needle: &str) {
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one stderr line:\n{}", r.stderr);
    assert!(
        lines[0].starts_with("skiff: ") && lines[0].contains(needle),
        "{:?} lacks {needle:?}",
        lines[0]
    );
}

#[test]
fn a_memory_file_a_snapshot_holds_is_refused_locked_and_its_change_caught() {
    let root = tempfile::tempdir().unwrap();
    let ram = root.path().join("ram.img");
    let spec = format!("size=256M,file={}", ram.display());
    let (mut vm, sock) = start_counter(root.path(), &["--memory", &spec]);
    vm.wait_for_line("testguest: counter 3 ", T);
    let snap = root.path().join("snap");
    let summary = ctl_ok(&sock, &["snapshot", snap.to_str().unwrap(), "--stop"]);
    assert_eq!(summary["regions"][0]["method"], "hard-link", "{summary}");
    vm.wait(T).assert_code(0);
    // The linked file has a checksum like any other.
    assert_verified(&snap);

    // A new VM on the same file would overwrite the snapshot's memory: refused, untouched.
    let kernel = guest();
    let r = run_skiff(
        &[
            "run",
            "--kernel",
            &kernel,
            "--memory",
            &spec,
            "--cmdline",
            "counter=2",
        ],
        T,
    );
    r.assert_code(1);
    one_line(&r, "has 2 hard links");
    assert!(r.stderr.contains("shared-with-snapshot=on"), "{}", r.stderr);
    assert_verified(&snap);

    // A copy-on-write restore maps the file for its whole life and holds a shared lock: even
    // with the override, no VM may write the file meanwhile.
    let forced = format!("{spec},shared-with-snapshot=on");
    let mut restored = Skiff::spawn(&["restore", snap.to_str().unwrap()]);
    restored.wait_for_line("testguest: counter 5 ", T);
    let r = run_skiff(
        &[
            "run",
            "--kernel",
            &kernel,
            "--memory",
            &forced,
            "--cmdline",
            "counter=2",
        ],
        T,
    );
    r.assert_code(1);
    one_line(&r, "is in use by another process (locked");
    restored
        .wait(T)
        .assert_code(0)
        .assert_stdout_has("testguest: counter done");

    // With the override and no restore running, the VM goes ahead and changes the snapshot's
    // memory, which verify and restore --verify then catch.
    let r = run_skiff(
        &[
            "run",
            "--kernel",
            &kernel,
            "--memory",
            &forced,
            "--cmdline",
            "counter=2",
        ],
        T,
    );
    r.assert_code(0);
    let r = verify(&snap);
    r.assert_code(1);
    one_line(&r, "memory-0.bin has checksum");
    assert!(r.stderr.contains("contents changed"), "{}", r.stderr);
    let r = run_skiff(&["restore", snap.to_str().unwrap(), "--verify"], T);
    r.assert_code(1);
    one_line(&r, "failed verification: memory file");
    assert!(
        !r.stdout.contains("testguest: counter"),
        "the guest must not run"
    );
}

#[test]
fn a_copy_on_write_restore_keeps_a_vm_off_its_memory_file() {
    // The reverse order: a VM runs on a file, so a cow restore of a snapshot that (after the
    // override) shares that file is refused rather than reading pages under a writer.
    let root = tempfile::tempdir().unwrap();
    let ram = root.path().join("ram.img");
    let spec = format!("size=256M,file={}", ram.display());
    let (mut vm, sock) = start_counter(root.path(), &["--memory", &spec]);
    vm.wait_for_line("testguest: counter 2 ", T);
    let snap = root.path().join("snap");
    ctl_ok(&sock, &["snapshot", snap.to_str().unwrap(), "--stop"]);
    vm.wait(T).assert_code(0);
    let forced = format!("{spec},shared-with-snapshot=on");
    let kernel = guest();
    let mut writer = Skiff::spawn(&[
        "run",
        "--kernel",
        &kernel,
        "--memory",
        &forced,
        "--cmdline",
        &format!("counter={LINES}"),
    ]);
    writer.wait_for_line("testguest: counter 1 ", T);
    let r = run_skiff(&["restore", snap.to_str().unwrap()], T);
    r.assert_code(1);
    one_line(&r, "memory file");
    assert!(
        r.stderr.contains("in use by another process"),
        "{}",
        r.stderr
    );
    writer.wait(T).assert_code(0);
}

/// A small xorshift generator: the tests need spread, not quality, and print their seed.
struct Random(u64);

impl Random {
    fn new() -> Self {
        let seed = std::env::var("SKIFF_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("random seed {seed} (set SKIFF_TEST_SEED to repeat)");
        Self(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Entries of `dir` by name.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn sigkill_at_random_moments_of_full_and_live_snapshots_tears_nothing() {
    require_kvm();
    let root = tempfile::tempdir().unwrap();
    let snaps = root.path().join("snaps");
    std::fs::create_dir(&snaps).unwrap();
    let mut random = Random::new();

    // The old snapshot, complete, next to every new one; and how long a snapshot takes here.
    let run0 = root.path().join("run0");
    std::fs::create_dir(&run0).unwrap();
    let (mut vm, sock) = start_counter(&run0, &[]);
    vm.wait_for_line("testguest: counter 2 ", T);
    let old = snaps.join("old");
    let started = Instant::now();
    ctl_ok(&sock, &["snapshot", old.to_str().unwrap(), "--stop"]);
    let took = started.elapsed();
    vm.wait(T).assert_code(0);
    assert_verified(&old);
    let window = took.max(Duration::from_millis(40)) * 2;
    eprintln!("a full snapshot took {took:?}; killing within {window:?}");

    let (mut complete, mut absent) = (Vec::new(), 0);
    for i in 0..20 {
        let live = i % 2 == 1;
        let run = root.path().join(format!("run{}", i + 1));
        std::fs::create_dir(&run).unwrap();
        let (mut vm, sock) = start_counter(&run, &[]);
        vm.wait_for_line("testguest: counter 2 ", T);
        let target = snaps.join(format!("new{i}"));
        let request = {
            let (sock, target) = (sock.clone(), target.clone());
            std::thread::spawn(move || {
                let mut args = vec!["snapshot", target.to_str().unwrap()];
                if live {
                    args.push("--live");
                }
                ctl(&sock, &args)
            })
        };
        let delay = Duration::from_micros(random.below(window.as_micros() as u64));
        std::thread::sleep(delay);
        // SAFETY: signalling a child process this test started.
        unsafe { libc::kill(vm.pid() as i32, libc::SIGKILL) };
        let r = vm.wait(T);
        assert_eq!(
            r.code, None,
            "skiff must have died of SIGKILL: {}",
            r.stderr
        );
        let _ = request.join().unwrap();
        // The old snapshot is intact; the new one is complete or absent.
        assert_verified(&old);
        let made = target.exists();
        if made {
            assert_verified(&target);
            complete.push(target);
        } else {
            absent += 1;
        }
        // Anything else is a temporary directory, never a torn `newN`.
        for name in names(&snaps) {
            assert!(
                name == "old"
                    || name.starts_with("new") && !name.contains('.')
                    || name.contains(".tmp-"),
                "unexpected entry {name} after kill {i} ({:?} in, live {live})",
                delay
            );
        }
        eprintln!(
            "kill {i} ({}) after {delay:?}: {}",
            if live { "live" } else { "full" },
            if made { "complete" } else { "absent" }
        );
    }
    eprintln!("{} complete, {absent} absent", complete.len());

    // The next snapshot into the same parent removes the killed writers' temporaries.
    let last = root.path().join("last");
    std::fs::create_dir(&last).unwrap();
    let (mut vm, sock) = start_counter(&last, &[]);
    vm.wait_for_line("testguest: counter 2 ", T);
    let after = snaps.join("after");
    ctl_ok(&sock, &["snapshot", after.to_str().unwrap(), "--stop"]);
    vm.wait(T).assert_code(0);
    let left: Vec<String> = names(&snaps)
        .into_iter()
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(left.is_empty(), "stale temporaries left: {left:?}");
    assert_verified(&after);
    // The old snapshot still restores, and so does a new one that completed.
    for dir in [Some(&old), complete.last()].into_iter().flatten() {
        run_skiff(&["restore", dir.to_str().unwrap(), "--verify"], T)
            .assert_code(0)
            .assert_stdout_has("testguest: counter done");
    }
}

#[test]
fn a_full_filesystem_during_a_live_snapshot_is_one_line_and_the_vm_runs_on() {
    require_kvm();
    let root = tempfile::tempdir().unwrap();
    let (mut vm, full, sock) = start_counter_over_full_tmpfs(root.path());
    vm.wait_for_line("testguest: counter 2 ", T);
    let snap = full.join("snap");
    let (code, _, err) = ctl(&sock, &["snapshot", snap.to_str().unwrap(), "--live"]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    // Nothing is left in the full filesystem, as skiff sees it: no torn snapshot, no temporary.
    let inside = PathBuf::from(format!("/proc/{}/root{}", vm.pid(), full.display()));
    let left: Vec<_> = std::fs::read_dir(&inside).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_eq!(ctl_ok(&sock, &["status"])["state"], "running");
    // The guest, which checks its memory every line, finishes its run.
    let r = vm.wait(T);
    r.assert_code(0)
        .assert_stdout_has("testguest: counter done")
        .assert_stdout_has("testguest: done");
    assert_eq!(counter_lines(&r.stdout), (1..=LINES).collect::<Vec<_>>());
}
