//! Entry points the `fuzz/` crate drives (and the unit tests run): a split virtqueue whose
//! descriptors, indirect tables, rings and buffers come from untrusted bytes, fed to the real
//! chain parsers of virtio-blk (`request::parse` and `prepare`), virtio-net (`gather_tx`,
//! `scatter_rx`) and virtio-console (its queue handler). Compiled with the `fuzzing` feature
//! (and for tests) only; nothing else in skiff uses it.
//!
//! Input layout: byte 0 configures the queue (`Config`), the rest is guest memory. Guest RAM
//! is two 4 KiB regions, `[0, 0x1000)` and `[0x2000, 0x3000)`, with a hole between them; the
//! bytes fill the first region, then the second. Queue 0's rings sit at fixed addresses at the
//! start of each region (`ring_base`), so the bytes there are the descriptor table, the
//! available ring (with `used_event`) and the used ring (with `avail_event`), unless the
//! config byte puts the used ring over the descriptors; everything else is buffers and
//! indirect tables. Each entry point takes chains the way the device's handler
//! does (`next_chain`, `add_used`, `needs_notification`) until the queue is empty or refuses,
//! checks what the parser accepted against guest memory, and must never panic or hang.

mod blk;
mod console;
mod net;
#[cfg(test)]
mod tests;

pub use blk::{blk_requests, BlkOutcome};
pub use console::{console_queues, ConsoleOutcome};
pub use net::{indirect_chains, net_chains, net_rx_merged, NetOutcome, RxOutcome};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{ActivatedQueue, DeviceSignals};
use super::queue_ops::{add_used, needs_notification, next_chain};
use crate::guest_memory::TrackedGuestMemory;

/// Size of each guest RAM region.
pub const REGION_LEN: usize = 0x1000;
/// Where the second region starts (the gap before it is a hole).
pub const SECOND_REGION: u64 = 0x2000;
/// Largest queue the input can ask for.
pub const MAX_QUEUE_SIZE: u16 = 16;
/// Offsets of the rings from a queue's ring base.
pub const DESC_OFFSET: u64 = 0;
/// Available ring: flags, idx, ring\[16\], used_event.
pub const AVAIL_OFFSET: u64 = 0x100;
/// Used ring: flags, idx, ring\[16\] of (id, len), avail_event.
pub const USED_OFFSET: u64 = 0x140;
/// Where a queue's buffers may start without overlapping its rings (any address is allowed).
pub const DATA_OFFSET: u64 = 0x200;
/// Most chains taken from one queue per input (the available index bounds it anyway).
const MAX_CHAINS: usize = 64;

/// Byte 0 of the input.
#[derive(Debug, Clone, Copy)]
pub struct Config(pub u8);

impl Config {
    /// Queue size: 1, 2, 4, 8 or 16 (bits 0-2, modulo 5).
    pub fn queue_size(self) -> u16 {
        1 << ((self.0 & 7) % 5)
    }

    /// `VIRTIO_RING_F_EVENT_IDX` negotiated (bit 3).
    pub fn event_idx(self) -> bool {
        self.0 & 8 != 0
    }

    /// A device-specific choice (bit 4): the receive queue for net, a read-only disk for blk.
    pub fn alternate(self) -> bool {
        self.0 & 0x10 != 0
    }

    /// A device-specific two-bit value (bits 5-6).
    pub fn variant(self) -> u8 {
        (self.0 >> 5) & 3
    }

    /// The used ring placed over the descriptor table (bit 7): each completion overwrites
    /// descriptors the driver may offer again.
    pub fn used_over_descriptors(self) -> bool {
        self.0 & 0x80 != 0
    }
}

/// Ring base of queue `index` (0 in the first region, 1 in the second).
pub fn ring_base(index: u16) -> u64 {
    if index == 0 {
        0
    } else {
        SECOND_REGION
    }
}

/// Guest memory holding `image` (first region, then second), or `None` if the host refuses
/// the mapping.
pub fn guest_memory(image: &[u8]) -> Option<TrackedGuestMemory> {
    let mem = TrackedGuestMemory::from_ranges(&[
        (GuestAddress(0), REGION_LEN),
        (GuestAddress(SECOND_REGION), REGION_LEN),
    ])
    .ok()?;
    let (first, rest) = image.split_at(image.len().min(REGION_LEN));
    let second = &rest[..rest.len().min(REGION_LEN)];
    mem.write_slice(first, GuestAddress(0)).ok()?;
    mem.write_slice(second, GuestAddress(SECOND_REGION)).ok()?;
    Some(mem)
}

/// Queue `index` as the transport hands it to a device at activation: the size and features
/// of `config`, the rings at `ring_base(index)`, ready. `None` when the transport would refuse
/// it (it checks the same `is_valid`).
pub fn activated_queue(
    mem: &TrackedGuestMemory,
    config: Config,
    index: u16,
) -> Option<ActivatedQueue> {
    let base = ring_base(index);
    let mut queue = Queue::new(MAX_QUEUE_SIZE).ok()?;
    queue.set_size(config.queue_size());
    let halves = |offset: u64| {
        let addr = base + offset;
        (Some(addr as u32), Some((addr >> 32) as u32))
    };
    let (low, high) = halves(DESC_OFFSET);
    queue.set_desc_table_address(low, high);
    let (low, high) = halves(AVAIL_OFFSET);
    queue.set_avail_ring_address(low, high);
    let used = match config.used_over_descriptors() {
        true => DESC_OFFSET,
        false => USED_OFFSET,
    };
    let (low, high) = halves(used);
    queue.set_used_ring_address(low, high);
    queue.set_event_idx(config.event_idx());
    queue.set_ready(true);
    if !queue.is_valid(mem) {
        return None;
    }
    let kick = EventFd::new(EFD_NONBLOCK).ok()?;
    Some(ActivatedQueue { index, queue, kick })
}

/// Takes chains from `queue` like a device's handler: each goes to `serve`, which returns the
/// used length, then to the used ring, and the driver's notification wish is read. Stops when
/// the queue is empty or fails. Returns how many chains were served.
pub fn serve_chains(
    mem: &TrackedGuestMemory,
    queue: &mut ActivatedQueue,
    mut serve: impl FnMut(DescriptorChain<&TrackedGuestMemory>) -> u32,
) -> usize {
    let mut served = 0;
    for _ in 0..MAX_CHAINS {
        let chain = match next_chain(queue, mem) {
            Ok(Some(chain)) => chain,
            Ok(None) | Err(_) => break,
        };
        let head = chain.head_index();
        let used_len = serve(chain);
        if add_used(queue, mem, head, used_len).is_err() {
            break;
        }
        served += 1;
        let _ = needs_notification(queue, mem);
    }
    served
}

/// Signals that go nowhere (the fuzzed handlers raise interrupts and reset requests).
#[derive(Debug, Default)]
pub struct NoSignals;

impl DeviceSignals for NoSignals {
    fn notify_queue(&self, _queue: u16) -> std::io::Result<()> {
        Ok(())
    }

    fn notify_config(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn set_needs_reset(&self) {}
}
