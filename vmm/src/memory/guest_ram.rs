//! `GuestRam`: guest RAM as `ShareableRegion`s plus the process's own `MAP_SHARED` mapping of
//! each, exposed as the `TrackedGuestMemory` every device uses (vm-memory's `GuestMemoryMmap`
//! with a dirty bitmap for device writes during live snapshots).

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;

use devices::guest_memory::TrackedGuestMemory;
use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

use super::backing::{Backing, BackingError, BackingKind};
use super::region::ShareableRegion;
use super::validate::{validate_regions, RegionError};

/// Granularity of the dirty bitmap for device writes: one bit per 4 KiB page.
const DIRTY_PAGE_SIZE: NonZeroUsize = match NonZeroUsize::new(arch::layout::PAGE_SIZE as usize) {
    Some(v) => v,
    None => panic!("page size is zero"),
};

/// What the user asked for with `--memory`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Total RAM in bytes.
    pub size: u64,
    /// The file kind behind RAM.
    pub backing: BackingKind,
    /// Allocate every page before the guest starts.
    pub prealloc: bool,
    /// Accept a `file=` backing with other hard links (`shared-with-snapshot=on`): a snapshot
    /// taken with `--stop` may hold it, and the VM then overwrites that snapshot's memory.
    pub shared_with_snapshot: bool,
}

/// Errors from building guest RAM.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The size does not fit the x86_64 layout.
    #[error("invalid guest memory size")]
    Layout(#[source] arch::layout::LayoutError),
    /// The size is not a multiple of the backing's page size.
    #[error(
        "guest memory size {size:#x} is not a multiple of the backing's page size {page_size:#x}"
    )]
    Unaligned {
        /// Requested size.
        size: u64,
        /// Page size.
        page_size: u64,
    },
    /// The backing could not be created.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// The region list is invalid.
    #[error(transparent)]
    Region(#[from] RegionError),
    /// Mapping a region failed.
    #[error("cannot map memory region at {guest_address:#x} ({size:#x} bytes)")]
    Map {
        /// Region start.
        guest_address: u64,
        /// Region size.
        size: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// vm-memory refused the region set.
    #[error("cannot assemble guest memory from the mapped regions: {0}")]
    Assemble(String),
}

/// Guest RAM: the regions and this process's mapping of them.
#[derive(Debug)]
pub struct GuestRam {
    regions: Vec<ShareableRegion>,
    memory: TrackedGuestMemory,
    created_file: bool,
    private: bool,
}

impl GuestRam {
    /// Creates the backing for `config`, lays RAM out around the MMIO hole, validates the regions
    /// against `max_slots` and maps them. On failure a memory file skiff created is removed.
    pub fn create(config: &MemoryConfig, max_slots: usize) -> Result<Self, MemoryError> {
        let ranges = arch::layout::ram_ranges(config.size).map_err(MemoryError::Layout)?;
        let backing = Backing::create_with(
            &config.backing,
            config.size,
            config.prealloc,
            config.shared_with_snapshot,
        )?;
        let created = backing.created_path().map(Path::to_path_buf);
        let result = Self::from_backing(backing, &ranges, config.size, max_slots);
        match (result, created) {
            (Err(e), Some(path)) => {
                let _ = std::fs::remove_file(path);
                Err(e)
            }
            (Ok(ram), created) => Ok(Self {
                created_file: created.is_some(),
                ..ram
            }),
            (Err(e), None) => Err(e),
        }
    }

    fn from_backing(
        backing: Backing,
        ranges: &[arch::layout::RamRange],
        size: u64,
        max_slots: usize,
    ) -> Result<Self, MemoryError> {
        if !size.is_multiple_of(backing.page_size) {
            return Err(MemoryError::Unaligned {
                size,
                page_size: backing.page_size,
            });
        }
        let (page_size, hugetlb) = (backing.page_size, backing.hugetlb);
        let file = Arc::new(backing.file);
        let mut file_offset = 0;
        let regions = ranges
            .iter()
            .map(|r| {
                let region = ShareableRegion {
                    guest_address: r.start,
                    size: r.size,
                    file: file.clone(),
                    file_offset,
                };
                file_offset += r.size;
                region
            })
            .collect();
        Self::from_regions(regions, page_size, hugetlb, max_slots)
    }

    /// Validates and maps an existing region list (for example one rebuilt from a snapshot).
    pub fn from_regions(
        regions: Vec<ShareableRegion>,
        page_size: u64,
        hugetlb: bool,
        max_slots: usize,
    ) -> Result<Self, MemoryError> {
        Self::map_regions(regions, page_size, hugetlb, max_slots, false)
    }

    /// Validates and maps a region list copy-on-write (`MAP_PRIVATE`): the guest's writes stay
    /// in this process and never reach the files, and mapping costs the same whatever the size.
    /// For restoring from snapshot files without copying them. Such regions cannot be shared
    /// with another process (a vhost-user backend mapping the file would not see the guest's
    /// writes); `is_private` tells.
    pub fn from_regions_private(
        regions: Vec<ShareableRegion>,
        page_size: u64,
        max_slots: usize,
    ) -> Result<Self, MemoryError> {
        Self::map_regions(regions, page_size, false, max_slots, true)
    }

    fn map_regions(
        regions: Vec<ShareableRegion>,
        page_size: u64,
        hugetlb: bool,
        max_slots: usize,
        private: bool,
    ) -> Result<Self, MemoryError> {
        validate_regions(&regions, page_size, max_slots)?;
        let mapped = regions
            .iter()
            .map(|r| map_region(r, hugetlb, private))
            .collect::<Result<Vec<_>, _>>()?;
        let memory = TrackedGuestMemory::from_regions(mapped)
            .map_err(|e| MemoryError::Assemble(e.to_string()))?;
        Ok(Self {
            regions,
            memory,
            created_file: false,
            private,
        })
    }

    /// Whether the regions are mapped copy-on-write (see `from_regions_private`), so their
    /// files do not hold the guest's current memory.
    pub fn is_private(&self) -> bool {
        self.private
    }

    /// The regions, in guest address order.
    pub fn regions(&self) -> &[ShareableRegion] {
        &self.regions
    }

    /// Releases the `flock` a user memory file holds (before another process inherits it).
    pub fn release_file_lock(&self) {
        use std::os::fd::{AsFd, AsRawFd};
        if let Some(r) = self.regions.first() {
            // SAFETY: flock on a descriptor the region owns; unlocking has no memory effects.
            unsafe { libc::flock(r.file.as_fd().as_raw_fd(), libc::LOCK_UN) };
        }
    }

    /// Whether building this RAM created its memory file (so a failed start should remove it).
    pub fn created_file(&self) -> bool {
        self.created_file
    }

    /// The `vm-memory` view.
    pub fn memory(&self) -> &TrackedGuestMemory {
        &self.memory
    }
}

fn map_region(
    r: &ShareableRegion,
    hugetlb: bool,
    private: bool,
) -> Result<GuestRegionMmap<AtomicBitmap>, MemoryError> {
    let map_err = |source| MemoryError::Map {
        guest_address: r.guest_address,
        size: r.size,
        source,
    };
    let size = usize::try_from(r.size)
        .map_err(|_| map_err(std::io::Error::from_raw_os_error(libc::EFBIG)))?;
    let file = r.file.try_clone_file().map_err(map_err)?;
    let mapping =
        MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::new(size, DIRTY_PAGE_SIZE))
            .with_file_offset(FileOffset::new(file, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(
                if private {
                    libc::MAP_PRIVATE
                } else {
                    libc::MAP_SHARED
                } | libc::MAP_NORESERVE,
            )
            .with_hugetlbfs(hugetlb)
            .build()
            .map_err(|e| map_err(std::io::Error::other(e.to_string())))?;
    if !hugetlb {
        // Ask for transparent huge pages: with shmem THP enabled on the host (`advise` or better
        // in /sys/kernel/mm/transparent_hugepage/shmem_enabled) the guest then faults memory in
        // 2 MiB at a time. Purely advisory, so a refusal is not an error.
        // SAFETY: the range is exactly the mapping just created, which `mapping` owns.
        unsafe { libc::madvise(mapping.as_ptr().cast(), size, libc::MADV_HUGEPAGE) };
    }
    GuestRegionMmap::new(mapping, GuestAddress(r.guest_address)).ok_or_else(|| MemoryError::Map {
        guest_address: r.guest_address,
        size: r.size,
        source: std::io::Error::other("region wraps the guest address space"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, AsRawFd};
    use vm_memory::{Bytes, GuestMemoryBackend};

    /// Maps every region in a forked child by fd and `file_offset`, as a vhost-user backend
    /// would, touches every page (read, then write a marker), and checks that the parent sees the
    /// child's writes through its own mapping: the regions are accessible in full and shared.
    fn check_in_second_process(ram: &GuestRam) {
        let page = arch::layout::PAGE_SIZE;
        // SAFETY: the child only calls async-signal-safe functions (mmap, munmap, _exit) and
        // touches memory it mapped itself.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let mut ok = true;
            for r in ram.regions() {
                // SAFETY: maps the region's file range shared; the result is checked below.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        r.size as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                        r.file.as_fd().as_raw_fd(),
                        r.file_offset as libc::off_t,
                    )
                };
                if p == libc::MAP_FAILED {
                    ok = false;
                    break;
                }
                let base = p.cast::<u8>();
                for off in (0..r.size).step_by(page as usize) {
                    // SAFETY: `off` < r.size, inside the mapping just made.
                    unsafe {
                        let byte = base.add(off as usize);
                        let _ = std::ptr::read_volatile(byte);
                        std::ptr::write_volatile(byte.cast::<u64>(), r.guest_address + off + 1);
                    }
                }
                // SAFETY: unmaps exactly the mapping made above.
                unsafe { libc::munmap(p, r.size as usize) };
            }
            // SAFETY: _exit ends the child without running the parent's destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for the child we forked.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status),
            "child died by signal {}",
            libc::WTERMSIG(status)
        );
        assert_eq!(libc::WEXITSTATUS(status), 0, "child could not map a region");
        for r in ram.regions() {
            for off in [0, (r.size / 2) & !(page - 1), r.size - page] {
                let v: u64 = ram
                    .memory()
                    .read_obj(vm_memory::GuestAddress(r.guest_address + off))
                    .unwrap();
                assert_eq!(
                    v,
                    r.guest_address + off + 1,
                    "page {:#x}",
                    r.guest_address + off
                );
            }
        }
    }

    fn config(size: u64, backing: BackingKind) -> MemoryConfig {
        MemoryConfig {
            size,
            backing,
            prealloc: false,
            shared_with_snapshot: false,
        }
    }

    #[test]
    fn memfd_regions_are_fully_accessible_from_another_process() {
        let ram = GuestRam::create(&config(32 << 20, BackingKind::Memfd), 32).unwrap();
        assert_eq!(ram.regions().len(), 1);
        check_in_second_process(&ram);
    }

    #[test]
    fn regions_split_around_the_mmio_hole_share_one_file() {
        // Sparse memfd: 4 GiB of address space, only touched pages get memory.
        let size = arch::layout::MMIO_HOLE_START + (64 << 20);
        let ram = GuestRam::create(&config(size, BackingKind::Memfd), 32).unwrap();
        let r = ram.regions();
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].guest_address, r[0].size, r[0].file_offset),
            (0, arch::layout::MMIO_HOLE_START, 0)
        );
        assert_eq!(
            (r[1].guest_address, r[1].size, r[1].file_offset),
            (
                arch::layout::HIGH_RAM_START,
                64 << 20,
                arch::layout::MMIO_HOLE_START
            )
        );
        assert!(Arc::ptr_eq(&r[0].file, &r[1].file));
        assert_eq!(ram.memory().num_regions(), 2);
        // Write through the high region, read back through the file at the region's offset.
        ram.memory()
            .write_obj(
                0x1234_5678u64,
                vm_memory::GuestAddress(arch::layout::HIGH_RAM_START),
            )
            .unwrap();
        let mut f = r[1].file.try_clone_file().unwrap();
        let mut buf = [0u8; 8];
        use std::io::{Read, Seek, SeekFrom};
        f.seek(SeekFrom::Start(r[1].file_offset)).unwrap();
        f.read_exact(&mut buf).unwrap();
        assert_eq!(u64::from_le_bytes(buf), 0x1234_5678);
    }

    #[test]
    fn file_backed_regions_are_fully_accessible_from_another_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let ram = GuestRam::create(&config(16 << 20, BackingKind::File(path.clone())), 32).unwrap();
        assert!(ram.created_file());
        check_in_second_process(&ram);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 16 << 20);
    }

    #[test]
    fn unaligned_size_is_refused_and_created_file_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let e = GuestRam::create(&config((16 << 20) + 1, BackingKind::File(path.clone())), 32)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("not a multiple of the backing's page size"),
            "{e}"
        );
        assert!(!path.exists());
    }

    #[test]
    fn too_many_regions_for_the_slots() {
        let size = arch::layout::MMIO_HOLE_START + (4 << 20);
        let e = GuestRam::create(&config(size, BackingKind::Memfd), 1).unwrap_err();
        assert!(
            e.to_string().contains("exceed the host's 1 memory slots"),
            "{e}"
        );
    }
}
