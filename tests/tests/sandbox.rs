//! The sandbox end to end: every thread kind's seccomp filter stops a forbidden call (the
//! release binary's test trigger `SKIFF_TEST_FORBIDDEN_SYSCALL`, honoured only with `--seccomp
//! on`), a running skiff shows seccomp, no_new_privs and no capabilities on every thread,
//! inherited descriptors are closed, and `--sandbox` (Landlock) lets a VM snapshot only into
//! the directories it was given (or, on a kernel without Landlock, fails with one line).

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use skiff_tests::{require_kvm, skiff_bin, testguest, Backend, Finished, Skiff};

mod snapshot_support;
use snapshot_support::{ctl, ctl_ok};

const T: Duration = Duration::from_secs(60);
const TRIGGER: &str = "SKIFF_TEST_FORBIDDEN_SYSCALL";
/// `personality`, the call the trigger makes, on x86_64.
const PERSONALITY: u32 = 135;
/// 128 + SIGSYS.
const SECCOMP_EXIT: i32 = 159;

fn guest() -> String {
    testguest().to_string_lossy().into_owned()
}

/// The line the SIGSYS handler prints for the trigger's call on a `kind` thread.
fn violation_line(kind: &str) -> String {
    format!(
        "skiff: seccomp: thread kind '{kind}' made forbidden system call {PERSONALITY} \
         with arguments 0xffffffff, "
    )
}

/// Runs `skiff args` with the trigger set to `kind` and waits for it.
fn run_with_trigger(kind: &str, args: &[&str]) -> Finished {
    require_kvm();
    let mut cmd = Command::new(skiff_bin());
    cmd.args(args).env(TRIGGER, kind);
    Skiff::spawn_command(&mut cmd).wait(T)
}

fn run_guest_with_trigger(kind: &str, cmdline: &str, extra: &[&str]) -> Finished {
    let kernel = guest();
    let mut args = vec!["run", "--kernel", &kernel, "--cmdline", cmdline];
    args.extend_from_slice(extra);
    run_with_trigger(kind, &args)
}

fn assert_stopped_by_filter(r: &Finished, kind: &str) {
    r.assert_code(SECCOMP_EXIT)
        .assert_stderr_has(&violation_line(kind))
        .assert_stderr_has("(exit code 159; see docs/sandbox.md)");
}

#[test]
fn a_vcpu_thread_is_stopped_by_its_filter() {
    let r = run_guest_with_trigger("vcpu", "hello", &[]);
    assert_stopped_by_filter(&r, "vcpu");
}

#[test]
fn the_event_loop_thread_is_stopped_by_its_filter() {
    let r = run_guest_with_trigger("event-loop", "hello", &[]);
    assert_stopped_by_filter(&r, "event-loop");
}

#[test]
fn a_guest_output_writer_is_stopped_by_its_filter() {
    // The serial port's stdout sink has a writer thread of its own.
    let r = run_guest_with_trigger("guest-output", "hello", &[]);
    assert_stopped_by_filter(&r, "guest-output");
}

fn disk_image(dir: &Path) -> PathBuf {
    let p = dir.join("disk.img");
    std::fs::File::create(&p).unwrap().set_len(4 << 20).unwrap();
    p
}

#[test]
fn a_disk_thread_is_stopped_by_its_filter() {
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("path={}", disk_image(dir.path()).display());
    let r = run_guest_with_trigger("disk", "virtio-blk", &["--disk", &spec]);
    assert_stopped_by_filter(&r, "disk");
}

#[test]
fn a_disk_worker_thread_is_stopped_by_its_filter() {
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("path={},io=threads", disk_image(dir.path()).display());
    let r = run_guest_with_trigger("disk-worker", "virtio-blk", &["--disk", &spec]);
    assert_stopped_by_filter(&r, "disk-worker");
}

#[test]
fn vhost_user_threads_are_stopped_by_their_filters() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let _backend = Backend::skiff_blk(&sock, &disk_image(dir.path()), &[]);
    let device = format!("type=blk,socket={},reconnect=1", sock.display());
    for kind in ["vhost-user-watchdog", "vhost-user-reconnect"] {
        let r = run_guest_with_trigger(kind, "virtio-blk", &["--vhost-user", &device]);
        assert_stopped_by_filter(&r, kind);
    }
}

#[test]
fn the_vhost_user_blk_backend_is_stopped_by_its_filter() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let image = disk_image(dir.path());
    let mut cmd = Command::new(skiff_bin());
    cmd.args(["vhost-user-blk", "--socket"])
        .arg(&sock)
        .arg("--disk")
        .arg(&image)
        .env(TRIGGER, "vhost-user-blk");
    let r = Skiff::spawn_command(&mut cmd).wait(T);
    assert_stopped_by_filter(&r, "vhost-user-blk");
}

#[test]
fn a_snapshot_writer_thread_is_stopped_by_its_filter() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let kernel = guest();
    let mut cmd = Command::new(skiff_bin());
    cmd.args(["run", "--kernel", &kernel, "--cmdline", "counter=600,timer"])
        .arg("--api-socket")
        .arg(&sock)
        .args(["--timeout", "60"])
        .env(TRIGGER, "snapshot-writer");
    let mut vm = Skiff::spawn_command(&mut cmd);
    vm.wait_for_line("testguest: count", T);
    let snap = dir.path().join("snap");
    let (code, _, _) = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert_ne!(code, 0, "the snapshot request cannot succeed");
    let r = vm.wait(T);
    assert_stopped_by_filter(&r, "snapshot-writer");
}

#[test]
fn the_exec_session_thread_is_stopped_by_its_filter() {
    let tmp = tempfile::tempdir().unwrap();
    let kernel = guest();
    require_kvm();
    let mut cmd = Command::new(skiff_bin());
    cmd.env("TMPDIR", tmp.path())
        .env(TRIGGER, "exec-session")
        .args([
            "exec",
            "--kernel",
            &kernel,
            "--cmdline",
            "agent",
            "--",
            "exit=0",
        ]);
    let r = Skiff::spawn_command(&mut cmd).wait(T);
    assert_stopped_by_filter(&r, "exec-session");
}

#[test]
fn the_api_exec_thread_is_stopped_by_its_filter() {
    use std::io::{Read, Write};
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let api = dir.path().join("api.sock");
    let log = dir.path().join("serial.log");
    let mut cmd = Command::new(skiff_bin());
    cmd.env(TRIGGER, "api-exec")
        .args([
            "run",
            "--agent",
            "--kernel",
            &guest(),
            "--cmdline",
            "agent-listen",
        ])
        .arg("--serial")
        .arg(format!("file={}", log.display()))
        .arg("--vsock")
        .arg(format!("cid=3,socket={}", dir.path().join("v").display()))
        .arg("--api-socket")
        .arg(&api);
    let vm = Skiff::spawn_command(&mut cmd);
    let deadline = std::time::Instant::now() + T;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("testguest: agent listening")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let body = r#"{"argv": ["true"]}"#;
    let mut s = std::os::unix::net::UnixStream::connect(&api).unwrap();
    write!(
        s,
        "POST /vm/exec HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // The process ends before any answer.
    let _ = s.read_to_end(&mut Vec::new());
    assert_stopped_by_filter(&vm.wait(T), "api-exec");
}

#[test]
fn skiff_exec_runs_a_command_with_every_filter_on() {
    // The session, the VM's threads and the main thread's end (stopping, removing the run
    // directory) all stay inside their filters: a command's exit code comes back untouched.
    let tmp = tempfile::tempdir().unwrap();
    let kernel = guest();
    require_kvm();
    for mode in ["on", "log"] {
        let mut cmd = Command::new(skiff_bin());
        cmd.env("TMPDIR", tmp.path()).args([
            "exec",
            "--seccomp",
            mode,
            "--kernel",
            &kernel,
            "--cmdline",
            "agent",
            "--",
            "exit=7",
        ]);
        Skiff::spawn_command(&mut cmd).wait(T).assert_code(7);
    }
}

#[test]
fn the_teardown_process_is_stopped_by_its_filter() {
    // skiff itself ends as the guest asked; the detached teardown process reports on the
    // stderr it still holds, before it gives it up.
    let r = run_guest_with_trigger("teardown", "hello", &[]);
    r.assert_code(0)
        .assert_stdout_has("testguest: hello")
        .assert_stderr_has(&violation_line("teardown"));
}

#[test]
fn the_trigger_is_ignored_unless_the_filters_enforce() {
    for mode in ["log", "off"] {
        let r = run_guest_with_trigger("vcpu", "hello", &["--seccomp", mode]);
        r.assert_code(0).assert_stdout_has("testguest: hello");
        assert!(!r.stderr.contains("seccomp"), "{mode}: {}", r.stderr);
    }
}

/// `(name, Seccomp, NoNewPrivs, CapEff)` of every thread of `pid`.
fn thread_status(pid: u32) -> Vec<(String, String, String, String)> {
    let mut threads = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = entry.unwrap().path();
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        threads.push((
            field("Name:"),
            field("Seccomp:"),
            field("NoNewPrivs:"),
            field("CapEff:"),
        ));
    }
    threads
}

fn assert_every_thread_confined(pid: u32, want_threads: &[&str]) {
    let threads = thread_status(pid);
    for name in want_threads {
        assert!(
            threads.iter().any(|t| t.0.starts_with(name)),
            "no {name} thread in {threads:?}"
        );
    }
    for (name, seccomp, nnp, cap_eff) in &threads {
        assert_eq!(seccomp, "2", "{name}: Seccomp");
        assert_eq!(nnp, "1", "{name}: NoNewPrivs");
        assert_eq!(cap_eff, "0000000000000000", "{name}: CapEff");
    }
}

#[test]
fn every_thread_of_a_running_vm_and_its_backend_is_confined() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let blk_sock = dir.path().join("blk.sock");
    let mut backend = Backend::skiff_blk(&blk_sock, &disk_image(dir.path()), &[]);
    let api = dir.path().join("api.sock");
    let kernel = guest();
    let device = format!("type=blk,socket={},reconnect=1", blk_sock.display());
    // An inherited descriptor that skiff must close at start.
    let inherited = std::fs::File::open(&kernel).unwrap();
    let fd = inherited.as_raw_fd();
    // SAFETY: clears FD_CLOEXEC on our own descriptor so the child inherits it.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    let mut vm = Skiff::spawn(&[
        "run",
        "--kernel",
        &kernel,
        "--cmdline",
        "blkloop=100000",
        "--cpus",
        "2",
        "--vhost-user",
        &device,
        "--api-socket",
        api.to_str().unwrap(),
        "--timeout",
        "60",
    ]);
    drop(inherited);
    vm.wait_for_line("testguest: blkloop round=1 ok", T);
    assert_every_thread_confined(
        vm.pid(),
        // (thread names are cut at 15 bytes)
        &["skiff-vcpu", "vhost-user-watc", "vhost-user-reco"],
    );
    assert_every_thread_confined(backend.pid(), &["vring_worker"]);
    let fds: Vec<_> = std::fs::read_dir(format!("/proc/{}/fd", vm.pid()))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let leaked = std::fs::read_link(format!("/proc/{}/fd/{fd}", vm.pid()));
    assert!(
        leaked.map_or(true, |target| target != Path::new(&kernel)),
        "fd {fd} (the kernel file) was inherited: {fds:?}"
    );
    ctl_ok(&api, &["shutdown"]);
    vm.wait(T).assert_code(0);
    backend.kill();
}

#[test]
fn without_seccomp_no_filter_is_installed() {
    require_kvm();
    let kernel = guest();
    let mut vm = Skiff::spawn(&[
        "run",
        "--kernel",
        &kernel,
        "--cmdline",
        "counter=600,timer",
        "--seccomp",
        "off",
        "--timeout",
        "60",
    ]);
    vm.wait_for_line("testguest: count", T);
    for (name, seccomp, nnp, _) in thread_status(vm.pid()) {
        assert_eq!(seccomp, "0", "{name}");
        assert_eq!(
            nnp, "1",
            "{name}: no_new_privs does not depend on --seccomp"
        );
    }
}

/// The kernel's Landlock ABI version, or None without Landlock.
fn landlock_abi() -> Option<i64> {
    // SAFETY: LANDLOCK_CREATE_RULESET_VERSION with a null attribute only returns the version.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    (v > 0).then_some(v)
}

#[test]
fn a_sandboxed_vm_snapshots_only_into_allowed_directories() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("allowed");
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&allowed).unwrap();
    std::fs::create_dir(&elsewhere).unwrap();
    let api = dir.path().join("api.sock");
    let kernel = guest();
    let args = [
        "run",
        "--kernel",
        &kernel,
        "--cmdline",
        "counter=600,timer",
        "--api-socket",
        api.to_str().unwrap(),
        "--timeout",
        "60",
        "--sandbox",
        "--sandbox-allow",
        allowed.to_str().unwrap(),
    ];
    let Some(abi) = landlock_abi() else {
        // No Landlock on this kernel: --sandbox refuses to start, in one line.
        let r = skiff_tests::run_skiff(&args, T);
        r.assert_code(1)
            .assert_stderr_has("skiff: --sandbox needs Landlock, which this kernel does not offer");
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        return;
    };
    eprintln!("Landlock ABI {abi}: testing the real confinement");
    let mut vm = Skiff::spawn(&args);
    vm.wait_for_line("testguest: count", T);
    // Outside the allowed directories: refused, the VM runs on.
    let outside = elsewhere.join("snap");
    let (code, _, err) = ctl(&api, &["snapshot", outside.to_str().unwrap()]);
    assert_ne!(code, 0, "a snapshot outside the sandbox succeeded");
    assert!(err.contains("ermission denied"), "{err}");
    assert!(!outside.exists());
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    // Inside: written.
    let inside = allowed.join("snap");
    ctl_ok(&api, &["snapshot", inside.to_str().unwrap()]);
    assert!(inside.join("manifest.json").is_file());
    ctl_ok(&api, &["shutdown"]);
    vm.wait(T).assert_code(0);
    // The API socket's directory was writable for its removal, nothing more.
    assert!(!api.exists());
}

#[test]
fn sandbox_allow_needs_sandbox() {
    let kernel = guest();
    let r = skiff_tests::run_skiff(&["run", "--kernel", &kernel, "--sandbox-allow", "/tmp"], T);
    r.assert_code(2).assert_stderr_has("--sandbox");
}
