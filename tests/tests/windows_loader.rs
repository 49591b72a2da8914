//! The Windows boot path (`vmm::windows_vm::boot`, its own ELF and bzImage loader, since
//! linux-loader cannot build for Windows) places the project's real Linux images exactly as the
//! Linux path (`vmm::boot::prepare_boot`, linux-loader) does: the same 256 MiB of guest memory,
//! byte for byte, and the same boot registers, for the bzImage (64-bit protocol) and the
//! vmlinux (PVH), each with the busybox initramfs. No hypervisor is involved.

#![cfg(target_os = "linux")] // the Linux path (linux-loader) is the reference

use std::path::Path;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::boot::{prepare_boot, BootConfig, BootProtocol};
use vmm::windows_vm::boot::{load_guest, BootFiles};

const RAM: u64 = 256 << 20;
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

fn memory() -> GuestMemoryMmap<AtomicBitmap> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("guest memory")
}

fn contents(mem: &GuestMemoryMmap<AtomicBitmap>) -> Vec<u8> {
    let mut all = vec![0u8; RAM as usize];
    mem.read_slice(&mut all, GuestAddress(0)).expect("readable");
    all
}

fn same_placement(kernel: &Path, protocol: BootProtocol) {
    let initrd = &skiff_tests::linux_images().initramfs;
    let ram = arch::layout::ram_ranges(RAM).expect("a valid RAM size");
    let windows = memory();
    let ours = load_guest(
        &windows,
        &ram,
        &BootFiles {
            kernel: kernel.to_path_buf(),
            initrd: Some(initrd.clone()),
            cmdline: CMDLINE.into(),
            cpus: 2,
        },
    )
    .expect("the Windows path loads the image");
    let linux = memory();
    let theirs = prepare_boot(
        &linux,
        &ram,
        &BootConfig {
            kernel: kernel.to_path_buf(),
            initrd: Some(initrd.clone()),
            cmdline: CMDLINE.into(),
            cpus: 2,
        },
    )
    .expect("the Linux path loads the image");
    assert_eq!(ours.protocol, protocol);
    assert_eq!(theirs.protocol, protocol);
    assert_eq!(ours.regs, theirs.regs);
    let (a, b) = (contents(&windows), contents(&linux));
    if a != b {
        let at = a.iter().zip(&b).position(|(x, y)| x != y);
        panic!(
            "{}: guest memory differs first at {at:#x?}",
            kernel.display()
        );
    }
}

#[test]
fn the_bzimage_lands_as_linux_loader_places_it() {
    same_placement(&skiff_tests::linux_images().bzimage, BootProtocol::Linux64);
}

#[test]
fn the_pvh_vmlinux_lands_as_linux_loader_places_it() {
    same_placement(&skiff_tests::linux_images().vmlinux, BootProtocol::Pvh);
}
