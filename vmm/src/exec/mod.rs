//! `skiff exec`: boot a kernel with skiff's initramfs (the embedded guest agent), run one
//! command in the guest through the agent, stream its output, and exit with its status.
//!
//! The run, in order: a private temporary directory; virtiofsd for `--rootfs` and each
//! `--share`; the initramfs; a listener on the vsock device's `PATH_1024` (the agent connects
//! out to the host's port 1024); the VM, run on this thread; and on a thread of its own the
//! session that waits for the agent, runs the command and stops the VM when it has the
//! answer. Everything is removed on the way out, whatever happened.
//!
//! - `cpio`: the newc archive writer.
//! - `initramfs`: the embedded agent and the archive skiff boots.
//! - `client`: the host side of the agent protocol.
//! - `ctl`: `skiff ctl exec`, through the agent of a `skiff run --agent` VM.
//! - `from_snapshot`: `skiff exec --snapshot`, a restored VM whose agent already listens.
//! - `session`: waiting for the agent and running the command, with the run's end as a value.
//! - `virtiofsd`: the file-sharing daemons.

pub mod client;
pub mod cpio;
pub mod ctl;
mod from_snapshot;
pub mod initramfs;
mod session;
pub mod virtiofsd;
mod vsock_connect;

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use devices::vhost_user::{VhostUserConfig, VhostUserKind};

use crate::config::{
    parse_cpus, parse_timeout, MemoryArg, RngConfig, SerialConfig, VmConfig, VsockConfig,
    DEFAULT_CMDLINE, DEFAULT_MEMORY,
};
use crate::exit_code;
use crate::memory::backing::BackingKind;
use crate::memory::MemoryConfig;
use session::{AgentLink, Session, SessionEnd};
use virtiofsd::{find_virtiofsd, Virtiofsd};

/// The guest CID `skiff exec` gives its VM.
const GUEST_CID: u64 = 3;
/// The virtio-fs tag of `--rootfs`.
const ROOT_TAG: &str = "skiffroot";
/// How long `skiff exec` waits for the agent by default.
const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Why an `exec` argument or the agent's initramfs is refused.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// `--rootfs` with an empty value.
    #[error("--rootfs: expected host or a directory")]
    EmptyRootfs,
    /// `--share` without a `:`.
    #[error("--share {0}: expected HOSTDIR:GUESTDIR")]
    ShareForm(String),
    /// `--share` with an empty host directory.
    #[error("--share {0}: empty host directory")]
    ShareHost(String),
    /// `--share` with a guest directory the kernel command line cannot carry.
    #[error("--share {0}: the guest directory must be absolute, without spaces or quotes")]
    ShareGuest(String),
    /// The run's temporary directory could not be created.
    #[error("cannot create {}", .path.display())]
    RunDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The temporary directory's path leaves no room for a vsock socket name.
    #[error(
        "temporary directory {} is too long for a Unix socket path; set TMPDIR shorter",
        .0.display()
    )]
    RunDirTooLong(PathBuf),
    /// The agent's initramfs could not be written.
    #[error(transparent)]
    Initramfs(#[from] initramfs::InitramfsError),
}

/// `skiff exec` options.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// Kernel image: an ELF vmlinux (PVH) or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present = "snapshot")]
    pub kernel: Option<PathBuf>,
    /// Restore this snapshot of a VM whose agent listens on vsock port 1024 (made with `skiff
    /// run --agent --vsock ... --api-socket S` and `skiff ctl --api-socket S snapshot DIR
    /// --stop`) copy-on-write instead of booting, run the command in it, and discard it.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["kernel", "initrd", "cmdline", "cpus", "memory", "boot_timeout", "rootfs", "shares"]
    )]
    pub snapshot: Option<PathBuf>,
    /// An initramfs appended to skiff's (which holds the agent).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command-line arguments, after skiff's own.
    #[arg(long, value_name = "STRING", default_value = "")]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_cpus)]
    pub cpus: u32,
    /// Guest RAM, as for `skiff run` (default 256M).
    #[arg(
        long,
        value_name = "SPEC",
        help = "Guest RAM: size=SIZE[,file=PATH][,hugepages=on][,prealloc=on] (default 256M)"
    )]
    pub memory: Option<MemoryArg>,
    /// The command's time limit in seconds; when it expires the command's process group is
    /// killed and skiff exits 124.
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    /// How long to wait for the guest agent to connect (default 120).
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    pub boot_timeout: Option<Duration>,
    /// The guest's root: `host` shares this host's `/` read-only, a directory shares that
    /// directory; the guest writes to a tmpfs overlay above it. Without it the command runs in
    /// the initramfs.
    #[arg(long, value_name = "host|DIR")]
    pub rootfs: Option<RootfsArg>,
    /// Share a host directory writable at a guest path (repeatable).
    #[arg(long = "share", value_name = "HOSTDIR:GUESTDIR")]
    pub shares: Vec<ShareArg>,
    /// The command's working directory in the guest (default: skiff's own with `--rootfs host`,
    /// else the agent's).
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<PathBuf>,
    /// Set an environment variable for the command (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Keep the guest's serial console in this file (default: a temporary file, whose last
    /// lines are shown when the run fails).
    #[arg(long, value_name = "PATH")]
    pub serial_log: Option<PathBuf>,
    /// Per-thread seccomp filters, as for `skiff run`: on (a forbidden system call ends skiff
    /// with exit code 159), log (allowed, logged by the kernel), off.
    #[arg(long, value_name = "MODE", default_value = "on")]
    pub seccomp: crate::sandbox::SeccompMode,
    /// The command and its arguments.
    #[arg(required = true, last = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// `--rootfs host|DIR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootfsArg {
    /// This host's `/`.
    Host,
    /// A directory.
    Dir(PathBuf),
}

impl FromStr for RootfsArg {
    type Err = ExecError;

    fn from_str(s: &str) -> Result<Self, ExecError> {
        match s {
            "" => Err(ExecError::EmptyRootfs),
            "host" => Ok(Self::Host),
            dir => Ok(Self::Dir(PathBuf::from(dir))),
        }
    }
}

/// `--share HOSTDIR:GUESTDIR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareArg {
    /// The host directory.
    pub host: PathBuf,
    /// Where the guest mounts it (absolute, no whitespace, since it travels on the kernel
    /// command line).
    pub guest: String,
}

impl FromStr for ShareArg {
    type Err = ExecError;

    fn from_str(s: &str) -> Result<Self, ExecError> {
        let (host, guest) = s
            .rsplit_once(':')
            .ok_or_else(|| ExecError::ShareForm(s.to_string()))?;
        if host.is_empty() {
            return Err(ExecError::ShareHost(s.to_string()));
        }
        if !guest.starts_with('/') || guest.chars().any(|c| c.is_whitespace() || c == '"') {
            return Err(ExecError::ShareGuest(s.to_string()));
        }
        Ok(Self {
            host: PathBuf::from(host),
            guest: guest.to_string(),
        })
    }
}

/// A failure before the command could run, as a code and a line.
struct Failure(u8, String);

/// Runs `skiff exec` and returns the process exit code.
pub fn run(args: ExecArgs) -> ExitCode {
    match run_inner(args) {
        Ok(code) => ExitCode::from(code),
        Err(Failure(code, line)) => {
            eprintln!("skiff: {line}");
            ExitCode::from(code)
        }
    }
}

fn setup_failed(line: impl Into<String>) -> Failure {
    Failure(
        exit_code::EXEC_SETUP,
        format!("{} (exit code {})", line.into(), exit_code::EXEC_SETUP),
    )
}

fn virtiofsd_failed(e: virtiofsd::VirtiofsdError) -> Failure {
    Failure(
        exit_code::EXEC_VIRTIOFSD,
        format!(
            "{} (exit code {})",
            crate::error_chain(&e),
            exit_code::EXEC_VIRTIOFSD
        ),
    )
}

/// `--env` entries as bytes, each checked to be `KEY=VALUE`.
fn env_entries(env: &[String]) -> Result<Vec<Vec<u8>>, Failure> {
    env.iter()
        .map(|e| {
            if e.split_once('=').is_some_and(|(k, _)| !k.is_empty()) {
                Ok(e.as_bytes().to_vec())
            } else {
                Err(setup_failed(format!("--env {e}: expected KEY=VALUE")))
            }
        })
        .collect()
}

fn run_inner(args: ExecArgs) -> Result<u8, Failure> {
    let env = env_entries(&args.env)?;
    if let Some(dir) = &args.snapshot {
        return from_snapshot::run(&args, dir, env);
    }
    let Some(kernel) = args.kernel.clone() else {
        return Err(setup_failed("--kernel or --snapshot is needed"));
    };
    if !kernel.is_file() {
        return Err(setup_failed(format!(
            "kernel {}: not a readable file",
            kernel.display()
        )));
    }
    let root_dir = match &args.rootfs {
        None => None,
        Some(RootfsArg::Host) => Some(PathBuf::from("/")),
        Some(RootfsArg::Dir(d)) if d.is_dir() => Some(d.clone()),
        Some(RootfsArg::Dir(d)) => {
            return Err(setup_failed(format!(
                "--rootfs {}: not a directory",
                d.display()
            )))
        }
    };
    for share in &args.shares {
        if !share.host.is_dir() {
            return Err(setup_failed(format!(
                "--share {}: not a directory",
                share.host.display()
            )));
        }
    }

    let run_dir = RunDir::create().map_err(|e| setup_failed(crate::error_chain(&e)))?;
    let serial_log = args
        .serial_log
        .clone()
        .unwrap_or_else(|| run_dir.path.join("serial.log"));

    // File sharing first: a missing or failing virtiofsd stops the run before the VM exists.
    let mut daemons = Vec::new();
    let mut vhost_user = Vec::new();
    let mut cmdline = format!("{DEFAULT_CMDLINE} rdinit={}", initramfs::AGENT_PATH);
    let mut shared: Vec<(&Path, String, bool, Option<&str>)> = Vec::new();
    if let Some(dir) = &root_dir {
        shared.push((dir, ROOT_TAG.to_string(), true, None));
    }
    for (i, share) in args.shares.iter().enumerate() {
        shared.push((
            &share.host,
            format!("skiffshare{i}"),
            false,
            Some(&share.guest),
        ));
    }
    if !shared.is_empty() {
        let bin = find_virtiofsd().map_err(virtiofsd_failed)?;
        for (i, (dir, tag, read_only, guest)) in shared.iter().enumerate() {
            let socket = run_dir.path.join(format!("fs{i}"));
            let log = run_dir.path.join(format!("virtiofsd{i}.log"));
            let daemon =
                Virtiofsd::start(&bin, &socket, dir, *read_only, &log).map_err(virtiofsd_failed)?;
            daemons.push(daemon);
            let mut cfg = VhostUserConfig::new(VhostUserKind::Fs, socket);
            cfg.tag = Some(tag.clone());
            vhost_user.push(cfg);
            match guest {
                None => cmdline.push_str(&format!(" skiff.root={tag}")),
                Some(g) => cmdline.push_str(&format!(" skiff.share={tag}:{g}")),
            }
        }
    }
    if !args.cmdline.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&args.cmdline);
    }

    let initrd = run_dir.path.join("initramfs.cpio");
    initramfs::write_initramfs(&initrd, args.initrd.as_deref())
        .map_err(|e| setup_failed(crate::error_chain(&e)))?;

    let vsock_socket = run_dir.path.join("v");
    let listener_path = PathBuf::from(format!(
        "{}_{}",
        vsock_socket.display(),
        agent_protocol::AGENT_PORT
    ));
    let listener = UnixListener::bind(&listener_path)
        .map_err(|e| setup_failed(format!("cannot listen on {}: {e}", listener_path.display())))?;

    let cfg = VmConfig {
        kernel,
        initrd: Some(initrd),
        cmdline,
        cpus: args.cpus,
        memory: args
            .memory
            .as_ref()
            .map(|m| m.0.clone())
            .unwrap_or(MemoryConfig {
                size: DEFAULT_MEMORY,
                backing: BackingKind::Memfd,
                prealloc: false,
                shared_with_snapshot: false,
            }),
        serial: SerialConfig::File(serial_log.clone()),
        timeout: None,
        disks: Vec::new(),
        nets: Vec::new(),
        console: false,
        rngs: RngConfig::repeated(1),
        vhost_user,
        vsock: Some(VsockConfig {
            cid: GUEST_CID,
            socket: vsock_socket,
        }),
    };
    // The VM's threads get their seccomp filters as under `skiff run` (no Landlock here: the
    // run directory skiff removes at the end lies outside anything it could be confined to).
    let sandbox = crate::sandbox::SandboxArgs {
        seccomp: args.seccomp,
        sandbox: false,
        sandbox_allow: Vec::new(),
    };
    crate::sandbox::init(&sandbox).map_err(|e| setup_failed(crate::error_chain(&e)))?;
    let vm = crate::builder::build_vm(&cfg).map_err(|e| setup_failed(crate::error_chain(&e)))?;
    let exit = vm.exit.clone();

    let cwd = match (&args.cwd, &args.rootfs) {
        (Some(dir), _) => dir.as_os_str().as_bytes().to_vec(),
        (None, Some(RootfsArg::Host)) => std::env::current_dir()
            .map(|d| d.as_os_str().as_bytes().to_vec())
            .unwrap_or_default(),
        (None, _) => Vec::new(),
    };
    let session = Session {
        link: AgentLink::Listen(listener),
        exit: exit.clone(),
        boot_timeout: args.boot_timeout.unwrap_or(DEFAULT_BOOT_TIMEOUT),
        serial_log: serial_log.clone(),
        spec: command_spec(&args, env, cwd),
        daemons,
    };
    let opts = crate::runner::RunOptions {
        serial: SerialConfig::File(serial_log.clone()),
        timeout: None,
        api_socket: None,
        description: crate::snapshot::manifest::VmDescription::from_config(&cfg),
        // Without Landlock (see above) the main thread gets its seccomp filter only.
        sandbox_paths: crate::sandbox::SandboxPaths::default(),
    };
    run_session(vm, &opts, session, &serial_log, run_dir)
}

/// The command as the agent gets it.
fn command_spec(args: &ExecArgs, env: Vec<Vec<u8>>, cwd: Vec<u8>) -> client::CommandSpec {
    client::CommandSpec {
        argv: args.command.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env,
        cwd,
        timeout: args.timeout,
        forward_stdin: !std::io::IsTerminal::is_terminal(&std::io::stdin()),
    }
}

/// Runs the VM on this thread and `session` on its own, then reports: the exit code, after
/// one `skiff:` line (and the console's tail) for skiff's own failures. `run_dir` goes last.
fn run_session(
    vm: crate::builder::BuiltVm,
    opts: &crate::runner::RunOptions,
    session: Session,
    serial_log: &Path,
    run_dir: RunDir,
) -> Result<u8, Failure> {
    let exit = session.exit.clone();
    // Stop signals are taken by the VM's loop through a signalfd, so no thread may leave them
    // unblocked; the session thread inherits this mask.
    crate::event_loop::block_stop_signals()
        .map_err(|e| setup_failed(format!("cannot block stop signals: {e}")))?;
    let session_thread = std::thread::Builder::new()
        .name("exec-session".into())
        .spawn(move || {
            crate::sandbox::confine_thread_or_exit(crate::sandbox::ThreadKind::ExecSession);
            session.run()
        })
        .map_err(|e| setup_failed(format!("cannot start the session thread: {e}")))?;

    let outcome = crate::runner::run_vm(vm, opts);
    // The VM has ended; the session notices (if it has not already finished) and returns.
    exit.request(devices::vm_exit::GuestEnd::Stopped);
    let (end, daemons) = session_thread.join().unwrap_or((
        SessionEnd::Internal("the session thread panicked".into()),
        Vec::new(),
    ));
    drop(daemons);
    let guest_end = match outcome {
        Ok(o) => {
            let end = o.end;
            o.teardown.detach();
            Some(end)
        }
        Err(e) => {
            eprintln!("skiff: {}", crate::error_chain(&e));
            None
        }
    };
    let (code, line) = end.report(guest_end);
    if let Some(line) = line {
        eprintln!("skiff: {line}");
        if end.wants_serial_tail() {
            print_serial_tail(serial_log);
        }
    }
    drop(run_dir);
    Ok(code)
}

/// The kernel arguments that make the agent PID 1 and have it listen on vsock port 1024
/// (`skiff run --agent`).
pub fn agent_listen_cmdline() -> String {
    format!(
        "rdinit={} skiff.agent=vsock:{}",
        initramfs::AGENT_PATH,
        agent_protocol::AGENT_PORT
    )
}

/// The initramfs of `skiff run --agent` in a temporary directory that lives as long as this.
#[derive(Debug)]
pub struct AgentInitrd {
    dir: RunDir,
}

impl AgentInitrd {
    /// Writes the agent's initramfs, with `user_initrd` appended.
    pub fn create(user_initrd: Option<&Path>) -> Result<AgentInitrd, ExecError> {
        let dir = RunDir::create()?;
        let me = AgentInitrd { dir };
        initramfs::write_initramfs(&me.path(), user_initrd)?;
        Ok(me)
    }

    /// The initramfs file.
    pub fn path(&self) -> PathBuf {
        self.dir.path.join("initramfs.cpio")
    }
}

/// How many serial lines a failure shows.
const SERIAL_TAIL_LINES: usize = 12;

fn print_serial_tail(path: &Path) {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(SERIAL_TAIL_LINES);
    if lines.is_empty() {
        eprintln!("skiff: (the serial console is empty)");
        return;
    }
    eprintln!("skiff: last lines of the serial console:");
    for line in &lines[start..] {
        eprintln!("  {line}");
    }
}

/// The run's private temporary directory (owner-only), removed with everything in it on drop.
#[derive(Debug)]
struct RunDir {
    path: PathBuf,
}

impl RunDir {
    fn create() -> Result<RunDir, ExecError> {
        let base = std::env::temp_dir();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = base.join(format!("skiff-exec-{}-{nanos:x}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| ExecError::RunDir {
                path: path.clone(),
                source,
            })?;
        let dir = RunDir { path };
        // The vsock device appends `_PORT` to its socket path, and a Unix socket path holds
        // at most 107 bytes.
        let longest = dir.path.join("v_4294967295");
        if longest.as_os_str().len() > 107 {
            return Err(ExecError::RunDirTooLong(dir.path.clone()));
        }
        Ok(dir)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_and_rootfs_arguments() {
        let s: ShareArg = "/a/b:/mnt/x".parse().unwrap();
        assert_eq!(s.host, PathBuf::from("/a/b"));
        assert_eq!(s.guest, "/mnt/x");
        assert!("/a:relative".parse::<ShareArg>().is_err());
        assert!("/a:/with space".parse::<ShareArg>().is_err());
        assert!(":/x".parse::<ShareArg>().is_err());
        assert!("nocolon".parse::<ShareArg>().is_err());
        assert_eq!("host".parse::<RootfsArg>().unwrap(), RootfsArg::Host);
        assert_eq!(
            "/srv".parse::<RootfsArg>().unwrap(),
            RootfsArg::Dir("/srv".into())
        );
        assert!("".parse::<RootfsArg>().is_err());
    }
}
