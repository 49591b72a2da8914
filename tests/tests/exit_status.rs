//! Exit codes a script can trust: every end writes `--exit-status-file` (reason, code, detail)
//! atomically, the guest's own ends (debug-exit port, poweroff) print no `skiff:` line even
//! when the guest picks one of skiff's own codes, and every end skiff decides prints exactly
//! one.

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::time::Duration;

use skiff_tests::{run_skiff, run_testguest, Finished, Skiff};

const T: Duration = Duration::from_secs(60);

fn status(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("no exit status file {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

/// The `skiff:` lines on stderr that are not log lines.
fn verdict_lines(r: &Finished) -> Vec<&str> {
    r.stderr
        .lines()
        .filter(|l| !l.starts_with("skiff: warn: ") && !l.starts_with("skiff: error: "))
        .collect()
}

/// Asserts the file says `reason` and `code`, the process exited with `code`, and stderr has
/// exactly `lines` verdict lines (the last line of stderr, if one).
fn check(r: &Finished, file: &Path, reason: &str, code: i32, lines: usize) -> serde_json::Value {
    r.assert_code(code);
    let v = status(file);
    assert_eq!(v["reason"], reason, "{v}");
    assert_eq!(v["code"], code, "{v}");
    let verdicts = verdict_lines(r);
    assert_eq!(verdicts.len(), lines, "stderr: {}", r.stderr);
    if lines == 1 {
        assert_eq!(r.stderr.lines().last(), verdicts.first().copied());
        assert!(verdicts[0].starts_with("skiff: "), "{}", r.stderr);
        assert_eq!(v["detail"].as_str(), verdicts[0].strip_prefix("skiff: "));
    } else {
        assert!(v["detail"].is_null(), "{v}");
    }
    v
}

#[test]
fn a_guest_exit_code_is_told_from_skiff_s_own() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("status.json");
    let spec = file.to_string_lossy().into_owned();
    for n in [0, 1, 2, 120, 124, 137, 143] {
        let r = run_testguest(&format!("exit={n}"), &["--exit-status-file", &spec], T);
        check(&r, &file, "guest-exit", n, 0);
        assert!(r.stderr.is_empty(), "exit={n}: {}", r.stderr);
    }
    // Only the file is left: it was renamed into place, no temporary stays behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn skiff_s_own_ends_print_one_line_and_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("status.json");
    let spec = file.to_string_lossy().into_owned();
    let with_file = |cmdline: &str, extra: &[&str]| {
        let mut args = vec!["--exit-status-file", spec.as_str()];
        args.extend_from_slice(extra);
        run_testguest(cmdline, &args, T)
    };

    let r = with_file("spin", &["--timeout", "1"]);
    check(&r, &file, "timeout", 124, 1);

    let r = with_file("acpi-reset", &[]);
    check(&r, &file, "reset", 120, 1);

    let r = with_file("poweroff", &[]);
    check(&r, &file, "poweroff", 0, 0);

    // A kernel that cannot be read: skiff could not start the VM.
    let r = run_skiff(
        &[
            "run",
            "--kernel",
            "/nonexistent/vmlinux",
            "--exit-status-file",
            &spec,
        ],
        T,
    );
    let v = check(&r, &file, "error", 1, 1);
    assert!(v["detail"]
        .as_str()
        .unwrap()
        .contains("/nonexistent/vmlinux"));

    // A refused command line still records its verdict.
    let r = run_skiff(&["run", "--bogus", "--exit-status-file", &spec], T);
    check(&r, &file, "usage", 2, 1);

    // Restore's failures are recorded the same way.
    let r = run_skiff(
        &[
            "restore",
            "/nonexistent/snapshot",
            "--exit-status-file",
            &spec,
        ],
        T,
    );
    check(&r, &file, "error", 1, 1);

    // A status file that cannot be placed is refused before the VM starts.
    let kernel = skiff_tests::testguest().to_string_lossy().into_owned();
    let r = run_skiff(
        &[
            "run",
            "--kernel",
            &kernel,
            "--cmdline",
            "exit=0",
            "--exit-status-file",
            "/nonexistent/dir/status.json",
        ],
        T,
    );
    r.assert_code(2).assert_stderr_has("/nonexistent/dir");
    assert!(!r.stdout.contains("testguest: boot"), "{}", r.stdout);
}

#[test]
fn a_signal_is_recorded_with_its_number() {
    skiff_tests::require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("status.json");
    let spec = file.to_string_lossy().into_owned();
    let kernel = skiff_tests::testguest().to_string_lossy().into_owned();
    for (signal, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let mut vm = Skiff::spawn(&[
            "run",
            "--kernel",
            &kernel,
            "--cmdline",
            "hello spin",
            "--exit-status-file",
            &spec,
        ]);
        vm.wait_for_line("testguest: spinning", T);
        // SAFETY: sending a signal to a child we own.
        unsafe { libc::kill(vm.pid() as i32, signal) };
        let r = vm.wait(T);
        let v = check(&r, &file, "signal", code, 1);
        assert_eq!(v["signal"], signal, "{v}");
    }
}

/// A start-up that hangs (a vhost-user backend that accepts and never answers) still ends at
/// once on SIGTERM, with its verdict.
#[test]
fn a_signal_during_start_up_ends_skiff_with_its_verdict() {
    skiff_tests::require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("status.json");
    let socket = dir.path().join("backend.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let kernel = skiff_tests::testguest().to_string_lossy().into_owned();
    let spec = format!("type=rng,socket={}", socket.display());
    let vm = Skiff::spawn(&[
        "run",
        "--kernel",
        &kernel,
        "--cmdline",
        "exit=0",
        "--vhost-user",
        &spec,
        "--exit-status-file",
        &file.to_string_lossy(),
    ]);
    // skiff is connected and waits for the backend's first answer.
    let (_conn, _) = listener.accept().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let started = std::time::Instant::now();
    // SAFETY: sending a signal to a child we own.
    unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) };
    let r = vm.wait(T);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let v = check(&r, &file, "signal", 143, 1);
    assert!(
        v["detail"].as_str().unwrap().contains("during start-up"),
        "{v}"
    );
}
