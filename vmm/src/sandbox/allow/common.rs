//! Calls every thread makes, and what a thread that starts threads must allow.

use seccompiler::BackendError;

use super::AllowList;

/// `prctl` operations skiff makes after start-up: naming a thread, and the confinement steps a
/// new thread takes under its parent's filter.
const PRCTL_OPS: [u64; 3] = [
    libc::PR_SET_NAME as u64,
    libc::PR_SET_NO_NEW_PRIVS as u64,
    libc::PR_CAPBSET_DROP as u64,
];

/// Every kind: memory (the allocator, thread stacks), locks, signal return, time, logging to
/// stderr, closing descriptors, and leaving (the SIGSYS report needs `write` and `exit_group`).
pub(super) fn every_thread(list: &mut AllowList) -> Result<(), BackendError> {
    list.calls(&[
        libc::SYS_brk,
        libc::SYS_mmap,
        libc::SYS_mprotect,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_sched_yield,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]);
    Ok(())
}

/// A kind that starts threads: `clone3`/`clone` (thread flags cannot be checked in `clone3`'s
/// struct, so both are allowed as they are), what the new thread does before its own filter is
/// in (robust futex list, rseq, naming, stack guard), and the confinement calls it then makes:
/// Landlock (`landlock_restrict_self` on a `dup` of the ruleset), `capget`, `seccomp`.
pub(super) fn thread_start(list: &mut AllowList) -> Result<(), BackendError> {
    list.calls(&[
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sched_getaffinity,
        libc::SYS_capget,
        libc::SYS_seccomp,
        libc::SYS_landlock_restrict_self,
    ]);
    list.call_if_arg(libc::SYS_prctl, 0, &PRCTL_OPS)?;
    list.call_if_arg(libc::SYS_fcntl, 1, &[libc::F_DUPFD_CLOEXEC as u64])?;
    Ok(())
}
