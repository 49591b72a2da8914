//! Starting and driving a suite's VMs, shared by cold cases (`run.rs`) and fork bases
//! (`fork.rs`): what every case of a run shares (`RunContext`: the skiff binary, the artifact
//! and socket directories, the suite watchdog and the background reaper), the `skiff run`
//! arguments for a VM entry, the VM's `setup` commands through its agent, how a command's end
//! is described in a verdict, `Resume` for a restored VM, and the serial tail quoted when a VM
//! does not come up.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_protocol::{ExitStatus, Message};
use thiserror::Error;

use super::artifacts::Artifacts;
use super::reaper::Reaper;
use super::suite::{AgentKind, VmSpec};
use super::vm_process::{exit_code, VmProcess};
use super::watchdog::Watchdog;
use crate::exec::client::{AgentClient, CommandEnd, CommandSpec, Interrupt};

/// Serial lines quoted in a boot failure.
const SERIAL_TAIL_LINES: usize = 3;

/// Why a VM of the run could not be started or set up.
#[derive(Debug, Error)]
pub enum LaunchError {
    /// The skiff process could not be started (or the watchdog has fired).
    #[error("cannot start skiff")]
    Spawn(#[source] std::io::Error),
    /// An artifact file could not be created.
    #[error("artifact {}", .path.display())]
    Artifact {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A `setup` command did not exit 0; `end` describes how it ended.
    #[error("setup command {argv:?} failed: {end}")]
    Setup { argv: Vec<String>, end: String },
}

/// What every case of a run shares.
#[derive(Debug)]
pub struct RunContext {
    /// The skiff binary to start VMs with.
    pub skiff: PathBuf,
    pub artifacts: Artifacts,
    /// An owner-only directory for vsock and API sockets (short paths).
    pub runtime: PathBuf,
    /// Stop a failing agent case's VM into a snapshot.
    pub snapshot_on_failure: bool,
    /// The suite watchdog: kills every live VM when the whole run outlives its limit.
    pub watchdog: Arc<Watchdog>,
    /// Reaps discarded VMs off the cases' critical path.
    pub reaper: Reaper,
    /// A snapshot or an artifact did not fit: the run exits `NO_SPACE`.
    pub disk_full: AtomicBool,
}

impl RunContext {
    /// Starts `skiff ARGS` (artifacts in `dir`) as a VM the watchdog can kill; refused once the
    /// watchdog has fired.
    pub fn spawn(&self, args: &[OsString], dir: &Path) -> Result<VmProcess, LaunchError> {
        VmProcess::spawn(&self.skiff, args, dir, Some(self.watchdog.live()))
            .map_err(LaunchError::Spawn)
    }

    /// Records that `what` did not fit on its file system, and says so in one `skiff:` line
    /// (the first time only: one full disk, one line). Not once the watchdog has fired (its
    /// kills cut writes short).
    pub fn report_disk_full(&self, what: &str) {
        if self.watchdog.expired() {
            return;
        }
        if !self.disk_full.swap(true, Ordering::SeqCst) {
            eprintln!("skiff: {what}");
        }
    }
}

/// Whether an error text is the OS's "no space" (`ENOSPC`, `EDQUOT`), as Rust's `io::Error`
/// prints it.
pub fn says_no_space(text: &str) -> bool {
    ["(os error 28)", "(os error 122)", "No space left on device"]
        .iter()
        .any(|needle| text.contains(needle))
}

/// `; serial: A | B | C` with the log's last lines, or nothing.
pub fn serial_tail(log: &Path) -> String {
    let Ok(bytes) = std::fs::read(log) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = &lines[lines.len().saturating_sub(SERIAL_TAIL_LINES)..];
    format!("; serial: {}", tail.join(" | "))
}

/// `skiff run` arguments for `vm` with its agent on `socket` (no agent: none) and the serial
/// console in `serial`.
pub fn vm_args(vm: &VmSpec, socket: &Path, serial: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["run".into(), "--kernel".into(), vm.kernel.clone().into()];
    if let Some(initrd) = &vm.initrd {
        args.extend(["--initrd".into(), initrd.clone().into()]);
    }
    if let Some(cpus) = vm.cpus {
        args.extend(["--cpus".into(), cpus.to_string().into()]);
    }
    if let Some(memory) = &vm.memory {
        args.extend(["--memory".into(), memory.into()]);
    }
    for disk in &vm.disks {
        let mut spec = OsString::from("path=");
        spec.push(&disk.path);
        if disk.readonly {
            spec.push(",readonly=on");
        }
        args.extend(["--disk".into(), spec]);
    }
    for net in &vm.net {
        args.extend(["--net".into(), net.into()]);
    }
    let mut serial_arg = OsString::from("file=");
    serial_arg.push(serial);
    args.extend(["--serial".into(), serial_arg]);
    let mut cmdline = vm.cmdline.clone();
    if vm.agent != AgentKind::None {
        let mut vsock = OsString::from("cid=3,socket=");
        vsock.push(socket);
        args.extend(["--vsock".into(), vsock]);
    }
    match vm.agent {
        AgentKind::Testguest => cmdline = format!("{cmdline} agent-listen").trim().to_string(),
        AgentKind::Linux => args.push("--agent".into()),
        AgentKind::None => {}
    }
    if !cmdline.is_empty() {
        args.extend(["--cmdline".into(), cmdline.into()]);
    }
    args
}

/// An exec of `argv` with `timeout`, no environment, no stdin.
pub fn spec(argv: &[String], timeout: Option<Duration>) -> CommandSpec {
    CommandSpec {
        argv: argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env: Vec::new(),
        cwd: Vec::new(),
        timeout,
        forward_stdin: false,
    }
}

/// How a command ended, in words for a verdict (for a lost connection, with how the VM ended).
pub fn describe(end: &CommandEnd, vm: &mut VmProcess) -> String {
    match end {
        CommandEnd::Exit(ExitStatus::Code(c)) => format!("exit {c}"),
        CommandEnd::Exit(ExitStatus::Signal(s)) => format!("killed by signal {s}"),
        CommandEnd::Exit(ExitStatus::TimedOut) => "timed out".into(),
        CommandEnd::NotStarted(m) => format!("not started: {m}"),
        CommandEnd::Interrupted(i) => {
            // A lost connection is usually the VM ending: give it a moment to say how.
            let ended = vm.wait_until(Instant::now() + Duration::from_millis(500));
            let how = match i {
                Interrupt::Stopped => "no answer".to_string(),
                Interrupt::Lost(m) => format!("agent lost: {m}"),
                Interrupt::Garbage(m) => format!("agent protocol broken: {m}"),
            };
            match ended {
                Some(s) => format!("{how}; the VM ended (skiff exit {})", exit_code(s)),
                None => how,
            }
        }
    }
}

/// Runs the VM's setup commands, each of which must exit 0.
pub fn run_setup(
    client: &mut AgentClient,
    vm: &VmSpec,
    dir: &Path,
    transcript: &mut std::fs::File,
    proc: &mut VmProcess,
) -> Result<(), LaunchError> {
    let create = |path: PathBuf| {
        std::fs::File::create(&path).map_err(|source| LaunchError::Artifact { path, source })
    };
    for (n, argv) in vm.setup.iter().enumerate() {
        let mut out = create(dir.join(format!("setup-{n}.stdout")))?;
        let mut err = create(dir.join(format!("setup-{n}.stderr")))?;
        let _ = writeln!(transcript, "-> Exec {argv:?} (setup)");
        let end = client.run(
            &spec(argv, Some(vm.boot_timeout)),
            &mut out,
            &mut err,
            || proc.ended().is_some(),
        );
        let what = describe(&end, proc);
        let _ = writeln!(transcript, "<- {what}");
        if end != CommandEnd::Exit(ExitStatus::Code(0)) {
            return Err(LaunchError::Setup {
                argv: argv.clone(),
                end: what,
            });
        }
    }
    Ok(())
}

/// 32 bytes from `/dev/urandom` (none if it cannot be read: the guest keeps its pool).
fn entropy() -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0u8; 32];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)) {
        Ok(()) => buf,
        Err(_) => Vec::new(),
    }
}

/// Tells a restored VM's agent to resume: the wall clock now and fresh entropy.
pub fn resume(client: &mut AgentClient, proc: &mut VmProcess) -> Result<(), Interrupt> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let seed = entropy();
    client.request_done(
        &Message::Resume {
            unix_time_ns: now,
            entropy: &seed,
        },
        || proc.ended().is_some(),
    )
}
