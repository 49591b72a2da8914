//! One VM of a test run: a `skiff run` or `skiff restore` child in a process group of its own
//! (so a timeout kills skiff and anything it started, virtiofsd included), its stdout and stderr
//! in the case's artifact directory, killed when dropped; the set of a run's live process
//! groups (`LiveGroups`, which the suite watchdog kills at once); and the agent connection
//! through the VM's vsock socket (`CONNECT 1024`), retried until the agent listens or the VM
//! ends.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::exec::client::{AgentClient, Interrupt};

/// How long the guest may first take to answer `CONNECT` and then `Hello` before the
/// connection is made again; doubled on each retry up to `MAX_ANSWER`. A restored guest
/// answers the first connection (the vsock device holds it until the guest has read its
/// transport reset), so this only bounds a guest that is slow or stuck.
const FIRST_ANSWER: Duration = Duration::from_millis(500);
/// The longest wait for one connection's answers.
const MAX_ANSWER: Duration = Duration::from_secs(2);
/// Pause between connection attempts while the guest boots.
const CONNECT_RETRY: Duration = Duration::from_millis(2);

/// A running skiff child.
#[derive(Debug)]
pub struct VmProcess {
    child: Child,
    status: Option<ExitStatus>,
    /// The run's live groups, which hold this child's group until it is killed or ends.
    live: Option<Arc<LiveGroups>>,
}

/// The process groups of a run's live VMs. Once `kill_all` has run, the set is closed: a VM
/// registered afterwards is killed at once.
#[derive(Debug, Default)]
pub struct LiveGroups(Mutex<Option<std::collections::BTreeSet<i32>>>);

impl LiveGroups {
    /// An open, empty set.
    pub fn new() -> Self {
        Self(Mutex::new(Some(std::collections::BTreeSet::new())))
    }

    /// Adds `group`; false when the set is closed (the caller kills the VM).
    fn register(&self, group: i32) -> bool {
        let mut set = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match set.as_mut() {
            Some(s) => s.insert(group),
            None => false,
        }
    }

    /// Removes `group`, before its leader is reaped (so its id is not reused while listed).
    fn unregister(&self, group: i32) {
        if let Some(s) = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            s.remove(&group);
        }
    }

    /// Sends SIGKILL to every listed group and closes the set; how many there were.
    pub fn kill_all(&self) -> usize {
        let groups = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_default();
        for &group in &groups {
            kill_group(group);
        }
        groups.len()
    }
}

/// SIGKILL to process group `group`.
fn kill_group(group: i32) {
    // SAFETY: killpg only sends a signal. Every caller holds the group's leader unreaped (a
    // `VmProcess` not yet waited for, or one listed in `LiveGroups`, which drops it before the
    // wait), so the id is not reused.
    unsafe { libc::killpg(group, libc::SIGKILL) };
}

/// skiff's exit code for a status (128+N for signal N, as a shell says).
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

impl VmProcess {
    /// Starts `skiff ARGS` with stdout and stderr to `DIR/skiff-stdout.log` and
    /// `DIR/skiff-stderr.log`.
    /// With `live`, the VM's group is listed there for the watchdog; when that set is already
    /// closed, the VM is killed and the error is `Interrupted`.
    pub fn spawn(
        skiff: &Path,
        args: &[OsString],
        dir: &Path,
        live: Option<&Arc<LiveGroups>>,
    ) -> std::io::Result<Self> {
        std::fs::write(
            dir.join("skiff-command.txt"),
            format!(
                "{} {}\n",
                skiff.display(),
                args.iter()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        )?;
        let stdout = std::fs::File::create(dir.join("skiff-stdout.log"))?;
        let stderr = std::fs::File::create(dir.join("skiff-stderr.log"))?;
        let child = Command::new(skiff)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .spawn()?;
        let mut vm = Self {
            child,
            status: None,
            live: None,
        };
        if let Some(live) = live {
            if !live.register(vm.group()) {
                vm.kill();
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "the suite watchdog has fired",
                ));
            }
            vm.live = Some(Arc::clone(live));
        }
        Ok(vm)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its process group id (its pid).
    fn group(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(i32::MAX)
    }

    /// Sends SIGKILL to its process group unless it has been reaped, without waiting.
    pub(super) fn signal_kill(&mut self) {
        if let Some(live) = self.live.take() {
            live.unregister(self.group());
        }
        if self.status.is_none() {
            kill_group(self.group());
        }
    }

    /// The exit status, once it has ended.
    pub fn ended(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits until it ends or `deadline`; `None` on the deadline.
    pub fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(s) = self.ended() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Kills its whole process group and reaps it.
    pub fn kill(&mut self) {
        if self.ended().is_some() {
            // Reaped: its group id may be reused, so nothing is signalled.
            self.signal_kill();
            return;
        }
        self.signal_kill();
        self.status = self.child.wait().ok();
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Why a VM's agent could not be reached (part of a case's verdict).
#[derive(Debug, Error)]
pub enum AgentConnectError {
    /// The VM's skiff ended first.
    #[error("the VM ended (skiff exit {code}) before its agent answered")]
    VmEnded { code: i32 },
    /// No agent answered before the deadline.
    #[error("no agent answered on vsock port {port} within the boot timeout")]
    NoAnswer { port: u32 },
    /// The connected stream could not be set up.
    #[error("agent connection")]
    Connection(#[source] std::io::Error),
    /// The agent answered the greeting with something that is not a reply.
    #[error("agent hello: {0}")]
    Hello(String),
}

/// Connects to the agent behind the vsock socket `socket` and greets it, until `deadline`,
/// giving up early when `vm` ends. A connection that is not answered in time is dropped and
/// made again, with more patience each time. The error says why, for the verdict.
pub fn connect_agent(
    socket: &Path,
    deadline: Instant,
    vm: &mut VmProcess,
) -> Result<AgentClient, AgentConnectError> {
    let port = agent_protocol::AGENT_PORT;
    let mut answer = FIRST_ANSWER;
    loop {
        if let Some(status) = vm.ended() {
            return Err(AgentConnectError::VmEnded {
                code: exit_code(status),
            });
        }
        if Instant::now() >= deadline {
            return Err(AgentConnectError::NoAnswer { port });
        }
        if let Ok(stream) = UnixStream::connect(socket) {
            if let Ok(true) = handshake(&stream, port, answer) {
                let mut client = AgentClient::new(stream).map_err(AgentConnectError::Connection)?;
                let asked = Instant::now();
                match client.hello(|| asked.elapsed() >= answer) {
                    Ok(_) => return Ok(client),
                    Err(Interrupt::Garbage(m)) => return Err(AgentConnectError::Hello(m)),
                    Err(_) => {}
                }
            }
            answer = (answer * 2).min(MAX_ANSWER);
        }
        std::thread::sleep(CONNECT_RETRY);
    }
}

/// `CONNECT port`, then one `OK <hostport>` line; false when the guest refused or is silent.
fn handshake(mut stream: &UnixStream, port: u32, answer: Duration) -> std::io::Result<bool> {
    stream.set_read_timeout(Some(answer))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 32 {
        match stream.read(&mut byte)? {
            1 if byte[0] == b'\n' => return Ok(line.starts_with(b"OK ")),
            1 => line.push(byte[0]),
            _ => return Ok(false),
        }
    }
    Ok(false)
}
