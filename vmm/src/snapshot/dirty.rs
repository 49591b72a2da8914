//! Dirty page sets for live and diff snapshots: one bitmap per memory region, gathered from the
//! hypervisor's dirty log (vCPU writes), `vm-memory`'s `AtomicBitmap` (writes skiff's own
//! devices make through `TrackedGuestMemory`) and, during a live snapshot, the devices' own logs
//! (vhost-user backends' writes: `merge_device_logs`), and written from the guest mapping into a memory file
//! at the pages' own offsets.
//!
//! Bit layout everywhere: page `64 * w + b` of a region is bit `b` of word `w`, 4 KiB pages (the
//! layout of both `KVM_GET_DIRTY_LOG` and `AtomicBitmap`). Not here: deciding when to gather
//! (`live.rs`, `running_vm`), and the hypervisor side (`hypervisor/kvm/dirty_log.rs`).

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use devices::guest_memory::TrackedGuestMemory;
use devices::virtio::DeviceDirtyLog;
use thiserror::Error;
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};

use super::memory_file::{data_extents, MemoryFileError};
use super::progress::SnapshotProgress;
use crate::hypervisor::{DirtyLog, HypervisorError, SlotDirtyPages};
use crate::memory::{RegionMapping, ShareableRegion};

/// Granularity of every dirty bitmap.
pub const DIRTY_PAGE: u64 = 4096;
/// Most bytes one `pwrite` of a run of dirty pages writes (then the cancel flag is checked).
const WRITE_CHUNK: u64 = 64 << 20;

/// Errors from gathering dirty pages.
#[derive(Debug, Error)]
pub enum DirtyError {
    /// The hypervisor's log could not be read.
    #[error("cannot read the dirty page log")]
    Hypervisor(#[source] HypervisorError),
    /// The hypervisor's slots do not match guest memory's regions.
    #[error("the dirty log's memory slot at {guest_address:#x} ({size:#x} bytes) matches no memory region")]
    UnknownSlot {
        /// Slot start.
        guest_address: u64,
        /// Slot size.
        size: u64,
    },
}

/// The dirty pages of one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl PageBitmap {
    /// An empty set for a region of `size` bytes.
    pub fn clean(size: u64) -> Self {
        let pages = size.div_ceil(DIRTY_PAGE);
        let words = usize::try_from(pages.div_ceil(64)).unwrap_or(0);
        Self {
            words: vec![0; words],
            pages,
        }
    }

    /// Adds every page set in `words` (same layout); bits past the region's end are ignored.
    pub fn merge_words(&mut self, words: &[u64]) {
        for (mine, theirs) in self.words.iter_mut().zip(words) {
            *mine |= theirs;
        }
        self.mask_tail();
    }

    /// Adds every page of `other`.
    pub fn merge(&mut self, other: &PageBitmap) {
        self.merge_words(&other.words);
    }

    /// Marks page `page` dirty (ignored past the end).
    pub fn set(&mut self, page: u64) {
        if page < self.pages {
            if let Some(w) = usize::try_from(page / 64)
                .ok()
                .and_then(|i| self.words.get_mut(i))
            {
                *w |= 1 << (page % 64);
            }
        }
    }

    fn mask_tail(&mut self) {
        let tail = self.pages % 64;
        if tail != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
    }

    /// How many pages are dirty.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no page is dirty.
    pub fn is_clean(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// Marks every page dirty.
    pub fn fill(&mut self) {
        self.words.iter_mut().for_each(|w| *w = u64::MAX);
        self.mask_tail();
    }

    /// Marks every page that `[offset, offset + len)` (bytes into the region) touches.
    pub fn set_bytes(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let last = offset.saturating_add(len - 1) / DIRTY_PAGE;
        for page in offset / DIRTY_PAGE..=last.min(self.pages.saturating_sub(1)) {
            self.set(page);
        }
    }

    /// Empties the set.
    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// The dirty pages as runs `(first page, page count)`, in order, adjacent pages joined.
    pub fn extents(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, &word) in (0u64..).zip(&self.words) {
            let mut w = word;
            while w != 0 {
                let start = u64::from(w.trailing_zeros());
                // Length of the run of ones from `start` within this word.
                let run = u64::from((w >> start).trailing_ones());
                let first = i * 64 + start;
                match out.last_mut() {
                    Some((f, n)) if *f + *n == first => *n += run,
                    _ => out.push((first, run)),
                }
                w = if start + run >= 64 {
                    0
                } else {
                    w & !(((1u64 << run) - 1) << start)
                };
            }
        }
        out
    }
}

/// Gathers, per region of `memory` (in its order), the pages written since the last gather:
/// the hypervisor's log for vCPU writes, and each region's `AtomicBitmap` for device writes.
/// Both are cleared.
pub fn gather(
    log: &dyn DirtyLog,
    memory: &TrackedGuestMemory,
) -> Result<Vec<PageBitmap>, DirtyError> {
    let slots = log.take_dirty_pages().map_err(DirtyError::Hypervisor)?;
    let mut sets: Vec<PageBitmap> = memory.iter().map(|r| PageBitmap::clean(r.len())).collect();
    merge_slots(&mut sets, memory, &slots)?;
    for (set, region) in sets.iter_mut().zip(memory.iter()) {
        // `GuestRegionMmap` derefs to its `MmapRegion`, which owns the `AtomicBitmap`.
        set.merge_words(&region.deref_bitmap().get_and_reset());
    }
    Ok(sets)
}

/// Adds the pages the devices logged themselves (vhost-user backends) to `sets`, one per
/// region of `memory`; an address outside every region is ignored. Returns how many pages the
/// logs reported in guest memory.
pub fn merge_device_logs(
    sets: &mut [PageBitmap],
    memory: &TrackedGuestMemory,
    logs: &[Arc<dyn DeviceDirtyLog>],
) -> u64 {
    let mut count = 0;
    let regions: Vec<(u64, u64)> = memory.iter().map(|r| (r.start_addr().0, r.len())).collect();
    for log in logs {
        log.take(&mut |address| {
            let found = regions
                .iter()
                .position(|&(start, len)| address >= start && address - start < len);
            if let Some((i, &(start, _))) = found.and_then(|i| Some((i, regions.get(i)?))) {
                if let Some(set) = sets.get_mut(i) {
                    set.set((address - start) / DIRTY_PAGE);
                    count += 1;
                }
            }
        });
    }
    count
}

/// Clears the devices' bitmaps (when tracking starts: everything counts as copied).
pub fn reset_device_bitmaps(memory: &TrackedGuestMemory) {
    for region in memory.iter() {
        region.deref_bitmap().reset();
    }
}

trait RegionBitmap {
    fn deref_bitmap(&self) -> &vm_memory::bitmap::AtomicBitmap;
}

impl RegionBitmap for vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap> {
    fn deref_bitmap(&self) -> &vm_memory::bitmap::AtomicBitmap {
        std::ops::Deref::deref(self).bitmap()
    }
}

fn merge_slots(
    sets: &mut [PageBitmap],
    memory: &TrackedGuestMemory,
    slots: &[SlotDirtyPages],
) -> Result<(), DirtyError> {
    for slot in slots {
        let index = memory
            .iter()
            .position(|r| r.start_addr().0 == slot.guest_address && r.len() == slot.size)
            .ok_or(DirtyError::UnknownSlot {
                guest_address: slot.guest_address,
                size: slot.size,
            })?;
        if let Some(set) = sets.get_mut(index) {
            set.merge_words(&slot.bitmap);
        }
    }
    Ok(())
}

/// Writes every page of `pages` from `mapping` into `dst` at the same offset, counting them into
/// `progress`. Returns the bytes written. The guest may write the mapping meanwhile (a live
/// snapshot): such pages are in the next gather and written again.
pub fn write_pages(
    mapping: &RegionMapping,
    pages: &PageBitmap,
    dst: &File,
    cancel: &AtomicBool,
    progress: Option<&SnapshotProgress>,
) -> Result<u64, MemoryFileError> {
    let len = mapping.len() as u64;
    let mut written = 0;
    for (first, count) in pages.extents() {
        let start = first * DIRTY_PAGE;
        let end = ((first + count) * DIRTY_PAGE).min(len);
        let mut at = start;
        while at < end {
            if cancel.load(Ordering::Relaxed) {
                return Err(MemoryFileError::Cancelled);
            }
            let n = (end - at).min(WRITE_CHUNK);
            let io_err = |source| MemoryFileError::Io {
                op: "pwrite",
                offset: at,
                source,
            };
            // `at + n <= len`, so both fit a `usize`.
            let done = mapping
                .pwrite_into(dst, at as usize, n as usize, at)
                .map_err(io_err)? as u64;
            if done == 0 {
                return Err(MemoryFileError::Io {
                    op: "pwrite",
                    offset: at,
                    source: std::io::Error::from(std::io::ErrorKind::WriteZero),
                });
            }
            at += done;
            written += done;
            if let Some(p) = progress {
                p.advance(done);
            }
        }
    }
    Ok(written)
}

/// Marks in `pending` every page of `region` that holds data in its backing file: what another
/// process mapping guest memory (a vhost-user backend) may have written, outside the dirty log.
/// A page that is a hole was never written (skiff never punches holes in guest RAM). When the
/// file cannot tell (an `lseek` error), every page.
pub fn mark_backed_pages(pending: &mut PageBitmap, region: &ShareableRegion) {
    let extents = region
        .file
        .try_clone_file()
        .map_err(|e| e.to_string())
        .and_then(|f| data_extents(&f, region.file_offset, region.size).map_err(|e| e.to_string()));
    match extents {
        Ok(extents) => {
            for (at, len) in extents {
                pending.set_bytes(at - region.file_offset, len);
            }
        }
        Err(e) => {
            log::debug!(
                "memory region at {:#x}: {e}; every page counts",
                region.guest_address
            );
            pending.fill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::memory_file::tests::test_file;
    use std::os::unix::fs::FileExt;

    fn set(pages: u64, dirty: &[u64]) -> PageBitmap {
        let mut s = PageBitmap::clean(pages * DIRTY_PAGE);
        for &p in dirty {
            s.set(p);
        }
        s
    }

    #[test]
    fn extents_join_adjacent_pages_across_words() {
        let s = set(200, &[0, 1, 2, 5, 62, 63, 64, 65, 127, 128, 199]);
        assert_eq!(s.count(), 11);
        assert_eq!(
            s.extents(),
            vec![(0, 3), (5, 1), (62, 4), (127, 2), (199, 1)]
        );
        let full = set(128, &(0..128).collect::<Vec<_>>());
        assert_eq!(full.extents(), vec![(0, 128)]);
        assert!(set(10, &[]).extents().is_empty());
        assert!(set(10, &[]).is_clean());
    }

    #[test]
    fn merging_is_a_union_and_ignores_bits_past_the_end() {
        let mut a = set(70, &[1, 69]);
        a.merge(&set(70, &[2, 69]));
        // A hypervisor bitmap rounded up to whole words, with bits past page 69 set.
        a.merge_words(&[1 << 3, u64::MAX]);
        assert_eq!(a.extents(), vec![(1, 3), (64, 6)]);
        assert_eq!(a.count(), 9);
        a.set(70);
        assert_eq!(a.count(), 9, "page 70 is past the end");
        a.clear();
        assert!(a.is_clean());
        a.fill();
        assert_eq!(a.extents(), vec![(0, 70)], "every page, none past the end");
        a.clear();
        a.set_bytes(DIRTY_PAGE - 1, 2);
        a.set_bytes(10 * DIRTY_PAGE, DIRTY_PAGE);
        a.set_bytes(69 * DIRTY_PAGE, 5 * DIRTY_PAGE);
        a.set_bytes(3 * DIRTY_PAGE, 0);
        assert_eq!(a.extents(), vec![(0, 2), (10, 1), (69, 1)]);
    }

    #[test]
    fn slots_merge_into_their_region_and_unknown_slots_are_refused() {
        let memory = TrackedGuestMemory::from_ranges(&[
            (vm_memory::GuestAddress(0), 1 << 20),
            (vm_memory::GuestAddress(1 << 32), 1 << 20),
        ])
        .unwrap();
        let mut sets: Vec<PageBitmap> = memory.iter().map(|r| PageBitmap::clean(r.len())).collect();
        let slot = |at, bitmap| SlotDirtyPages {
            guest_address: at,
            size: 1 << 20,
            bitmap,
        };
        merge_slots(&mut sets, &memory, &[slot(1 << 32, vec![0b1010, 0, 0, 0])]).unwrap();
        assert!(sets[0].is_clean());
        assert_eq!(sets[1].extents(), vec![(1, 1), (3, 1)]);
        let e = merge_slots(&mut sets, &memory, &[slot(1 << 30, vec![1])]).unwrap_err();
        assert!(e.to_string().contains("0x40000000"), "{e}");
        // Device writes through vm-memory land in the region's bitmap and are gathered once.
        use vm_memory::Bytes;
        memory
            .write_obj(7u64, vm_memory::GuestAddress((1 << 32) + 5 * DIRTY_PAGE))
            .unwrap();
        let bits = memory.iter().nth(1).unwrap().deref_bitmap().get_and_reset();
        assert_eq!(bits[0], 1 << 5);
        reset_device_bitmaps(&memory);
    }

    #[test]
    fn writes_only_the_dirty_pages_at_their_offsets() {
        let memory =
            TrackedGuestMemory::from_ranges(&[(vm_memory::GuestAddress(0), 64 * 4096)]).unwrap();
        use vm_memory::Bytes;
        for p in [3u64, 4, 40] {
            memory
                .write_obj(p + 100, vm_memory::GuestAddress(p * DIRTY_PAGE))
                .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let dst = test_file(dir.path().join("m"));
        dst.set_len(64 * 4096).unwrap();
        let m = RegionMapping::of_each(&memory).remove(0);
        let n = write_pages(&m, &set(64, &[3, 4]), &dst, &AtomicBool::new(false), None).unwrap();
        assert_eq!(n, 2 * DIRTY_PAGE);
        let mut buf = [0u8; 8];
        dst.read_exact_at(&mut buf, 4 * DIRTY_PAGE).unwrap();
        assert_eq!(u64::from_le_bytes(buf), 104);
        dst.read_exact_at(&mut buf, 40 * DIRTY_PAGE).unwrap();
        assert_eq!(u64::from_le_bytes(buf), 0, "page 40 was not in the set");
        let e = write_pages(&m, &set(64, &[1]), &dst, &AtomicBool::new(true), None);
        assert!(matches!(e, Err(MemoryFileError::Cancelled)));
    }
}
