//! The boot GDT shared by the PVH and the 64-bit Linux entry paths.
//!
//! This module owns the boot segment selectors, the segment register values and their encoding as
//! GDT descriptors, so that the hidden segment state a hypervisor loads and the descriptors in guest
//! memory come from the same values. Writing the table to guest memory is left to `pvh` and
//! `linux_boot`, which each report their own errors.
//!
//! Layout at `BOOT_GDT_START` (four 8-byte entries, ending exactly at `BOOT_IDT_START`):
//!
//! | selector | descriptor |
//! |---|---|
//! | 0x00 | null |
//! | 0x08 | TSS (busy, base 0, limit 0x67) |
//! | 0x10 | flat 4 GiB code: 32-bit for PVH, 64-bit (L=1) for Linux |
//! | 0x18 | flat 4 GiB read/write data |
//!
//! Code and data sit at 0x10 and 0x18 because the Linux boot protocol names them `__BOOT_CS` and
//! `__BOOT_DS`. A fifth entry would overlap the IDT at `BOOT_IDT_START`, so the TSS takes 0x08.
//! In long mode a TSS descriptor is 16 bytes and only its low half fits here; that is harmless
//! because no CPU path reads it: KVM loads TR from the hidden state, `ltr` of a busy TSS faults
//! anyway, and the kernel installs its own GDT and TR before it needs a TSS.

use crate::layout::{BOOT_GDT_START, BOOT_IDT_START};
use crate::regs::{DescriptorTable, Segment};

/// Selector of the boot TSS.
pub const BOOT_TSS_SELECTOR: u16 = 0x08;
/// Selector of the flat code segment (`__BOOT_CS` in the Linux boot protocol).
pub const BOOT_CODE_SELECTOR: u16 = 0x10;
/// Selector of the flat data segment (`__BOOT_DS` in the Linux boot protocol).
pub const BOOT_DATA_SELECTOR: u16 = 0x18;
/// Number of 8-byte entries in the boot GDT.
pub const BOOT_GDT_ENTRIES: usize = 4;

const _: () = assert!(BOOT_GDT_START + (BOOT_GDT_ENTRIES as u64) * 8 <= BOOT_IDT_START);

/// Segment type: code, execute/read, accessed.
const TYPE_CODE_EXEC_READ_ACCESSED: u8 = 0xb;
/// Segment type: data, read/write, accessed.
const TYPE_DATA_READ_WRITE_ACCESSED: u8 = 0x3;
/// System segment type: busy 32-bit TSS (in long mode: busy 64-bit TSS).
const TYPE_TSS_BUSY: u8 = 0xb;
/// Limit of a TSS without an I/O permission bitmap (104 bytes).
const TSS_LIMIT: u32 = 0x67;

/// Flat 4 GiB code segment at `BOOT_CODE_SELECTOR`; `long_mode` selects 64-bit (L=1, D=0)
/// instead of 32-bit (D=1) code.
pub fn code_segment(long_mode: bool) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: BOOT_CODE_SELECTOR,
        type_: TYPE_CODE_EXEC_READ_ACCESSED,
        present: true,
        dpl: 0,
        db: !long_mode,
        s: true,
        l: long_mode,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// Flat 4 GiB read/write data segment at `BOOT_DATA_SELECTOR`.
pub fn data_segment() -> Segment {
    Segment {
        selector: BOOT_DATA_SELECTOR,
        type_: TYPE_DATA_READ_WRITE_ACCESSED,
        db: true,
        l: false,
        ..code_segment(false)
    }
}

/// Busy TSS at `BOOT_TSS_SELECTOR`, base 0, limit 0x67, as the PVH ABI asks for TR.
pub fn tss_segment() -> Segment {
    Segment {
        base: 0,
        limit: TSS_LIMIT,
        selector: BOOT_TSS_SELECTOR,
        type_: TYPE_TSS_BUSY,
        present: true,
        dpl: 0,
        db: false,
        s: false,
        l: false,
        g: false,
        avl: false,
        unusable: false,
    }
}

/// Encodes `seg` as an 8-byte GDT descriptor. `seg.limit` is in bytes; with `g` set it is stored
/// in 4 KiB units.
pub fn descriptor(seg: &Segment) -> u64 {
    let limit = u64::from(if seg.g { seg.limit >> 12 } else { seg.limit });
    let flag = |set: bool, bit: u32| u64::from(set) << bit;
    (limit & 0xffff)
        | ((seg.base & 0xff_ffff) << 16)
        | (u64::from(seg.type_ & 0xf) << 40)
        | flag(seg.s, 44)
        | (u64::from(seg.dpl & 0x3) << 45)
        | flag(seg.present, 47)
        | (((limit >> 16) & 0xf) << 48)
        | flag(seg.avl, 52)
        | flag(seg.l, 53)
        | flag(seg.db, 54)
        | flag(seg.g, 55)
        | (((seg.base >> 24) & 0xff) << 56)
}

/// The boot GDT entries, indexed by selector / 8.
pub fn gdt_entries(long_mode: bool) -> [u64; BOOT_GDT_ENTRIES] {
    [
        0,
        descriptor(&tss_segment()),
        descriptor(&code_segment(long_mode)),
        descriptor(&data_segment()),
    ]
}

/// The boot GDT as the bytes to write at `BOOT_GDT_START`.
pub fn gdt_bytes(long_mode: bool) -> Vec<u8> {
    gdt_entries(long_mode)
        .iter()
        .flat_map(|d| d.to_le_bytes())
        .collect()
}

/// GDTR value for the boot GDT.
pub fn gdt_register() -> DescriptorTable {
    DescriptorTable {
        base: BOOT_GDT_START,
        limit: (BOOT_GDT_ENTRIES * 8 - 1) as u16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes a descriptor back into a segment, the way a CPU reads it.
    fn decode(d: u64, selector: u16) -> Segment {
        let g = d & (1 << 55) != 0;
        let raw_limit = ((d & 0xffff) | ((d >> 32) & 0xf_0000)) as u32;
        Segment {
            base: ((d >> 16) & 0xff_ffff) | ((d >> 32) & 0xff00_0000),
            limit: if g {
                (raw_limit << 12) | 0xfff
            } else {
                raw_limit
            },
            selector,
            type_: ((d >> 40) & 0xf) as u8,
            s: d & (1 << 44) != 0,
            dpl: ((d >> 45) & 3) as u8,
            present: d & (1 << 47) != 0,
            avl: d & (1 << 52) != 0,
            l: d & (1 << 53) != 0,
            db: d & (1 << 54) != 0,
            g,
            unusable: false,
        }
    }

    #[test]
    fn descriptors_have_the_well_known_encodings() {
        assert_eq!(descriptor(&code_segment(false)), 0x00cf_9b00_0000_ffff);
        assert_eq!(descriptor(&code_segment(true)), 0x00af_9b00_0000_ffff);
        assert_eq!(descriptor(&data_segment()), 0x00cf_9300_0000_ffff);
        assert_eq!(descriptor(&tss_segment()), 0x0000_8b00_0000_0067);
    }

    #[test]
    fn descriptors_decode_to_the_segment_registers() {
        for long_mode in [false, true] {
            let table = gdt_entries(long_mode);
            for seg in [code_segment(long_mode), data_segment(), tss_segment()] {
                let index = usize::from(seg.selector / 8);
                assert_eq!(decode(table[index], seg.selector), seg);
            }
        }
    }

    #[test]
    fn descriptor_encodes_base_and_dpl() {
        let seg = Segment {
            base: 0x1234_5678,
            limit: 0xabcde,
            dpl: 3,
            ..tss_segment()
        };
        let d = descriptor(&seg);
        assert_eq!(decode(d, seg.selector), seg);
        assert_eq!(d >> 56, 0x12);
    }

    #[test]
    fn gdt_fits_before_the_idt() {
        let gdtr = gdt_register();
        assert_eq!(gdtr.base, 0x500);
        assert_eq!(gdtr.limit, 0x1f);
        assert_eq!(gdt_bytes(true).len(), 32);
        assert_eq!(gdtr.base + u64::from(gdtr.limit) + 1, BOOT_IDT_START);
        assert_eq!(gdt_entries(false)[0], 0);
    }
}
