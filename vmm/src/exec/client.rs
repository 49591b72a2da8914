//! The host side of the agent protocol for `skiff exec`: wait for the agent's connection,
//! greet it, run one command, stream its output to skiff's own stdout and stderr (and skiff's
//! stdin to it), and say how it ended. Whatever the guest sends is checked; anything that is
//! not the protocol ends the run as `Garbage`.
//!
//! Requests may be pipelined: `queue_hello` and `queue_request` only encode a request, and the
//! next call that waits for an answer sends everything queued in one write, then takes the
//! queued requests' replies in order before its own. The agent handles requests in order (an
//! `Exec` starts once the requests before it are answered), so `Hello`, `Resume` and `Exec`
//! cost one round trip to the guest instead of three.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use agent_protocol::{
    read_frame, write_message, ByteList, ErrorCode, ExecFlags, ExitStatus, Kind, Message,
    ReadFrameError, WriteFlags, DATA_CHUNK,
};

/// The request id of the one exec `skiff exec` runs.
const EXEC_REQUEST: u32 = 1;
/// The request id of `Hello`.
const HELLO_REQUEST: u32 = 0;
/// The request id of requests answered by `Done` (`Quiesce`, `Resume`, `Shutdown`).
const CONTROL_REQUEST: u32 = 2;
/// How long a frame, once begun, may take to arrive in full.
const FRAME_PATIENCE: Duration = Duration::from_secs(10);
/// How often waits look at the VM and the virtiofsd processes.
const TICK: Duration = Duration::from_millis(50);

/// The command to run.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<Vec<u8>>,
    pub cwd: Vec<u8>,
    pub timeout: Option<Duration>,
    /// Forward skiff's stdin (it is not a terminal).
    pub forward_stdin: bool,
    /// The first stdin bytes, sent with the `Exec` (the whole input unless `forward_stdin`).
    pub stdin: Vec<u8>,
}

/// How a wait or a run ended, short of the command's own exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interrupt {
    /// The caller's check said stop (the VM ended, a virtiofsd died, a deadline passed).
    Stopped,
    /// The connection closed or failed (the text says how).
    Lost(String),
    /// The guest sent something that is not the protocol (the text says what).
    Garbage(String),
}

/// Why the agent did not hand over a guest file (`ReadFile`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadFileRefusal {
    /// The file is larger than the caller's limit.
    #[error("the file is over {limit} bytes")]
    TooLarge { limit: usize },
    /// The agent refused (no such file, ...), in its own words.
    #[error("{code:?}: {message}")]
    Agent { code: ErrorCode, message: String },
}

/// How the command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandEnd {
    /// The agent reported the command's end.
    Exit(ExitStatus),
    /// The agent could not start the command.
    NotStarted(String),
    /// The run ended otherwise.
    Interrupted(Interrupt),
}

/// Waits up to `deadline` for the agent's connection on `listener`, calling `stop` every tick;
/// `Ok(None)` when `stop` said so or the deadline passed.
pub fn wait_for_agent(
    listener: &UnixListener,
    deadline: Instant,
    mut stop: impl FnMut() -> bool,
) -> std::io::Result<Option<UnixStream>> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(Some(stream));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if stop() || Instant::now() >= deadline {
            return Ok(None);
        }
        let left = deadline.saturating_duration_since(Instant::now()).min(TICK);
        poll_in(listener.as_raw_fd(), left);
    }
}

/// Waits up to `wait` for `fd` to become readable.
fn poll_in(fd: i32, wait: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// One connection to the agent.
#[derive(Debug)]
pub struct AgentClient {
    stream: UnixStream,
    payload: Vec<u8>,
    /// Encoded requests not yet written.
    queued: Vec<u8>,
    /// Requests written or queued whose reply has not been read, in order.
    owed: VecDeque<Kind>,
    /// The agent's name, from its `HelloReply`.
    agent: Option<String>,
}

impl AgentClient {
    /// Wraps an accepted connection.
    pub fn new(stream: UnixStream) -> std::io::Result<Self> {
        stream.set_read_timeout(Some(FRAME_PATIENCE))?;
        Ok(Self {
            stream,
            payload: Vec::new(),
            queued: Vec::new(),
            owed: VecDeque::new(),
            agent: None,
        })
    }

    /// The agent's name, once its `HelloReply` was read.
    pub fn agent(&self) -> Option<&str> {
        self.agent.as_deref()
    }

    /// Queues a `Hello`; its reply is read before the next answer waited for.
    pub fn queue_hello(&mut self) {
        self.queue(
            &Message::Hello {
                version: u32::from(agent_protocol::VERSION),
                features: 0,
            },
            HELLO_REQUEST,
        );
    }

    /// Queues a request answered by `Done` (`Quiesce`, `Resume`, `Shutdown`); its reply is
    /// read before the next answer waited for, and a refusal ends that wait.
    pub fn queue_request(&mut self, msg: &Message<'_>) {
        self.queue(msg, CONTROL_REQUEST);
    }

    fn queue(&mut self, msg: &Message<'_>, request: u32) {
        // Writing to a Vec cannot fail.
        let _ = write_message(&mut self.queued, msg, request);
        self.owed.push_back(msg.kind());
    }

    /// Writes every queued request in one go.
    fn send_queued(&mut self) -> Result<(), Interrupt> {
        if self.queued.is_empty() {
            return Ok(());
        }
        let result = self.stream.write_all(&self.queued);
        self.queued.clear();
        result.map_err(|e| Interrupt::Lost(format!("writing to the agent: {e}")))
    }

    /// Sends what is queued and waits for the answers.
    pub fn wait_queued(&mut self, mut stop: impl FnMut() -> bool) -> Result<(), Interrupt> {
        self.settle(&mut stop)
    }

    /// Sends what is queued and reads the replies owed, in order.
    fn settle(&mut self, stop: &mut dyn FnMut() -> bool) -> Result<(), Interrupt> {
        self.send_queued()?;
        while let Some(kind) = self.owed.pop_front() {
            let expected = if kind == Kind::Hello {
                HELLO_REQUEST
            } else {
                CONTROL_REQUEST
            };
            let (req, msg) = self.next(stop)?;
            match msg {
                Message::HelloReply { agent, .. } if req == expected && kind == Kind::Hello => {
                    let name = String::from_utf8_lossy(agent).into_owned();
                    log::debug!("agent {name} answered Hello");
                    self.agent = Some(name);
                }
                Message::Done if req == expected && kind != Kind::Hello => {}
                Message::Error { code, message } if req == expected => {
                    return Err(Interrupt::Garbage(format!(
                        "the agent refused {kind:?}: {code:?}: {}",
                        String::from_utf8_lossy(message)
                    )))
                }
                other => {
                    return Err(Interrupt::Garbage(format!(
                        "expected the answer to {kind:?}, got {:?} for request {req}",
                        other.kind()
                    )))
                }
            }
        }
        Ok(())
    }

    /// Reads the next frame, checking `stop` every tick while none has begun.
    fn next<'a>(
        &'a mut self,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<(u32, Message<'a>), Interrupt> {
        while !poll_in(self.stream.as_raw_fd(), TICK) {
            if stop() {
                return Err(Interrupt::Stopped);
            }
        }
        let header = match read_frame(&mut self.stream, &mut self.payload) {
            Ok(Some(h)) => h,
            Ok(None) => return Err(Interrupt::Lost("the agent closed the connection".into())),
            Err(ReadFrameError::Decode(e)) => return Err(Interrupt::Garbage(e.to_string())),
            Err(ReadFrameError::Truncated { got }) => {
                return Err(Interrupt::Lost(format!(
                    "the connection ended inside a frame ({got} bytes)"
                )))
            }
            Err(ReadFrameError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(Interrupt::Lost(format!(
                    "a frame stalled for over {FRAME_PATIENCE:?}"
                )))
            }
            Err(ReadFrameError::Io(e)) => {
                return Err(Interrupt::Lost(format!("reading from the agent: {e}")))
            }
        };
        let msg = Message::decode(header.kind, &self.payload)
            .map_err(|e| Interrupt::Garbage(format!("{:?} frame: {e}", header.kind)))?;
        Ok((header.request, msg))
    }

    /// Greets the agent (and answers what was queued before); returns its name.
    pub fn hello(&mut self, mut stop: impl FnMut() -> bool) -> Result<String, Interrupt> {
        self.queue_hello();
        self.settle(&mut stop)?;
        Ok(self.agent.clone().unwrap_or_default())
    }

    /// Sends a request answered by `Done` (`Quiesce`, `Resume`, `Shutdown`) and waits for it.
    pub fn request_done(
        &mut self,
        msg: &Message<'_>,
        mut stop: impl FnMut() -> bool,
    ) -> Result<(), Interrupt> {
        self.queue_request(msg);
        self.settle(&mut stop)
    }

    /// Reads the guest file at `path` (`ReadFile`): its bytes, up to `limit`; the inner error
    /// is the agent's refusal (no such file, ...) or a file over `limit`.
    pub fn read_file(
        &mut self,
        path: &[u8],
        limit: usize,
        mut stop: impl FnMut() -> bool,
    ) -> Result<Result<Vec<u8>, ReadFileRefusal>, Interrupt> {
        const READ_REQUEST: u32 = 3;
        let _ = write_message(&mut self.queued, &Message::ReadFile { path }, READ_REQUEST);
        self.settle(&mut stop)?;
        let mut data = Vec::new();
        let mut over = false;
        loop {
            match self.next(&mut stop)? {
                (READ_REQUEST, Message::FileData(d)) => {
                    if data.len() + d.len() > limit {
                        over = true;
                    } else {
                        data.extend_from_slice(d);
                    }
                }
                (READ_REQUEST, Message::Done) if over => {
                    return Ok(Err(ReadFileRefusal::TooLarge { limit }))
                }
                (READ_REQUEST, Message::Done) => return Ok(Ok(data)),
                (READ_REQUEST, Message::Error { code, message }) => {
                    return Ok(Err(ReadFileRefusal::Agent {
                        code,
                        message: String::from_utf8_lossy(message).into_owned(),
                    }))
                }
                (req, other) => {
                    return Err(Interrupt::Garbage(format!(
                        "expected FileData or Done for request {READ_REQUEST}, got {:?} for {req}",
                        other.kind()
                    )))
                }
            }
        }
    }

    /// Writes `data` to the guest file at `path` (mode 0644): a `WriteFile` of the first
    /// `DATA_CHUNK` bytes, then appends. The inner error is the agent's refusal.
    pub fn write_file(
        &mut self,
        path: &[u8],
        data: &[u8],
        mut stop: impl FnMut() -> bool,
    ) -> Result<Result<(), String>, Interrupt> {
        const WRITE_REQUEST: u32 = 4;
        let mut chunks: Vec<&[u8]> = data.chunks(DATA_CHUNK).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for (i, chunk) in chunks.into_iter().enumerate() {
            let msg = Message::WriteFile {
                flags: WriteFlags(if i == 0 { 0 } else { WriteFlags::APPEND }),
                mode: 0o644,
                path,
                data: chunk,
            };
            write_message(&mut self.stream, &msg, WRITE_REQUEST)
                .map_err(|e| Interrupt::Lost(format!("writing to the agent: {e}")))?;
            match self.next(&mut stop)? {
                (WRITE_REQUEST, Message::Done) => {}
                (WRITE_REQUEST, Message::Error { code, message }) => {
                    return Ok(Err(format!(
                        "{code:?}: {}",
                        String::from_utf8_lossy(message)
                    )))
                }
                (req, other) => {
                    return Err(Interrupt::Garbage(format!(
                        "expected Done for request {WRITE_REQUEST}, got {:?} for {req}",
                        other.kind()
                    )))
                }
            }
        }
        Ok(Ok(()))
    }

    /// Runs `spec`, writing its output to `stdout` and `stderr` as it arrives.
    pub fn run(
        &mut self,
        spec: &CommandSpec,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
        mut stop: impl FnMut() -> bool,
    ) -> CommandEnd {
        let argv: Vec<&[u8]> = spec.argv.iter().map(Vec::as_slice).collect();
        let env: Vec<&[u8]> = spec.env.iter().map(Vec::as_slice).collect();
        let exec = Message::Exec {
            flags: ExecFlags(if spec.forward_stdin {
                ExecFlags::STREAM_STDIN
            } else {
                0
            }),
            timeout_ms: spec.timeout.map_or(0, |t| {
                u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)
            }),
            cwd: &spec.cwd,
            argv: ByteList::Items(&argv),
            env: ByteList::Items(&env),
            stdin: &spec.stdin,
        };
        // Sent with whatever was queued before it, whose replies come first.
        let _ = write_message(&mut self.queued, &exec, EXEC_REQUEST);
        if let Err(i) = self.settle(&mut stop) {
            return CommandEnd::Interrupted(i);
        }
        if spec.forward_stdin {
            if let Ok(writer) = self.stream.try_clone() {
                // Ends with skiff's stdin (or when the agent stops taking it); skiff exits
                // without joining it.
                let _ = std::thread::Builder::new()
                    .name("exec-stdin".into())
                    .spawn(move || forward_stdin(writer));
            }
        }
        loop {
            let (req, msg) = match self.next(&mut stop) {
                Ok(f) => f,
                Err(i) => return CommandEnd::Interrupted(i),
            };
            if req != EXEC_REQUEST {
                return CommandEnd::Interrupted(Interrupt::Garbage(format!(
                    "a frame for request {req}, not {EXEC_REQUEST}"
                )));
            }
            match msg {
                Message::Started { .. } => {}
                Message::Stdout(d) => {
                    let _ = stdout.write_all(d).and_then(|()| stdout.flush());
                }
                Message::Stderr(d) => {
                    let _ = stderr.write_all(d).and_then(|()| stderr.flush());
                }
                Message::Exit(status) => return CommandEnd::Exit(status),
                Message::Error { code, message } => {
                    let text = String::from_utf8_lossy(message).into_owned();
                    return match code {
                        ErrorCode::Spawn => CommandEnd::NotStarted(text),
                        _ => CommandEnd::Interrupted(Interrupt::Garbage(format!(
                            "the agent reported {code:?}: {text}"
                        ))),
                    };
                }
                other => {
                    return CommandEnd::Interrupted(Interrupt::Garbage(format!(
                        "unexpected {:?} frame",
                        other.kind()
                    )))
                }
            }
        }
    }
}

/// Copies skiff's stdin to the exec in `Stdin` frames, then `StdinEof`.
fn forward_stdin(mut writer: UnixStream) {
    let mut input = std::io::stdin().lock();
    let mut buf = vec![0u8; DATA_CHUNK];
    loop {
        match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if write_message(&mut writer, &Message::Stdin(&buf[..n]), EXEC_REQUEST).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = write_message(&mut writer, &Message::StdinEof, EXEC_REQUEST);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use agent_protocol::Header;

    /// Reads one frame from the agent's end of the socket pair.
    fn request(agent: &mut UnixStream) -> (Header, Vec<u8>) {
        let mut payload = Vec::new();
        let header = read_frame(agent, &mut payload).unwrap().unwrap();
        (header, payload)
    }

    #[test]
    fn queued_requests_go_in_one_write_and_their_replies_are_read_first() {
        let (host, mut agent) = UnixStream::pair().unwrap();
        let mut client = AgentClient::new(host).unwrap();
        client.queue_hello();
        client.queue_request(&Message::Resume {
            unix_time_ns: 7,
            entropy: b"seed",
        });
        // Nothing is written until an answer is waited for.
        agent.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        assert!(
            agent.read(&mut byte).is_err(),
            "a queued request was sent early"
        );
        agent.set_nonblocking(false).unwrap();
        let guest = std::thread::spawn(move || {
            // All three requests are there before any reply is written.
            let kinds: Vec<(Kind, u32)> = (0..3)
                .map(|_| {
                    let (h, _) = request(&mut agent);
                    (h.kind, h.request)
                })
                .collect();
            let reply = |agent: &mut UnixStream, msg: &Message<'_>, req| {
                write_message(agent, msg, req).unwrap();
            };
            reply(
                &mut agent,
                &Message::HelloReply {
                    version: 1,
                    features: 0,
                    agent: b"scripted",
                },
                HELLO_REQUEST,
            );
            reply(&mut agent, &Message::Done, CONTROL_REQUEST);
            reply(&mut agent, &Message::Started { pid: 9 }, EXEC_REQUEST);
            reply(&mut agent, &Message::Stdout(b"hi\n"), EXEC_REQUEST);
            reply(
                &mut agent,
                &Message::Exit(ExitStatus::Code(3)),
                EXEC_REQUEST,
            );
            kinds
        });
        let spec = CommandSpec {
            argv: vec![b"true".to_vec()],
            env: Vec::new(),
            cwd: Vec::new(),
            timeout: None,
            forward_stdin: false,
            stdin: Vec::new(),
        };
        let mut out = Vec::new();
        let mut err = Vec::new();
        let end = client.run(&spec, &mut out, &mut err, || false);
        assert_eq!(end, CommandEnd::Exit(ExitStatus::Code(3)));
        assert_eq!(out, b"hi\n");
        assert_eq!(client.agent(), Some("scripted"));
        assert_eq!(
            guest.join().unwrap(),
            vec![
                (Kind::Hello, HELLO_REQUEST),
                (Kind::Resume, CONTROL_REQUEST),
                (Kind::Exec, EXEC_REQUEST)
            ]
        );
    }

    #[test]
    fn a_refused_queued_request_ends_the_wait_with_its_reason() {
        let (host, mut agent) = UnixStream::pair().unwrap();
        let mut client = AgentClient::new(host).unwrap();
        client.queue_request(&Message::Quiesce);
        let guest = std::thread::spawn(move || {
            request(&mut agent);
            write_message(
                &mut agent,
                &Message::Error {
                    code: ErrorCode::Io,
                    message: b"sync failed",
                },
                CONTROL_REQUEST,
            )
            .unwrap();
        });
        let refused = client.wait_queued(|| false).unwrap_err();
        guest.join().unwrap();
        match refused {
            Interrupt::Garbage(m) => {
                assert!(m.contains("Quiesce") && m.contains("sync failed"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }
}
