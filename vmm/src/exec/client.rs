//! The host side of the agent protocol for `skiff exec`: wait for the agent's connection,
//! greet it, run one command, stream its output to skiff's own stdout and stderr (and skiff's
//! stdin to it), and say how it ended. Whatever the guest sends is checked; anything that is
//! not the protocol ends the run as `Garbage`.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use agent_protocol::{
    read_frame, write_message, ByteList, ErrorCode, ExecFlags, ExitStatus, Message, ReadFrameError,
    DATA_CHUNK,
};

/// The request id of the one exec `skiff exec` runs.
const EXEC_REQUEST: u32 = 1;
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
}

impl AgentClient {
    /// Wraps an accepted connection.
    pub fn new(stream: UnixStream) -> std::io::Result<Self> {
        stream.set_read_timeout(Some(FRAME_PATIENCE))?;
        Ok(Self {
            stream,
            payload: Vec::new(),
        })
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

    /// Greets the agent; returns its name.
    pub fn hello(&mut self, mut stop: impl FnMut() -> bool) -> Result<String, Interrupt> {
        write_message(
            &mut self.stream,
            &Message::Hello {
                version: u32::from(agent_protocol::VERSION),
                features: 0,
            },
            0,
        )
        .map_err(|e| Interrupt::Lost(format!("writing to the agent: {e}")))?;
        match self.next(&mut stop)? {
            (0, Message::HelloReply { agent, .. }) => {
                Ok(String::from_utf8_lossy(agent).into_owned())
            }
            (_, other) => Err(Interrupt::Garbage(format!(
                "expected HelloReply, got {:?}",
                other.kind()
            ))),
        }
    }

    /// Sends a request answered by `Done` (`Quiesce`, `Resume`, `Shutdown`) and waits for it.
    pub fn request_done(
        &mut self,
        msg: &Message<'_>,
        mut stop: impl FnMut() -> bool,
    ) -> Result<(), Interrupt> {
        const CONTROL_REQUEST: u32 = 2;
        write_message(&mut self.stream, msg, CONTROL_REQUEST)
            .map_err(|e| Interrupt::Lost(format!("writing to the agent: {e}")))?;
        match self.next(&mut stop)? {
            (CONTROL_REQUEST, Message::Done) => Ok(()),
            (_, Message::Error { code, message }) => Err(Interrupt::Garbage(format!(
                "the agent refused {:?}: {code:?}: {}",
                msg.kind(),
                String::from_utf8_lossy(message)
            ))),
            (_, other) => Err(Interrupt::Garbage(format!(
                "expected Done, got {:?}",
                other.kind()
            ))),
        }
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
        write_message(&mut self.stream, &Message::ReadFile { path }, READ_REQUEST)
            .map_err(|e| Interrupt::Lost(format!("writing to the agent: {e}")))?;
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
            stdin: b"",
        };
        if let Err(e) = write_message(&mut self.stream, &exec, EXEC_REQUEST) {
            return CommandEnd::Interrupted(Interrupt::Lost(format!("writing to the agent: {e}")));
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
