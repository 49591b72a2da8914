//! Snapshot writer threads (`skiff-snapshot`): create the snapshot's temporary directory, write
//! (or reflink, or link) the memory files and the state, fsync, and rename it into place; for a
//! live snapshot, read and clear KVM's dirty log while the guest runs; seal the manifest with
//! this user's key (`snapshot::auth`).

use seccompiler::BackendError;
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log, KVMIO};

use super::{common, AllowList};

ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
/// `FICLONE` (reflink a whole file).
const FICLONE: u64 = 0x4004_9409;
/// `FICLONERANGE` (reflink a range).
const FICLONERANGE: u64 = 0x4020_940d;

pub(super) fn add(list: &mut AllowList) -> Result<(), BackendError> {
    list.calls(&[
        libc::SYS_openat,
        libc::SYS_mkdir,
        libc::SYS_mkdirat,
        libc::SYS_linkat,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_unlinkat,
        libc::SYS_getdents64,
        libc::SYS_newfstatat,
        libc::SYS_fstat,
        libc::SYS_statx,
        libc::SYS_fstatfs,
        libc::SYS_lseek,
        libc::SYS_read,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_pwritev,
        libc::SYS_copy_file_range,
        libc::SYS_sendfile,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        // Writeback of each copied chunk starts at once (memory_file::start_writeback).
        libc::SYS_sync_file_range,
        libc::SYS_flock,
        // Sealing with this user's key: its owner is checked, and it is created on first use.
        libc::SYS_getrandom,
        libc::SYS_geteuid,
        libc::SYS_getuid,
        libc::SYS_fchmod,
    ]);
    // Memory files are written and summed by worker threads the writer starts; they run under
    // this filter (the writer's) without one of their own.
    common::thread_start(list)?;
    // Removing stale temporaries: `kill(pid, 0)` asks whether their writer still lives.
    list.call_if_arg(libc::SYS_kill, 1, &[0])?;
    list.call_if_arg(
        libc::SYS_ioctl,
        1,
        &[
            FICLONE,
            FICLONERANGE,
            KVM_GET_DIRTY_LOG(),
            KVM_CLEAR_DIRTY_LOG(),
        ],
    )?;
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
    Ok(())
}
