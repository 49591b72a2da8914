//! Reconnecting to a vhost-user backend that went away (`reconnect=SECONDS`).
//!
//! One thread per device with `reconnect=`, idle until the hang-up watcher reports a loss (so
//! neither the event loop nor a vCPU ever waits for a backend that is starting up). It then
//! tries the socket every interval: connect, the start-up handshake, the memory table, the
//! configuration space again (if the backend gave one: a new one replaces the cached copy and
//! raises the configuration-change interrupt), and, if the driver uses the device, the driver's
//! features and every ring, each starting at the used index the guest's memory shows, followed
//! by one write to each kick eventfd. It logs one line when it is back.
//!
//! A backend that answers but no longer offers every feature the guest was offered (or serves
//! too few queues, or lacks `VIRTIO_F_VERSION_1`) is not used: one line, and the device is
//! marked `DEVICE_NEEDS_RESET` if the driver uses it; the thread keeps trying, so a proper
//! backend started later is taken up after the driver resets the device. Other failures (the
//! socket missing or refusing, a handshake that fails) are retried quietly, the first failure
//! past `connect` of each outage logged once.
//!
//! `RetryClock` is the timing as a plain state machine, so it is tested without threads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::MutEventSubscriber;

use super::connection::{connect_socket, Connection, VhostUserError};
use super::hangup::{HangupWatcher, Wake, Waker};
use super::session::{bring_up, kick_all, Base, Handler, Shared};
use crate::error_chain;
use crate::virtio::subscription::LoopSubscription;

/// The reconnect thread of one device; dropping this ends it.
#[derive(Debug)]
pub(super) struct Reconnector {
    waker: Waker,
}

impl Reconnector {
    /// Starts the thread for `shared`, retrying every `every`.
    pub(super) fn start(shared: Arc<Shared>, every: Duration) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let waker = Waker(tx);
        let thread_waker = waker.clone();
        std::thread::Builder::new()
            .name("vhost-user-reconnect".into())
            .spawn(move || run(&shared, &thread_waker, &rx, every))?;
        Ok(Self { waker })
    }

    /// A handle for the hang-up watchers.
    pub(super) fn waker(&self) -> Waker {
        self.waker.clone()
    }
}

impl Drop for Reconnector {
    fn drop(&mut self) {
        self.waker.close();
    }
}

/// When to try again, as a state machine over explicit instants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RetryClock {
    every: Duration,
    state: ClockState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClockState {
    Connected,
    Retrying {
        next: Instant,
        attempts: u32,
        complained: bool,
    },
}

impl RetryClock {
    /// A clock for a live connection, retrying every `every` once it is lost.
    pub(super) fn new(every: Duration) -> Self {
        Self {
            every,
            state: ClockState::Connected,
        }
    }

    /// The connection was lost at `now`: the first attempt is one interval later. A second
    /// report during the same outage changes nothing.
    pub(super) fn lost(&mut self, now: Instant) {
        if self.state == ClockState::Connected {
            self.state = ClockState::Retrying {
                next: now + self.every,
                attempts: 0,
                complained: false,
            };
        }
    }

    /// How long to wait before the next attempt (`None`: connected, nothing to do).
    pub(super) fn wait(&self, now: Instant) -> Option<Duration> {
        match self.state {
            ClockState::Connected => None,
            ClockState::Retrying { next, .. } => Some(next.saturating_duration_since(now)),
        }
    }

    /// An attempt at `now` failed: the next one is one interval later. Returns whether this is
    /// the first failure of the outage worth a log line (`worth` is false for an unreachable
    /// socket, which is expected while the backend restarts).
    pub(super) fn failed(&mut self, now: Instant, worth: bool) -> bool {
        match &mut self.state {
            ClockState::Connected => false,
            ClockState::Retrying {
                next,
                attempts,
                complained,
            } => {
                *next = now + self.every;
                *attempts = attempts.saturating_add(1);
                let first = worth && !*complained;
                *complained |= worth;
                first
            }
        }
    }

    /// An attempt succeeded; returns how many attempts the outage took.
    pub(super) fn reconnected(&mut self) -> u32 {
        let attempts = match self.state {
            ClockState::Connected => 0,
            ClockState::Retrying { attempts, .. } => attempts.saturating_add(1),
        };
        self.state = ClockState::Connected;
        attempts
    }
}

/// How an attempt went.
enum Outcome {
    /// Back, with this many rings replayed.
    Back(usize),
    /// Nobody answers on the socket (yet).
    Unreachable(VhostUserError),
    /// A backend answers but cannot serve this device as the guest knows it.
    Incompatible(VhostUserError),
    /// A backend answers but a request failed.
    Failed(VhostUserError),
}

fn run(shared: &Arc<Shared>, waker: &Waker, rx: &Receiver<Wake>, every: Duration) {
    let mut clock = RetryClock::new(every);
    loop {
        let wake = match clock.wait(Instant::now()) {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(wait) => rx.recv_timeout(wait),
        };
        match wake {
            Ok(Wake::Close) | Err(RecvTimeoutError::Disconnected) => return,
            Ok(Wake::Lost(generation)) => {
                if drop_lost(shared, generation) {
                    clock.lost(Instant::now());
                }
            }
            Err(RecvTimeoutError::Timeout) => match attempt(shared, waker) {
                Outcome::Back(rings) => {
                    let attempts = clock.reconnected();
                    log::warn!(
                        "virtio {}: reconnected to the vhost-user backend at {} after {attempts} attempt(s); {rings} queue(s) resumed",
                        shared.name,
                        shared.path.display()
                    );
                }
                Outcome::Unreachable(e) => {
                    clock.failed(Instant::now(), false);
                    log::debug!("virtio {}: {}", shared.name, error_chain(&e));
                }
                Outcome::Failed(e) => {
                    if clock.failed(Instant::now(), true) {
                        log::warn!(
                            "virtio {}: reconnecting: {}; retrying every {}s",
                            shared.name,
                            error_chain(&e),
                            every.as_secs_f64()
                        );
                    } else {
                        log::debug!("virtio {}: {}", shared.name, error_chain(&e));
                    }
                }
                Outcome::Incompatible(e) => {
                    if clock.failed(Instant::now(), true) {
                        log::error!(
                            "virtio {}: the restarted vhost-user backend cannot serve the device: {}; the device needs a reset",
                            shared.name,
                            error_chain(&e)
                        );
                    }
                    abandon_rings(shared);
                }
            },
        }
    }
}

/// Drops the lost connection of `generation` (if it is still the current one) and its
/// watcher. Returns whether it was current.
fn drop_lost(shared: &Shared, generation: u64) -> bool {
    let mut session = shared.lock();
    if session.generation != generation {
        return false;
    }
    shared.disconnected.store(true, Ordering::Release);
    if let Some(watcher) = session.watcher.take() {
        watcher.stop();
    }
    session.conn = None;
    if let Some(active) = &mut session.active {
        active.started = false;
    }
    true
}

/// The driver's rings cannot be brought back: the device fails, and a later backend only
/// serves the next activation.
fn abandon_rings(shared: &Shared) {
    let mut session = shared.lock();
    if let Some(active) = &mut session.active {
        if !active.abandoned {
            active.abandoned = true;
            shared.fail_device();
        }
    }
}

fn classify(e: VhostUserError) -> Outcome {
    match e {
        VhostUserError::MissingFeatures { .. }
        | VhostUserError::TooManyQueues { .. }
        | VhostUserError::FeaturesLost { .. } => Outcome::Incompatible(e),
        _ => Outcome::Failed(e),
    }
}

fn attempt(shared: &Arc<Shared>, waker: &Waker) -> Outcome {
    let stream = match connect_socket(&shared.path) {
        Ok(stream) => stream,
        Err(e) => return Outcome::Unreachable(e),
    };
    let mut conn = match Connection::handshake(&shared.path, stream, shared.queues) {
        Ok(conn) => conn,
        Err(e) => return classify(e),
    };
    let missing = shared.offered & !conn.negotiated().features;
    if missing != 0 {
        return Outcome::Incompatible(VhostUserError::FeaturesLost {
            path: shared.path.clone(),
            offered: conn.negotiated().features,
            missing,
        });
    }
    if let Err(e) = conn.set_mem_table(&shared.regions) {
        return Outcome::Failed(e);
    }
    // The new backend's configuration space (a disk resized while it was down, say).
    let fresh_config = if shared.config_from_backend {
        match conn.read_config(shared.config().len()) {
            Ok(config) => config,
            Err(e) => return classify(e),
        }
    } else {
        None
    };
    let socket = match conn.socket_fd() {
        Ok(socket) => socket,
        Err(e) => return Outcome::Failed(e),
    };
    let mut session = shared.lock();
    let config_changed = match fresh_config {
        Some(config) if config != *shared.config() => {
            *shared.config() = config;
            true
        }
        _ => false,
    };
    let mut rings = 0;
    let log = session.log.clone();
    if let Some(log) = &log {
        // A live snapshot is logging: the new backend logs into the same buffer.
        if let Err(e) = conn.set_log_base(log) {
            return classify(e);
        }
    }
    if let Some(active) = session.active.as_mut().filter(|a| !a.abandoned) {
        let logged = log.is_some();
        if let Err(e) = bring_up(
            &mut conn,
            &shared.regions,
            active,
            Base::GuestUsedIndex,
            logged,
        ) {
            return classify(e);
        }
        active.started = true;
        rings = active.rings.len();
    }
    session.generation += 1;
    let watcher = match watch(shared, socket, session.generation, Some(waker.clone())) {
        Ok(watcher) => watcher,
        Err(e) => return Outcome::Failed(e),
    };
    if let Some(old) = session.watcher.replace(watcher) {
        old.stop();
    }
    session.conn = Some(conn);
    shared.disconnected.store(false, Ordering::Release);
    if let Some(active) = session.active.as_ref().filter(|a| a.started) {
        kick_all(shared.name, active);
    }
    drop(session);
    if config_changed {
        log::warn!(
            "virtio {}: the vhost-user backend at {} came back with another configuration; \
             the driver is told",
            shared.name,
            shared.path.display()
        );
        shared.notify_config_change();
    }
    Outcome::Back(rings)
}

/// Registers a hang-up watcher for connection `generation`'s `socket`.
pub(super) fn watch(
    shared: &Arc<Shared>,
    socket: std::os::fd::OwnedFd,
    generation: u64,
    waker: Option<Waker>,
) -> Result<Handler, VhostUserError> {
    let stopped = Arc::new(AtomicBool::new(false));
    let watcher = HangupWatcher::new(shared.clone(), socket, generation, waker, stopped.clone());
    let subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>> = Arc::new(Mutex::new(watcher));
    let subscription = LoopSubscription::add(&shared.event_loop, subscriber).map_err(|source| {
        VhostUserError::Host {
            what: "a watcher for the backend socket",
            source,
        }
    })?;
    Ok(Handler {
        subscription,
        stopped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(2);

    #[test]
    fn a_loss_waits_one_interval_then_retries_every_interval() {
        let t0 = Instant::now();
        let mut clock = RetryClock::new(S);
        assert_eq!(clock.wait(t0), None, "connected: no attempt");
        clock.lost(t0);
        assert_eq!(clock.wait(t0), Some(S));
        assert_eq!(clock.wait(t0 + S / 2), Some(S / 2));
        assert_eq!(clock.wait(t0 + 3 * S), Some(Duration::ZERO), "overdue");
        // A second report of the same outage does not push the attempt back.
        clock.lost(t0 + S / 2);
        assert_eq!(clock.wait(t0), Some(S));
        // A failed attempt (late, at 2.5 S) schedules the next one an interval after it.
        let late = t0 + S * 5 / 2;
        clock.failed(late, false);
        assert_eq!(clock.wait(late), Some(S));
        clock.failed(late + S, false);
        assert_eq!(clock.reconnected(), 3, "two failures, then success");
        assert_eq!(clock.wait(late + 2 * S), None);
    }

    #[test]
    fn only_the_first_real_failure_of_an_outage_is_worth_a_line() {
        let t0 = Instant::now();
        let mut clock = RetryClock::new(S);
        assert!(!clock.failed(t0, true), "connected: nothing failed");
        clock.lost(t0);
        assert!(!clock.failed(t0 + S, false), "unreachable socket: quiet");
        assert!(clock.failed(t0 + 2 * S, true), "first refusal: one line");
        assert!(!clock.failed(t0 + 3 * S, true), "then quiet");
        clock.reconnected();
        clock.lost(t0 + 4 * S);
        assert!(clock.failed(t0 + 5 * S, true), "a new outage: a new line");
    }
}
