//! The virtio-blk queue handler, a subscriber on the disk thread's loop (`disk_thread`): knows
//! which fd fired (a queue's kick eventfd, or the I/O engine's completion eventfd) and moves
//! requests between the queues and the engine.
//!
//! A kick pops every available chain of that queue, parses and checks it (`request`), and either
//! completes it at once (errors, `GET_ID`, unsupported types) or submits its file operations to
//! the engine (a write the engine did inline completes before the next chain is taken, so the
//! driver can reuse its slot meanwhile). A completion writes the status byte, marks the guest
//! pages the engine wrote as dirty, puts the chain on the used ring, and notifies the driver
//! where virtio-queue's `needs_notification` (event-idx aware) says so. At most `MAX_IN_FLIGHT`
//! operations run; past that the handler leaves chains in the ring and resumes on the next
//! completion. A chain whose status byte is unusable, or a ring virtio-queue refuses, marks the
//! device `NEEDS_RESET` and the handler stops touching the queues.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::disk::DiskImage;
use super::engine::{Completion, IoEngine, MAX_IN_FLIGHT};
use super::request::{self, Action, BadChain, Segment};
use crate::guest_memory::TrackedGuestMemory;
use crate::virtio::device::{ActivatedQueue, DeviceSignals, QueueProgress};

/// Event data of the engine's completion eventfd (queue kicks use their queue position).
const COMPLETION_TOKEN: u32 = u32::MAX;

/// Most chains taken from one queue per wake-up before the disk's other queues, its completions
/// and a stop request get a turn (a driver refilling its ring as fast as the device empties it
/// would otherwise hold the thread).
const BATCH: usize = 1024;

const S_OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;

/// A request whose operations are in the engine.
#[derive(Debug)]
struct InFlight {
    /// Position in `queues`.
    queue: usize,
    head: u16,
    status: GuestAddress,
    used_len: u32,
    /// Operations not yet completed.
    pending: usize,
    /// The first error an operation reported.
    error: Option<i32>,
    /// Guest buffers the engine writes.
    dirty: Vec<Segment>,
}

/// The activated device's queues and I/O engine, run by the event loop.
pub(crate) struct BlkQueueHandler {
    // Declared first so it is dropped (and drained) while `mem` is still mapped.
    engine: IoEngine,
    mem: TrackedGuestMemory,
    queues: Vec<ActivatedQueue>,
    disk: Arc<DiskImage>,
    signals: Arc<dyn DeviceSignals>,
    /// Set by `reset`: do nothing more with guest memory.
    stopped: Arc<AtomicBool>,
    /// The queues are unusable; the driver was told to reset.
    broken: bool,
    /// Chains were left in a ring because the engine was full.
    throttled: bool,
    requests: Vec<Option<InFlight>>,
    free: Vec<usize>,
    completions: Vec<Completion>,
    /// Per queue: used entries added since the last notification decision.
    used_added: Vec<bool>,
}

impl std::fmt::Debug for BlkQueueHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkQueueHandler")
            .field("disk", &self.disk.path())
            .field("engine", &self.engine.name())
            .field("in_flight", &self.engine.in_flight())
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl BlkQueueHandler {
    pub(crate) fn new(
        mem: TrackedGuestMemory,
        queues: Vec<ActivatedQueue>,
        disk: Arc<DiskImage>,
        engine: IoEngine,
        signals: Arc<dyn DeviceSignals>,
        stopped: Arc<AtomicBool>,
    ) -> Self {
        let n = queues.len();
        Self {
            engine,
            mem,
            queues,
            disk,
            signals,
            stopped,
            broken: false,
            throttled: false,
            requests: Vec::new(),
            free: Vec::new(),
            completions: Vec::with_capacity(MAX_IN_FLIGHT),
            used_added: vec![false; n],
        }
    }

    /// Whether the handler gave up on the queues (`NEEDS_RESET` was raised).
    pub(crate) fn is_broken(&self) -> bool {
        self.broken
    }

    /// The engine's completion eventfd (tests wait on it).
    #[cfg(test)]
    pub(crate) fn completion_fd(&self) -> &vmm_sys_util::eventfd::EventFd {
        self.engine.completion_fd()
    }

    /// Operations in the engine.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.engine.in_flight()
    }

    fn active(&self) -> bool {
        !self.broken && !self.stopped.load(Ordering::Acquire)
    }

    /// Stops for good: waits for the engine's operations (marking the pages they wrote dirty)
    /// and returns none of them to the driver, so nothing touches guest memory afterwards.
    pub(crate) fn stop(&mut self) {
        self.stopped.store(true, Ordering::Release);
        self.absorb_from(IoEngine::drain);
        self.requests.clear();
        self.free.clear();
    }

    /// For a snapshot: waits for every operation in the engine and completes its request into
    /// the used ring (notifying the driver as it asked), then stops like `stop` and returns
    /// each queue's position. Chains still in the available ring (the engine was full) stay
    /// there: the next activation is kicked and takes them.
    pub(crate) fn quiesce(&mut self) -> Vec<QueueProgress> {
        self.absorb_from(IoEngine::drain);
        self.signal_used();
        self.stop();
        self.queues.iter().map(QueueProgress::of).collect()
    }

    /// The queue at position `qi` was kicked.
    pub(crate) fn handle_kick(&mut self, qi: usize) {
        let Some(q) = self.queues.get(qi) else {
            return;
        };
        let _ = q.kick.read();
        self.process_queue(qi);
        self.engine.commit();
        // io_uring may have finished page-cache hits during submission: complete them now
        // instead of after another trip through the event loop.
        self.handle_completions();
    }

    fn process_queue(&mut self, qi: usize) {
        let mut taken = 0;
        'ring: while self.active() {
            if let Err(e) = self.queues[qi].queue.disable_notification(&self.mem) {
                return self.fail(qi, &e.to_string());
            }
            loop {
                if !self.active() {
                    return;
                }
                if self.engine.in_flight() >= MAX_IN_FLIGHT {
                    // Resume when completions make room; notifications stay off meanwhile.
                    self.throttled = true;
                    return;
                }
                if taken == BATCH {
                    // Come back through the loop: re-raise this queue's kick.
                    if let Err(e) = self.queues[qi].kick.write(1) {
                        log::warn!("virtio-blk: cannot re-arm queue {qi}: {e}");
                        self.throttled = true;
                    }
                    return;
                }
                taken += 1;
                let q = &mut self.queues[qi].queue;
                let chain = match q.iter(&self.mem) {
                    Ok(mut chains) => chains.next(),
                    Err(e) => return self.fail(qi, &e.to_string()),
                };
                let Some(chain) = chain else {
                    break;
                };
                let parsed = request::parse(chain, &self.mem);
                self.start(qi, parsed);
                // A write done inline goes to the used ring now, so the driver can reuse its
                // slot while the next one is copied.
                self.reap_inline();
            }
            match self.queues[qi].queue.enable_notification(&self.mem) {
                // More chains arrived while notifications were off.
                Ok(true) => continue 'ring,
                Ok(false) => break,
                Err(e) => return self.fail(qi, &e.to_string()),
            }
        }
    }

    fn start(&mut self, qi: usize, parsed: Result<request::Request, BadChain>) {
        let req = match parsed {
            Ok(req) => req,
            Err(bad) => {
                self.warn(qi, &bad);
                match bad.status {
                    Some(status) => self.complete(qi, bad.head, status, S_IOERR, 1),
                    None => self.fail(qi, &format!("chain {}: {}", bad.head, bad.error)),
                }
                return;
            }
        };
        match request::prepare(&req, &self.mem, &self.disk) {
            Action::Complete { status, used_len } => {
                self.complete(qi, req.head, req.status, status, used_len)
            }
            Action::Io {
                ops,
                used_len,
                dirty,
            } => {
                let slot = match self.free.pop() {
                    Some(s) => s,
                    None => {
                        self.requests.push(None);
                        self.requests.len() - 1
                    }
                };
                self.requests[slot] = Some(InFlight {
                    queue: qi,
                    head: req.head,
                    status: req.status,
                    used_len,
                    pending: ops.len(),
                    error: None,
                    dirty,
                });
                for op in ops {
                    self.engine.submit(slot as u64, op);
                }
            }
        }
    }

    /// Completes the requests whose operations have all finished.
    fn reap(&mut self) {
        self.absorb_from(IoEngine::reap);
    }

    /// Completes the requests whose writes the engine did inline.
    fn reap_inline(&mut self) {
        self.absorb_from(IoEngine::reap_inline);
    }

    /// Takes completions from the engine with `take` (reap, reap_inline or drain) and finishes
    /// the requests they complete.
    fn absorb_from(&mut self, take: fn(&mut IoEngine, &mut Vec<Completion>)) {
        let mut done = std::mem::take(&mut self.completions);
        take(&mut self.engine, &mut done);
        self.absorb(&mut done);
        self.completions = done;
    }

    /// The engine's completion eventfd fired.
    pub(crate) fn handle_completions(&mut self) {
        self.reap();
        while self.throttled && self.engine.in_flight() < MAX_IN_FLIGHT {
            self.throttled = false;
            for qi in 0..self.queues.len() {
                self.process_queue(qi);
            }
            self.engine.commit();
            // Page-cache hits completed during submission: finish them now, not after another
            // trip through the event loop.
            self.reap();
        }
    }

    /// Accounts finished operations to their requests and finishes the requests they complete.
    fn absorb(&mut self, done: &mut Vec<Completion>) {
        for c in done.drain(..) {
            let Ok(slot) = usize::try_from(c.tag) else {
                continue;
            };
            let Some(Some(r)) = self.requests.get_mut(slot) else {
                continue;
            };
            r.pending = r.pending.saturating_sub(1);
            if let Err(errno) = c.result {
                r.error.get_or_insert(errno);
            }
            if r.pending > 0 {
                continue;
            }
            let Some(r) = self.requests[slot].take() else {
                continue;
            };
            self.free.push(slot);
            self.finish(r);
        }
    }

    fn finish(&mut self, r: InFlight) {
        // The engine wrote these pages (even a failed read may have written some).
        for seg in &r.dirty {
            for slice in self.mem.get_slices(seg.addr, seg.len as usize).flatten() {
                slice.bitmap().mark_dirty(0, slice.len());
            }
        }
        if !self.active() {
            return;
        }
        let (status, used_len) = match r.error {
            None => (S_OK, r.used_len),
            Some(errno) => {
                log::debug!(
                    "virtio-blk {}: request {} failed: {}",
                    self.disk.path().display(),
                    r.head,
                    std::io::Error::from_raw_os_error(errno)
                );
                (S_IOERR, 1)
            }
        };
        self.complete(r.queue, r.head, r.status, status, used_len);
    }

    /// Writes the status byte and returns the chain to the driver.
    fn complete(&mut self, qi: usize, head: u16, status_addr: GuestAddress, status: u8, len: u32) {
        if self.mem.write_obj(status, status_addr).is_err() {
            // `parse` checked the address; memory does not shrink while the VM runs.
            return self.fail(qi, "status byte not writable");
        }
        if let Err(e) = self.queues[qi].queue.add_used(&self.mem, head, len) {
            return self.fail(qi, &e.to_string());
        }
        self.used_added[qi] = true;
    }

    /// Notifies the driver for each queue that got used entries, if it wants to hear.
    pub(crate) fn signal_used(&mut self) {
        for qi in 0..self.queues.len() {
            if !std::mem::take(&mut self.used_added[qi]) || !self.active() {
                continue;
            }
            let q = &mut self.queues[qi];
            match q.queue.needs_notification(&self.mem) {
                Ok(false) => {}
                Ok(true) => {
                    if let Err(e) = self.signals.notify_queue(q.index) {
                        log::warn!("virtio-blk: cannot notify queue {}: {e}", q.index);
                    }
                }
                Err(e) => self.fail(qi, &e.to_string()),
            }
        }
    }

    /// Gives up on the queues and asks the driver for a reset.
    fn fail(&mut self, qi: usize, why: &str) {
        if self.broken {
            return;
        }
        self.broken = true;
        let index = self.queues.get(qi).map_or(0, |q| q.index);
        crate::guest_warn!(
            self.signals.guest_warnings(),
            "broken queue",
            "virtio-blk {}: queue {index}: {why}; the device needs a reset",
            self.disk.path().display()
        );
        self.signals.set_needs_reset();
    }

    fn warn(&mut self, qi: usize, bad: &BadChain) {
        let index = self.queues.get(qi).map_or(0, |q| q.index);
        crate::guest_warn!(
            self.signals.guest_warnings(),
            "bad request",
            "virtio-blk {}: queue {index}: chain {}: {}",
            self.disk.path().display(),
            bad.head,
            bad.error
        );
    }
}

impl MutEventSubscriber for BlkQueueHandler {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        if !self.active() && data != COMPLETION_TOKEN {
            // Stop watching the level-triggered kick, but do not drain it: after a reset the
            // next activation's handler watches the same eventfd, and this thread may still see
            // a kick meant for it before it is told to end. A drained kick would be lost.
            if let Some(q) = self.queues.get(data as usize) {
                let _ = ops.remove(Events::empty(&q.kick));
            }
            return;
        }
        if data == COMPLETION_TOKEN {
            self.handle_completions();
        } else {
            self.handle_kick(data as usize);
        }
        self.signal_used();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut failed = false;
        for (qi, q) in self.queues.iter().enumerate() {
            // Queue positions are below MAX_QUEUES.
            let ev = Events::with_data(&q.kick, qi as u32, EventSet::IN);
            if let Err(e) = ops.add(ev) {
                log::error!("virtio-blk: cannot watch queue {} kicks: {e:?}", q.index);
                failed = true;
            }
        }
        let ev = Events::with_data(self.engine.completion_fd(), COMPLETION_TOKEN, EventSet::IN);
        if let Err(e) = ops.add(ev) {
            log::error!("virtio-blk: cannot watch I/O completions: {e:?}");
            failed = true;
        }
        if failed {
            self.fail(0, "event loop registration failed");
        }
    }
}
