//! Linux tests: boot the minimal kernel from `images/linux` and check from its log that it saw
//! the memory map, CPU count and devices skiff gave it (a vhost-user disk among them); snapshot it mid-boot and check the restored
//! kernel boots on.
//!
//! A probe picks the tier: on a PVM host (`/sys/module/kvm_pvm`), guest kernel mode is emulated
//! and Linux user space cannot run, so the boot is checked up to `Run /init`; on hardware KVM the
//! guest runs its busybox init, which prints a marker and powers off. The test prints which tier
//! ran.

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use skiff_tests::{linux_images, pvm_host, require_kvm, skiff_bin, Backend, NetNs, Skiff};

mod snapshot_support;

/// The PVM emulator cannot run `xsave`/`xrstor`, `cmpxchg16b`, SMAP/SMEP's `stac`/`clac` or
/// `popcnt` in kernel mode; hardware KVM hosts need none of this, but it is harmless there.
/// `rodata=off` skips ~20 s of emulated page-table work before `Run /init`.
const PVM_SAFE_ARGS: &str = "noxsave clearcpuid=cx16,smap,smep,popcnt rodata=off";

#[test]
fn minimal_kernel_boots_with_the_memory_map_cpus_and_devices_skiff_gave_it() {
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
    let disk = tempfile::NamedTempFile::new().unwrap();
    disk.as_file().set_len(64 << 20).unwrap();
    let disk_spec = format!("path={},id=linuxdisk", disk.path().display());
    // A second disk served by skiff's own vhost-user-blk backend, with an MBR of one partition:
    // the kernel logs the partition only after its read of sector 0 completed, which takes the
    // backend's interrupt (delivered straight through the vector's irqfd).
    let dir = tempfile::tempdir().unwrap();
    let backend_disk = dir.path().join("vhost.img");
    std::fs::write(&backend_disk, mbr_with_one_partition(32 << 20)).unwrap();
    let socket = dir.path().join("blk.sock");
    let _backend = Backend::skiff_blk(&socket, &backend_disk, &[]);
    let vhost_spec = format!("type=blk,socket={}", socket.display());
    // The tap lives in a namespace of the test's own; `ip=` makes the kernel bring eth0 up and
    // log it.
    let ns = NetNs::new("sklnx0");
    let vsock_spec = format!("cid=3,socket={}", dir.path().join("v.sock").display());
    // On PVM, unpacking the busybox initramfs alone takes minutes of emulated kernel time and
    // user space cannot run anyway: use the 10 KiB one.
    let initrd = if pvm {
        &images.initramfs_min
    } else {
        &images.initramfs
    };
    let cmdline = format!(
        "console=ttyS0 console=hvc0 reboot=k panic=-1 ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off carrier_timeout=10 {PVM_SAFE_ARGS}"
    );
    let mut cmd = ns.command(&skiff_bin().to_string_lossy());
    cmd.arg("run")
        .arg("--kernel")
        .arg(&images.vmlinux)
        .arg("--initrd")
        .arg(initrd)
        .args([
            "--cpus",
            "2",
            "--memory",
            "size=512M",
            "--cmdline",
            &cmdline,
        ])
        .args([
            "--disk",
            &disk_spec,
            "--net",
            "tap=sklnx0",
            "--rng",
            "--console",
            "--vhost-user",
            &vhost_spec,
            "--vsock",
            &vsock_spec,
        ])
        .args(["--timeout", "900"])
        // skiff says at info level when the guest's vsock driver started the device.
        .env("SKIFF_LOG", "info");
    let mut vm = Skiff::spawn_command(&mut cmd);
    vm.wait_for_line("Run /init as init process", Duration::from_secs(900));
    if !pvm {
        vm.wait_for_line("skiff-init: started", Duration::from_secs(60));
    }
    let log = vm.stdout_text();
    let skiff_log = vm.stderr_text();
    drop(vm);
    // virtio_vsock prints nothing when it probes; the probe shows as the driver setting
    // DRIVER_OK on the device (skiff's log), next to the address family (af_vsock) and the
    // PCI function (1af4:1053, modern virtio-vsock).
    assert!(
        skiff_log.contains("virtio-vsock: driver ready, guest CID 3"),
        "the guest's vsock driver never started the device\n{skiff_log}"
    );

    // The e820 map skiff wrote: low RAM below the EBDA, the reserved legacy area, RAM from 1 MiB
    // to the end of the 512 MiB guest, and the reserved ECAM window.
    for line in [
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
        "BIOS-e820: [mem 0x00000000e0000000-0x00000000e00fffff] reserved",
        // Both vCPUs, from the MADT.
        "Brought up 1 node, 2 CPUs",
        "ACPI: APIC 0x00000000000E",
        // PCI through the DSDT's host bridge and the MCFG's ECAM.
        "PCI host bridge to bus 0000:00",
        // The 64 MiB virtio-blk disk, with its capacity.
        "[vda] 131072 512-byte logical blocks",
        // The 32 MiB vhost-user-blk disk, and its partition table read through the backend.
        "[vdb] 65536 512-byte logical blocks",
        " vdb: vdb1",
        // virtio-net came up as eth0 (kernel IP autoconfiguration).
        "device=eth0",
        // virtio-console became a console.
        "console [hvc0] enabled",
        // vsock: the address family and the virtio-vsock PCI function.
        "NET: Registered PF_VSOCK protocol family",
        "[1af4:1053]",
    ] {
        assert!(log.contains(line), "kernel log lacks {line:?}\n{log}");
    }
}

/// A disk image of `size` bytes whose MBR holds one Linux partition from sector 2048 on.
fn mbr_with_one_partition(size: u64) -> Vec<u8> {
    let mut image = vec![0u8; usize::try_from(size).unwrap()];
    let sectors = u32::try_from(size / 512).unwrap();
    let entry = &mut image[0x1be..0x1ce];
    entry[4] = 0x83; // Linux
    entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
    entry[12..16].copy_from_slice(&(sectors - 2048).to_le_bytes());
    image[510] = 0x55;
    image[511] = 0xaa;
    image
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
        images.initramfs_min.as_os_str(),
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

/// A kernel log line printed early in the boot (about 10-20 s in on a PVM host, where
/// `Run /init` comes after 60-90 s): both CPUs are up, the ACPI interpreter, PCI and most
/// initcalls are still to come.
const EARLY_BOOT_LINE: &str = "devtmpfs: initialized";

#[test]
fn minimal_kernel_snapshotted_mid_boot_restores_and_boots_on() {
    require_kvm();
    let images = linux_images();
    let pvm = pvm_host();
    let root = tempfile::tempdir().unwrap();
    let sock = root.path().join("api.sock");
    let snap = root.path().join("snap");
    // Serial only: this test is about the vCPU and platform state of a kernel caught mid-boot
    // (virtio devices mid-run have their own tests in snapshot_virtio.rs). The minimal
    // initramfs on both tiers: its init prints a marker and powers off where user space runs.
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 {PVM_SAFE_ARGS}");
    let mut vm = Skiff::spawn(&[
        "run".as_ref(),
        "--kernel".as_ref(),
        images.vmlinux.as_os_str(),
        "--initrd".as_ref(),
        images.initramfs_min.as_os_str(),
        "--cpus".as_ref(),
        "2".as_ref(),
        "--memory".as_ref(),
        "size=512M".as_ref(),
        "--cmdline".as_ref(),
        cmdline.as_ref(),
        "--api-socket".as_ref(),
        sock.as_os_str(),
        "--timeout".as_ref(),
        "900".as_ref(),
    ]);
    vm.wait_for_line(EARLY_BOOT_LINE, Duration::from_secs(600));
    let summary = snapshot_support::ctl_ok(&sock, &["snapshot", snap.to_str().unwrap(), "--stop"]);
    assert_eq!(summary["stopped"], true, "{summary}");
    let first = vm.wait(Duration::from_secs(120));
    first.assert_code(0);
    assert!(
        !first.stdout.contains("Run /init"),
        "the snapshot was meant to be taken mid-boot:\n{}",
        first.stdout
    );

    let mut restored = Skiff::spawn(&["restore", snap.to_str().unwrap(), "--timeout", "900"]);
    restored.wait_for_line("Run /init as init process", Duration::from_secs(900));
    // PVM: init's first system call faults, the kernel panics and `panic=-1` resets the VM
    // (exit code 120). Hardware KVM: the minimal init prints its marker and powers off.
    let expected = if pvm {
        restored.wait_for_line("Kernel panic - not syncing", Duration::from_secs(300));
        120
    } else {
        restored.wait_for_line("skiff-init: started", Duration::from_secs(300));
        0
    };
    let r = restored.wait(Duration::from_secs(300));
    r.assert_code(expected);
    // It went on from the snapshot: no second boot, and the kernel saw no lockup or stall
    // across the pause.
    for bad in [
        "Linux version",
        "soft lockup",
        "rcu_sched self-detected stall",
        "Oops",
    ] {
        assert!(
            !r.stdout.contains(bad),
            "the restored kernel printed {bad:?}:\n{}",
            r.stdout
        );
    }
}
