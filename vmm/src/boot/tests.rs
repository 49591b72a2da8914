//! Boot preparation tests on synthetic images: a bzImage built from a real `setup_header` and
//! a payload, loaded through the same path `skiff run` uses, with the resulting `boot_params`,
//! registers and memory read back.

use std::io::Write;

use arch::layout::{RamRange, CMDLINE_START, ZERO_PAGE_START};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::*;

const RAM: u64 = 64 << 20;
const SETUP_SECTS: u8 = 4;

fn memory() -> (TrackedGuestMemory, Vec<RamRange>) {
    let mem = TrackedGuestMemory::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    (
        mem,
        vec![RamRange {
            start: 0,
            size: RAM,
        }],
    )
}

/// A bzImage: boot sector and setup code (the header at 0x1f1), then `payload`.
fn bzimage(code32_start: u32, payload: &[u8]) -> tempfile::NamedTempFile {
    let hdr = setup_header {
        setup_sects: SETUP_SECTS,
        boot_flag: 0xaa55,
        header: 0x5372_6448,
        version: 0x020f,
        loadflags: 1,
        code32_start,
        initrd_addr_max: 0x7fff_ffff,
        kernel_alignment: 0x20_0000,
        cmdline_size: 255,
        xloadflags: 1,
        ..Default::default()
    };
    let mut image = vec![0u8; (usize::from(SETUP_SECTS) + 1) * 512];
    image[0x1f1..0x1f1 + std::mem::size_of::<setup_header>()].copy_from_slice(hdr.as_slice());
    image.extend_from_slice(payload);
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&image).unwrap();
    f
}

fn config(kernel: &std::path::Path, initrd: Option<&std::path::Path>, cmdline: &str) -> BootConfig {
    BootConfig {
        kernel: kernel.to_path_buf(),
        initrd: initrd.map(std::path::Path::to_path_buf),
        cmdline: cmdline.into(),
        cpus: 2,
    }
}

#[test]
fn bzimage_boots_through_the_64bit_protocol_with_complete_boot_params() {
    let (mem, ram) = memory();
    let payload: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let kernel = bzimage(0x10_0000, &payload);
    let mut initrd = tempfile::NamedTempFile::new().unwrap();
    initrd.write_all(&[0x5au8; 10_000]).unwrap();
    let boot = prepare_boot(
        &mem,
        &ram,
        &config(kernel.path(), Some(initrd.path()), "console=ttyS0 quiet"),
    )
    .unwrap();

    assert_eq!(boot.protocol, BootProtocol::Linux64);
    assert_eq!(
        boot.regs.rip, 0x10_0200,
        "64-bit entry is load address + 0x200"
    );
    assert_eq!(boot.regs.rsi, ZERO_PAGE_START);

    // The protected-mode payload sits at code32_start.
    let mut back = vec![0u8; payload.len()];
    mem.read_slice(&mut back, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(back, payload);

    let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
    let hdr = params.hdr;
    assert_eq!({ hdr.type_of_loader }, 0xff);
    assert_eq!({ hdr.boot_flag }, 0xaa55);
    assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
    assert_eq!({ hdr.cmdline_size }, "console=ttyS0 quiet".len() as u32 + 1);
    let (rd, rd_size) = ({ hdr.ramdisk_image }, { hdr.ramdisk_size });
    assert_eq!(rd_size, 10_000);
    assert_eq!(u64::from(rd) % 4096, 0);
    assert!(u64::from(rd) + 10_000 <= RAM && u64::from(rd) >= 0x10_0000 + payload.len() as u64);
    let mut rd_back = vec![0u8; 10_000];
    mem.read_slice(&mut rd_back, GuestAddress(u64::from(rd)))
        .unwrap();
    assert!(rd_back.iter().all(|&b| b == 0x5a));
    assert_eq!({ params.acpi_rsdp_addr }, arch::layout::ACPI_START);
    let entries = params.e820_entries as usize;
    let e820: Vec<(u64, u64, u32)> = params.e820_table[..entries]
        .iter()
        .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
        .collect();
    assert_eq!(e820[0], (0, arch::layout::EBDA_START, 1));
    assert!(e820.contains(&(0x10_0000, RAM - 0x10_0000, 1)), "{e820:x?}");

    let mut cmdline = [0u8; 20];
    mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_START))
        .unwrap();
    assert_eq!(&cmdline, b"console=ttyS0 quiet\0");

    let mut sregs = arch::regs::SpecialRegisters::default();
    boot.apply_sregs(&mut sregs);
    assert_ne!(sregs.efer & (1 << 10), 0, "long mode active");
    assert_ne!(sregs.cr0 & (1 << 31), 0, "paging on");
}

#[test]
fn bzimage_command_line_longer_than_the_kernel_accepts_is_refused() {
    let (mem, ram) = memory();
    let kernel = bzimage(0x10_0000, &[0u8; 4096]);
    let long = "x".repeat(300);
    let e = prepare_boot(&mem, &ram, &config(kernel.path(), None, &long)).unwrap_err();
    assert!(e.to_string().contains("300 bytes"), "{e}");
}

#[test]
fn bzimage_loading_below_1mib_is_refused() {
    let (mem, ram) = memory();
    let kernel = bzimage(0x8_0000, &[0u8; 4096]);
    let e = prepare_boot(&mem, &ram, &config(kernel.path(), None, "")).unwrap_err();
    assert!(e.to_string().contains("cannot load bzImage"), "{e}");
}

#[test]
fn bzimage_larger_than_ram_is_refused() {
    let (mem, ram) = memory();
    let kernel = bzimage(0x10_0000, &vec![0u8; RAM as usize]);
    let e = prepare_boot(&mem, &ram, &config(kernel.path(), None, "")).unwrap_err();
    assert!(e.to_string().contains("cannot load bzImage"), "{e}");
}

#[test]
fn bzimage_without_loaded_high_flag_is_refused() {
    let (mem, ram) = memory();
    let kernel = bzimage(0x10_0000, &[0u8; 4096]);
    let mut bytes = std::fs::read(kernel.path()).unwrap();
    let loadflags = 0x1f1 + std::mem::offset_of!(setup_header, loadflags);
    bytes[loadflags] = 0;
    std::fs::write(kernel.path(), &bytes).unwrap();
    let e = prepare_boot(&mem, &ram, &config(kernel.path(), None, "")).unwrap_err();
    assert!(e.to_string().contains("cannot load bzImage"), "{e}");
}
