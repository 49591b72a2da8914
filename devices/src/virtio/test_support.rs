//! Test helpers for virtio device models, without KVM: guest memory, the driver's side of a
//! queue (virtio-queue's `mock`), recorded notifications, and an event loop the test turns by
//! hand. Compiled for tests only.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{ActivatedQueue, DeviceSignals, EventLoop};
use crate::guest_memory::TrackedGuestMemory;

/// Guest memory of `size` bytes at address 0, with a dirty bitmap like the VMM's.
pub(crate) fn guest_memory(size: usize) -> TrackedGuestMemory {
    TrackedGuestMemory::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// Records what a device signalled.
#[derive(Debug, Default)]
pub(crate) struct RecordingSignals {
    notified: Mutex<Vec<u16>>,
    needs_reset: AtomicBool,
    config_changes: std::sync::atomic::AtomicUsize,
}

impl RecordingSignals {
    /// Queues notified so far, in order; clears the record.
    pub(crate) fn take_notified(&self) -> Vec<u16> {
        std::mem::take(&mut *self.notified.lock().unwrap())
    }

    /// Configuration-change notifications so far (a reset request raises one too).
    pub(crate) fn config_changes(&self) -> usize {
        self.config_changes.load(Ordering::SeqCst)
    }

    /// Whether the device asked for a reset.
    pub(crate) fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }
}

impl DeviceSignals for RecordingSignals {
    fn notify_queue(&self, queue: u16) -> std::io::Result<()> {
        self.notified.lock().unwrap().push(queue);
        Ok(())
    }

    fn notify_config(&self) -> std::io::Result<()> {
        self.config_changes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
    }
}

/// The VMM's event loop, turned by the test.
pub(crate) struct TestLoop {
    manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
}

impl TestLoop {
    pub(crate) fn new() -> Self {
        Self {
            manager: EventManager::new().unwrap(),
        }
    }

    pub(crate) fn endpoint(&self) -> EventLoop {
        self.manager.remote_endpoint()
    }

    /// Runs whatever is ready now, a few rounds (registrations first, then their events).
    pub(crate) fn turn(&mut self) {
        for _ in 0..4 {
            self.manager.run_with_timeout(0).unwrap();
        }
    }

    /// Waits up to `ms` for events and runs them; returns how many fds were ready.
    pub(crate) fn wait(&mut self, ms: i32) -> usize {
        self.manager.run_with_timeout(ms).unwrap()
    }
}

/// One descriptor of a chain a test offers: address, length, device-writable.
pub(crate) type Buf = (u64, u32, bool);

/// The driver's side of one queue.
pub(crate) struct DriverQueue<'a> {
    mem: &'a TrackedGuestMemory,
    vq: MockSplitQueue<'a, TrackedGuestMemory>,
    next_desc: u16,
    size: u16,
    seen_used: u16,
}

impl<'a> DriverQueue<'a> {
    /// A queue of `size` entries whose rings start at `base`.
    pub(crate) fn new(mem: &'a TrackedGuestMemory, base: u64, size: u16) -> Self {
        Self {
            mem,
            vq: MockSplitQueue::create(mem, GuestAddress(base), size),
            next_desc: 0,
            size,
            seen_used: 0,
        }
    }

    /// The device's view of the queue, as the transport would hand it over at activation,
    /// and the kick eventfd's other end.
    pub(crate) fn activated(&self, index: u16) -> (ActivatedQueue, EventFd) {
        let queue: Queue = self.vq.create_queue().unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let driver_end = kick.try_clone().unwrap();
        (ActivatedQueue { index, queue, kick }, driver_end)
    }

    /// Offers a chain; returns its head index.
    pub(crate) fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let index = head + i as u16;
                let last = i + 1 == bufs.len();
                let mut flags = if writable {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                if !last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let next = if last { 0 } else { (index + 1) % self.size };
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect();
        self.vq.add_desc_chains(&descs, head).unwrap();
        self.next_desc = (head + bufs.len() as u16) % self.size;
        head
    }

    /// Offers a raw head index that names no valid descriptor chain.
    pub(crate) fn add_raw_head(&mut self, head: u16) {
        use vm_memory::Bytes;
        let idx = self.vq.avail().idx().load();
        let slot = self.vq.avail_addr().0 + 4 + u64::from(idx % self.size) * 2;
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        self.vq.avail().idx().store(idx.wrapping_add(1));
    }

    /// Sets the available index directly (a driver lying about how much it offers).
    pub(crate) fn set_avail_idx(&self, idx: u16) {
        self.vq.avail().idx().store(idx);
    }

    /// Sets the used index directly (where a device that died had got to).
    pub(crate) fn set_used_idx(&self, idx: u16) {
        self.vq.used().idx().store(idx);
    }

    /// Used entries (head, length) the device added since the last call.
    pub(crate) fn take_used(&mut self) -> Vec<(u16, u32)> {
        let used = self.vq.used();
        let idx = used.idx().load();
        let mut out = Vec::new();
        while self.seen_used != idx {
            let elem = used
                .ring()
                .ref_at(usize::from(self.seen_used % self.size))
                .unwrap()
                .load();
            out.push((elem.id() as u16, elem.len()));
            self.seen_used = self.seen_used.wrapping_add(1);
        }
        out
    }
}
