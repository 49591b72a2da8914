//! A snapshot directory opened once, and every file of the snapshot opened relative to it.
//!
//! A snapshot is untrusted input, so its files are opened with `openat` on the directory's
//! descriptor, by plain names only (no `/`, not `.` or `..`), with `O_NOFOLLOW` (a symbolic
//! link is refused, whatever it points at) and `O_NONBLOCK` (a FIFO or device never blocks the
//! open), and `fstat`ed before anything is read: only a regular file is accepted, and its size
//! is checked against the caller's limit before a byte is read. `O_NONBLOCK` has no effect on a
//! regular file's reads or mappings.
//!
//! Not here: what the files hold (`manifest`, `state_file`) and which host resources a
//! snapshot may name (`resources`, `authorize`).

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why a snapshot file cannot be used.
#[derive(Debug, Error)]
pub enum DirError {
    /// The directory itself cannot be opened.
    #[error("cannot open snapshot directory {path}")]
    OpenDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A name that is not a plain file name inside the directory.
    #[error("{name:?} in snapshot {dir} is not a plain file name inside the directory")]
    NotPlainName {
        /// The directory.
        dir: PathBuf,
        /// The name.
        name: String,
    },
    /// The file is a symbolic link.
    #[error(
        "{path} is a symbolic link; a snapshot's files must be regular files inside its directory"
    )]
    Symlink {
        /// The file.
        path: PathBuf,
    },
    /// The file is a directory, FIFO, socket or device.
    #[error("{path} is a {kind}, not a regular file")]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// The file is larger than its kind may be.
    #[error("{path} is {len} bytes, larger than a {what} may be ({limit} bytes)")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The limit.
        limit: u64,
        /// What the file is.
        what: &'static str,
    },
    /// Opening, `fstat` or reading failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Whether `name` is a plain file name inside a directory (no separators, not `.` or `..`).
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
}

/// An open snapshot directory.
#[derive(Debug)]
pub struct SnapshotDir {
    path: PathBuf,
    fd: OwnedFd,
}

/// A regular file of a snapshot, opened and measured.
#[derive(Debug)]
pub struct SnapshotFile {
    /// Its path (for messages).
    pub path: PathBuf,
    /// The open file (read-only).
    pub file: File,
    /// Its length when opened.
    pub len: u64,
    /// Its device and inode numbers: which file it really is.
    pub identity: (u64, u64),
}

fn file_kind(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => "directory",
        libc::S_IFIFO => "FIFO",
        libc::S_IFSOCK => "socket",
        libc::S_IFCHR => "character device",
        libc::S_IFBLK => "block device",
        libc::S_IFLNK => "symbolic link",
        _ => "special file",
    }
}

impl SnapshotDir {
    /// Opens the directory `path` (which the user named, so a symbolic link to a directory is
    /// followed here; nothing inside it is).
    pub fn open(path: &Path) -> Result<Self, DirError> {
        let err = |source| DirError::OpenDir {
            path: path.to_path_buf(),
            source,
        };
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| err(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        // SAFETY: `c` is a NUL-terminated path that outlives the call; open has no memory effects.
        let raw = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if raw < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly opened descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self {
            path: path.to_path_buf(),
            fd,
        })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the regular file `name` inside the directory, read-only, refusing a symbolic
    /// link, any other file type, and a file longer than `limit` bytes (`what` names it).
    pub fn open_regular(
        &self,
        name: &str,
        limit: u64,
        what: &'static str,
    ) -> Result<SnapshotFile, DirError> {
        if !is_plain_name(name) {
            return Err(DirError::NotPlainName {
                dir: self.path.clone(),
                name: name.to_string(),
            });
        }
        let path = self.path.join(name);
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| DirError::Io { op, path, source }
        };
        let c = CString::new(name.as_bytes())
            .map_err(|_| io("open", &path)(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        // SAFETY: `self.fd` is an open directory and `c` a NUL-terminated name that outlives
        // the call; openat has no memory effects.
        let raw = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY
                    | libc::O_NOFOLLOW
                    | libc::O_NONBLOCK
                    | libc::O_NOCTTY
                    | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ELOOP) {
                return Err(DirError::Symlink { path });
            }
            return Err(io("open", &path)(e));
        }
        // SAFETY: `raw` is a freshly opened descriptor nobody else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        let meta = file.metadata().map_err(io("fstat", &path))?;
        if !meta.file_type().is_file() {
            return Err(DirError::NotRegular {
                path,
                kind: file_kind(meta.mode()),
            });
        }
        if meta.len() > limit {
            return Err(DirError::TooLarge {
                path,
                len: meta.len(),
                limit,
                what,
            });
        }
        Ok(SnapshotFile {
            path,
            len: meta.len(),
            identity: (meta.dev(), meta.ino()),
            file,
        })
    }

    /// Reads the whole regular file `name`, of at most `limit` bytes (checked before reading;
    /// a file that grows meanwhile is cut at `limit + 1` bytes and refused).
    pub fn read_capped(
        &self,
        name: &str,
        limit: u64,
        what: &'static str,
    ) -> Result<Vec<u8>, DirError> {
        let f = self.open_regular(name, limit, what)?;
        let mut bytes = Vec::with_capacity(usize::try_from(f.len).unwrap_or(0));
        (&f.file)
            .take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|source| DirError::Io {
                op: "read",
                path: f.path.clone(),
                source,
            })?;
        if bytes.len() as u64 > limit {
            return Err(DirError::TooLarge {
                path: f.path,
                len: bytes.len() as u64,
                limit,
                what,
            });
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_links_special_files_and_large_files_before_reading() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("ok"), b"hello").unwrap();
        std::fs::write(d.path().join("target"), b"secret").unwrap();
        std::os::unix::fs::symlink(d.path().join("target"), d.path().join("link")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", d.path().join("dangling")).unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        let fifo = CString::new(d.path().join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; mkfifo has no memory effects.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let dir = SnapshotDir::open(d.path()).unwrap();
        assert_eq!(dir.read_capped("ok", 5, "test").unwrap(), b"hello");
        let e = dir.read_capped("ok", 4, "test").unwrap_err();
        assert!(matches!(e, DirError::TooLarge { len: 5, .. }), "{e}");
        for name in ["link", "dangling"] {
            let e = dir.open_regular(name, 100, "test").unwrap_err();
            assert!(matches!(e, DirError::Symlink { .. }), "{e}");
        }
        let e = dir.open_regular("sub", 100, "test").unwrap_err();
        assert!(
            e.to_string().contains("is a directory, not a regular file"),
            "{e}"
        );
        // The FIFO has no writer: the open must not block.
        let e = dir.open_regular("fifo", 100, "test").unwrap_err();
        assert!(e.to_string().contains("is a FIFO"), "{e}");
        for name in ["../ok", "", ".", "..", "a/b"] {
            let e = dir.open_regular(name, 100, "test").unwrap_err();
            assert!(matches!(e, DirError::NotPlainName { .. }), "{e}");
        }
        let f = dir.open_regular("ok", 100, "test").unwrap();
        let meta = std::fs::metadata(d.path().join("ok")).unwrap();
        assert_eq!(f.identity, (meta.dev(), meta.ino()));
    }
}
