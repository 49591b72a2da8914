//! The disk behind a virtio-blk device: what the user asked for (`DiskConfig`) and the opened,
//! locked backing file (`DiskImage`) with its size in sectors.
//!
//! Opening checks everything that can be wrong before the guest starts, each with its own error:
//! a missing path, something that is neither a regular file nor a block device, a size that is
//! not a multiple of 512, and a file another process (another skiff) holds an advisory lock on.
//! Parsing `--disk` strings is not done here (see the VMM's `config::disk`).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

/// Bytes in a virtio-blk sector (fixed by the specification, whatever `blk_size` says).
pub const SECTOR_SIZE: u64 = 512;
/// Length of the serial number `VIRTIO_BLK_T_GET_ID` returns.
pub const ID_BYTES: usize = 20;
/// Most request queues a disk may have.
pub const MAX_QUEUES: u16 = 64;

/// Which engine runs the disk's file I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum IoEngineKind {
    /// io_uring when the host kernel has it, the worker pool otherwise.
    #[default]
    Auto,
    /// io_uring, or an error when the host lacks it.
    IoUring,
    /// A small pool of threads doing `preadv`/`pwritev`.
    Threads,
}

/// A virtio-blk disk as configured (`--disk path=FILE[,readonly=on][,id=NAME][,queues=N]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Raw disk image or block device.
    pub path: PathBuf,
    /// Offer `VIRTIO_BLK_F_RO` and refuse every write.
    pub readonly: bool,
    /// Serial number returned by `GET_ID` (at most 20 bytes); zeros when absent.
    pub id: Option<String>,
    /// Number of request queues (1 to `MAX_QUEUES`).
    pub queues: u16,
    /// I/O engine.
    pub engine: IoEngineKind,
}

impl DiskConfig {
    /// A writable disk on `path` with one queue, no serial and the automatic engine.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            readonly: false,
            id: None,
            queues: 1,
            engine: IoEngineKind::Auto,
        }
    }
}

/// Why a disk could not be opened.
#[derive(Debug, Error)]
pub enum DiskError {
    /// The path does not exist.
    #[error("disk {0}: no such file")]
    Missing(PathBuf),
    /// `stat` or `open` failed for another reason.
    #[error("disk {path}: cannot open")]
    Open {
        /// The disk path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A directory, socket, FIFO or character device.
    #[error("disk {path}: {kind}, not a regular file or block device")]
    NotFileOrBlockDevice {
        /// The disk path.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// Zero bytes: no sector to serve (also what a `/proc` file reports).
    #[error("disk {0}: size is 0 bytes; a disk needs at least one 512-byte sector")]
    Empty(PathBuf),
    /// The size is not a whole number of sectors.
    #[error("disk {path}: size {size} bytes is not a multiple of 512")]
    Size {
        /// The disk path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Another process holds a conflicting advisory lock.
    #[error("disk {0}: locked by another process (is another skiff using it?)")]
    Locked(PathBuf),
    /// `flock` failed for another reason.
    #[error("disk {path}: cannot lock")]
    Lock {
        /// The disk path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `id=` longer than the 20 bytes `GET_ID` returns.
    #[error("disk {path}: id {id:?} is longer than {ID_BYTES} bytes")]
    IdTooLong {
        /// The disk path.
        path: PathBuf,
        /// The id.
        id: String,
    },
    /// `queues=` out of range.
    #[error("disk {path}: {queues} queues is out of range (1 to {MAX_QUEUES})")]
    Queues {
        /// The disk path.
        path: PathBuf,
        /// The requested count.
        queues: u16,
    },
}

/// An opened, locked disk: the file, its capacity and the serial number.
#[derive(Debug)]
pub struct DiskImage {
    file: Arc<File>,
    path: PathBuf,
    sectors: u64,
    readonly: bool,
    id: [u8; ID_BYTES],
}

impl DiskImage {
    /// Opens and locks `cfg.path` (exclusive lock, shared for a read-only disk).
    pub fn open(cfg: &DiskConfig) -> Result<Self, DiskError> {
        let path = cfg.path.clone();
        if cfg.queues == 0 || cfg.queues > MAX_QUEUES {
            return Err(DiskError::Queues {
                path,
                queues: cfg.queues,
            });
        }
        let mut id = [0u8; ID_BYTES];
        if let Some(name) = &cfg.id {
            let bytes = name.as_bytes();
            if bytes.len() > ID_BYTES {
                return Err(DiskError::IdTooLong {
                    path,
                    id: name.clone(),
                });
            }
            id[..bytes.len()].copy_from_slice(bytes);
        }
        // `stat` before `open`: opening a FIFO would block.
        let meta = std::fs::metadata(&path).map_err(|e| open_error(&path, e))?;
        if !is_disk_type(&meta.file_type()) {
            return Err(not_a_disk(path, &meta.file_type()));
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(!cfg.readonly)
            .open(&path)
            .map_err(|e| open_error(&path, e))?;
        // The path may have been swapped between `stat` and `open`: check what was opened.
        let meta = file.metadata().map_err(|e| open_error(&path, e))?;
        if !is_disk_type(&meta.file_type()) {
            return Err(not_a_disk(path, &meta.file_type()));
        }
        lock(&file, cfg.readonly, &path)?;
        let size = if meta.file_type().is_block_device() {
            file.seek(SeekFrom::End(0))
                .map_err(|e| open_error(&path, e))?
        } else {
            meta.len()
        };
        if size == 0 {
            return Err(DiskError::Empty(path));
        }
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::Size { path, size });
        }
        Ok(Self {
            file: Arc::new(file),
            path,
            sectors: size / SECTOR_SIZE,
            readonly: cfg.readonly,
            id,
        })
    }

    /// The backing file (shared with the I/O engine).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether writes are refused.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// The `GET_ID` serial number, zero-padded.
    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }
}

fn open_error(path: &Path, e: io::Error) -> DiskError {
    if e.kind() == io::ErrorKind::NotFound {
        DiskError::Missing(path.to_path_buf())
    } else {
        DiskError::Open {
            path: path.to_path_buf(),
            source: e,
        }
    }
}

fn not_a_disk(path: PathBuf, t: &std::fs::FileType) -> DiskError {
    DiskError::NotFileOrBlockDevice {
        path,
        kind: crate::file_type::describe(t),
    }
}

fn is_disk_type(t: &std::fs::FileType) -> bool {
    t.is_file() || t.is_block_device()
}

/// Takes the advisory lock that keeps two skiffs (or a skiff and a well-behaved tool) from
/// writing the same disk. It is released when the file is closed.
fn lock(file: &File, shared: bool, path: &Path) -> Result<(), DiskError> {
    let op = if shared { libc::LOCK_SH } else { libc::LOCK_EX } | libc::LOCK_NB;
    // SAFETY: flock on a file descriptor this function borrows; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(DiskError::Locked(path.to_path_buf()))
    } else {
        Err(DiskError::Lock {
            path: path.to_path_buf(),
            source: e,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        f.as_file().set_len(len).expect("set_len");
        f
    }

    #[test]
    fn opens_and_reports_capacity() {
        let f = image(1 << 20);
        let mut cfg = DiskConfig::new(f.path());
        cfg.id = Some("disk-0".into());
        let d = DiskImage::open(&cfg).expect("open");
        assert_eq!(d.sectors(), 2048);
        assert!(!d.readonly());
        assert_eq!(&d.id()[..6], b"disk-0");
        assert!(d.id()[6..].iter().all(|&b| b == 0));
    }

    #[test]
    fn missing_file() {
        let cfg = DiskConfig::new("/nonexistent/skiff-disk.img");
        let e = DiskImage::open(&cfg).expect_err("must fail");
        assert!(matches!(e, DiskError::Missing(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "disk /nonexistent/skiff-disk.img: no such file"
        );
    }

    #[test]
    fn directory_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let e = DiskImage::open(&DiskConfig::new(dir.path())).expect_err("must fail");
        assert!(
            e.to_string()
                .ends_with("a directory, not a regular file or block device"),
            "{e}"
        );
    }

    #[test]
    fn proc_files_fifos_and_empty_files_are_refused() {
        // /proc/self/mem stats as a regular file of 0 bytes.
        let e = DiskImage::open(&DiskConfig::new("/proc/self/mem")).expect_err("must fail");
        assert!(matches!(e, DiskError::Empty(_)), "{e:?}");
        assert!(e.to_string().contains("size is 0 bytes"), "{e}");
        let f = image(0);
        let e = DiskImage::open(&DiskConfig::new(f.path())).expect_err("must fail");
        assert!(matches!(e, DiskError::Empty(_)), "{e:?}");
        let e = DiskImage::open(&DiskConfig::new("/dev/null")).expect_err("must fail");
        assert!(e.to_string().contains("a character device"), "{e}");
        let dir = tempfile::tempdir().expect("temp dir");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("no NUL");
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = DiskImage::open(&DiskConfig::new(&fifo)).expect_err("must fail at once");
        assert!(e.to_string().contains("a FIFO"), "{e}");
    }

    #[test]
    fn size_not_multiple_of_512() {
        let f = image(1000);
        let e = DiskImage::open(&DiskConfig::new(f.path())).expect_err("must fail");
        assert!(matches!(e, DiskError::Size { size: 1000, .. }), "{e:?}");
        assert!(e
            .to_string()
            .contains("1000 bytes is not a multiple of 512"));
    }

    #[test]
    fn second_writer_is_locked_out() {
        let f = image(4096);
        let first = DiskImage::open(&DiskConfig::new(f.path())).expect("first open");
        let e = DiskImage::open(&DiskConfig::new(f.path())).expect_err("must be locked");
        assert!(matches!(e, DiskError::Locked(_)), "{e:?}");
        let mut ro = DiskConfig::new(f.path());
        ro.readonly = true;
        assert!(matches!(DiskImage::open(&ro), Err(DiskError::Locked(_))));
        drop(first);
        // Two read-only users share the lock; a writer is then refused.
        let a = DiskImage::open(&ro).expect("shared 1");
        let b = DiskImage::open(&ro).expect("shared 2");
        assert!(a.readonly() && b.readonly());
        assert!(matches!(
            DiskImage::open(&DiskConfig::new(f.path())),
            Err(DiskError::Locked(_))
        ));
    }

    #[test]
    fn bad_id_and_queue_count() {
        let f = image(4096);
        let mut cfg = DiskConfig::new(f.path());
        cfg.id = Some("x".repeat(21));
        assert!(matches!(
            DiskImage::open(&cfg),
            Err(DiskError::IdTooLong { .. })
        ));
        let mut cfg = DiskConfig::new(f.path());
        cfg.queues = 0;
        assert!(matches!(
            DiskImage::open(&cfg),
            Err(DiskError::Queues { queues: 0, .. })
        ));
    }
}
