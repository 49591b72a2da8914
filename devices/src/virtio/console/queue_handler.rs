//! The virtio-console event-loop subscriber: guest output from transmitq0 goes to the
//! console's writer; host input waiting in `ConsoleInput` goes into receiveq0's buffers.
//!
//! Every chain is checked whole (direction, guest addresses) before any byte moves; a chain
//! that fails is returned with length 0 and its bytes neither printed nor consumed. Queue-level
//! failures mark the device `NEEDS_RESET` and the handler stops.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::input::ConsoleInput;
use crate::guest_memory::TrackedGuestMemory;
use crate::virtio::device::{ActivatedQueue, DeviceSignals, QueueProgress};
use crate::virtio::queue_ops::{add_used, needs_notification, next_chain, QueueFailure};

const RX_KICK: u32 = 0;
const TX_KICK: u32 = 1;
const INPUT: u32 = 2;

/// Most chains handled per wake-up before yielding to other subscribers.
const BATCH: usize = 256;
/// Bytes copied from the guest per write to the output.
const COPY_CHUNK: usize = 4096;

/// Where guest output goes, shared by every activation of one console.
pub(crate) type SharedOutput = Arc<Mutex<Box<dyn Write + Send>>>;

/// What the console has done, for tests and diagnostics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleCounters {
    /// Guest output bytes handed to the writer.
    pub tx_bytes: u64,
    /// Host input bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Chains returned unused because they were malformed.
    pub bad_chains: u64,
    /// Guest output bytes the writer refused.
    pub lost_bytes: u64,
}

/// The activated console's queues, run by the event loop.
pub(crate) struct ConsoleQueueHandler {
    mem: TrackedGuestMemory,
    rx: ActivatedQueue,
    tx: ActivatedQueue,
    input: ConsoleInput,
    output: SharedOutput,
    signals: Arc<dyn DeviceSignals>,
    stopped: Arc<AtomicBool>,
    broken: bool,
    counters: ConsoleCounters,
}

impl std::fmt::Debug for ConsoleQueueHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleQueueHandler")
            .field("broken", &self.broken)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// The chain's descriptors as (address, length), if all have direction `writable` and lie in
/// guest memory.
fn checked_buffers(
    mem: &TrackedGuestMemory,
    chain: DescriptorChain<&TrackedGuestMemory>,
    writable: bool,
) -> Option<Vec<(GuestAddress, usize)>> {
    let access = if writable {
        Permissions::Write
    } else {
        Permissions::Read
    };
    chain
        .map(|desc| {
            let len = desc.len() as usize;
            (desc.is_write_only() == writable && mem.check_range(desc.addr(), len, access))
                .then_some((desc.addr(), len))
        })
        .collect()
}

impl ConsoleQueueHandler {
    pub(crate) fn new(
        mem: TrackedGuestMemory,
        rx: ActivatedQueue,
        tx: ActivatedQueue,
        input: ConsoleInput,
        output: SharedOutput,
        signals: Arc<dyn DeviceSignals>,
        stopped: Arc<AtomicBool>,
    ) -> Self {
        Self {
            mem,
            rx,
            tx,
            input,
            output,
            signals,
            stopped,
            broken: false,
            counters: ConsoleCounters::default(),
        }
    }

    pub(crate) fn counters(&self) -> ConsoleCounters {
        self.counters
    }

    /// Where the receive and transmit queues stand.
    pub(crate) fn progress(&self) -> Vec<QueueProgress> {
        vec![QueueProgress::of(&self.rx), QueueProgress::of(&self.tx)]
    }

    /// Serves both queues once, as kicks of each would (the fuzzing seam's way in).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn serve_queues(&mut self) {
        self.process_tx();
        self.process_rx();
    }

    /// Whether a queue failure marked the device broken.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn broken(&self) -> bool {
        self.broken
    }

    fn halted(&self) -> bool {
        self.broken || self.stopped.load(Ordering::Acquire)
    }

    fn fail(&mut self, e: QueueFailure) {
        crate::guest_warn!(
            self.signals.guest_warnings(),
            "bad chain",
            "virtio-console: {e}; the device needs a reset"
        );
        self.broken = true;
        self.signals.set_needs_reset();
    }

    fn notify(&mut self, rx: bool) {
        let queue = if rx { &mut self.rx } else { &mut self.tx };
        if needs_notification(queue, &self.mem) {
            if let Err(e) = self.signals.notify_queue(queue.index) {
                log::warn!("virtio-console: cannot notify queue {}: {e}", queue.index);
            }
        }
    }

    /// Copies queued host input into receive buffers while both last.
    fn process_rx(&mut self) {
        let mut used_any = false;
        for _ in 0..BATCH {
            if self.halted() || self.input.pending() == 0 {
                break;
            }
            let chain = match next_chain(&mut self.rx, &self.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => return self.fail(e),
            };
            let head = chain.head_index();
            let written = match checked_buffers(&self.mem, chain, true) {
                Some(bufs) => self.fill(&bufs),
                None => {
                    self.counters.bad_chains += 1;
                    0
                }
            };
            if let Err(e) = add_used(&mut self.rx, &self.mem, head, written) {
                return self.fail(e);
            }
            used_any = true;
        }
        if used_any && !self.halted() {
            self.notify(true);
        }
    }

    /// Moves queued input into `bufs`; returns the byte count.
    fn fill(&mut self, bufs: &[(GuestAddress, usize)]) -> u32 {
        let mem = &self.mem;
        let taken = self.input.consume(|a, b| {
            let mut src = a.iter().chain(b.iter()).copied();
            let mut done = 0usize;
            let mut chunk = Vec::new();
            for &(addr, len) in bufs {
                chunk.clear();
                chunk.extend(src.by_ref().take(len));
                if chunk.is_empty() || mem.write_slice(&chunk, addr).is_err() {
                    break;
                }
                done += chunk.len();
            }
            done
        });
        self.counters.rx_bytes += taken as u64;
        // At most INPUT_CAPACITY bytes are queued, far below u32::MAX.
        u32::try_from(taken).unwrap_or(u32::MAX)
    }

    /// Writes every available transmit chain to the output.
    fn process_tx(&mut self) {
        let mut completed = 0;
        while !self.halted() {
            if completed == BATCH {
                let _ = self.tx.kick.write(1);
                break;
            }
            let chain = match next_chain(&mut self.tx, &self.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => return self.fail(e),
            };
            let head = chain.head_index();
            match checked_buffers(&self.mem, chain, false) {
                Some(bufs) => self.print(&bufs),
                None => self.counters.bad_chains += 1,
            }
            if let Err(e) = add_used(&mut self.tx, &self.mem, head, 0) {
                return self.fail(e);
            }
            completed += 1;
        }
        if completed > 0 && !self.halted() {
            self.notify(false);
        }
    }

    fn print(&mut self, bufs: &[(GuestAddress, usize)]) {
        let mut out = self.output.lock().unwrap_or_else(PoisonError::into_inner);
        let mut chunk = [0u8; COPY_CHUNK];
        for &(addr, len) in bufs {
            let mut off = 0;
            while off < len {
                let n = (len - off).min(COPY_CHUNK);
                let Some(at) = addr.0.checked_add(off as u64) else {
                    return;
                };
                if self
                    .mem
                    .read_slice(&mut chunk[..n], GuestAddress(at))
                    .is_err()
                {
                    return;
                }
                match out.write_all(&chunk[..n]) {
                    Ok(()) => self.counters.tx_bytes += n as u64,
                    Err(_) => self.counters.lost_bytes += n as u64,
                }
                off += n;
            }
        }
        let _ = out.flush();
    }

    fn unwatch_all(&mut self, ops: &mut EventOps) {
        let _ = ops.remove(Events::empty(&self.rx.kick));
        let _ = ops.remove(Events::empty(&self.tx.kick));
        let _ = ops.remove(Events::empty(self.input.wake_fd()));
    }
}

impl MutEventSubscriber for ConsoleQueueHandler {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.halted() {
            self.unwatch_all(ops);
            return;
        }
        match events.data() {
            RX_KICK => {
                let _ = self.rx.kick.read();
                self.process_rx();
            }
            TX_KICK => {
                let _ = self.tx.kick.read();
                self.process_tx();
            }
            INPUT => {
                self.input.drain_wake();
                self.process_rx();
            }
            _ => {}
        }
        if self.broken {
            self.unwatch_all(ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let watched = [
            Events::with_data(&self.rx.kick, RX_KICK, EventSet::IN),
            Events::with_data(&self.tx.kick, TX_KICK, EventSet::IN),
            Events::with_data(self.input.wake_fd(), INPUT, EventSet::IN),
        ];
        for events in watched {
            if let Err(e) = ops.add(events) {
                log::error!("virtio-console: cannot watch an event: {e:?}");
            }
        }
        // Input typed before the driver started waits for its first buffers.
        self.process_rx();
    }
}
