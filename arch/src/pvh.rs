//! PVH direct boot: the `hvm_start_info` structure and the 32-bit entry CPU state.
//!
//! This module owns what the PVH boot ABI (Xen's `pvh.pandoc`, also used by Linux's
//! `CONFIG_PVH` entry and by the no_std test guest) asks of a loader: `hvm_start_info` at
//! `PVH_INFO_START` with its module list and memory map, and the flat 32-bit protected-mode CPU
//! state with `ebx` pointing at the start info. It does not load the kernel or find its PVH entry
//! note; the caller passes the entry address.
//!
//! The structures are encoded field by field (little-endian, offsets as in Xen's
//! `start_info.h`), so this module needs neither `unsafe` nor `linux-loader`.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::e820::E820Entry;
use crate::gdt;
use crate::layout::{BOOT_GDT_START, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START};
use crate::regs::{DescriptorTable, SpecialRegisters, StandardRegisters};

/// `hvm_start_info.magic` ("xEn3" with the top bit cleared).
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// `hvm_start_info.version` this module writes (version 1 adds `memmap_paddr`).
pub const HVM_START_INFO_VERSION: u32 = 1;

/// Size of `hvm_start_info`.
const START_INFO_SIZE: u64 = 56;
/// Size of one `hvm_modlist_entry`.
const MODLIST_ENTRY_SIZE: u64 = 32;
/// Size of one `hvm_memmap_table_entry`.
const MEMMAP_ENTRY_SIZE: u64 = 24;
/// The module list follows the start info, 8-byte aligned.
pub const PVH_MODLIST_START: u64 = (PVH_INFO_START + START_INFO_SIZE + 7) & !7;

const _: () = assert!(PVH_MODLIST_START + MODLIST_ENTRY_SIZE <= PVH_MEMMAP_START);

/// CR0.PE: protected mode.
const CR0_PE: u64 = 1 << 0;
/// CR0.ET: extension type; hard-wired to 1 on every CPU since the i486.
const CR0_ET: u64 = 1 << 4;
/// RFLAGS bit 1 is reserved and always reads as 1; IF, TF and VM stay clear as PVH requires.
const RFLAGS_RESERVED: u64 = 1 << 1;

/// Errors from setting up a PVH boot.
#[derive(Debug, Error)]
pub enum PvhError {
    /// The e820 map does not fit the PVH memory map area.
    #[error("PVH memory map has {count} entries; at most {max} fit at {PVH_MEMMAP_START:#x}")]
    TooManyMemmapEntries {
        /// Entries requested.
        count: usize,
        /// Entries that fit.
        max: usize,
    },
    /// Writing a boot structure to guest memory failed.
    #[error("writing the PVH {what} ({len} bytes) at guest address {addr:#x}")]
    Write {
        /// Which structure.
        what: &'static str,
        /// Guest physical address.
        addr: u64,
        /// Bytes written.
        len: usize,
        /// The guest memory error.
        #[source]
        source: GuestMemoryError,
    },
}

fn write<M: GuestMemoryBackend>(
    mem: &M,
    what: &'static str,
    addr: u64,
    bytes: &[u8],
) -> Result<(), PvhError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| PvhError::Write {
            what,
            addr,
            len: bytes.len(),
            source,
        })
}

/// Writes `hvm_start_info`, its module list and the memory map, and returns the start info's
/// guest address, which the vCPU gets in `rbx` (see `pvh_boot_regs`).
///
/// `cmdline_addr` is the NUL-terminated command line already in guest memory; `initrd` is
/// `(address, size)` of an initrd already in guest memory, passed as the single module;
/// `rsdp_addr` is the ACPI RSDP, or `None` to let the guest scan for it.
pub fn configure_pvh<M: GuestMemoryBackend>(
    mem: &M,
    cmdline_addr: u64,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
    rsdp_addr: Option<u64>,
) -> Result<u64, PvhError> {
    if e820.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(PvhError::TooManyMemmapEntries {
            count: e820.len(),
            max: PVH_MEMMAP_MAX_ENTRIES,
        });
    }

    let mut memmap = Vec::with_capacity(e820.len() * MEMMAP_ENTRY_SIZE as usize);
    for entry in e820 {
        memmap.extend_from_slice(&entry.addr.to_le_bytes());
        memmap.extend_from_slice(&entry.size.to_le_bytes());
        memmap.extend_from_slice(&entry.kind.as_u32().to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes()); // reserved
    }
    write(mem, "memory map", PVH_MEMMAP_START, &memmap)?;

    let (nr_modules, modlist_paddr) = match initrd {
        Some((addr, size)) => {
            let mut module = Vec::with_capacity(MODLIST_ENTRY_SIZE as usize);
            module.extend_from_slice(&addr.to_le_bytes());
            module.extend_from_slice(&size.to_le_bytes());
            module.extend_from_slice(&0u64.to_le_bytes()); // cmdline_paddr: none
            module.extend_from_slice(&0u64.to_le_bytes()); // reserved
            write(mem, "module list", PVH_MODLIST_START, &module)?;
            (1u32, PVH_MODLIST_START)
        }
        None => (0, 0),
    };

    let mut info = Vec::with_capacity(START_INFO_SIZE as usize);
    info.extend_from_slice(&XEN_HVM_START_MAGIC_VALUE.to_le_bytes());
    info.extend_from_slice(&HVM_START_INFO_VERSION.to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&nr_modules.to_le_bytes());
    info.extend_from_slice(&modlist_paddr.to_le_bytes());
    info.extend_from_slice(&cmdline_addr.to_le_bytes());
    info.extend_from_slice(&rsdp_addr.unwrap_or(0).to_le_bytes());
    info.extend_from_slice(&PVH_MEMMAP_START.to_le_bytes());
    // Cannot truncate: bounded by PVH_MEMMAP_MAX_ENTRIES above.
    info.extend_from_slice(&(e820.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes()); // reserved
    write(mem, "start info", PVH_INFO_START, &info)?;

    Ok(PVH_INFO_START)
}

/// General-purpose registers at the PVH entry: `rip` = the kernel's PVH entry point (from its
/// `XEN_ELFNOTE_PHYS32_ENTRY` note), `rbx` = the start info address, interrupts off.
pub fn pvh_boot_regs(entry: u64, start_info: u64) -> StandardRegisters {
    StandardRegisters {
        rip: entry,
        rbx: start_info,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    }
}

/// Writes the boot GDT (32-bit code at selector 0x10, data at 0x18, TSS at 0x08; see `gdt`) at
/// `BOOT_GDT_START`. The selectors in `pvh_boot_sregs` refer to it.
pub fn write_pvh_gdt<M: GuestMemoryBackend>(mem: &M) -> Result<(), PvhError> {
    write(mem, "boot GDT", BOOT_GDT_START, &gdt::gdt_bytes(false))
}

/// Sets the special registers for the PVH entry: 32-bit protected mode with paging off
/// (CR0 = PE | ET, CR4 = 0, EFER = 0), flat code in CS, flat data in DS/ES/FS/GS/SS, a busy TSS
/// in TR and GDTR pointing at the table `write_pvh_gdt` writes. The PVH ABI leaves the IDT to
/// the OS, so IDTR is zeroed: an exception before the kernel loads its own IDT then ends in a
/// triple fault (a shutdown exit) instead of jumping through the real-mode vector table.
/// LDTR, CR8 and the APIC base keep the values they had.
pub fn pvh_boot_sregs(sregs: &mut SpecialRegisters) {
    let data = gdt::data_segment();
    sregs.cs = gdt::code_segment(false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::tss_segment();
    sregs.gdt = gdt::gdt_register();
    sregs.idt = DescriptorTable { base: 0, limit: 0 };
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr2 = 0;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
}

// The tests read start_info back through linux-loader, a Unix-only dev-dependency.
#[cfg(test)]
#[cfg(unix)]
mod tests {
    use super::*;
    use crate::e820::{e820_map, E820Kind};
    use crate::layout::ram_ranges;
    use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
    use vm_memory::GuestMemoryMmap;

    fn guest_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    #[test]
    fn start_info_reads_back_with_the_abi_layout() {
        let mem = guest_mem();
        let e820 = e820_map(&ram_ranges(2 << 20).unwrap());
        let addr = configure_pvh(
            &mem,
            0x20000,
            Some((0x40_0000, 0x1234)),
            &e820,
            Some(0xe0000),
        )
        .unwrap();
        assert_eq!(addr, 0x6000);

        let info: hvm_start_info = mem.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.version, 1);
        assert_eq!(info.flags, 0);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, 0x6038);
        assert_eq!(info.cmdline_paddr, 0x20000);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        assert_eq!(info.memmap_paddr, 0x7000);
        assert_eq!(info.memmap_entries as usize, e820.len());

        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!(
            (module.paddr, module.size, module.cmdline_paddr),
            (0x40_0000, 0x1234, 0)
        );

        for (i, expected) in e820.iter().enumerate() {
            let at = GuestAddress(info.memmap_paddr + i as u64 * 24);
            let got: hvm_memmap_table_entry = mem.read_obj(at).unwrap();
            assert_eq!(
                (got.addr, got.size, got.type_),
                (expected.addr, expected.size, expected.kind as u32)
            );
        }
    }

    #[test]
    fn no_initrd_and_no_rsdp_leave_their_fields_zero() {
        let mem = guest_mem();
        let e820 = [E820Entry {
            addr: 0,
            size: 2 << 20,
            kind: E820Kind::Ram,
        }];
        configure_pvh(&mem, 0x20000, None, &e820, None).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(
            (info.nr_modules, info.modlist_paddr, info.rsdp_paddr),
            (0, 0, 0)
        );
        assert_eq!(info.memmap_entries, 1);
    }

    #[test]
    fn rejects_a_memory_map_that_does_not_fit() {
        let mem = guest_mem();
        let entry = E820Entry {
            addr: 0,
            size: 0x1000,
            kind: E820Kind::Ram,
        };
        let e820 = vec![entry; PVH_MEMMAP_MAX_ENTRIES + 1];
        let err = configure_pvh(&mem, 0, None, &e820, None).unwrap_err();
        assert!(
            matches!(
                err,
                PvhError::TooManyMemmapEntries {
                    count: 171,
                    max: 170
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("171"));
    }

    #[test]
    fn write_outside_guest_memory_names_the_structure() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10_0000), 0x1000)]).unwrap();
        let err = configure_pvh(&mem, 0, None, &[], None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "writing the PVH start info (56 bytes) at guest address 0x6000"
        );
    }

    #[test]
    fn boot_regs() {
        let regs = pvh_boot_regs(0x100_0000, 0x6000);
        assert_eq!((regs.rip, regs.rbx, regs.rflags), (0x100_0000, 0x6000, 0x2));
        assert_eq!(regs.rsp, 0);
    }

    #[test]
    fn boot_sregs_are_flat_protected_mode_without_paging() {
        let mut sregs = SpecialRegisters {
            cr0: 0x6000_0010,
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        pvh_boot_sregs(&mut sregs);
        assert_eq!(sregs.cr0, 0x11);
        assert_eq!((sregs.cr3, sregs.cr4, sregs.efer), (0, 0, 0));
        assert_eq!(sregs.apic_base, 0xfee0_0900);
        assert_eq!(
            (sregs.cs.selector, sregs.cs.type_, sregs.cs.db, sregs.cs.l),
            (0x10, 0xb, true, false)
        );
        assert_eq!(
            (sregs.cs.base, sregs.cs.limit, sregs.cs.g),
            (0, 0xffff_ffff, true)
        );
        for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
            assert_eq!(
                (seg.selector, seg.type_, seg.limit, seg.present),
                (0x18, 0x3, 0xffff_ffff, true)
            );
        }
        assert_eq!(
            (
                sregs.tr.selector,
                sregs.tr.type_,
                sregs.tr.limit,
                sregs.tr.s
            ),
            (0x08, 0xb, 0x67, false)
        );
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0x500, 0x1f));
    }

    #[test]
    fn gdt_in_memory_matches_the_segment_registers() {
        let mem = guest_mem();
        write_pvh_gdt(&mem).unwrap();
        let mut sregs = SpecialRegisters::default();
        pvh_boot_sregs(&mut sregs);
        for seg in [sregs.cs, sregs.ds, sregs.tr] {
            let at = GuestAddress(sregs.gdt.base + u64::from(seg.selector));
            let raw: u64 = mem.read_obj(at).unwrap();
            assert_eq!(raw, gdt::descriptor(&seg));
        }
        let cs: u64 = mem.read_obj(GuestAddress(0x510)).unwrap();
        assert_eq!(cs, 0x00cf_9b00_0000_ffff);
    }
}
