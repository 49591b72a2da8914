//! Serving one kicked queue in the backend: every available chain is parsed and checked by
//! `virtio::blk::request` (the in-process device's code), its file operations run on the I/O
//! engine, and once they have all completed each request's status byte is written and its
//! chain returned to the used ring; the frontend is then signalled if the driver wants it.
//!
//! The worker thread waits for its own batch's completions before touching the used ring, so
//! guest memory the engine reads or writes stays mapped for the whole operation (the daemon
//! only replaces the memory between events). With `EVENT_IDX`, notifications are re-enabled
//! and the ring checked again before returning, so a request added meanwhile is not missed.

use thiserror::Error;
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::backend::BackendMemory;
use crate::virtio::blk::disk::DiskImage;
use crate::virtio::blk::engine::{Completion, IoEngine, MAX_IN_FLIGHT};
use crate::virtio::blk::request::{parse, prepare, Action};

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
    failed: bool,
}

/// Serves every available request of `vring`.
pub(super) fn serve_queue(
    vring: &VringRwLock<BackendMemory>,
    mem: &GuestMemoryMmap<()>,
    disk: &DiskImage,
    engine: &mut IoEngine,
    event_idx: bool,
) -> Result<(), QueueError> {
    loop {
        if event_idx {
            vring.disable_notification().map_err(QueueError::Ring)?;
        }
        let used = serve_available(&mut vring.get_mut(), mem, disk, engine)?;
        if used && vring.needs_notification().map_err(QueueError::Ring)? {
            vring.signal_used_queue().map_err(QueueError::Signal)?;
        }
        // Without EVENT_IDX one pass is enough: the driver kicks for anything new.
        if !event_idx || !vring.enable_notification().map_err(QueueError::Ring)? {
            return Ok(());
        }
    }
}

/// Takes, runs and completes the available chains; whether any was used.
fn serve_available(
    state: &mut VringState<BackendMemory>,
    mem: &GuestMemoryMmap<()>,
    disk: &DiskImage,
    engine: &mut IoEngine,
) -> Result<bool, QueueError> {
    let queue = state.get_queue_mut();
    let mut used = false;
    let mut pending: Vec<Pending> = Vec::new();
    let mut done: Vec<Completion> = Vec::new();
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let req = match parse(chain, mem) {
            Ok(req) => req,
            Err(bad) => {
                log::warn!("vhost-user-blk: bad request at head {head}: {}", bad.error);
                if let Some(status) = bad.status {
                    let _ = mem.write_obj(VIRTIO_BLK_S_IOERR as u8, status);
                }
                queue.add_used(mem, head, 1).map_err(QueueError::Ring)?;
                used = true;
                continue;
            }
        };
        match prepare(&req, mem, disk) {
            Action::Complete { status, used_len } => {
                // The parser checked that the status byte lies in guest memory.
                let _ = mem.write_obj(status, req.status);
                queue
                    .add_used(mem, head, used_len)
                    .map_err(QueueError::Ring)?;
                used = true;
            }
            Action::Io { ops, used_len, .. } => {
                if engine.in_flight() + MAX_OPS_PER_REQUEST > MAX_IN_FLIGHT {
                    wait_all(engine, &mut done);
                }
                let tag = pending.len() as u64;
                for op in ops {
                    engine.submit(tag, op);
                }
                engine.commit();
                pending.push(Pending {
                    head,
                    status: req.status,
                    used_len,
                    failed: false,
                });
            }
        }
    }
    wait_all(engine, &mut done);
    for c in &done {
        if let (Some(p), Err(_)) = (
            usize::try_from(c.tag).ok().and_then(|t| pending.get_mut(t)),
            c.result,
        ) {
            p.failed = true;
        }
    }
    for p in &pending {
        let (status, len) = match p.failed {
            true => (VIRTIO_BLK_S_IOERR as u8, 1),
            false => (VIRTIO_BLK_S_OK as u8, p.used_len),
        };
        let _ = mem.write_obj(status, p.status);
        queue.add_used(mem, p.head, len).map_err(QueueError::Ring)?;
        used = true;
    }
    Ok(used)
}

/// Blocks until the engine has no operation in flight, collecting completions in `out`.
fn wait_all(engine: &mut IoEngine, out: &mut Vec<Completion>) {
    engine.commit();
    while engine.in_flight() > 0 {
        let mut fd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(engine.completion_fd()),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `fd` is one valid pollfd on the stack for the duration of the call; a short
        // timeout bounds the wait should a completion's signal be consumed early.
        unsafe { libc::poll(&mut fd, 1, 100) };
        engine.reap(out);
    }
}
