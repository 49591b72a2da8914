//! Checks an ELF kernel image before `linux-loader` copies it into guest memory: a 64-bit,
//! little-endian x86-64 image whose every loaded segment (`PT_LOAD`) lies inside one guest RAM
//! range and at or above 1 MiB, so it can overwrite neither the boot structures skiff writes
//! below 1 MiB (GDT, page tables, start_info or boot_params, command line, ACPI tables), nor
//! fall into the MMIO hole or past the end of RAM.
//!
//! `linux-loader` checks the magic, byte order and header sizes, but not the class or machine,
//! and it copies each segment wherever its physical address says. Only the headers are read here.

use std::fs::File;
use std::os::unix::fs::FileExt;

use arch::layout::{RamRange, HIGH_MEMORY_START, HIGH_RAM_START, MMIO_HOLE_START};
use thiserror::Error;

/// Size of an `Elf64_Ehdr`.
const EHDR_SIZE: usize = 64;
/// Size of an `Elf64_Phdr`.
const PHDR_SIZE: usize = 56;
/// `e_ident[EI_CLASS]` of a 64-bit object.
const ELFCLASS64: u8 = 2;
/// `e_machine` of x86-64.
const EM_X86_64: u16 = 62;
/// A loadable segment.
const PT_LOAD: u32 = 1;

/// Why an ELF kernel image is refused, with the offending values.
#[derive(Debug, Error)]
pub enum ElfError {
    /// The ELF header cannot be read.
    #[error("cannot read the {EHDR_SIZE}-byte ELF header")]
    ReadHeader(#[source] std::io::Error),
    /// Not a 64-bit image.
    #[error("ELF class (EI_CLASS) is {0}, not {ELFCLASS64} (64-bit)")]
    Class(u8),
    /// Not an x86-64 image.
    #[error("ELF machine (e_machine) is {0}, not {EM_X86_64} (x86-64)")]
    Machine(u16),
    /// Program headers of another size.
    #[error("program header size (e_phentsize) is {0}, not {PHDR_SIZE}")]
    ProgramHeaderSize(u16),
    /// The program headers cannot be read.
    #[error("cannot read {count} program headers at offset {offset:#x}")]
    ReadProgramHeaders {
        /// How many the header announces.
        count: u16,
        /// Where they would be.
        offset: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A segment wraps the address space.
    #[error("PT_LOAD segment {index} at {start:#x} ({len:#x} bytes) wraps the address space")]
    Wraps {
        /// The segment's index.
        index: usize,
        /// Its physical address.
        start: u64,
        /// Its size.
        len: u64,
    },
    /// A segment overlaps the boot structures.
    #[error(
        "PT_LOAD segment {index} at {start:#x}..{end:#x} overlaps the boot structures below \
         {HIGH_MEMORY_START:#x}"
    )]
    BootStructures {
        /// The segment's index.
        index: usize,
        /// Its physical address.
        start: u64,
        /// Its end.
        end: u64,
    },
    /// A segment overlaps the MMIO hole.
    #[error(
        "PT_LOAD segment {index} at {start:#x}..{end:#x} overlaps the MMIO hole \
         {MMIO_HOLE_START:#x}..{HIGH_RAM_START:#x}"
    )]
    MmioHole {
        /// The segment's index.
        index: usize,
        /// Its physical address.
        start: u64,
        /// Its end.
        end: u64,
    },
    /// A segment lies outside guest RAM.
    #[error(
        "PT_LOAD segment {index} at {start:#x}..{end:#x} lies beyond guest RAM (which ends at \
         {ram_end:#x})"
    )]
    BeyondRam {
        /// The segment's index.
        index: usize,
        /// Its physical address.
        start: u64,
        /// Its end.
        end: u64,
        /// Where guest RAM ends.
        ram_end: u64,
    },
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

/// Checks the ELF image in `file` against guest RAM laid out as `ram`.
pub fn check_elf(file: &File, ram: &[RamRange]) -> Result<(), ElfError> {
    let mut ehdr = [0u8; EHDR_SIZE];
    file.read_exact_at(&mut ehdr, 0)
        .map_err(ElfError::ReadHeader)?;
    if ehdr[4] != ELFCLASS64 {
        return Err(ElfError::Class(ehdr[4]));
    }
    let machine = u16_at(&ehdr, 18);
    if machine != EM_X86_64 {
        return Err(ElfError::Machine(machine));
    }
    let phoff = u64_at(&ehdr, 32);
    let phentsize = u16_at(&ehdr, 54);
    let phnum = u16_at(&ehdr, 56);
    if usize::from(phentsize) != PHDR_SIZE {
        return Err(ElfError::ProgramHeaderSize(phentsize));
    }
    let mut table = vec![0u8; usize::from(phnum) * PHDR_SIZE];
    file.read_exact_at(&mut table, phoff)
        .map_err(|source| ElfError::ReadProgramHeaders {
            count: phnum,
            offset: phoff,
            source,
        })?;
    for (i, phdr) in table.chunks_exact(PHDR_SIZE).enumerate() {
        if u32_at(phdr, 0) != PT_LOAD {
            continue;
        }
        let start = u64_at(phdr, 24);
        let len = u64_at(phdr, 32).max(u64_at(phdr, 40));
        if len == 0 {
            continue;
        }
        check_segment(i, start, len, ram)?;
    }
    Ok(())
}

/// Checks one `PT_LOAD` segment `[start, start + len)`.
fn check_segment(index: usize, start: u64, len: u64, ram: &[RamRange]) -> Result<(), ElfError> {
    let Some(end) = start.checked_add(len) else {
        return Err(ElfError::Wraps { index, start, len });
    };
    if start < HIGH_MEMORY_START {
        return Err(ElfError::BootStructures { index, start, end });
    }
    if start < HIGH_RAM_START && end > MMIO_HOLE_START {
        return Err(ElfError::MmioHole { index, start, end });
    }
    if !ram.iter().any(|r| start >= r.start && end <= r.end()) {
        let ram_end = ram.iter().map(RamRange::end).max().unwrap_or(0);
        return Err(ElfError::BeyondRam {
            index,
            start,
            end,
            ram_end,
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal ELF header and program header table: one segment per `(type, paddr, memsz)`.
    pub(crate) fn elf(class: u8, machine: u16, segments: &[(u32, u64, u64)]) -> Vec<u8> {
        let mut b = vec![0u8; EHDR_SIZE];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = class;
        b[5] = 1; // little-endian
        b[6] = 1; // EV_CURRENT
        b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes()); // e_entry
        b[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
        b[52..54].copy_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
        b[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        b[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        for &(kind, paddr, memsz) in segments {
            let mut p = [0u8; PHDR_SIZE];
            p[..4].copy_from_slice(&kind.to_le_bytes());
            p[16..24].copy_from_slice(&paddr.to_le_bytes());
            p[24..32].copy_from_slice(&paddr.to_le_bytes());
            p[40..48].copy_from_slice(&memsz.to_le_bytes());
            b.extend_from_slice(&p);
        }
        b
    }

    /// The check's verdict, with the whole error chain as one line.
    fn check(bytes: &[u8], ram: &[RamRange]) -> Result<(), String> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        check_elf(&f, ram).map_err(|e| crate::error_chain(&e))
    }

    const RAM_256M: &[RamRange] = &[RamRange {
        start: 0,
        size: 256 << 20,
    }];

    #[test]
    fn a_good_header_passes() {
        let ok = elf(2, 62, &[(PT_LOAD, 0x100_0000, 0x1000), (4, 0, 0x100)]);
        check(&ok, RAM_256M).unwrap();
    }

    #[test]
    fn class_and_machine_are_checked() {
        let e = check(&elf(1, 62, &[]), RAM_256M).unwrap_err();
        assert_eq!(e, "ELF class (EI_CLASS) is 1, not 2 (64-bit)");
        let e = check(&elf(2, 183, &[]), RAM_256M).unwrap_err();
        assert_eq!(e, "ELF machine (e_machine) is 183, not 62 (x86-64)");
        let e = check(b"\x7fELF\x02\x01\x01\x00", RAM_256M).unwrap_err();
        assert!(e.contains("64-byte ELF header"), "{e}");
    }

    #[test]
    fn segments_over_boot_structures_the_hole_or_past_ram_are_refused() {
        let cases: [(u64, u64, &str); 5] = [
            (0x7000, 0x1000, "segment 0 at 0x7000..0x8000 overlaps the boot structures below 0x100000"),
            (0xf_f000, 0x2000, "overlaps the boot structures"),
            (0xbfff_f000, 0x2000, "overlaps the MMIO hole 0xc0000000..0x100000000"),
            (0x1000_0000, 0x1000, "segment 0 at 0x10000000..0x10001000 lies beyond guest RAM (which ends at 0x10000000)"),
            (u64::MAX - 0xfff, 0x2000, "wraps the address space"),
        ];
        for (at, len, needle) in cases {
            let e = check(&elf(2, 62, &[(PT_LOAD, at, len)]), RAM_256M).unwrap_err();
            assert!(e.contains(needle), "{at:#x}: {e}");
        }
        // Past the hole, inside high RAM: fine.
        let ram = [
            RamRange {
                start: 0,
                size: MMIO_HOLE_START,
            },
            RamRange {
                start: HIGH_RAM_START,
                size: 1 << 30,
            },
        ];
        check(&elf(2, 62, &[(PT_LOAD, HIGH_RAM_START, 0x1000)]), &ram).unwrap();
        let e = check(
            &elf(2, 62, &[(PT_LOAD, HIGH_RAM_START + (1 << 30), 0x1000)]),
            &ram,
        )
        .unwrap_err();
        assert!(
            e.contains("beyond guest RAM (which ends at 0x140000000)"),
            "{e}"
        );
    }
}
