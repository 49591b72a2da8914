//! `SlotMemory`: the host memory behind one hypervisor memory slot. `Vm::map_memory` takes it
//! as an `Arc` and keeps that `Arc` for as long as the hypervisor can reach the slot, so guest
//! RAM cannot be unmapped under a guest: the compiler, not a caller's promise, keeps the
//! mapping alive. `RegionMapping` (Linux) and `SectionRam::slot_memory` (Windows) provide it.
//! Not here: which regions exist (`region`) and how they are mapped (`guest_ram`,
//! `section_ram`).

/// A host mapping a memory slot can be backed by.
///
/// # Safety
/// An implementor guarantees that `as_ptr()..as_ptr() + size()` is one readable and writable
/// mapping in this process that stays mapped for as long as the value exists, and that neither
/// value changes over its life.
pub unsafe trait SlotMemory: Send + Sync + std::fmt::Debug {
    /// The mapping's first byte.
    fn as_ptr(&self) -> *mut u8;
    /// The mapping's length in bytes.
    fn size(&self) -> u64;
}

/// Zeroed, page-aligned heap memory for tests of code that takes `SlotMemory`.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct TestMemory {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

#[cfg(test)]
impl TestMemory {
    /// `size` zeroed bytes (more than zero), aligned to 4 KiB.
    #[allow(clippy::unwrap_used)]
    pub(crate) fn new(size: usize) -> std::sync::Arc<Self> {
        let layout = std::alloc::Layout::from_size_align(size, 4096).unwrap();
        assert!(size > 0);
        // SAFETY: `layout` has a non-zero size.
        let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).unwrap();
        std::sync::Arc::new(Self { ptr, layout })
    }

    /// A copy of `len` bytes from `offset`.
    pub(crate) fn bytes(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= self.layout.size());
        let mut out = vec![0u8; len];
        // SAFETY: the range lies inside the allocation (asserted), which lives as long as
        // `self`; `out` is a separate allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(offset), out.as_mut_ptr(), len)
        };
        out
    }
}

#[cfg(test)]
impl Drop for TestMemory {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

// SAFETY: plain heap bytes owned by this value, accessed only by copies through raw pointers.
#[cfg(test)]
unsafe impl Send for TestMemory {}
// SAFETY: as above.
#[cfg(test)]
unsafe impl Sync for TestMemory {}

// SAFETY: the allocation is readable and writable, lives until `drop`, and never moves.
#[cfg(test)]
unsafe impl SlotMemory for TestMemory {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn size(&self) -> u64 {
        self.layout.size() as u64
    }
}
