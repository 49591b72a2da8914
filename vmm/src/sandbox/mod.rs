//! The sandbox: what each skiff thread may do once the VM is set up.
//!
//! - `seccomp`: one seccomp filter per [`ThreadKind`], compiled from the allow-lists in `allow/`
//!   (one file per kind) when the kind's first thread starts, installed by each thread on itself.
//! - `sigsys`: the `SIGSYS` handler that turns a forbidden system call into one `skiff:` line
//!   naming the thread kind and the call, and exit code 159.
//! - `caps`: empties the bounding set once per process in [`init`], and every thread's own
//!   capabilities once set-up (taps, files) is done.
//! - `fds`: closes inherited descriptors at start.
//! - `landlock`: `--sandbox`, confining file-system access to the paths the VM was given.
//!
//! Every thread calls [`confine_thread`] first thing (devices through
//! `devices::thread_kind::enter`, which [`init`] points here); the main thread calls it for
//! [`ThreadKind::EventLoop`] once the VM is built and its vCPUs run. The order inside is
//! Landlock, capabilities, then seccomp (the filters do not allow the calls the first two make).
//! This module does not decide what is opened; it only takes away what is not needed after.

mod allow;
mod caps;
pub mod fds;
mod landlock;
mod seccomp;
mod sigsys;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use devices::thread_kind::ThreadKind;
use thiserror::Error;

pub use self::landlock::{LandlockError, SandboxPaths};
use crate::config::{SerialConfig, VmConfig};
use crate::memory::backing::BackingKind;

/// Environment variable naming a thread kind that makes one forbidden system call right after
/// it installs its filter (tests check that each kind's filter stops it). Honoured only with
/// `--seccomp on`, so the call never runs unfiltered; the call it makes (`personality(0xffffffff)`,
/// a query) changes nothing even if it did.
pub const FORBIDDEN_SYSCALL_TRIGGER: &str = "SKIFF_TEST_FORBIDDEN_SYSCALL";

/// `--seccomp`: what a system call outside a thread's allow-list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SeccompMode {
    /// Forbidden: skiff prints one line naming the thread and the call, and exits with 159.
    #[default]
    On,
    /// Allowed, and logged by the kernel (audit log or `dmesg`): for finding what a filter lacks.
    Log,
    /// No filter.
    Off,
}

/// How to confine this process (`--seccomp`, `--sandbox`, `--sandbox-allow`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SandboxArgs {
    /// Per-thread seccomp filters: on (a forbidden system call ends skiff with exit code 159),
    /// log (allowed, logged by the kernel), off.
    #[arg(long, value_name = "MODE", default_value = "on")]
    pub seccomp: SeccompMode,
    /// Confine file-system access (Landlock) to the paths the VM was given, its API socket's
    /// directory and the --sandbox-allow directories.
    #[arg(long)]
    pub sandbox: bool,
    /// With --sandbox: a directory (and everything under it) skiff may read and write, e.g.
    /// where snapshots go (repeatable).
    #[arg(long = "sandbox-allow", value_name = "DIR", requires = "sandbox")]
    pub sandbox_allow: Vec<PathBuf>,
}

impl SandboxPaths {
    /// What a VM started by `skiff run` may reach: its kernel, initrd, disks, memory and serial
    /// files, its API socket's directory and the `--sandbox-allow` directories.
    pub fn for_run(cfg: &VmConfig, api_socket: Option<&Path>, allow: &[PathBuf]) -> Self {
        let mut paths = Self::for_any(&cfg.serial, api_socket, allow);
        paths.read_files.push(cfg.kernel.clone());
        paths.read_files.extend(cfg.initrd.iter().cloned());
        for disk in &cfg.disks {
            if disk.readonly {
                paths.read_files.push(disk.path.clone());
            } else {
                paths.write_files.push(disk.path.clone());
            }
        }
        if let BackingKind::File(path) = &cfg.memory.backing {
            paths.write_files.push(path.clone());
        }
        // The vsock listener is removed at exit (connecting to `PATH_P` is no file access to
        // Landlock below ABI 9).
        if let Some(vsock) = &cfg.vsock {
            paths.socket_dirs.push(socket_dir(&vsock.socket));
        }
        paths
    }

    /// What a VM restored from `snapshot` may reach: the snapshot (read), its serial file, its
    /// API socket's directory and the `--sandbox-allow` directories.
    pub fn for_restore(
        snapshot: &Path,
        serial: &SerialConfig,
        api_socket: Option<&Path>,
        allow: &[PathBuf],
    ) -> Self {
        let mut paths = Self::for_any(serial, api_socket, allow);
        paths.read_dirs.push(snapshot.to_path_buf());
        paths
    }

    fn for_any(serial: &SerialConfig, api_socket: Option<&Path>, allow: &[PathBuf]) -> Self {
        let mut paths = Self::default();
        if let SerialConfig::File(path) = serial {
            paths.write_files.push(path.clone());
        }
        if let Some(dir) = api_socket.map(socket_dir) {
            paths.socket_dirs.push(dir);
        }
        paths.write_dirs.extend(allow.iter().cloned());
        // A snapshot is sealed with this user's key, read (or created) when it is written.
        if let Some(dir) = crate::snapshot::auth::default_key_path()
            .ok()
            .and_then(|key| key.parent().map(Path::to_path_buf))
            .filter(|dir| dir.is_dir())
        {
            paths.write_dirs.push(dir);
        }
        paths
    }
}

/// The directory a socket path sits in (`.` for a bare name).
fn socket_dir(socket: &Path) -> PathBuf {
    match socket.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Errors from setting up the sandbox.
#[derive(Debug, Error)]
pub enum SandboxError {
    /// `prctl(PR_SET_NO_NEW_PRIVS)` failed.
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] std::io::Error),
    /// A filter could not be compiled (a bug in an allow-list).
    #[error("cannot build the seccomp filter for {kind} threads: {message}")]
    Filter {
        /// The thread kind.
        kind: &'static str,
        /// What seccompiler said.
        message: String,
    },
    /// The `SIGSYS` handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Sigsys(#[source] std::io::Error),
    /// Dropping capabilities failed.
    #[error("cannot drop capabilities")]
    Caps(#[source] std::io::Error),
    /// Installing a filter failed.
    #[error("cannot install the seccomp filter for the {kind} thread: {message}")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// What seccompiler said.
        message: String,
    },
    /// Landlock set-up failed.
    #[error(transparent)]
    Landlock(#[from] LandlockError),
}

/// What [`init`] decided, read by every thread's [`confine_thread`].
#[derive(Debug)]
struct Settings {
    mode: SeccompMode,
    trigger: Option<ThreadKind>,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Sets the process up before any thread starts: no_new_privs, an empty capability bounding
/// set (inherited by every thread started later), the filters' mode, the
/// `SIGSYS` handler, the hook devices' threads call, and (with `--sandbox`) an empty Landlock
/// ruleset that threads started during set-up confine themselves with. Call once, from the main
/// thread, before building the VM.
pub fn init(args: &SandboxArgs) -> Result<(), SandboxError> {
    set_no_new_privs()?;
    // Once here, before the VM's threads start (they inherit the empty set), instead of once
    // in every thread. The effective and permitted sets stay until each thread is confined:
    // set-up (taps) still needs them.
    caps::drop_bounding_set_for_process().map_err(SandboxError::Caps)?;
    if args.seccomp != SeccompMode::Off {
        seccomp::set_mode(args.seccomp);
        sigsys::install().map_err(SandboxError::Sigsys)?;
    }
    if args.sandbox {
        landlock::init()?;
    }
    let trigger = match args.seccomp {
        SeccompMode::On => std::env::var(FORBIDDEN_SYSCALL_TRIGGER)
            .ok()
            .and_then(|name| ThreadKind::from_name(&name)),
        _ => None,
    };
    let _ = SETTINGS.set(Settings {
        mode: args.seccomp,
        trigger,
    });
    devices::thread_kind::set_hook(confine_thread_or_exit);
    Ok(())
}

/// Called once the VM is built (taps made, files open), on the main thread before its event
/// loop runs: adds the VM's paths to the Landlock ruleset (with `--sandbox`) and confines the
/// main thread as [`ThreadKind::EventLoop`].
pub fn confine_main_thread(paths: &SandboxPaths) -> Result<(), SandboxError> {
    landlock::add_paths(paths)?;
    confine_thread(ThreadKind::EventLoop)
}

/// Confines the calling thread as a `kind` thread: Landlock (with `--sandbox`), no
/// capabilities, then its seccomp filter. Does nothing before [`init`].
pub fn confine_thread(kind: ThreadKind) -> Result<(), SandboxError> {
    let Some(settings) = SETTINGS.get() else {
        return Ok(());
    };
    landlock::restrict_thread()?;
    caps::drop_all().map_err(SandboxError::Caps)?;
    if settings.mode != SeccompMode::Off {
        sigsys::set_thread_kind(kind);
        seccomp::apply(kind)?;
    }
    if settings.trigger == Some(kind) {
        seccomp::make_forbidden_call();
    }
    Ok(())
}

/// [`confine_thread`] for threads that cannot return an error: a thread must never go on
/// unconfined, so a failure ends the process with one line.
pub fn confine_thread_or_exit(kind: ThreadKind) {
    if let Err(e) = confine_thread(kind) {
        eprintln!("skiff: {}", crate::error_chain(&e));
        std::process::exit(i32::from(crate::exit_code::VMM_ERROR));
    }
}

/// Compiles the teardown process's filter; call before `fork`, so the child allocates nothing.
pub fn prepare_teardown() -> Result<(), SandboxError> {
    match SETTINGS.get() {
        Some(settings) if settings.mode != SeccompMode::Off => {
            seccomp::prepare(ThreadKind::Teardown)
        }
        _ => Ok(()),
    }
}

/// The teardown process's confinement, right after `fork`: only async-signal-safe calls (the
/// filter was compiled by [`prepare_teardown`]; installing it is two system calls). Without a
/// compiled filter the child leaves at once: it must not run unconfined.
pub fn confine_teardown_process() {
    let Some(settings) = SETTINGS.get() else {
        return;
    };
    if settings.mode == SeccompMode::Off {
        return;
    }
    sigsys::set_thread_kind(ThreadKind::Teardown);
    if seccomp::apply_prepared(ThreadKind::Teardown).is_err() {
        // SAFETY: leaves the forked child at once; nothing of the parent's is run.
        unsafe { libc::_exit(i32::from(crate::exit_code::VMM_ERROR)) };
    }
    if settings.trigger == Some(ThreadKind::Teardown) {
        seccomp::make_forbidden_call();
    }
}

fn set_no_new_privs() -> Result<(), SandboxError> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SandboxError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    Ok(())
}
