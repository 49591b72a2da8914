//! The virtio-vsock event-loop subscriber: knows which fd fired (a queue kick, the listening
//! socket, a `CONNECT` handshake, or a connection's host stream) and runs the muxer.
//!
//! It runs on the VMM's event loop rather than a thread of its own: every fd is non-blocking
//! and each wake-up does a bounded amount of work (at most `BATCH` chains per queue), so it
//! cannot stall the other subscribers, and a guest or host peer that stops reading costs no
//! thread. Host fds are watched level-triggered and only for what can make progress now:
//! readable while the guest has credit and receive buffers, writable while guest data waits.
//! An fd that can do neither is taken off epoll entirely (so a hung-up stream cannot spin the
//! loop) and put back when credit or buffers arrive.
//!
//! Transmit chains are read while the control backlog has room; a guest that never posts
//! receive buffers therefore stops being read instead of making skiff queue replies.
//!
//! After a transport reset (a restored VM) nothing goes to the receive queue until the driver
//! has taken the reset event and handed an event buffer back (its event-queue kick), or
//! `RESET_ACK_WAIT` passed. Queues carry no order between them: a host `CONNECT` answered
//! while the driver still had the reset event unread would be accepted by the guest and then
//! dropped with every other socket when it read the event, leaving the host program with an
//! `OK` and a dead connection.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::timerfd::TimerFd;

use super::muxer::{Key, Muxer};
use super::packet::{read_tx, rx_room, write_rx, ChainError};
use super::MAX_PAYLOAD;
use crate::guest_memory::TrackedGuestMemory;
use crate::virtio::device::{ActivatedQueue, DeviceSignals, QueueProgress};
use crate::virtio::queue_ops::{
    add_used, needs_notification, next_chain, want_kicks, QueueFailure,
};

/// Event data tags; host fds use `FD_TAG + fd`.
const RX_KICK: u32 = 0;
const TX_KICK: u32 = 1;
const EVENT_KICK: u32 = 2;
const LISTENER: u32 = 3;
const CONNECT_TIMER: u32 = 4;
const FD_TAG: u32 = 16;

/// Most chains taken from one queue per wake-up before yielding to other subscribers.
const BATCH: usize = 256;

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// How long receive traffic waits for the driver to acknowledge a transport reset (by returning
/// an event buffer) before it flows anyway: a driver that never refills its event queue still
/// gets its packets.
const RESET_ACK_WAIT: Duration = Duration::from_millis(500);

/// The activated device's queues and connections, run by the event loop.
pub(crate) struct VsockQueueHandler {
    mem: TrackedGuestMemory,
    rx: ActivatedQueue,
    tx: ActivatedQueue,
    event: ActivatedQueue,
    /// The connection table, shared with the device (it outlives an activation).
    muxer: Arc<Mutex<Muxer>>,
    signals: Arc<dyn DeviceSignals>,
    stopped: Arc<AtomicBool>,
    broken: bool,
    /// The driver offered no receive chain last time one was wanted.
    rx_starved: bool,
    /// The transmit queue was left unread (control backlog full, or batch done).
    tx_pending: bool,
    /// A transport-reset event waits for an event buffer.
    reset_event_pending: bool,
    /// Receive traffic is held until the driver acknowledges the reset, or until this instant.
    reset_hold_until: Option<Instant>,
    /// The event queue's available index when the reset event went out: the driver has read
    /// the event once it offers a buffer past it.
    reset_avail: Option<u16>,
    /// Fires when the oldest unanswered host `CONNECT` times out.
    timer: Option<TimerFd>,
    /// Host fds on epoll and what for.
    watched: HashMap<RawFd, EventSet>,
    /// Every connection's interest must be recomputed (receive buffers ran out or came).
    resync_all: bool,
    buf: Box<[u8]>,
    warned: bool,
}

impl std::fmt::Debug for VsockQueueHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockQueueHandler")
            .field("broken", &self.broken)
            .field("rx_starved", &self.rx_starved)
            .finish_non_exhaustive()
    }
}

impl VsockQueueHandler {
    pub(crate) fn new(
        mem: TrackedGuestMemory,
        queues: [ActivatedQueue; 3],
        muxer: Arc<Mutex<Muxer>>,
        signals: Arc<dyn DeviceSignals>,
        stopped: Arc<AtomicBool>,
        reset_event_pending: bool,
    ) -> Self {
        let [rx, tx, event] = queues;
        Self {
            mem,
            rx,
            tx,
            event,
            muxer,
            signals,
            stopped,
            broken: false,
            rx_starved: false,
            tx_pending: false,
            reset_event_pending,
            reset_hold_until: reset_event_pending.then(|| Instant::now() + RESET_ACK_WAIT),
            reset_avail: None,
            timer: TimerFd::new()
                .map_err(|e| {
                    log::warn!(
                        "virtio-vsock: no CONNECT timer ({e}); unanswered host connects wait"
                    )
                })
                .ok(),
            watched: HashMap::new(),
            resync_all: false,
            buf: vec![0u8; MAX_PAYLOAD].into_boxed_slice(),
            warned: false,
        }
    }

    /// Where the three queues stand.
    pub(crate) fn progress(&self) -> Vec<QueueProgress> {
        vec![
            QueueProgress::of(&self.rx),
            QueueProgress::of(&self.tx),
            QueueProgress::of(&self.event),
        ]
    }

    fn halted(&self) -> bool {
        self.broken || self.stopped.load(Ordering::Acquire)
    }

    fn fail(&mut self, e: QueueFailure) {
        log::error!("virtio-vsock: {e}; the device needs a reset");
        self.broken = true;
        self.signals.set_needs_reset();
    }

    fn bad_chain(&mut self, m: &mut Muxer, e: &ChainError) {
        m.counters.dropped += 1;
        if self.warned {
            log::debug!("virtio-vsock: dropped {e}");
        } else {
            self.warned = true;
            log::warn!("virtio-vsock: dropped {e} (further drops are logged at debug level)");
        }
    }

    /// Takes transmit chains and hands their packets to the muxer.
    fn process_tx(&mut self, m: &mut Muxer) {
        self.tx_pending = false;
        let mut completed = 0;
        while !self.halted() {
            if completed == BATCH || m.control_full() {
                self.tx_pending = true;
                break;
            }
            let chain = match next_chain(&mut self.tx, &self.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => return self.fail(e),
            };
            let head = chain.head_index();
            match read_tx(&self.mem, chain, &mut self.buf) {
                Ok((header, len)) => m.guest_packet(&header, &self.buf[..len]),
                Err(e) => self.bad_chain(m, &e),
            }
            if let Err(e) = add_used(&mut self.tx, &self.mem, head, 0) {
                return self.fail(e);
            }
            completed += 1;
        }
        if completed > 0 && !self.halted() {
            notify(&self.mem, &*self.signals, &mut self.tx);
        }
    }

    /// Fills receive chains with what the muxer has for the guest.
    fn process_rx(&mut self, m: &mut Muxer) {
        if self.rx_held() {
            return;
        }
        let mut delivered = 0;
        while !self.halted() && m.has_rx_work() && delivered < BATCH {
            let chain = match next_chain(&mut self.rx, &self.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => {
                    // Out of receive chains: the driver's next refill must kick. One may have
                    // come in before the kick was asked for: look again.
                    match want_kicks(&mut self.rx, &self.mem, true) {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(e) => return self.fail(e),
                    }
                    if !self.rx_starved {
                        self.rx_starved = true;
                        self.resync_all = true;
                    }
                    break;
                }
                Err(e) => return self.fail(e),
            };
            let head = chain.head_index();
            let used = match rx_room(&chain) {
                Ok(room) => match m.next_for_guest(&mut self.buf[..room]) {
                    Some((header, len)) => {
                        match write_rx(&self.mem, chain, &header, &self.buf[..len]) {
                            Ok(used) => used,
                            Err(e) => {
                                m.undeliverable(&header);
                                self.bad_chain(m, &e);
                                0
                            }
                        }
                    }
                    None => {
                        // Nothing fits this chain now (or nothing was ready after all).
                        self.rx.queue.go_to_previous_position();
                        break;
                    }
                },
                Err(e) => {
                    self.bad_chain(m, &e);
                    0
                }
            };
            if let Err(e) = add_used(&mut self.rx, &self.mem, head, used) {
                return self.fail(e);
            }
            delivered += 1;
        }
        if delivered > 0 && !self.halted() {
            notify(&self.mem, &*self.signals, &mut self.rx);
        }
    }

    /// Asks the driver not to kick the receive queue when it adds chains: the device looks at
    /// the available ring whenever it has something for the guest, and asks for a kick again
    /// only when it finds the ring empty (`process_rx`). A driver refilling after every packet
    /// then costs no VM exit and no wake-up of this loop per packet.
    fn quiet_rx_refills(&mut self) {
        if let Err(e) = want_kicks(&mut self.rx, &self.mem, false) {
            self.fail(e);
        }
    }

    /// Whether receive traffic waits for the driver to see a transport reset.
    fn rx_held(&mut self) -> bool {
        self.check_reset_ack();
        match self.reset_hold_until {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                log::debug!("virtio-vsock: the driver did not acknowledge the transport reset");
                self.release_rx();
                false
            }
            None => false,
        }
    }

    /// Lets receive traffic flow again, and every connection's interest be recomputed.
    fn release_rx(&mut self) {
        self.reset_hold_until = None;
        self.resync_all = true;
    }

    /// The driver's available index of the event queue (None if unreadable).
    fn event_avail(&self) -> Option<u16> {
        self.event
            .queue
            .avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
            .ok()
            .map(|w| w.0)
    }

    /// Ends the hold once the driver has offered an event buffer since the reset went out
    /// (it handled the event and refilled the queue, as Linux does).
    fn check_reset_ack(&mut self) {
        if self.reset_hold_until.is_some()
            && self.reset_avail.is_some()
            && self.event_avail() != self.reset_avail
        {
            self.release_rx();
        }
    }

    /// Puts a pending transport-reset event into the next event buffer.
    fn process_event(&mut self) {
        if !self.reset_event_pending || self.halted() {
            return;
        }
        let chain = match next_chain(&mut self.event, &self.mem) {
            Ok(Some(chain)) => chain,
            Ok(None) => return,
            Err(e) => return self.fail(e),
        };
        let head = chain.head_index();
        let mut used = 0;
        if let Some(desc) = chain.clone().find(|d| d.is_write_only() && d.len() >= 4) {
            let written = self.mem.write_slice(
                &EVENT_TRANSPORT_RESET.to_le_bytes(),
                GuestAddress(desc.addr().0),
            );
            if written.is_ok() {
                used = 4;
                self.reset_event_pending = false;
                self.reset_avail = self.event_avail();
            }
        }
        if let Err(e) = add_used(&mut self.event, &self.mem, head, used) {
            return self.fail(e);
        }
        notify(&self.mem, &*self.signals, &mut self.event);
    }

    fn watch(&mut self, ops: &mut EventOps, fd: RawFd, set: EventSet) {
        let current = self.watched.get(&fd).copied();
        let tag = FD_TAG.wrapping_add(fd as u32);
        let done = match (current, set.is_empty()) {
            (None, true) => return,
            (Some(_), true) => {
                self.watched.remove(&fd);
                ops.remove(Events::empty(&fd))
            }
            (None, false) => {
                self.watched.insert(fd, set);
                ops.add(Events::with_data(&fd, tag, set))
            }
            (Some(c), false) if c != set => {
                self.watched.insert(fd, set);
                ops.modify(Events::with_data(&fd, tag, set))
            }
            (Some(_), false) => return,
        };
        if let Err(e) = done {
            log::warn!("virtio-vsock: cannot watch fd {fd}: {e:?}");
        }
    }

    /// Brings epoll in line with what each changed connection wants, and unregisters the
    /// streams of closed ones before they close.
    fn sync(&mut self, ops: &mut EventOps, m: &mut Muxer) {
        for stream in m.take_closed() {
            self.watch(ops, stream.as_raw_fd(), EventSet::empty());
        }
        let mut keys: Vec<Key> = m.take_dirty();
        if std::mem::take(&mut self.resync_all) {
            keys = m.keys();
        }
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            let held = self.reset_hold_until.is_some();
            let Some((stream, read, write)) = m.interest(key, self.rx_starved || held) else {
                continue;
            };
            let fd = stream.as_raw_fd();
            let mut set = EventSet::empty();
            if read {
                set |= EventSet::IN;
            }
            if write {
                set |= EventSet::OUT;
            }
            self.watch(ops, fd, set);
        }
    }

    fn host_fd_ready(&mut self, ops: &mut EventOps, m: &mut Muxer, fd: RawFd, set: EventSet) {
        if m.host().is_handshake(fd) {
            if m.handshake_ready(fd) {
                // Over: a connection may own the fd from now on (registered by `sync`).
                self.watch(ops, fd, EventSet::empty());
            }
            return;
        }
        match m.key_of(fd) {
            Some(key) => m.host_ready(
                key,
                set.contains(EventSet::IN),
                set.contains(EventSet::OUT),
                set.intersects(EventSet::HANG_UP | EventSet::ERROR),
            ),
            // A registration outliving its connection: drop it.
            None => self.watch(ops, fd, EventSet::empty()),
        }
    }

    fn accept(&mut self, ops: &mut EventOps, m: &mut Muxer) {
        for fd in m.host().accept() {
            self.watch(ops, fd, EventSet::IN);
        }
    }

    /// Runs everything that may have become possible, then updates epoll.
    fn run(&mut self, ops: &mut EventOps, m: &mut Muxer) {
        if self.tx_pending {
            self.process_tx(m);
        }
        self.process_rx(m);
        // Replies the receive queue just took may make room for more transmit chains.
        if self.tx_pending && !m.control_full() {
            self.process_tx(m);
            self.process_rx(m);
        }
        if self.tx_pending {
            // Batch done with chains left: come back after the other subscribers.
            let _ = self.tx.kick.write(1);
        }
        let now = Instant::now();
        let mut next_expiry = m.expire_requests(now);
        // Expired requests were reset: their RSTs go out now.
        self.process_rx(m);
        if let Some(until) = self.reset_hold_until {
            let left = until.saturating_duration_since(now);
            next_expiry = Some(next_expiry.map_or(left, |n| n.min(left)));
        }
        if let (Some(left), Some(timer)) = (next_expiry, &mut self.timer) {
            // A zero duration would disarm the timer.
            let _ = timer.reset(left.max(Duration::from_millis(1)), None);
        }
        self.sync(ops, m);
    }

    fn unwatch_all(&mut self, ops: &mut EventOps, m: &mut Muxer) {
        let _ = ops.remove(Events::empty(&self.rx.kick));
        let _ = ops.remove(Events::empty(&self.tx.kick));
        let _ = ops.remove(Events::empty(&self.event.kick));
        let _ = ops.remove(Events::empty(m.host().listener()));
        if let Some(timer) = &self.timer {
            let _ = ops.remove(Events::empty(timer));
        }
        for fd in std::mem::take(&mut self.watched).into_keys() {
            let _ = ops.remove(Events::empty(&fd));
        }
    }
}

fn notify(mem: &TrackedGuestMemory, signals: &dyn DeviceSignals, queue: &mut ActivatedQueue) {
    if needs_notification(queue, mem) {
        if let Err(e) = signals.notify_queue(queue.index) {
            log::warn!("virtio-vsock: cannot notify queue {}: {e}", queue.index);
        }
    }
}

impl MutEventSubscriber for VsockQueueHandler {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let muxer = self.muxer.clone();
        let mut guard = muxer.lock().unwrap_or_else(PoisonError::into_inner);
        let m = &mut *guard;
        if self.halted() {
            self.unwatch_all(ops, m);
            return;
        }
        match events.data() {
            RX_KICK => {
                let _ = self.rx.kick.read();
                if self.rx_starved {
                    self.rx_starved = false;
                    self.resync_all = true;
                    self.quiet_rx_refills();
                }
            }
            TX_KICK => {
                let _ = self.tx.kick.read();
                self.tx_pending = true;
            }
            EVENT_KICK => {
                let _ = self.event.kick.read();
                self.process_event();
                self.check_reset_ack();
            }
            LISTENER => self.accept(ops, m),
            CONNECT_TIMER => {
                if let Some(timer) = &mut self.timer {
                    // Readable: expired, so this does not block.
                    let _ = timer.wait();
                }
            }
            tag if tag >= FD_TAG => {
                let fd = (tag - FD_TAG) as RawFd;
                self.host_fd_ready(ops, m, fd, events.event_set());
            }
            _ => {}
        }
        self.run(ops, m);
        if self.broken {
            self.unwatch_all(ops, m);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let muxer = self.muxer.clone();
        let mut guard = muxer.lock().unwrap_or_else(PoisonError::into_inner);
        let m = &mut *guard;
        let fixed = [
            Events::with_data(&self.rx.kick, RX_KICK, EventSet::IN),
            Events::with_data(&self.tx.kick, TX_KICK, EventSet::IN),
            Events::with_data(&self.event.kick, EVENT_KICK, EventSet::IN),
            Events::with_data(m.host().listener(), LISTENER, EventSet::IN),
        ];
        for events in fixed {
            if let Err(e) = ops.add(events) {
                log::error!("virtio-vsock: cannot watch a queue kick or the listener: {e:?}");
            }
        }
        if let Some(timer) = &self.timer {
            if let Err(e) = ops.add(Events::with_data(timer, CONNECT_TIMER, EventSet::IN)) {
                log::warn!("virtio-vsock: cannot watch the CONNECT timer: {e:?}");
            }
        }
        let handshakes: Vec<RawFd> = m
            .host()
            .handshake_streams()
            .map(AsRawFd::as_raw_fd)
            .collect();
        for fd in handshakes {
            self.watch(ops, fd, EventSet::IN);
        }
        // A resumed device continues with what it had; a restored one announces the reset.
        self.quiet_rx_refills();
        self.resync_all = true;
        self.tx_pending = true;
        self.process_event();
        self.run(ops, m);
    }
}
