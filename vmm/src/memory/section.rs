//! Windows sections behind guest RAM: a pagefile-backed section by default, or a section over
//! the user's `file=`; and the section handle duplicated for another process, the Windows form
//! of handing a memory fd to a device process.
//!
//! A pagefile-backed section is created `SEC_COMMIT`: its whole size is charged against the
//! commit limit at creation, so a view never faults for missing backing (the Windows form of
//! the Linux backings' "fully committed before the VM starts"). Mapping the section lives in
//! `view`; laying regions out in `section_ram`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::windows::fs::OpenOptionsExt;
use std::os::windows::io::{AsHandle, AsRawHandle, BorrowedHandle, FromRawHandle, OwnedHandle};
use std::path::{Path, PathBuf};

use thiserror::Error;
use windows::core::PCWSTR;
use windows::Win32::Foundation::{
    DuplicateHandle, DUPLICATE_SAME_ACCESS, ERROR_SHARING_VIOLATION, HANDLE, INVALID_HANDLE_VALUE,
};
use windows::Win32::Storage::FileSystem::FILE_SHARE_READ;
use windows::Win32::System::Memory::{CreateFileMappingW, PAGE_READWRITE, SEC_COMMIT};
use windows::Win32::System::SystemInformation::{GetSystemInfo, SYSTEM_INFO};
use windows::Win32::System::Threading::GetCurrentProcess;

use super::region::Mappable;

/// What backs guest RAM on Windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SectionBacking {
    /// A section backed by the pagefile (`CreateFileMappingW(INVALID_HANDLE_VALUE, ...)`).
    Pagefile,
    /// A section over this file, created if missing and grown to the RAM size if shorter.
    File(PathBuf),
}

/// Why a section could not be created or shared.
#[derive(Debug, Error)]
pub enum SectionError {
    /// `CreateFileMappingW` failed.
    #[error("cannot create a {size:#x}-byte section for guest memory ({what})")]
    Create {
        /// `pagefile` or the file's path.
        what: String,
        /// The requested size.
        size: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The memory file could not be opened.
    #[error("cannot open memory file {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The memory file is open for writing elsewhere (a sharing violation).
    #[error("memory file {0} is in use by another process (it cannot be opened for sharing)")]
    InUse(PathBuf),
    /// The memory file is not a regular file.
    #[error("memory file {0} is not a regular file")]
    NotRegular(PathBuf),
    /// The memory file could not be grown to the RAM size.
    #[error("cannot size memory file {path} to {size:#x} bytes")]
    Resize {
        /// The file.
        path: PathBuf,
        /// The size it needed.
        size: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A section for guest RAM and, for a `file=` backing skiff created, that file's path (so a
/// failed start can remove it again).
#[derive(Debug)]
pub struct Section {
    /// The section handle and size.
    pub mappable: Mappable,
    /// The memory file skiff created, if any.
    pub created: Option<PathBuf>,
}

impl Section {
    /// Creates a section of `size` bytes over `backing`.
    pub fn create(backing: &SectionBacking, size: u64) -> Result<Self, SectionError> {
        match backing {
            SectionBacking::Pagefile => Ok(Self {
                mappable: pagefile_section(size)?,
                created: None,
            }),
            SectionBacking::File(path) => file_section(path, size),
        }
    }
}

/// The host's allocation granularity: section views start at multiples of it.
pub fn allocation_granularity() -> u64 {
    let mut info = SYSTEM_INFO::default();
    // SAFETY: GetSystemInfo fills the structure it is given and has no other effects.
    unsafe { GetSystemInfo(&mut info) };
    u64::from(info.dwAllocationGranularity)
}

fn split(size: u64) -> (u32, u32) {
    ((size >> 32) as u32, size as u32)
}

fn pagefile_section(size: u64) -> Result<Mappable, SectionError> {
    let (high, low) = split(size);
    // SAFETY: no file handle (the pagefile backs the section), no security attributes, no
    // name; the returned handle is owned below.
    let handle = unsafe {
        CreateFileMappingW(
            INVALID_HANDLE_VALUE,
            None,
            PAGE_READWRITE | SEC_COMMIT,
            high,
            low,
            PCWSTR::null(),
        )
    }
    .map_err(|e| SectionError::Create {
        what: "pagefile".into(),
        size,
        source: e.into(),
    })?;
    Ok(Mappable::new(owned(handle), size))
}

fn file_section(path: &Path, size: u64) -> Result<Section, SectionError> {
    let existed = match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => return Err(SectionError::NotRegular(path.to_path_buf())),
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(source) => {
            return Err(SectionError::Open {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    // Others may read the file while the VM runs but not write it: the Windows counterpart of
    // the exclusive flock on Linux, so two VMs never share one RAM file by accident.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .share_mode(FILE_SHARE_READ.0)
        .open(path)
        .map_err(|source| {
            if source.raw_os_error() == Some(ERROR_SHARING_VIOLATION.0 as i32) {
                SectionError::InUse(path.to_path_buf())
            } else {
                SectionError::Open {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
    let created = (!existed).then(|| path.to_path_buf());
    match section_over(&file, path, size) {
        Ok(mappable) => Ok(Section { mappable, created }),
        Err(e) => {
            drop(file);
            if let Some(p) = created {
                let _ = std::fs::remove_file(p);
            }
            Err(e)
        }
    }
}

fn section_over(file: &File, path: &Path, size: u64) -> Result<Mappable, SectionError> {
    let current = file
        .metadata()
        .map_err(|source| SectionError::Open {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    // An existing larger file keeps its size and contents; a shorter one grows (sparsely).
    if current < size {
        file.set_len(size).map_err(|source| SectionError::Resize {
            path: path.to_path_buf(),
            size,
            source,
        })?;
    }
    let (high, low) = split(size);
    // SAFETY: `file` is an open handle with read and write access for the duration of the
    // call; the section keeps its own reference to the file, so `file` may close afterwards.
    let handle = unsafe {
        CreateFileMappingW(
            HANDLE(file.as_raw_handle()),
            None,
            PAGE_READWRITE,
            high,
            low,
            PCWSTR::null(),
        )
    }
    .map_err(|e| SectionError::Create {
        what: path.display().to_string(),
        size,
        source: e.into(),
    })?;
    Ok(Mappable::new(owned(handle), size))
}

fn owned(handle: HANDLE) -> OwnedHandle {
    // SAFETY: `handle` was just returned by a successful create call and nothing else owns it.
    unsafe { OwnedHandle::from_raw_handle(handle.0) }
}

/// A section handle value valid in another process, made by `Mappable::duplicate_into`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteSectionHandle {
    /// The handle's value in the target process (to send it there, e.g. in a message).
    pub value: usize,
    /// The section's size in bytes.
    pub size: u64,
}

impl Mappable {
    /// Duplicates the section handle into `process` (opened with `PROCESS_DUP_HANDLE`) with the
    /// same access; the target process owns, maps and closes the result.
    pub fn duplicate_into(&self, process: BorrowedHandle<'_>) -> io::Result<RemoteSectionHandle> {
        let mut target = HANDLE::default();
        // SAFETY: both process handles are live for the call; the section handle is ours; the
        // new handle is written to `target` and belongs to `process`.
        unsafe {
            DuplicateHandle(
                GetCurrentProcess(),
                HANDLE(self.as_handle().as_raw_handle()),
                HANDLE(process.as_raw_handle()),
                &mut target,
                0,
                false,
                DUPLICATE_SAME_ACCESS,
            )
        }?;
        Ok(RemoteSectionHandle {
            value: target.0 as usize,
            size: self.byte_len()?,
        })
    }

    /// A second handle to the same section in this process, through `DuplicateHandle` as
    /// another process would get one.
    pub fn try_clone(&self) -> io::Result<Mappable> {
        // SAFETY: GetCurrentProcess returns a pseudo handle that needs no closing and stays
        // valid for the call.
        let me = unsafe { BorrowedHandle::borrow_raw(GetCurrentProcess().0) };
        let remote = self.duplicate_into(me)?;
        // SAFETY: the duplicate was made into this process just now and nothing else owns it.
        let handle = unsafe { OwnedHandle::from_raw_handle(remote.value as *mut _) };
        Ok(Mappable::new(handle, remote.size))
    }
}

#[cfg(test)]
mod tests;
