//! The identity map of guest-physical memory and reads through it.
//!
//! All pages are present, writable and user-accessible (U/S=1), so CPL3 code can touch any
//! physical address below `mapped_limit()`. The CPL0 entry code (`entry.rs`) maps only the first
//! GiB; `extend_identity_map` maps the rest from CPL3, where a page-table fill costs nothing.
//! Entries only ever go from not-present to present, which needs no TLB flush.
//!
//! Layout: PML4[0] -> PDPT. With 1 GiB pages (CPUID pdpe1gb) PDPT entries map up to 512 GiB
//! directly, except GiB 3, which uses 2 MiB pages so that 0xfe00_0000..4 GiB (LAPIC, IOAPIC,
//! firmware) can be uncached. Without 1 GiB pages, 64 page directories of 2 MiB pages map 64 GiB.
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;
/// A non-leaf entry: present, writable, user.
pub const TABLE_FLAGS: u64 = PRESENT | WRITABLE | USER;
/// A 1 GiB or 2 MiB leaf: present, writable, user, page size.
pub const LEAF_FLAGS: u64 = TABLE_FLAGS | HUGE;

const GIB: u64 = 1 << 30;
const MIB2: u64 = 1 << 21;
/// Page directories for the 2 MiB fallback: 64 GiB.
const PD_COUNT: usize = 64;
/// With 1 GiB pages one PDPT maps 512 GiB.
const MAX_GIB_WITH_1G: u64 = 512;
/// 2 MiB pages from 0xfe00_0000 up to 4 GiB are uncached (PCD|PWT).
const UNCACHED_FROM: u64 = 0xfe00_0000;

/// One 4 KiB page table.
#[repr(C, align(4096))]
pub struct PageTable(UnsafeCell<[u64; 512]>);

/// The page directories used by the 2 MiB fallback (and GiB 3 with 1 GiB pages).
#[repr(C, align(4096))]
pub struct PageDirs(UnsafeCell<[[u64; 512]; PD_COUNT]>);

// SAFETY: the tables are written by the BSP alone (entry code, then `extend_identity_map` before
// any AP starts) and otherwise only read by the MMU; no Rust reference to them is ever formed.
unsafe impl Sync for PageTable {}
// SAFETY: as for `PageTable`.
unsafe impl Sync for PageDirs {}

pub static PML4: PageTable = PageTable(UnsafeCell::new([0; 512]));
pub static PDPT: PageTable = PageTable(UnsafeCell::new([0; 512]));
pub static PDS: PageDirs = PageDirs(UnsafeCell::new([[0; 512]; PD_COUNT]));
/// Set to 1 by the entry code when it used a 1 GiB page for GiB 0.
pub static GIB_PAGES: AtomicU8 = AtomicU8::new(0);
/// Physical address width from CPUID 0x80000008, stored by the entry code (CPUID is only
/// trustworthy in CPL0 under PVM); 36 if the leaf is missing.
pub static PHYS_ADDR_BITS: AtomicU8 = AtomicU8::new(36);
/// End of the identity map, set by `extend_identity_map`.
static MAPPED_LIMIT: AtomicU64 = AtomicU64::new(GIB);

/// Fills page directory `index` with 2 MiB pages for GiB `index`.
fn fill_pd(index: usize) {
    let pd = PDS.0.get().cast::<u64>();
    for i in 0..512u64 {
        let addr = index as u64 * GIB + i * MIB2;
        let mut entry = addr | LEAF_FLAGS;
        if (UNCACHED_FROM..4 * GIB).contains(&addr) {
            entry |= CACHE_DISABLE | WRITE_THROUGH;
        }
        // SAFETY: index < PD_COUNT and i < 512, so this is inside PDS; see `PageDirs`.
        unsafe { pd.add(index * 512 + i as usize).write_volatile(entry) };
    }
}

/// Maps every GiB from 1 up to the physical address width (at most 512 GiB with 1 GiB pages,
/// 64 GiB without). Runs in CPL3 on the BSP before any AP starts.
pub fn extend_identity_map() {
    let gib_pages = GIB_PAGES.load(Ordering::Relaxed) != 0;
    let phys_bits = u32::from(PHYS_ADDR_BITS.load(Ordering::Relaxed));
    let phys_gib = 1u64 << (phys_bits.clamp(32, 39) - 30);
    let max_gib = if gib_pages {
        MAX_GIB_WITH_1G
    } else {
        PD_COUNT as u64
    };
    let gib_count = phys_gib.min(max_gib).max(4);
    let pdpt = PDPT.0.get().cast::<u64>();
    for gib in 1..gib_count {
        let entry = if gib_pages && gib != 3 {
            (gib * GIB) | LEAF_FLAGS
        } else {
            // Fill the directory before the PDPT entry makes it reachable.
            fill_pd(gib as usize);
            let pd_addr = PDS.0.get() as u64 + gib * 4096;
            pd_addr | TABLE_FLAGS
        };
        // SAFETY: gib < 512, inside the PDPT; the entry was not present, so no TLB entry or
        // in-use translation changes.
        unsafe { pdpt.add(gib as usize).write_volatile(entry) };
    }
    MAPPED_LIMIT.store(gib_count * GIB, Ordering::Relaxed);
}

/// The first physical address not covered by the identity map.
pub fn mapped_limit() -> u64 {
    MAPPED_LIMIT.load(Ordering::Relaxed)
}

/// Integer types that can be read from arbitrary physical memory.
pub trait Plain: Copy {}
impl Plain for u8 {}
impl Plain for u16 {}
impl Plain for u32 {}
impl Plain for u64 {}

/// Reads a `T` at physical address `addr`, or `None` if `addr` is 0 or the value is not
/// entirely inside the identity map.
pub fn read<T: Plain>(addr: u64) -> Option<T> {
    let end = addr.checked_add(core::mem::size_of::<T>() as u64)?;
    if addr == 0 || end > mapped_limit() {
        return None;
    }
    // SAFETY: the range is identity-mapped and readable from CPL3; every bit pattern is a valid
    // `T`; the read is unaligned-safe and creates no reference.
    Some(unsafe { core::ptr::read_unaligned(addr as *const T) })
}
