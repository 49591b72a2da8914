//! `CallForwarder`: the event-loop subscriber of an active vhost-user device. It watches one
//! "call" eventfd per queue, which the backend writes when it used buffers while the queue's
//! MSI-X vector is not deliverable (masked, or MSI-X off; otherwise the backend writes the
//! vector's irqfd itself), and raises that queue's interrupt through
//! `DeviceSignals::notify_queue`, which honours MSI-X masking (keeps it pending).
//!
//! The call eventfds outlive a backend: after a reconnect the new backend gets the same ones,
//! so the forwarder stays registered from activation to reset. Watching the backend's socket is
//! `hangup`'s job.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::device::DeviceSignals;

/// Forwards the backend's used-buffer notifications.
pub(super) struct CallForwarder {
    name: &'static str,
    calls: Vec<(u16, EventFd)>,
    signals: Arc<dyn DeviceSignals>,
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
        signals: Arc<dyn DeviceSignals>,
        stopped: Arc<AtomicBool>,
    ) -> Self {
        Self {
            name,
            calls,
            signals,
            stopped,
        }
    }
}

impl MutEventSubscriber for CallForwarder {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let token = events.data();
        let Some((queue, call)) = self.calls.iter().find(|(q, _)| u32::from(*q) == token) else {
            return;
        };
        // Drain the counter whatever happens, so the loop does not spin on it.
        let _ = call.read();
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        log::trace!("virtio {}: forwarding queue {queue}'s interrupt", self.name);
        if let Err(e) = self.signals.notify_queue(*queue) {
            log::warn!("virtio {}: cannot notify queue {queue}: {e}", self.name);
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
    }
}
