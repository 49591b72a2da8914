//! The identity map of guest-physical memory and reads through it.
//!
//! All pages are present, writable and user-accessible (U/S=1), so CPL3 code can touch any
//! physical address it has mapped with `map`. The boot tables (PML4, PDPT, and the page directory
//! for GiB 0 with 512 2 MiB pages) are initialised data computed at compile time, so the CPL0
//! entry code (`entry.rs`) only loads CR3. Every other GiB is mapped on demand from CPL3, the
//! first time something reads or writes it. On the target machines a fresh guest page costs about
//! 15 us when first touched (shadow paging), and eagerly filling 63 page directories took about
//! 2 ms; the hello path maps nothing beyond GiB 0.
//! Entries only ever go from not-present to present, which needs no TLB flush.
//!
//! Layout: PML4[0] -> PDPT[0] -> PD0. Beyond GiB 0, with 1 GiB pages (CPUID pdpe1gb) PDPT entries
//! map up to 512 GiB directly, except GiB 3, which uses 2 MiB pages so that 0xc000_0000..4 GiB
//! (PCI BARs and ECAM, LAPIC, IOAPIC, firmware) can be uncached. Without 1 GiB pages, page directories of 2 MiB
//! pages map up to 64 GiB. The capacity is also capped by the physical address width.
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, Ordering};

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;
/// A non-leaf entry: present, writable, user.
const TABLE_FLAGS: u64 = PRESENT | WRITABLE | USER;
/// A 1 GiB or 2 MiB leaf: present, writable, user, page size.
const LEAF_FLAGS: u64 = TABLE_FLAGS | HUGE;

const GIB: u64 = 1 << 30;
const MIB2: u64 = 1 << 21;
/// GiBs the 2 MiB fallback can map: GiB 0 (`PD0`) plus one directory each in `PDS`.
const PD_COUNT: usize = 64;
/// With 1 GiB pages one PDPT maps 512 GiB.
const MAX_GIB_WITH_1G: u64 = 512;
/// 2 MiB pages from 0xc000_0000 up to 4 GiB are uncached (PCD|PWT): the MMIO hole, with PCI
/// BARs and ECAM (skiff: BARs at 0xc000_0000, ECAM at 0xe000_0000), IOAPIC, LAPIC and firmware.
const UNCACHED_FROM: u64 = 0xc000_0000;
/// CPUID 0x8000_0001 EDX: 1 GiB pages.
const PDPE1GB: u32 = 1 << 26;

/// One page directory.
#[repr(C, align(4096))]
struct PageDir(UnsafeCell<[u64; 512]>);

/// A page table whose entry 0 points at the next-level table, fixed at link time: the entry is a
/// pointer to that table plus `TABLE_FLAGS`, which const evaluation turns into a relocation.
/// Entries 1..512 start out empty.
#[repr(C, align(4096))]
pub struct LinkedTable {
    first: *const u8,
    rest: UnsafeCell<[u64; 511]>,
}

impl LinkedTable {
    const fn new(next: *const u8) -> Self {
        LinkedTable {
            first: next.wrapping_add(TABLE_FLAGS as usize),
            rest: UnsafeCell::new([0; 511]),
        }
    }
}

/// The page directories for GiB 1.. (GiB `g` uses index `g - 1`), filled on demand.
#[repr(C, align(4096))]
struct PageDirs(UnsafeCell<[[u64; 512]; PD_COUNT - 1]>);

// SAFETY: the tables are written only by the BSP in CPL3 (`map`; APs never call it) and
// otherwise only read by the MMU; no Rust reference to their contents is ever formed.
unsafe impl Sync for PageDir {}
// SAFETY: as for `PageDir`; `first` is never written.
unsafe impl Sync for LinkedTable {}
// SAFETY: as for `PageDir`.
unsafe impl Sync for PageDirs {}

/// Entry `i` of the directory of 2 MiB pages that identity-maps GiB `gib`.
const fn pd_entry(gib: u64, i: usize) -> u64 {
    let addr = gib * GIB + i as u64 * MIB2;
    if addr >= UNCACHED_FROM && addr < 4 * GIB {
        addr | LEAF_FLAGS | CACHE_DISABLE | WRITE_THROUGH
    } else {
        addr | LEAF_FLAGS
    }
}

/// The directory for GiB 0, computed at compile time.
const fn pd0() -> [u64; 512] {
    let mut pd = [0; 512];
    let mut i = 0;
    while i < 512 {
        pd[i] = pd_entry(0, i);
        i += 1;
    }
    pd
}

/// GiB 0 in 2 MiB pages, computed at compile time.
static PD0: PageDir = PageDir(UnsafeCell::new(pd0()));
/// PDPT[0] -> PD0; later entries are written by `map`.
static PDPT: LinkedTable = LinkedTable::new(PD0.0.get().cast_const().cast());
/// The PML4, loaded into CR3 by entry.rs (BSP and APs): PML4[0] -> PDPT.
pub static PML4: LinkedTable = LinkedTable::new((&raw const PDPT).cast());
static PDS: PageDirs = PageDirs(UnsafeCell::new([[0; 512]; PD_COUNT - 1]));

// Raw CPUID output, stored by the CPL0 entry code (entry.rs) before CPL3 starts: under PVM only a
// CPL0 CPUID reports the guest's leaves. Decoded here, in CPL3. In `.data.tg_hot` (see linker.ld).
/// Leaf 0x8000_0000 EAX: the highest extended leaf.
#[link_section = ".data.tg_hot"]
pub static CPUID_MAX_EXT: AtomicU32 = AtomicU32::new(0);
/// Leaf 0x8000_0001 EDX (bit 26: pdpe1gb).
#[link_section = ".data.tg_hot"]
pub static CPUID_EXT1_EDX: AtomicU32 = AtomicU32::new(0);
/// Leaf 0x8000_0008 EAX (bits 7:0: physical address width).
#[link_section = ".data.tg_hot"]
pub static CPUID_EXT8_EAX: AtomicU32 = AtomicU32::new(0);

/// Whether GiBs other than 3 are mapped with 1 GiB pages.
fn gib_pages() -> bool {
    CPUID_MAX_EXT.load(Ordering::Relaxed) >= 0x8000_0001
        && CPUID_EXT1_EDX.load(Ordering::Relaxed) & PDPE1GB != 0
}

/// The end of what the identity map can cover: the physical address width (36 bits if CPUID
/// does not say), at most 512 GiB with 1 GiB pages or 64 GiB without, and at least 4 GiB.
pub fn capacity() -> u64 {
    let phys_bits = if CPUID_MAX_EXT.load(Ordering::Relaxed) >= 0x8000_0008 {
        CPUID_EXT8_EAX.load(Ordering::Relaxed) & 0xff
    } else {
        36
    };
    let phys_gib = 1u64 << (phys_bits.clamp(32, 39) - 30);
    let max_gib = if gib_pages() {
        MAX_GIB_WITH_1G
    } else {
        PD_COUNT as u64
    };
    phys_gib.min(max_gib).max(4) * GIB
}

/// Maps GiB `gib` (1 <= gib < capacity) if it is not mapped yet.
fn map_gib(gib: u64) {
    // PDPT entry `gib` is `rest[gib - 1]`.
    let slot = PDPT.rest.get().cast::<u64>().wrapping_add(gib as usize - 1);
    // SAFETY: 1 <= gib < 512, so `slot` is inside the PDPT; see `PageDir` for concurrency.
    if unsafe { slot.read_volatile() } != 0 {
        return;
    }
    let entry = if gib_pages() && gib != 3 {
        (gib * GIB) | LEAF_FLAGS
    } else {
        // Fill the directory before the PDPT entry makes it reachable.
        let pd = PDS
            .0
            .get()
            .cast::<u64>()
            .wrapping_add((gib as usize - 1) * 512);
        for i in 0..512 {
            // SAFETY: without 1 GiB pages gib < PD_COUNT (see `capacity`), and with them
            // gib == 3, so the entry is inside PDS; nothing maps this directory yet.
            unsafe { pd.add(i).write_volatile(pd_entry(gib, i)) };
        }
        pd as u64 | TABLE_FLAGS
    };
    // SAFETY: as above; the entry was not present, so no TLB entry or in-use translation changes.
    unsafe { slot.write_volatile(entry) };
}

/// Makes `[start, end)` accessible through the identity map, mapping the GiBs it touches that
/// are not mapped yet. Returns false, mapping nothing, if the range reaches past `capacity()`.
/// BSP only (the APs stay in CPL0 and never need more than GiB 0).
pub fn map(start: u64, end: u64) -> bool {
    if end > capacity() {
        return false;
    }
    if end > start {
        for gib in (start / GIB).max(1)..=(end - 1) / GIB {
            map_gib(gib);
        }
    }
    true
}

/// Integer types that can be read from arbitrary physical memory.
pub trait Plain: Copy {}
impl Plain for u8 {}
impl Plain for u16 {}
impl Plain for u32 {}
impl Plain for u64 {}

/// Reads a `T` at physical address `addr`, or `None` if `addr` is 0 or the value does not lie
/// entirely below the identity map's capacity.
pub fn read<T: Plain>(addr: u64) -> Option<T> {
    let end = addr.checked_add(core::mem::size_of::<T>() as u64)?;
    if addr == 0 || !map(addr, end) {
        return None;
    }
    // SAFETY: `map` made the range identity-mapped and readable from CPL3; every bit pattern is
    // a valid `T`; the read is unaligned-safe and creates no reference.
    Some(unsafe { core::ptr::read_unaligned(addr as *const T) })
}
