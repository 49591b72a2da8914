//! A split virtqueue (virtio 1.x section 2.7): descriptor table, available ring and used ring in
//! memory from `dma`, with a free list of descriptors threaded through their `next` fields.
//!
//! The guest never enables interrupts, so the available ring asks the device not to interrupt
//! (VIRTQ_AVAIL_F_NO_INTERRUPT) and completions are found by polling the used ring, which lives
//! in RAM: polling costs no VM exit. The only exit per batch of requests is the notify write, and
//! it is skipped while the device says it does not need one (VIRTQ_USED_F_NO_NOTIFY, or with
//! VIRTIO_RING_F_EVENT_IDX, an `avail_event` the new entries have not reached).
use core::hint::spin_loop;
use core::sync::atomic::{fence, Ordering};

use crate::mmio::Region;
use crate::scenario::fail;
use crate::tsc::Deadline;
use crate::virtio::dma;

const DESC_SIZE: u64 = 16;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// One buffer of a descriptor chain.
#[derive(Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE) rather than device-readable.
    pub device_writes: bool,
}

impl Buf {
    /// The whole of `r` as one buffer.
    pub fn of(r: &Region, device_writes: bool) -> Buf {
        Buf {
            addr: r.base(),
            len: r.len() as u32,
            device_writes,
        }
    }
}

/// A split virtqueue and the driver's view of it.
pub struct Queue {
    index: u16,
    size: u16,
    desc: Region,
    avail: Region,
    used: Region,
    /// Where to write `index` to notify the device.
    notify: Region,
    free_head: u16,
    free: u16,
    avail_idx: u16,
    last_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated: `kick` follows `avail_event`.
    event_idx: bool,
    /// The available index at the last `kick`.
    kicked_idx: u16,
}

impl Queue {
    /// Allocates and initialises queue `index` with `size` (a power of two) entries.
    pub fn new(index: u16, size: u16, notify: Region) -> Queue {
        let n = u64::from(size);
        let desc = dma::alloc(DESC_SIZE * n);
        let avail = dma::alloc(6 + 2 * n);
        let used = dma::alloc(6 + 8 * n);
        for i in 0..size.saturating_sub(1) {
            desc.write::<u16>(u64::from(i) * DESC_SIZE + 14, i + 1);
        }
        avail.write::<u16>(0, AVAIL_F_NO_INTERRUPT);
        Queue {
            index,
            size,
            desc,
            avail,
            used,
            notify,
            free_head: 0,
            free: size,
            avail_idx: 0,
            last_used: 0,
            event_idx: false,
            kicked_idx: 0,
        }
    }

    /// Follows `avail_event` instead of the used ring's flags when kicking (the driver
    /// negotiated VIRTIO_RING_F_EVENT_IDX).
    pub fn use_event_idx(&mut self) {
        self.event_idx = true;
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// The head index the next one-descriptor chain `add` makes will get.
    pub fn peek_free_head(&self) -> u16 {
        self.free_head
    }

    /// Physical addresses of the descriptor table, available ring and used ring.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc.base(), self.avail.base(), self.used.base())
    }

    /// Makes `bufs` one chain and offers it to the device (without notifying it). Returns the
    /// head descriptor's index, or `None` if there are not enough free descriptors.
    pub fn add(&mut self, bufs: &[Buf]) -> Option<u16> {
        let n = u16::try_from(bufs.len()).ok()?;
        if n == 0 || n > self.free {
            return None;
        }
        let head = self.free_head;
        let mut i = head;
        for (k, b) in bufs.iter().enumerate() {
            let d = u64::from(i) * DESC_SIZE;
            let mut flags = if b.device_writes { DESC_F_WRITE } else { 0 };
            if k + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            self.desc.write::<u64>(d, b.addr);
            self.desc.write::<u32>(d + 8, b.len);
            self.desc.write::<u16>(d + 12, flags);
            // Free descriptors are already linked through `next`: keep following the list.
            i = self.desc.read::<u16>(d + 14);
        }
        self.free_head = i;
        self.free -= n;
        let slot = u64::from(self.avail_idx % self.size);
        self.avail.write::<u16>(4 + 2 * slot, head);
        // The descriptors and the ring entry must be visible before the index that publishes them.
        fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.avail.write::<u16>(2, self.avail_idx);
        Some(head)
    }

    /// Notifies the device of new buffers unless it has said it needs no notification.
    pub fn kick(&mut self) {
        // The avail index store must be globally visible before the flags load (mfence), or the
        // device could go idle between our load and its next look at the ring.
        fence(Ordering::SeqCst);
        let needed = if self.event_idx {
            // `vring_need_event`: the device asked for a kick once the index passes
            // `avail_event`, which follows the used ring's entries.
            let event = self.used.read::<u16>(4 + 8 * u64::from(self.size));
            let (new, old) = (self.avail_idx, self.kicked_idx);
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.used.read::<u16>(0) & USED_F_NO_NOTIFY == 0
        };
        self.kicked_idx = self.avail_idx;
        if needed {
            self.notify.write::<u16>(0, self.index);
        }
    }

    /// The next completed chain, `(head, bytes written by the device)`, if any; frees its
    /// descriptors.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        if self.used.read::<u16>(2) == self.last_used {
            return None;
        }
        // Read the element only after seeing the index that published it.
        fence(Ordering::Acquire);
        let slot = u64::from(self.last_used % self.size);
        let id = self.used.read::<u32>(4 + 8 * slot);
        let len = self.used.read::<u32>(8 + 8 * slot);
        let Some(head) = u16::try_from(id).ok().filter(|&h| h < self.size) else {
            fail(|w| {
                w.str("device returned descriptor ")
                    .dec(id.into())
                    .str(" on queue ")
                    .dec(self.index.into())
                    .str(" of size ")
                    .dec(self.size.into());
            })
        };
        let mut tail = head;
        let mut count = 1;
        while self.desc.read::<u16>(u64::from(tail) * DESC_SIZE + 12) & DESC_F_NEXT != 0 {
            tail = self.desc.read::<u16>(u64::from(tail) * DESC_SIZE + 14) % self.size;
            count += 1;
            if count > self.size {
                fail(|w| {
                    w.str("descriptor chain loops on queue ")
                        .dec(self.index.into());
                });
            }
        }
        self.desc
            .write::<u16>(u64::from(tail) * DESC_SIZE + 14, self.free_head);
        self.free_head = head;
        self.free += count;
        self.last_used = self.last_used.wrapping_add(1);
        Some((head, len))
    }

    /// Polls the used ring until a chain completes or `deadline` passes.
    pub fn wait(&mut self, deadline: Deadline) -> Option<(u16, u32)> {
        loop {
            if let Some(done) = self.pop_used() {
                return Some(done);
            }
            if deadline.passed() {
                return None;
            }
            spin_loop();
        }
    }
}
