//! Writing a snapshot directory atomically.
//!
//! Everything goes into `DIR.tmp-<pid>` next to the target: one memory file per region
//! (hard-linked when the VM ends with the snapshot and the backing is a file of its own, else
//! reflinked where the filesystem can, else copied sparsely; for a diff only the dirty pages; for
//! a live snapshot already copied by `live.rs`), `state.bin`, then `manifest.json`. The bytes
//! copied are counted into the job's `SnapshotProgress`. Every file
//! and the temporary directory are fsynced, the directory is renamed to `DIR` with
//! `RENAME_NOREPLACE` (so a `DIR` that appeared meanwhile is never replaced), and the parent is
//! fsynced. A crash at any point leaves no `DIR` or a complete one; any error removes the
//! temporary directory. Each memory file, once complete, is fsynced while it is read back for
//! its checksum (`integrity::seal`), which the manifest records. Stale temporary directories of
//! killed writers in the same parent are removed first (`stale`). The VM is not touched here:
//! the caller paused it and gathered the state.

use std::ffi::CString;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use thiserror::Error;

use super::auth::{default_key_path, SnapshotKey};
use super::dirty::{write_pages, PageBitmap, DIRTY_PAGE};
use super::files::{create_file, data_bytes, fsync_dir, io, write_file, FileError};
use super::integrity;
use super::manifest::{
    MemoryRegionEntry, SnapshotManifest, StateFileEntry, MANIFEST_FILE, STATE_FILE,
};
use super::memory_file::{
    copy_sparse_counted, data_extent_bytes, hard_link, overlay_private_pages, reflink, CopyMethod,
    MemoryFileError,
};
use super::progress::SnapshotProgress;
use super::{resources, state_file};
use crate::memory::{RegionMapping, ShareableRegion};

/// hugetlbfs's `statfs.f_type`.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Errors from writing a snapshot directory.
#[derive(Debug, Error)]
pub enum WriteError {
    /// The target must be an absolute path.
    #[error("snapshot directory {0} is not an absolute path")]
    NotAbsolute(PathBuf),
    /// The target exists already.
    #[error("snapshot directory {0} already exists")]
    Exists(PathBuf),
    /// The target's parent is missing.
    #[error("cannot create snapshot directory {path}: parent directory is missing or unusable")]
    Parent {
        /// The target.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file or directory operation failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// Copying a memory region failed.
    #[error("cannot write memory region at {guest_address:#x} to {path}")]
    Memory {
        /// Region start.
        guest_address: u64,
        /// The memory file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: MemoryFileError,
    },
}

/// What one region's memory file holds and how it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionReport {
    /// Region start.
    pub guest_address: u64,
    /// Region size.
    pub size: u64,
    /// File name in the snapshot directory.
    pub file: String,
    /// Linked, reflinked or copied.
    pub method: CopyMethod,
    /// Bytes of data copied (0 for a link or reflink).
    pub copied_bytes: u64,
}

/// The result of a complete write.
#[derive(Debug, Clone)]
pub struct WriteReport {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Bytes written: copied memory plus the state file and manifest.
    pub bytes_written: u64,
    /// Per region.
    pub regions: Vec<RegionReport>,
    /// Time spent writing, in milliseconds.
    pub write_ms: f64,
    /// CRC-32 of the manifest written (what a diff taken on top of this snapshot records).
    pub manifest_crc32: u32,
}

/// A snapshot to write: the reserved temporary directory and everything to put in it.
#[derive(Debug)]
pub struct PendingSnapshot {
    /// The final directory.
    pub dir: PathBuf,
    /// The temporary directory (already created).
    pub temp: PathBuf,
    /// The regions to save (their backing files stay open through the `Arc`s).
    pub regions: Vec<ShareableRegion>,
    /// Where the memory files' contents come from.
    pub memory: MemorySource,
    /// The encoded state file.
    pub state: Vec<u8>,
    /// The manifest, without memory entries (filled in here).
    pub manifest: SnapshotManifest,
}

/// What goes into the memory files.
#[derive(Debug)]
pub enum MemorySource {
    /// Every region whole: hard-linked (`link`), reflinked or copied sparsely from its backing.
    /// For RAM mapped copy-on-write (a `cow` restore), `private` holds each region's private
    /// mapping, whose own pages are written over the file's data; empty for shared RAM.
    Full {
        /// The private mappings.
        private: Vec<RegionMapping>,
        /// The VM ends with this snapshot and nothing writes its memory again, so a backing that
        /// is a file of its own may become the memory file itself.
        link: bool,
    },
    /// A diff: only these pages of each region, from its mapping in this process.
    Pages {
        /// Each region's mapping.
        mappings: Vec<RegionMapping>,
        /// Each region's pages.
        pages: Vec<PageBitmap>,
    },
    /// A live snapshot copied the memory files into the temporary directory already.
    Written(Vec<RegionReport>),
}

/// Checks `dir` can be created and reserves its temporary sibling `DIR.tmp-<pid>`.
pub fn reserve(dir: &Path) -> Result<PathBuf, WriteError> {
    if !dir.is_absolute() {
        return Err(WriteError::NotAbsolute(dir.to_path_buf()));
    }
    if std::fs::symlink_metadata(dir).is_ok() {
        return Err(WriteError::Exists(dir.to_path_buf()));
    }
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(WriteError::Parent {
            path: dir.to_path_buf(),
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        });
    };
    let mut temp_name = name.to_os_string();
    temp_name.push(format!(".tmp-{}", std::process::id()));
    let temp = parent.join(temp_name);
    match std::fs::create_dir(&temp) {
        Ok(()) => Ok(temp),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(WriteError::Parent {
            path: dir.to_path_buf(),
            source: e,
        }),
        Err(e) => Err(io("create", &temp)(e).into()),
    }
}

/// Writes everything into the temporary directory and renames it into place, counting the
/// memory written into `progress`. On error the temporary directory is removed.
pub fn write(
    pending: PendingSnapshot,
    cancel: &AtomicBool,
    progress: &SnapshotProgress,
) -> Result<WriteReport, WriteError> {
    let temp = pending.temp.clone();
    // Here, on the job's thread, not in `reserve` on the event loop: removing a killed
    // writer's gigabytes takes a while.
    if let Some(parent) = pending.dir.parent() {
        super::stale::remove_stale_temporaries(parent);
    }
    let result = write_inner(pending, cancel, progress);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    result
}

fn write_inner(
    pending: PendingSnapshot,
    cancel: &AtomicBool,
    progress: &SnapshotProgress,
) -> Result<WriteReport, WriteError> {
    let started = Instant::now();
    let PendingSnapshot {
        dir,
        temp,
        regions,
        memory,
        state,
        mut manifest,
    } = pending;
    let mut reports = Vec::with_capacity(regions.len());
    let mut bytes = 0u64;
    let mut written = match &memory {
        MemorySource::Written(r) => r.clone().into_iter(),
        _ => Vec::new().into_iter(),
    };
    match &memory {
        MemorySource::Full { .. } => expect_touched(&regions, &temp, progress)?,
        MemorySource::Pages { pages, .. } => {
            progress.add_to_total(pages.iter().map(|p| p.count() * DIRTY_PAGE).sum());
        }
        MemorySource::Written(_) => {}
    }
    for (i, region) in regions.iter().enumerate() {
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(WriteError::Memory {
                guest_address: region.guest_address,
                path: temp.clone(),
                source: MemoryFileError::Cancelled,
            });
        }
        let name = format!("memory-{i}.bin");
        let path = temp.join(&name);
        let report = match &memory {
            MemorySource::Full { private, link } => {
                let copy = RegionCopy {
                    private: private.get(i),
                    link: *link,
                    cancel,
                    progress: Some(progress),
                };
                write_region(region, &copy, &path, name)?
            }
            MemorySource::Pages { mappings, pages } => write_dirty_region(
                region,
                mappings.get(i),
                pages.get(i),
                &path,
                name,
                cancel,
                progress,
            )?,
            MemorySource::Written(_) => written.next().ok_or_else(|| {
                io("find the copied memory file", &path)(std::io::Error::from_raw_os_error(
                    libc::ENOENT,
                ))
            })?,
        };
        // The file is complete: fsync it and, meanwhile, sum it.
        let checksum = integrity::seal(&path, region.size, cancel)?;
        bytes += report.copied_bytes;
        manifest.memory.push(MemoryRegionEntry {
            guest_address: region.guest_address,
            size: region.size,
            file: report.file.clone(),
            page_size: page_size(region),
            method: report.method.name().into(),
            data_bytes: match report.method {
                CopyMethod::DirtyPages => Some(data_bytes(&path)?),
                _ => None,
            },
            checksum: Some(checksum),
        });
        reports.push(report);
    }
    let crc = state
        .get(20..24)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    manifest.state = StateFileEntry {
        file: STATE_FILE.into(),
        size: state.len() as u64,
        crc32: crc,
    };
    write_file(&temp.join(STATE_FILE), &state)?;
    describe_and_seal(&mut manifest, &state, &temp.join(STATE_FILE))?;
    let text = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| io("encode", &temp.join(MANIFEST_FILE))(std::io::Error::other(e)))?;
    write_file(&temp.join(MANIFEST_FILE), &text)?;
    bytes += (state.len() + text.len()) as u64;
    let manifest_crc32 = crc32fast::hash(&text);
    fsync_dir(&temp)?;
    rename_no_replace(&temp, &dir)?;
    if let Some(parent) = dir.parent() {
        fsync_dir(parent)?;
    }
    Ok(WriteReport {
        dir,
        bytes_written: bytes,
        regions: reports,
        write_ms: started.elapsed().as_secs_f64() * 1000.0,
        manifest_crc32,
    })
}

/// Lists the host resources the snapshot names in its manifest and authenticates it under the
/// user's key (created on first use). Without a usable key the snapshot is written
/// unauthenticated, with a warning: it restores only with its host resources named again.
fn describe_and_seal(
    manifest: &mut SnapshotManifest,
    state: &[u8],
    state_path: &Path,
) -> Result<(), WriteError> {
    let decoded = state_file::decode(state).map_err(|e| {
        io("list the host resources of", state_path)(std::io::Error::other(e.to_string()))
    })?;
    manifest.resources = resources::list(manifest, &decoded);
    manifest.authentication = None;
    let sealed = default_key_path()
        .and_then(|path| SnapshotKey::load_or_create(&path))
        .and_then(|key| key.seal(manifest, state));
    if let Err(e) = sealed {
        log::warn!(
            "the snapshot is not authenticated ({}): restoring it needs its host resources named again",
            crate::error_chain(&e)
        );
    }
    Ok(())
}

/// A diff's memory file: as long as the region, holding only `pages` (read from `mapping`, the
/// region's mapping), holes elsewhere.
fn write_dirty_region(
    region: &ShareableRegion,
    mapping: Option<&RegionMapping>,
    pages: Option<&PageBitmap>,
    path: &Path,
    name: String,
    cancel: &AtomicBool,
    progress: &SnapshotProgress,
) -> Result<RegionReport, WriteError> {
    let (Some(mapping), Some(pages)) = (mapping, pages) else {
        return Err(WriteError::from(io("find the dirty pages for", path)(
            std::io::Error::from_raw_os_error(libc::EINVAL),
        )));
    };
    let dst = create_file(path)?;
    dst.set_len(region.size).map_err(io("size", path))?;
    let copied_bytes =
        write_pages(mapping, pages, &dst, cancel, Some(progress)).map_err(|source| {
            WriteError::Memory {
                guest_address: region.guest_address,
                path: path.to_path_buf(),
                source,
            }
        })?;
    Ok(RegionReport {
        guest_address: region.guest_address,
        size: region.size,
        file: name,
        method: CopyMethod::DirtyPages,
        copied_bytes,
    })
}

/// How one region's memory file is made (`write_region`).
pub(super) struct RegionCopy<'a> {
    /// For RAM mapped copy-on-write: the region's private mapping, whose own pages are written
    /// over the file's data. Nobody writes it during the copy (the VM is paused), or the dirty
    /// log records the writes (a live snapshot's first pass).
    pub private: Option<&'a RegionMapping>,
    /// The VM ends with the snapshot: the backing may be hard-linked.
    pub link: bool,
    /// Set when the VM ends mid-copy.
    pub cancel: &'a AtomicBool,
    /// Where copied bytes are counted.
    pub progress: Option<&'a SnapshotProgress>,
}

/// Adds every region's touched bytes (its backing's data extents) to `progress`: what a full
/// snapshot copies, or counts as done when it links or reflinks.
pub(super) fn expect_touched(
    regions: &[ShareableRegion],
    temp: &Path,
    progress: &SnapshotProgress,
) -> Result<(), WriteError> {
    for region in regions {
        let src = region
            .file
            .try_clone_file()
            .map_err(io("duplicate the memory descriptor of", temp))?;
        let touched =
            data_extent_bytes(&src, region.file_offset, region.size).map_err(|source| {
                WriteError::Memory {
                    guest_address: region.guest_address,
                    path: temp.to_path_buf(),
                    source,
                }
            })?;
        progress.add_to_total(touched);
    }
    Ok(())
}

/// One region's memory file, whole: hard-linked (`copy.link`, a backing that is a whole file of
/// its own, on the same filesystem), else reflinked, else copied sparsely; a private mapping's
/// own pages are then written over it. Not fsynced: the caller seals the file when it is
/// complete (`integrity::seal`).
pub(super) fn write_region(
    region: &ShareableRegion,
    copy: &RegionCopy<'_>,
    path: &Path,
    name: String,
) -> Result<RegionReport, WriteError> {
    let mem_err = |source| WriteError::Memory {
        guest_address: region.guest_address,
        path: path.to_path_buf(),
        source,
    };
    let src = region
        .file
        .try_clone_file()
        .map_err(io("duplicate the memory descriptor of", path))?;
    // A private mapping's own pages are not in the file: it can be neither linked nor reflinked.
    let shared = copy.private.is_none();
    if shared
        && copy.link
        && hard_link(&src, region.file_offset, region.size, path).map_err(mem_err)?
    {
        // The backing's dirty pages reach the disk when the caller seals the file, as a
        // copy's would.
        if let Some(p) = copy.progress {
            p.advance(data_extent_bytes(&src, 0, region.size).map_err(mem_err)?);
        }
        return Ok(RegionReport {
            guest_address: region.guest_address,
            size: region.size,
            file: name,
            method: CopyMethod::HardLink,
            copied_bytes: 0,
        });
    }
    let dst = create_file(path)?;
    dst.set_len(region.size).map_err(io("size", path))?;
    let reflinked =
        shared && reflink(&src, region.file_offset, &dst, region.size).map_err(mem_err)?;
    let (method, mut copied_bytes) = if reflinked {
        if let Some(p) = copy.progress {
            let touched = data_extent_bytes(&src, region.file_offset, region.size);
            p.advance(touched.map_err(mem_err)?);
        }
        (CopyMethod::Reflink, 0)
    } else {
        let n = copy_sparse_counted(
            &src,
            region.file_offset,
            &dst,
            0,
            region.size,
            copy.cancel,
            copy.progress,
        )
        .map_err(mem_err)?;
        (CopyMethod::SparseCopy, n)
    };
    if let Some(mapping) = copy.private {
        copied_bytes +=
            overlay_private_pages(mapping, &dst, copy.cancel, copy.progress).map_err(mem_err)?;
    }
    Ok(RegionReport {
        guest_address: region.guest_address,
        size: region.size,
        file: name,
        method,
        copied_bytes,
    })
}

fn page_size(region: &ShareableRegion) -> u64 {
    use std::os::fd::AsRawFd;
    // SAFETY: an all-zero statfs is valid storage for the kernel to fill.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is writable and the descriptor is open for the region's lifetime.
    let rc = unsafe { libc::fstatfs(region.file.as_fd().as_raw_fd(), &mut st) };
    #[allow(clippy::unnecessary_cast)]
    if rc == 0 && st.f_type as i64 == HUGETLBFS_MAGIC {
        return st.f_bsize as u64;
    }
    arch::layout::PAGE_SIZE
}

fn rename_no_replace(from: &Path, to: &Path) -> Result<(), WriteError> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io("name", p)(std::io::Error::from_raw_os_error(libc::EINVAL)))
    };
    let (cf, ct) = (c(from)?, c(to)?);
    // SAFETY: both are NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cf.as_ptr(),
            libc::AT_FDCWD,
            ct.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Err(WriteError::Exists(to.to_path_buf()));
        }
        return Err(io("rename into place", to)(e).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Mappable;
    use crate::snapshot::manifest;
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    fn region_file(len: u64) -> Arc<Mappable> {
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        f.write_all_at(b"guest", 4096).unwrap();
        Arc::new(Mappable::new(f.into()))
    }

    fn pending(dir: &Path, temp: PathBuf) -> PendingSnapshot {
        let file = region_file(2 << 20);
        let mut m = manifest::tests::sample();
        m.memory.clear();
        PendingSnapshot {
            dir: dir.to_path_buf(),
            temp,
            regions: vec![
                ShareableRegion {
                    guest_address: 0,
                    size: 1 << 20,
                    file: file.clone(),
                    file_offset: 0,
                },
                ShareableRegion {
                    guest_address: 1 << 32,
                    size: 1 << 20,
                    file,
                    file_offset: 1 << 20,
                },
            ],
            memory: MemorySource::Full {
                private: Vec::new(),
                link: false,
            },
            state: state_file::encode(&state_file::tests::sample_state()).unwrap(),
            manifest: m,
        }
    }

    #[test]
    fn writes_a_complete_directory_and_refuses_to_replace_it() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("snap");
        let temp = reserve(&dir).unwrap();
        assert!(temp.to_string_lossy().contains(".tmp-"));
        let progress = SnapshotProgress::default();
        let report = write(
            pending(&dir, temp.clone()),
            &AtomicBool::new(false),
            &progress,
        )
        .unwrap();
        let copied: u64 = report.regions.iter().map(|r| r.copied_bytes).sum();
        let counted = progress.read();
        assert!(copied > 0);
        assert_eq!((counted.bytes_done, counted.bytes_total), (copied, copied));
        assert!(!temp.exists(), "the temporary directory is renamed away");
        assert_eq!(report.regions.len(), 2);
        let m: SnapshotManifest =
            serde_json::from_slice(&std::fs::read(dir.join(MANIFEST_FILE)).unwrap()).unwrap();
        assert_eq!(m.memory[1].guest_address, 1 << 32);
        assert_eq!(m.memory[0].file, "memory-0.bin");
        let mem0 = std::fs::read(dir.join("memory-0.bin")).unwrap();
        assert_eq!(mem0.len(), 1 << 20);
        assert_eq!(&mem0[4096..4101], b"guest");
        let state = std::fs::read(dir.join(STATE_FILE)).unwrap();
        assert_eq!(
            state_file::decode(&state).unwrap(),
            state_file::tests::sample_state()
        );
        assert_eq!(
            m.resources.len(),
            2,
            "the disk and the kernel: {:?}",
            m.resources
        );
        assert!(matches!(reserve(&dir), Err(WriteError::Exists(_))));
        assert!(matches!(
            reserve(Path::new("rel/dir")),
            Err(WriteError::NotAbsolute(_))
        ));
    }

    #[test]
    fn every_memory_file_gets_a_checksum_that_verify_checks() {
        use crate::snapshot::state_file::{encode, tests::sample_state};
        // Each problem `verify` finds, as the line `snapshot-verify` prints.
        let verify = |dir: &Path| {
            let (problems, bytes) = crate::snapshot::integrity::verify(dir, None);
            let lines: Vec<String> = problems.iter().map(|p| crate::error_chain(p)).collect();
            (lines, bytes)
        };
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("snap");
        let temp = reserve(&dir).unwrap();
        let mut p = pending(&dir, temp);
        p.state = encode(&sample_state()).unwrap();
        // The sample state has 2 vCPUs; one 2 MiB region, the layout of a 2 MiB VM.
        p.manifest.vm.cpus = 2;
        p.manifest.vm.memory_size = 2 << 20;
        p.regions.truncate(1);
        p.regions[0].size = 2 << 20;
        write(p, &AtomicBool::new(false), &SnapshotProgress::default()).unwrap();
        let m = manifest::read(&dir).unwrap();
        assert!(m.memory.iter().all(|r| r
            .checksum
            .as_deref()
            .is_some_and(|c| c.starts_with("xxh3-64:"))));
        let (problems, bytes) = verify(&dir);
        assert!(problems.is_empty(), "{problems:?}");
        assert!(bytes > 0);
        // One byte of guest memory changed behind the snapshot's back.
        let mem = File::options()
            .write(true)
            .open(dir.join("memory-0.bin"))
            .unwrap();
        mem.write_all_at(b"X", 4096).unwrap();
        let (problems, _) = verify(&dir);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("memory-0.bin has checksum")
                && problems[0].contains("contents changed"),
            "{problems:?}"
        );
        // A memory file replaced by a symbolic link, and a truncated state file.
        std::fs::remove_file(dir.join("memory-0.bin")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.join("memory-0.bin")).unwrap();
        let state = File::options()
            .write(true)
            .open(dir.join(STATE_FILE))
            .unwrap();
        state.set_len(10).unwrap();
        let (problems, _) = verify(&dir);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains("state file") && problems[0].contains("but the manifest says")
        );
        assert!(problems[1].contains("memory-0.bin"), "{problems:?}");
    }

    #[test]
    fn a_failed_write_leaves_nothing_behind() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("snap");
        let temp = reserve(&dir).unwrap();
        let e = write(
            pending(&dir, temp.clone()),
            &AtomicBool::new(true),
            &SnapshotProgress::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("memory region at 0x0"), "{e}");
        assert!(!temp.exists() && !dir.exists());
        // A target that appears while writing is not replaced.
        let temp = reserve(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        let e = write(
            pending(&dir, temp.clone()),
            &AtomicBool::new(false),
            &SnapshotProgress::default(),
        )
        .unwrap_err();
        assert!(matches!(e, WriteError::Exists(_)), "{e}");
        assert!(!temp.exists());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    }
}
