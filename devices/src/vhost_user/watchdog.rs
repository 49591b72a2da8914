//! A per-connection watchdog that bounds every request to the backend.
//!
//! The socket's receive timeout alone is not enough: the `vhost` crate retries a timed-out
//! read in the middle of a message (a backend that sends half a reply and stalls would hold the
//! vCPU thread forever). So each request arms this watchdog; if it is still armed when the
//! deadline passes, the watchdog shuts the socket down, every read returns end-of-file, and the
//! request fails instead of hanging. The connection is unusable afterwards, as it would be
//! after any protocol error.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct State {
    deadline: Option<Instant>,
    closed: bool,
}

/// Shuts a socket down when a request outlives its deadline.
#[derive(Debug)]
pub(super) struct Watchdog {
    shared: Arc<(Mutex<State>, Condvar)>,
    timeout: Duration,
}

impl Watchdog {
    /// Watches `socket` (a duplicate of the connection's descriptor); requests get `timeout`.
    pub(super) fn start(socket: OwnedFd, timeout: Duration) -> std::io::Result<Self> {
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let watched = shared.clone();
        std::thread::Builder::new()
            .name("vhost-user-watchdog".into())
            .spawn(move || {
                crate::thread_kind::enter(crate::thread_kind::ThreadKind::VhostUserWatchdog);
                watch(&watched, &socket)
            })?;
        Ok(Self { shared, timeout })
    }

    /// Starts the clock for one request.
    pub(super) fn arm(&self) {
        let (lock, cvar) = &*self.shared;
        lock.lock().unwrap_or_else(PoisonError::into_inner).deadline =
            Some(Instant::now() + self.timeout);
        cvar.notify_one();
    }

    /// The request finished in time.
    pub(super) fn disarm(&self) {
        let (lock, _) = &*self.shared;
        lock.lock().unwrap_or_else(PoisonError::into_inner).deadline = None;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cvar) = &*self.shared;
        lock.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
        cvar.notify_one();
    }
}

fn watch(shared: &(Mutex<State>, Condvar), socket: &OwnedFd) {
    let (lock, cvar) = shared;
    let mut state = lock.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        if state.closed {
            return;
        }
        match state.deadline {
            None => state = cvar.wait(state).unwrap_or_else(PoisonError::into_inner),
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    log::warn!(
                        "vhost-user: the backend did not answer in time; closing the connection"
                    );
                    // SAFETY: shutdown on a descriptor this thread owns; it only changes the
                    // socket's state, so the blocked request sees end-of-file.
                    unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
                    state.deadline = None;
                    continue;
                }
                state = cvar
                    .wait_timeout(state, deadline - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
    }
}
