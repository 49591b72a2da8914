//! The virtio-net event-loop subscriber: knows which fd fired (a receive-queue kick, a
//! transmit-queue kick, or the tap becoming readable) and moves frames accordingly.
//!
//! Receive: a frame is read from the tap first and kept until enough receive chains are
//! available (one, or several with mergeable receive buffers, handed over in one used-index
//! update); when the driver has too few buffers the tap is taken off the loop (so a level-triggered
//! readable tap cannot spin it) and put back on the next receive kick. Transmit: every
//! available chain is gathered and written to the tap; chains that cannot be used are
//! returned with length 0. A queue the device can no longer use safely (an available index
//! beyond the queue size, a head index out of range, a used ring outside memory) marks the
//! device `NEEDS_RESET` and the handler stops.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::QueueT;

use super::frames::{gather_tx, FrameError, RxBuffers};
use super::tap::Tap;
use super::{MAX_BUFFER_LEN, RX_QUEUE, TX_QUEUE, VNET_HDR_LEN};
use crate::guest_memory::TrackedGuestMemory;
use crate::virtio::device::{ActivatedQueue, DeviceSignals, QueueProgress};
use crate::virtio::queue_ops::{
    add_used, add_used_together, needs_notification, needs_notification_since, next_chain,
    QueueFailure,
};

/// Event data tags.
const RX_KICK: u32 = 0;
const TX_KICK: u32 = 1;
const TAP_READABLE: u32 = 2;

/// Most frames moved per wake-up before yielding to other subscribers.
const BATCH: usize = 256;

/// What the device has done, for tests and diagnostics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames the guest sent that reached the tap.
    pub tx_frames: u64,
    /// Transmit chains returned unused (malformed) or whose write to the tap failed.
    pub tx_dropped: u64,
    /// Frames delivered into the guest's receive buffers.
    pub rx_frames: u64,
    /// Frames from the tap that could not be delivered (malformed or too small buffers).
    pub rx_dropped: u64,
}

/// What became of the frame waiting for receive buffers.
enum RxOutcome {
    /// Delivered, or dropped with its chains returned.
    Done,
    /// The driver offers too few buffers for it: kept for the next receive kick.
    NoBuffers,
}

/// Receive features the driver accepted.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RxFeatures {
    /// VIRTIO_NET_F_GUEST_CSUM: the header's flags reach the driver.
    pub(crate) guest_csum: bool,
    /// VIRTIO_NET_F_MRG_RXBUF: a frame may span receive chains.
    pub(crate) mrg_rxbuf: bool,
}

/// The activated device's queues and host side, run by the event loop.
pub(crate) struct NetQueueHandler {
    mem: TrackedGuestMemory,
    rx: ActivatedQueue,
    tx: ActivatedQueue,
    tap: Arc<Tap>,
    signals: Arc<dyn DeviceSignals>,
    /// The driver accepted VIRTIO_NET_F_GUEST_CSUM; without it the header's flags must be 0.
    guest_csum: bool,
    /// The driver accepted VIRTIO_NET_F_MRG_RXBUF: a frame may span receive chains.
    mrg_rxbuf: bool,
    /// Set by `reset`: do nothing more with guest memory.
    stopped: Arc<AtomicBool>,
    /// The queues are unusable; the driver was told to reset.
    broken: bool,
    tap_watched: bool,
    rx_buf: Box<[u8]>,
    /// Length of a frame read from the tap and not yet delivered.
    rx_pending: Option<usize>,
    /// The receive chains taken for the frame being delivered.
    rx_bufs: RxBuffers,
    /// Used entries of the frame being delivered.
    rx_used: Vec<(u16, u32)>,
    /// The receive queue's used index when the device last decided whether to notify.
    rx_notified_at: u16,
    tx_buf: Box<[u8]>,
    counters: NetCounters,
}

impl std::fmt::Debug for NetQueueHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetQueueHandler")
            .field("tap", &self.tap.name())
            .field("broken", &self.broken)
            .field("tap_watched", &self.tap_watched)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl NetQueueHandler {
    pub(crate) fn new(
        mem: TrackedGuestMemory,
        rx: ActivatedQueue,
        tx: ActivatedQueue,
        tap: Arc<Tap>,
        signals: Arc<dyn DeviceSignals>,
        offloads: RxFeatures,
        stopped: Arc<AtomicBool>,
    ) -> Self {
        let rx_notified_at = rx.queue.next_used();
        Self {
            mem,
            rx,
            tx,
            tap,
            signals,
            guest_csum: offloads.guest_csum,
            mrg_rxbuf: offloads.mrg_rxbuf,
            stopped,
            broken: false,
            tap_watched: false,
            rx_buf: vec![0u8; MAX_BUFFER_LEN].into_boxed_slice(),
            rx_pending: None,
            rx_bufs: RxBuffers::default(),
            rx_used: Vec::new(),
            rx_notified_at,
            tx_buf: vec![0u8; MAX_BUFFER_LEN].into_boxed_slice(),
            counters: NetCounters::default(),
        }
    }

    pub(crate) fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Where the receive and transmit queues stand.
    pub(crate) fn progress(&self) -> Vec<QueueProgress> {
        vec![QueueProgress::of(&self.rx), QueueProgress::of(&self.tx)]
    }

    fn halted(&self) -> bool {
        self.broken || self.stopped.load(Ordering::Acquire)
    }

    fn bad_chain(&mut self, e: &FrameError) {
        crate::guest_warn!(
            self.signals.guest_warnings(),
            "bad frame",
            "virtio-net {}: dropped {e}",
            self.tap.name()
        );
    }

    fn fail(&mut self, e: QueueFailure) {
        crate::guest_warn!(
            self.signals.guest_warnings(),
            "broken queue",
            "virtio-net {}: {e}; the device needs a reset",
            self.tap.name()
        );
        self.broken = true;
        self.signals.set_needs_reset();
    }

    fn signal(&self, queue: u16) {
        if let Err(e) = self.signals.notify_queue(queue) {
            log::warn!(
                "virtio-net {}: cannot notify queue {queue}: {e}",
                self.tap.name()
            );
        }
    }

    fn watch_tap(&mut self, ops: &mut EventOps, watch: bool) {
        if watch == self.tap_watched {
            return;
        }
        let events = Events::with_data(&*self.tap, TAP_READABLE, EventSet::IN);
        let done = if watch {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match done {
            Ok(()) => self.tap_watched = watch,
            Err(e) => log::error!(
                "virtio-net {}: cannot (un)watch the tap: {e:?}",
                self.tap.name()
            ),
        }
    }

    /// Moves frames from the tap into receive buffers until either runs out. Returns whether
    /// the tap should leave the loop until the next receive kick (the driver has too few
    /// buffers for the frame waiting, or reading the tap failed).
    pub(crate) fn process_rx(&mut self) -> bool {
        let mut wait_for_kick = false;
        for _ in 0..BATCH {
            if self.halted() {
                break;
            }
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.rx_buf) {
                    Ok(len) if len < VNET_HDR_LEN || len > self.rx_buf.len() => {
                        self.counters.rx_dropped += 1;
                        continue;
                    }
                    Ok(len) => len,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // Retried on the next receive kick rather than spinning on an error.
                        log::warn!("virtio-net {}: reading the tap: {e}", self.tap.name());
                        wait_for_kick = true;
                        break;
                    }
                },
            };
            self.rx_pending = Some(len);
            match self.deliver(len) {
                Ok(RxOutcome::Done) => self.rx_pending = None,
                Ok(RxOutcome::NoBuffers) => {
                    // Keep the frame, stop watching the tap until a receive kick.
                    wait_for_kick = true;
                    break;
                }
                Err(e) => {
                    self.fail(e);
                    return true;
                }
            }
        }
        if self.rx.queue.next_used() != self.rx_notified_at && !self.halted() {
            let since = self.rx_notified_at;
            self.rx_notified_at = self.rx.queue.next_used();
            if needs_notification_since(&self.rx, &self.mem, since) {
                self.signal(RX_QUEUE);
            }
        }
        wait_for_kick
    }

    /// Puts the `len`-byte frame in `rx_buf` into receive chains: one chain, or with
    /// mergeable buffers as many as it needs. When the driver offers too few, the chains are
    /// left on the ring and the frame is kept for the next kick. A chain that cannot take a
    /// frame (wrong direction, outside memory, shorter than the header), or a whole ring too
    /// small for it, drops the frame and returns its chains with length 0.
    fn deliver(&mut self, len: usize) -> Result<RxOutcome, QueueFailure> {
        if !self.guest_csum {
            // The tap may mark frames DATA_VALID; a driver without GUEST_CSUM gets flags 0
            // (its frames are fully checksummed: the tap's offloads are off).
            self.rx_buf[0] = 0;
        }
        let most = if self.mrg_rxbuf {
            usize::from(self.rx.queue.size())
        } else {
            1
        };
        let start = self.rx.queue.next_avail();
        self.rx_bufs.clear();
        self.rx_used.clear();
        let mut refused_head = None;
        let refused = loop {
            let Some(chain) = next_chain(&mut self.rx, &self.mem)? else {
                // Not enough yet: the chains go back on the ring until the driver adds more.
                self.rx.queue.set_next_avail(start);
                return Ok(RxOutcome::NoBuffers);
            };
            let head = chain.head_index();
            if let Err(e) = self.rx_bufs.push(&self.mem, chain) {
                refused_head = Some(head);
                break Some(e);
            }
            if self.rx_bufs.room() >= len as u64 {
                break None;
            }
            if self.rx_bufs.len() >= most {
                break Some(FrameError::NoRoom {
                    head: self.rx_bufs.heads().next().unwrap_or(head),
                    room: self.rx_bufs.room(),
                    needed: len,
                });
            }
        };
        let written = match refused {
            Some(e) => Err(e),
            None => self
                .rx_bufs
                .write(&self.mem, &mut self.rx_buf[..len], &mut self.rx_used),
        };
        match written {
            Ok(()) => self.counters.rx_frames += 1,
            Err(e) => {
                self.counters.rx_dropped += 1;
                self.bad_chain(&e);
                // Every chain the frame took goes back empty (a failed write may have
                // recorded some already).
                self.rx_used.clear();
                self.rx_used.extend(
                    self.rx_bufs
                        .heads()
                        .chain(refused_head)
                        .map(|head| (head, 0)),
                );
            }
        }
        add_used_together(&mut self.rx, &self.mem, &self.rx_used)?;
        Ok(RxOutcome::Done)
    }

    /// Sends every available transmit chain to the tap.
    fn process_tx(&mut self) {
        let mut completed = 0;
        while !self.halted() {
            if completed == BATCH {
                // Come back after the other subscribers had their turn.
                let _ = self.tx.kick.write(1);
                break;
            }
            let chain = match next_chain(&mut self.tx, &self.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => return self.fail(e),
            };
            let head = chain.head_index();
            match gather_tx(&self.mem, chain, &mut self.tx_buf) {
                Ok(len) => match self.tap.write_frame(&self.tx_buf[..len]) {
                    Ok(_) => self.counters.tx_frames += 1,
                    Err(e) => {
                        self.counters.tx_dropped += 1;
                        log::debug!("virtio-net {}: writing to the tap: {e}", self.tap.name());
                    }
                },
                Err(e) => {
                    self.counters.tx_dropped += 1;
                    self.bad_chain(&e);
                }
            }
            if let Err(e) = add_used(&mut self.tx, &self.mem, head, 0) {
                return self.fail(e);
            }
            completed += 1;
        }
        // A used ring the guest asked not to be interrupted for: no notification.
        if completed > 0 && !self.halted() && needs_notification(&mut self.tx, &self.mem) {
            self.signal(TX_QUEUE);
        }
    }

    fn unwatch_all(&mut self, ops: &mut EventOps) {
        let _ = ops.remove(Events::empty(&self.rx.kick));
        let _ = ops.remove(Events::empty(&self.tx.kick));
        self.watch_tap(ops, false);
    }
}

impl MutEventSubscriber for NetQueueHandler {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.halted() {
            self.unwatch_all(ops);
            return;
        }
        match events.data() {
            RX_KICK => {
                let _ = self.rx.kick.read();
                let wait_for_kick = self.process_rx();
                self.watch_tap(ops, !wait_for_kick);
            }
            TX_KICK => {
                let _ = self.tx.kick.read();
                self.process_tx();
            }
            TAP_READABLE => {
                let wait_for_kick = self.process_rx();
                self.watch_tap(ops, !wait_for_kick);
            }
            _ => {}
        }
        if self.broken {
            self.unwatch_all(ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let kicks = [
            Events::with_data(&self.rx.kick, RX_KICK, EventSet::IN),
            Events::with_data(&self.tx.kick, TX_KICK, EventSet::IN),
        ];
        for events in kicks {
            if let Err(e) = ops.add(events) {
                log::error!(
                    "virtio-net {}: cannot watch a queue kick: {e:?}",
                    self.tap.name()
                );
            }
        }
        self.watch_tap(ops, true);
    }
}
