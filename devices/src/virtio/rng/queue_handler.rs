//! The virtio-rng queue handler: an `event-manager` subscriber on the queue's kick eventfd. On a
//! kick it fills every available request and returns it to the used ring, then notifies the
//! driver if it asked to be. A request the device cannot serve (a device-readable buffer, an
//! address outside guest memory) or a broken ring marks the device `DEVICE_NEEDS_RESET`, after
//! which the handler leaves the queue alone until the device is reset.

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::request::fill_request;
use crate::guest_memory::TrackedGuestMemory;
use crate::virtio::device::{ActivatedQueue, DeviceSignals, QueueProgress};
use crate::virtio::queue_ops::{add_used, needs_notification, next_chain};

/// Serves the request queue.
pub(super) struct RngQueueHandler {
    mem: TrackedGuestMemory,
    queue: ActivatedQueue,
    signals: Arc<dyn DeviceSignals>,
    /// Set when the device is broken or reset: do nothing more.
    stopped: bool,
}

impl std::fmt::Debug for RngQueueHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RngQueueHandler")
            .field("queue", &self.queue.index)
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

impl RngQueueHandler {
    pub(super) fn new(
        mem: TrackedGuestMemory,
        queue: ActivatedQueue,
        signals: Arc<dyn DeviceSignals>,
    ) -> Self {
        Self {
            mem,
            queue,
            signals,
            stopped: false,
        }
    }

    /// Stops serving the queue (the device was reset).
    pub(super) fn stop(&mut self) {
        self.stopped = true;
    }

    /// Where the queue stands.
    pub(super) fn progress(&self) -> QueueProgress {
        QueueProgress::of(&self.queue)
    }

    fn fail(&mut self, what: &dyn std::fmt::Display) {
        crate::guest_warn!(
            self.signals.guest_warnings(),
            "bad chain",
            "virtio rng: {what}; device needs reset"
        );
        self.stopped = true;
        self.signals.set_needs_reset();
    }

    /// Serves every available request.
    pub(super) fn process_queue(&mut self) {
        let mut used = false;
        while !self.stopped {
            let chain = match next_chain(&mut self.queue, &self.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => return self.fail(&e),
            };
            let head = chain.head_index();
            let len = match fill_request(&self.mem, chain) {
                Ok(len) => len,
                Err(e) => return self.fail(&e),
            };
            if let Err(e) = add_used(&mut self.queue, &self.mem, head, len) {
                return self.fail(&e);
            }
            used = true;
        }
        if used && needs_notification(&mut self.queue, &self.mem) {
            if let Err(e) = self.signals.notify_queue(self.queue.index) {
                log::warn!("virtio rng: cannot notify the driver: {e}");
            }
        }
    }
}

impl MutEventSubscriber for RngQueueHandler {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.stopped {
            // Leave the loop without draining the kick: after a reset the next activation's
            // handler watches the same eventfd, and this one is removed only when the loop runs
            // its messages, after the ready fds. A drained kick would be lost to it.
            let _ = ops.remove(Events::empty(&self.queue.kick));
            return;
        }
        if events.event_set().contains(EventSet::IN) {
            // Draining the counter; the queue itself says what is to do.
            let _ = self.queue.kick.read();
        }
        self.process_queue();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue.kick, EventSet::IN)) {
            log::error!("virtio rng: cannot watch the queue's kick eventfd: {e:?}");
        }
    }
}
