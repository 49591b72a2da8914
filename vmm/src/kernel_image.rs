//! Loading a kernel image from its bytes into any vm-memory `GuestMemoryBackend`: an ELF
//! vmlinux (entered through PVH when it carries the Xen PHYS32_ENTRY note) or a bzImage (64-bit
//! boot protocol). This is the loader skiff uses where `linux-loader` cannot build (Windows:
//! linux-loader turns on vm-memory's Unix-only `rawfd`). It places the image exactly as
//! linux-loader does with no load offset, which the tests check against linux-loader itself,
//! and refuses the same ELF segments as the Linux path's `boot::elf_check`: every `PT_LOAD` at
//! or above 1 MiB, outside the MMIO hole, inside one RAM range.
//!
//! Platform-neutral; unit-tested on Linux.

use arch::layout::{RamRange, HIGH_MEMORY_START, HIGH_RAM_START, MMIO_HOLE_START};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Offset of the bzImage "HdrS" magic.
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
/// Offset of the 64-bit entry point from a bzImage's protected-mode load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Size of an `Elf64_Ehdr`.
const EHDR_SIZE: usize = 64;
/// Size of an `Elf64_Phdr`.
const PHDR_SIZE: usize = 56;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// The Xen ELF note that holds a PVH kernel's 32-bit entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Why a kernel image cannot be loaded, with the offending values.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum KernelImageError {
    /// Neither ELF nor bzImage.
    #[error("not an ELF or bzImage (first bytes {0})")]
    UnknownFormat(String),
    /// A header or table lies past the end of the file.
    #[error("{what} at offset {offset:#x} ({len:#x} bytes) lies past the end of the {file_len:#x}-byte image")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Its offset in the file.
        offset: u64,
        /// Its length.
        len: u64,
        /// The file's length.
        file_len: usize,
    },
    /// Not a 64-bit ELF.
    #[error("ELF class (EI_CLASS) is {0}, not {ELFCLASS64} (64-bit)")]
    Class(u8),
    /// Not little-endian.
    #[error("ELF data encoding (EI_DATA) is {0}, not {ELFDATA2LSB} (little-endian)")]
    Endian(u8),
    /// Not x86-64.
    #[error("ELF machine (e_machine) is {0}, not {EM_X86_64} (x86-64)")]
    Machine(u16),
    /// Program headers of another size.
    #[error("program header size (e_phentsize) is {0}, not {PHDR_SIZE}")]
    ProgramHeaderSize(u16),
    /// The entry point lies below 1 MiB.
    #[error("ELF entry point {0:#x} lies below {HIGH_MEMORY_START:#x}")]
    Entry(u64),
    /// A loaded segment is not in RAM above the boot structures.
    #[error("PT_LOAD segment {index} at {start:#x} ({len:#x} bytes) {problem}")]
    Segment {
        /// The segment's index.
        index: usize,
        /// Its physical address.
        start: u64,
        /// Its size in memory.
        len: u64,
        /// What is wrong.
        problem: &'static str,
    },
    /// A bzImage older than boot protocol 2.00 or not loaded high.
    #[error("bzImage boot protocol {version:#x} with loadflags {loadflags:#x}: needs 2.00 or later, loaded high")]
    OldBzImage {
        /// The header's protocol version.
        version: u16,
        /// Its loadflags.
        loadflags: u8,
    },
    /// The bzImage's protected-mode code would load below 1 MiB.
    #[error("bzImage code32_start {0:#x} lies below {HIGH_MEMORY_START:#x}")]
    Code32Start(u32),
    /// Writing into guest memory failed (the image does not fit the RAM at that address).
    #[error("{len:#x} bytes at {address:#x} do not fit guest RAM")]
    Write {
        /// Guest address.
        address: u64,
        /// Length.
        len: usize,
    },
}

/// How the loaded kernel wants to be entered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageEntry {
    /// PVH: 32-bit protected mode at this address.
    Pvh(u64),
    /// The 64-bit boot protocol at this address, with the bzImage's setup header (the
    /// `arch::linux_boot::SETUP_HEADER_SIZE` bytes at 0x1f1; `None` for an ELF vmlinux).
    Linux64 {
        /// 64-bit entry point.
        entry: u64,
        /// The setup header's bytes.
        setup_header: Option<Vec<u8>>,
    },
}

/// A kernel placed in guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedImage {
    /// How to enter it.
    pub entry: ImageEntry,
    /// First guest address past the image.
    pub end: u64,
}

/// Loads `image` (a whole kernel file) into `mem`, laid out as `ram`.
pub fn load_image<M: GuestMemoryBackend>(
    mem: &M,
    ram: &[RamRange],
    image: &[u8],
) -> Result<LoadedImage, KernelImageError> {
    if image.starts_with(b"\x7fELF") {
        return load_elf(mem, ram, image);
    }
    if image.get(BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4) == Some(b"HdrS") {
        return load_bzimage(mem, image);
    }
    let shown: Vec<String> = image.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Err(KernelImageError::UnknownFormat(if shown.is_empty() {
        "none: the file is empty".into()
    } else {
        shown.join(" ")
    }))
}

fn bytes<'a>(
    image: &'a [u8],
    what: &'static str,
    offset: u64,
    len: u64,
) -> Result<&'a [u8], KernelImageError> {
    let truncated = KernelImageError::Truncated {
        what,
        offset,
        len,
        file_len: image.len(),
    };
    let start = usize::try_from(offset).map_err(|_| truncated.clone())?;
    let end = usize::try_from(len)
        .ok()
        .and_then(|l| start.checked_add(l))
        .ok_or_else(|| truncated.clone())?;
    image.get(start..end).ok_or(truncated)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn write<M: GuestMemoryBackend>(
    mem: &M,
    address: u64,
    data: &[u8],
) -> Result<(), KernelImageError> {
    mem.write_slice(data, GuestAddress(address))
        .map_err(|_| KernelImageError::Write {
            address,
            len: data.len(),
        })
}

/// One program header's fields.
struct Phdr {
    kind: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

fn load_elf<M: GuestMemoryBackend>(
    mem: &M,
    ram: &[RamRange],
    image: &[u8],
) -> Result<LoadedImage, KernelImageError> {
    let ehdr = bytes(image, "ELF header", 0, EHDR_SIZE as u64)?;
    if ehdr[4] != ELFCLASS64 {
        return Err(KernelImageError::Class(ehdr[4]));
    }
    if ehdr[5] != ELFDATA2LSB {
        return Err(KernelImageError::Endian(ehdr[5]));
    }
    let machine = u16_at(ehdr, 18);
    if machine != EM_X86_64 {
        return Err(KernelImageError::Machine(machine));
    }
    let entry = u64_at(ehdr, 24);
    let phoff = u64_at(ehdr, 32);
    let phentsize = u16_at(ehdr, 54);
    let phnum = u16_at(ehdr, 56);
    if usize::from(phentsize) != PHDR_SIZE {
        return Err(KernelImageError::ProgramHeaderSize(phentsize));
    }
    if entry < HIGH_MEMORY_START {
        return Err(KernelImageError::Entry(entry));
    }
    let table = bytes(
        image,
        "program header table",
        phoff,
        u64::from(phnum) * PHDR_SIZE as u64,
    )?;
    let phdrs: Vec<Phdr> = table
        .chunks_exact(PHDR_SIZE)
        .map(|p| Phdr {
            kind: u32_at(p, 0),
            offset: u64_at(p, 8),
            paddr: u64_at(p, 24),
            filesz: u64_at(p, 32),
            memsz: u64_at(p, 40),
        })
        .collect();
    // Every segment is checked before any is written.
    for (index, p) in phdrs.iter().enumerate() {
        let len = p.filesz.max(p.memsz);
        if p.kind == PT_LOAD && len > 0 {
            check_segment(index, p.paddr, len, ram)?;
        }
    }
    let mut pvh = None;
    let mut end = 0;
    for p in &phdrs {
        match p.kind {
            PT_NOTE => {
                pvh = pvh.or(pvh_entry(bytes(
                    image,
                    "PT_NOTE segment",
                    p.offset,
                    p.filesz,
                )?))
            }
            PT_LOAD if p.filesz > 0 => {
                write(
                    mem,
                    p.paddr,
                    bytes(image, "PT_LOAD segment", p.offset, p.filesz)?,
                )?;
                // `check_segment` ruled out a wrap.
                end = end.max(p.paddr + p.memsz);
            }
            _ => {}
        }
    }
    let entry = match pvh {
        Some(pvh) => ImageEntry::Pvh(pvh),
        None => ImageEntry::Linux64 {
            entry,
            setup_header: None,
        },
    };
    Ok(LoadedImage { entry, end })
}

/// The PVH entry point from a note segment's bytes, if it holds one (a "Xen" note of type
/// `XEN_ELFNOTE_PHYS32_ENTRY` whose descriptor starts with the 32-bit address).
fn pvh_entry(notes: &[u8]) -> Option<u64> {
    let pad = |n: usize| n.checked_add(3).map(|n| n & !3);
    let mut at = 0usize;
    while let Some(header) = notes.get(at..at.checked_add(12)?) {
        let namesz = usize::try_from(u32_at(header, 0)).ok()?;
        let descsz = usize::try_from(u32_at(header, 4)).ok()?;
        let kind = u32_at(header, 8);
        let name_at = at + 12;
        let desc_at = name_at.checked_add(pad(namesz)?)?;
        let name = notes.get(name_at..name_at.checked_add(namesz)?)?;
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen\0" && descsz >= 4 {
            let desc = notes.get(desc_at..desc_at.checked_add(4)?)?;
            return Some(u64::from(u32_at(desc, 0)));
        }
        at = desc_at.checked_add(pad(descsz)?)?;
    }
    None
}

/// Checks one `PT_LOAD` segment `[start, start + len)` (the Linux path's `elf_check` rules).
fn check_segment(
    index: usize,
    start: u64,
    len: u64,
    ram: &[RamRange],
) -> Result<(), KernelImageError> {
    let refuse = |problem| {
        Err(KernelImageError::Segment {
            index,
            start,
            len,
            problem,
        })
    };
    let Some(end) = start.checked_add(len) else {
        return refuse("wraps the address space");
    };
    if start < HIGH_MEMORY_START {
        return refuse("overlaps the boot structures below 0x100000");
    }
    if start < HIGH_RAM_START && end > MMIO_HOLE_START {
        return refuse("overlaps the MMIO hole 0xc0000000..0x100000000");
    }
    if !ram.iter().any(|r| start >= r.start && end <= r.end()) {
        return refuse("lies beyond guest RAM");
    }
    Ok(())
}

fn load_bzimage<M: GuestMemoryBackend>(
    mem: &M,
    image: &[u8],
) -> Result<LoadedImage, KernelImageError> {
    let offset = arch::linux_boot::SETUP_HEADER_OFFSET;
    let header = bytes(
        image,
        "bzImage setup header",
        offset as u64,
        arch::linux_boot::SETUP_HEADER_SIZE as u64,
    )?;
    // Field offsets inside the header (the file offset minus 0x1f1).
    let setup_sects = header[0x1f1 - offset];
    let version = u16_at(header, 0x206 - offset);
    let loadflags = header[0x211 - offset];
    let code32_start = u32_at(header, 0x214 - offset);
    if version < 0x200 || loadflags & 1 == 0 {
        return Err(KernelImageError::OldBzImage { version, loadflags });
    }
    if u64::from(code32_start) < HIGH_MEMORY_START {
        return Err(KernelImageError::Code32Start(code32_start));
    }
    // The real-mode part: the boot sector plus `setup_sects` sectors (0 means 4).
    let sects = if setup_sects == 0 {
        4
    } else {
        usize::from(setup_sects)
    };
    let setup_size = (sects + 1) * 512;
    let Some(payload) = image.get(setup_size..) else {
        return Err(KernelImageError::Truncated {
            what: "bzImage setup code",
            offset: 0,
            len: setup_size as u64,
            file_len: image.len(),
        });
    };
    let load = u64::from(code32_start);
    write(mem, load, payload)?;
    Ok(LoadedImage {
        entry: ImageEntry::Linux64 {
            entry: load + BZIMAGE_64BIT_ENTRY_OFFSET,
            setup_header: Some(header.to_vec()),
        },
        end: load + payload.len() as u64,
    })
}

#[cfg(test)]
#[path = "kernel_image_tests.rs"]
pub(crate) mod tests;
