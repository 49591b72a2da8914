//! The virtiofsd processes `skiff exec` starts for `--rootfs` and `--share`, and stops when it
//! ends. Each one dies with skiff (`PR_SET_PDEATHSIG`) if skiff is killed outright, logs to a
//! file in skiff's temporary directory, and is watched so that one dying mid-run ends the run
//! with its own exit code.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Where Debian puts virtiofsd: QEMU's C daemon (Debian 12's qemu-system-common) and the
/// standalone Rust one (the `virtiofsd` package).
const VIRTIOFSD_PATHS: [&str; 2] = ["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"];
/// How long a virtiofsd may take to create its socket.
const START_PATIENCE: Duration = Duration::from_secs(10);

/// Why a virtiofsd is not serving.
#[derive(Debug, Error)]
pub enum VirtiofsdError {
    /// No virtiofsd binary.
    #[error("virtiofsd not found (looked at $SKIFF_VIRTIOFSD and {VIRTIOFSD_PATHS:?}); scripts/setup installs it")]
    NotFound,
    /// It could not be started.
    #[error("cannot start {bin}")]
    Spawn {
        /// The binary.
        bin: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// It exited (before listening, or while the guest used it).
    #[error("virtiofsd for {dir} exited ({status}){log}")]
    Exited {
        /// The shared directory.
        dir: String,
        /// Its exit status.
        status: String,
        /// The last line it logged, if any, prefixed with ": ".
        log: String,
    },
    /// It did not create its socket in time.
    #[error("virtiofsd for {dir} did not create {socket} within {START_PATIENCE:?}")]
    NoSocket {
        /// The shared directory.
        dir: String,
        /// The socket path.
        socket: String,
    },
}

/// The virtiofsd binary to run.
pub fn find_virtiofsd() -> Result<PathBuf, VirtiofsdError> {
    if let Some(p) = std::env::var_os("SKIFF_VIRTIOFSD") {
        let p = PathBuf::from(p);
        return if p.exists() {
            Ok(p)
        } else {
            Err(VirtiofsdError::NotFound)
        };
    }
    VIRTIOFSD_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or(VirtiofsdError::NotFound)
}

/// A running virtiofsd; dropping it stops it.
#[derive(Debug)]
pub struct Virtiofsd {
    child: Child,
    /// The child's pidfd (Linux 5.3 and later): stopping the daemon signals it through this, so
    /// the thread that does so needs no right to signal arbitrary processes (its seccomp filter
    /// allows `pidfd_send_signal`, not `kill`).
    pidfd: Option<OwnedFd>,
    dir: PathBuf,
    log: PathBuf,
}

impl Virtiofsd {
    /// Starts `bin` sharing `dir` on `socket` and waits for the socket to appear. `read_only`
    /// asks the Rust virtiofsd for `--readonly`; QEMU's has no such mode, and the guest mounts
    /// the share read-only either way.
    pub fn start(
        bin: &Path,
        socket: &Path,
        dir: &Path,
        read_only: bool,
        log: &Path,
    ) -> Result<Virtiofsd, VirtiofsdError> {
        let spawn_err = |source| VirtiofsdError::Spawn {
            bin: bin.display().to_string(),
            source,
        };
        let log_file = File::create(log).map_err(spawn_err)?;
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg("-o")
            .arg(format!("source={}", dir.display()))
            .args(["-o", "cache=auto"]);
        // SAFETY: geteuid has no side effects.
        if unsafe { libc::geteuid() } == 0 {
            cmd.args(["-o", "sandbox=chroot"]);
        }
        if read_only && bin.ends_with("libexec/virtiofsd") {
            cmd.arg("--readonly");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(spawn_err)?;
        let pidfd = open_pidfd(child.id());
        let mut me = Virtiofsd {
            child,
            pidfd,
            dir: dir.to_path_buf(),
            log: log.to_path_buf(),
        };
        let start = Instant::now();
        while !socket.exists() {
            if let Some(e) = me.exited() {
                return Err(e);
            }
            if start.elapsed() > START_PATIENCE {
                return Err(VirtiofsdError::NoSocket {
                    dir: dir.display().to_string(),
                    socket: socket.display().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(me)
    }

    /// If the daemon has exited, why.
    pub fn exited(&mut self) -> Option<VirtiofsdError> {
        let status = self.child.try_wait().ok()??;
        let last = std::fs::read_to_string(&self.log)
            .ok()
            .and_then(|t| {
                t.lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .map(str::to_string)
            })
            .map(|l| format!(": {l}"))
            .unwrap_or_default();
        Some(VirtiofsdError::Exited {
            dir: self.dir.display().to_string(),
            status: status.to_string(),
            log: last,
        })
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.signal(libc::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Virtiofsd {
    /// Sends `signal` to the daemon, through its pidfd where there is one.
    fn signal(&self, signal: libc::c_int) {
        match &self.pidfd {
            // SAFETY: pidfd_send_signal with a pidfd we own and no siginfo; no memory effects.
            Some(fd) => unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    signal,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
            },
            // SAFETY: kill has no memory effects; the pid is our child, not yet waited for.
            None => unsafe {
                libc::kill(self.child.id() as libc::pid_t, signal);
            },
        }
    }
}

/// A pidfd for our child `pid`, or `None` where the kernel has no `pidfd_open`.
fn open_pidfd(pid: u32) -> Option<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open returns a new descriptor or -1; it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}
