//! Windows tests of the first build step (`load_guest_ram`): the guest written into real
//! section views, read back through the views at its guest addresses. They need no hypervisor
//! and run under wine (`scripts/test-windows`, which builds the test guest and names it in
//! `SKIFF_TESTGUEST`) and natively on Windows.

use std::path::{Path, PathBuf};

use arch::layout::{CMDLINE_START, HIGH_MEMORY_START, PVH_INFO_START, ZERO_PAGE_START};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::config::SerialConfig;
use crate::kernel_image::tests::{bzimage, pvh_elf};
use crate::memory::view_memory::section_memory;
use crate::windows_vm::args::WindowsMemory;
use crate::windows_vm::boot::{BootFiles, BootProtocol};

const MIB: u64 = 1 << 20;

fn config(kernel: &Path, initrd: Option<&Path>, size: u64, backing: RamBacking) -> WindowsVmConfig {
    WindowsVmConfig {
        boot: BootFiles {
            kernel: kernel.to_path_buf(),
            initrd: initrd.map(Path::to_path_buf),
            cmdline: "console=ttyS0 scenario=hello".into(),
            cpus: 2,
        },
        memory: WindowsMemory { size, backing },
        serial: SerialConfig::Off,
        timeout: None,
    }
}

/// `len` bytes at guest `address`, read through the section view that holds them.
fn guest_bytes(ram: &SectionRam, address: u64, len: usize) -> Vec<u8> {
    let (view, offset) = ram.view_at(address).expect("address in RAM");
    let mut buf = vec![0; len];
    view.read_at(offset, &mut buf).unwrap();
    buf
}

fn u32_at(ram: &SectionRam, address: u64) -> u32 {
    let b = guest_bytes(ram, address, 4);
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn u64_from(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// The test guest (`SKIFF_TESTGUEST`): a Unix path is read through wine's Z: drive.
fn testguest() -> PathBuf {
    let path = std::env::var("SKIFF_TESTGUEST")
        .expect("SKIFF_TESTGUEST names the test guest ELF (scripts/test-windows sets it)");
    if path.starts_with('/') {
        PathBuf::from(format!("Z:{}", path.replace('/', "\\")))
    } else {
        PathBuf::from(path)
    }
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn the_test_guest_s_segments_and_pvh_structures_land_in_the_views() {
    let kernel = testguest();
    let image = std::fs::read(&kernel).unwrap();
    let cfg = config(&kernel, None, 128 * MIB, RamBacking::Pagefile);
    let guest = load_guest_ram(&cfg).unwrap();
    let ram = &guest.ram;

    // Every PT_LOAD segment's file bytes at its physical address.
    let phoff = u64_from(&image, 32) as usize;
    let phnum = usize::from(u16::from_le_bytes([image[56], image[57]]));
    let mut loaded = 0;
    for p in image[phoff..phoff + phnum * 56].chunks_exact(56) {
        let (kind, offset, paddr, filesz) = (
            u32::from_le_bytes([p[0], p[1], p[2], p[3]]),
            u64_from(p, 8) as usize,
            u64_from(p, 24),
            u64_from(p, 32) as usize,
        );
        if kind == 1 && filesz > 0 {
            assert!(paddr >= HIGH_MEMORY_START);
            assert!(
                guest_bytes(ram, paddr, filesz) == image[offset..offset + filesz],
                "segment at {paddr:#x} differs in the view"
            );
            loaded += 1;
        }
    }
    assert!(loaded > 0, "the test guest has no loaded segment");

    assert_eq!(guest.boot.protocol, BootProtocol::Pvh);
    assert_eq!(guest.boot.regs.rbx, PVH_INFO_START);
    assert_eq!(
        u32_at(ram, PVH_INFO_START),
        arch::pvh::XEN_HVM_START_MAGIC_VALUE
    );
    let cmdline = b"console=ttyS0 scenario=hello\0";
    assert_eq!(guest_bytes(ram, CMDLINE_START, cmdline.len()), cmdline);
    // start_info.rsdp_paddr (offset 0x20) points at the "RSD PTR " the ACPI tables begin with.
    let rsdp = u64_from(&guest_bytes(ram, PVH_INFO_START, 0x30), 0x20);
    assert_eq!(guest_bytes(ram, rsdp, 8), b"RSD PTR ");
}

#[test]
fn a_bzimage_and_initrd_in_file_ram_reach_the_file_at_their_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    let kernel = write_file(dir.path(), "bzImage", &bzimage(0, 0x20f, 1, &payload));
    let initrd_bytes: Vec<u8> = (0..50_000u32).map(|i| (i % 239) as u8).collect();
    let initrd = write_file(dir.path(), "initrd", &initrd_bytes);
    let ram_file = dir.path().join("ram");
    let cfg = config(
        &kernel,
        Some(&initrd),
        64 * MIB,
        RamBacking::File(ram_file.clone()),
    );
    let guest = load_guest_ram(&cfg).unwrap();
    assert!(guest.ram.created_file());
    assert_eq!(guest.boot.protocol, BootProtocol::Linux64);
    assert_eq!(guest.boot.regs.rip, HIGH_MEMORY_START + 0x200);
    assert_eq!(guest.boot.regs.rsi, ZERO_PAGE_START);
    assert_eq!(
        guest_bytes(&guest.ram, HIGH_MEMORY_START, payload.len()),
        payload
    );
    assert_eq!(guest_bytes(&guest.ram, ZERO_PAGE_START + 0x202, 4), b"HdrS");
    let initrd_at = u64::from(u32_at(&guest.ram, ZERO_PAGE_START + 0x218));
    let initrd_size = u32_at(&guest.ram, ZERO_PAGE_START + 0x21c);
    assert_eq!(initrd_size as usize, initrd_bytes.len());
    assert_eq!(initrd_at % 4096, 0);
    assert_eq!(
        guest_bytes(&guest.ram, initrd_at, initrd_bytes.len()),
        initrd_bytes
    );
    drop(guest);
    // Below the MMIO hole the file offset is the guest address.
    let file = std::fs::read(&ram_file).unwrap();
    assert_eq!(file.len() as u64, 64 * MIB);
    let at = HIGH_MEMORY_START as usize;
    assert!(file[at..at + payload.len()] == payload[..]);
    let at = initrd_at as usize;
    assert!(file[at..at + initrd_bytes.len()] == initrd_bytes[..]);
}

#[test]
fn a_kernel_that_does_not_load_leaves_no_ram_file_behind() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "kernel.exe", b"MZ\x90\x00 not a kernel");
    let ram_file = dir.path().join("ram");
    let cfg = config(&kernel, None, 16 * MIB, RamBacking::File(ram_file.clone()));
    let msg = crate::error_chain(&load_guest_ram(&cfg).unwrap_err());
    assert!(
        msg.starts_with("kernel image ")
            && msg.ends_with("not an ELF or bzImage (first bytes 4d 5a 90 00 20 6e 6f 74)"),
        "{msg}"
    );
    assert!(!ram_file.exists(), "the RAM file skiff created is removed");
    // A file that existed before stays.
    std::fs::write(&ram_file, b"keep").unwrap();
    assert!(load_guest_ram(&cfg).is_err());
    assert!(ram_file.exists());
}

#[test]
fn guest_memory_spans_the_mmio_hole_through_two_views() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &pvh_elf());
    let size = 3 * 1024 * MIB + 64 * MIB;
    let cfg = config(&kernel, None, size, RamBacking::Pagefile);
    let guest = load_guest_ram(&cfg).unwrap();
    let regions = guest.ram.regions();
    assert_eq!(regions.len(), 2);
    assert_eq!(regions[1].guest_address, arch::layout::HIGH_RAM_START);
    let mem = section_memory(&guest.ram).unwrap();
    mem.write_slice(b"low end!", GuestAddress(arch::layout::MMIO_HOLE_START - 8))
        .unwrap();
    mem.write_slice(b"high", GuestAddress(arch::layout::HIGH_RAM_START))
        .unwrap();
    assert!(mem
        .write_slice(b"x", GuestAddress(arch::layout::MMIO_HOLE_START))
        .is_err());
    assert_eq!(
        guest_bytes(&guest.ram, arch::layout::MMIO_HOLE_START - 8, 8),
        b"low end!"
    );
    assert_eq!(
        guest_bytes(&guest.ram, arch::layout::HIGH_RAM_START, 4),
        b"high"
    );
}

#[test]
fn without_the_platform_the_build_stops_at_the_hypervisor_with_its_own_error() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &pvh_elf());
    let cfg = config(&kernel, None, 16 * MIB, RamBacking::Pagefile);
    let guest = load_guest_ram(&cfg).unwrap();
    let err = build_vm(&cfg, &guest).unwrap_err();
    assert!(matches!(err, WindowsBuildError::Unavailable(_)), "{err:?}");
    assert!(crate::error_chain(&err).starts_with("Windows Hypervisor Platform is not enabled: "));
}

/// The devices on real buses as `build_vm` places them, with the platform made without a
/// partition (its interrupt requests collected).
mod devices_on_the_buses {
    use super::*;
    use devices::irqchip::{
        HostClock, InterruptRequest, InterruptSink, Ioapic, IoapicPin, IsaIrq, Pic, Pit,
    };
    use devices::vm_exit::GuestEnd;

    #[derive(Debug, Default)]
    struct Requests(Mutex<Vec<InterruptRequest>>);

    impl InterruptSink for Requests {
        fn deliver(&self, request: InterruptRequest) -> std::io::Result<()> {
            self.0.lock().unwrap().push(request);
            Ok(())
        }
    }

    struct Buses {
        pio: Bus,
        exit: VmExitSignal,
        sink: Arc<Requests>,
        serial_file: PathBuf,
        _dir: tempfile::TempDir,
    }

    fn buses() -> Buses {
        let sink = Arc::new(Requests::default());
        let ioapic = Arc::new(Mutex::new(Ioapic::new(sink.clone())));
        let pic = Arc::new(Mutex::new(Pic::new()));
        let irq0 = Arc::new(IsaIrq::new(pic.clone(), ioapic.clone(), 0, 2));
        let pit = Arc::new(Mutex::new(Pit::new(Arc::new(HostClock::default()), irq0)));
        let com1: Arc<dyn InterruptLine> = Arc::new(IoapicPin::new(ioapic.clone(), 4));
        let platform = WhpPlatform { ioapic, pic, pit };
        let dir = tempfile::tempdir().unwrap();
        let serial_file = dir.path().join("serial.log");
        let exit = VmExitSignal::new().unwrap();
        let (pio, mmio) = (Bus::new(), Bus::new());
        attach_devices(
            &platform,
            com1,
            &SerialConfig::File(serial_file.clone()),
            &exit,
            &pio,
            &mmio,
        )
        .unwrap();
        // The guest routes COM1's pin to vector 0x24 through the IOAPIC's window.
        let base = arch::layout::IOAPIC_START;
        mmio.write(base, &(0x10u32 + 2 * 4).to_le_bytes());
        mmio.write(base + 0x10, &0x24u32.to_le_bytes());
        Buses {
            pio,
            exit,
            sink,
            serial_file,
            _dir: dir,
        }
    }

    #[test]
    fn serial_output_reaches_its_file_and_its_interrupt_the_ioapic() {
        let b = buses();
        b.pio.write(COM1_PORT + 1, &[0x02]); // IER: THR empty
        for byte in b"hi\n" {
            b.pio.write(COM1_PORT, &[*byte]);
        }
        assert_eq!(std::fs::read(&b.serial_file).unwrap(), b"hi\n");
        let requests = b.sink.0.lock().unwrap();
        assert!(!requests.is_empty(), "COM1 raised no interrupt");
        assert!(requests.iter().all(|r| r.vector == 0x24));
    }

    #[test]
    fn port_0x61_is_the_pit_s_and_the_i8042_keeps_0x60_and_0x64() {
        let b = buses();
        // Channel 2's gate and the speaker data bit read back from the PIT.
        b.pio.write(0x61, &[0x03]);
        let mut port_b = [0u8];
        b.pio.read(0x61, &mut port_b);
        assert_eq!(port_b[0] & 0x03, 0x03);
        let mut status = [0xffu8];
        b.pio.read(I8042_PORT + 4, &mut status);
        assert_ne!(status[0], 0xff, "the i8042's status port answers");
        assert!(b.pio.check_free(0x62, 2).is_ok());
        // The i8042's reset pulse ends the VM, as on Linux.
        b.pio.write(I8042_PORT + 4, &[0xfe]);
        assert_eq!(b.exit.reason(), Some(GuestEnd::Reset));
    }

    #[test]
    fn the_debug_exit_port_ends_the_vm_with_the_guest_s_code() {
        let b = buses();
        b.pio.write(DEBUG_EXIT_PORT, &[5]);
        assert_eq!(b.exit.reason(), Some(GuestEnd::DebugExit(5)));
    }
}
