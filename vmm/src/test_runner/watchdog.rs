//! The suite watchdog: a limit on the whole run (`--watchdog SECONDS` or the suite's
//! `watchdog` key). A thread waits for the deadline; when it passes, every live VM's process
//! group is killed at once (the cases waiting on them end), no VM starts afterwards, and the
//! cases not yet started are reported as not run. It does not own the verdicts: `run.rs`
//! asks `expired()` and words them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::vm_process::LiveGroups;

/// A run's watchdog.
#[derive(Debug)]
pub struct Watchdog {
    limit: Option<Duration>,
    deadline: Option<Instant>,
    live: Arc<LiveGroups>,
    expired: AtomicBool,
    /// Set when the run is over: the waiting thread returns.
    finished: Mutex<bool>,
    wake: Condvar,
}

impl Watchdog {
    /// A watchdog for a run that starts now, limited to `limit` (none: no limit).
    pub fn new(limit: Option<Duration>) -> Self {
        Self {
            limit,
            deadline: limit.and_then(|l| Instant::now().checked_add(l)),
            live: Arc::new(LiveGroups::new()),
            expired: AtomicBool::new(false),
            finished: Mutex::new(false),
            wake: Condvar::new(),
        }
    }

    /// The limit.
    pub fn limit(&self) -> Option<Duration> {
        self.limit
    }

    /// The live VMs it kills.
    pub fn live(&self) -> &Arc<LiveGroups> {
        &self.live
    }

    /// Whether it has fired.
    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::SeqCst)
    }

    /// Why a case was stopped or not run, once it has fired.
    pub fn reason(&self) -> String {
        format!(
            "the suite watchdog ({:.1} s) expired",
            self.limit.unwrap_or_default().as_secs_f64()
        )
    }

    /// Waits until the deadline, then fires (kills every live VM); returns early, without
    /// firing, once `finish` is called. Run on a thread of its own.
    pub fn watch(&self) {
        let Some(deadline) = self.deadline else {
            return;
        };
        let mut finished = self.finished.lock().unwrap_or_else(PoisonError::into_inner);
        while !*finished {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.expired.store(true, Ordering::SeqCst);
                self.live.kill_all();
                return;
            }
            finished = self
                .wake
                .wait_timeout(finished, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Ends `watch` without firing.
    pub fn finish(&self) {
        *self.finished.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_at_the_deadline_and_not_after_finish() {
        let dog = Watchdog::new(Some(Duration::from_millis(20)));
        let started = Instant::now();
        dog.watch();
        assert!(dog.expired());
        assert!(started.elapsed() >= Duration::from_millis(20));

        let dog = Arc::new(Watchdog::new(Some(Duration::from_secs(60))));
        let waiter = {
            let dog = Arc::clone(&dog);
            std::thread::spawn(move || dog.watch())
        };
        dog.finish();
        assert!(waiter.join().is_ok());
        assert!(!dog.expired());
    }
}
