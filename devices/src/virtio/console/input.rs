//! `ConsoleInput`: the host's way to type into the virtio console. Whoever reads host input
//! (the VMM's stdin reader) calls `enqueue`; the bytes wait in a bounded buffer until the
//! driver offers receive buffers, and an eventfd wakes the console's queue handler.
//!
//! The handle outlives driver resets: input typed before the driver starts, or between a
//! reset and the next activation, is kept (up to `INPUT_CAPACITY` bytes).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Most host bytes held for the guest; `enqueue` takes no more until the guest reads.
pub const INPUT_CAPACITY: usize = 64 * 1024;

#[derive(Debug)]
struct Shared {
    bytes: Mutex<VecDeque<u8>>,
    wake: EventFd,
}

/// A cloneable handle that queues host input for the guest's console.
#[derive(Debug, Clone)]
pub struct ConsoleInput {
    shared: Arc<Shared>,
}

impl ConsoleInput {
    /// An empty input queue.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            shared: Arc::new(Shared {
                bytes: Mutex::new(VecDeque::new()),
                wake: EventFd::new(EFD_NONBLOCK)?,
            }),
        })
    }

    /// Queues as many leading bytes of `bytes` as fit and returns how many it took (fewer
    /// than `bytes.len()`, possibly 0, when the buffer is full: keep the rest and retry once
    /// [`Self::space`] is non-zero).
    pub fn enqueue(&self, bytes: &[u8]) -> usize {
        let taken = {
            let mut queued = self.lock();
            let taken = bytes.len().min(INPUT_CAPACITY.saturating_sub(queued.len()));
            queued.extend(&bytes[..taken]);
            taken
        };
        if taken > 0 {
            self.wake();
        }
        taken
    }

    /// Free room in bytes.
    pub fn space(&self) -> usize {
        INPUT_CAPACITY.saturating_sub(self.lock().len())
    }

    /// Bytes waiting for the guest.
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<u8>> {
        self.shared
            .bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(&self) {
        // A saturated counter already means "wake up"; nothing else can fail here.
        let _ = self.shared.wake.write(1);
    }

    /// The eventfd that becomes readable when input arrives.
    pub(crate) fn wake_fd(&self) -> &EventFd {
        &self.shared.wake
    }

    /// Clears the wake-up eventfd.
    pub(crate) fn drain_wake(&self) {
        let _ = self.shared.wake.read();
    }

    /// Passes the queued bytes (as at most two slices, oldest first) to `f`, which returns
    /// how many it consumed; those are removed.
    pub(crate) fn consume(&self, f: impl FnOnce(&[u8], &[u8]) -> usize) -> usize {
        let mut queued = self.lock();
        let (a, b) = queued.as_slices();
        let n = f(a, b).min(queued.len());
        queued.drain(..n);
        n
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn enqueue_is_bounded_and_wakes() {
        let input = ConsoleInput::new().unwrap();
        assert!(input.wake_fd().read().is_err(), "nothing queued yet");
        assert_eq!(input.enqueue(b"abc"), 3);
        assert_eq!(input.wake_fd().read().unwrap(), 1);
        let big = vec![b'x'; INPUT_CAPACITY];
        assert_eq!(input.enqueue(&big), INPUT_CAPACITY - 3);
        assert_eq!(input.space(), 0);
        assert_eq!(input.enqueue(b"more"), 0);
        input.drain_wake();
        assert!(
            input.wake_fd().read().is_err(),
            "a refused enqueue does not wake"
        );
    }

    #[test]
    fn consume_takes_oldest_first() {
        let input = ConsoleInput::new().unwrap();
        input.enqueue(b"hello");
        let n = input.consume(|a, _| {
            assert_eq!(a, b"hello");
            2
        });
        assert_eq!(n, 2);
        assert_eq!(input.pending(), 3);
        input.consume(|a, b| {
            assert_eq!([a, b].concat(), b"llo");
            usize::MAX
        });
        assert_eq!(input.pending(), 0);
    }
}
