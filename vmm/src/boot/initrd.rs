//! Placing the initrd: read straight from the file into the highest page-aligned spot of low RAM
//! that lies above the kernel and below the kernel's `initrd_addr_max`.

use std::path::{Path, PathBuf};

use devices::guest_memory::TrackedGuestMemory;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

/// Errors from loading the initrd.
#[derive(Debug, Error)]
pub enum InitrdError {
    /// The path is missing, unreadable or not a regular file (boxed: large and rare).
    #[error(transparent)]
    File(Box<crate::host_file::HostFileError>),
    /// The file could not be opened or read.
    #[error("cannot read initrd {path}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit.
    #[error("initrd {path} ({size} bytes) does not fit in guest RAM between the kernel's end {low:#x} and {high:#x}")]
    TooLarge {
        /// The path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Lowest usable address.
        low: u64,
        /// Highest usable address (exclusive).
        high: u64,
    },
}

impl From<crate::host_file::HostFileError> for InitrdError {
    fn from(e: crate::host_file::HostFileError) -> Self {
        Self::File(Box::new(e))
    }
}

/// Where the initrd lives in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedInitrd {
    /// Guest physical address.
    pub address: u64,
    /// Size in bytes.
    pub size: u64,
}

use crate::boot_state::place_initrd as place;

/// Loads the initrd at `path` between `kernel_end` and `ram_top` (exclusive).
pub fn load_initrd(
    mem: &TrackedGuestMemory,
    path: &Path,
    kernel_end: u64,
    ram_top: u64,
) -> Result<LoadedInitrd, InitrdError> {
    let read_err = |source| InitrdError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = crate::host_file::open_regular("initrd", path)?;
    let size = file.metadata().map_err(read_err)?.len();
    let address = place(size, kernel_end, ram_top).ok_or_else(|| InitrdError::TooLarge {
        path: path.to_path_buf(),
        size,
        low: kernel_end,
        high: ram_top,
    })?;
    let len = usize::try_from(size).map_err(|_| InitrdError::TooLarge {
        path: path.to_path_buf(),
        size,
        low: kernel_end,
        high: ram_top,
    })?;
    mem.read_exact_volatile_from(GuestAddress(address), &mut file, len)
        .map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
    Ok(LoadedInitrd { address, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn loads_bytes_and_rejects_oversize() {
        let mem = TrackedGuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"initrd-bytes").unwrap();
        let r = load_initrd(&mem, f.path(), 2 << 20, 4 << 20).unwrap();
        assert_eq!(r.size, 12);
        assert_eq!(r.address, (4 << 20) - 0x1000);
        let mut back = [0u8; 12];
        mem.read_slice(&mut back, GuestAddress(r.address)).unwrap();
        assert_eq!(&back, b"initrd-bytes");
        let e = load_initrd(&mem, f.path(), (4 << 20) - 8, 4 << 20).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
    }
}
