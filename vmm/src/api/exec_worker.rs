//! Runs `POST /vm/exec` requests off the event loop. The runner admits a request (the VM has a
//! vsock device, is not paused, and fewer than `MAX_RUNNING_EXECS` run), takes its connection
//! from the API server and hands both to a worker thread of its own (`api-exec`). The worker
//! connects to the VM's vsock socket as any hybrid-vsock host program does (`CONNECT 1024`),
//! runs the command through the agent with its output captured (`exec::CapturedOutput`), and
//! writes the HTTP answer itself, with blocking writes under a timeout, so a long answer never
//! waits in the event loop.
//!
//! Nothing a command does can hold the control plane: the loop only admits and spawns. A worker
//! stops (and closes its agent connection, which has the agent kill the command) when the VM
//! ends, when the HTTP client goes away, or when the agent has not reported the command's end
//! `TIMEOUT_GRACE` after its timeout. At the VM's end the runner waits at most `END_PATIENCE`
//! for the workers to answer.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use devices::vm_exit::VmExitSignal;

use super::exec::{CapturedOutput, ExecAnswer, ExecRequest};
use super::http::{error_body, response};
use crate::exec::client::{AgentClient, CommandEnd, CommandSpec, Interrupt};
use crate::exec::vsock_connect::{connect_agent, ConnectError};

/// The most commands the API runs at once; one more is answered 503.
pub const MAX_RUNNING_EXECS: usize = 8;
/// How long past a command's timeout the agent may take to report it.
const TIMEOUT_GRACE: Duration = Duration::from_secs(5);
/// How long writing to the agent, or the answer to the HTTP client, may stall.
const WRITE_PATIENCE: Duration = Duration::from_secs(10);
/// How long the runner waits, once the VM has ended, for the workers to answer.
pub const END_PATIENCE: Duration = Duration::from_secs(2);

/// The number of running workers, and a condvar signalled when one ends.
type Count = Arc<(Mutex<usize>, Condvar)>;

/// A place among the `MAX_RUNNING_EXECS`; given back on drop.
#[derive(Debug)]
pub struct Slot {
    count: Count,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let (lock, ended) = &*self.count;
        let mut n = lock.lock().unwrap_or_else(PoisonError::into_inner);
        *n = n.saturating_sub(1);
        ended.notify_all();
    }
}

/// The API's exec workers for one VM.
#[derive(Debug)]
pub struct ExecWorkers {
    /// The VM's vsock socket (`--vsock ...,socket=PATH`), if it has a vsock device.
    vsock: Option<PathBuf>,
    exit: VmExitSignal,
    count: Count,
}

impl ExecWorkers {
    /// Workers for the VM whose vsock socket is `vsock` and whose end `exit` signals.
    pub fn new(vsock: Option<PathBuf>, exit: VmExitSignal) -> Self {
        Self {
            vsock,
            exit,
            count: Arc::new((Mutex::new(0), Condvar::new())),
        }
    }

    /// Admits one more command, or says (status and line) why not.
    pub fn admit(&self, paused: bool) -> Result<Slot, (u16, String)> {
        if self.vsock.is_none() {
            return Err((
                409,
                "this VM has no vsock device, so no agent to run commands: start it with --vsock cid=N,socket=PATH --agent".into(),
            ));
        }
        if paused {
            return Err((409, "the VM is paused: resume it to run a command".into()));
        }
        let (lock, _) = &*self.count;
        let mut n = lock.lock().unwrap_or_else(PoisonError::into_inner);
        if *n >= MAX_RUNNING_EXECS {
            return Err((
                503,
                format!("{MAX_RUNNING_EXECS} commands are already running through the API; retry when one has ended"),
            ));
        }
        *n += 1;
        Ok(Slot {
            count: self.count.clone(),
        })
    }

    /// Runs `req` on a thread of its own, answering on `client`.
    pub fn spawn(&self, slot: Slot, client: UnixStream, req: ExecRequest) {
        let Some(vsock) = self.vsock.clone() else {
            return write_answer(client, 409, &error_body("this VM has no vsock device"));
        };
        let job = Job {
            arrived: Instant::now(),
            vsock,
            exit: self.exit.clone(),
            req,
        };
        // The stream goes to the thread; keep a handle to answer if the thread cannot start.
        let fallback = client.try_clone();
        let started = std::thread::Builder::new()
            .name("api-exec".into())
            .spawn(move || {
                crate::sandbox::confine_thread_or_exit(crate::sandbox::ThreadKind::ApiExec);
                job.answer(client);
                drop(slot);
            });
        if let Err(e) = started {
            if let Ok(client) = fallback {
                let msg = format!("cannot start a thread for the command: {e}");
                write_answer(client, 500, &error_body(&msg));
            }
        }
    }

    /// Waits until every worker has answered, at most `patience`; the number still running.
    pub fn wait_idle(&self, patience: Duration) -> usize {
        let (lock, ended) = &*self.count;
        let n = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let (n, _) = ended
            .wait_timeout_while(n, patience, |n| *n > 0)
            .unwrap_or_else(PoisonError::into_inner);
        *n
    }
}

/// One admitted request.
struct Job {
    arrived: Instant,
    vsock: PathBuf,
    exit: VmExitSignal,
    req: ExecRequest,
}

/// Why a run has no 200 answer.
enum Failed {
    /// Answer with this status and line.
    Status(u16, String),
    /// The HTTP client went away: nobody to answer.
    ClientGone,
}

impl Job {
    /// Runs the command and writes the answer to `client`.
    fn answer(self, client: UnixStream) {
        match self.run(&client) {
            Ok(answer) => {
                let body = serde_json::to_string(&answer)
                    .unwrap_or_else(|e| error_body(&format!("cannot encode the answer: {e}")));
                write_answer(client, 200, &body);
            }
            Err(Failed::Status(status, line)) => write_answer(client, status, &error_body(&line)),
            Err(Failed::ClientGone) => {}
        }
    }

    fn run(&self, client: &UnixStream) -> Result<ExecAnswer, Failed> {
        let stream = connect_agent(&self.vsock).map_err(|e| match e {
            ConnectError::Garbage { .. } => Failed::Status(502, e.to_string()),
            ConnectError::NoListener { .. } => Failed::Status(503, e.to_string()),
            ConnectError::Connect { .. } | ConnectError::Io { .. } => Failed::Status(
                503,
                format!("cannot reach the agent: {}", crate::error_chain(&e)),
            ),
        })?;
        let fail = |e: std::io::Error| Failed::Status(500, format!("agent connection: {e}"));
        stream
            .set_write_timeout(Some(WRITE_PATIENCE))
            .map_err(fail)?;
        let mut agent = AgentClient::new(stream).map_err(fail)?;
        let req = &self.req;
        let spec = CommandSpec {
            argv: req.argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
            env: req.env.iter().map(|e| e.as_bytes().to_vec()).collect(),
            cwd: req.cwd.as_bytes().to_vec(),
            timeout: req.timeout,
            forward_stdin: false,
            stdin: req.stdin.clone(),
        };
        let host_deadline = req.timeout.map(|t| Instant::now() + t + TIMEOUT_GRACE);
        let mut why = None;
        let mut stop = || {
            why = if self.exit.is_requested() {
                Some(Stop::VmEnded)
            } else if peer_closed(client) {
                Some(Stop::ClientGone)
            } else if host_deadline.is_some_and(|d| Instant::now() > d) {
                Some(Stop::HostTimeout)
            } else {
                None
            };
            why.is_some()
        };
        let (mut stdout, mut stderr) = (CapturedOutput::default(), CapturedOutput::default());
        let end = match agent.hello(&mut stop) {
            Err(i) => CommandEnd::Interrupted(i),
            Ok(_) => agent.run(&spec, &mut stdout, &mut stderr, &mut stop),
        };
        match end {
            CommandEnd::Exit(status) => Ok(ExecAnswer::new(
                status,
                &stdout,
                &stderr,
                req.output,
                self.arrived.elapsed(),
            )),
            CommandEnd::NotStarted(m) => Err(Failed::Status(
                422,
                format!("the agent could not start the command: {m}"),
            )),
            CommandEnd::Interrupted(Interrupt::Stopped) => Err(match why {
                Some(Stop::ClientGone) => Failed::ClientGone,
                Some(Stop::HostTimeout) => Failed::Status(
                    504,
                    format!(
                        "the command's timeout passed and the agent did not report its end within {} s more",
                        TIMEOUT_GRACE.as_secs()
                    ),
                ),
                Some(Stop::VmEnded) | None => {
                    Failed::Status(503, "the VM ended while the command ran".into())
                }
            }),
            CommandEnd::Interrupted(Interrupt::Lost(m)) => {
                Err(Failed::Status(502, format!("the agent was lost: {m}")))
            }
            CommandEnd::Interrupted(Interrupt::Garbage(m)) => Err(Failed::Status(
                502,
                format!("the guest broke the agent protocol: {m}"),
            )),
        }
    }
}

/// Why a worker's wait was cut short.
#[derive(Debug, Clone, Copy)]
enum Stop {
    VmEnded,
    ClientGone,
    HostTimeout,
}

/// Whether the HTTP client closed its connection (both directions: a client that only shut
/// down its sending side still waits for the answer).
fn peer_closed(client: &UnixStream) -> bool {
    let mut p = libc::pollfd {
        fd: client.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a zero timeout never blocks.
    let ready = unsafe { libc::poll(&mut p, 1, 0) };
    ready > 0 && p.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

/// Writes the answer (blocking, at most `WRITE_PATIENCE` per stall) and closes the connection.
fn write_answer(mut client: UnixStream, status: u16, json: &str) {
    let _ = client.set_nonblocking(false);
    let _ = client.set_write_timeout(Some(WRITE_PATIENCE));
    if let Err(e) = client.write_all(&response(status, json)) {
        log::warn!("control socket: an exec answer was not taken: {e}");
    }
    let _ = client.shutdown(std::net::Shutdown::Both);
}

#[cfg(test)]
mod tests;
