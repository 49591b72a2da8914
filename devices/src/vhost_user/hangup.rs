//! `HangupWatcher`: the event-loop subscriber that watches one connection's socket for the
//! backend going away, active device or not, and reports it once: one log line, then either
//! `DEVICE_NEEDS_RESET` (if the driver uses the device; without `reconnect=`) or a wake-up for
//! the reconnect thread (through `Waker`, the channel this module owns).
//!
//! It never reads or writes the socket: requests and replies belong to the thread that drives
//! them, and watching only for hang-ups cannot steal a reply. It takes no lock the device
//! holds while it talks to the backend (only the shared flags).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::session::Shared;

/// What wakes the reconnect thread.
pub(super) enum Wake {
    /// The connection of this generation hung up.
    Lost(u64),
    /// The device is gone: end the thread.
    Close,
}

/// Tells the reconnect thread that a connection was lost.
#[derive(Debug, Clone)]
pub(super) struct Waker(pub(super) Sender<Wake>);

impl Waker {
    /// The connection of `generation` hung up.
    pub(super) fn lost(&self, generation: u64) {
        // Fails only when the thread has ended (the device is being dropped).
        let _ = self.0.send(Wake::Lost(generation));
    }

    /// The device is gone: the reconnect thread ends.
    pub(super) fn close(&self) {
        // Fails only when the thread has ended already.
        let _ = self.0.send(Wake::Close);
    }
}

/// Watches one connection's socket.
pub(super) struct HangupWatcher {
    shared: Arc<Shared>,
    socket: OwnedFd,
    /// The connection's generation (reported with the loss).
    generation: u64,
    /// Wakes the reconnect thread (with `reconnect=`).
    waker: Option<Waker>,
    /// Set when the connection is replaced or the device dropped: report nothing more.
    stopped: Arc<AtomicBool>,
    reported: bool,
}

impl std::fmt::Debug for HangupWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HangupWatcher")
            .field("name", &self.shared.name)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl HangupWatcher {
    pub(super) fn new(
        shared: Arc<Shared>,
        socket: OwnedFd,
        generation: u64,
        waker: Option<Waker>,
        stopped: Arc<AtomicBool>,
    ) -> Self {
        Self {
            shared,
            socket,
            generation,
            waker,
            stopped,
            reported: false,
        }
    }

    fn backend_gone(&mut self, ops: &mut EventOps) {
        let _ = ops.remove(Events::empty(&self.socket));
        if self.reported || self.stopped.load(Ordering::Acquire) {
            return;
        }
        self.reported = true;
        let shared = &self.shared;
        shared.disconnected.store(true, Ordering::Release);
        match (&self.waker, shared.reconnect) {
            (Some(waker), Some(every)) => {
                log::warn!(
                    "virtio {}: the vhost-user backend at {} closed its connection; reconnecting every {}s",
                    shared.name,
                    shared.path.display(),
                    every.as_secs_f64()
                );
                waker.lost(self.generation);
            }
            _ => {
                log::error!(
                    "virtio {}: the vhost-user backend closed its connection; the device needs a reset",
                    shared.name
                );
                shared.fail_device();
            }
        }
    }
}

impl MutEventSubscriber for HangupWatcher {
    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        self.backend_gone(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Hang-ups only: EPOLLHUP and EPOLLERR are always reported, EPOLLRDHUP on a peer's close.
        if let Err(e) = ops.add(Events::new(&self.socket, EventSet::READ_HANG_UP)) {
            log::error!(
                "virtio {}: cannot watch the backend socket: {e:?}",
                self.shared.name
            );
        }
    }
}
