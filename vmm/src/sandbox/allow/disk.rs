//! Disk threads (`disk-NAME`: a virtio-blk disk's queues, its io_uring or worker pool) and
//! their pool workers (`skiff-blk-io*`, where the host has no io_uring).
//!
//! io_uring's own kernel workers are not threads of skiff's: their I/O passes no filter. What
//! a ring may do is fixed when it is created (reads, writes, flushes, hole punches on the disk's
//! descriptor), on the vCPU thread that activates the disk.

use seccompiler::BackendError;

use super::{common, AllowList};

/// What a disk thread and its workers do while serving requests (vCPU threads, which start
/// them, allow this too).
pub(super) fn run_time(list: &mut AllowList) -> Result<(), BackendError> {
    list.calls(&[
        // The loop, kicks and completions.
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_read,
        libc::SYS_io_uring_enter,
        // Requests served by the thread itself or a worker.
        libc::SYS_pread64,
        libc::SYS_preadv,
        libc::SYS_pwrite64,
        libc::SYS_pwritev,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_fallocate,
    ]);
    Ok(())
}

/// Activating a disk (on a vCPU thread when the guest sets DRIVER_OK, or on the event loop when
/// a VM resumes after a snapshot or restore): its eventfds, epoll and io_uring, file checks, and
/// starting its thread. The threads started run under the activating thread's filter too, so
/// their run-time calls are allowed with it.
pub(super) fn activation(list: &mut AllowList) -> Result<(), BackendError> {
    list.calls(&[
        libc::SYS_eventfd2,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_register,
        libc::SYS_statx,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_getrandom,
        // virtio-vsock's activation arms its credit-update timer (served by the event loop).
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
    ]);
    list.call_if_arg(
        libc::SYS_fcntl,
        1,
        &[libc::F_GETFL as u64, libc::F_SETFL as u64],
    )?;
    common::thread_start(list)?;
    run_time(list)
}

/// A disk's own thread: serves its queues and starts (and restarts) its worker pool.
pub(super) fn disk_thread(list: &mut AllowList) -> Result<(), BackendError> {
    run_time(list)?;
    // A queue reset or reactivation can set the engine up again.
    list.calls(&[
        libc::SYS_eventfd2,
        libc::SYS_epoll_ctl,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_register,
    ]);
    common::thread_start(list)?;
    Ok(())
}

/// A worker of a disk's pool: blocking reads, writes, flushes and hole punches.
pub(super) fn worker(list: &mut AllowList) -> Result<(), BackendError> {
    run_time(list)
}
