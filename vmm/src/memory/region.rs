//! `ShareableRegion`: one file-backed range of guest physical memory, and `Mappable`, its backing.
//!
//! Guest RAM is a list of these regions and nothing else owns it: the hypervisor maps each region
//! as a memory slot, vhost-user backends receive each region's fd and `file_offset`, snapshots
//! save or link each region's file. The backing must already hold committed data for the whole
//! range (see `backing.rs`): consumers map it directly and must never fault on missing backing.

use std::sync::Arc;

#[cfg(unix)]
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
#[cfg(windows)]
use std::os::windows::io::{AsHandle, BorrowedHandle, OwnedHandle};

/// The OS object behind a region: a file descriptor on Unix, a section handle on Windows.
#[derive(Debug)]
pub struct Mappable {
    #[cfg(unix)]
    fd: OwnedFd,
    #[cfg(windows)]
    handle: OwnedHandle,
    /// A section's size cannot be read back through Win32, so it travels with the handle.
    #[cfg(windows)]
    size: u64,
}

#[cfg(unix)]
impl Mappable {
    /// Wraps an open file descriptor (memfd, regular file or hugetlbfs file).
    pub fn new(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// A second descriptor for the same open file, as `std::fs::File`, for APIs that take one.
    pub fn try_clone_file(&self) -> std::io::Result<std::fs::File> {
        Ok(std::fs::File::from(self.fd.try_clone()?))
    }

    /// The file's current length in bytes.
    pub fn byte_len(&self) -> std::io::Result<u64> {
        Ok(self.try_clone_file()?.metadata()?.len())
    }
}

#[cfg(unix)]
impl AsFd for Mappable {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(windows)]
impl Mappable {
    /// Wraps a section (file mapping) handle whose maximum size is `size` bytes.
    pub fn new(handle: OwnedHandle, size: u64) -> Self {
        Self { handle, size }
    }

    /// The section's size in bytes.
    pub fn byte_len(&self) -> std::io::Result<u64> {
        Ok(self.size)
    }
}

#[cfg(windows)]
impl AsHandle for Mappable {
    fn as_handle(&self) -> BorrowedHandle<'_> {
        self.handle.as_handle()
    }
}

/// A shareable region of guest memory backed by a file (Unix) or section handle (Windows).
///
/// The backing must already contain committed data for the region: all bytes in the range are
/// accessible without SIGSEGV or SIGBUS from missing backing. Ordinary demand paging and minor
/// faults on first access are expected.
#[derive(Debug, Clone)]
pub struct ShareableRegion {
    /// Guest physical address of this region.
    pub guest_address: u64,
    /// Size in bytes.
    pub size: u64,
    /// Backing file/handle, shared via `Arc` to avoid OS-level dup().
    pub file: Arc<Mappable>,
    /// Offset into `file` where this region starts.
    pub file_offset: u64,
}

impl ShareableRegion {
    /// One past the last guest physical address, or `None` if it overflows.
    pub fn guest_end(&self) -> Option<u64> {
        self.guest_address.checked_add(self.size)
    }

    /// One past the last file offset, or `None` if it overflows.
    pub fn file_end(&self) -> Option<u64> {
        self.file_offset.checked_add(self.size)
    }

    /// Whether `addr` lies inside this region.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.guest_address && addr - self.guest_address < self.size
    }
}
