//! The system calls each thread kind may make: one file per kind, built from shared groups.
//!
//! To let a kind make a new call, add it to that kind's file (or to a group in `common.rs` when
//! every kind needs it), with a comment saying which code path makes it. Argument filters are
//! used where they are cheap and say something: `ioctl` request numbers, socket families,
//! `fcntl` and `prctl` operations. `docs/sandbox.md` says how to find a missing call.
//!
//! Filters stack: a thread started by a confined thread runs under its parent's filter until
//! its own is installed, and under both after. So a kind that starts threads also allows what a
//! new thread does before and while confining itself (`common::thread_start`), and what the
//! threads it starts do afterwards (the event loop starts the snapshot writer; the reconnect
//! thread starts watchdogs).

mod api_exec;
mod common;
mod disk;
mod event_loop;
mod exec_session;
mod snapshot;
mod teardown;
mod vcpu;
mod vhost_user;

use std::collections::BTreeMap;

use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::ThreadKind;

/// The calls one kind may make, as seccompiler takes them: a call with no rules is allowed
/// whatever its arguments; one with rules only when one of them matches.
#[derive(Debug, Default)]
pub(super) struct AllowList {
    calls: BTreeMap<i64, Option<Vec<SeccompRule>>>,
}

impl AllowList {
    /// Allows `calls` whatever their arguments.
    pub(super) fn calls(&mut self, calls: &[libc::c_long]) {
        for &nr in calls {
            self.calls.insert(nr, None);
        }
    }

    /// Allows `call` when argument `arg` equals one of `values` (compared as 32-bit words:
    /// ioctl requests, socket families, fcntl and prctl operations fit).
    pub(super) fn call_if_arg(
        &mut self,
        call: libc::c_long,
        arg: u8,
        values: &[u64],
    ) -> Result<(), BackendError> {
        let mut rules = Vec::with_capacity(values.len());
        for &value in values {
            let condition =
                SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)?;
            rules.push(SeccompRule::new(vec![condition])?);
        }
        match self.calls.entry(call).or_insert_with(|| Some(Vec::new())) {
            // Already allowed whatever the arguments.
            None => {}
            Some(existing) => existing.extend(rules),
        }
        Ok(())
    }

    fn into_rules(self) -> Vec<(i64, Vec<SeccompRule>)> {
        self.calls
            .into_iter()
            .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
            .collect()
    }
}

/// The rules for `kind`.
pub(super) fn rules_for(kind: ThreadKind) -> Result<Vec<(i64, Vec<SeccompRule>)>, BackendError> {
    let mut list = AllowList::default();
    common::every_thread(&mut list)?;
    match kind {
        ThreadKind::Vcpu => vcpu::add(&mut list)?,
        ThreadKind::EventLoop => event_loop::add(&mut list)?,
        ThreadKind::Disk => disk::disk_thread(&mut list)?,
        ThreadKind::DiskWorker => disk::worker(&mut list)?,
        ThreadKind::VhostUserWatchdog => vhost_user::watchdog(&mut list)?,
        ThreadKind::VhostUserReconnect => vhost_user::reconnect(&mut list)?,
        ThreadKind::SnapshotWriter => snapshot::add(&mut list)?,
        ThreadKind::Teardown => teardown::add(&mut list)?,
        ThreadKind::VhostUserBlkBackend => vhost_user::blk_backend(&mut list)?,
        // Writes to a descriptor it already holds and waits on a condvar: the common calls.
        ThreadKind::GuestOutput => {}
        ThreadKind::ExecSession => exec_session::add(&mut list)?,
        ThreadKind::ApiExec => api_exec::add(&mut list)?,
    }
    Ok(list.into_rules())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(kind: ThreadKind, call: libc::c_long) -> bool {
        rules_for(kind).unwrap().iter().any(|(nr, _)| *nr == call)
    }

    #[test]
    fn the_trigger_call_is_on_no_list_and_exit_is_on_every_list() {
        for kind in ThreadKind::ALL {
            assert!(!allowed(kind, libc::SYS_personality), "{kind:?}");
            assert!(allowed(kind, libc::SYS_exit_group), "{kind:?}");
            assert!(allowed(kind, libc::SYS_write), "{kind:?}");
        }
    }

    #[test]
    fn only_the_vmm_threads_that_need_it_may_open_files() {
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::Disk,
            ThreadKind::DiskWorker,
            ThreadKind::VhostUserWatchdog,
            ThreadKind::GuestOutput,
        ] {
            assert!(!allowed(kind, libc::SYS_openat), "{kind:?}");
            assert!(!allowed(kind, libc::SYS_execve), "{kind:?}");
        }
        assert!(allowed(ThreadKind::SnapshotWriter, libc::SYS_openat));
    }

    #[test]
    fn an_unconditional_allow_wins_over_argument_rules() {
        let mut list = AllowList::default();
        list.call_if_arg(libc::SYS_ioctl, 1, &[1, 2]).unwrap();
        list.calls(&[libc::SYS_ioctl]);
        list.call_if_arg(libc::SYS_ioctl, 1, &[3]).unwrap();
        let rules = list.into_rules();
        assert_eq!(rules.len(), 1);
        assert!(rules[0].1.is_empty());
    }
}
