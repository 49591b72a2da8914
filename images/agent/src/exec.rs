//! Running one `Exec`: start the program, stream its output, feed its input, enforce its
//! timeout, report how it ended; and the registry of running execs that `Stdin`, `Signal`,
//! `Quiesce` and a closed connection act on.
//!
//! Each exec has one thread that polls its output pipes and waits for its status, and, when it
//! has input, one thread that writes it. Output is read in chunks of at most `DATA_CHUNK` and
//! written to the connection before the next read, so a host that stops reading stops the
//! program (through its full pipe) instead of growing the agent's memory.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_protocol::{ErrorCode, ExecFlags, ExitStatus, Message, DATA_CHUNK};

use crate::reaper::Reaper;
use crate::session::Writer;
use crate::spawn::{spawn, SpawnError, SpawnSpec};

/// How long output is still drained after the program exited, when something it started in
/// the background keeps its pipes open.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);
/// Stdin chunks queued per exec before the connection's reader waits for the program.
const STDIN_QUEUE: usize = 8;

/// An owned copy of an `Exec` request.
#[derive(Debug)]
pub struct ExecRequest {
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
    pub cwd: Option<CString>,
    pub stdin: Vec<u8>,
    pub flags: ExecFlags,
    pub timeout: Option<Duration>,
}

/// Input for an exec's stdin thread: data, or the end of input.
type StdinChunk = Option<Vec<u8>>;

#[derive(Debug)]
struct Running {
    pgid: i32,
    stdin: Option<SyncSender<StdinChunk>>,
}

/// Every running exec of every connection, by (connection, request id).
#[derive(Debug, Default)]
pub struct Registry {
    execs: Mutex<HashMap<(u64, u32), Running>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, u32), Running>> {
        self.execs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues stdin data (or its end, `None`) for an exec. Waits while the exec's queue is
    /// full. Returns false when no such exec runs.
    pub fn stdin(&self, conn: u64, req: u32, chunk: StdinChunk) -> bool {
        let sender = {
            let mut execs = self.lock();
            let Some(running) = execs.get_mut(&(conn, req)) else {
                return false;
            };
            if chunk.is_none() {
                running.stdin.take()
            } else {
                running.stdin.clone()
            }
        };
        // A program that closed its input (or input already ended) drops the data, as a pipe
        // would.
        if let Some(sender) = sender {
            let _ = sender.send(chunk);
        }
        true
    }

    /// Sends `sig` to an exec's process group. Returns false when no such exec runs.
    pub fn signal(&self, conn: u64, req: u32, sig: i32) -> bool {
        match self.lock().get(&(conn, req)) {
            Some(running) => {
                signal_group(running.pgid, sig);
                true
            }
            None => false,
        }
    }

    /// Sends `sig` to every exec (Quiesce stops them, Resume continues them).
    pub fn signal_all(&self, sig: i32) {
        for running in self.lock().values() {
            signal_group(running.pgid, sig);
        }
    }

    /// Kills every exec of a connection that went away.
    pub fn kill_connection(&self, conn: u64) {
        for ((c, _), running) in self.lock().iter() {
            if *c == conn {
                signal_group(running.pgid, libc::SIGKILL);
            }
        }
    }
}

fn signal_group(pgid: i32, sig: i32) {
    // SAFETY: kill has no memory effects; a negative pid names the process group.
    unsafe { libc::kill(-pgid, sig) };
}

/// Starts an exec for request `req` and returns once it runs (or failed to start); its
/// output, input and end are handled on threads of its own.
pub fn start(
    reaper: &Arc<Reaper>,
    registry: &Arc<Registry>,
    out: &Arc<Writer>,
    conn: u64,
    req: u32,
    request: ExecRequest,
) {
    if registry.lock().contains_key(&(conn, req)) {
        out.error(
            req,
            ErrorCode::DuplicateRequest,
            "request id already running",
        );
        return;
    }
    let spec = SpawnSpec {
        argv: request.argv,
        env: request.env,
        cwd: request.cwd,
        pty: request.flags.has(ExecFlags::PTY),
    };
    let child = match spawn(&spec, reaper) {
        Ok(child) => child,
        Err(e @ (SpawnError::NotFound(_) | SpawnError::NotExecutable(..))) => {
            // As a shell does: a message on stderr and 127 (not found) or 126.
            let code = if matches!(e, SpawnError::NotFound(_)) {
                127
            } else {
                126
            };
            let line = format!("skiff-agent: {e}\n");
            let _ = out.send(req, &Message::Stderr(line.as_bytes()));
            let _ = out.send(req, &Message::Exit(ExitStatus::Code(code)));
            return;
        }
        Err(e) => {
            out.error(req, ErrorCode::Spawn, &e.to_string());
            return;
        }
    };
    let streaming = request.flags.has(ExecFlags::STREAM_STDIN);
    let stdin = if streaming || !request.stdin.is_empty() {
        let (tx, rx) = sync_channel::<StdinChunk>(STDIN_QUEUE);
        let first = request.stdin;
        let pty = spec.pty;
        let mut pipe = child.stdin;
        let spawned = std::thread::Builder::new()
            .name(format!("stdin-{req}"))
            .spawn(move || {
                if pipe.write_all(&first).is_err() {
                    return;
                }
                if streaming {
                    while let Ok(Some(data)) = rx.recv() {
                        if pipe.write_all(&data).is_err() {
                            return;
                        }
                    }
                }
                if pty {
                    // A terminal has no end of input; ^D at the start of a line is it.
                    let _ = pipe.write_all(&[4]);
                }
            });
        match spawned {
            Ok(_) => streaming.then_some(tx),
            Err(_) => None,
        }
    } else {
        // No input: the program reads end of file (with a pty, the terminal stays open).
        drop(child.stdin);
        None
    };
    registry.lock().insert(
        (conn, req),
        Running {
            pgid: child.pid,
            stdin,
        },
    );
    let _ = out.send(
        req,
        &Message::Started {
            pid: child.pid.unsigned_abs(),
        },
    );
    let pump = Pump {
        reaper: Arc::clone(reaper),
        out: Arc::clone(out),
        req,
        pid: child.pid,
        deadline: request.timeout.map(|t| Instant::now() + t),
    };
    let exec_registry = Arc::clone(registry);
    let (stdout, stderr) = (child.stdout, child.stderr);
    let spawned = std::thread::Builder::new()
        .name(format!("exec-{req}"))
        .spawn(move || {
            let status = pump.run(stdout, stderr);
            exec_registry.lock().remove(&(conn, req));
            let _ = pump.out.send(req, &Message::Exit(status));
        });
    if spawned.is_err() {
        signal_group(child.pid, libc::SIGKILL);
        registry.lock().remove(&(conn, req));
        out.error(req, ErrorCode::Spawn, "could not start the exec's thread");
    }
}

struct Pump {
    reaper: Arc<Reaper>,
    out: Arc<Writer>,
    req: u32,
    pid: i32,
    deadline: Option<Instant>,
}

impl Pump {
    /// Streams output until the program has ended and its pipes are drained; returns how it
    /// ended.
    fn run(&self, stdout: File, stderr: Option<File>) -> ExitStatus {
        let mut streams: [Option<(File, bool)>; 2] =
            [Some((stdout, true)), stderr.map(|f| (f, false))];
        let mut buf = vec![0u8; DATA_CHUNK];
        let mut status: Option<i32> = None;
        let mut exited_at: Option<Instant> = None;
        let mut timed_out = false;
        let mut host_gone = false;
        loop {
            let open = streams.iter().filter(|s| s.is_some()).count();
            if let Some(at) = exited_at {
                if open == 0 || at.elapsed() > DRAIN_AFTER_EXIT {
                    break;
                }
            }
            if open == 0 {
                // Output is closed; wait for the status (or the deadline).
                let wait = self.until_deadline().unwrap_or(Duration::from_secs(3600));
                match self.reaper.wait_timeout(self.pid, wait) {
                    Some(s) => {
                        status = Some(s);
                        break;
                    }
                    None => {
                        self.kill(&mut timed_out);
                        continue;
                    }
                }
            }
            let tick = Duration::from_millis(if status.is_some() { 20 } else { 100 });
            let wait = self.until_deadline().map_or(tick, |d| d.min(tick));
            let ready = poll_readable(&streams, wait);
            for (slot, ready) in streams.iter_mut().zip(ready) {
                let Some((file, is_stdout)) = slot else {
                    continue;
                };
                if !ready {
                    continue;
                }
                match file.read(&mut buf) {
                    Ok(0) => *slot = None,
                    Ok(n) => {
                        let msg = if *is_stdout {
                            Message::Stdout(&buf[..n])
                        } else {
                            Message::Stderr(&buf[..n])
                        };
                        if !host_gone && self.out.send(self.req, &msg).is_err() {
                            // Nobody can receive the output any more.
                            host_gone = true;
                            signal_group(self.pid, libc::SIGKILL);
                        }
                    }
                    // A pty's master reads EIO once the terminal's last user closed it.
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => *slot = None,
                }
            }
            if status.is_none() {
                status = self.reaper.try_take(self.pid);
                if status.is_some() {
                    exited_at = Some(Instant::now());
                }
            }
            if status.is_none() && self.until_deadline() == Some(Duration::ZERO) {
                self.kill(&mut timed_out);
            }
        }
        if timed_out {
            return ExitStatus::TimedOut;
        }
        match status {
            Some(s) if libc::WIFSIGNALED(s) => ExitStatus::Signal(libc::WTERMSIG(s)),
            Some(s) => ExitStatus::Code(libc::WEXITSTATUS(s)),
            None => ExitStatus::TimedOut,
        }
    }

    fn until_deadline(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// The timeout expired: kill the whole process group (once).
    fn kill(&self, timed_out: &mut bool) {
        if !*timed_out {
            *timed_out = true;
            signal_group(self.pid, libc::SIGKILL);
        }
    }
}

/// Polls the open streams for input (or hang-up) for up to `wait`; says which are ready.
fn poll_readable(streams: &[Option<(File, bool)>; 2], wait: Duration) -> [bool; 2] {
    let mut fds = [libc::pollfd {
        fd: -1,
        events: libc::POLLIN,
        revents: 0,
    }; 2];
    for (pfd, stream) in fds.iter_mut().zip(streams) {
        if let Some((file, _)) = stream {
            pfd.fd = file.as_raw_fd();
        }
    }
    let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `fds` is a valid array of two pollfd entries; poll ignores negative fds.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n <= 0 {
        return [false; 2];
    }
    [fds[0].revents != 0, fds[1].revents != 0]
}
