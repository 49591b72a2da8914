//! The vhost-user dirty log: a shared-memory bitmap, one bit per 4 KiB guest page up to the
//! highest guest-physical address, that a backend sets for every page it writes while
//! `VHOST_F_LOG_ALL` is on (`SET_LOG_BASE` with `LOG_SHMFD` hands it the memfd).
//!
//! The backend is untrusted: skiff only reads the bitmap, swapping each word to zero
//! atomically, and ignores bits beyond guest RAM. Not here: the messages that switch logging
//! on and off (`connection`, `device`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use vhost::VhostUserDirtyLogRegion;

/// The page size the log counts in.
pub const LOG_PAGE: u64 = 4096;

/// A memfd-backed dirty log, mapped in this process.
#[derive(Debug)]
pub struct LogBuffer {
    fd: OwnedFd,
    ptr: *mut AtomicU64,
    words: usize,
    /// The mapping's length in bytes (a multiple of the host page).
    len: usize,
    /// The end of guest RAM: pages at or beyond it are ignored.
    ram_end: u64,
}

// SAFETY: the mapping is shared memory accessed only through `AtomicU64`; it is owned by the
// buffer and unmapped once, on drop.
unsafe impl Send for LogBuffer {}
// SAFETY: as above: every access is atomic.
unsafe impl Sync for LogBuffer {}

impl LogBuffer {
    /// A zeroed log covering guest-physical addresses `[0, ram_end)`.
    pub fn new(ram_end: u64) -> io::Result<Self> {
        let pages = ram_end.div_ceil(LOG_PAGE);
        let words = pages.div_ceil(64).max(1);
        let bytes = words
            .checked_mul(8)
            .and_then(|b| b.checked_next_multiple_of(LOG_PAGE))
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| io::Error::other(format!("guest RAM end {ram_end:#x} is too large")))?;
        let words = usize::try_from(words).map_err(io::Error::other)?;
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let raw = unsafe { libc::memfd_create(c"skiff-vhost-log".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = libc::off_t::try_from(bytes).map_err(io::Error::other)?;
        // SAFETY: ftruncate on the memfd just created.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new shared mapping of the whole memfd; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            fd,
            ptr: ptr.cast(),
            words,
            len: bytes,
            ram_end,
        })
    }

    /// What `SET_LOG_BASE` sends (the descriptor stays owned by the buffer).
    pub fn region(&self) -> VhostUserDirtyLogRegion {
        VhostUserDirtyLogRegion {
            mmap_size: self.len as u64,
            mmap_offset: 0,
            mmap_handle: self.fd.as_raw_fd(),
        }
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping holds `len >= words * 8` bytes, is 4 KiB-aligned and lives as
        // long as `self`; `AtomicU64` has the layout of `u64`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.words) }
    }

    /// Calls `page` with the guest-physical address of every page logged since the last call,
    /// and clears them.
    pub fn take(&self, page: &mut dyn FnMut(u64)) {
        take_pages(self.words(), self.ram_end, page);
    }
}

impl Drop for LogBuffer {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; nothing borrows it past `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Swaps each word of `words` to zero and calls `page` with the guest-physical address of every
/// set bit (bit `i` is page `i`) below `ram_end`; bits beyond it are dropped.
pub fn take_pages(words: &[AtomicU64], ram_end: u64, page: &mut dyn FnMut(u64)) {
    for (w, word) in words.iter().enumerate() {
        if word.load(Ordering::Relaxed) == 0 {
            continue;
        }
        let mut bits = word.swap(0, Ordering::AcqRel);
        while bits != 0 {
            let bit = u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            let address = (w as u64 * 64 + bit) * LOG_PAGE;
            if address < ram_end {
                page(address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn collect(words: &[AtomicU64], ram_end: u64) -> Vec<u64> {
        let mut out = Vec::new();
        take_pages(words, ram_end, &mut |a| out.push(a));
        out
    }

    #[test]
    fn bits_become_guest_pages_and_are_cleared() {
        let words = [AtomicU64::new(0b101), AtomicU64::new(1 << 63)];
        let pages = collect(&words, 128 * LOG_PAGE);
        assert_eq!(pages, vec![0, 2 * LOG_PAGE, 127 * LOG_PAGE]);
        assert!(words.iter().all(|w| w.load(Ordering::Relaxed) == 0));
        assert!(collect(&words, 128 * LOG_PAGE).is_empty(), "taken once");
    }

    #[test]
    fn bits_beyond_ram_are_ignored() {
        let words = [AtomicU64::new(u64::MAX), AtomicU64::new(u64::MAX)];
        let pages = collect(&words, 3 * LOG_PAGE + 1);
        assert_eq!(pages, vec![0, LOG_PAGE, 2 * LOG_PAGE, 3 * LOG_PAGE]);
        assert_eq!(words[1].load(Ordering::Relaxed), 0, "cleared all the same");
    }

    #[test]
    fn a_buffer_covers_ram_and_reads_what_a_writer_of_its_memfd_set() {
        let log = LogBuffer::new(100 * LOG_PAGE).unwrap();
        let region = log.region();
        assert_eq!(region.mmap_size, LOG_PAGE, "rounded to the page");
        // Another mapping of the memfd, as a backend would have.
        let fd = region.mmap_handle;
        // SAFETY: a shared mapping of the test's memfd, unmapped below.
        let other = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(other, libc::MAP_FAILED);
        // SAFETY: the mapping is 4096 bytes; word 1 is inside it.
        unsafe { *other.cast::<u64>().add(1) = 0b11 | (1 << 40) };
        let mut pages = Vec::new();
        log.take(&mut |a| pages.push(a));
        assert_eq!(
            pages,
            vec![64 * LOG_PAGE, 65 * LOG_PAGE],
            "page 104 is beyond RAM"
        );
        // SAFETY: reading the same word back through the other mapping.
        assert_eq!(unsafe { *other.cast::<u64>().add(1) }, 0);
        // SAFETY: unmaps the test's own mapping.
        unsafe { libc::munmap(other, 4096) };
    }
}
