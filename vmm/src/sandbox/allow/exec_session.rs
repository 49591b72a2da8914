//! `skiff exec`'s session thread: it accepts the guest agent's vsock connection on a Unix
//! listener, speaks the agent protocol over it, streams the command's output to stdout and
//! stderr, forwards stdin (from a thread it starts, which runs under this filter), watches the
//! serial log for the kernel's `Run /init` (opened read-only by path) and asks whether a
//! virtiofsd child has exited (`wait4` without blocking). It never signals a process: the
//! virtiofsd children are stopped by the main thread after the VM, through their pidfds.

use seccompiler::BackendError;

use super::{common, AllowList};

pub(super) fn add(list: &mut AllowList) -> Result<(), BackendError> {
    list.calls(&[
        libc::SYS_accept4,
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
        libc::SYS_poll,
        libc::SYS_ppoll,
        // The serial log and a virtiofsd's log, read-only (the open flags are checked below).
        libc::SYS_lseek,
        libc::SYS_fstat,
        libc::SYS_statx,
        libc::SYS_newfstatat,
        // Has a virtiofsd child exited (WNOHANG)?
        libc::SYS_wait4,
        libc::SYS_getrandom,
    ]);
    // Read-only opens only: the flag word must be exactly std's `File::open` flags.
    list.call_if_arg(
        libc::SYS_openat,
        2,
        &[libc::O_RDONLY as u64 | libc::O_CLOEXEC as u64],
    )?;
    // std's `set_nonblocking` on the agent's stream.
    list.call_if_arg(libc::SYS_ioctl, 1, &[libc::FIONBIO])?;
    list.call_if_arg(
        libc::SYS_fcntl,
        1,
        &[
            libc::F_GETFL as u64,
            libc::F_SETFL as u64,
            libc::F_GETFD as u64,
        ],
    )?;
    common::thread_start(list)?;
    Ok(())
}
