//! Loading the kernel image: detects ELF (vmlinux, PVH) or bzImage by its magic and loads it into
//! guest memory with `linux-loader`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use devices::guest_memory::TrackedGuestMemory;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use thiserror::Error;
use vm_memory::GuestAddress;

use super::elf_check::check_elf;
use crate::host_file::{open_regular, HostFileError};
use arch::layout::RamRange;

/// Offset of the bzImage "HdrS" magic.
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
/// Offset of the 64-bit entry point from a bzImage's protected-mode load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Errors from loading a kernel.
#[derive(Debug, Error)]
pub enum KernelError {
    /// The path is missing, unreadable or not a regular file (boxed: large and rare).
    #[error(transparent)]
    File(Box<HostFileError>),
    /// The file could not be opened or read.
    #[error("cannot read kernel image {path}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error("kernel image {path}: not an ELF or bzImage (first bytes {head})")]
    UnknownFormat {
        /// The path.
        path: PathBuf,
        /// Hex of the first bytes.
        head: String,
    },
    /// The ELF image does not fit guest memory.
    #[error("kernel image {path}: cannot load ELF")]
    Elf {
        /// The path.
        path: PathBuf,
        /// What is wrong with it (boxed: it carries a segment's values).
        #[source]
        source: Box<super::elf_check::ElfError>,
    },
    /// linux-loader rejected the image.
    #[error("kernel image {path}: cannot load {format}: {reason}")]
    Load {
        /// The path.
        path: PathBuf,
        /// "ELF" or "bzImage".
        format: &'static str,
        /// linux-loader's description.
        reason: String,
    },
}

impl From<HostFileError> for KernelError {
    fn from(e: HostFileError) -> Self {
        Self::File(Box::new(e))
    }
}

/// How the loaded kernel wants to be entered.
#[derive(Debug, Clone, Copy)]
pub enum KernelEntry {
    /// PVH: 32-bit protected mode at this address, `rbx` = start_info.
    Pvh(u64),
    /// Linux 64-bit boot protocol at this address, `rsi` = boot_params; `setup_header` is the
    /// bzImage's header (`None` for an ELF vmlinux without a PVH note).
    Linux64 {
        /// 64-bit entry point.
        entry: u64,
        /// The bzImage setup header.
        setup_header: Option<setup_header>,
    },
}

/// A kernel placed in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// How to enter it.
    pub entry: KernelEntry,
    /// First guest address past the image.
    pub end: u64,
}

enum Format {
    Elf,
    BzImage,
}

fn detect(path: &Path, file: &mut File) -> Result<Format, KernelError> {
    let read_err = |source| KernelError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut head = Vec::with_capacity(BZIMAGE_MAGIC_OFFSET + 4);
    file.by_ref()
        .take((BZIMAGE_MAGIC_OFFSET + 4) as u64)
        .read_to_end(&mut head)
        .map_err(read_err)?;
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    if head.starts_with(b"\x7fELF") {
        return Ok(Format::Elf);
    }
    if head.get(BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4) == Some(b"HdrS") {
        return Ok(Format::BzImage);
    }
    let shown: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Err(KernelError::UnknownFormat {
        path: path.to_path_buf(),
        head: if shown.is_empty() {
            "none: the file is empty".into()
        } else {
            shown.join(" ")
        },
    })
}

/// Loads the kernel at `path` into `mem` (laid out as `ram`), above 1 MiB.
pub fn load_kernel(
    mem: &TrackedGuestMemory,
    ram: &[RamRange],
    path: &Path,
) -> Result<LoadedKernel, KernelError> {
    let mut file = open_regular("kernel", path)?;
    let high = Some(GuestAddress(arch::layout::HIGH_MEMORY_START));
    let load_err = |format, e: linux_loader::loader::Error| KernelError::Load {
        path: path.to_path_buf(),
        format,
        reason: e.to_string(),
    };
    match detect(path, &mut file)? {
        Format::Elf => {
            check_elf(&file, ram).map_err(|e| KernelError::Elf {
                path: path.to_path_buf(),
                source: Box::new(e),
            })?;
            let r = Elf::load(mem, None, &mut file, high).map_err(|e| load_err("ELF", e))?;
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => KernelEntry::Pvh(addr.0),
                _ => KernelEntry::Linux64 {
                    entry: r.kernel_load.0,
                    setup_header: None,
                },
            };
            Ok(LoadedKernel {
                entry,
                end: r.kernel_end,
            })
        }
        Format::BzImage => {
            let r =
                BzImage::load(mem, None, &mut file, high).map_err(|e| load_err("bzImage", e))?;
            Ok(LoadedKernel {
                entry: KernelEntry::Linux64 {
                    entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                    setup_header: r.setup_header,
                },
                end: r.kernel_end,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem() -> TrackedGuestMemory {
        TrackedGuestMemory::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap()
    }

    const RAM: &[RamRange] = &[RamRange {
        start: 0,
        size: 32 << 20,
    }];

    #[test]
    fn a_32_bit_class_byte_or_a_low_segment_is_refused_before_loading() {
        use super::super::elf_check::tests::elf;
        let f = file_with(&elf(1, 62, &[]));
        let msg = crate::error_chain(&load_kernel(&mem(), RAM, f.path()).unwrap_err());
        assert!(
            msg.contains("cannot load ELF: ELF class (EI_CLASS) is 1"),
            "{msg}"
        );
        let f = file_with(&elf(2, 62, &[(1, 0x9000, 0x1000)]));
        let msg = crate::error_chain(&load_kernel(&mem(), RAM, f.path()).unwrap_err());
        assert!(msg.contains("overlaps the boot structures"), "{msg}");
    }

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn unknown_format_names_the_first_bytes() {
        let f = file_with(b"#!/bin/sh\necho not a kernel\n");
        let e = load_kernel(&mem(), RAM, f.path()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("not an ELF or bzImage"), "{msg}");
        assert!(msg.contains("23 21 2f 62"), "{msg}");
    }

    #[test]
    fn empty_file_is_rejected() {
        let f = file_with(b"");
        let msg = crate::error_chain(&load_kernel(&mem(), RAM, f.path()).unwrap_err());
        assert!(msg.contains("empty"), "{msg}");
    }

    #[test]
    fn truncated_elf_is_rejected() {
        let f = file_with(b"\x7fELF\x02\x01\x01\x00");
        let msg = crate::error_chain(&load_kernel(&mem(), RAM, f.path()).unwrap_err());
        assert!(msg.contains("cannot load ELF"), "{msg}");
    }

    #[test]
    fn truncated_bzimage_is_rejected() {
        let mut image = vec![0u8; 0x210];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        let f = file_with(&image);
        let msg = crate::error_chain(&load_kernel(&mem(), RAM, f.path()).unwrap_err());
        assert!(msg.contains("cannot load bzImage"), "{msg}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let msg = load_kernel(&mem(), RAM, Path::new("/nonexistent/vmlinux"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("/nonexistent/vmlinux"), "{msg}");
    }
}
