//! The `memcheck` scenario, run in CPL3 at native speed: writes an address-dependent pattern word
//! into every 4 KiB page of every RAM range, then reads them all back. All ranges are written
//! before any is verified, so pages that alias each other across ranges (say a slot mapped
//! twice) are caught too. Skips the guest's own image (code, data, BSS with stacks and page
//! tables), the AP trampoline page and every ACPI table it can find. `read_all` only reads a
//! word of every RAM page (the agent's `read-ram`: a restored guest faulting in all its memory).
use crate::bootinfo::BootInfo;
use crate::paging;
use crate::scenario::fail;
use crate::{acpi, serial, smp};

const PAGE: u64 = 4096;
const PATTERN: u64 = 0x5a5a_a5a5_dead_beef;
const MAX_PROTECTED: usize = 48;

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// Page-granular ranges memcheck must not write.
struct Protected {
    ranges: [(u64, u64); MAX_PROTECTED],
    len: usize,
}

impl Protected {
    fn add(&mut self, start: u64, end: u64) {
        let start = start & !(PAGE - 1);
        let end = end.saturating_add(PAGE - 1) & !(PAGE - 1);
        if self.len == MAX_PROTECTED {
            fail(|w| {
                w.str("more than ")
                    .dec(MAX_PROTECTED as u64)
                    .str(" ranges to protect");
            });
        }
        self.ranges[self.len] = (start, end);
        self.len += 1;
    }

    fn covers(&self, page: u64) -> bool {
        self.ranges[..self.len]
            .iter()
            .any(|&(s, e)| page >= s && page < e)
    }
}

fn pattern(page: u64) -> u64 {
    page ^ PATTERN
}

/// Stores `value` at physical `addr` with a plain `mov`. Inline assembly rather than a raw
/// pointer because page 0 is RAM too, and a Rust store through a null pointer is undefined.
///
/// # Safety
/// `addr` must be 8-byte aligned, identity-mapped writable, and hold nothing the guest needs.
unsafe fn poke(addr: u64, value: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        core::arch::asm!("mov qword ptr [{0}], {1}", in(reg) addr, in(reg) value, options(nostack, preserves_flags))
    };
}

/// Loads the u64 at physical `addr` with a plain `mov` (see `poke`).
///
/// # Safety
/// `addr` must be 8-byte aligned and identity-mapped.
unsafe fn peek(addr: u64) -> u64 {
    let value;
    // SAFETY: guaranteed by the caller.
    unsafe {
        core::arch::asm!("mov {1}, qword ptr [{0}]", in(reg) addr, out(reg) value, options(nostack, preserves_flags, readonly))
    };
    value
}

/// First and one-past-last whole page inside `[start, end)`.
fn whole_pages(start: u64, end: u64) -> core::ops::Range<u64> {
    let first = start.saturating_add(PAGE - 1) & !(PAGE - 1);
    let last = end & !(PAGE - 1);
    first..last.max(first)
}

pub fn run(info: &BootInfo) {
    if info.version < 1 {
        fail(|w| {
            w.str("start_info version ")
                .dec(info.version.into())
                .str(" has no memory map");
        });
    }
    if info.ram().is_empty() {
        fail(|w| {
            w.str("no RAM ranges in the memory map");
        });
    }
    let mut protected = Protected {
        ranges: [(0, 0); MAX_PROTECTED],
        len: 0,
    };
    protected.add(
        core::ptr::addr_of!(__image_start) as u64,
        core::ptr::addr_of!(__image_end) as u64,
    );
    protected.add(smp::TRAMPOLINE, smp::TRAMPOLINE + PAGE);
    acpi::for_each_table(info.rsdp_paddr, |s, e| protected.add(s, e));

    for r in info.ram() {
        if !paging::map(r.start, r.end) {
            fail(|w| {
                w.str("range ")
                    .hex(r.start)
                    .str("-")
                    .hex(r.end)
                    .str(" ends above the identity map (")
                    .hex(paging::capacity())
                    .str(")");
            });
        }
    }

    for r in info.ram() {
        for page in whole_pages(r.start, r.end).step_by(PAGE as usize) {
            if !protected.covers(page) {
                // SAFETY: `page` is RAM per the memory map, identity-mapped user-writable (mapped
                // above), and outside the guest image, the trampoline and the ACPI tables, so no
                // Rust object or structure the guest still needs lives there.
                unsafe { poke(page, pattern(page)) };
            }
        }
    }

    let mut total = 0u64;
    for r in info.ram() {
        let mut pages = 0u64;
        for page in whole_pages(r.start, r.end).step_by(PAGE as usize) {
            if protected.covers(page) {
                continue;
            }
            // SAFETY: as for the write above.
            let got = unsafe { peek(page) };
            if got != pattern(page) {
                fail(|w| {
                    w.str("page ")
                        .hex(page)
                        .str(" read ")
                        .hex(got)
                        .str(" expected ")
                        .hex(pattern(page));
                });
            }
            pages += 1;
        }
        serial::line()
            .str("testguest: memcheck range ")
            .hex(r.start)
            .str("-")
            .hex(r.end)
            .str(" pages=")
            .dec(pages)
            .str(" ok\n");
        total += pages;
    }
    serial::line()
        .str("testguest: memcheck ok ranges=")
        .dec(info.ram().len() as u64)
        .str(" pages=")
        .dec(total)
        .str("\n");
}

/// Reads one word of every whole RAM page and returns how many pages it read.
pub fn read_all(info: &BootInfo) -> u64 {
    let mut pages = 0u64;
    let mut fold = 0u64;
    for r in info.ram() {
        if !paging::map(r.start, r.end) {
            continue;
        }
        for page in whole_pages(r.start, r.end).step_by(PAGE as usize) {
            // SAFETY: `page` is RAM per the memory map and identity-mapped (mapped above); the
            // load only reads it.
            fold ^= unsafe { peek(page) };
            pages += 1;
        }
    }
    core::hint::black_box(fold);
    pages
}
