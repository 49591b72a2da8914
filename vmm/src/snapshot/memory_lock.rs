//! The lock a copy-on-write restore holds on the memory files it maps.
//!
//! A `cow` restore maps each memory file `MAP_PRIVATE`: every page the guest has not written
//! yet is read from the file, for the VM's whole life, so a change to the file shows through.
//! It therefore takes a shared `flock` on each file and keeps it (the descriptor lives in the
//! region's `Mappable`) until the VM ends. `skiff run --memory file=` takes an exclusive lock on
//! its backing, and `--disk` on its image, so neither can be pointed at a file a restored VM is
//! reading; a restore is refused in turn while a running VM holds the exclusive lock.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why a memory file could not be locked.
#[derive(Debug, Error)]
pub enum MemoryLockError {
    /// Another process holds the exclusive lock: a VM runs on the file.
    #[error(
        "memory file {0} is in use by another process (a VM runs with it as --memory file=); \
         a copy-on-write restore would see that VM's writes"
    )]
    InUse(PathBuf),
    /// `flock` failed for another reason.
    #[error("cannot lock memory file {path}")]
    Lock {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Takes a shared lock on `file` without waiting. It lasts as long as the open file
/// description (every duplicate of the descriptor) does.
pub fn lock_shared(file: &File, path: &Path) -> Result<(), MemoryLockError> {
    // SAFETY: flock on a descriptor this function borrows; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(MemoryLockError::InUse(path.to_path_buf()))
    } else {
        Err(MemoryLockError::Lock {
            path: path.to_path_buf(),
            source: e,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn try_exclusive(path: &Path) -> bool {
        let f = File::options().read(true).write(true).open(path).unwrap();
        // SAFETY: flock on an open descriptor.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    }

    #[test]
    fn a_shared_lock_keeps_writers_out_and_is_kept_out_by_one() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("memory-0.bin");
        std::fs::write(&p, b"x").unwrap();
        let reader = File::open(&p).unwrap();
        lock_shared(&reader, &p).unwrap();
        let second = File::open(&p).unwrap();
        lock_shared(&second, &p).unwrap();
        assert!(!try_exclusive(&p), "a writer must not get the file");
        drop((reader, second));
        let writer = File::options().read(true).write(true).open(&p).unwrap();
        // SAFETY: flock on an open descriptor.
        assert_eq!(unsafe { libc::flock(writer.as_raw_fd(), libc::LOCK_EX) }, 0);
        let e = lock_shared(&File::open(&p).unwrap(), &p).unwrap_err();
        assert!(matches!(e, MemoryLockError::InUse(_)), "{e}");
    }
}
