//! The event-loop subscribers of a vhost-user device, one type in two roles. While the device is
//! active, one watches a "call" eventfd per queue (the backend writes it when it used buffers)
//! and raises that queue's interrupt through `DeviceSignals::notify_queue`, which honours MSI-X
//! masking. From the first activation until the device is dropped, another watches the
//! backend's socket for a hang-up, active or not, and reports it once (one log line,
//! `DEVICE_NEEDS_RESET`), so the guest sees a failed device instead of a queue that never
//! completes.
//!
//! It never reads or writes the socket itself: requests and replies belong to the vCPU thread
//! that drives activation, and watching only for hang-ups cannot steal a reply.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::device::DeviceSignals;

/// Event data for the socket (queue indexes use their own number).
const SOCKET_TOKEN: u32 = u32::MAX;

/// Forwards the backend's used-buffer notifications and watches for its end.
pub(super) struct CallForwarder {
    name: &'static str,
    calls: Vec<(u16, EventFd)>,
    socket: Option<OwnedFd>,
    signals: Arc<dyn DeviceSignals>,
    /// Set once the backend is gone (shared with the device, which then refuses to activate).
    disconnected: Arc<AtomicBool>,
    /// The hang-up was logged.
    reported: bool,
    /// The driver is using the device (shared with it): only then does a hang-up mark the
    /// device `DEVICE_NEEDS_RESET` (a reset device must read status 0; its next activation
    /// fails instead).
    driver_active: Arc<AtomicBool>,
    /// Set by the device on reset: forward nothing more.
    stopped: Arc<AtomicBool>,
}

impl std::fmt::Debug for CallForwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallForwarder")
            .field("name", &self.name)
            .field("queues", &self.calls.len())
            .finish_non_exhaustive()
    }
}

impl CallForwarder {
    pub(super) fn new(
        name: &'static str,
        calls: Vec<(u16, EventFd)>,
        socket: Option<OwnedFd>,
        signals: Arc<dyn DeviceSignals>,
        disconnected: Arc<AtomicBool>,
        driver_active: Arc<AtomicBool>,
        stopped: Arc<AtomicBool>,
    ) -> Self {
        Self {
            name,
            calls,
            socket,
            signals,
            disconnected,
            reported: false,
            driver_active,
            stopped,
        }
    }

    fn forward(&self, token: u32) {
        let Some((queue, call)) = self.calls.iter().find(|(q, _)| u32::from(*q) == token) else {
            return;
        };
        // Drain the counter whatever happens, so the loop does not spin on it.
        let _ = call.read();
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self.signals.notify_queue(*queue) {
            log::warn!("virtio {}: cannot notify queue {queue}: {e}", self.name);
        }
    }

    fn backend_gone(&mut self, ops: &mut EventOps) {
        if let Some(socket) = &self.socket {
            let _ = ops.remove(Events::with_data(socket, SOCKET_TOKEN, EventSet::empty()));
        }
        self.disconnected.store(true, Ordering::Release);
        if self.reported || self.stopped.load(Ordering::Acquire) {
            return;
        }
        self.reported = true;
        log::error!(
            "virtio {}: the vhost-user backend closed its connection; the device needs a reset",
            self.name
        );
        if self.driver_active.load(Ordering::Acquire) {
            self.signals.set_needs_reset();
        }
    }
}

impl MutEventSubscriber for CallForwarder {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        if token == SOCKET_TOKEN {
            self.backend_gone(ops);
        } else {
            self.forward(token);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (queue, call) in &self.calls {
            if let Err(e) = ops.add(Events::with_data(call, u32::from(*queue), EventSet::IN)) {
                log::error!(
                    "virtio {}: cannot watch queue {queue}'s call eventfd: {e:?}",
                    self.name
                );
            }
        }
        // Hang-ups only: EPOLLHUP and EPOLLERR are always reported, EPOLLRDHUP on a peer's close.
        if let Some(socket) = &self.socket {
            let watch = Events::with_data(socket, SOCKET_TOKEN, EventSet::READ_HANG_UP);
            if let Err(e) = ops.add(watch) {
                log::error!(
                    "virtio {}: cannot watch the backend socket: {e:?}",
                    self.name
                );
            }
        }
    }
}
