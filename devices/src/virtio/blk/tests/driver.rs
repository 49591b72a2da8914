//! The driver's side of a split virtqueue, for tests that offer many chains: descriptor indices
//! and ring positions wrap around the queue size the way a real driver's do.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::guest_memory::TrackedGuestMemory;
use crate::virtio::device::ActivatedQueue;
use crate::virtio::test_support::Buf;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// A split queue laid out at `base`: descriptor table, available ring, used ring.
pub(crate) struct Driver<'a> {
    mem: &'a TrackedGuestMemory,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    seen_used: u16,
}

impl<'a> Driver<'a> {
    pub fn new(mem: &'a TrackedGuestMemory, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        // flags, idx, ring, used_event; the used ring is 4-byte aligned.
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let d = Self {
            mem,
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            seen_used: 0,
        };
        let end = used + 6 + 8 * u64::from(size);
        d.mem
            .write_slice(&vec![0u8; (end - base) as usize], GuestAddress(base))
            .unwrap();
        d
    }

    /// The queue as the transport would hand it to the device, and the kick eventfd.
    pub fn activated(&self, index: u16) -> (ActivatedQueue, EventFd) {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used))
            .unwrap();
        q.set_ready(true);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let driver_end = kick.try_clone().unwrap();
        (
            ActivatedQueue {
                index,
                queue: q,
                kick,
            },
            driver_end,
        )
    }

    /// Writes descriptor `index`.
    pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, at).unwrap();
    }

    /// Writes a chain into the table without offering it; returns the head index.
    pub fn build_chain(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let last = i + 1 == bufs.len();
            let mut flags = if writable { F_WRITE } else { 0 };
            if !last {
                flags |= F_NEXT;
            }
            self.write_desc(
                index,
                addr,
                len,
                flags,
                if last { 0 } else { self.next_desc },
            );
        }
        head
    }

    /// Puts `head` on the available ring (any value, valid or not).
    pub fn offer_head(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Writes and offers a chain; returns its head index.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.build_chain(bufs);
        self.offer_head(head);
        head
    }

    /// Sets the available index (a driver may lie about it).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Sets `used_event` (read by the device when `VIRTIO_RING_F_EVENT_IDX` is on).
    pub fn set_used_event(&self, idx: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        self.mem.write_obj(idx.to_le(), GuestAddress(at)).unwrap();
    }

    /// `avail_event` (written by the device when `VIRTIO_RING_F_EVENT_IDX` is on).
    pub fn avail_event(&self) -> u16 {
        let at = self.used + 4 + 8 * u64::from(self.size);
        u16::from_le(self.mem.read_obj(GuestAddress(at)).unwrap())
    }

    /// The available index as last offered.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Used entries (head, length) the device added since the last call.
    pub fn take_used(&mut self) -> Vec<(u16, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.seen_used != u16::from_le(idx) {
            let at = self.used + 4 + 8 * u64::from(self.seen_used % self.size);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((u32::from_le(id) as u16, u32::from_le(len)));
            self.seen_used = self.seen_used.wrapping_add(1);
        }
        out
    }
}
