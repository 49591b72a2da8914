//! `RegionMapping`: one guest RAM region's mapping in this process, for code that hands guest
//! bytes to the kernel: snapshot writers `pwrite` pages from it, and the pages a copy-on-write
//! mapping made its own are found in `/proc/self/pagemap` at its address.
//!
//! A `RegionMapping` holds the region's `Arc`, so the mapping stays mapped for as long as any
//! handle lives: a thread copying guest memory needs no promise from whoever started it, and a
//! VM's memory slot holds one (`SlotMemory`) for as long as the hypervisor can reach it. The
//! only pointer that leaves this module is the one the hypervisor registers; skiff's own bytes
//! go to the kernel through bounds-checked `vm-memory` slices. Not here: the guest's own accesses (`vm-memory` accessors) and which pages to copy
//! (`snapshot::dirty`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use devices::guest_memory::TrackedGuestMemory;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestMemoryBackend as _, VolatileMemory as _};

use super::SlotMemory;

/// One region's mapping in this process, kept mapped by this handle.
#[derive(Debug, Clone)]
pub struct RegionMapping {
    mapping: Arc<MmapRegion<AtomicBitmap>>,
}

impl RegionMapping {
    /// Each region of `memory`, in guest address order.
    pub fn of_each(memory: &TrackedGuestMemory) -> Vec<Self> {
        memory
            .iter()
            .map(|r| Self {
                mapping: r.get_mmap(),
            })
            .collect()
    }

    /// The mapping's length in bytes.
    pub fn len(&self) -> usize {
        self.mapping.size()
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The mapping's first host address, as a number (the index into `/proc/self/pagemap`).
    pub fn host_address(&self) -> usize {
        self.mapping.as_ptr() as usize
    }

    /// Writes `len` bytes from `offset` in the mapping into `file` at `file_offset` with one
    /// `pwrite`, and returns how many the kernel wrote (possibly fewer). The guest may write
    /// the bytes meanwhile: the file then holds some mix, which a live snapshot's next pass
    /// rewrites.
    pub fn pwrite_into(
        &self,
        file: &File,
        offset: usize,
        len: usize,
        file_offset: u64,
    ) -> io::Result<usize> {
        let slice = self
            .mapping
            .get_slice(offset, len)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let file_offset = libc::off_t::try_from(file_offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let guard = slice.ptr_guard();
        // SAFETY: `slice` covers `len` bytes inside the mapping, which `self.mapping` keeps
        // mapped for the whole call; the kernel reads them directly and no Rust reference into
        // guest memory is made.
        let written =
            unsafe { libc::pwrite(file.as_raw_fd(), guard.as_ptr().cast(), len, file_offset) };
        usize::try_from(written).map_err(|_| io::Error::last_os_error())
    }
}

// SAFETY: a `RegionMapping` is a guest RAM region (`of_each`), which is mapped readable and
// writable (`guest_ram`; `vm-memory`'s anonymous regions likewise); the `Arc` keeps it mapped
// for as long as this value lives, and a mapping's address and size never change.
unsafe impl SlotMemory for RegionMapping {
    fn as_ptr(&self) -> *mut u8 {
        self.mapping.as_ptr()
    }

    fn size(&self) -> u64 {
        self.mapping.size() as u64
    }
}

/// A private (copy-on-write) mapping made by a test, read-write like guest RAM.
#[cfg(test)]
impl From<Arc<MmapRegion<AtomicBitmap>>> for RegionMapping {
    fn from(mapping: Arc<MmapRegion<AtomicBitmap>>) -> Self {
        Self { mapping }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn writes_the_bytes_asked_for_and_refuses_ranges_outside() {
        let memory = TrackedGuestMemory::from_ranges(&[(GuestAddress(0x1000), 0x4000)]).unwrap();
        memory.write_slice(b"guest", GuestAddress(0x2000)).unwrap();
        let mapping = RegionMapping::of_each(&memory).remove(0);
        assert_eq!(mapping.len(), 0x4000);
        let file = tempfile::tempfile().unwrap();
        assert_eq!(mapping.pwrite_into(&file, 0x1000, 5, 7).unwrap(), 5);
        let mut buf = [0u8; 5];
        file.read_exact_at(&mut buf, 7).unwrap();
        assert_eq!(&buf, b"guest");
        let outside = mapping.pwrite_into(&file, 0x3fff, 2, 0).unwrap_err();
        assert_eq!(outside.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn the_mapping_outlives_the_memory_it_came_from() {
        let memory = TrackedGuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        memory.write_slice(b"kept", GuestAddress(0)).unwrap();
        let mapping = RegionMapping::of_each(&memory).remove(0);
        drop(memory);
        let file = tempfile::tempfile().unwrap();
        mapping.pwrite_into(&file, 0, 4, 0).unwrap();
        let mut buf = [0u8; 4];
        file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"kept");
    }
}
