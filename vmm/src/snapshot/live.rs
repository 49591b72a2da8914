//! Live snapshots: memory is copied while the guest runs, then again for the pages it dirtied
//! meanwhile, pass after pass, until what is left is small; the caller then pauses the VM for
//! `final_pass` and the CPU and device state.
//!
//! Dirty tracking must be on before `precopy` starts (the caller switches it on and clears the
//! devices' bitmaps), so every write after the first pass read a page is seen by a later pass.
//! Passes write into the memory files of the temporary directory at the pages' own offsets; the
//! first pass is the full snapshot's sparse copy (or, for a live diff, the pages dirtied since
//! the parent). Not here: pausing, state, the directory's manifest and rename (`running_vm`,
//! `writer`).

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::guest_memory::TrackedGuestMemory;
use devices::virtio::DeviceDirtyLog;
use serde::Serialize;
use thiserror::Error;

use super::dirty::{gather, merge_device_logs, write_pages, DirtyError, PageBitmap, DIRTY_PAGE};
use super::files::{create_file, FileError};
use super::memory_file::{CopyMethod, MemoryFileError};
use super::progress::SnapshotProgress;
use super::writer::{expect_touched, write_region, RegionCopy, RegionReport, WriteError};
use crate::hypervisor::DirtyLog;
use crate::memory::{RegionMapping, ShareableRegion};

/// When to stop iterating and pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most passes after the first.
    pub max_passes: u32,
    /// Pause once a pass found at most this many dirty pages.
    pub small_pages: u64,
    /// Pause once a pass took less than this (the next would be as short).
    pub fast_pass: Duration,
    /// Pause once precopy has run this long, converged or not.
    pub max_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_passes: 8,
            small_pages: 1024,
            fast_pass: Duration::from_millis(5),
            max_time: Duration::from_secs(30),
        }
    }
}

/// Errors from a live copy.
#[derive(Debug, Error)]
pub enum LiveError {
    /// Writing a memory file failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// A memory file could not be created, sized or opened.
    #[error(transparent)]
    File(#[from] FileError),
    /// The dirty pages could not be gathered.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    /// Copying dirty pages failed.
    #[error("cannot write dirty pages to {path}")]
    Pages {
        /// The memory file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: MemoryFileError,
    },
}

/// What the first pass copies.
#[derive(Debug)]
pub enum FirstPass {
    /// All of memory, sparsely (a full snapshot).
    Full,
    /// These pages per region (a diff: dirtied since the parent).
    Pages(Vec<PageBitmap>),
}

/// A live copy in progress: what it copies from and into.
pub struct Precopy {
    /// The temporary snapshot directory (reserved).
    pub temp: PathBuf,
    /// The regions.
    pub regions: Vec<ShareableRegion>,
    /// Each region's mapping in this process.
    pub mappings: Vec<RegionMapping>,
    /// Whether the mappings are private (a `cow` restore), so the files lack the guest's writes.
    pub private: bool,
    /// The first pass.
    pub first: FirstPass,
    /// The hypervisor's dirty log, tracking already.
    pub log: Arc<dyn DirtyLog>,
    /// Guest memory, for the devices' dirty bitmaps.
    pub memory: TrackedGuestMemory,
    /// The devices' own dirty logs (vhost-user backends), logging already.
    pub devices: Vec<Arc<dyn DeviceDirtyLog>>,
    /// When to stop.
    pub limits: Limits,
    /// Where the bytes each pass writes are counted (the job's progress).
    pub progress: Arc<SnapshotProgress>,
}

impl std::fmt::Debug for Precopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Precopy")
            .field("temp", &self.temp)
            .field("regions", &self.regions.len())
            .finish_non_exhaustive()
    }
}

/// One pass, for the API response.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PassStats {
    /// Dirty pages found (for the first pass of a full snapshot: pages copied).
    pub pages: u64,
    /// Of those, pages a device's own dirty log reported (vhost-user backends' writes).
    pub device_pages: u64,
    /// Bytes written.
    pub bytes: u64,
    /// How long the pass took, in ms.
    pub ms: f64,
}

/// The result of the passes made while the guest ran.
#[derive(Debug, Clone)]
pub struct PrecopyReport {
    /// Per region, bytes accumulated over every pass.
    pub regions: Vec<RegionReport>,
    /// Every pass, the first included.
    pub passes: Vec<PassStats>,
    /// From the first pass's start to the last's end, in ms.
    pub ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Copies memory while the guest runs: the first pass, then passes over the pages dirtied
/// meanwhile until `limits` says to stop.
pub fn precopy(job: &Precopy, cancel: &AtomicBool) -> Result<PrecopyReport, LiveError> {
    let started = Instant::now();
    let mut regions = Vec::with_capacity(job.regions.len());
    let mut first_bytes = 0;
    match &job.first {
        FirstPass::Full => expect_touched(&job.regions, &job.temp, &job.progress)?,
        FirstPass::Pages(sets) => job
            .progress
            .add_to_total(sets.iter().map(|s| s.count() * DIRTY_PAGE).sum()),
    }
    for (i, region) in job.regions.iter().enumerate() {
        let name = format!("memory-{i}.bin");
        let path = job.temp.join(&name);
        let report = match &job.first {
            FirstPass::Full => {
                let copy = RegionCopy {
                    private: job.mappings.get(i).filter(|_| job.private),
                    // The guest keeps running: its memory must be copied, never shared.
                    link: false,
                    cancel,
                    progress: Some(&job.progress),
                };
                // Writes the guest makes meanwhile are in the dirty log and copied by a later
                // pass.
                write_region(region, &copy, &path, name)?
            }
            FirstPass::Pages(sets) => {
                let dst = create_file(&path)?;
                dst.set_len(region.size).map_err(|source| FileError {
                    op: "size",
                    path: path.clone(),
                    source,
                })?;
                let n = write_set(job, i, sets.get(i), &dst, &path, cancel)?;
                RegionReport {
                    guest_address: region.guest_address,
                    size: region.size,
                    file: name,
                    method: CopyMethod::DirtyPages,
                    copied_bytes: n,
                }
            }
        };
        first_bytes += report.copied_bytes;
        regions.push(report);
    }
    let mut report = PrecopyReport {
        regions,
        passes: vec![PassStats {
            pages: first_bytes / DIRTY_PAGE,
            device_pages: 0,
            bytes: first_bytes,
            ms: ms(started.elapsed()),
        }],
        ms: 0.0,
    };
    let mut previous = u64::MAX;
    for pass in 1..=job.limits.max_passes {
        if cancel.load(Ordering::Relaxed) {
            return Err(LiveError::Pages {
                path: job.temp.clone(),
                source: MemoryFileError::Cancelled,
            });
        }
        let stats = copy_dirty(job, &mut report, cancel)?;
        report.passes.push(stats);
        let converged = stats.pages <= job.limits.small_pages
            || stats.ms < ms(job.limits.fast_pass)
            || started.elapsed() >= job.limits.max_time
            // Not shrinking: the guest dirties as fast as we copy, so more passes do not help.
            || (pass >= 3 && stats.pages >= previous);
        if converged {
            break;
        }
        previous = stats.pages;
    }
    report.ms = ms(started.elapsed());
    Ok(report)
}

/// Copies the pages dirtied since the last pass. With the VM paused, the last pass of a live
/// snapshot: afterwards the memory files hold memory as it is now.
pub fn copy_dirty(
    job: &Precopy,
    report: &mut PrecopyReport,
    cancel: &AtomicBool,
) -> Result<PassStats, LiveError> {
    let started = Instant::now();
    let mut sets = gather(&*job.log, &job.memory)?;
    let device_pages = merge_device_logs(&mut sets, &job.memory, &job.devices);
    let pages = sets.iter().map(PageBitmap::count).sum();
    job.progress.add_to_total(pages * DIRTY_PAGE);
    let mut bytes = 0;
    for (i, set) in sets.iter().enumerate() {
        if set.is_clean() {
            continue;
        }
        let Some(r) = report.regions.get_mut(i) else {
            continue;
        };
        let path = job.temp.join(&r.file);
        let dst = File::options()
            .write(true)
            .open(&path)
            .map_err(|source| FileError {
                op: "open",
                path: path.clone(),
                source,
            })?;
        let n = write_set(job, i, Some(set), &dst, &path, cancel)?;
        r.copied_bytes += n;
        bytes += n;
    }
    Ok(PassStats {
        pages,
        device_pages,
        bytes,
        ms: ms(started.elapsed()),
    })
}

fn write_set(
    job: &Precopy,
    index: usize,
    set: Option<&PageBitmap>,
    dst: &File,
    path: &std::path::Path,
    cancel: &AtomicBool,
) -> Result<u64, LiveError> {
    let (Some(mapping), Some(set)) = (job.mappings.get(index), set) else {
        return Ok(0);
    };
    write_pages(mapping, set, dst, cancel, Some(&job.progress)).map_err(|source| LiveError::Pages {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::{Result as HvResult, SlotDirtyPages};
    use crate::memory::Mappable;
    use std::sync::Mutex;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _};

    /// A dirty log that reports scripted pages, one list per call.
    struct Scripted {
        calls: Mutex<Vec<Vec<u64>>>,
        size: u64,
    }

    impl DirtyLog for Scripted {
        fn set_tracking(&self, _on: bool) -> HvResult<()> {
            Ok(())
        }
        fn is_tracking(&self) -> bool {
            true
        }
        fn take_dirty_pages(&self) -> HvResult<Vec<SlotDirtyPages>> {
            let pages = self.calls.lock().unwrap().pop().unwrap_or_default();
            let mut set = PageBitmap::clean(self.size);
            pages.iter().for_each(|&p| set.set(p));
            let mut bitmap = vec![0u64; usize::try_from(self.size / DIRTY_PAGE / 64).unwrap()];
            for (first, n) in set.extents() {
                for p in first..first + n {
                    bitmap[usize::try_from(p / 64).unwrap()] |= 1 << (p % 64);
                }
            }
            Ok(vec![SlotDirtyPages {
                guest_address: 0,
                size: self.size,
                bitmap,
            }])
        }
    }

    /// A device's own log that reports scripted guest addresses, one list per call.
    struct DeviceScript(Mutex<Vec<Vec<u64>>>);

    impl DeviceDirtyLog for DeviceScript {
        fn start(&self, _ram_end: u64) -> Result<(), devices::virtio::DirtyLogError> {
            Ok(())
        }
        fn take(&self, page: &mut dyn FnMut(u64)) {
            let pages = self.0.lock().unwrap().pop().unwrap_or_default();
            pages.into_iter().for_each(page);
        }
        fn stop(&self) {}
    }

    #[test]
    fn passes_copy_what_was_dirtied_and_stop_when_small() {
        let size = 1u64 << 20;
        let memory = TrackedGuestMemory::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        memory.write_obj(1u64, GuestAddress(0)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        // The backing the first pass copies: empty, so only later passes bring data.
        let backing = tempfile::tempfile().unwrap();
        backing.set_len(size).unwrap();
        // Calls pop from the end: first pass 2 pages (small: stop), then the final pass 1.
        // The device's log adds page 3 to the first (an address beyond RAM is ignored).
        memory
            .write_obj(5u64, GuestAddress(3 * DIRTY_PAGE))
            .unwrap();
        let device: Arc<dyn DeviceDirtyLog> = Arc::new(DeviceScript(Mutex::new(vec![
            vec![],
            vec![3 * DIRTY_PAGE, size, u64::MAX - 7],
        ])));
        let log = Arc::new(Scripted {
            calls: Mutex::new(vec![vec![7], vec![0, 9]]),
            size,
        });
        let job = Precopy {
            temp: dir.path().to_path_buf(),
            regions: vec![ShareableRegion {
                guest_address: 0,
                size,
                file: Arc::new(Mappable::new(backing.into())),
                file_offset: 0,
            }],
            mappings: RegionMapping::of_each(&memory),
            private: false,
            first: FirstPass::Full,
            log,
            memory: memory.clone(),
            devices: vec![device.clone()],
            limits: Limits::default(),
            progress: Arc::default(),
        };
        let never = AtomicBool::new(false);
        let mut report = precopy(&job, &never).unwrap();
        assert_eq!(report.passes.len(), 2, "{:?}", report.passes);
        assert_eq!(
            report.passes[1].pages, 3,
            "the KVM log's 2 and the device's 1"
        );
        assert_eq!(
            report.passes[1].device_pages, 1,
            "the address beyond RAM is not one"
        );
        // Dirtied during "the pause": the final pass takes it.
        memory
            .write_obj(9u64, GuestAddress(7 * DIRTY_PAGE))
            .unwrap();
        let last = copy_dirty(&job, &mut report, &never).unwrap();
        assert_eq!((last.pages, last.bytes), (1, DIRTY_PAGE));
        assert_eq!(report.regions[0].copied_bytes, 4 * DIRTY_PAGE);
        let counted = job.progress.read();
        assert_eq!(
            (counted.bytes_done, counted.bytes_total),
            (4 * DIRTY_PAGE, 4 * DIRTY_PAGE),
            "every pass's pages are expected, then counted done"
        );
        let data = std::fs::read(dir.path().join("memory-0.bin")).unwrap();
        assert_eq!(data.len() as u64, size);
        assert_eq!(data[0], 1);
        assert_eq!(data[7 * 4096], 9);
        assert_eq!(data[3 * 4096], 5, "the page the device logged");
        assert!(memory.iter().count() == 1);
    }
}
