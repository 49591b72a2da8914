//! The one thread that waits for child processes.
//!
//! Every child status goes through `waitpid(-1)` here, so the agent reaps orphans when it is
//! PID 1 and no other code ever races it for a status. An exec registers its pid while holding
//! the reaper's lock across `fork`, so a child that exits at once is still found; statuses of
//! unregistered pids (orphans) are dropped.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Shared between the reaper thread and the execs.
#[derive(Debug, Default)]
pub struct Reaper {
    state: Mutex<State>,
    /// Signalled when a watched child's status arrives.
    exited: Condvar,
    /// Signalled when a child is spawned (the reaper thread sleeps while there are none).
    spawned: Condvar,
}

#[derive(Debug, Default)]
pub struct State {
    /// Watched pids and, once reaped, their raw wait status.
    watched: HashMap<i32, Option<i32>>,
    /// Counts spawns, so the reaper thread can tell whether a child appeared.
    generation: u64,
}

impl State {
    /// Registers `pid` (called with the lock held across fork).
    pub fn watch(&mut self, pid: i32) {
        self.watched.insert(pid, None);
        self.generation += 1;
    }
}

impl Reaper {
    /// Starts the reaper thread.
    pub fn start() -> std::io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper::default());
        let r = Arc::clone(&reaper);
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || r.run())?;
        Ok(reaper)
    }

    /// Locks the state; `fork` happens under this lock, followed by [`State::watch`] and
    /// [`Reaper::notify_spawned`].
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the reaper thread after a spawn.
    pub fn notify_spawned(&self) {
        self.spawned.notify_all();
    }

    /// Takes `pid`'s raw wait status if it has exited (and stops watching it).
    pub fn try_take(&self, pid: i32) -> Option<i32> {
        let mut st = self.lock();
        take(&mut st, pid)
    }

    /// Waits up to `timeout` for `pid`'s raw wait status.
    pub fn wait_timeout(&self, pid: i32, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if let Some(status) = take(&mut st, pid) {
                return Some(status);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            st = self
                .exited
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn run(&self) {
        let mut seen_generation = self.lock().generation;
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes only to `status`, a valid i32.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid > 0 {
                let mut st = self.lock();
                if let Some(slot) = st.watched.get_mut(&pid) {
                    *slot = Some(status);
                    self.exited.notify_all();
                }
                continue;
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // ECHILD: no children. Sleep until a spawn; wake every second anyway, because
            // orphans re-parented to PID 1 arrive without a spawn.
            let mut st = self.lock();
            if st.generation == seen_generation {
                st = self
                    .spawned
                    .wait_timeout(st, Duration::from_secs(1))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            seen_generation = st.generation;
        }
    }
}

fn take(st: &mut State, pid: i32) -> Option<i32> {
    match st.watched.get(&pid) {
        Some(Some(status)) => {
            let status = *status;
            st.watched.remove(&pid);
            Some(status)
        }
        _ => None,
    }
}
