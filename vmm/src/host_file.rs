//! Opening the host files a user names on the command line (`--kernel`, `--initrd`, `--serial
//! file=`) so that start-up never blocks and never reads something that is not what it seems.
//!
//! Every open uses `O_NONBLOCK`, so a FIFO with no writer (or no reader) cannot hang skiff, and
//! the opened descriptor's type is checked with `fstat` before anything is read or written. A
//! file to read must be a regular file. Serial output may go to a regular file (appended,
//! created if missing) or to a character device (`/dev/null`, a terminal); a FIFO, socket,
//! directory or block device is refused. Once the type is known, `O_NONBLOCK` is cleared again:
//! it only guards the open itself.
//!
//! Not here: disks (`devices::virtio::blk::disk`), memory backings (`memory::backing`) and
//! snapshot files (`snapshot::`), which have rules of their own.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Errors from opening a host file named on the command line.
#[derive(Debug, Error)]
pub enum HostFileError {
    /// `open` or `fstat` of a file to read failed.
    #[error("cannot read {what} {path}")]
    Read {
        /// What the file is for ("kernel", "initrd").
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `open` or `fstat` of an output file failed.
    #[error("cannot open {what} {path}")]
    Open {
        /// What the file is for ("serial output file").
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The path names a file of a type that cannot serve.
    #[error("{what} {path} is {kind}, not {expected}")]
    WrongType {
        /// What the file is for.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// What it is ("a FIFO", "a directory", ...).
        kind: &'static str,
        /// What it must be.
        expected: &'static str,
    },
}

/// The file type of `t` in words, for error messages.
pub use devices::file_type::describe;

/// Opens `path` for reading; it must be a regular file.
pub fn open_regular(what: &'static str, path: &Path) -> Result<File, HostFileError> {
    let open_err = |source| HostFileError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(open_err)?;
    let t = file.metadata().map_err(open_err)?.file_type();
    if !t.is_file() {
        return Err(HostFileError::WrongType {
            what,
            path: path.to_path_buf(),
            kind: describe(&t),
            expected: "a regular file",
        });
    }
    clear_nonblock(&file).map_err(open_err)?;
    Ok(file)
}

/// Opens (creating it if missing, mode 0644 less the umask) `path` for appending serial
/// output; it must be a regular file or a character device.
pub fn open_serial_output(path: &Path) -> Result<File, HostFileError> {
    const WHAT: &str = "serial output file";
    const EXPECTED: &str = "a regular file or a character device";
    let open_err = |source| HostFileError::Open {
        what: WHAT,
        path: path.to_path_buf(),
        source,
    };
    let wrong = |t: &std::fs::FileType| HostFileError::WrongType {
        what: WHAT,
        path: path.to_path_buf(),
        kind: describe(t),
        expected: EXPECTED,
    };
    let usable = |t: &std::fs::FileType| t.is_file() || t.is_char_device();
    // Checked before opening too: a FIFO without a reader would fail the non-blocking open
    // with ENXIO, which says less than its type does.
    if let Ok(meta) = std::fs::metadata(path) {
        if !usable(&meta.file_type()) {
            return Err(wrong(&meta.file_type()));
        }
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(open_err)?;
    // The path may have changed between the check and the open: check what was opened.
    let t = file.metadata().map_err(open_err)?.file_type();
    if !usable(&t) {
        return Err(wrong(&t));
    }
    clear_nonblock(&file).map_err(open_err)?;
    Ok(file)
}

fn clear_nonblock(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function borrows, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    fn fifo(dir: &Path) -> PathBuf {
        let path = dir.join("fifo");
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        path
    }

    #[test]
    fn a_fifo_is_refused_at_once_for_reading_and_for_serial_output() {
        let d = tempfile::tempdir().unwrap();
        let p = fifo(d.path());
        let e = open_regular("kernel", &p).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("kernel {} is a FIFO, not a regular file", p.display())
        );
        let e = open_serial_output(&p).unwrap_err().to_string();
        assert!(
            e.contains("is a FIFO, not a regular file or a character device"),
            "{e}"
        );
    }

    #[test]
    fn directories_and_devices_are_named_by_type() {
        let d = tempfile::tempdir().unwrap();
        let e = open_regular("initrd", d.path()).unwrap_err().to_string();
        assert!(e.ends_with("is a directory, not a regular file"), "{e}");
        let e = open_regular("kernel", Path::new("/dev/null"))
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("is a character device, not a regular file"),
            "{e}"
        );
        let e = open_serial_output(d.path()).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        let e = open_regular("kernel", &d.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cannot read kernel"), "{e}");
    }

    #[test]
    fn regular_files_and_character_devices_serve_and_block_again() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        std::fs::write(&p, b"x").unwrap();
        let f = open_regular("kernel", &p).unwrap();
        // SAFETY: F_GETFL on an open descriptor.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
        let log = d.path().join("serial.log");
        use std::io::Write;
        open_serial_output(&log).unwrap().write_all(b"a").unwrap();
        open_serial_output(&log).unwrap().write_all(b"b").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"ab", "appended");
        open_serial_output(Path::new("/dev/null")).unwrap();
    }
}
