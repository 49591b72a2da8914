//! `ViewMemory`: vm-memory's `GuestMemoryBackend` over `SlotMemory` mappings, so code written
//! against vm-memory (the boot structures in `arch`, the kernel loader) writes into them as it
//! writes into a `GuestMemoryMmap`.
//!
//! On Windows guest RAM is `SectionRam`'s section views, which vm-memory 0.18 cannot map itself
//! (its Windows backend maps only memory it allocates or a `File`). A `ViewRegion` is one such
//! mapping at its guest address; it holds the mapping's `SlotMemory` (whose contract keeps it
//! mapped while the value lives), so the mapping lives as long as any region or `ViewMemory`
//! clone that reaches it. It keeps no dirty bitmap.
//!
//! Platform-neutral; unit-tested on Linux over heap memory.

use std::sync::Arc;

use vm_memory::bitmap::BS;
use vm_memory::{
    GuestAddress, GuestMemoryError, GuestMemoryRegion, GuestMemoryRegionBytes,
    GuestRegionCollection, GuestUsize, MemoryRegionAddress, VolatileSlice,
};

use super::SlotMemory;

/// One host mapping at a guest physical address.
#[derive(Debug)]
pub struct ViewRegion {
    start: GuestAddress,
    memory: Arc<dyn SlotMemory>,
}

impl ViewRegion {
    /// `memory` as guest memory at `start`.
    pub fn new(start: u64, memory: Arc<dyn SlotMemory>) -> Self {
        Self {
            start: GuestAddress(start),
            memory,
        }
    }

    fn len_bytes(&self) -> usize {
        // vm-memory builds for 64-bit targets only, where a u64 fits a usize.
        usize::try_from(self.memory.size()).unwrap_or(usize::MAX)
    }
}

impl GuestMemoryRegion for ViewRegion {
    type B = ();

    fn len(&self) -> GuestUsize {
        self.memory.size()
    }

    fn start_addr(&self) -> GuestAddress {
        self.start
    }

    fn bitmap(&self) -> BS<'_, ()> {}

    fn get_host_address(
        &self,
        addr: MemoryRegionAddress,
    ) -> vm_memory::guest_memory::Result<*mut u8> {
        let offset = usize::try_from(addr.0)
            .ok()
            .filter(|&o| o < self.len_bytes())
            .ok_or(GuestMemoryError::InvalidBackendAddress)?;
        // SAFETY: `offset < size`, so the result stays inside the mapping.
        Ok(unsafe { self.memory.as_ptr().add(offset) })
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> vm_memory::guest_memory::Result<VolatileSlice<'_, BS<'_, ()>>> {
        let start =
            usize::try_from(offset.0).map_err(|_| GuestMemoryError::InvalidBackendAddress)?;
        match start.checked_add(count) {
            Some(end) if end <= self.len_bytes() => {}
            _ => return Err(GuestMemoryError::InvalidBackendAddress),
        }
        // SAFETY: `start..start + count` lies inside the mapping (checked above), which the
        // `SlotMemory` this region holds keeps mapped for the slice's lifetime (bound to
        // `&self`). Guest memory is shared with the guest and the hypervisor, which never hold
        // Rust references into it, so volatile access is the only kind.
        Ok(unsafe { VolatileSlice::with_bitmap(self.memory.as_ptr().add(start), count, (), None) })
    }
}

impl GuestMemoryRegionBytes for ViewRegion {}

/// Guest RAM as vm-memory sees it: the `ViewRegion`s, sorted by guest address.
pub type ViewMemory = GuestRegionCollection<ViewRegion>;

/// `SectionRam`'s views as `ViewMemory`, each at its region's guest address; each region holds
/// its view's `SlotMemory` (and through it the RAM).
#[cfg(windows)]
pub fn section_memory(
    ram: &Arc<super::SectionRam>,
) -> Result<ViewMemory, vm_memory::GuestRegionCollectionError> {
    let regions = ram
        .regions()
        .iter()
        .zip(ram.slot_memory())
        .map(|(region, memory)| ViewRegion::new(region.guest_address, memory))
        .collect();
    ViewMemory::from_regions(regions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::slot_memory::TestMemory;
    use vm_memory::{Bytes, GuestMemoryBackend};

    /// Two buffers at guest 0 and 1 MiB.
    fn memory() -> (ViewMemory, Arc<TestMemory>, Arc<TestMemory>) {
        let (low, high) = (TestMemory::new(0x1000), TestMemory::new(0x2000));
        let regions = vec![
            ViewRegion::new(0, low.clone()),
            ViewRegion::new(0x10_0000, high.clone()),
        ];
        (ViewMemory::from_regions(regions).unwrap(), low, high)
    }

    #[test]
    fn writes_land_in_the_mappings_at_their_guest_addresses() {
        let (mem, low, high) = memory();
        mem.write_slice(b"low", GuestAddress(0xffd)).unwrap();
        mem.write_obj(0x1122_3344u32, GuestAddress(0x10_1ffc))
            .unwrap();
        assert_eq!(low.bytes(0xffd, 3), b"low");
        assert_eq!(high.bytes(0x1ffc, 4), 0x1122_3344u32.to_le_bytes());
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x10_1ffc)).unwrap(),
            0x1122_3344
        );
        assert_eq!(mem.num_regions(), 2);
        assert_eq!(mem.last_addr(), GuestAddress(0x10_1fff));
    }

    #[test]
    fn accesses_past_a_region_or_in_a_gap_fail() {
        let (mem, _low, _high) = memory();
        assert!(mem.write_slice(b"xy", GuestAddress(0xfff)).is_err());
        assert!(mem.write_slice(b"x", GuestAddress(0x2000)).is_err());
        assert!(mem.read_obj::<u64>(GuestAddress(0x10_1ffc)).is_err());
        let region = mem.find_region(GuestAddress(0x10_0000)).unwrap();
        assert!(region.get_slice(MemoryRegionAddress(0x1fff), 2).is_err());
        assert!(region.get_slice(MemoryRegionAddress(u64::MAX), 1).is_err());
        assert!(region
            .get_host_address(MemoryRegionAddress(0x2000))
            .is_err());
        assert!(region.get_host_address(MemoryRegionAddress(0x1fff)).is_ok());
    }

    #[test]
    fn the_regions_keep_their_mappings_alive() {
        let (mem, low, high) = memory();
        let weak = Arc::downgrade(&high);
        drop((low, high));
        assert!(weak.upgrade().is_some(), "the memory holds the mapping");
        mem.write_slice(b"still mapped", GuestAddress(0x10_0000))
            .unwrap();
        drop(mem);
        assert!(
            weak.upgrade().is_none(),
            "dropping the memory releases the mapping"
        );
    }
}
