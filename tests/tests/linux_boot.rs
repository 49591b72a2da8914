//! Linux tests: boot the minimal kernel from `images/linux` and check from its log that it saw
//! the memory map and CPU count skiff gave it.
//!
//! A probe picks the tier: on a PVM host (`/sys/module/kvm_pvm`), guest kernel mode is emulated
//! and Linux user space cannot run, so the boot is checked up to `Run /init`; on hardware KVM the
//! guest runs its busybox init, which prints a marker and powers off. The test prints which tier
//! ran.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::time::Duration;

use skiff_tests::{linux_images, require_kvm, Skiff};

/// The PVM emulator cannot run `xsave`/`xrstor`, `cmpxchg16b`, SMAP/SMEP's `stac`/`clac` or
/// `popcnt` in kernel mode; hardware KVM hosts need none of this, but it is harmless there.
const PVM_SAFE_ARGS: &str = "noxsave clearcpuid=cx16,smap,smep,popcnt";

fn pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

#[test]
fn minimal_kernel_boots_with_the_memory_map_and_cpus_skiff_gave_it() {
    require_kvm();
    let images = linux_images();
    let pvm = pvm_host();
    eprintln!(
        "linux boot tier: {}",
        if pvm {
            "PVM host, boot checked up to `Run /init`"
        } else {
            "hardware KVM, boot to busybox init and power off"
        }
    );
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 {PVM_SAFE_ARGS}");
    let mut vm = Skiff::spawn(&[
        "run".as_ref(),
        "--kernel".as_ref(),
        images.vmlinux.as_os_str(),
        "--initrd".as_ref(),
        images.initramfs.as_os_str(),
        "--cpus".as_ref(),
        "2".as_ref(),
        "--memory".as_ref(),
        "size=512M".as_ref(),
        "--cmdline".as_ref(),
        cmdline.as_ref(),
        "--timeout".as_ref(),
        "900".as_ref(),
    ]);
    vm.wait_for_line("Run /init as init process", Duration::from_secs(900));
    if !pvm {
        vm.wait_for_line("skiff-init: started", Duration::from_secs(60));
    }
    let log = vm.stdout_text();
    drop(vm);

    // The e820 map skiff wrote: low RAM below the EBDA, the reserved legacy area, RAM from 1 MiB
    // to the end of the 512 MiB guest, and the reserved ECAM window.
    for line in [
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
        "BIOS-e820: [mem 0x00000000e0000000-0x00000000efffffff] reserved",
    ] {
        assert!(log.contains(line), "kernel log lacks {line:?}\n{log}");
    }
    assert!(
        log.contains("Brought up 1 node, 2 CPUs"),
        "the kernel did not bring up both vCPUs\n{log}"
    );
    assert!(
        log.contains("ACPI: MADT"),
        "the kernel did not find the MADT\n{log}"
    );
}

#[test]
fn bzimage_is_loaded_and_entered_through_the_64bit_protocol() {
    require_kvm();
    let images = linux_images();
    // The bzImage decompresses itself in emulated kernel mode on PVM; once the kernel proper
    // prints its banner, command line and e820 map, loading, the 64-bit entry and boot_params
    // are proven, so stop there.
    let cmdline = format!("console=ttyS0 earlyprintk=serial,ttyS0,115200 {PVM_SAFE_ARGS}");
    let mut vm = Skiff::spawn(&[
        "run".as_ref(),
        "--kernel".as_ref(),
        images.bzimage.as_os_str(),
        "--initrd".as_ref(),
        images.initramfs.as_os_str(),
        "--memory".as_ref(),
        "size=256M".as_ref(),
        "--cmdline".as_ref(),
        cmdline.as_ref(),
    ]);
    vm.wait_for_line("Linux version", Duration::from_secs(180));
    vm.wait_for_line(&format!("Command line: {cmdline}"), Duration::from_secs(60));
    vm.wait_for_line(
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
        Duration::from_secs(60),
    );
}
