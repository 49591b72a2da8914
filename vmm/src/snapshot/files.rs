//! The file operations every snapshot writer shares (a new snapshot, a live snapshot's memory
//! files, `snapshot-merge`): creating, writing and fsyncing files and directories, measuring a
//! file's data, and their one error, which names the operation and the path.
//!
//! Not here: what goes into a snapshot (`writer`), how memory files are copied (`memory_file`)
//! and how they are summed (`integrity`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// A file or directory operation that failed.
#[derive(Debug, Error)]
#[error("cannot {op} {path}")]
pub struct FileError {
    /// What was being done.
    pub op: &'static str,
    /// On which path.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

/// Turns an OS error from `op` on `path` into a `FileError`.
pub fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| FileError {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `path`, which must not exist, readable and writable by this user only.
pub fn create_file(path: &Path) -> Result<File, FileError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io("create", path))
}

/// Creates `path` holding `bytes`, fsynced.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let mut f = create_file(path)?;
    f.write_all(bytes).map_err(io("write", path))?;
    f.sync_all().map_err(io("fsync", path))
}

/// Fsyncs the directory `path` (so the names in it are durable).
pub fn fsync_dir(path: &Path) -> Result<(), FileError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync directory", path))
}

/// The bytes of data (not holes) in the file at `path`, as `SEEK_DATA`/`SEEK_HOLE` see them.
pub fn data_bytes(path: &Path) -> Result<u64, FileError> {
    use std::os::fd::AsRawFd;
    let err = |source| FileError {
        op: "measure the data in",
        path: path.to_path_buf(),
        source,
    };
    let f = File::open(path).map_err(err)?;
    let len = i64::try_from(f.metadata().map_err(err)?.len()).unwrap_or(i64::MAX);
    let (mut pos, mut total) = (0i64, 0u64);
    while pos < len {
        // SAFETY: lseek on a descriptor we own; it only moves that descriptor's position.
        let data = unsafe { libc::lseek(f.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(err(e));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        total += u64::try_from(hole.min(len) - data).unwrap_or(0);
        pos = hole;
    }
    Ok(total)
}
