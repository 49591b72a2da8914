//! The Linux x86 64-bit boot protocol: bzImage kernels, or an ELF vmlinux given no setup header.
//!
//! This module owns the zero page (`struct boot_params`) at `ZERO_PAGE_START` and the CPU state
//! the 64-bit entry expects: long mode with identity page tables for the first 1 GiB, the boot GDT
//! (`__BOOT_CS` = 0x10, `__BOOT_DS` = 0x18, see `gdt`), an empty IDT, `rsi` pointing at the zero
//! page. It does not parse or load the bzImage; the caller passes the kernel's setup header and
//! the entry address.
//!
//! The zero page is built as bytes at the offsets of `Documentation/arch/x86/boot.rst` and
//! `zero-page.rst`, so this module needs neither `unsafe` nor `linux-loader` (which cannot build
//! for Windows targets).

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::e820::E820Entry;
use crate::gdt;
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PAGE_SIZE, PDE_START, PDPTE_START,
    PML4_START, ZERO_PAGE_START,
};
use crate::regs::{DescriptorTable, SpecialRegisters, StandardRegisters};

/// Size of `struct boot_params`.
pub const ZERO_PAGE_SIZE: usize = 4096;
/// Offset of the setup header in the zero page (and in the bzImage file).
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// Size of the setup header up to boot protocol 2.15 (`0x1f1..0x26c`).
pub const SETUP_HEADER_SIZE: usize = 0x7b;
/// Most e820 entries the zero page holds.
pub const E820_MAX_ENTRIES_ZEROPAGE: usize = 128;

/// `boot_flag` value.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` value: "HdrS".
const HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: a boot loader without an assigned ID.
const LOADER_UNDEFINED: u8 = 0xff;
/// `kernel_alignment` used when the header leaves it 0.
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// `xloadflags` bit: kernel, boot_params, cmdline and ramdisk may live above 4 GiB.
const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;
/// Highest initrd address before protocol 2.03 introduced `initrd_addr_max`.
const LEGACY_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

// Zero page offsets (zero-page.rst).
const ACPI_RSDP_ADDR: usize = 0x070;
const EXT_RAMDISK_IMAGE: usize = 0x0c0;
const EXT_RAMDISK_SIZE: usize = 0x0c4;
const EXT_CMD_LINE_PTR: usize = 0x0c8;
const E820_ENTRIES: usize = 0x1e8;
const E820_TABLE: usize = 0x2d0;
const E820_ENTRY_SIZE: usize = 20;
// Setup header offsets (boot.rst), relative to the zero page.
const BOOT_FLAG: usize = 0x1fe;
const HEADER: usize = 0x202;
const VERSION: usize = 0x206;
const TYPE_OF_LOADER: usize = 0x210;
const RAMDISK_IMAGE: usize = 0x218;
const RAMDISK_SIZE: usize = 0x21c;
const CMD_LINE_PTR: usize = 0x228;
const INITRD_ADDR_MAX: usize = 0x22c;
const KERNEL_ALIGNMENT: usize = 0x230;
const XLOADFLAGS: usize = 0x236;
const CMDLINE_SIZE: usize = 0x238;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always reads as 1; IF stays clear as the protocol requires.
const RFLAGS_RESERVED: u64 = 1 << 1;

/// Page-table entry bits: present, writable, and (in a PDE) a 2 MiB page.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PDE_LARGE_PAGE: u64 = 1 << 7;
const ENTRIES_PER_TABLE: u64 = 512;
/// The empty boot IDT: one not-present 16-byte gate.
const BOOT_IDT_SIZE: usize = 16;

/// Errors from setting up a 64-bit Linux boot.
#[derive(Debug, Error)]
pub enum LinuxBootError {
    /// The e820 map does not fit the zero page.
    #[error(
        "e820 map has {count} entries; the zero page holds at most {E820_MAX_ENTRIES_ZEROPAGE}"
    )]
    TooManyE820Entries {
        /// Entries requested.
        count: usize,
    },
    /// The setup header passed in is longer than the zero page's header field.
    #[error("setup header is {len} bytes; the zero page holds at most {SETUP_HEADER_SIZE}")]
    SetupHeaderTooLong {
        /// Bytes passed.
        len: usize,
    },
    /// The command line is longer than the kernel accepts.
    #[error("command line of {size} bytes (with NUL) exceeds the kernel's limit of {max} bytes")]
    CmdlineTooLong {
        /// Command line size passed, including the NUL.
        size: usize,
        /// The kernel's `cmdline_size`, which excludes the NUL.
        max: u32,
    },
    /// The initrd ends above the highest address the kernel can reach it at.
    #[error(
        "initrd at {addr:#x} ({size:#x} bytes) ends above the kernel's initrd_addr_max {max:#x}"
    )]
    InitrdTooHigh {
        /// Initrd start.
        addr: u64,
        /// Initrd size.
        size: u64,
        /// Highest address the kernel accepts for the last initrd byte.
        max: u64,
    },
    /// Writing a boot structure to guest memory failed.
    #[error("writing the {what} ({len} bytes) at guest address {addr:#x}")]
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
) -> Result<(), LinuxBootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| LinuxBootError::Write {
            what,
            addr,
            len: bytes.len(),
            source,
        })
}

fn put(page: &mut [u8], offset: usize, bytes: &[u8]) {
    page[offset..offset + bytes.len()].copy_from_slice(bytes);
}

fn get_u16(page: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes([page[offset], page[offset + 1]])
}

fn get_u32(page: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes([
        page[offset],
        page[offset + 1],
        page[offset + 2],
        page[offset + 3],
    ])
}

/// Splits a 64-bit address into the low field and the `ext_*` high field.
fn split(value: u64) -> ([u8; 4], [u8; 4]) {
    (
        (value as u32).to_le_bytes(),
        ((value >> 32) as u32).to_le_bytes(),
    )
}

/// Builds the zero page at `ZERO_PAGE_START` and returns its address, which the vCPU gets in
/// `rsi` (see `long_mode_boot_regs`).
///
/// `setup_header` is the kernel's setup header as it appears in the bzImage from offset 0x1f1
/// (with linux-loader: `ByteValued::as_slice()` of `KernelLoaderResult::setup_header`), or `None`
/// for a zeroed header. `cmdline_size` includes the terminating NUL. `initrd` is
/// `(address, size)` of an initrd already in guest memory. `rsdp_addr` goes into
/// `acpi_rsdp_addr` (0 lets the kernel scan for the RSDP).
pub fn configure_linux_boot<M: GuestMemoryBackend>(
    mem: &M,
    setup_header: Option<&[u8]>,
    cmdline_addr: u64,
    cmdline_size: usize,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
    rsdp_addr: Option<u64>,
) -> Result<u64, LinuxBootError> {
    let page = zero_page(
        setup_header,
        cmdline_addr,
        cmdline_size,
        initrd,
        e820,
        rsdp_addr,
    )?;
    write(mem, "zero page", ZERO_PAGE_START, &page)?;
    Ok(ZERO_PAGE_START)
}

fn zero_page(
    setup_header: Option<&[u8]>,
    cmdline_addr: u64,
    cmdline_size: usize,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
    rsdp_addr: Option<u64>,
) -> Result<Vec<u8>, LinuxBootError> {
    if e820.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(LinuxBootError::TooManyE820Entries { count: e820.len() });
    }
    let mut page = vec![0u8; ZERO_PAGE_SIZE];
    if let Some(header) = setup_header {
        if header.len() > SETUP_HEADER_SIZE {
            return Err(LinuxBootError::SetupHeaderTooLong { len: header.len() });
        }
        put(&mut page, SETUP_HEADER_OFFSET, header);
        // Without a header (a vmlinux booted through the zero page) there are no limits to check.
        check_kernel_limits(&page, cmdline_size, initrd)?;
    }

    if let Some((addr, size)) = initrd {
        let (image_lo, image_hi) = split(addr);
        let (size_lo, size_hi) = split(size);
        put(&mut page, RAMDISK_IMAGE, &image_lo);
        put(&mut page, EXT_RAMDISK_IMAGE, &image_hi);
        put(&mut page, RAMDISK_SIZE, &size_lo);
        put(&mut page, EXT_RAMDISK_SIZE, &size_hi);
    }

    put(&mut page, BOOT_FLAG, &BOOT_FLAG_MAGIC.to_le_bytes());
    put(&mut page, HEADER, &HDR_MAGIC.to_le_bytes());
    page[TYPE_OF_LOADER] = LOADER_UNDEFINED;
    if get_u32(&page, KERNEL_ALIGNMENT) == 0 {
        put(
            &mut page,
            KERNEL_ALIGNMENT,
            &DEFAULT_KERNEL_ALIGNMENT.to_le_bytes(),
        );
    }
    let (cmdline_lo, cmdline_hi) = split(cmdline_addr);
    put(&mut page, CMD_LINE_PTR, &cmdline_lo);
    put(&mut page, EXT_CMD_LINE_PTR, &cmdline_hi);
    // Mirrors what the loader actually passed; the kernel itself reads up to the NUL.
    put(
        &mut page,
        CMDLINE_SIZE,
        &u32::try_from(cmdline_size)
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    put(
        &mut page,
        ACPI_RSDP_ADDR,
        &rsdp_addr.unwrap_or(0).to_le_bytes(),
    );

    // Cannot truncate: bounded by E820_MAX_ENTRIES_ZEROPAGE above.
    page[E820_ENTRIES] = e820.len() as u8;
    for (i, entry) in e820.iter().enumerate() {
        let at = E820_TABLE + i * E820_ENTRY_SIZE;
        put(&mut page, at, &entry.addr.to_le_bytes());
        put(&mut page, at + 8, &entry.size.to_le_bytes());
        put(&mut page, at + 16, &entry.kind.as_u32().to_le_bytes());
    }
    Ok(page)
}

/// Checks the command line and initrd against the limits the kernel's setup header states.
fn check_kernel_limits(
    page: &[u8],
    cmdline_size: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), LinuxBootError> {
    let version = get_u16(page, VERSION);
    // The kernel advertises its command-line limit (excluding the NUL) from protocol 2.06 on.
    let max_cmdline = get_u32(page, CMDLINE_SIZE);
    if version >= 0x206 && max_cmdline != 0 && cmdline_size > max_cmdline as usize + 1 {
        return Err(LinuxBootError::CmdlineTooLong {
            size: cmdline_size,
            max: max_cmdline,
        });
    }
    if let Some((addr, size)) = initrd {
        let max = if get_u16(page, XLOADFLAGS) & XLF_CAN_BE_LOADED_ABOVE_4G != 0 {
            u64::MAX
        } else if version >= 0x203 {
            u64::from(get_u32(page, INITRD_ADDR_MAX))
        } else {
            LEGACY_INITRD_ADDR_MAX
        };
        let last = addr.checked_add(size.saturating_sub(1));
        if last.is_none_or(|last| last > max) {
            return Err(LinuxBootError::InitrdTooHigh { addr, size, max });
        }
    }
    Ok(())
}

/// General-purpose registers at the 64-bit entry: `rip` = the 64-bit entry point (the address
/// the protected-mode kernel was loaded at plus 0x200), `rsi` = the zero page, a stack at
/// `BOOT_STACK_POINTER`, interrupts off.
pub fn long_mode_boot_regs(entry: u64, boot_params: u64) -> StandardRegisters {
    StandardRegisters {
        rip: entry,
        rsi: boot_params,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    }
}

/// Writes the boot GDT at `BOOT_GDT_START`, the empty IDT at `BOOT_IDT_START` and identity page
/// tables at `PML4_START`, `PDPTE_START` and `PDE_START` mapping the first 1 GiB with 2 MiB
/// pages. The tables are written as whole pages, so stale contents cannot leak into them.
pub fn write_long_mode_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), LinuxBootError> {
    write(mem, "boot GDT", BOOT_GDT_START, &gdt::gdt_bytes(true))?;
    write(mem, "boot IDT", BOOT_IDT_START, &[0u8; BOOT_IDT_SIZE])?;
    let (pml4, pdpt, pd) = identity_page_tables();
    write(mem, "PML4", PML4_START, &pml4)?;
    write(mem, "page-directory-pointer table", PDPTE_START, &pdpt)?;
    write(mem, "page directory", PDE_START, &pd)
}

/// The three page-table pages: PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] -> 2 MiB page i.
fn identity_page_tables() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let table = |entries: &mut dyn Iterator<Item = u64>| {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for (slot, entry) in page.chunks_exact_mut(8).zip(entries) {
            slot.copy_from_slice(&entry.to_le_bytes());
        }
        page
    };
    let pml4 = table(&mut std::iter::once(
        PDPTE_START | PTE_PRESENT | PTE_WRITABLE,
    ));
    let pdpt = table(&mut std::iter::once(PDE_START | PTE_PRESENT | PTE_WRITABLE));
    let pd = table(
        &mut (0..ENTRIES_PER_TABLE)
            .map(|i| (i << 21) | PTE_PRESENT | PTE_WRITABLE | PDE_LARGE_PAGE),
    );
    (pml4, pdpt, pd)
}

/// Sets the special registers for the 64-bit entry: CR0 = PE | ET | PG, CR3 = `PML4_START`,
/// CR4 = PAE, EFER = LME | LMA, 64-bit code in CS, flat data in DS/ES/FS/GS/SS, a busy TSS in
/// TR, and GDTR/IDTR pointing at what `write_long_mode_tables` writes. LDTR, CR8 and the APIC
/// base keep the values they had.
pub fn long_mode_boot_sregs(sregs: &mut SpecialRegisters) {
    let data = gdt::data_segment();
    sregs.cs = gdt::code_segment(true);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::tss_segment();
    sregs.gdt = gdt::gdt_register();
    sregs.idt = DescriptorTable {
        base: BOOT_IDT_START,
        limit: (BOOT_IDT_SIZE - 1) as u16,
    };
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.cr2 = 0;
    sregs.cr3 = PML4_START;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
}

// The tests read boot_params back through linux-loader, a Unix-only dev-dependency.
#[cfg(test)]
#[cfg(unix)]
mod tests;
