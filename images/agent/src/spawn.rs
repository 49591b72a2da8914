//! Starting a program: PATH lookup, pipes or a pty, `fork` and `execve`.
//!
//! The agent forks by hand rather than through `std::process::Command` because the reaper
//! thread owns every `waitpid`; std waits for a child whose `exec` failed, which would race it.
//! Everything the child needs (C strings, pointer arrays, the resolved path) is built before
//! `fork`; between `fork` and `execve` the child makes only async-signal-safe system calls.
//! Each program gets a session (and process group) of its own, so a timeout or a signal reaches
//! everything it started.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::reaper::Reaper;

/// `PATH` when neither the exec nor the agent's environment gives one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to start.
#[derive(Debug)]
pub struct SpawnSpec {
    pub argv: Vec<CString>,
    /// The full environment, `KEY=VALUE`.
    pub env: Vec<CString>,
    pub cwd: Option<CString>,
    pub pty: bool,
}

/// A started program: its pid (also its process group and session id) and the agent's ends of
/// its standard streams. With a pty, `stdout` is the terminal's master and `stderr` is `None`.
#[derive(Debug)]
pub struct Child {
    pub pid: i32,
    pub stdin: File,
    pub stdout: File,
    pub stderr: Option<File>,
}

/// Why a program did not start.
#[derive(Debug)]
pub enum SpawnError {
    /// No executable of this name on `PATH` (or the path does not exist): exit code 127.
    NotFound(String),
    /// The program exists but could not be executed: exit code 126.
    NotExecutable(String, std::io::Error),
    /// Setting the program up failed (pipes, pty, fork, cwd).
    Setup(String, std::io::Error),
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpawnError::NotFound(p) => write!(f, "{p}: command not found"),
            SpawnError::NotExecutable(p, e) => write!(f, "{p}: cannot execute: {e}"),
            SpawnError::Setup(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

/// Finds the program `argv0` names, as a shell would: a name with a slash is used as it is,
/// anything else is looked up on `PATH` (from `env`, else the agent's, else a default).
pub fn resolve(argv0: &[u8], env: &[CString]) -> Result<CString, SpawnError> {
    let name = String::from_utf8_lossy(argv0).into_owned();
    if argv0.contains(&b'/') {
        if Path::new(OsStr::from_bytes(argv0)).exists() {
            return CString::new(argv0).map_err(|_| SpawnError::NotFound(name));
        }
        return Err(SpawnError::NotFound(name));
    }
    if argv0.is_empty() {
        return Err(SpawnError::NotFound(name));
    }
    let path = env
        .iter()
        .find_map(|e| e.as_bytes().strip_prefix(b"PATH="))
        .map(|p| OsStr::from_bytes(p).to_owned())
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_else(|| DEFAULT_PATH.into());
    for dir in std::env::split_paths(&path) {
        let candidate: PathBuf = dir.join(OsStr::from_bytes(argv0));
        if let Ok(meta) = std::fs::metadata(&candidate) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return CString::new(candidate.as_os_str().as_bytes())
                    .map_err(|_| SpawnError::NotFound(name));
            }
        }
    }
    Err(SpawnError::NotFound(name))
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn openpty() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two fds; the name, termios and winsize pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    let fds = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&fds.0, &fds.1] {
        // SAFETY: F_SETFD on an fd we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(fds)
}

/// The child's standard streams before fork: (stdin, stdout, stderr) on its side.
struct ChildFds {
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
}

/// Starts `spec` in a new session and registers it with `reaper`.
pub fn spawn(spec: &SpawnSpec, reaper: &Reaper) -> Result<Child, SpawnError> {
    let program = resolve(spec.argv[0].as_bytes(), &spec.env)?;
    let setup = |what: &str| {
        let what = what.to_string();
        move |e| SpawnError::Setup(what, e)
    };
    // Agent and child ends of the streams. The child's ends are dropped (closed in the agent)
    // when this function returns.
    let (agent_stdin, agent_stdout, agent_stderr, child_ends): (_, _, _, Vec<OwnedFd>);
    let fds;
    if spec.pty {
        let (master, slave) = openpty().map_err(setup("openpty"))?;
        let master2 = master.try_clone().map_err(setup("dup pty"))?;
        fds = ChildFds {
            stdin: slave.as_raw_fd(),
            stdout: slave.as_raw_fd(),
            stderr: slave.as_raw_fd(),
        };
        agent_stdin = master;
        agent_stdout = master2;
        agent_stderr = None;
        child_ends = vec![slave];
    } else {
        let (in_r, in_w) = pipe().map_err(setup("pipe"))?;
        let (out_r, out_w) = pipe().map_err(setup("pipe"))?;
        let (err_r, err_w) = pipe().map_err(setup("pipe"))?;
        fds = ChildFds {
            stdin: in_r.as_raw_fd(),
            stdout: out_w.as_raw_fd(),
            stderr: err_w.as_raw_fd(),
        };
        agent_stdin = in_w;
        agent_stdout = out_r;
        agent_stderr = Some(err_r);
        child_ends = vec![in_r, out_w, err_w];
    }
    // The child reports a failed chdir or execve here as (stage, errno); CLOEXEC closes it on
    // a successful execve.
    let (report_r, report_w) = pipe().map_err(setup("pipe"))?;

    let mut argv: Vec<*const libc::c_char> = spec.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = spec.env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let cwd = spec.cwd.as_ref().map(|c| c.as_ptr());

    let pid = {
        let mut state = reaper.lock();
        // SAFETY: the child runs only async-signal-safe calls on memory prepared above, then
        // execve or _exit; the parent continues normally.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: in the child; see child_after_fork.
            unsafe {
                child_after_fork(
                    &fds,
                    spec.pty,
                    cwd,
                    program.as_ptr(),
                    &argv,
                    &envp,
                    report_w.as_raw_fd(),
                )
            }
        }
        if pid < 0 {
            return Err(SpawnError::Setup(
                "fork".into(),
                std::io::Error::last_os_error(),
            ));
        }
        state.watch(pid);
        pid
    };
    reaper.notify_spawned();
    drop(child_ends);
    drop(report_w);

    let mut report = [0u8; 8];
    let got = read_report(&report_r, &mut report);
    if got == report.len() {
        // The child exited without running the program; the reaper collects its status.
        let stage = u32::from_le_bytes([report[0], report[1], report[2], report[3]]);
        let errno = i32::from_le_bytes([report[4], report[5], report[6], report[7]]);
        let err = std::io::Error::from_raw_os_error(errno);
        let _ = reaper.wait_timeout(pid, std::time::Duration::from_secs(5));
        let name = program.to_string_lossy().into_owned();
        return Err(match (stage, errno) {
            (STAGE_CHDIR, _) => SpawnError::Setup(
                format!(
                    "cwd {}",
                    spec.cwd
                        .as_deref()
                        .map(|c| c.to_string_lossy())
                        .unwrap_or_default()
                ),
                err,
            ),
            (STAGE_EXEC, libc::ENOENT) => SpawnError::NotFound(name),
            (STAGE_EXEC, _) => SpawnError::NotExecutable(name, err),
            _ => SpawnError::Setup("child set-up".into(), err),
        });
    }
    Ok(Child {
        pid,
        stdin: File::from(agent_stdin),
        stdout: File::from(agent_stdout),
        stderr: agent_stderr.map(File::from),
    })
}

fn read_report(fd: &OwnedFd, buf: &mut [u8; 8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reads into the unfilled tail of `buf`.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                buf[got..].as_mut_ptr().cast(),
                buf.len() - got,
            )
        };
        if n > 0 {
            got += n as usize;
        } else if n == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
    got
}

const STAGE_SETUP: u32 = 0;
const STAGE_CHDIR: u32 = 1;
const STAGE_EXEC: u32 = 2;

/// Runs in the forked child: new session, standard streams, default signal handling, cwd,
/// then execve. Reports a failure's stage and errno on `report` and exits 127.
///
/// # Safety
/// Must be called only in a freshly forked child; all pointers point at memory the parent
/// prepared before fork and stay valid (the child has a copy of the address space).
unsafe fn child_after_fork(
    fds: &ChildFds,
    pty: bool,
    cwd: Option<*const libc::c_char>,
    program: *const libc::c_char,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    report: RawFd,
) -> ! {
    let fail = |stage: u32| -> ! {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let mut msg = [0u8; 8];
        msg[..4].copy_from_slice(&stage.to_le_bytes());
        msg[4..].copy_from_slice(&errno.to_le_bytes());
        // SAFETY: write and _exit are async-signal-safe; msg is on this stack.
        unsafe {
            libc::write(report, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        }
    };
    // SAFETY: async-signal-safe system calls on fds and memory valid in the child.
    unsafe {
        if libc::setsid() < 0 {
            fail(STAGE_SETUP);
        }
        if pty && libc::ioctl(fds.stdin, libc::TIOCSCTTY as _, 0) < 0 {
            fail(STAGE_SETUP);
        }
        // dup2 clears CLOEXEC on the new descriptor.
        if libc::dup2(fds.stdin, 0) < 0
            || libc::dup2(fds.stdout, 1) < 0
            || libc::dup2(fds.stderr, 2) < 0
        {
            fail(STAGE_SETUP);
        }
        // The agent ignores SIGPIPE (std does) and an ignored signal survives execve.
        for sig in [libc::SIGPIPE, libc::SIGCHLD, libc::SIGINT, libc::SIGTERM] {
            libc::signal(sig, libc::SIG_DFL);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        if let Some(dir) = cwd {
            if libc::chdir(dir) < 0 {
                fail(STAGE_CHDIR);
            }
        }
        libc::execve(program, argv.as_ptr(), envp.as_ptr());
    }
    fail(STAGE_EXEC)
}
