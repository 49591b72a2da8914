//! vhost-user threads: a connection's watchdog, a device's reconnect thread, and the
//! `skiff vhost-user-blk` backend process.

use seccompiler::BackendError;

use super::{common, disk, AllowList};

/// Shuts the socket down when a request outlives its deadline; otherwise waits on a condvar.
pub(super) fn watchdog(list: &mut AllowList) -> Result<(), BackendError> {
    list.calls(&[libc::SYS_shutdown]);
    Ok(())
}

/// Connects to the backend's socket again every few seconds and replays the set-up messages
/// (memory table and vring descriptors as file descriptors). It starts the new connection's
/// watchdog.
pub(super) fn reconnect(list: &mut AllowList) -> Result<(), BackendError> {
    list.call_if_arg(libc::SYS_socket, 0, &[libc::AF_UNIX as u64])?;
    list.calls(&[
        libc::SYS_connect,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
        libc::SYS_shutdown,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_read,
        libc::SYS_eventfd2,
        libc::SYS_epoll_ctl,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_fstat,
        libc::SYS_getrandom,
    ]);
    list.call_if_arg(
        libc::SYS_fcntl,
        1,
        &[
            libc::F_GETFL as u64,
            libc::F_SETFL as u64,
            libc::F_GETFD as u64,
            libc::F_SETFD as u64,
            libc::F_DUPFD_CLOEXEC as u64,
        ],
    )?;
    list.call_if_arg(libc::SYS_ioctl, 1, &[libc::FIONBIO, libc::FIOCLEX])?;
    watchdog(list)?;
    common::thread_start(list)?;
    Ok(())
}

/// The backend process once its disk and socket are open: accepts a frontend, maps the guest
/// memory it sends, serves the queue (io_uring or worker threads), and starts the daemon's
/// threads.
pub(super) fn blk_backend(list: &mut AllowList) -> Result<(), BackendError> {
    list.calls(&[
        libc::SYS_accept4,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_shutdown,
        libc::SYS_setsockopt,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_eventfd2,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_register,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_fstat,
        libc::SYS_getrandom,
        libc::SYS_unlink,
        // The backend daemon ignores SIGPIPE for each connection.
        libc::SYS_rt_sigaction,
    ]);
    list.call_if_arg(
        libc::SYS_fcntl,
        1,
        &[
            libc::F_GETFL as u64,
            libc::F_SETFL as u64,
            libc::F_GETFD as u64,
            libc::F_SETFD as u64,
            libc::F_DUPFD_CLOEXEC as u64,
        ],
    )?;
    list.call_if_arg(libc::SYS_ioctl, 1, &[libc::FIONBIO, libc::FIOCLEX])?;
    disk::run_time(list)?;
    common::thread_start(list)?;
    Ok(())
}
