//! Bounds-checked windows onto guest-physical memory: device registers (PCI ECAM, the regions a
//! virtio capability names inside a BAR) and RAM shared with devices (virtqueues, request
//! buffers). Every access is volatile and naturally aligned. All of it runs in CPL3: the whole
//! physical address space is identity-mapped user-accessible (see `paging.rs`).
//!
//! A `Region` can only be made for a range inside the identity map that does not overlap the
//! guest image, so a wrong BAR or a bad capability cannot make the guest scribble over its own
//! code, stacks or page tables. This is the only module that dereferences those addresses.
use crate::paging;

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// Physical address range of the guest image (code, data, BSS), `[start, end)`.
pub fn image_range() -> (u64, u64) {
    (
        core::ptr::addr_of!(__image_start) as u64,
        core::ptr::addr_of!(__image_end) as u64,
    )
}

/// Integer types a region can read and write.
pub trait Word: Copy {}
impl Word for u8 {}
impl Word for u16 {}
impl Word for u32 {}
impl Word for u64 {}

/// A window `[base, base + len)` of guest-physical memory.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    base: u64,
    len: u64,
}

impl Region {
    /// The window at `base` of `len` bytes (mapping it if need be), or `None` if it is empty,
    /// starts at 0, overlaps the guest image or lies beyond what the identity map can cover.
    pub fn new(base: u64, len: u64) -> Option<Region> {
        let end = base.checked_add(len)?;
        let (img_start, img_end) = image_range();
        if base == 0 || len == 0 || (base < img_end && end > img_start) || !paging::map(base, end) {
            return None;
        }
        Some(Region { base, len })
    }

    /// Physical address of the first byte.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// The sub-window `[off, off + len)`, or `None` if it does not fit.
    pub fn sub(&self, off: u64, len: u64) -> Option<Region> {
        let end = off.checked_add(len)?;
        (len != 0 && end <= self.len).then_some(Region {
            base: self.base + off,
            len,
        })
    }

    /// Pointer to a `T` at `off`; panics if it is outside the window or misaligned.
    fn at<T: Word>(&self, off: u64) -> *mut T {
        let size = core::mem::size_of::<T>() as u64;
        let inside = off.checked_add(size).is_some_and(|end| end <= self.len);
        assert!(
            inside && (self.base + off).is_multiple_of(size),
            "region access out of bounds or misaligned"
        );
        (self.base + off) as *mut T
    }

    /// Volatile read of a `T` at `off`.
    pub fn read<T: Word>(&self, off: u64) -> T {
        // SAFETY: `at` checked that the aligned `T` lies inside the window, which `new` checked is
        // identity-mapped (readable from CPL3), non-null and outside every Rust object of the
        // image; every bit pattern is a valid `T`.
        unsafe { self.at::<T>(off).read_volatile() }
    }

    /// Volatile write of a `T` at `off`.
    pub fn write<T: Word>(&self, off: u64, value: T) {
        // SAFETY: as for `read`; the window holds device registers or memory this guest handed to
        // a device, never a Rust object, so the store cannot break any Rust invariant.
        unsafe { self.at::<T>(off).write_volatile(value) }
    }

    /// Fills the window (whose length must be a multiple of 8) with `f(byte_offset)` per u64.
    pub fn fill_words(&self, mut f: impl FnMut(u64) -> u64) {
        for off in (0..self.len / 8).map(|i| i * 8) {
            self.write::<u64>(off, f(off));
        }
    }

    /// Zeroes the window (whose length must be a multiple of 8).
    pub fn zero(&self) {
        self.fill_words(|_| 0);
    }
}
