//! `POST /vm/exec` end to end: a VM with a vsock device whose test guest runs the `agent-listen`
//! scenario, driven over the control socket with plain HTTP. A command's exit code, signal,
//! output (capped, with `stdout_truncated`) and timeout come back as JSON; a command that
//! hangs blocks neither `GET /vm` nor pause and resume; bad bodies, a paused VM, a VM without
//! vsock and a VM without an agent each get their status and one line; a restored VM runs
//! commands through the vsock socket its restore gave it. The agent VMs come from the runner's
//! library (`TestVm`).

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use skiff_tests::{require_kvm, skiff_bin, testguest, Skiff};
use vmm::test_runner::suite::{AgentKind, VmSpec};
use vmm::test_runner::test_vm::TestVm;

const LIMIT: Duration = Duration::from_secs(60);

/// One request on a fresh connection: the status and the JSON body.
fn http(socket: &Path, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    // A refused body may be cut short by the server's answer: read that answer anyway.
    let _ = write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, json) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {answer:?}"));
    let status = head[9..12].parse().unwrap();
    let value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json:?}"));
    (status, value)
}

fn exec(socket: &Path, body: &str) -> (u16, Value) {
    http(socket, "POST", "/vm/exec", body)
}

/// The `error` line of an answer.
fn error(v: &Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {v}"))
}

/// An agent VM (the test guest's `agent-listen`) booted through the runner's library, its own
/// agent connection closed so the API's can reach the agent (which serves one at a time).
fn agent_vm(dir: &Path) -> TestVm {
    require_kvm();
    let spec = VmSpec::new("api", testguest(), AgentKind::Testguest);
    let mut vm = TestVm::boot(skiff_bin(), &spec, dir).unwrap();
    vm.disconnect();
    vm
}

/// A VM without an agent: `run --kernel TESTGUEST --cmdline spin --api-socket S` (and a vsock
/// device with `vsock`), once its API socket answers.
fn plain_vm(dir: &Path, vsock: bool) -> Skiff {
    require_kvm();
    let mut cmd = Command::new(skiff_bin());
    cmd.args(["run", "--cmdline", "spin", "--kernel"])
        .arg(testguest())
        .arg("--api-socket")
        .arg(dir.join("api.sock"));
    if vsock {
        cmd.arg("--vsock")
            .arg(format!("cid=3,socket={}", dir.join("v").display()));
    }
    let vm = Skiff::spawn_command(&mut cmd);
    let deadline = Instant::now() + LIMIT;
    while UnixStream::connect(dir.join("api.sock")).is_err() {
        assert!(Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    vm
}

/// Waits until the VM's console shows `line`.
fn wait_serial(vm: &TestVm, line: &str) {
    let deadline = Instant::now() + LIMIT;
    while !vm.serial().contains(line) {
        assert!(Instant::now() < deadline, "no {line:?} in {}", vm.serial());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn commands_run_with_their_codes_and_output() {
    let dir = tempfile::tempdir().unwrap();
    let vm = agent_vm(dir.path());
    let s = vm.api_socket().to_path_buf();
    let (status, v) = exec(&s, r#"{"argv": ["echo", "hello", "api"]}"#);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["signal"], Value::Null);
    assert_eq!(v["timed_out"], false);
    assert_eq!(v["stdout"], "hello api\n");
    assert_eq!(v["stderr"], "");
    assert_eq!(v["stdout_truncated"], false);
    assert!(v["duration_ms"].as_f64().unwrap() > 0.0, "{v}");

    assert_eq!(exec(&s, r#"{"argv": ["exit=42"]}"#).1["exit_code"], 42);
    let (_, v) = exec(&s, r#"{"argv": ["signal=9"]}"#);
    assert_eq!(
        (v["exit_code"].clone(), v["signal"].clone()),
        (Value::Null, 9.into())
    );
    let (_, v) = exec(
        &s,
        r#"{"argv": ["warn", "to", "stderr"], "env": ["A=1"], "stdin": "x"}"#,
    );
    assert_eq!(
        (v["stdout"].as_str(), v["stderr"].as_str()),
        (Some(""), Some("to stderr\n"))
    );
    // A command that does not exist: 127, as a shell gives.
    let (status, v) = exec(&s, r#"{"argv": ["no-such-command"]}"#);
    assert_eq!((status, v["exit_code"].clone()), (200, 127.into()), "{v}");
    assert!(v["stderr"]
        .as_str()
        .unwrap()
        .contains("no-such-command: command not found"));

    // Output past the 1 MiB cap is cut and flagged; base64 carries the exact bytes.
    let (_, v) = exec(&s, r#"{"argv": ["flood=1100000"]}"#);
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["stdout"].as_str().unwrap().len(), 1 << 20);
    assert_eq!(v["stdout_truncated"], true);
    let (_, v) = exec(&s, r#"{"argv": ["flood=70"], "output": "base64"}"#);
    assert_eq!(v["output"], "base64");
    // 63 letters, a newline, 6 more letters: base64 of "abc...".
    assert!(v["stdout"].as_str().unwrap().starts_with("YWJjZGVm"), "{v}");

    // Garbage from the guest: 502 with the protocol error (last: the agent is wedged after).
    let (status, v) = exec(&s, r#"{"argv": ["garbage"]}"#);
    assert_eq!(status, 502, "{v}");
    assert!(error(&v).contains("broke the agent protocol"), "{v}");
}

#[test]
fn a_hung_command_blocks_neither_status_nor_pause_and_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let vm = agent_vm(dir.path());
    let s = vm.api_socket().to_path_buf();
    let start = Instant::now();
    let spin = {
        let s = s.clone();
        std::thread::spawn(move || exec(&s, r#"{"argv": ["spin"], "timeout_secs": 3}"#))
    };
    wait_serial(&vm, "testguest: agent exec spin");
    // The control plane answers at once while the command runs.
    let asked = Instant::now();
    let (status, v) = http(&s, "GET", "/vm", "");
    assert_eq!((status, v["state"].as_str()), (200, Some("running")), "{v}");
    let (status, v) = http(&s, "PUT", "/vm/pause", "");
    assert_eq!(status, 200, "{v}");
    // A paused VM runs no new command.
    let (status, v) = exec(&s, r#"{"argv": ["true"]}"#);
    assert_eq!(status, 409, "{v}");
    assert!(error(&v).contains("the VM is paused"), "{v}");
    assert_eq!(http(&s, "PUT", "/vm/resume", "").0, 200);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "the control plane waited {:?}",
        asked.elapsed()
    );
    assert!(!spin.is_finished(), "the spin ended before its timeout");
    let (status, v) = spin.join().unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["timed_out"], true);
    assert_eq!(v["exit_code"], Value::Null);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(20),
        "{took:?}"
    );
    // The agent serves the next command.
    assert_eq!(exec(&s, r#"{"argv": ["exit=7"]}"#).1["exit_code"], 7);
}

#[test]
fn bad_bodies_and_vms_without_an_agent_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let vm = agent_vm(dir.path());
    let s = vm.api_socket().to_path_buf();
    for (body, want) in [
        ("{", "exec body must be"),
        (r#"{"argv": []}"#, "argv must name a program"),
        (
            r#"{"argv": ["true"], "user": "root"}"#,
            "unknown field `user`",
        ),
        (
            r#"{"argv": ["true"], "timeout_secs": -1}"#,
            "timeout_secs -1",
        ),
    ] {
        let (status, v) = exec(&s, body);
        assert_eq!(status, 400, "{body}: {v}");
        assert!(error(&v).contains(want), "{body}: {v}");
    }
    assert_eq!(http(&s, "GET", "/vm/exec", "").0, 405);
    let big = format!(r#"{{"argv": ["true"], "stdin": "{}"}}"#, "x".repeat(70_000));
    assert_eq!(exec(&s, &big).0, 413);
    // Still serving after all that.
    assert_eq!(exec(&s, r#"{"argv": ["true"]}"#).1["exit_code"], 0);

    // No vsock device: nothing to reach an agent with.
    let plain_dir = tempfile::tempdir().unwrap();
    let _plain = plain_vm(plain_dir.path(), false);
    let (status, v) = exec(&plain_dir.path().join("api.sock"), r#"{"argv": ["true"]}"#);
    assert_eq!(status, 409, "{v}");
    assert!(error(&v).contains("no vsock device"), "{v}");
    // A vsock device but no agent listening behind it.
    let silent_dir = tempfile::tempdir().unwrap();
    let _silent = plain_vm(silent_dir.path(), true);
    let silent = silent_dir.path().join("api.sock");
    let (status, v) = exec(&silent, r#"{"argv": ["true"]}"#);
    assert_eq!(status, 503, "{v}");
    assert!(
        error(&v).contains("no agent listens on vsock port 1024"),
        "{v}"
    );
    // Its control plane still answers.
    assert_eq!(http(&silent, "GET", "/vm", "").0, 200);
}

#[test]
fn an_agent_that_dies_mid_command_ends_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = agent_vm(dir.path());
    let (status, v) = exec(vm.api_socket(), r#"{"argv": ["die"]}"#);
    assert!(status == 502 || status == 503, "{status} {v}");
    let e = error(&v);
    assert!(
        e.contains("the agent was lost") || e.contains("the VM ended while the command ran"),
        "{v}"
    );
    // The guest's own end (debug exit 7) is skiff's exit code.
    let deadline = Instant::now() + LIMIT;
    while vm.ended().is_none() {
        assert!(Instant::now() < deadline, "the VM outlived its agent");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(vm.ended(), Some(7));
}

#[test]
fn a_restored_vm_runs_commands_through_its_new_vsock_socket() {
    // `skiff restore --vsock id=vsock0,socket=NEW` (what `TestVm::fork` runs): the API reaches
    // the agent behind the socket the restore gave the device, not the snapshot's.
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base");
    let fork = root.path().join("fork");
    std::fs::create_dir(&base).unwrap();
    std::fs::create_dir(&fork).unwrap();
    let mut vm = agent_vm(&base);
    assert_eq!(vm.exec(&["put", "/f", "kept"]).unwrap().code(), Some(0));
    let snap = root.path().join("snap");
    vm.snapshot(&snap).unwrap();
    let mut restored = TestVm::fork(skiff_bin(), &snap, &fork).unwrap();
    restored.disconnect();
    let (status, v) = exec(restored.api_socket(), r#"{"argv": ["cat", "/f"]}"#);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["stdout"], "kept\n");
}
