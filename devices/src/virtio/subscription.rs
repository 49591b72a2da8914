//! A device's queue handler registered with the event loop, and its removal on reset.
//!
//! Both directions go through `RemoteEndpoint::fire`, never `call_blocking`: `activate` and
//! `reset` run on a vCPU thread (or, on restore, possibly on the event-loop thread itself), and
//! waiting there for the loop could deadlock. The loop runs messages in order, so a removal
//! always finds the id its addition stored. Stopping the handler's work at once is the
//! device's job (a flag checked under the handler's lock); this only detaches its fds.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

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

/// One activation's queue handler: registered with the event loop, with the flag that stops its
/// work. `stop` is a device's `reset`: after it returns no handler run touches guest memory.
pub struct ActiveHandler<H> {
    handler: Arc<Mutex<H>>,
    stopped: Arc<AtomicBool>,
    subscription: LoopSubscription,
}

impl<H> std::fmt::Debug for ActiveHandler<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveHandler")
            .field("subscription", &self.subscription)
            .finish_non_exhaustive()
    }
}

impl<H: MutEventSubscriber + Send + 'static> ActiveHandler<H> {
    /// Registers `handler`, which checks `stopped` under its own lock before each run.
    pub fn start(event_loop: &EventLoop, stopped: Arc<AtomicBool>, handler: H) -> io::Result<Self> {
        let handler = Arc::new(Mutex::new(handler));
        let subscription = LoopSubscription::add(event_loop, handler.clone())?;
        Ok(Self {
            handler,
            stopped,
            subscription,
        })
    }

    /// The handler, locked (for counters and tests).
    pub fn handler(&self) -> MutexGuard<'_, H> {
        self.handler.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops the handler like `stop`, first reading what `last` returns from it (for a
    /// snapshot: the queues' positions) while no run can start in between.
    pub fn stop_with<T>(self, last: impl FnOnce(&mut H) -> T) -> T {
        let out = {
            let mut handler = self.handler();
            self.stopped.store(true, Ordering::Release);
            last(&mut handler)
        };
        self.subscription.remove();
        out
    }

    /// Stops the handler, waits for a run in progress, and detaches it from the loop.
    pub fn stop(self) {
        self.stopped.store(true, Ordering::Release);
        // Taking the lock waits for a handler run in progress.
        drop(self.handler());
        self.subscription.remove();
    }
}
