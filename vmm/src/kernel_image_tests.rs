use super::*;
use vm_memory::GuestMemoryMmap;

const MIB: u64 = 1 << 20;

fn ram() -> Vec<RamRange> {
    vec![RamRange {
        start: 0,
        size: 32 * MIB,
    }]
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap()
}

/// One note: name, type, descriptor (padded to 4 bytes each).
fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
    let mut n = Vec::new();
    n.extend_from_slice(&(name.len() as u32).to_le_bytes());
    n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    n.extend_from_slice(&kind.to_le_bytes());
    for part in [name, desc] {
        n.extend_from_slice(part);
        n.resize(n.len().next_multiple_of(4), 0);
    }
    n
}

/// An x86-64 ELF: `(type, paddr, file bytes, memsz)` segments, their bytes after the table.
fn elf(entry: u64, segments: &[(u32, u64, Vec<u8>, u64)]) -> Vec<u8> {
    let table_end = EHDR_SIZE + segments.len() * PHDR_SIZE;
    let mut b = vec![0u8; table_end];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = ELFCLASS64;
    b[5] = ELFDATA2LSB;
    b[6] = 1;
    b[16..18].copy_from_slice(&2u16.to_le_bytes());
    b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    b[24..32].copy_from_slice(&entry.to_le_bytes());
    b[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
    b[52..54].copy_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
    b[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    b[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
    for (i, (kind, paddr, data, memsz)) in segments.iter().enumerate() {
        let offset = b.len() as u64;
        let p = EHDR_SIZE + i * PHDR_SIZE;
        b[p..p + 4].copy_from_slice(&kind.to_le_bytes());
        b[p + 8..p + 16].copy_from_slice(&offset.to_le_bytes());
        b[p + 16..p + 24].copy_from_slice(&paddr.to_le_bytes());
        b[p + 24..p + 32].copy_from_slice(&paddr.to_le_bytes());
        b[p + 32..p + 40].copy_from_slice(&(data.len() as u64).to_le_bytes());
        b[p + 40..p + 48].copy_from_slice(&memsz.to_le_bytes());
        b.extend_from_slice(data);
    }
    b
}

/// A PVH ELF: two loaded segments, a note segment with an unrelated note before the PVH one.
pub(crate) fn pvh_elf() -> Vec<u8> {
    let mut notes = note(b"GNU\0", 3, &[1, 2, 3, 4, 5]);
    notes.extend(note(
        b"Xen\0",
        XEN_ELFNOTE_PHYS32_ENTRY,
        &0x10_0040u32.to_le_bytes(),
    ));
    elf(
        0x20_0000,
        &[
            (PT_LOAD, MIB, (0..=255).cycle().take(5000).collect(), 0x2000),
            (PT_NOTE, 0, notes, 0),
            (PT_LOAD, 3 * MIB, vec![0xab; 100], 0x8000),
        ],
    )
}

/// A bzImage: `setup_sects` sectors of setup, then `payload`, loaded at `code32_start`.
pub(crate) fn bzimage(setup_sects: u8, version: u16, loadflags: u8, payload: &[u8]) -> Vec<u8> {
    let sects = if setup_sects == 0 {
        4
    } else {
        usize::from(setup_sects)
    };
    let mut b = vec![0u8; (sects + 1) * 512];
    b[0x1f1] = setup_sects;
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&version.to_le_bytes());
    b[0x211] = loadflags;
    b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    b[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
    b.extend_from_slice(payload);
    b
}

fn read(mem: &GuestMemoryMmap, address: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    mem.read_slice(&mut out, GuestAddress(address)).unwrap();
    out
}

#[test]
fn a_pvh_elf_lands_at_its_physical_addresses_with_its_note_s_entry() {
    let mem = mem();
    let loaded = load_image(&mem, &ram(), &pvh_elf()).unwrap();
    assert_eq!(loaded.entry, ImageEntry::Pvh(0x10_0040));
    assert_eq!(loaded.end, 3 * MIB + 0x8000);
    let first: Vec<u8> = (0..=255).cycle().take(5000).collect();
    assert_eq!(read(&mem, MIB, 5000), first);
    assert_eq!(read(&mem, 3 * MIB, 100), vec![0xab; 100]);
}

#[test]
fn an_elf_without_the_pvh_note_is_entered_at_e_entry() {
    let image = elf(0x20_0000, &[(PT_LOAD, 2 * MIB, vec![1; 16], 16)]);
    let loaded = load_image(&mem(), &ram(), &image).unwrap();
    assert_eq!(
        loaded.entry,
        ImageEntry::Linux64 {
            entry: 0x20_0000,
            setup_header: None
        }
    );
    assert_eq!(loaded.end, 2 * MIB + 16);
}

#[test]
fn a_bzimage_s_protected_mode_part_loads_at_code32_start() {
    let mem = mem();
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let image = bzimage(0, 0x20f, 1, &payload);
    let loaded = load_image(&mem, &ram(), &image).unwrap();
    let ImageEntry::Linux64 {
        entry,
        setup_header: Some(header),
    } = loaded.entry
    else {
        panic!("{:?}", loaded.entry);
    };
    assert_eq!(entry, MIB + 0x200);
    assert_eq!(header, image[0x1f1..0x1f1 + 0x7b]);
    assert_eq!(loaded.end, MIB + 3000);
    assert_eq!(read(&mem, MIB, 3000), payload);
}

#[test]
fn bad_images_are_refused_with_their_values() {
    let ram = ram();
    let err = |image: &[u8]| load_image(&mem(), &ram, image).unwrap_err().to_string();
    assert_eq!(
        err(b""),
        "not an ELF or bzImage (first bytes none: the file is empty)"
    );
    assert_eq!(
        err(b"#!/bin/sh\necho"),
        "not an ELF or bzImage (first bytes 23 21 2f 62 69 6e 2f 73)"
    );
    let mut image = pvh_elf();
    image[4] = 1;
    assert_eq!(err(&image), "ELF class (EI_CLASS) is 1, not 2 (64-bit)");
    let mut image = pvh_elf();
    image[18] = 3;
    assert_eq!(err(&image), "ELF machine (e_machine) is 3, not 62 (x86-64)");
    assert_eq!(
        err(&pvh_elf()[..100]),
        "program header table at offset 0x40 (0xa8 bytes) lies past the end of the 0x64-byte image"
    );
    let low = elf(0x20_0000, &[(PT_LOAD, 0x9000, vec![0; 16], 0x1000)]);
    assert_eq!(
        err(&low),
        "PT_LOAD segment 0 at 0x9000 (0x1000 bytes) overlaps the boot structures below 0x100000"
    );
    let beyond = elf(0x20_0000, &[(PT_LOAD, 31 * MIB, vec![0; 16], 2 * MIB)]);
    assert_eq!(
        err(&beyond),
        "PT_LOAD segment 0 at 0x1f00000 (0x200000 bytes) lies beyond guest RAM"
    );
    let low_entry = elf(0x8000, &[(PT_LOAD, MIB, vec![0; 16], 16)]);
    assert_eq!(
        err(&low_entry),
        "ELF entry point 0x8000 lies below 0x100000"
    );
    assert_eq!(
        err(&bzimage(0, 0x1ff, 1, b"x")),
        "bzImage boot protocol 0x1ff with loadflags 0x1: needs 2.00 or later, loaded high"
    );
    assert!(err(&bzimage(0, 0x20f, 0, b"x")).contains("loadflags 0x0"));
    let mut short = bzimage(8, 0x20f, 1, b"");
    short.truncate(0x400);
    assert_eq!(
        err(&short),
        "bzImage setup code at offset 0x0 (0x1200 bytes) lies past the end of the 0x400-byte image"
    );
    let big = bzimage(0, 0x20f, 1, &vec![0u8; 32 << 20]);
    assert_eq!(
        err(&big),
        "0x2000000 bytes at 0x100000 do not fit guest RAM"
    );
}

/// The same images through linux-loader (what the Linux path uses): the same bytes at the same
/// addresses, the same entry and end.
#[cfg(target_os = "linux")]
mod against_linux_loader {
    use super::*;
    use linux_loader::loader::elf::PvhBootCapability;
    use linux_loader::loader::{BzImage, Elf, KernelLoader};
    use std::io::Cursor;
    use vm_memory::ByteValued;

    const SPAN: usize = 4 << 20;

    fn same_memory(a: &GuestMemoryMmap, b: &GuestMemoryMmap) {
        assert!(read(a, 0, SPAN) == read(b, 0, SPAN), "guest memory differs");
    }

    #[test]
    fn elf() {
        let image = pvh_elf();
        let ours = mem();
        let loaded = load_image(&ours, &ram(), &image).unwrap();
        let theirs = mem();
        let r = Elf::load(
            &theirs,
            None,
            &mut Cursor::new(image),
            Some(GuestAddress(HIGH_MEMORY_START)),
        )
        .unwrap();
        same_memory(&ours, &theirs);
        assert_eq!(loaded.end, r.kernel_end);
        let PvhBootCapability::PvhEntryPresent(entry) = r.pvh_boot_cap else {
            panic!("linux-loader found no PVH entry");
        };
        assert_eq!(loaded.entry, ImageEntry::Pvh(entry.0));
    }

    #[test]
    fn bzimage() {
        let payload: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let image = super::bzimage(17, 0x20f, 1, &payload);
        let ours = mem();
        let loaded = load_image(&ours, &ram(), &image).unwrap();
        let theirs = mem();
        let r = BzImage::load(
            &theirs,
            None,
            &mut Cursor::new(image),
            Some(GuestAddress(HIGH_MEMORY_START)),
        )
        .unwrap();
        same_memory(&ours, &theirs);
        assert_eq!(loaded.end, r.kernel_end);
        let header = r.setup_header.unwrap();
        assert_eq!(
            loaded.entry,
            ImageEntry::Linux64 {
                entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                setup_header: Some(
                    header.as_slice()[..arch::linux_boot::SETUP_HEADER_SIZE].to_vec()
                ),
            }
        );
    }
}
