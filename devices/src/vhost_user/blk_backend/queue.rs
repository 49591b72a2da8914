//! Serving one kicked queue in the backend: every available chain is parsed and checked by
//! `virtio::blk::request` (the in-process device's code), its file operations run on the I/O
//! engine, and once they have all completed each request's status byte is written and its
//! chain returned to the used ring (the buffers the engine wrote marked in the dirty log
//! first: the engine bypasses `vm-memory`'s bitmap); the frontend is then signalled if the driver wants it.
//!
//! Requests go to the used ring as soon as their operations finish, and the worker keeps taking
//! the chains the driver adds meanwhile (a bounded number), so a streaming driver never waits for
//! a whole batch. The worker returns only once nothing is in flight, so guest memory the engine
//! reads or writes stays mapped for the whole operation (the daemon only replaces the memory
//! between events). With `EVENT_IDX`, notifications are re-enabled
//! and the ring checked again before returning, so a request added meanwhile is not missed.

use thiserror::Error;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::QueueT;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::BackendMemory;
use crate::virtio::blk::disk::DiskImage;
use crate::virtio::blk::engine::{Completion, IoEngine, MAX_IN_FLIGHT};
use crate::virtio::blk::request::{parse, prepare, Action, Segment};

/// Most operations one request can add (a discard with the maximum number of ranges).
const MAX_OPS_PER_REQUEST: usize = 8;

/// A queue the backend cannot use any more.
#[derive(Debug, Error)]
pub(super) enum QueueError {
    /// The used ring could not be written, or notifications could not be switched.
    #[error("the ring is unusable")]
    Ring(#[source] virtio_queue::Error),
    /// The frontend could not be signalled.
    #[error("cannot signal the frontend")]
    Signal(#[source] std::io::Error),
}

/// A request whose operations are in flight.
struct Pending {
    head: u16,
    status: GuestAddress,
    used_len: u32,
    /// Operations not yet completed.
    remaining: usize,
    failed: bool,
    /// Guest buffers the operations write (the engine bypasses the bitmap).
    dirty: Vec<Segment>,
}

/// Requests in flight, indexed by the tag their operations carry.
#[derive(Default)]
struct InFlight {
    slots: Vec<Option<Pending>>,
    free: Vec<usize>,
}

impl InFlight {
    fn insert(&mut self, p: Pending) -> u64 {
        let at = match self.free.pop() {
            Some(at) => {
                self.slots[at] = Some(p);
                at
            }
            None => {
                self.slots.push(Some(p));
                self.slots.len() - 1
            }
        };
        at as u64
    }

    /// Counts one finished operation; the request once all of its operations are done.
    fn complete(&mut self, c: &Completion) -> Option<Pending> {
        let at = usize::try_from(c.tag).ok()?;
        let p = self.slots.get_mut(at)?.as_mut()?;
        p.failed |= c.result.is_err();
        p.remaining = p.remaining.saturating_sub(1);
        if p.remaining > 0 {
            return None;
        }
        self.free.push(at);
        self.slots[at].take()
    }
}

/// Serves every available request of `vring`.
pub(super) fn serve_queue(
    vring: &VringRwLock<BackendMemory>,
    mem: &GuestMemoryMmap<BitmapMmapRegion>,
    disk: &DiskImage,
    engine: &mut IoEngine,
    event_idx: bool,
) -> Result<(), QueueError> {
    loop {
        if event_idx {
            vring.disable_notification().map_err(QueueError::Ring)?;
        }
        serve_available(&mut vring.get_mut(), mem, disk, engine)?;
        // Without EVENT_IDX one pass is enough: the driver kicks for anything new.
        if !event_idx || !vring.enable_notification().map_err(QueueError::Ring)? {
            return Ok(());
        }
    }
}

/// Most chains one call takes beyond those available when it starts: the driver may keep the
/// ring busy, and the daemon needs the ring's lock back now and then. Chains added after the
/// call started were kicked for (or, with `EVENT_IDX`, are seen by `serve_queue`'s re-check).
const STREAM_BUDGET: usize = 1024;

/// Takes, runs and completes the available chains, streaming: each request goes to the used
/// ring as soon as its operations finish (so the driver can refill its slot while the others are
/// still running), and chains the driver adds meanwhile are taken too, up to `STREAM_BUDGET`.
/// Returns once nothing is in flight, so guest memory stays mapped for every operation.
fn serve_available(
    state: &mut VringState<BackendMemory>,
    mem: &GuestMemoryMmap<BitmapMmapRegion>,
    disk: &DiskImage,
    engine: &mut IoEngine,
) -> Result<(), QueueError> {
    let mut in_flight = InFlight::default();
    let mut done: Vec<Completion> = Vec::new();
    let mut budget = usize::from(state.get_queue().size()) + STREAM_BUDGET;
    loop {
        let mut used = false;
        while budget > 0 && engine.in_flight() + MAX_OPS_PER_REQUEST <= MAX_IN_FLIGHT {
            let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem) else {
                break;
            };
            budget -= 1;
            used |= take(state, mem, disk, engine, chain, &mut in_flight)?;
        }
        engine.commit();
        if engine.in_flight() == 0 && !used {
            return Ok(());
        }
        if engine.in_flight() > 0 {
            engine.wait_some(&mut done);
        }
        for c in done.drain(..) {
            if let Some(p) = in_flight.complete(&c) {
                mark_dirty(mem, &p.dirty);
                let (status, len) = match p.failed {
                    true => (VIRTIO_BLK_S_IOERR as u8, 1),
                    false => (VIRTIO_BLK_S_OK as u8, p.used_len),
                };
                let _ = mem.write_obj(status, p.status);
                state
                    .get_queue_mut()
                    .add_used(mem, p.head, len)
                    .map_err(QueueError::Ring)?;
                used = true;
            }
        }
        if used && state.needs_notification().map_err(QueueError::Ring)? {
            state.signal_used_queue().map_err(QueueError::Signal)?;
        }
    }
}

/// Parses one chain and either completes it at once or submits its operations; whether it went
/// to the used ring.
fn take(
    state: &mut VringState<BackendMemory>,
    mem: &GuestMemoryMmap<BitmapMmapRegion>,
    disk: &DiskImage,
    engine: &mut IoEngine,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap<BitmapMmapRegion>>,
    in_flight: &mut InFlight,
) -> Result<bool, QueueError> {
    let head = chain.head_index();
    let queue = state.get_queue_mut();
    let req = match parse(chain, mem) {
        Ok(req) => req,
        Err(bad) => {
            log::warn!("vhost-user-blk: bad request at head {head}: {}", bad.error);
            if let Some(status) = bad.status {
                let _ = mem.write_obj(VIRTIO_BLK_S_IOERR as u8, status);
            }
            queue.add_used(mem, head, 1).map_err(QueueError::Ring)?;
            return Ok(true);
        }
    };
    match prepare(&req, mem, disk) {
        Action::Complete { status, used_len } => {
            // The parser checked that the status byte lies in guest memory.
            let _ = mem.write_obj(status, req.status);
            queue
                .add_used(mem, head, used_len)
                .map_err(QueueError::Ring)?;
            Ok(true)
        }
        Action::Io { ops, used_len, .. } if ops.is_empty() => {
            let _ = mem.write_obj(VIRTIO_BLK_S_OK as u8, req.status);
            queue
                .add_used(mem, head, used_len)
                .map_err(QueueError::Ring)?;
            Ok(true)
        }
        Action::Io {
            ops,
            used_len,
            dirty,
        } => {
            let tag = in_flight.insert(Pending {
                head,
                status: req.status,
                used_len,
                remaining: ops.len(),
                failed: false,
                dirty,
            });
            for op in ops {
                engine.submit(tag, op);
            }
            Ok(false)
        }
    }
}

/// Marks the guest buffers a request's operations wrote in the dirty log (even a failed read
/// may have written some), as the in-process device does when a request finishes.
fn mark_dirty(mem: &GuestMemoryMmap<BitmapMmapRegion>, dirty: &[Segment]) {
    for seg in dirty {
        for slice in mem.get_slices(seg.addr, seg.len as usize).flatten() {
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
}
