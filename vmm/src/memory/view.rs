//! `SectionView`: one mapped view of a Windows section (`MapViewOfFile`), unmapped on drop.
//!
//! The view owns its address range: no raw address leaves this module except as the host
//! address the hypervisor registers (`WHvMapGpaRange`), and reads and writes from skiff go
//! through bounds-checked copies.

use std::io;
use std::os::windows::io::{AsHandle, AsRawHandle};

use thiserror::Error;
use windows::Win32::Foundation::HANDLE;
use windows::Win32::System::Memory::{
    MapViewOfFile, UnmapViewOfFile, FILE_MAP_READ, FILE_MAP_WRITE, MEMORY_MAPPED_VIEW_ADDRESS,
};

use super::region::Mappable;

/// Why a view could not be mapped or accessed.
#[derive(Debug, Error)]
pub enum ViewError {
    /// `offset + len` lies past the section's end, or does not fit the address space.
    #[error("view {offset:#x}+{len:#x} does not fit the {section_size:#x}-byte section")]
    OutOfRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// The section's size.
        section_size: u64,
    },
    /// `MapViewOfFile` failed.
    #[error("cannot map a view of {len:#x} bytes at section offset {offset:#x}")]
    Map {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An access outside the view.
    #[error("access {offset:#x}+{len:#x} lies outside the {view_len:#x}-byte view")]
    Access {
        /// Offset into the view.
        offset: usize,
        /// Bytes accessed.
        len: usize,
        /// The view's length.
        view_len: usize,
    },
}

/// A read-write view of `len` bytes of a section, from section offset `offset`.
#[derive(Debug)]
pub struct SectionView {
    address: MEMORY_MAPPED_VIEW_ADDRESS,
    len: usize,
}

// SAFETY: the view is plain shared memory owned by this value; it is valid from any thread and
// its accessors copy through raw pointers without creating references.
unsafe impl Send for SectionView {}
// SAFETY: as above; concurrent accessors only copy bytes (the guest writes the same memory).
unsafe impl Sync for SectionView {}

impl SectionView {
    /// Maps `len` bytes of `section` from `offset`, which must be a multiple of the allocation
    /// granularity (`validate_view_offsets` checks that first and says why).
    pub fn map(section: &Mappable, offset: u64, len: u64) -> Result<Self, ViewError> {
        let section_size = section.byte_len().map_err(|source| ViewError::Map {
            offset,
            len,
            source,
        })?;
        let out_of_range = ViewError::OutOfRange {
            offset,
            len,
            section_size,
        };
        let fits = offset
            .checked_add(len)
            .is_some_and(|end| end <= section_size);
        let Ok(bytes) = usize::try_from(len) else {
            return Err(out_of_range);
        };
        if !fits || len == 0 {
            return Err(out_of_range);
        }
        // SAFETY: the section handle is live; the range lies inside the section (checked
        // above); the returned view is owned by the value built below and unmapped on drop.
        let address = unsafe {
            MapViewOfFile(
                HANDLE(section.as_handle().as_raw_handle()),
                FILE_MAP_READ | FILE_MAP_WRITE,
                (offset >> 32) as u32,
                offset as u32,
                bytes,
            )
        };
        if address.Value.is_null() {
            return Err(ViewError::Map {
                offset,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            address,
            len: bytes,
        })
    }

    /// The view's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view is empty (never: `map` refuses a zero length).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The view's start, for registering it with the hypervisor. Valid while `self` lives.
    pub fn host_address(&self) -> u64 {
        self.address.Value as u64
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), ViewError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(ViewError::Access {
                offset,
                len,
                view_len: self.len,
            }),
        }
    }

    /// Copies `data` into the view at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), ViewError> {
        self.check(offset, data.len())?;
        // SAFETY: `offset..offset + data.len()` lies inside the live view (checked above) and
        // `data` is a separate allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.address.Value.cast::<u8>().add(offset),
                data.len(),
            );
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes from the view at `offset` into `buf`.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<(), ViewError> {
        self.check(offset, buf.len())?;
        // SAFETY: as in `write_at`, with the copy going the other way.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.address.Value.cast::<u8>().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            );
        }
        Ok(())
    }
}

impl Drop for SectionView {
    fn drop(&mut self) {
        // SAFETY: `address` is a view this value mapped and nothing else unmaps it.
        if let Err(e) = unsafe { UnmapViewOfFile(self.address) } {
            log::warn!("cannot unmap a guest memory view: {e}");
        }
    }
}
