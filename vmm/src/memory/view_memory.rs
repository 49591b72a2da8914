//! `ViewMemory`: vm-memory's `GuestMemoryBackend` over host mappings that another value owns,
//! so code written against vm-memory (the boot structures in `arch`, the kernel loader) writes
//! into them as it writes into a `GuestMemoryMmap`.
//!
//! On Windows guest RAM is `SectionRam`'s section views, which vm-memory 0.18 cannot map itself
//! (its Windows backend maps only memory it allocates or a `File`). A `ViewRegion` is one such
//! mapping at its guest address; it holds the mapping's owner (an `Arc`), so the mapping lives as
//! long as any region or `ViewMemory` clone that reaches it. It keeps no dirty bitmap.
//!
//! Platform-neutral; unit-tested on Linux over plain buffers.

use std::sync::Arc;

use vm_memory::bitmap::BS;
use vm_memory::{
    GuestAddress, GuestMemoryError, GuestMemoryRegion, GuestMemoryRegionBytes,
    GuestRegionCollection, GuestUsize, MemoryRegionAddress, VolatileSlice,
};

/// One host mapping at a guest physical address, kept alive by its owner.
pub struct ViewRegion {
    start: GuestAddress,
    host: *mut u8,
    len: usize,
    _owner: Arc<dyn Send + Sync>,
}

impl std::fmt::Debug for ViewRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewRegion")
            .field("start", &format_args!("{:#x}", self.start.0))
            .field("len", &format_args!("{:#x}", self.len))
            .finish()
    }
}

// SAFETY: the region only hands out volatile slices of shared memory that its owner keeps
// mapped; the owner is `Send + Sync` and the pointer is never dereferenced as a reference.
unsafe impl Send for ViewRegion {}
// SAFETY: as above; concurrent users only make volatile accesses.
unsafe impl Sync for ViewRegion {}

impl ViewRegion {
    /// The mapping `host..host + len` as guest memory at `start`.
    ///
    /// # Safety
    /// `host..host + len` must be one readable and writable mapping that stays mapped for as
    /// long as `owner` lives, and that everyone else reaches only through raw or volatile
    /// accesses (never through a Rust reference).
    pub unsafe fn new(start: u64, host: *mut u8, len: usize, owner: Arc<dyn Send + Sync>) -> Self {
        Self {
            start: GuestAddress(start),
            host,
            len,
            _owner: owner,
        }
    }
}

impl GuestMemoryRegion for ViewRegion {
    type B = ();

    fn len(&self) -> GuestUsize {
        self.len as GuestUsize
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
            .filter(|&o| o < self.len)
            .ok_or(GuestMemoryError::InvalidBackendAddress)?;
        // SAFETY: `offset < len`, so the result stays inside the mapping.
        Ok(unsafe { self.host.add(offset) })
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> vm_memory::guest_memory::Result<VolatileSlice<'_, BS<'_, ()>>> {
        let start =
            usize::try_from(offset.0).map_err(|_| GuestMemoryError::InvalidBackendAddress)?;
        match start.checked_add(count) {
            Some(end) if end <= self.len => {}
            _ => return Err(GuestMemoryError::InvalidBackendAddress),
        }
        // SAFETY: `start..start + count` lies inside the mapping (checked above), which the
        // owner this region holds keeps mapped for the slice's lifetime (bound to `&self`);
        // by `new`'s contract every other user of it makes only raw or volatile accesses.
        Ok(unsafe { VolatileSlice::with_bitmap(self.host.add(start), count, (), None) })
    }
}

impl GuestMemoryRegionBytes for ViewRegion {}

/// Guest RAM as vm-memory sees it: the `ViewRegion`s, sorted by guest address.
pub type ViewMemory = GuestRegionCollection<ViewRegion>;

/// `SectionRam`'s views as `ViewMemory`, each at its region's guest address. The memory holds
/// `ram`, so the views stay mapped while it (or a clone) lives.
#[cfg(windows)]
pub fn section_memory(
    ram: &Arc<super::SectionRam>,
) -> Result<ViewMemory, vm_memory::GuestRegionCollectionError> {
    let regions = ram
        .regions()
        .iter()
        .zip(ram.views())
        .map(|(region, view)| {
            let owner: Arc<dyn Send + Sync> = ram.clone();
            // SAFETY: the view is `view.len()` bytes mapped read/write; `SectionRam` unmaps its
            // views only when it drops, which `owner` prevents; the hypervisor and the
            // instruction emulator reach the same pages only through raw accesses.
            unsafe {
                ViewRegion::new(
                    region.guest_address,
                    view.host_address() as *mut u8,
                    view.len(),
                    owner,
                )
            }
        })
        .collect();
    ViewMemory::from_regions(regions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::{Bytes, GuestMemoryBackend};

    /// Two buffers at guest 0 and 1 MiB, owned by the returned memory.
    fn memory() -> (ViewMemory, Arc<Mutex<Vec<Vec<u8>>>>) {
        let mut buffers = vec![vec![0u8; 0x1000], vec![0u8; 0x2000]];
        let hosts: Vec<*mut u8> = buffers.iter_mut().map(Vec::as_mut_ptr).collect();
        let owner = Arc::new(Mutex::new(buffers));
        let regions = [(0u64, hosts[0], 0x1000), (0x10_0000, hosts[1], 0x2000)]
            .into_iter()
            .map(|(start, host, len)| {
                // SAFETY: the buffers live in `owner` and are never resized; the test reads
                // them back only after the memory's writes.
                unsafe { ViewRegion::new(start, host, len, owner.clone()) }
            })
            .collect();
        (ViewMemory::from_regions(regions).unwrap(), owner)
    }

    #[test]
    fn writes_land_in_the_owner_s_buffers_at_their_guest_addresses() {
        let (mem, owner) = memory();
        mem.write_slice(b"low", GuestAddress(0xffd)).unwrap();
        mem.write_obj(0x1122_3344u32, GuestAddress(0x10_1ffc))
            .unwrap();
        let buffers = owner.lock().unwrap();
        assert_eq!(&buffers[0][0xffd..], b"low");
        assert_eq!(&buffers[1][0x1ffc..], &0x1122_3344u32.to_le_bytes());
        drop(buffers);
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x10_1ffc)).unwrap(),
            0x1122_3344
        );
        assert_eq!(mem.num_regions(), 2);
        assert_eq!(mem.last_addr(), GuestAddress(0x10_1fff));
    }

    #[test]
    fn accesses_past_a_region_or_in_a_gap_fail() {
        let (mem, _owner) = memory();
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
    fn the_regions_keep_their_owner_alive() {
        let (mem, owner) = memory();
        let weak = Arc::downgrade(&owner);
        drop(owner);
        assert!(weak.upgrade().is_some(), "the memory holds the owner");
        mem.write_slice(b"still mapped", GuestAddress(0x10_0000))
            .unwrap();
        drop(mem);
        assert!(
            weak.upgrade().is_none(),
            "dropping the memory releases the owner"
        );
    }
}
