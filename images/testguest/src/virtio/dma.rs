//! Memory shared with virtio devices: a bump allocator over the RAM that follows the guest image.
//!
//! Virtqueues and request buffers are carved out page by page from the first RAM range (PVH
//! memory map, type 1) above `__image_end`, skipping any ACPI table found there. Keeping them out
//! of the image's BSS keeps the image small: the loader zero-fills all of BSS on every boot.
//! Each scenario starts a fresh arena (`reset`) and resets its device when done, so a later
//! scenario may reuse the memory.
use core::sync::atomic::{AtomicU64, Ordering};

use crate::acpi;
use crate::bootinfo::BootInfo;
use crate::mmio::{image_range, Region};
use crate::scenario::fail;

const PAGE: u64 = 4096;

/// Next free byte of the arena.
static NEXT: AtomicU64 = AtomicU64::new(0);
/// End of the arena's RAM range.
static END: AtomicU64 = AtomicU64::new(0);
/// RSDP hint from start_info, to find the ACPI tables to step over.
static RSDP_HINT: AtomicU64 = AtomicU64::new(0);

/// Starts a fresh arena right after the guest image. Fails the scenario if no RAM follows it.
pub fn reset(info: &BootInfo) {
    let start = image_range().1.next_multiple_of(PAGE);
    let Some(range) = info.ram().iter().find(|r| r.end > start) else {
        fail(|w| {
            w.str("no RAM above the guest image end ")
                .hex(start)
                .str(" for device buffers");
        })
    };
    NEXT.store(
        start.max(range.start.next_multiple_of(PAGE)),
        Ordering::Relaxed,
    );
    END.store(range.end, Ordering::Relaxed);
    RSDP_HINT.store(info.rsdp_paddr, Ordering::Relaxed);
}

/// `len` bytes (rounded up to whole pages), page-aligned and zeroed. Fails the scenario if the
/// arena is exhausted.
pub fn alloc(len: u64) -> Region {
    let len = len.max(1).next_multiple_of(PAGE);
    let mut at = NEXT.load(Ordering::Relaxed);
    // Step over ACPI tables until the candidate overlaps none (tables are few; this is RAM
    // reading in CPL3, no exits).
    loop {
        let mut moved = false;
        acpi::for_each_table(RSDP_HINT.load(Ordering::Relaxed), |s, e| {
            if s < at.saturating_add(len) && e > at {
                at = e.next_multiple_of(PAGE);
                moved = true;
            }
        });
        if !moved {
            break;
        }
    }
    let end = END.load(Ordering::Relaxed);
    let region = at
        .checked_add(len)
        .filter(|&e| e <= end)
        .and_then(|_| Region::new(at, len));
    let Some(region) = region else {
        fail(|w| {
            w.str("out of RAM for device buffers: ")
                .dec(len)
                .str(" bytes at ")
                .hex(at)
                .str(", RAM range ends at ")
                .hex(end);
        })
    };
    region.zero();
    NEXT.store(at + len, Ordering::Relaxed);
    region
}
