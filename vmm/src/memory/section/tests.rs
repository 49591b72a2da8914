//! Windows tests of sections, views and `SectionRam`: run under wine on Linux CI
//! (`scripts/test-windows`) and natively on Windows. They need no hypervisor.

use std::sync::Arc;

use crate::memory::region::{Mappable, ShareableRegion};
use crate::memory::section::{allocation_granularity, Section, SectionBacking, SectionError};
use crate::memory::validate::RegionError;
use crate::memory::view::{SectionView, ViewError};
use crate::memory::{SectionRam, SectionRamError};

const MIB: u64 = 1 << 20;
const P: u64 = 4096;

fn pagefile(size: u64) -> Arc<Mappable> {
    Arc::new(
        Section::create(&SectionBacking::Pagefile, size)
            .unwrap()
            .mappable,
    )
}

fn read(view: &SectionView, offset: usize, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    view.read_at(offset, &mut buf).unwrap();
    buf
}

#[test]
fn granularity_is_the_documented_64k() {
    assert_eq!(allocation_granularity(), 64 * 1024);
}

#[test]
fn two_views_of_a_pagefile_section_share_their_pages() {
    let section = pagefile(MIB);
    let a = SectionView::map(&section, 0, MIB).unwrap();
    let b = SectionView::map(&section, 0, MIB).unwrap();
    assert_ne!(a.host_address(), b.host_address());
    a.write_at(4096, b"written through a").unwrap();
    assert_eq!(read(&b, 4096, 17), b"written through a");
    b.write_at(MIB as usize - 2, b"ba").unwrap();
    assert_eq!(read(&a, MIB as usize - 2, 2), b"ba");
}

#[test]
fn a_view_at_a_file_offset_sees_that_part_of_the_section() {
    let section = pagefile(MIB);
    let whole = SectionView::map(&section, 0, MIB).unwrap();
    let g = allocation_granularity();
    let tail = SectionView::map(&section, g, MIB - g).unwrap();
    whole.write_at(g as usize + 8, b"offset").unwrap();
    assert_eq!(read(&tail, 8, 6), b"offset");
    assert_eq!(tail.len(), (MIB - g) as usize);
}

#[test]
fn a_duplicated_handle_maps_the_same_pages_and_outlives_the_original() {
    let original = Section::create(&SectionBacking::Pagefile, MIB)
        .unwrap()
        .mappable;
    let first = SectionView::map(&original, 0, MIB).unwrap();
    let copy = original.try_clone().unwrap();
    assert_eq!(copy.byte_len().unwrap(), MIB);
    let second = SectionView::map(&copy, 0, MIB).unwrap();
    first.write_at(0, b"shared").unwrap();
    assert_eq!(read(&second, 0, 6), b"shared");
    second.write_at(100, b"back").unwrap();
    assert_eq!(read(&first, 100, 4), b"back");
    // The section lives as long as any handle or view does.
    drop(first);
    drop(original);
    let third = SectionView::map(&copy, 0, MIB).unwrap();
    assert_eq!(read(&third, 0, 6), b"shared");
}

#[test]
fn views_refuse_ranges_outside_the_section_and_accesses_outside_the_view() {
    let section = pagefile(MIB);
    let e = SectionView::map(&section, 0, 2 * MIB).unwrap_err();
    assert!(matches!(e, ViewError::OutOfRange { .. }), "{e}");
    let e = SectionView::map(&section, u64::MAX - P + 1, P).unwrap_err();
    assert!(matches!(e, ViewError::OutOfRange { .. }), "{e}");
    let e = SectionView::map(&section, 0, 0).unwrap_err();
    assert!(matches!(e, ViewError::OutOfRange { .. }), "{e}");
    let view = SectionView::map(&section, 0, MIB).unwrap();
    let e = view.write_at(MIB as usize - 1, b"xy").unwrap_err();
    assert!(matches!(e, ViewError::Access { .. }), "{e}");
    let e = view.read_at(usize::MAX, &mut [0; 2]).unwrap_err();
    assert!(matches!(e, ViewError::Access { .. }), "{e}");
}

#[test]
fn default_ram_is_one_pagefile_section_mapped_per_region() {
    let size = 64 * MIB;
    let ram = SectionRam::create(&SectionBacking::Pagefile, size, 32).unwrap();
    let expected = arch::layout::ram_ranges(size).unwrap();
    assert_eq!(ram.regions().len(), expected.len());
    for (r, e) in ram.regions().iter().zip(&expected) {
        assert_eq!((r.guest_address, r.size), (e.start, e.size));
    }
    assert_eq!(ram.views().len(), ram.regions().len());
    assert!(!ram.created_file());
    let (view, offset) = ram.view_at(0x1234).unwrap();
    view.write_at(offset, b"guest").unwrap();
    // Another view of the region's section, as a device process would map it, sees the write.
    let r = &ram.regions()[0];
    let other = SectionView::map(&r.file.try_clone().unwrap(), r.file_offset, r.size).unwrap();
    assert_eq!(read(&other, 0x1234, 5), b"guest");
    assert!(ram.view_at(size + (1 << 40)).is_none());
}

#[test]
fn slot_memory_is_each_view_and_keeps_the_ram_mapped() {
    use crate::hypervisor::whp::emulation::GuestRam as _;
    use crate::memory::MappedRam;
    let ram = Arc::new(SectionRam::create(&SectionBacking::Pagefile, 64 * MIB, 32).unwrap());
    let slots = ram.slot_memory();
    assert_eq!(slots.len(), ram.regions().len());
    let mapped = MappedRam::default();
    for (slot, region) in slots.iter().zip(ram.regions()) {
        assert_eq!(slot.size(), region.size);
        mapped.add(region.guest_address, slot.clone());
    }
    // The slots hold the views after the RAM's own handle is gone.
    let weak = Arc::downgrade(&ram);
    drop(ram);
    assert!(weak.upgrade().is_some());
    assert!(mapped.write(0x2000, b"slot"));
    let ram = weak.upgrade().unwrap();
    let (view, offset) = ram.view_at(0x2000).unwrap();
    assert_eq!(read(view, offset, 4), b"slot");
}

#[test]
fn file_ram_is_created_grown_and_holds_what_the_guest_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ram");
    let size = 64 * MIB;
    {
        let ram = SectionRam::create(&SectionBacking::File(path.clone()), size, 32).unwrap();
        assert!(ram.created_file());
        let (view, offset) = ram.view_at(0x10_0000).unwrap();
        view.write_at(offset, b"persisted").unwrap();
    }
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len() as u64, size);
    assert_eq!(&bytes[0x10_0000..0x10_0009], b"persisted");
    // An existing file keeps its contents, and is not "created".
    let ram = SectionRam::create(&SectionBacking::File(path.clone()), size, 32).unwrap();
    assert!(!ram.created_file());
    let (view, offset) = ram.view_at(0x10_0000).unwrap();
    assert_eq!(read(view, offset, 9), b"persisted");
}

#[test]
fn a_shorter_file_grows_and_a_longer_one_keeps_its_length() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short");
    std::fs::write(&short, b"head").unwrap();
    let section = Section::create(&SectionBacking::File(short.clone()), MIB).unwrap();
    assert!(section.created.is_none());
    let view = SectionView::map(&section.mappable, 0, MIB).unwrap();
    assert_eq!(read(&view, 0, 4), b"head");
    drop((view, section));
    assert_eq!(std::fs::metadata(&short).unwrap().len(), MIB);

    let long = dir.path().join("long");
    std::fs::write(&long, vec![7u8; 2 * MIB as usize]).unwrap();
    let section = Section::create(&SectionBacking::File(long.clone()), MIB).unwrap();
    assert_eq!(section.mappable.byte_len().unwrap(), MIB);
    drop(section);
    assert_eq!(std::fs::metadata(&long).unwrap().len(), 2 * MIB);
}

#[test]
fn file_errors_name_the_file_and_leave_no_file_behind() {
    let dir = tempfile::tempdir().unwrap();
    let e = Section::create(&SectionBacking::File(dir.path().to_path_buf()), MIB).unwrap_err();
    assert!(matches!(e, SectionError::NotRegular(_)), "{e}");

    let missing_dir = dir.path().join("no-such-dir").join("ram");
    let e = Section::create(&SectionBacking::File(missing_dir.clone()), MIB).unwrap_err();
    assert!(matches!(e, SectionError::Open { .. }), "{e}");
    assert!(e.to_string().contains("no-such-dir"), "{e}");

    // Held open for writing by someone else: it cannot be opened for sharing.
    let busy = dir.path().join("busy");
    let _writer = std::fs::File::create(&busy).unwrap();
    let e = Section::create(&SectionBacking::File(busy.clone()), MIB).unwrap_err();
    assert!(matches!(e, SectionError::InUse(_)), "{e}");
    assert!(e.to_string().contains("in use by another process"), "{e}");

    // A size the memory map cannot hold is refused before any file is created.
    let fresh = dir.path().join("fresh");
    let e = SectionRam::create(&SectionBacking::File(fresh.clone()), 4096, 32).unwrap_err();
    assert!(matches!(e, SectionRamError::Layout(_)), "{e}");
    assert!(!fresh.exists());
    // A validation error after skiff created the file removes the file again.
    let e = SectionRam::create(&SectionBacking::File(fresh.clone()), 64 * MIB, 0).unwrap_err();
    assert!(
        matches!(e, SectionRamError::Region(RegionError::TooManySlots { .. })),
        "{e}"
    );
    assert!(!fresh.exists());
    // An existing file is never removed.
    let kept = dir.path().join("kept");
    std::fs::write(&kept, b"mine").unwrap();
    SectionRam::create(&SectionBacking::File(kept.clone()), 64 * MIB, 0).unwrap_err();
    assert!(kept.exists());
}

#[test]
fn a_running_vm_keeps_its_memory_file_to_itself() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ram");
    let _ram = SectionRam::create(&SectionBacking::File(path.clone()), 64 * MIB, 32).unwrap();
    let e = SectionRam::create(&SectionBacking::File(path), 64 * MIB, 32).unwrap_err();
    assert!(
        matches!(e, SectionRamError::Section(SectionError::InUse(_))),
        "{e}"
    );
}

fn region(
    file: &Arc<Mappable>,
    guest_address: u64,
    size: u64,
    file_offset: u64,
) -> ShareableRegion {
    ShareableRegion {
        guest_address,
        size,
        file: file.clone(),
        file_offset,
    }
}

fn rejected(regions: Vec<ShareableRegion>, max_slots: usize) -> RegionError {
    match SectionRam::from_regions(regions, max_slots) {
        Err(SectionRamError::Region(e)) => e,
        other => panic!("expected a region error, got {other:?}"),
    }
}

#[test]
fn every_validation_error_is_reported_before_mapping() {
    let f = pagefile(4 * MIB);
    let g = allocation_granularity();
    assert!(SectionRam::from_regions(
        vec![region(&f, 0, MIB, 0), region(&f, 1 << 32, MIB, MIB)],
        32
    )
    .is_ok());

    assert_eq!(
        rejected(vec![region(&f, 0, 0, 0)], 32),
        RegionError::ZeroSize { guest_address: 0 }
    );
    for (r, what) in [
        (region(&f, 0x800, P, 0), "guest address"),
        (region(&f, 0, P + 1, 0), "size"),
        (region(&f, 0, P, 12), "file offset"),
    ] {
        let e = rejected(vec![r], 32);
        assert!(
            matches!(e, RegionError::Unaligned { what: w, .. } if w == what),
            "{e}"
        );
    }
    let e = rejected(vec![region(&f, u64::MAX - P + 1, P, 0)], 32);
    assert!(matches!(e, RegionError::Overflow { .. }), "{e}");
    let e = rejected(vec![region(&f, 0, P, u64::MAX - P + 1)], 32);
    assert!(matches!(e, RegionError::Overflow { .. }), "{e}");
    assert_eq!(
        rejected(
            vec![region(&f, 2 * P, 4 * P, 0), region(&f, 0, 3 * P, g)],
            32
        ),
        RegionError::Overlap {
            first: 0,
            second: 2 * P
        }
    );
    assert_eq!(
        rejected(vec![region(&f, 0, 4 * MIB, MIB)], 32),
        RegionError::FileTooShort {
            guest_address: 0,
            needed: 5 * MIB,
            actual: 4 * MIB
        }
    );
    let e = rejected(vec![region(&f, 0, P, 0), region(&f, MIB, P, P)], 32);
    assert_eq!(
        e,
        RegionError::ViewOffsetUnaligned {
            guest_address: MIB,
            file_offset: P,
            granularity: g
        }
    );
    assert!(
        e.to_string()
            .contains("allocation granularity Windows requires"),
        "{e}"
    );
    assert_eq!(
        rejected(vec![region(&f, 0, P, 0), region(&f, P, P, g)], 1),
        RegionError::TooManySlots { count: 2, max: 1 }
    );
}
