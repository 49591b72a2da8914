//! Snapshots of VMs with virtio-net and virtio-console, end to end: the test guest's `io-loop`
//! scenario opens both once and then, round after round on the same queues, sends a ping frame
//! through a tap (a responder in the test's network namespace answers each with a pong carrying
//! the round) and writes a console line that the test answers with one keystroke on the
//! terminal skiff reads. The guest is snapshotted mid-run and stopped, and the restored guest,
//! in a new process with the tap opened again, goes on exchanging frames and console bytes
//! without re-initialising anything.

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};

use skiff_tests::{open_pty, require_kvm, skiff_bin, NetNs, Skiff};

mod snapshot_support;
use snapshot_support::*;

const ROUNDS: u64 = 8;
const TAP: &str = "sk1";

/// Answers every ping frame (ethertype 0x88b5, payload "skiff-testguest-ping" + two round
/// bytes) with a pong to the sender's MAC carrying the same round; prints the round answered.
const RESPONDER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
s.bind((sys.argv[1], 0))
s.settimeout(120)
print("ready", flush=True)
ping = b"skiff-testguest-ping"
while True:
    f = s.recv(4096)
    if f[12:14] == b"\x88\xb5" and f[14:].startswith(ping):
        r = f[14 + len(ping):16 + len(ping)]
        s.send(f[6:12] + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + (b"skiff-host-pong" + r).ljust(46, b"\0"))
        print("answered", int.from_bytes(r, "big"), flush=True)
"#;

struct Responder {
    child: Child,
    answered: Receiver<u64>,
}

impl Responder {
    fn start(ns: &NetNs) -> Self {
        let mut child = ns
            .command("python3")
            .args(["-c", RESPONDER, TAP])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "ready");
        let (tx, answered) = channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Some(r) = line.strip_prefix("answered ") {
                    let _ = tx.send(r.parse().unwrap());
                }
            }
        });
        Self { child, answered }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// skiff inside the namespace (so it can open the tap) with `stdin` as its terminal.
fn skiff_in(ns: &NetNs, args: &[&str], stdin: &OwnedFd) -> Skiff {
    let mut cmd: Command = ns.command(&skiff_bin().to_string_lossy());
    cmd.args(args)
        .stdin(Stdio::from(stdin.try_clone().unwrap()));
    Skiff::spawn_command_with_stdin(&mut cmd)
}

/// Answers the console rounds `from..=to` as the guest asks for them: for each, waits for its
/// console line (unless it is already in `seen`) and types the round's digit.
fn type_rounds(vm: &mut Skiff, keyboard: &mut std::fs::File, from: u64, to: u64, seen: &str) {
    for round in from..=to {
        let line = format!("testguest: io-loop console round={round}");
        if !seen.lines().any(|l| l == line) {
            vm.wait_for_line(&line, T);
        }
        keyboard.write_all(&[b'0' + (round % 10) as u8]).unwrap();
    }
}

fn rounds_ok(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("testguest: io-loop round="))
        .filter_map(|rest| rest.strip_suffix(" ok")?.parse().ok())
        .collect()
}

#[test]
fn net_and_console_continue_their_queues_after_restore() {
    snapshot_and_restore(&[]);
}

#[test]
fn net_and_console_continue_after_a_live_snapshot() {
    snapshot_and_restore(&["--live"]);
}

/// Runs the loop through round 3, snapshots it with `snapshot_args` plus `--stop`, restores it
/// in a new process and checks that the rounds continue there.
fn snapshot_and_restore(snapshot_args: &[&str]) {
    require_kvm();
    let root = tempfile::tempdir().unwrap();
    let ns = NetNs::new(TAP);
    let responder = Responder::start(&ns);
    let (master, slave) = open_pty();
    let mut keyboard = std::fs::File::from(master);
    let sock = root.path().join("api.sock");
    let kernel = guest();
    let cmdline = format!("io-loop={ROUNDS}");
    let mut vm = skiff_in(
        &ns,
        &[
            "run",
            "--kernel",
            &kernel,
            "--cmdline",
            &cmdline,
            "--net",
            &format!("tap={TAP},mac=52:54:00:12:34:56"),
            "--console",
            "--api-socket",
            sock.to_str().unwrap(),
        ],
        &slave,
    );
    type_rounds(&mut vm, &mut keyboard, 1, 3, "");
    vm.wait_for_line("testguest: io-loop round=3 ok", T);
    let snap = root.path().join("snap");
    let mut args = vec!["snapshot", snap.to_str().unwrap(), "--stop"];
    args.extend_from_slice(snapshot_args);
    let summary = ctl_ok(&sock, &args);
    assert_eq!(summary["stopped"], true, "{summary}");
    let before = vm.wait(T);
    before.assert_code(0);
    assert_eq!(
        rounds_ok(&before.stdout),
        vec![1, 2, 3],
        "{}",
        before.stdout
    );

    let mut after = skiff_in(&ns, &["restore", snap.to_str().unwrap()], &slave);
    type_rounds(&mut after, &mut keyboard, 4, ROUNDS, &before.stdout);
    let after = after.wait(T);
    after.assert_code(0);
    assert!(
        !after.stdout.contains("io-loop start"),
        "the restored guest started over:\n{}",
        after.stdout
    );
    assert_eq!(
        rounds_ok(&after.stdout),
        (4..=ROUNDS).collect::<Vec<_>>(),
        "rounds do not continue\n--- before ---\n{}\n--- after ---\n{}\n--- stderr ---\n{}",
        before.stdout,
        after.stdout,
        after.stderr
    );
    after.assert_stdout_has(&format!("testguest: io-loop done rounds={ROUNDS}"));
    // The console lines the restored guest wrote came through its transmit queue.
    for round in 5..=ROUNDS {
        after.assert_stdout_has(&format!("testguest: io-loop console round={round}\n"));
    }
    // Every round's ping crossed the tap and was answered, before and after the restore.
    let mut answered = Vec::new();
    while (1..=ROUNDS).any(|r| !answered.contains(&r)) {
        match responder.answered.recv_timeout(T) {
            Ok(round) => answered.push(round),
            Err(e) => panic!("responder ({e}); answered so far: {answered:?}"),
        }
    }
}
