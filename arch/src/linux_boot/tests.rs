//! Unit tests for `linux_boot`: the zero page is read back through linux-loader's
//! `boot_params` definition, an independent statement of the same layout.

use super::*;
use crate::e820::{e820_map, E820Kind};
use crate::layout::ram_ranges;
use linux_loader::loader::bootparam::{boot_params, setup_header};
use vm_memory::{ByteValued, GuestMemoryMmap};

fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
}

fn kernel_header() -> setup_header {
    let mut hdr = setup_header {
        setup_sects: 27,
        version: 0x20f,
        ..Default::default()
    };
    hdr.kernel_alignment = 0x20_0000;
    hdr.initrd_addr_max = 0x7fff_ffff;
    hdr.cmdline_size = 2047;
    hdr
}

fn read_params(mem: &GuestMemoryMmap, addr: u64) -> boot_params {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

#[test]
fn zero_page_reads_back_as_boot_params() {
    let mem = guest_mem();
    let e820 = e820_map(&ram_ranges(256 << 20).unwrap());
    let hdr = kernel_header();
    let addr = configure_linux_boot(
        &mem,
        Some(hdr.as_slice()),
        0x20000,
        12,
        Some((0x0800_0000, 0x12_3456)),
        &e820,
        Some(0xe0000),
    )
    .unwrap();
    assert_eq!(addr, 0x7000);

    let params = read_params(&mem, addr);
    let h = params.hdr;
    // Copied from the kernel.
    assert_eq!({ h.setup_sects }, 27);
    assert_eq!({ h.version }, 0x20f);
    assert_eq!({ h.kernel_alignment }, 0x20_0000);
    // Set by the loader.
    assert_eq!({ h.boot_flag }, 0xaa55);
    assert_eq!({ h.header }, 0x5372_6448);
    assert_eq!({ h.type_of_loader }, 0xff);
    assert_eq!({ h.cmd_line_ptr }, 0x20000);
    assert_eq!({ h.cmdline_size }, 12);
    assert_eq!({ h.ramdisk_image }, 0x0800_0000);
    assert_eq!({ h.ramdisk_size }, 0x12_3456);
    assert_eq!({ params.ext_ramdisk_image }, 0);
    assert_eq!({ params.ext_cmd_line_ptr }, 0);
    assert_eq!({ params.acpi_rsdp_addr }, 0xe0000);
    assert_eq!(params.e820_entries as usize, e820.len());
    for (got, want) in params.e820_table.iter().zip(&e820) {
        assert_eq!(
            ({ got.addr }, { got.size }, { got.r#type }),
            (want.addr, want.size, want.kind as u32)
        );
    }
}

#[test]
fn defaults_without_a_kernel_header() {
    let mem = guest_mem();
    let e820 = [E820Entry {
        addr: 0,
        size: 2 << 20,
        kind: E820Kind::Ram,
    }];
    // No header means no kernel-stated limits: an initrd above the pre-2.03 limit is accepted.
    configure_linux_boot(
        &mem,
        None,
        0x20000,
        1,
        Some((0x4000_0000, 0x1000)),
        &e820,
        None,
    )
    .unwrap();
    let params = read_params(&mem, ZERO_PAGE_START);
    assert_eq!({ params.hdr.kernel_alignment }, 0x100_0000);
    assert_eq!({ params.hdr.boot_flag }, 0xaa55);
    assert_eq!({ params.hdr.ramdisk_image }, 0x4000_0000);
    assert_eq!({ params.acpi_rsdp_addr }, 0);
    assert_eq!(params.e820_entries, 1);
}

#[test]
fn addresses_above_4g_use_the_ext_fields() {
    let mut hdr = kernel_header();
    hdr.xloadflags = XLF_CAN_BE_LOADED_ABOVE_4G;
    let page = zero_page(
        Some(hdr.as_slice()),
        0x1_2345_6000,
        4,
        Some((0x2_0000_1000, 0x1_0000_0002)),
        &[],
        None,
    )
    .unwrap();
    let params = boot_params::from_slice(&page).copied().unwrap();
    assert_eq!(
        ({ params.hdr.cmd_line_ptr }, { params.ext_cmd_line_ptr }),
        (0x2345_6000, 1)
    );
    assert_eq!(
        ({ params.hdr.ramdisk_image }, { params.ext_ramdisk_image }),
        (0x1000, 2)
    );
    assert_eq!(
        ({ params.hdr.ramdisk_size }, { params.ext_ramdisk_size }),
        (2, 1)
    );
}

#[test]
fn rejects_an_initrd_beyond_initrd_addr_max() {
    let hdr = kernel_header();
    let err = zero_page(
        Some(hdr.as_slice()),
        0,
        1,
        Some((0x7fff_f000, 0x2000)),
        &[],
        None,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            LinuxBootError::InitrdTooHigh {
                max: 0x7fff_ffff,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "initrd at 0x7ffff000 (0x2000 bytes) ends above the kernel's initrd_addr_max 0x7fffffff"
    );
    // Ending exactly at the limit is fine.
    zero_page(
        Some(hdr.as_slice()),
        0,
        1,
        Some((0x7fff_e000, 0x2000)),
        &[],
        None,
    )
    .unwrap();
}

#[test]
fn rejects_a_cmdline_longer_than_the_kernel_accepts() {
    let hdr = kernel_header();
    zero_page(Some(hdr.as_slice()), 0, 2048, None, &[], None).unwrap();
    let err = zero_page(Some(hdr.as_slice()), 0, 2049, None, &[], None).unwrap_err();
    assert!(
        matches!(
            err,
            LinuxBootError::CmdlineTooLong {
                size: 2049,
                max: 2047
            }
        ),
        "{err}"
    );
}

#[test]
fn rejects_too_many_e820_entries_and_oversized_headers() {
    let entry = E820Entry {
        addr: 0,
        size: 0x1000,
        kind: E820Kind::Ram,
    };
    zero_page(None, 0, 1, None, &[entry; 128], None).unwrap();
    let err = zero_page(None, 0, 1, None, &[entry; 129], None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "e820 map has 129 entries; the zero page holds at most 128"
    );
    let err = zero_page(Some(&[0u8; 0x7c]), 0, 1, None, &[], None).unwrap_err();
    assert!(
        matches!(err, LinuxBootError::SetupHeaderTooLong { len: 0x7c }),
        "{err}"
    );
}

#[test]
fn setup_header_size_matches_linux_loader() {
    assert_eq!(std::mem::size_of::<setup_header>(), SETUP_HEADER_SIZE);
    assert_eq!(std::mem::size_of::<boot_params>(), ZERO_PAGE_SIZE);
}

#[test]
fn boot_regs() {
    let regs = long_mode_boot_regs(0x100_0200, 0x7000);
    assert_eq!((regs.rip, regs.rsi, regs.rflags), (0x100_0200, 0x7000, 0x2));
    assert_eq!((regs.rsp, regs.rbp), (0x8ff0, 0x8ff0));
    assert_eq!(regs.rbx, 0);
}

#[test]
fn boot_sregs_are_long_mode() {
    let mut sregs = SpecialRegisters {
        cr0: 0x6000_0010,
        apic_base: 0xfee0_0900,
        ..Default::default()
    };
    long_mode_boot_sregs(&mut sregs);
    assert_eq!(sregs.cr0, 0x8000_0011);
    assert_eq!((sregs.cr3, sregs.cr4, sregs.efer), (0x9000, 0x20, 0x500));
    assert_eq!(sregs.apic_base, 0xfee0_0900);
    assert_eq!(
        (sregs.cs.selector, sregs.cs.l, sregs.cs.db, sregs.cs.type_),
        (0x10, true, false, 0xb)
    );
    for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
        assert_eq!((seg.selector, seg.type_, seg.present), (0x18, 0x3, true));
    }
    assert_eq!(
        (sregs.tr.selector, sregs.tr.type_, sregs.tr.present),
        (0x08, 0xb, true)
    );
    assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0x500, 0x1f));
    assert_eq!((sregs.idt.base, sregs.idt.limit), (0x520, 0xf));
}

#[test]
fn tables_identity_map_the_first_gigabyte() {
    let mem = guest_mem();
    // Stale bytes where the tables go must not survive.
    mem.write_slice(&[0xffu8; 0x3000], GuestAddress(PML4_START))
        .unwrap();
    write_long_mode_tables(&mem).unwrap();

    let read = |addr: u64| -> u64 { mem.read_obj(GuestAddress(addr)).unwrap() };
    assert_eq!(read(PML4_START), 0xa003);
    assert_eq!(read(PML4_START + 8), 0);
    assert_eq!(read(PDPTE_START), 0xb003);
    assert_eq!(read(PDPTE_START + 8), 0);
    assert_eq!(read(PDE_START), 0x83);
    assert_eq!(read(PDE_START + 8), 0x20_0083);
    assert_eq!(read(PDE_START + 511 * 8), 0x3fe0_0083);

    // Walk the tables for an address in the last 2 MiB page of the first GiB.
    let va: u64 = 0x3fe1_2345;
    let pdpt = read(PML4_START + ((va >> 39) & 0x1ff) * 8) & !0xfff;
    let pd = read(pdpt + ((va >> 30) & 0x1ff) * 8) & !0xfff;
    let pde = read(pd + ((va >> 21) & 0x1ff) * 8);
    assert_ne!(pde & PDE_LARGE_PAGE, 0);
    assert_eq!((pde & !0x1f_ffff) | (va & 0x1f_ffff), va);

    let cs: u64 = read(BOOT_GDT_START + 0x10);
    assert_eq!(cs, 0x00af_9b00_0000_ffff);
    assert_eq!(read(BOOT_IDT_START), 0);
}
