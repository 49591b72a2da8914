//! The guest physical memory map skiff gives every x86_64 guest.
//!
//! RAM starts at 0 and is split around the 32-bit MMIO hole (`MMIO_HOLE_START..4 GiB`), which holds
//! the 32-bit PCI window, the PCI ECAM area, the IOAPIC and the local APIC. RAM above the hole
//! resumes at 4 GiB. Low memory below 1 MiB holds the boot structures at fixed addresses listed
//! here. This module owns the addresses; it does not write anything.

use thiserror::Error;

/// The guest page size skiff maps and validates against.
pub const PAGE_SIZE: u64 = 0x1000;

/// Start of the real-mode IVT/BDA area the boot GDT follows.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty; the kernel installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map table (`hvm_memmap_table_entry` array).
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Maximum number of PVH memory map entries that fit before `BOOT_STACK_POINTER`'s page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 0x1000 / 24;
/// Linux `boot_params` ("zero page") for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the 64-bit boot protocol: PML4, PDPT, PD (first 1 GiB, 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line skiff accepts, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 0x1000;
/// Start of the extended BIOS data area; e820 reports RAM below it and reserved above it.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (the RSDP must lie in 0xE0000..0x100000 so that a scanning guest finds it).
pub const ACPI_START: u64 = 0xe0000;
/// Bytes reserved for ACPI tables.
pub const ACPI_SIZE: u64 = 0x20000;
/// First byte above the legacy area: RAM from here up is usable by the kernel.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// I/O ports of the ACPI power-management registers the FADT describes: sleep control at
/// `ACPI_PM_PORT`, sleep status at +1, reset at +2.
pub const ACPI_PM_PORT: u64 = 0x600;
/// Number of ACPI power-management ports.
pub const ACPI_PM_PORT_LEN: u64 = 3;

/// Start of the 32-bit MMIO hole. RAM above this address moves to `HIGH_RAM_START`.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// 32-bit PCI MMIO window (BARs below 4 GiB).
pub const PCI_MMIO32_START: u64 = MMIO_HOLE_START;
/// Size of the 32-bit PCI MMIO window.
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express ECAM (MMCONFIG) area: bus 0 only (1 MiB), the one bus skiff's devices sit on.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// Size of the ECAM area. The MCFG's end bus follows from it, and Linux takes that as the last
/// bus to probe: with 256 buses declared, its peer-host-bridge scan reads the vendor ID of every
/// slot of every bus through the legacy ports, about 16,400 exits to the VMM on each boot for
/// buses that cannot hold a device.
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// End of the MMIO hole; RAM resumes here.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

/// Largest guest RAM skiff lays out (1 TiB): keeps every guest physical address within 41 bits,
/// which every x86_64 host KVM supports.
pub const MAX_RAM_SIZE: u64 = 1 << 40;

/// 64-bit PCI MMIO window (64-bit BARs), above the highest RAM address any guest can have
/// (`HIGH_RAM_START + MAX_RAM_SIZE - MMIO_HOLE_START`) and ending at 2 TiB, within 41 bits.
pub const PCI_MMIO64_START: u64 = 0x180_0000_0000;
/// Size of the 64-bit PCI MMIO window (512 GiB).
pub const PCI_MMIO64_SIZE: u64 = 0x80_0000_0000;
/// Legacy PCI configuration mechanism #1: address register at 0xCF8, data at 0xCFC..0xD00.
pub const PCI_CONFIG_IO_PORT: u64 = 0xcf8;
/// Ports the configuration mechanism decodes.
pub const PCI_CONFIG_IO_PORT_LEN: u64 = 8;

/// Smallest guest RAM that can hold the boot structures and a kernel.
pub const MIN_RAM_SIZE: u64 = 2 << 20;

/// Errors from laying out guest RAM.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    /// The requested RAM size is below the minimum.
    #[error("guest memory size {0:#x} is below the minimum of {MIN_RAM_SIZE:#x} bytes")]
    TooSmall(u64),
    /// The requested RAM size is above the maximum.
    #[error("guest memory size {0:#x} exceeds the maximum of {MAX_RAM_SIZE:#x} bytes")]
    TooLarge(u64),
}

/// One contiguous range of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Guest physical start address.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
}

impl RamRange {
    /// One past the last byte of the range.
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// Splits `size` bytes of RAM around the MMIO hole: at most two ranges, low (from 0) and high
/// (from 4 GiB).
pub fn ram_ranges(size: u64) -> Result<Vec<RamRange>, LayoutError> {
    if size < MIN_RAM_SIZE {
        return Err(LayoutError::TooSmall(size));
    }
    if size > MAX_RAM_SIZE {
        return Err(LayoutError::TooLarge(size));
    }
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![RamRange {
        start: 0,
        size: low,
    }];
    if size > low {
        ranges.push(RamRange {
            start: HIGH_RAM_START,
            size: size - low,
        });
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_low_range() {
        let r = ram_ranges(256 << 20).unwrap();
        assert_eq!(
            r,
            vec![RamRange {
                start: 0,
                size: 256 << 20
            }]
        );
    }

    #[test]
    fn guest_filling_low_memory_exactly_has_no_high_range() {
        let r = ram_ranges(MMIO_HOLE_START).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].end(), MMIO_HOLE_START);
    }

    #[test]
    fn large_guest_splits_around_the_hole() {
        let r = ram_ranges(5 << 30).unwrap();
        assert_eq!(
            r,
            vec![
                RamRange {
                    start: 0,
                    size: MMIO_HOLE_START
                },
                RamRange {
                    start: HIGH_RAM_START,
                    size: (5 << 30) - MMIO_HOLE_START
                },
            ]
        );
        for a in [IOAPIC_START, LAPIC_START] {
            assert!(r[1].start >= a);
        }
    }

    #[test]
    fn rejects_too_small_and_too_large() {
        assert_eq!(ram_ranges(0), Err(LayoutError::TooSmall(0)));
        assert_eq!(
            ram_ranges(MAX_RAM_SIZE + 1),
            Err(LayoutError::TooLarge(MAX_RAM_SIZE + 1))
        );
    }

    #[test]
    fn mmio_devices_sit_inside_the_hole() {
        for a in [PCI_MMIO32_START, PCI_ECAM_START, IOAPIC_START, LAPIC_START] {
            assert!((MMIO_HOLE_START..HIGH_RAM_START).contains(&a));
        }
        const { assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCI_ECAM_START) };
        const { assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START) };
        const { assert!(HIGH_RAM_START + MAX_RAM_SIZE - MMIO_HOLE_START <= PCI_MMIO64_START) };
        const { assert!(PCI_MMIO64_START + PCI_MMIO64_SIZE <= 1 << 41) };
    }
}
