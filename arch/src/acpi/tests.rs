//! Unit tests for `acpi`: the tables are written into guest memory and parsed back the way a
//! guest OS walks them, from the RSDP down.

use super::*;
use vm_memory::GuestMemoryMmap;

fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

/// Reads a whole table by its header's length and checks it lies in the ACPI area, is aligned
/// and has a valid checksum.
fn table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
    let len = u32_at(&read(mem, addr, 36), 4) as usize;
    assert!(
        addr.is_multiple_of(16),
        "table at {addr:#x} is not 16-byte aligned"
    );
    assert!(addr >= ACPI_START && addr + len as u64 <= ACPI_START + ACPI_SIZE);
    let bytes = read(mem, addr, len);
    assert_eq!(
        sum(&bytes),
        0,
        "bad checksum for {:?}",
        String::from_utf8_lossy(&bytes[..4])
    );
    bytes
}

/// Returns the tables the XSDT points at, by signature.
fn tables(mem: &GuestMemoryMmap, rsdp_addr: u64) -> Vec<(String, u64, Vec<u8>)> {
    let rsdp = read(mem, rsdp_addr, 36);
    let xsdt = table(mem, u64_at(&rsdp, 24));
    assert_eq!(&xsdt[..4], b"XSDT");
    xsdt[36..]
        .chunks_exact(8)
        .map(|c| {
            let addr = u64::from_le_bytes(c.try_into().unwrap());
            let t = table(mem, addr);
            (String::from_utf8_lossy(&t[..4]).into_owned(), addr, t)
        })
        .collect()
}

fn find<'a>(all: &'a [(String, u64, Vec<u8>)], sig: &str) -> &'a [u8] {
    &all.iter().find(|(s, _, _)| s == sig).unwrap().2
}

#[test]
fn rsdp_is_valid_and_points_at_the_xsdt() {
    let mem = guest_mem();
    let addr = write_acpi_tables(&mem, &AcpiConfig { cpus: 2 }).unwrap();
    assert_eq!(addr, ACPI_START);
    let rsdp = read(&mem, addr, 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(rsdp[15], 2, "revision");
    assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
    assert_eq!(sum(&rsdp), 0, "extended checksum");
    assert_eq!(u32_at(&rsdp, 20), 36, "length");
    assert_eq!(&rsdp[9..15], b"SKIFF ");
}

#[test]
fn xsdt_lists_fadt_madt_and_mcfg() {
    let mem = guest_mem();
    let all = tables(
        &mem,
        write_acpi_tables(&mem, &AcpiConfig { cpus: 1 }).unwrap(),
    );
    let sigs: Vec<&str> = all.iter().map(|(s, _, _)| s.as_str()).collect();
    assert_eq!(sigs, ["FACP", "APIC", "MCFG"]);
}

#[test]
fn fadt_is_hardware_reduced_and_points_at_the_dsdt() {
    let mem = guest_mem();
    let all = tables(
        &mem,
        write_acpi_tables(&mem, &AcpiConfig { cpus: 1 }).unwrap(),
    );
    let fadt = find(&all, "FACP");
    assert_eq!(fadt.len(), 276);
    assert_eq!((fadt[8], fadt[131]), (6, 5), "FADT revision 6.5");
    let flags = u32_at(fadt, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_eq!(
        u16::from_le_bytes([fadt[109], fadt[110]]),
        0x14,
        "IAPC_BOOT_ARCH"
    );
    assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT pointer unused");

    let dsdt = table(&mem, u64_at(fadt, 140));
    assert_eq!(&dsdt[..4], b"DSDT");
    // NameOp "_S5_" PackageOp len=4 count=1 BytePrefix 5.
    assert_eq!(
        &dsdt[36..46],
        &[0x08, b'_', b'S', b'5', b'_', 0x12, 0x04, 0x01, 0x0a, 0x05]
    );
}

fn position(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// An ACPI address space descriptor (large resource `tag`) with fixed min and max, built by hand
/// from the ACPI specification's layout: length, resource type, general flags (MinFixed and
/// MaxFixed), type flags, then granularity, min, max, translation and length of `width` bytes.
fn address_descriptor(
    tag: u8,
    kind: u8,
    type_flags: u8,
    width: usize,
    min: u64,
    max: u64,
) -> Vec<u8> {
    let mut d = vec![tag];
    d.extend_from_slice(&((3 + 5 * width) as u16).to_le_bytes());
    d.extend_from_slice(&[kind, 0x0c, type_flags]);
    for v in [0, min, max, 0, max - min + 1] {
        d.extend_from_slice(&v.to_le_bytes()[..width]);
    }
    d
}

#[test]
fn dsdt_describes_the_pci_host_bridge_and_its_windows() {
    let mem = guest_mem();
    let all = tables(
        &mem,
        write_acpi_tables(&mem, &AcpiConfig { cpus: 1 }).unwrap(),
    );
    let dsdt = table(&mem, u64_at(find(&all, "FACP"), 140));
    let scope = position(&dsdt, b"\\_SB_").expect("\\_SB_ scope");
    let pci0 = position(&dsdt, b"PCI0").expect("PCI0 device");
    assert!(scope < pci0);
    // DeviceOp (ExtOpPrefix 0x5b, 0x82), then a PkgLength of 1 to 4 bytes, then the name.
    assert!(
        (1..=4).any(|n| dsdt[pci0 - n - 2..pci0 - n] == [0x5b, 0x82]),
        "PCI0 is not a Device"
    );
    let body = &dsdt[pci0..];
    // _HID EISAID("PNP0A08") and _CID EISAID("PNP0A03"): DWordPrefix and the compressed ID.
    for (name, id) in [(b"_HID", 0x080a_d041u32), (b"_CID", 0x030a_d041)] {
        let mut expect = vec![0x08];
        expect.extend_from_slice(name);
        expect.push(0x0c);
        expect.extend_from_slice(&id.to_le_bytes());
        assert!(
            position(body, &expect).is_some(),
            "{}",
            String::from_utf8_lossy(name)
        );
    }
    for name in [b"_SEG", b"_BBN", b"_UID"] {
        let mut expect = vec![0x08];
        expect.extend_from_slice(name);
        expect.push(0x00); // ZeroOp
        assert!(
            position(body, &expect).is_some(),
            "{}",
            String::from_utf8_lossy(name)
        );
    }
    let crs = position(body, b"_CRS").expect("_CRS");
    let crs = &body[crs..];
    let bus = address_descriptor(0x88, 2, 0, 2, 0, u64::from(ECAM_END_BUS));
    let io = [0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08];
    let mmio32 = address_descriptor(0x87, 0, 1, 4, 0xc000_0000, 0xdfff_ffff);
    let mmio64 = address_descriptor(
        0x8a,
        0,
        1,
        8,
        PCI_MMIO64_START,
        PCI_MMIO64_START + PCI_MMIO64_SIZE - 1,
    );
    let mut at = 0;
    for (what, d) in [
        ("bus", &bus[..]),
        ("io", &io),
        ("mmio32", &mmio32),
        ("mmio64", &mmio64),
    ] {
        let p = position(&crs[at..], d)
            .unwrap_or_else(|| panic!("{what} range missing or out of order"));
        at += p + d.len();
    }
    // The motherboard resources device reserves the ECAM area with a Memory32Fixed descriptor.
    let mbrd = position(&dsdt, b"MBRD").expect("MBRD device");
    let mut ecam = vec![0x86, 0x09, 0x00, 0x01];
    ecam.extend_from_slice(&(PCI_ECAM_START as u32).to_le_bytes());
    ecam.extend_from_slice(&(PCI_ECAM_SIZE as u32).to_le_bytes());
    assert!(position(&dsdt[mbrd..], &ecam).is_some());
}

#[test]
fn madt_describes_every_cpu_and_the_ioapic() {
    for cpus in [1u8, 4, 255] {
        let mem = guest_mem();
        let all = tables(&mem, write_acpi_tables(&mem, &AcpiConfig { cpus }).unwrap());
        let madt = find(&all, "APIC");
        assert_eq!(u32_at(madt, 36), 0xfee0_0000, "local APIC address");
        assert_eq!(u32_at(madt, 40), 1, "PCAT_COMPAT");

        let (mut lapics, mut ioapics, mut overrides) = (Vec::new(), Vec::new(), Vec::new());
        let mut off = 44;
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            let entry = &madt[off..off + len];
            match kind {
                0 => lapics.push((entry[2], entry[3], u32_at(entry, 4))),
                1 => ioapics.push((entry[2], u32_at(entry, 4), u32_at(entry, 8))),
                2 => overrides.push((entry[2], entry[3], u32_at(entry, 4))),
                other => panic!("unexpected MADT entry type {other}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        let expected: Vec<_> = (0..cpus).map(|i| (i, i, 1)).collect();
        assert_eq!(lapics, expected, "uid = APIC ID = index, enabled");
        assert_eq!(ioapics, [(0, 0xfec0_0000, 0)]);
        assert_eq!(overrides, [(0, 0, PIT_GSI)], "ISA IRQ 0 -> the PIT's GSI");
    }
}

#[test]
fn mcfg_covers_the_ecam_area() {
    let mem = guest_mem();
    let all = tables(
        &mem,
        write_acpi_tables(&mem, &AcpiConfig { cpus: 1 }).unwrap(),
    );
    let mcfg = find(&all, "MCFG");
    assert_eq!(mcfg.len(), 36 + 8 + 16);
    let entry = &mcfg[44..];
    assert_eq!(u64_at(entry, 0), PCI_ECAM_START);
    assert_eq!(u16::from_le_bytes([entry[8], entry[9]]), 0, "segment");
    // Bus 0 only: Linux probes up to the MCFG's end bus (its peer-host-bridge scan).
    assert_eq!((entry[10], entry[11]), (0, 0), "bus range");
    assert_eq!(ECAM_END_BUS, 0);
}

#[test]
fn tables_do_not_overlap() {
    let mem = guest_mem();
    let rsdp = write_acpi_tables(&mem, &AcpiConfig { cpus: 255 }).unwrap();
    let mut spans = vec![(rsdp, rsdp + 36)];
    let all = tables(&mem, rsdp);
    spans.extend(
        all.iter()
            .map(|(_, addr, t)| (*addr, addr + t.len() as u64)),
    );
    let fadt = find(&all, "FACP");
    let dsdt = u64_at(fadt, 140);
    spans.push((dsdt, dsdt + table(&mem, dsdt).len() as u64));
    let xsdt = u64_at(&read(&mem, rsdp, 36), 24);
    spans.push((xsdt, xsdt + table(&mem, xsdt).len() as u64));
    spans.sort();
    for pair in spans.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "{:x?} overlaps {:x?}",
            pair[0],
            pair[1]
        );
    }
}

#[test]
fn rejects_zero_cpus() {
    let mem = guest_mem();
    let err = write_acpi_tables(&mem, &AcpiConfig { cpus: 0 }).unwrap_err();
    assert!(matches!(err, AcpiError::NoCpus));
}

#[test]
fn table_area_refuses_to_run_past_the_end() {
    let mem = guest_mem();
    let mut area = TableArea::new(&mem, ACPI_START + ACPI_SIZE - 0x20);
    assert_eq!(
        area.place("TEST", &[0u8; 0x20]).unwrap(),
        ACPI_START + ACPI_SIZE - 0x20
    );
    let err = area.place("BIG_", &[0u8; 1]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "ACPI table BIG_ (1 bytes at 0x100000) does not fit the ACPI area ending at 0x100000"
    );
}

#[test]
fn write_outside_guest_memory_is_reported() {
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let err = write_acpi_tables(&mem, &AcpiConfig { cpus: 1 }).unwrap_err();
    assert!(
        matches!(
            err,
            AcpiError::Write {
                table: "DSDT",
                addr: 0xe0030,
                ..
            }
        ),
        "{err}"
    );
}
