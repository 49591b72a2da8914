//! A device's queue handler registered with the event loop, and its removal on reset.
//!
//! Both directions go through `RemoteEndpoint::fire`, never `call_blocking`: `activate` and
//! `reset` run on a vCPU thread (or, on restore, possibly on the event-loop thread itself), and
//! waiting there for the loop could deadlock. The loop runs messages in order, so a removal
//! always finds the id its addition stored. Stopping the handler's work at once is the
//! device's job (a flag checked under the handler's lock); this only detaches its fds.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use event_manager::{MutEventSubscriber, SubscriberId};

use super::device::EventLoop;

/// A handler the event loop runs until [`Self::remove`] (or drop).
pub struct LoopSubscription {
    event_loop: EventLoop,
    id: Arc<Mutex<Option<SubscriberId>>>,
    removed: bool,
}

impl std::fmt::Debug for LoopSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopSubscription")
            .field("removed", &self.removed)
            .finish_non_exhaustive()
    }
}

fn endpoint_error(e: event_manager::Error) -> io::Error {
    io::Error::other(format!("event loop: {e:?}"))
}

impl LoopSubscription {
    /// Asks the loop to add `handler` (its `init` then registers its fds on the loop thread).
    pub fn add(
        event_loop: &EventLoop,
        handler: Arc<Mutex<dyn MutEventSubscriber + Send>>,
    ) -> io::Result<Self> {
        let id = Arc::new(Mutex::new(None));
        let slot = id.clone();
        event_loop
            .fire(move |ops| {
                let added = ops.add_subscriber(handler);
                *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(added);
            })
            .map_err(endpoint_error)?;
        Ok(Self {
            event_loop: event_loop.clone(),
            id,
            removed: false,
        })
    }

    /// Asks the loop to drop the handler and all the fds it watches.
    pub fn remove(mut self) {
        self.detach();
    }

    fn detach(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        let slot = self.id.clone();
        let sent = self.event_loop.fire(move |ops| {
            let id = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some(id) = id {
                // The handler may already be gone if the loop is shutting down.
                let _ = ops.remove_subscriber(id);
            }
        });
        // Fails only when the loop is gone, and its subscribers with it.
        let _ = sent;
    }
}

impl Drop for LoopSubscription {
    fn drop(&mut self) {
        self.detach();
    }
}
