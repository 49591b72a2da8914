//! The kinds of thread skiff runs, and the hook every thread calls first thing when it starts.
//!
//! A thread's kind decides what it may do once it runs (the VMM's `sandbox` module turns a kind
//! into a seccomp filter and installs it on the calling thread). Devices name the kind of each
//! thread they start and call [`enter`] at its top; the VMM registers the hook once, before it
//! starts any thread. Without a hook (unit tests, other embedders) `enter` does nothing.

use std::sync::OnceLock;

/// What a thread is for. Each kind gets its own system-call allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// Runs one vCPU (`KVM_RUN`) and the device handlers its exits reach.
    Vcpu,
    /// The main thread once the VM runs: the event loop, the control API, serial and console
    /// output, taps and vhost-user sockets, stop and teardown.
    EventLoop,
    /// One virtio-blk disk's thread: its queues, io_uring or the worker pool's completions.
    Disk,
    /// A worker of a disk's thread pool (where the host has no io_uring).
    DiskWorker,
    /// Shuts a vhost-user socket down when a request outlives its deadline.
    VhostUserWatchdog,
    /// Reconnects a vhost-user device whose backend went away (`reconnect=`).
    VhostUserReconnect,
    /// Writes a snapshot's memory and state files.
    SnapshotWriter,
    /// The detached process that holds the KVM VM until skiff has exited.
    Teardown,
    /// The `skiff vhost-user-blk` backend process, once its socket and disk are open.
    VhostUserBlkBackend,
    /// Drains one host sink's guest-output buffer (stdout, a `--serial file=`) into it.
    GuestOutput,
    /// `skiff exec`'s session: waits for the guest agent, runs the command, streams its output.
    ExecSession,
    /// Runs one `POST /vm/exec` of the control API: connects to the VM's agent through its
    /// vsock socket, runs the command, writes the HTTP answer.
    ApiExec,
}

impl ThreadKind {
    /// Every kind, for tables and tests.
    pub const ALL: [ThreadKind; 12] = [
        ThreadKind::Vcpu,
        ThreadKind::EventLoop,
        ThreadKind::Disk,
        ThreadKind::DiskWorker,
        ThreadKind::VhostUserWatchdog,
        ThreadKind::VhostUserReconnect,
        ThreadKind::SnapshotWriter,
        ThreadKind::Teardown,
        ThreadKind::VhostUserBlkBackend,
        ThreadKind::GuestOutput,
        ThreadKind::ExecSession,
        ThreadKind::ApiExec,
    ];

    /// The kind's name in options, messages and docs (`vcpu`, `event-loop`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::EventLoop => "event-loop",
            ThreadKind::Disk => "disk",
            ThreadKind::DiskWorker => "disk-worker",
            ThreadKind::VhostUserWatchdog => "vhost-user-watchdog",
            ThreadKind::VhostUserReconnect => "vhost-user-reconnect",
            ThreadKind::SnapshotWriter => "snapshot-writer",
            ThreadKind::Teardown => "teardown",
            ThreadKind::VhostUserBlkBackend => "vhost-user-blk",
            ThreadKind::GuestOutput => "guest-output",
            ThreadKind::ExecSession => "exec-session",
            ThreadKind::ApiExec => "api-exec",
        }
    }

    /// The kind called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

static HOOK: OnceLock<fn(ThreadKind)> = OnceLock::new();

/// Registers the function every thread calls through [`enter`]. Only the first call counts;
/// returns whether this one did.
pub fn set_hook(hook: fn(ThreadKind)) -> bool {
    HOOK.set(hook).is_ok()
}

/// Called by a thread of `kind` before it does anything else. The hook confines the thread
/// (and, if it cannot, ends the process: a thread must never run unconfined by mistake).
pub fn enter(kind: ThreadKind) {
    if let Some(hook) = HOOK.get() {
        hook(kind);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_distinct() {
        for kind in ThreadKind::ALL {
            assert_eq!(ThreadKind::from_name(kind.name()), Some(kind));
        }
        let mut names: Vec<_> = ThreadKind::ALL.iter().map(|k| k.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ThreadKind::ALL.len());
        assert_eq!(ThreadKind::from_name("nope"), None);
    }
}
