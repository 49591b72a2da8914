//! The `skiff exec` session, on its own thread while the VM runs on the main one: wait for the
//! agent, greet it, run the command, then stop the VM. Its result is a `SessionEnd`, which
//! `report` turns into skiff's exit code and one line.
//!
//! While waiting it watches the VM (ended early: the guest never came up), the virtiofsd
//! processes (one died: its own code) and, on a PVM host, the serial console: once the kernel
//! has printed `Run /skiff-agent as init process` and the agent still has not connected after `PVM_GRACE`, the host's
//! KVM cannot run Linux user space and waiting longer would only hang. When no agent came and
//! the guest never set its virtio-vsock device up (`DRIVER_OK`), its kernel has no vsock driver,
//! and the end says that rather than "never came up". Likewise a guest whose agent connects
//! without its kernel having set up the virtio-fs device of a `--rootfs` or `--share`: its
//! kernel has no virtio-fs driver, and the command would run without its files.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use agent_protocol::ExitStatus;
use devices::vm_exit::{GuestEnd, VmExitSignal};

use super::client::{wait_for_agent, AgentClient, CommandEnd, CommandSpec, Interrupt};
use super::virtiofsd::Virtiofsd;
use super::vsock_connect::ConnectError;
use crate::exit_code;

/// How long after `Run /init` a PVM host is declared unable to run the agent.
const PVM_GRACE: Duration = Duration::from_secs(10);
/// How long past the command's own timeout skiff waits for the agent to report it.
const TIMEOUT_GRACE: Duration = Duration::from_secs(5);
/// What Linux prints when it starts init (`Run /skiff-agent as init process`).
const INIT_MARKER: &[u8] = b" as init process";
/// How often the serial console is scanned for `Run /init`.
const SERIAL_SCAN: Duration = Duration::from_millis(500);

/// How the session reaches the agent.
#[derive(Debug)]
pub enum AgentLink {
    /// A booting guest's agent connects out to this listener (on the vsock device's
    /// `PATH_1024`).
    Listen(UnixListener),
    /// A restored guest's agent listens on vsock port 1024 behind the vsock socket (the
    /// path), to which the stream is connected, its `CONNECT` not yet sent.
    Connect(std::os::unix::net::UnixStream, PathBuf),
    /// `Connect`'s stream, handed on to the session's client.
    Used,
}

/// Everything the session needs; moved to its thread.
#[derive(Debug)]
pub struct Session {
    pub link: AgentLink,
    pub exit: VmExitSignal,
    pub boot_timeout: Duration,
    pub serial_log: PathBuf,
    pub spec: CommandSpec,
    pub daemons: Vec<Virtiofsd>,
    /// The VM's vsock device, to tell a guest without a vsock driver from one whose agent did
    /// not come (`None`: do not tell them apart).
    pub vsock_device: Option<Arc<Mutex<devices::virtio::transport::VirtioPciDevice>>>,
    /// The virtio-fs devices of `--rootfs` and `--share`, each with the option it serves: a
    /// guest whose agent connects without having set one up has no virtio-fs driver.
    pub fs_devices: Vec<(
        String,
        Arc<Mutex<devices::virtio::transport::VirtioPciDevice>>,
    )>,
}

impl From<ConnectError> for SessionEnd {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::Connect { .. } | ConnectError::Io { .. } => {
                SessionEnd::Internal(crate::error_chain(&e))
            }
            ConnectError::NoListener { .. } => SessionEnd::NoListener(e.to_string()),
            ConnectError::Garbage { .. } => SessionEnd::Garbage(e.to_string()),
        }
    }
}

/// How the session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The command ran and ended so.
    Command(ExitStatus),
    /// The command's timeout passed and the agent never reported it.
    HostTimeout,
    /// The agent could not set the command up.
    NotStarted(String),
    /// No agent connected: within the boot timeout, or before the VM ended.
    NoAgent { waited: Duration, vm_ended: bool },
    /// No agent connected, and the guest never set its virtio-vsock device up.
    NoVsockDriver { waited: Duration, vm_ended: bool },
    /// The agent connected, but the guest never set up the virtio-fs device of this option.
    NoFsDriver(String),
    /// `skiff ctl exec`: nothing listens on the agent's port.
    NoListener(String),
    /// The kernel reached `Run /init` on a PVM host and no agent came.
    PvmHost,
    /// The agent went away mid-run.
    Lost(String),
    /// The guest sent something that is not the protocol.
    Garbage(String),
    /// A virtiofsd died.
    Virtiofsd(String),
    /// The VM ended because skiff was told to stop.
    Stopped,
    /// `skiff exec --snapshot`: the snapshot cannot run a command (not a snapshot, no vsock
    /// device, no agent listening in it).
    SnapshotUnusable(String),
    /// skiff itself failed.
    Internal(String),
}

/// Watches the serial log for the kernel starting init.
struct SerialWatch {
    path: PathBuf,
    offset: u64,
    carry: Vec<u8>,
    last_scan: Instant,
    init_seen: Option<Instant>,
}

impl SerialWatch {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            offset: 0,
            carry: Vec::new(),
            last_scan: Instant::now(),
            init_seen: None,
        }
    }

    /// Reads what the console printed since the last scan (at most every `SERIAL_SCAN`);
    /// returns when `Run /init` was seen.
    fn init_seen(&mut self) -> Option<Instant> {
        if self.init_seen.is_some() || self.last_scan.elapsed() < SERIAL_SCAN {
            return self.init_seen;
        }
        self.scan()
    }

    /// Reads what the console printed since the last scan, now.
    fn scan(&mut self) -> Option<Instant> {
        if self.init_seen.is_some() {
            return self.init_seen;
        }
        self.last_scan = Instant::now();
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return None;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return None;
        }
        let mut new = Vec::new();
        if f.read_to_end(&mut new).is_err() {
            return None;
        }
        self.offset += new.len() as u64;
        self.carry.extend_from_slice(&new);
        if self
            .carry
            .windows(INIT_MARKER.len())
            .any(|w| w == INIT_MARKER)
        {
            self.init_seen = Some(Instant::now());
        }
        // Keep only a tail, enough to find the marker split across reads.
        let keep = self.carry.len().saturating_sub(INIT_MARKER.len());
        self.carry.drain(..keep);
        self.init_seen
    }
}

impl Session {
    /// Runs the session and hands back its end and the virtiofsd processes (stopped by the
    /// caller after the VM).
    pub fn run(mut self) -> (SessionEnd, Vec<Virtiofsd>) {
        let end = self.run_inner();
        // The answer is in: stop the VM now rather than wait for the guest to power off.
        self.exit.request(GuestEnd::Stopped);
        (end, self.daemons)
    }

    /// The first virtiofsd that died, if any.
    fn dead_daemon(daemons: &mut [Virtiofsd]) -> Option<String> {
        daemons
            .iter_mut()
            .find_map(|d| d.exited().map(|e| crate::error_chain(&e)))
    }

    fn run_inner(&mut self) -> SessionEnd {
        let pvm = Path::new("/sys/module/kvm_pvm").exists();
        let started = Instant::now();
        let mut serial = SerialWatch::new(&self.serial_log);
        let mut dead: Option<String> = None;
        let mut pvm_stuck = false;
        let exit = self.exit.clone();
        let daemons = &mut self.daemons;
        if let AgentLink::Connect(..) = self.link {
            let AgentLink::Connect(stream, path) =
                std::mem::replace(&mut self.link, AgentLink::Used)
            else {
                return SessionEnd::Internal("the agent connection is gone".into());
            };
            return match super::vsock_connect::handshake(stream, &path) {
                Ok(stream) => self.serve(stream, started),
                Err(e @ ConnectError::NoListener { .. }) => {
                    SessionEnd::SnapshotUnusable(e.to_string())
                }
                Err(e) => e.into(),
            };
        }
        let AgentLink::Listen(listener) = &self.link else {
            return SessionEnd::Internal("the agent listener is gone".into());
        };
        let stream = {
            let stop = || {
                if let Some(d) = Self::dead_daemon(daemons) {
                    dead = Some(d);
                    return true;
                }
                if pvm {
                    if let Some(at) = serial.init_seen() {
                        if at.elapsed() > PVM_GRACE {
                            pvm_stuck = true;
                            return true;
                        }
                    }
                }
                exit.is_requested()
            };
            match wait_for_agent(listener, started + self.boot_timeout, stop) {
                Ok(Some(s)) => s,
                Ok(None) => {
                    let waited = started.elapsed();
                    let vm_ended = exit.is_requested();
                    return if let Some(d) = dead {
                        SessionEnd::Virtiofsd(d)
                    } else if self.stopped_by_host() {
                        SessionEnd::Stopped
                    } else if !self.vsock_driven() {
                        SessionEnd::NoVsockDriver { waited, vm_ended }
                    } else if pvm_stuck || (pvm && serial.scan().is_some()) {
                        // Stuck after starting init, or init died (the kernel panicked).
                        SessionEnd::PvmHost
                    } else {
                        SessionEnd::NoAgent { waited, vm_ended }
                    };
                }
                Err(e) => return SessionEnd::Internal(format!("waiting for the agent: {e}")),
            }
        };
        log::info!("agent connected after {:?}", started.elapsed());
        // The kernel probes its drivers before it starts init, so by now every device it has
        // a driver for is set up.
        if let Some(option) = self.undriven_share() {
            return SessionEnd::NoFsDriver(option);
        }
        self.serve(stream, started)
    }

    /// Greets the agent on `stream` and runs the command (the greeting and the command in one
    /// write).
    fn serve(&mut self, stream: std::os::unix::net::UnixStream, started: Instant) -> SessionEnd {
        let exit = self.exit.clone();
        let mut client = match AgentClient::new(stream) {
            Ok(c) => c,
            Err(e) => return SessionEnd::Internal(format!("agent connection: {e}")),
        };
        let mut dead: Option<String> = None;
        let mut host_timeout = false;
        let command_deadline = self
            .spec
            .timeout
            .map(|t| Instant::now() + t + TIMEOUT_GRACE);
        let end = {
            let daemons = &mut self.daemons;
            let mut stop = || {
                if let Some(d) = Self::dead_daemon(daemons) {
                    dead = Some(d);
                    return true;
                }
                if command_deadline.is_some_and(|d| Instant::now() > d) {
                    host_timeout = true;
                    return true;
                }
                exit.is_requested()
            };
            // Hello goes with the Exec (one round trip): its reply is read first.
            client.queue_hello();
            let end = client.run(
                &self.spec,
                &mut std::io::stdout().lock(),
                &mut std::io::stderr().lock(),
                &mut stop,
            );
            log::info!(
                "{} answered; the command ended after {:?}",
                client.agent().unwrap_or("the agent"),
                started.elapsed()
            );
            end
        };
        match end {
            CommandEnd::Exit(status) => SessionEnd::Command(status),
            CommandEnd::NotStarted(m) => SessionEnd::NotStarted(m),
            CommandEnd::Interrupted(i) => self.interrupted(i, dead, host_timeout),
        }
    }

    /// Whether the guest's driver has set the vsock device up (true when unknown).
    fn vsock_driven(&self) -> bool {
        self.vsock_device
            .as_ref()
            .is_none_or(|d| d.lock().unwrap_or_else(PoisonError::into_inner).driver_ok())
    }

    /// The option of the first virtio-fs device the guest has not set up.
    fn undriven_share(&self) -> Option<String> {
        self.fs_devices
            .iter()
            .find(|(_, d)| !d.lock().unwrap_or_else(PoisonError::into_inner).driver_ok())
            .map(|(option, _)| option.clone())
    }

    fn stopped_by_host(&self) -> bool {
        matches!(self.exit.reason(), Some(GuestEnd::HostSignal(_)))
    }

    fn interrupted(&self, i: Interrupt, dead: Option<String>, host_timeout: bool) -> SessionEnd {
        if let Some(d) = dead {
            return SessionEnd::Virtiofsd(d);
        }
        if host_timeout {
            return SessionEnd::HostTimeout;
        }
        match i {
            Interrupt::Stopped if self.stopped_by_host() => SessionEnd::Stopped,
            Interrupt::Stopped => SessionEnd::Lost("the VM ended while the command ran".into()),
            Interrupt::Lost(m) => SessionEnd::Lost(m),
            Interrupt::Garbage(m) => SessionEnd::Garbage(m),
        }
    }
}

/// The exit code and verdict line `skiff run` would give for `end` (no line for the guest's own
/// end).
fn guest_verdict(end: GuestEnd) -> (u8, Option<String>) {
    let status = exit_code::ExitStatus::from_end(end, None, 0, None);
    (status.code, status.detail)
}

impl SessionEnd {
    /// The exit code, and the line for stderr (none when the command's own status is the
    /// whole story). `guest` is how the VM ended, when it ran.
    pub fn report(&self, guest: Option<GuestEnd>) -> (u8, Option<String>) {
        let how = |g: Option<GuestEnd>| match g {
            None | Some(GuestEnd::Stopped) => String::new(),
            Some(g) => {
                let (_, line) = guest_verdict(g);
                line.map(|l| format!(" ({l})"))
                    .unwrap_or_else(|| format!(" (the guest ended: {g:?})"))
            }
        };
        match self {
            SessionEnd::Command(ExitStatus::Code(c)) => (u8::try_from(*c & 0xff).unwrap_or(1), None),
            SessionEnd::Command(ExitStatus::Signal(n)) => {
                let code = 128u8.saturating_add(u8::try_from(*n).unwrap_or(127));
                (code, None)
            }
            SessionEnd::Command(ExitStatus::TimedOut) | SessionEnd::HostTimeout => (
                exit_code::TIMEOUT,
                Some(format!(
                    "the command's --timeout expired; it was killed (exit code {})",
                    exit_code::TIMEOUT
                )),
            ),
            SessionEnd::NotStarted(m) => (
                exit_code::EXEC_NOT_STARTED,
                Some(format!(
                    "the agent could not start the command: {m} (exit code {})",
                    exit_code::EXEC_NOT_STARTED
                )),
            ),
            SessionEnd::NoAgent { waited, vm_ended } => (
                exit_code::EXEC_NO_AGENT,
                Some(if *vm_ended {
                    format!(
                        "the guest never came up: it ended before its agent connected{} (exit code {})",
                        how(guest),
                        exit_code::EXEC_NO_AGENT
                    )
                } else {
                    format!(
                        "the guest never came up: no agent connected within {:.0} s (exit code {})",
                        waited.as_secs_f64(),
                        exit_code::EXEC_NO_AGENT
                    )
                }),
            ),
            SessionEnd::NoVsockDriver { waited, vm_ended } => (
                exit_code::EXEC_NO_DRIVER,
                Some(format!(
                    "the guest {} and never set up its virtio-vsock device: does its kernel have vsock support built in (CONFIG_VSOCKETS, CONFIG_VIRTIO_VSOCKETS)?{} (exit code {})",
                    if *vm_ended {
                        "ended before its agent connected".to_string()
                    } else {
                        format!("had no agent connected within {:.0} s", waited.as_secs_f64())
                    },
                    if *vm_ended { how(guest) } else { String::new() },
                    exit_code::EXEC_NO_DRIVER
                )),
            ),
            SessionEnd::NoFsDriver(option) => (
                exit_code::EXEC_NO_DRIVER,
                Some(format!(
                    "the guest's agent connected but its kernel never set up the virtio-fs device for {option}: does it have virtio-fs support built in (CONFIG_VIRTIO_FS, CONFIG_FUSE_FS)? (exit code {})",
                    exit_code::EXEC_NO_DRIVER
                )),
            ),
            SessionEnd::NoListener(m) => (
                exit_code::EXEC_NO_AGENT,
                Some(format!("{m} (exit code {})", exit_code::EXEC_NO_AGENT)),
            ),
            SessionEnd::PvmHost => (
                exit_code::EXEC_PVM_HOST,
                Some(format!(
                    "this host's KVM (PVM, /sys/module/kvm_pvm) cannot run Linux user space: the kernel ran the agent as init but it never connected (exit code {})",
                    exit_code::EXEC_PVM_HOST
                )),
            ),
            SessionEnd::Lost(m) => (
                exit_code::EXEC_AGENT_LOST,
                Some(format!(
                    "the agent was lost: {m}{} (exit code {})",
                    how(guest),
                    exit_code::EXEC_AGENT_LOST
                )),
            ),
            SessionEnd::Garbage(m) => (
                exit_code::EXEC_GARBAGE,
                Some(format!(
                    "the guest broke the agent protocol: {m} (exit code {})",
                    exit_code::EXEC_GARBAGE
                )),
            ),
            SessionEnd::Virtiofsd(m) => (
                exit_code::EXEC_VIRTIOFSD,
                Some(format!("{m} (exit code {})", exit_code::EXEC_VIRTIOFSD)),
            ),
            SessionEnd::Stopped => match guest {
                Some(g @ GuestEnd::HostSignal(_)) => guest_verdict(g),
                _ => (exit_code::EXEC_AGENT_LOST, Some("stopped".into())),
            },
            SessionEnd::SnapshotUnusable(m) => (
                exit_code::EXEC_SNAPSHOT,
                Some(format!("{m} (exit code {})", exit_code::EXEC_SNAPSHOT)),
            ),
            SessionEnd::Internal(m) => (
                exit_code::EXEC_SETUP,
                Some(format!("{m} (exit code {})", exit_code::EXEC_SETUP)),
            ),
        }
    }

    /// Whether the guest's console explains this end (the run failed in or around the guest).
    pub fn wants_serial_tail(&self) -> bool {
        matches!(
            self,
            SessionEnd::NoAgent { .. }
                | SessionEnd::NoVsockDriver { .. }
                | SessionEnd::NoFsDriver(_)
                | SessionEnd::PvmHost
                | SessionEnd::Lost(_)
                | SessionEnd::Garbage(_)
                | SessionEnd::HostTimeout
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_end_has_its_own_code() {
        let ends = [
            SessionEnd::HostTimeout,
            SessionEnd::NotStarted("x".into()),
            SessionEnd::NoAgent {
                waited: Duration::from_secs(1),
                vm_ended: false,
            },
            SessionEnd::NoVsockDriver {
                waited: Duration::from_secs(1),
                vm_ended: true,
            },
            SessionEnd::PvmHost,
            SessionEnd::Lost("x".into()),
            SessionEnd::Garbage("x".into()),
            SessionEnd::Virtiofsd("x".into()),
            SessionEnd::SnapshotUnusable("x".into()),
            SessionEnd::Internal("x".into()),
        ];
        let codes: Vec<u8> = ends.iter().map(|e| e.report(None).0).collect();
        let mut unique = codes.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), codes.len(), "{codes:?}");
        for e in &ends {
            let (code, line) = e.report(None);
            assert!(line.expect("a line").contains(&format!("exit code {code}")));
        }
        // Both kinds of missing driver share 208, with the device named.
        let (code, line) = SessionEnd::NoFsDriver("--share /a:/b".into()).report(None);
        assert_eq!(code, exit_code::EXEC_NO_DRIVER);
        assert!(line
            .expect("a line")
            .contains("virtio-fs device for --share /a:/b"));
        assert_eq!(
            SessionEnd::Command(ExitStatus::Code(3)).report(None),
            (3, None)
        );
        assert_eq!(
            SessionEnd::Command(ExitStatus::Signal(9)).report(None).0,
            137
        );
        assert_eq!(
            SessionEnd::Command(ExitStatus::TimedOut).report(None).0,
            124
        );
        assert_eq!(
            SessionEnd::Stopped
                .report(Some(GuestEnd::HostSignal(libc::SIGINT)))
                .0,
            130
        );
    }
}
