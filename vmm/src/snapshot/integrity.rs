//! Memory-file checksums: computed when a snapshot's memory file is complete, recorded in the
//! manifest, and checked by `skiff snapshot-verify DIR` and `skiff restore --verify`.
//!
//! The checksum is XXH3-64 over every 4 KiB page of the file's data extents that is not all
//! zeros, each page preceded by its file offset (8 bytes, little-endian). Zero pages and holes
//! both read as zeros and add nothing, so the value depends on the file's contents only, not on
//! how sparsely it is stored: a copy with `cp --sparse=always` or a filesystem that stores a
//! zero page as a hole keeps it. (A diff's holes mean "the parent's page", so there the
//! manifest's `data_bytes` catches holes filled in, and this checksum the data.)
//!
//! When: every way of writing a memory file (sparse copy, reflink, hard link, the dirty pages of
//! a diff, a live snapshot's passes that rewrite pages while the guest runs) ends with the
//! file complete in the temporary directory; only then is it summed, by `seal`, which maps it
//! (populated, no copy: about 0.15 s of CPU per GiB here) while its pages are still in the page
//! cache and, on a second thread, fsyncs it at the same time, so the sum costs CPU time the
//! disk's write-back hides. `verify` reads with `pread` instead: a file someone truncates
//! meanwhile is then an error, not a SIGBUS. Summing the
//! final file rather than each write keeps one rule for every method, and is correct for pages a
//! later live pass rewrote. Linked and reflinked files are summed the same way: their pages are
//! the backing's, already in memory.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;
use xxhash_rust::xxh3::Xxh3;

use super::chain::{resolve_parents, ChainError};
use super::files::FileError;
use super::manifest::{self, ManifestError, MemoryRegionEntry, SnapshotManifest};
use super::memory_file::{data_extents, MemoryFileError};
use super::state_file;

/// The algorithm's name, the prefix of every checksum string.
pub const ALGORITHM: &str = "xxh3-64";
/// Bytes summed per unit (and skipped when all zero).
const PAGE: u64 = 4096;
/// Bytes read per `pread`.
const CHUNK: usize = 1 << 20;

/// How `checksum` reads the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `pread` into a buffer: for files someone else may change meanwhile (`verify`), where a
    /// truncation must be an error, not a SIGBUS.
    Read,
    /// `mmap` with `MAP_POPULATE`, window by window: no copy, a fifth of `pread`'s CPU time on
    /// a page-cached file (measured: 0.08 s against 0.44 s per GiB). Only for files this
    /// process has just written and nobody else holds (`seal`, in the temporary directory).
    Map,
}

/// Bytes mapped at a time (`Access::Map`); a multiple of every page size a memory file has.
const WINDOW: u64 = 64 << 20;

/// The checksum string of a memory file `len` bytes long: `xxh3-64:` and 16 hex digits.
pub fn checksum(file: &File, len: u64, cancel: &AtomicBool) -> Result<String, MemoryFileError> {
    checksum_with(file, len, cancel, Access::Read)
}

/// `checksum`, reading the file as `access` says.
pub fn checksum_with(
    file: &File,
    len: u64,
    cancel: &AtomicBool,
    access: Access,
) -> Result<String, MemoryFileError> {
    let mut hasher = Xxh3::new();
    let mut buffer = Vec::new();
    // The next page not yet summed: extents are rounded out to whole pages, and two extents
    // may then share one.
    let mut next = 0u64;
    for (start, n) in data_extents(file, 0, len)? {
        let first = (start / PAGE * PAGE).max(next);
        let end = start
            .saturating_add(n)
            .div_ceil(PAGE)
            .saturating_mul(PAGE)
            .min(len);
        let mut at = first;
        while at < end {
            if cancel.load(Ordering::Relaxed) {
                return Err(MemoryFileError::Cancelled);
            }
            let done = match access {
                Access::Read => read_and_sum(file, &mut buffer, at, end, &mut hasher)?,
                Access::Map => map_and_sum(file, &mut buffer, at, end, &mut hasher)?,
            };
            if done == 0 {
                // The file ends early (a shorter file is caught by its size check).
                break;
            }
            at += done;
        }
        next = end;
    }
    Ok(format!("{ALGORITHM}:{:016x}", hasher.digest()))
}

/// Adds the non-zero pages of `bytes`, which sit at file offset `at`.
fn sum_pages(hasher: &mut Xxh3, at: u64, bytes: &[u8]) {
    for (i, page) in bytes.chunks(PAGE as usize).enumerate() {
        if page.iter().any(|&b| b != 0) {
            hasher.update(&(at + i as u64 * PAGE).to_le_bytes());
            hasher.update(page);
        }
    }
}

/// Sums up to `CHUNK` bytes from `at` (below `end`) read with `pread`; returns the bytes read.
fn read_and_sum(
    file: &File,
    buffer: &mut Vec<u8>,
    at: u64,
    end: u64,
    hasher: &mut Xxh3,
) -> Result<u64, MemoryFileError> {
    buffer.resize(CHUNK, 0);
    let want = usize::try_from(end - at).map_or(CHUNK, |r| r.min(CHUNK));
    let got = read_full(file, &mut buffer[..want], at)?;
    sum_pages(hasher, at, &buffer[..got]);
    Ok(got as u64)
}

/// Sums up to `WINDOW` bytes from `at` (below `end`) through a populated read-only mapping;
/// falls back to `read_and_sum` where the file cannot be mapped. Returns the bytes summed.
fn map_and_sum(
    file: &File,
    buffer: &mut Vec<u8>,
    at: u64,
    end: u64,
    hasher: &mut Xxh3,
) -> Result<u64, MemoryFileError> {
    let len = usize::try_from((end - at).min(WINDOW - at % WINDOW)).unwrap_or(0);
    let Ok(offset) = libc::off_t::try_from(at) else {
        return read_and_sum(file, buffer, at, end, hasher);
    };
    // SAFETY: a new read-only shared mapping of `len` bytes of a file this process holds
    // open; it aliases no Rust object. Pages beyond the file's end would fault (SIGBUS) when
    // read, so the caller only maps files it has just written in its temporary directory and
    // whose size it set, and reads only within `end <= len`.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            file.as_raw_fd(),
            offset,
        )
    };
    if ptr == libc::MAP_FAILED || len == 0 {
        return read_and_sum(file, buffer, at, end, hasher);
    }
    // SAFETY: the mapping just made is `len` readable bytes and stays mapped until the
    // `munmap` below; nothing writes it through this process.
    let bytes = unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) };
    sum_pages(hasher, at, bytes);
    // SAFETY: unmaps exactly the mapping made above; `bytes` is not used afterwards.
    unsafe { libc::munmap(ptr, len) };
    Ok(len as u64)
}

/// Reads up to `buf.len()` bytes at `at`, fewer only at the end of the file.
fn read_full(file: &File, buf: &mut [u8], at: u64) -> Result<usize, MemoryFileError> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(MemoryFileError::Io {
                    op: "pread",
                    offset: at + got as u64,
                    source,
                })
            }
        }
    }
    Ok(got)
}

/// Makes a complete memory file durable and returns its checksum: fsyncs it on one thread
/// while this one reads it back and sums it.
pub fn seal(path: &Path, len: u64, cancel: &AtomicBool) -> Result<String, FileError> {
    let io = |op| {
        move |source| FileError {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let file = File::open(path).map_err(io("open"))?;
    let sync = file
        .try_clone()
        .map_err(io("duplicate the descriptor of"))?;
    let (synced, summed) = std::thread::scope(|s| {
        let fsync = s.spawn(move || sync.sync_all());
        // Map: the file is this writer's own, in its temporary directory.
        let summed = checksum_with(&file, len, cancel, Access::Map);
        // A panic on the fsync thread (there is none to expect) counts as a failed fsync.
        let synced = fsync
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the fsync thread panicked")));
        (synced, summed)
    });
    synced.map_err(io("fsync"))?;
    summed.map_err(|source| FileError {
        op: "checksum",
        path: path.to_path_buf(),
        source: std::io::Error::other(crate::error_chain(&source)),
    })
}

/// One thing `verify` found wrong with a snapshot.
#[derive(Debug, Error)]
pub enum Problem {
    /// The manifest is unusable.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A diff's parents are unusable.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// A file cannot be opened.
    #[error("cannot open {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file's type or size cannot be read.
    #[error("cannot stat {path}")]
    Stat {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file of the snapshot is not a regular file.
    #[error("{path} is {kind}, not a regular file")]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// The state file's size differs from the manifest's.
    #[error("state file {path} is {actual} bytes but the manifest says {expected}")]
    StateSize {
        /// The file.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// The manifest's.
        expected: u64,
    },
    /// The state file is larger than any state file.
    #[error("state file {path} is {len} bytes, larger than a state file can be")]
    StateTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// The state file cannot be read.
    #[error("cannot read state file {path}")]
    ReadState {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The state file does not decode.
    #[error("state file {path}")]
    State {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: state_file::StateFileError,
    },
    /// A memory file's size differs from its region's.
    #[error("memory file {path} is {actual} bytes but its region is {expected}")]
    MemorySize {
        /// The file.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// The region's.
        expected: u64,
    },
    /// A memory file cannot be read (its extents or its data).
    #[error("memory file {path}")]
    Memory {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: MemoryFileError,
    },
    /// A diff's memory file holds another amount of data than was written.
    #[error(
        "memory file {path} holds {actual} bytes of data but the diff wrote {expected} (its \
         holes were filled or punched)"
    )]
    DataBytes {
        /// The file.
        path: PathBuf,
        /// The data it holds.
        actual: u64,
        /// The data written.
        expected: u64,
    },
    /// The manifest has no checksum for a memory file.
    #[error(
        "memory file {path} has no checksum in the manifest (written by a skiff without \
         checksums)"
    )]
    NoChecksum {
        /// The file.
        path: PathBuf,
    },
    /// The manifest's checksum is of an unknown kind.
    #[error("memory file {path}: unknown checksum {checksum:?} (this skiff knows {ALGORITHM})")]
    UnknownChecksum {
        /// The file.
        path: PathBuf,
        /// The manifest's checksum.
        checksum: String,
    },
    /// A memory file's checksum differs from the manifest's.
    #[error(
        "memory file {path} has checksum {actual} but the manifest says {expected}: its \
         contents changed after the snapshot was written"
    )]
    ChecksumMismatch {
        /// The file.
        path: PathBuf,
        /// Its checksum now.
        actual: String,
        /// The manifest's.
        expected: String,
    },
}

/// Checks a snapshot directory and, for a diff, its parents: the manifest, the state file's
/// size and CRC, and each memory file's type, size, data bytes and checksum. Returns every
/// problem found (none when all is well) and the memory bytes read. `first_parent` is a
/// diff's parent when it no longer sits where the diff says (`restore --parent`).
pub fn verify(dir: &Path, first_parent: Option<&Path>) -> (Vec<Problem>, u64) {
    let manifest = match manifest::read(dir) {
        Ok(m) => m,
        Err(e) => return (vec![e.into()], 0),
    };
    let mut problems = Vec::new();
    let mut bytes = verify_one(dir, &manifest, &mut problems);
    if manifest.parent.is_some() {
        match resolve_parents(dir, &manifest, first_parent) {
            Ok(layers) => {
                for layer in layers {
                    bytes += verify_one(&layer.dir, &layer.manifest, &mut problems);
                }
            }
            Err(e) => problems.push(e.into()),
        }
    }
    (problems, bytes)
}

/// One directory's state and memory files; returns the memory bytes read.
fn verify_one(dir: &Path, m: &SnapshotManifest, problems: &mut Vec<Problem>) -> u64 {
    if let Err(p) = verify_state(dir, m) {
        problems.push(p);
    }
    let mut bytes = 0;
    for entry in &m.memory {
        match verify_memory(dir, entry, m.parent.is_some()) {
            Ok(n) => bytes += n,
            Err(p) => problems.push(p),
        }
    }
    bytes
}

fn verify_state(dir: &Path, m: &SnapshotManifest) -> Result<(), Problem> {
    let path = dir.join(&m.state.file);
    let file = open_plain(&path)?;
    let len = file
        .metadata()
        .map_err(|source| Problem::Stat {
            path: path.clone(),
            source,
        })?
        .len();
    if len != m.state.size {
        return Err(Problem::StateSize {
            path,
            actual: len,
            expected: m.state.size,
        });
    }
    if len > state_file::MAX_PAYLOAD + 4096 {
        return Err(Problem::StateTooLarge { path, len });
    }
    let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(0)];
    if let Err(source) = file.read_exact_at(&mut bytes, 0) {
        return Err(Problem::ReadState { path, source });
    }
    state_file::decode(&bytes)
        .map(|_| ())
        .map_err(|source| Problem::State { path, source })
}

/// One memory file; returns the bytes of data it holds.
fn verify_memory(dir: &Path, entry: &MemoryRegionEntry, diff: bool) -> Result<u64, Problem> {
    let path = dir.join(&entry.file);
    let file = open_plain(&path)?;
    let meta = file.metadata().map_err(|source| Problem::Stat {
        path: path.clone(),
        source,
    })?;
    if meta.len() != entry.size {
        return Err(Problem::MemorySize {
            path,
            actual: meta.len(),
            expected: entry.size,
        });
    }
    let data: u64 = match data_extents(&file, 0, entry.size) {
        Ok(extents) => extents.iter().map(|(_, n)| n).sum(),
        Err(source) => return Err(Problem::Memory { path, source }),
    };
    if let Some(expected) = entry.data_bytes.filter(|_| diff) {
        if data != expected {
            return Err(Problem::DataBytes {
                path,
                actual: data,
                expected,
            });
        }
    }
    let Some(expected) = &entry.checksum else {
        return Err(Problem::NoChecksum { path });
    };
    if !expected.starts_with(&format!("{ALGORITHM}:")) {
        return Err(Problem::UnknownChecksum {
            path,
            checksum: expected.clone(),
        });
    }
    let actual = match checksum(&file, entry.size, &AtomicBool::new(false)) {
        Ok(sum) => sum,
        Err(source) => return Err(Problem::Memory { path, source }),
    };
    if &actual != expected {
        return Err(Problem::ChecksumMismatch {
            path,
            actual,
            expected: expected.clone(),
        });
    }
    Ok(data)
}

/// Opens a file of the snapshot for reading: never through a symbolic link, never blocking,
/// and only a regular file.
fn open_plain(path: &Path) -> Result<File, Problem> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| Problem::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let t = file
        .metadata()
        .map_err(|source| Problem::Stat {
            path: path.to_path_buf(),
            source,
        })?
        .file_type();
    if !t.is_file() {
        return Err(Problem::NotRegular {
            path: path.to_path_buf(),
            kind: crate::host_file::describe(&t),
        });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(f: &File, len: u64) -> String {
        checksum(f, len, &AtomicBool::new(false)).unwrap()
    }

    #[test]
    fn the_sum_follows_contents_not_sparseness() {
        let len = 64 * PAGE;
        let a = tempfile::tempfile().unwrap();
        a.set_len(len).unwrap();
        a.write_all_at(b"guest", 5 * PAGE + 7).unwrap();
        let with_guest = sum(&a, len);
        // The same contents with zero pages written as data.
        let b = tempfile::tempfile().unwrap();
        b.set_len(len).unwrap();
        b.write_all_at(&vec![0u8; (8 * PAGE) as usize], 0).unwrap();
        b.write_all_at(b"guest", 5 * PAGE + 7).unwrap();
        assert_eq!(sum(&a, len), sum(&b, len));
        assert!(sum(&a, len).starts_with("xxh3-64:"));
        assert_eq!(sum(&a, len).len(), "xxh3-64:".len() + 16);
        // One byte changes it, and so does the same data at another page.
        b.write_all_at(b"G", 5 * PAGE + 7).unwrap();
        assert_ne!(sum(&a, len), sum(&b, len));
        let c = tempfile::tempfile().unwrap();
        c.set_len(len).unwrap();
        c.write_all_at(b"guest", 6 * PAGE + 7).unwrap();
        assert_ne!(sum(&a, len), sum(&c, len));
        // An all-hole file and an all-zero one agree.
        let z = tempfile::tempfile().unwrap();
        z.set_len(len).unwrap();
        a.write_all_at(&[0u8; 5], 5 * PAGE + 7).unwrap();
        assert_eq!(sum(&a, len), sum(&z, len));
        assert_ne!(sum(&a, len), with_guest);
        assert!(matches!(
            checksum(&a, len, &AtomicBool::new(true)),
            Err(MemoryFileError::Cancelled)
        ));
    }

    #[test]
    fn mapping_and_reading_give_the_same_sum() {
        let len = 200 * PAGE;
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        for p in [0u64, 3, 77, 199] {
            f.write_all_at(&[p as u8 + 1; 4096], p * PAGE).unwrap();
        }
        let never = AtomicBool::new(false);
        let read = checksum_with(&f, len, &never, Access::Read).unwrap();
        assert_eq!(read, checksum_with(&f, len, &never, Access::Map).unwrap());
        f.write_all_at(b"x", 77 * PAGE + 5).unwrap();
        assert_ne!(read, checksum_with(&f, len, &never, Access::Map).unwrap());
    }

    #[test]
    fn seal_syncs_and_sums_what_is_on_disk() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("memory-0.bin");
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .unwrap();
        f.set_len(16 * PAGE).unwrap();
        f.write_all_at(&[9u8; 4096], 3 * PAGE).unwrap();
        let sealed = seal(&p, 16 * PAGE, &AtomicBool::new(false)).unwrap();
        assert_eq!(sealed, sum(&f, 16 * PAGE));
        let e = seal(&d.path().join("missing"), 1, &AtomicBool::new(false)).unwrap_err();
        assert!(e.to_string().contains("cannot open"), "{e}");
    }
}
