//! The agent as a host process, driven over a Unix socket with the real protocol: exit codes
//! and signals, timeouts, streaming with bounded memory, stdin, concurrency, malformed input,
//! files, quiesce and resume.
#![cfg(target_os = "linux")]

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use agent_protocol::{
    read_frame, write_message, ByteList, ErrorCode, ExecFlags, ExitStatus, Kind, Message,
    WriteFlags,
};

/// A running agent and the host end of its connection.
struct Agent {
    stream: UnixStream,
    child: Child,
    _dir: tempfile::TempDir,
}

/// One received frame, payload owned.
#[derive(Debug)]
struct Frame {
    kind: Kind,
    request: u32,
    payload: Vec<u8>,
}

impl Frame {
    fn message(&self) -> Message<'_> {
        Message::decode(self.kind, &self.payload).expect("the agent sends valid frames")
    }
}

/// Everything one exec produced.
#[derive(Debug, Default)]
struct Output {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    pid: Option<u32>,
    exit: Option<ExitStatus>,
    error: Option<(ErrorCode, String)>,
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let child = Command::new(env!("CARGO_BIN_EXE_skiff-agent"))
            .arg("--connect")
            .arg(format!("unix:{}", path.display()))
            .arg("--no-set-clock")
            .spawn()
            .expect("start the agent");
        let (stream, _) = listener.accept().expect("the agent connects");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        Agent {
            stream,
            child,
            _dir: dir,
        }
    }

    fn send(&mut self, req: u32, msg: &Message<'_>) {
        write_message(&mut self.stream, msg, req).expect("send");
    }

    fn recv(&mut self) -> Option<Frame> {
        let mut payload = Vec::new();
        let header = read_frame(&mut self.stream, &mut payload).expect("read a frame")?;
        Some(Frame {
            kind: header.kind,
            request: header.request,
            payload,
        })
    }

    fn exec(&mut self, req: u32, argv: &[&str], flags: u32, timeout_ms: u64, stdin: &[u8]) {
        let argv: Vec<&[u8]> = argv.iter().map(|a| a.as_bytes()).collect();
        self.send(
            req,
            &Message::Exec {
                flags: ExecFlags(flags),
                timeout_ms,
                cwd: b"",
                argv: ByteList::Items(&argv),
                env: ByteList::Items(&[b"SKIFF_TEST=1"]),
                stdin,
            },
        );
    }

    /// Collects frames until every request in `reqs` has ended (Exit or Error).
    fn collect(&mut self, reqs: &[u32]) -> HashMap<u32, Output> {
        let mut out: HashMap<u32, Output> = reqs.iter().map(|r| (*r, Output::default())).collect();
        let mut open = reqs.len();
        while open > 0 {
            let frame = self.recv().expect("the agent closed the connection early");
            let o = out
                .get_mut(&frame.request)
                .expect("a frame for a request we made");
            match frame.message() {
                Message::Stdout(d) => o.stdout.extend_from_slice(d),
                Message::Stderr(d) => o.stderr.extend_from_slice(d),
                Message::Started { pid } => o.pid = Some(pid),
                Message::Exit(s) => {
                    o.exit = Some(s);
                    open -= 1;
                }
                Message::Error { code, message } => {
                    o.error = Some((code, String::from_utf8_lossy(message).into_owned()));
                    open -= 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        out
    }

    fn run(&mut self, argv: &[&str]) -> Output {
        self.exec(1, argv, 0, 0, b"");
        self.collect(&[1]).remove(&1).expect("output")
    }

    /// Whether the agent has closed the connection (cleanly, or with a reset because it left
    /// our garbage unread).
    fn closed(&mut self) -> bool {
        let mut payload = Vec::new();
        match read_frame(&mut self.stream, &mut payload) {
            Ok(None) => true,
            Err(agent_protocol::ReadFrameError::Io(e)) => {
                e.kind() == std::io::ErrorKind::ConnectionReset
            }
            _ => false,
        }
    }

    /// Waits for the agent process to end, failing after `limit`.
    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(start.elapsed() < limit, "the agent did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn hello_names_the_agent() {
    let mut a = Agent::start();
    a.send(
        9,
        &Message::Hello {
            version: 1,
            features: 0,
        },
    );
    let f = a.recv().expect("reply");
    assert_eq!(f.request, 9);
    let Message::HelloReply { version, agent, .. } = f.message() else {
        panic!("not a HelloReply: {f:?}");
    };
    assert_eq!(version, 1);
    assert!(agent.starts_with(b"skiff-agent "));
}

#[test]
fn exit_codes_signals_and_missing_programs() {
    let mut a = Agent::start();
    let o = a.run(&["sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(o.exit, Some(ExitStatus::Code(3)));
    assert_eq!(o.stdout, b"out\n");
    assert_eq!(o.stderr, b"err\n");
    assert!(o.pid.is_some());

    let o = a.run(&["sh", "-c", "kill -TERM $$"]);
    assert_eq!(o.exit, Some(ExitStatus::Signal(libc::SIGTERM)));

    let o = a.run(&["/bin/true"]);
    assert_eq!(o.exit, Some(ExitStatus::Code(0)));

    let o = a.run(&["no-such-program-skiff"]);
    assert_eq!(o.exit, Some(ExitStatus::Code(127)));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no-such-program-skiff: command not found"));
    assert!(o.pid.is_none());

    // Exists but is not executable: 126, as a shell gives.
    let o = a.run(&["/etc/hostname"]);
    assert_eq!(o.exit, Some(ExitStatus::Code(126)), "{o:?}");

    // The environment is the agent's plus the request's.
    let o = a.run(&["sh", "-c", "echo $SKIFF_TEST; test -n \"$PATH\""]);
    assert_eq!(o.stdout, b"1\n");
    assert_eq!(o.exit, Some(ExitStatus::Code(0)));
}

#[test]
fn an_agent_without_path_gives_programs_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let child = Command::new(env!("CARGO_BIN_EXE_skiff-agent"))
        .arg("--connect")
        .arg(format!("unix:{}", path.display()))
        .env_clear()
        .spawn()
        .expect("start the agent");
    let (stream, _) = listener.accept().expect("the agent connects");
    let mut a = Agent {
        stream,
        child,
        _dir: dir,
    };
    // `env` is found through the agent's default PATH and prints what the program got.
    let o = a.run(&["env"]);
    assert_eq!(o.exit, Some(ExitStatus::Code(0)));
    let env = String::from_utf8_lossy(&o.stdout);
    assert!(
        env.lines().any(|l| l.starts_with("PATH=/usr/local/sbin:")),
        "{env}"
    );
}

#[test]
fn a_bad_cwd_is_a_spawn_error() {
    let mut a = Agent::start();
    let argv: [&[u8]; 1] = [b"/bin/true"];
    a.send(
        4,
        &Message::Exec {
            flags: ExecFlags(0),
            timeout_ms: 0,
            cwd: b"/no/such/dir",
            argv: ByteList::Items(&argv),
            env: ByteList::Items(&[]),
            stdin: b"",
        },
    );
    let o = a.collect(&[4]).remove(&4).expect("output");
    let (code, message) = o.error.expect("an error");
    assert_eq!(code, ErrorCode::Spawn);
    assert!(message.contains("/no/such/dir"), "{message}");
}

fn process_gone(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let r = unsafe { libc::kill(pid, 0) };
    if r != 0 {
        return true;
    }
    // A zombie waiting for its new parent counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

#[test]
fn a_timeout_kills_the_whole_process_group() {
    let mut a = Agent::start();
    let start = Instant::now();
    a.exec(
        2,
        &["sh", "-c", "sleep 100 & echo $!; sleep 100"],
        0,
        300,
        b"",
    );
    let o = a.collect(&[2]).remove(&2).expect("output");
    assert_eq!(o.exit, Some(ExitStatus::TimedOut));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let background: i32 = String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .expect("the background pid");
    let deadline = Instant::now() + Duration::from_secs(3);
    while !process_gone(background) {
        assert!(
            Instant::now() < deadline,
            "background sleep {background} survived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM")
}

#[test]
fn a_hundred_megabytes_stream_with_bounded_memory() {
    let mut a = Agent::start();
    a.exec(3, &["head", "-c", "100000000", "/dev/zero"], 0, 0, b"");
    let mut total = 0usize;
    let mut paused = false;
    loop {
        let f = a.recv().expect("frames until Exit");
        match f.message() {
            Message::Stdout(d) => {
                assert!(d.iter().all(|&b| b == 0));
                total += d.len();
                if !paused && total > 10_000_000 {
                    // A host that stops reading must not make the agent buffer.
                    paused = true;
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
            Message::Started { .. } => {}
            Message::Exit(s) => {
                assert_eq!(s, ExitStatus::Code(0));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(total, 100_000_000);
    let rss = peak_rss_kib(a.child.id());
    eprintln!("agent peak RSS after 100 MB: {rss} KiB");
    assert!(rss < 16 * 1024, "agent peak RSS {rss} KiB");
}

#[test]
fn stdin_streams_to_the_program() {
    let mut a = Agent::start();
    // The Exec's own stdin bytes, then end of input.
    a.exec(5, &["wc", "-c"], 0, 0, b"12345");
    let o = a.collect(&[5]).remove(&5).expect("output");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "5");

    // Streamed: 1 MiB in chunks, then StdinEof; cat echoes it while we send.
    a.exec(6, &["cat"], ExecFlags::STREAM_STDIN, 0, b"first:");
    let mut expected = b"first:".to_vec();
    let mut writer = a.stream.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        let mut sent = Vec::new();
        for i in 0..32u8 {
            let chunk = vec![b'a' + (i % 26); 32 * 1024];
            write_message(&mut writer, &Message::Stdin(&chunk), 6).expect("stdin");
            sent.extend_from_slice(&chunk);
        }
        write_message(&mut writer, &Message::StdinEof, 6).expect("eof");
        writer.flush().expect("flush");
        sent
    });
    let o = a.collect(&[6]).remove(&6).expect("output");
    expected.extend(sender.join().expect("sender"));
    assert_eq!(o.exit, Some(ExitStatus::Code(0)));
    assert_eq!(o.stdout.len(), expected.len());
    assert!(o.stdout == expected);

    // Stdin for a request that is not running.
    a.send(77, &Message::Stdin(b"x"));
    let f = a.recv().expect("reply");
    assert!(matches!(
        f.message(),
        Message::Error {
            code: ErrorCode::UnknownRequest,
            ..
        }
    ));
}

#[test]
fn execs_run_concurrently() {
    let mut a = Agent::start();
    let start = Instant::now();
    let reqs: Vec<u32> = (10..18).collect();
    for r in &reqs {
        a.exec(
            *r,
            &["sh", "-c", &format!("sleep 0.5; echo {r}")],
            0,
            0,
            b"",
        );
    }
    let outs = a.collect(&reqs);
    let took = start.elapsed();
    for r in &reqs {
        let o = &outs[r];
        assert_eq!(o.exit, Some(ExitStatus::Code(0)));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), r.to_string());
    }
    // Eight half-second sleeps one after another would take 4 s.
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[test]
fn a_duplicate_request_id_is_refused() {
    let mut a = Agent::start();
    a.exec(1, &["sleep", "0.5"], 0, 0, b"");
    a.exec(1, &["true"], 0, 0, b"");
    let mut saw_duplicate = false;
    let mut saw_exit = false;
    while !(saw_duplicate && saw_exit) {
        let f = a.recv().expect("frame");
        match f.message() {
            Message::Error { code, .. } => {
                assert_eq!(code, ErrorCode::DuplicateRequest);
                saw_duplicate = true;
            }
            Message::Exit(s) => {
                assert_eq!(s, ExitStatus::Code(0));
                saw_exit = true;
            }
            Message::Started { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn garbage_gets_an_error_and_the_connection_ends() {
    let mut a = Agent::start();
    a.stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let f = a.recv().expect("an error frame");
    let Message::Error { code, message } = f.message() else {
        panic!("not an error: {f:?}");
    };
    assert_eq!(code, ErrorCode::Malformed);
    assert!(String::from_utf8_lossy(message).contains("magic"));
    assert!(a.closed(), "the agent closes the connection");
    assert!(a.wait_exit(Duration::from_secs(5)).success());
}

#[test]
fn a_malformed_payload_gets_an_error() {
    let mut a = Agent::start();
    // A Hello header claiming 3 payload bytes (a Hello has 8).
    let mut frame = agent_protocol::Header {
        kind: Kind::Hello,
        request: 5,
        len: 3,
    }
    .encode()
    .to_vec();
    frame.extend_from_slice(&[1, 2, 3]);
    a.stream.write_all(&frame).expect("write");
    let f = a.recv().expect("an error frame");
    assert_eq!(f.request, 5);
    assert!(matches!(
        f.message(),
        Message::Error {
            code: ErrorCode::Malformed,
            ..
        }
    ));
    assert!(a.closed());
}

#[test]
fn a_truncated_frame_ends_the_connection_without_a_hang() {
    let mut a = Agent::start();
    a.exec(1, &["sleep", "100"], 0, 0, b"");
    let f = a.recv().expect("Started");
    let Message::Started { pid } = f.message() else {
        panic!("not Started: {f:?}");
    };
    // Half a header, then the host goes away.
    let header = agent_protocol::Header {
        kind: Kind::Exec,
        request: 2,
        len: 100,
    }
    .encode();
    a.stream.write_all(&header[..7]).expect("write");
    a.stream
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    assert!(a.wait_exit(Duration::from_secs(5)).success());
    // The running exec was killed with the connection.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !process_gone(pid as i32) {
        assert!(
            Instant::now() < deadline,
            "exec {pid} survived its connection"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn files_are_written_and_read() {
    let mut a = Agent::start();
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("f.txt");
    let p = path.to_str().expect("utf-8 path").as_bytes().to_vec();
    a.send(
        1,
        &Message::WriteFile {
            flags: WriteFlags(0),
            mode: 0o600,
            path: &p,
            data: b"hello ",
        },
    );
    assert!(matches!(a.recv().expect("reply").message(), Message::Done));
    a.send(
        2,
        &Message::WriteFile {
            flags: WriteFlags(WriteFlags::APPEND),
            mode: 0o600,
            path: &p,
            data: b"world",
        },
    );
    assert!(matches!(a.recv().expect("reply").message(), Message::Done));
    assert_eq!(std::fs::read(&path).expect("read"), b"hello world");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
        0o600
    );
    // No temporary file left behind.
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1);

    let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    std::fs::write(&path, &big).expect("write");
    a.send(3, &Message::ReadFile { path: &p });
    let mut got = Vec::new();
    loop {
        let f = a.recv().expect("frame");
        assert_eq!(f.request, 3);
        match f.message() {
            Message::FileData(d) => got.extend_from_slice(d),
            Message::Done => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got == big);

    a.send(
        4,
        &Message::ReadFile {
            path: b"/no/such/file",
        },
    );
    let f = a.recv().expect("reply");
    let Message::Error { code, message } = f.message() else {
        panic!("not an error: {f:?}");
    };
    assert_eq!(code, ErrorCode::Io);
    assert!(String::from_utf8_lossy(message).contains("/no/such/file"));
}

fn process_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    stat.rsplit(')')
        .next()
        .and_then(|r| r.trim_start().chars().next())
        .expect("state")
}

/// Waits up to 2 s for `pid`'s state to satisfy `ok` (signals take effect asynchronously).
fn wait_state(pid: u32, ok: impl Fn(char) -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if ok(process_state(pid)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn quiesce_stops_execs_and_resume_continues_them() {
    let mut a = Agent::start();
    a.exec(1, &["sleep", "100"], 0, 0, b"");
    let f = a.recv().expect("Started");
    let Message::Started { pid } = f.message() else {
        panic!("not Started: {f:?}");
    };
    a.send(2, &Message::Quiesce);
    let f = a.recv().expect("reply");
    assert_eq!((f.request, f.kind), (2, Kind::Done));
    assert!(
        wait_state(pid, |s| s == 'T'),
        "not stopped: {}",
        process_state(pid)
    );
    a.send(
        3,
        &Message::Resume {
            unix_time_ns: 0,
            entropy: &[0x5a; 32],
        },
    );
    let f = a.recv().expect("reply");
    assert_eq!((f.request, f.kind), (3, Kind::Done), "{:?}", f.message());
    assert!(wait_state(pid, |s| s != 'T'), "still stopped");
    a.send(1, &Message::Signal(libc::SIGINT));
    let outs = a.collect_with_done(1);
    assert_eq!(outs.exit, Some(ExitStatus::Signal(libc::SIGINT)));
    a.send(9, &Message::Shutdown);
    assert_eq!(a.recv().expect("reply").kind, Kind::Done);
    assert!(a.wait_exit(Duration::from_secs(5)).success());
}

#[test]
fn a_pty_gives_the_program_a_terminal() {
    let mut a = Agent::start();
    a.exec(
        1,
        &["sh", "-c", "tty; test -t 0 && test -t 1"],
        ExecFlags::PTY,
        0,
        b"",
    );
    let o = a.collect(&[1]).remove(&1).expect("output");
    assert_eq!(o.exit, Some(ExitStatus::Code(0)), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("/dev/pts/"),
        "{o:?}"
    );
}

impl Agent {
    /// Like `collect` for one request that also gets a `Done` (from `Signal`).
    fn collect_with_done(&mut self, req: u32) -> Output {
        let mut o = Output::default();
        let mut done = false;
        while !(done && o.exit.is_some()) {
            let f = self.recv().expect("frame");
            assert_eq!(f.request, req);
            match f.message() {
                Message::Done => done = true,
                Message::Exit(s) => o.exit = Some(s),
                Message::Stdout(d) => o.stdout.extend_from_slice(d),
                other => panic!("unexpected {other:?}"),
            }
        }
        o
    }
}
