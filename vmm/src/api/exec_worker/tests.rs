//! The worker against a fake agent behind a fake vsock socket (the `CONNECT` handshake, then
//! the protocol), with a socket pair standing in for the HTTP client: what reaches the agent,
//! the answer's status and body, and what happens when the client goes away.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use agent_protocol::{read_frame, write_message, ErrorCode, ExitStatus, Message};
use devices::vm_exit::{GuestEnd, VmExitSignal};

use super::*;
use crate::api::exec::{parse, MAX_CAPTURE_BYTES};

/// What the fake agent does with the `Exec` it gets.
#[derive(Clone, Copy)]
enum Agent {
    /// Echoes stdin, writes `n` bytes of `x` to stderr, exits 3.
    EchoStdin { stderr_bytes: usize },
    /// Never answers the `Exec` (reports on `seen_eof` when its connection closes).
    Hang,
    /// Answers `Exec` with a spawn error.
    CannotSpawn,
    /// Answers `CONNECT` with garbage.
    BadHandshake,
}

/// Serves one connection on `dir/v` as the vsock device and agent would; returns the `Exec`'s
/// argv and whether the connection reached EOF afterwards (through the join handle).
fn fake_agent(dir: &Path, agent: Agent) -> std::thread::JoinHandle<(Vec<String>, bool)> {
    let listener = UnixListener::bind(dir.join("v")).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut w = stream;
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, "CONNECT 1024\n");
        if let Agent::BadHandshake = agent {
            w.write_all(b"NOPE\n").unwrap();
            return (Vec::new(), true);
        }
        w.write_all(b"OK 1024\n").unwrap();
        let mut payload = Vec::new();
        let mut argv = Vec::new();
        loop {
            let Some(h) = read_frame(&mut reader, &mut payload).unwrap() else {
                return (argv, true);
            };
            match Message::decode(h.kind, &payload).unwrap() {
                Message::Hello { .. } => write_message(
                    &mut w,
                    &Message::HelloReply {
                        version: 1,
                        features: 0,
                        agent: b"fake",
                    },
                    0,
                )
                .unwrap(),
                Message::Exec {
                    argv: a,
                    stdin,
                    timeout_ms,
                    ..
                } => {
                    argv = a
                        .iter()
                        .map(|x| String::from_utf8_lossy(x).into_owned())
                        .collect();
                    argv.push(format!("timeout_ms={timeout_ms}"));
                    let r = h.request;
                    match agent {
                        Agent::EchoStdin { stderr_bytes } => {
                            write_message(&mut w, &Message::Started { pid: 9 }, r).unwrap();
                            write_message(&mut w, &Message::Stdout(stdin), r).unwrap();
                            let chunk = vec![b'x'; 60_000];
                            let mut left = stderr_bytes;
                            while left > 0 {
                                let n = left.min(chunk.len());
                                write_message(&mut w, &Message::Stderr(&chunk[..n]), r).unwrap();
                                left -= n;
                            }
                            write_message(&mut w, &Message::Exit(ExitStatus::Code(3)), r).unwrap();
                        }
                        Agent::CannotSpawn => write_message(
                            &mut w,
                            &Message::Error {
                                code: ErrorCode::Spawn,
                                message: b"cwd /nope: no such directory",
                            },
                            r,
                        )
                        .unwrap(),
                        Agent::Hang | Agent::BadHandshake => {}
                    }
                }
                other => panic!("unexpected {:?}", other.kind()),
            }
        }
    })
}

/// Runs `body` through `admit` and `spawn`; returns the HTTP client's end of the connection.
fn start(workers: &ExecWorkers, body: &str) -> UnixStream {
    let (client, server) = UnixStream::pair().unwrap();
    let slot = workers.admit(false).unwrap();
    workers.spawn(slot, server, parse(body.as_bytes()).unwrap());
    client
}

/// Reads the whole answer: status and JSON body.
fn answer(mut client: UnixStream) -> (u16, serde_json::Value) {
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut text = Vec::new();
    client.read_to_end(&mut text).unwrap();
    let text = String::from_utf8(text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    (status, serde_json::from_str(body).unwrap())
}

fn workers(dir: &Path) -> (ExecWorkers, VmExitSignal) {
    let exit = VmExitSignal::new().unwrap();
    (ExecWorkers::new(Some(dir.join("v")), exit.clone()), exit)
}

#[test]
fn a_command_runs_with_its_stdin_and_its_output_is_capped() {
    let dir = tempfile::tempdir().unwrap();
    let agent = fake_agent(
        dir.path(),
        Agent::EchoStdin {
            stderr_bytes: MAX_CAPTURE_BYTES + 5,
        },
    );
    let (workers, _exit) = workers(dir.path());
    let client = start(
        &workers,
        r#"{"argv": ["cat", "-"], "stdin_base64": "AAFoaQ==", "timeout_secs": 2, "output": "base64"}"#,
    );
    let (status, v) = answer(client);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["exit_code"], 3);
    assert_eq!(v["stdout"], "AAFoaQ==");
    assert_eq!(v["stdout_truncated"], false);
    assert_eq!(v["stderr_truncated"], true);
    let stderr = v["stderr"].as_str().unwrap();
    assert_eq!(stderr.len(), MAX_CAPTURE_BYTES.div_ceil(3) * 4);
    let (argv, _) = agent.join().unwrap();
    assert_eq!(argv, ["cat", "-", "timeout_ms=2000"]);
    assert_eq!(workers.wait_idle(Duration::from_secs(5)), 0);
}

#[test]
fn agent_failures_have_their_own_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let (workers, _exit) = workers(dir.path());
    // Nothing behind the socket.
    let (status, v) = answer(start(&workers, r#"{"argv": ["true"]}"#));
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("cannot reach the agent"),
        "{v}"
    );

    let agent = fake_agent(dir.path(), Agent::BadHandshake);
    let (status, v) = answer(start(&workers, r#"{"argv": ["true"]}"#));
    assert_eq!(status, 502, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("answered CONNECT with \"NOPE\""),
        "{v}"
    );
    agent.join().unwrap();
    std::fs::remove_file(dir.path().join("v")).unwrap();

    let agent = fake_agent(dir.path(), Agent::CannotSpawn);
    let (status, v) = answer(start(&workers, r#"{"argv": ["true"], "cwd": "/nope"}"#));
    assert_eq!(status, 422, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("cwd /nope: no such directory"),
        "{v}"
    );
    agent.join().unwrap();
}

#[test]
fn a_client_that_goes_away_closes_the_agent_connection() {
    let dir = tempfile::tempdir().unwrap();
    let agent = fake_agent(dir.path(), Agent::Hang);
    let (workers, _exit) = workers(dir.path());
    let client = start(&workers, r#"{"argv": ["spin"]}"#);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        workers.wait_idle(Duration::ZERO),
        1,
        "the worker ended early"
    );
    drop(client);
    let start = Instant::now();
    let (argv, eof) = agent.join().unwrap();
    assert_eq!(argv, ["spin", "timeout_ms=0"]);
    assert!(eof);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(workers.wait_idle(Duration::from_secs(2)), 0);
}

#[test]
fn the_vm_ending_answers_503_and_admission_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let agent = fake_agent(dir.path(), Agent::Hang);
    let (workers, exit) = workers(dir.path());
    let client = start(&workers, r#"{"argv": ["spin"]}"#);
    // Seven more places, then none.
    let held: Vec<Slot> = (1..MAX_RUNNING_EXECS)
        .map(|_| workers.admit(false).unwrap())
        .collect();
    let (status, msg) = workers.admit(false).unwrap_err();
    assert_eq!(status, 503);
    assert!(msg.contains("8 commands are already running"), "{msg}");
    drop(held);
    assert_eq!(workers.admit(true).unwrap_err().0, 409, "paused");
    let none = ExecWorkers::new(None, exit.clone());
    let (status, msg) = none.admit(false).unwrap_err();
    assert!(status == 409 && msg.contains("no vsock device"), "{msg}");

    exit.request(GuestEnd::Stopped);
    let (status, v) = answer(client);
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"], "the VM ended while the command ran");
    assert_eq!(workers.wait_idle(Duration::from_secs(2)), 0);
    agent.join().unwrap();
}
