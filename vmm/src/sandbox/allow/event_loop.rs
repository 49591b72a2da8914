//! The main thread once the VM runs: the event loop (net, rng and console queues, taps, serial
//! input, vhost-user sockets, stop signals), the control API, pause and snapshot requests, then
//! stopping the vCPUs, restoring the terminal, removing the API socket and detaching teardown.
//!
//! It starts the snapshot writer (which runs under this filter too, so the writer's calls are
//! allowed here) and forks the teardown process. `ioctl` is not narrowed here: it reaches the
//! KVM VM fd (interrupt routes, memory slots and dirty logs, clock, PIT and irqchip state for a
//! snapshot), taps, and the terminal.

use seccompiler::BackendError;

use super::{common, disk, snapshot, teardown, AllowList};

pub(super) fn add(list: &mut AllowList) -> Result<(), BackendError> {
    list.calls(&[
        libc::SYS_ioctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_create1,
        libc::SYS_eventfd2,
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_poll,
        libc::SYS_ppoll,
        // The control API (Unix stream connections) and vhost-user messages.
        libc::SYS_accept4,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        // virtio-vsock: a guest connection to port P connects to the Unix socket PATH_P.
        libc::SYS_connect,
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
        // virtio-rng.
        libc::SYS_getrandom,
        // Kicking vCPUs out of KVM_RUN.
        libc::SYS_tgkill,
        // Removing the API socket (only if it is still ours) at exit.
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_readlink,
        libc::SYS_readlinkat,
        // Fresh guest memory for a VM that goes on after a snapshot of its copy-on-write RAM.
        libc::SYS_memfd_create,
        libc::SYS_fallocate,
        // Teardown: the pipe the detached process waits on, and the intermediate child.
        libc::SYS_pipe2,
        libc::SYS_wait4,
        libc::SYS_rt_sigaction,
        // `skiff exec` stops its virtiofsd children after the VM, through their pidfds (a
        // pidfd names one process the caller already holds; `kill` could name any).
        libc::SYS_pidfd_send_signal,
    ]);
    list.call_if_arg(libc::SYS_socket, 0, &[libc::AF_UNIX as u64])?;
    // `--exit-status-file` is written by the main thread at the end: a temporary file, fsynced,
    // renamed over the path (std's `rename`), then the directory fsynced.
    list.calls(&[libc::SYS_rename, libc::SYS_fsync]);
    common::thread_start(list)?;
    // Resuming after a snapshot, or a restored VM's first run, activates its disks here.
    disk::activation(list)?;
    snapshot::add(list)?;
    teardown::add(list)?;
    Ok(())
}
