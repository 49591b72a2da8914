//! The e820 memory map skiff reports to the guest.
//!
//! This module owns the translation from guest RAM ranges (`layout::ram_ranges`) to the e820 table
//! both boot protocols hand to the kernel (the PVH memmap and the zero page's `e820_table`). It
//! does not write anything to guest memory; the boot modules encode the entries in their own
//! formats.

use crate::layout::{RamRange, EBDA_START, HIGH_MEMORY_START, PCI_ECAM_SIZE, PCI_ECAM_START};

/// The kind of an e820 range, with the values the e820 and PVH tables use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: the kernel must not use it as RAM.
    Reserved = 2,
    /// ACPI reclaimable memory.
    Acpi = 3,
}

impl E820Kind {
    /// The numeric type the e820 and PVH memory-map tables store.
    pub fn as_u32(self) -> u32 {
        self as u32
    }
}

/// One e820 range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Guest physical start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Kind,
}

impl E820Entry {
    /// One past the last byte of the range.
    pub fn end(&self) -> u64 {
        self.addr + self.size
    }
}

/// Builds the e820 map for guest RAM laid out by `layout::ram_ranges`.
///
/// The range starting at 0 is split around the legacy area: RAM below `EBDA_START`, reserved from
/// there to `HIGH_MEMORY_START` (EBDA, VGA hole, BIOS area and the ACPI tables at `ACPI_START`),
/// RAM above. Every other range is reported as RAM. The PCI ECAM area is reserved: Linux only
/// trusts an MCFG region that e820 (or ACPI `_CRS`) also reserves, and may otherwise refuse
/// MMCONFIG. The result is sorted by address and has no overlaps.
pub fn e820_map(ram: &[RamRange]) -> Vec<E820Entry> {
    let mut map = Vec::with_capacity(ram.len() + 3);
    for range in ram.iter().filter(|r| r.size > 0) {
        if range.start != 0 {
            map.push(entry(range.start, range.end(), E820Kind::Ram));
            continue;
        }
        map.push(entry(0, range.end().min(EBDA_START), E820Kind::Ram));
        map.push(entry(EBDA_START, HIGH_MEMORY_START, E820Kind::Reserved));
        if range.end() > HIGH_MEMORY_START {
            map.push(entry(HIGH_MEMORY_START, range.end(), E820Kind::Ram));
        }
    }
    map.push(entry(
        PCI_ECAM_START,
        PCI_ECAM_START + PCI_ECAM_SIZE,
        E820Kind::Reserved,
    ));
    map.sort_by_key(|e| e.addr);
    map
}

fn entry(start: u64, end: u64, kind: E820Kind) -> E820Entry {
    E820Entry {
        addr: start,
        size: end - start,
        kind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{ram_ranges, HIGH_RAM_START, MMIO_HOLE_START};

    fn assert_sorted_disjoint(map: &[E820Entry]) {
        for pair in map.windows(2) {
            assert!(
                pair[0].end() <= pair[1].addr,
                "{:x?} overlaps {:x?}",
                pair[0],
                pair[1]
            );
        }
        assert!(map.iter().all(|e| e.size > 0));
    }

    #[test]
    fn small_guest_map() {
        let map = e820_map(&ram_ranges(256 << 20).unwrap());
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820Kind::Ram
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x100000 - 0x9fc00,
                    kind: E820Kind::Reserved
                },
                E820Entry {
                    addr: 0x100000,
                    size: (256 << 20) - 0x100000,
                    kind: E820Kind::Ram
                },
                E820Entry {
                    addr: 0xe000_0000,
                    size: 0x10_0000,
                    kind: E820Kind::Reserved
                },
            ]
        );
        assert_sorted_disjoint(&map);
    }

    #[test]
    fn large_guest_map_has_ram_above_4g_after_the_ecam_reservation() {
        let size = 6u64 << 30;
        let map = e820_map(&ram_ranges(size).unwrap());
        assert_eq!(map.len(), 5);
        assert_eq!(
            map[2],
            E820Entry {
                addr: 0x100000,
                size: MMIO_HOLE_START - 0x100000,
                kind: E820Kind::Ram
            }
        );
        assert_eq!(map[3].kind, E820Kind::Reserved);
        assert_eq!(map[3].addr, PCI_ECAM_START);
        assert_eq!(
            map[4],
            E820Entry {
                addr: HIGH_RAM_START,
                size: size - MMIO_HOLE_START,
                kind: E820Kind::Ram
            }
        );
        assert_sorted_disjoint(&map);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum();
        // All RAM is reported except the legacy hole between the EBDA and 1 MiB.
        assert_eq!(ram, size - (HIGH_MEMORY_START - EBDA_START));
    }

    #[test]
    fn kinds_have_e820_numbers() {
        assert_eq!(E820Kind::Ram.as_u32(), 1);
        assert_eq!(E820Kind::Reserved.as_u32(), 2);
        assert_eq!(E820Kind::Acpi.as_u32(), 3);
    }

    #[test]
    fn acpi_tables_lie_in_the_reserved_legacy_range() {
        let map = e820_map(&ram_ranges(64 << 20).unwrap());
        let acpi = crate::layout::ACPI_START..crate::layout::ACPI_START + crate::layout::ACPI_SIZE;
        let covering = map
            .iter()
            .find(|e| e.addr <= acpi.start && acpi.end <= e.end())
            .unwrap();
        assert_eq!(covering.kind, E820Kind::Reserved);
    }
}
