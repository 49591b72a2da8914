//! The PVH `hvm_start_info` handed over in `ebx`: validates it and copies what the scenarios need
//! (command line, RAM ranges of the memory map, RSDP address) into the guest's own memory, so
//! that later scenarios may overwrite low memory freely.
use crate::paging::read;

const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Longest command line kept; longer ones are truncated.
const CMDLINE_MAX: usize = 2048;
/// Most RAM (type 1) ranges kept from the memory map.
const RAM_MAX: usize = 64;
const E820_RAM: u32 = 1;
const MEMMAP_ENTRY_SIZE: u64 = 24;

// Offsets in hvm_start_info.
const OFF_MAGIC: u64 = 0;
const OFF_VERSION: u64 = 4;
const OFF_CMDLINE: u64 = 24;
const OFF_RSDP: u64 = 32;
const OFF_MEMMAP: u64 = 40;
const OFF_MEMMAP_ENTRIES: u64 = 48;

/// A RAM range from the memory map, `[start, end)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct RamRange {
    pub start: u64,
    pub end: u64,
}

/// What the guest keeps from `hvm_start_info`.
pub struct BootInfo {
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    ram: [RamRange; RAM_MAX],
    ram_len: usize,
    /// start_info version (memory map present from version 1).
    pub version: u32,
    /// RSDP address from start_info, 0 if none was given.
    pub rsdp_paddr: u64,
}

impl BootInfo {
    /// Validates and copies the start_info at physical address `addr`.
    pub fn read(addr: u64) -> Result<BootInfo, &'static str> {
        let field32 =
            |off: u64| read::<u32>(addr + off).ok_or("start_info is not in mapped memory");
        let field64 =
            |off: u64| read::<u64>(addr + off).ok_or("start_info is not in mapped memory");
        if field32(OFF_MAGIC)? != START_INFO_MAGIC {
            return Err("bad start_info magic");
        }
        let mut info = BootInfo {
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
            ram: [RamRange::default(); RAM_MAX],
            ram_len: 0,
            version: field32(OFF_VERSION)?,
            rsdp_paddr: field64(OFF_RSDP)?,
        };

        let cmdline = field64(OFF_CMDLINE)?;
        if cmdline != 0 {
            while info.cmdline_len < CMDLINE_MAX {
                let b = read::<u8>(cmdline + info.cmdline_len as u64)
                    .ok_or("cmdline is not in mapped memory")?;
                if b == 0 {
                    break;
                }
                info.cmdline[info.cmdline_len] = b;
                info.cmdline_len += 1;
            }
        }

        if info.version >= 1 {
            let memmap = field64(OFF_MEMMAP)?;
            let entries = field32(OFF_MEMMAP_ENTRIES)?;
            for i in 0..u64::from(entries) {
                let entry = memmap + i * MEMMAP_ENTRY_SIZE;
                let start = read::<u64>(entry).ok_or("memmap is not in mapped memory")?;
                let size = read::<u64>(entry + 8).ok_or("memmap is not in mapped memory")?;
                let kind = read::<u32>(entry + 16).ok_or("memmap is not in mapped memory")?;
                if kind != E820_RAM || size == 0 {
                    continue;
                }
                if info.ram_len == RAM_MAX {
                    return Err("too many RAM ranges in the memory map");
                }
                let end = start.checked_add(size).ok_or("memmap range wraps around")?;
                info.ram[info.ram_len] = RamRange { start, end };
                info.ram_len += 1;
            }
        }
        Ok(info)
    }

    /// The command line, without the terminating NUL.
    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }

    /// RAM (type 1) ranges in memory-map order.
    pub fn ram(&self) -> &[RamRange] {
        &self.ram[..self.ram_len]
    }
}
