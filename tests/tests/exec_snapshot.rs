//! `skiff exec --snapshot DIR` end to end with the test guest: a snapshot of the `agent-listen`
//! scenario (the agent waits on vsock port 1024) runs command after command, each in a fresh
//! copy-on-write restore that the snapshot never sees, and reaches the agent on the first
//! `CONNECT` (no retries: a restored guest hears the transport reset before the connection).
//! Snapshots that cannot run a command get exit code 207 and one line saying why.

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use skiff_tests::{require_kvm, run_skiff, skiff_bin, testguest, Finished, Skiff};
use vmm::test_runner::suite::{AgentKind, VmSpec};
use vmm::test_runner::test_vm::TestVm;

const LIMIT: Duration = Duration::from_secs(60);

/// Boots the test guest with `cmdline` (and `extra` options), waits for `ready` on its console
/// (or, without one, for the API socket) and stops it into a snapshot at `dir/snap`.
fn snapshot_of(dir: &Path, cmdline: &str, extra: &[&str], ready: Option<&str>) -> PathBuf {
    let api = dir.join("api.sock");
    let log = dir.join("serial.log");
    let snap = dir.join("snap");
    let mut cmd = Command::new(skiff_bin());
    cmd.args(["run", "--kernel"])
        .arg(testguest())
        .args(["--cmdline", cmdline, "--api-socket"])
        .arg(&api)
        .arg("--serial")
        .arg(format!("file={}", log.display()))
        .args(extra);
    let vm = Skiff::spawn_command(&mut cmd);
    let deadline = Instant::now() + LIMIT;
    loop {
        let up = match ready {
            Some(line) => std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(line),
            None => api.exists(),
        };
        if up {
            break;
        }
        assert!(Instant::now() < deadline, "the guest never got ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    let api_arg = api.to_string_lossy().into_owned();
    let snap_arg = snap.to_string_lossy().into_owned();
    run_skiff(
        &[
            "ctl",
            "--api-socket",
            &api_arg,
            "snapshot",
            &snap_arg,
            "--stop",
        ],
        LIMIT,
    )
    .assert_code(0);
    vm.wait(LIMIT).assert_code(0);
    snap
}

/// `skiff exec --snapshot SNAP -- CMD` with a TMPDIR of its own, which must be empty after.
fn exec_in(snap: &Path, cmd: &[&str]) -> Finished {
    let tmp = tempfile::Builder::new()
        .prefix("sxs")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let mut c = Command::new(skiff_bin());
    c.env("TMPDIR", tmp.path())
        .arg("exec")
        .arg("--snapshot")
        .arg(snap)
        .arg("--")
        .args(cmd);
    let done = Skiff::spawn_command(&mut c).wait(LIMIT);
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("read TMPDIR")
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(left.is_empty(), "skiff exec --snapshot left {left:?}");
    done
}

/// Every file of `dir` with its contents.
fn contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .expect("snapshot dir")
        .map(|e| {
            let p = e.expect("entry").path();
            let data = std::fs::read(&p).expect("read");
            (p, data)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn commands_run_in_fresh_restores_of_an_agent_snapshot() {
    require_kvm();
    let dir = tempfile::tempdir().expect("dir");
    let vsock = format!("cid=3,socket={}", dir.path().join("v").display());
    let snap = snapshot_of(
        dir.path(),
        "agent-listen",
        &["--vsock", &vsock],
        Some("testguest: agent listening"),
    );
    let before = contents(&snap);
    let r = exec_in(&snap, &["echo", "from", "the", "snapshot"]);
    r.assert_code(0);
    assert_eq!(r.stdout, "from the snapshot\n");
    exec_in(&snap, &["exit=5"]).assert_code(5);
    exec_in(&snap, &["signal=9"]).assert_code(137);
    exec_in(&snap, &["no-such-program"])
        .assert_code(127)
        .assert_stderr_has("no-such-program: command not found");
    exec_in(&snap, &["warn", "to", "stderr"])
        .assert_code(0)
        .assert_stderr_has("to stderr");
    assert!(
        contents(&snap) == before,
        "a run changed the snapshot's files"
    );
}

#[test]
fn snapshots_that_cannot_run_a_command_get_207() {
    require_kvm();
    let dir = tempfile::tempdir().expect("dir");
    // Not a snapshot at all.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    exec_in(&empty, &["exit=0"])
        .assert_code(207)
        .assert_stderr_has("not a snapshot skiff can restore");
    // A VM without vsock.
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).expect("mkdir");
    let snap = snapshot_of(&plain, "spin", &[], None);
    exec_in(&snap, &["exit=0"])
        .assert_code(207)
        .assert_stderr_has("no vsock device");
    // vsock, but the guest never drove it (no agent).
    let idle = dir.path().join("idle");
    std::fs::create_dir(&idle).expect("mkdir");
    let vsock = format!("cid=3,socket={}", idle.join("v").display());
    let snap = snapshot_of(&idle, "spin", &["--vsock", &vsock], None);
    let started = Instant::now();
    exec_in(&snap, &["exit=0"])
        .assert_code(207)
        .assert_stderr_has("had not started its vsock driver");
    assert!(started.elapsed() < Duration::from_secs(5), "it waited");
    // --snapshot replaces the boot options.
    let snap_arg = snap.to_string_lossy().into_owned();
    let kernel = testguest().to_string_lossy().into_owned();
    run_skiff(
        &[
            "exec",
            "--snapshot",
            &snap_arg,
            "--kernel",
            &kernel,
            "--",
            "exit=0",
        ],
        LIMIT,
    )
    .assert_code(2);
}

#[test]
fn a_snapshot_taken_with_a_host_connection_open_answers_the_first_connect() {
    // The restored device numbers host ports from the start again, so the first connection
    // after the restore carries the same ports as the one the guest held (and now sees reset).
    // The guest must take it as a new connection: `skiff exec --snapshot` connects once and
    // waits 10 s for `OK`, so an ignored request would end in 207, not the command's code.
    // The runner's library keeps its agent connection open through `snapshot`.
    require_kvm();
    let dir = tempfile::tempdir().expect("dir");
    let spec = VmSpec::new("held", testguest(), AgentKind::Testguest);
    let vm = TestVm::boot(skiff_bin(), &spec, dir.path()).expect("boot");
    let snap = dir.path().join("snap");
    vm.snapshot(&snap).expect("snapshot");
    exec_in(&snap, &["exit=3"]).assert_code(3);
}
