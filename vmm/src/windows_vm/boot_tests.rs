use super::*;
use std::io::Write;

use crate::kernel_image::tests::pvh_elf;

const RAM_SIZE: u64 = 32 << 20;

fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f
}

fn files(kernel: &Path, initrd: Option<&Path>, cmdline: &str) -> BootFiles {
    BootFiles {
        kernel: kernel.to_path_buf(),
        initrd: initrd.map(Path::to_path_buf),
        cmdline: cmdline.into(),
        cpus: 2,
    }
}

#[test]
fn bad_command_lines_and_files_are_refused() {
    let ram = arch::layout::ram_ranges(RAM_SIZE).unwrap();
    let mem =
        vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
    let kernel = file_with(&pvh_elf());
    let err = |f: &BootFiles| crate::error_chain(&load_guest(&mem, &ram, f).unwrap_err());
    let long = "x".repeat(CMDLINE_MAX_SIZE);
    assert_eq!(
        err(&files(kernel.path(), None, &long)),
        format!("kernel command line (4096 bytes) is invalid or longer than the 4095-byte limit")
    );
    assert!(err(&files(kernel.path(), None, "a\nb")).contains("(3 bytes) is invalid"));
    let dir = tempfile::tempdir().unwrap();
    let msg = err(&files(dir.path(), None, "x"));
    assert!(
        msg.starts_with("cannot read kernel ") && msg.ends_with("not a regular file"),
        "{msg}"
    );
    let missing = dir.path().join("missing");
    assert!(err(&files(&missing, None, "x")).starts_with("cannot read kernel "));
    let junk = file_with(b"MZ\x90\x00");
    assert!(err(&files(junk.path(), None, "x"))
        .ends_with("not an ELF or bzImage (first bytes 4d 5a 90 00)"));
    let big = file_with(&vec![0u8; 31 << 20]);
    let msg = err(&files(kernel.path(), Some(big.path()), "x"));
    assert!(
        msg.contains("does not fit in guest RAM between the kernel's end 0x308000"),
        "{msg}"
    );
}

/// The Windows loader and the Linux path's `boot::prepare_boot` (linux-loader) leave the same
/// bytes in guest memory and the same boot registers, for a PVH ELF and a bzImage, each with
/// an initrd.
#[cfg(target_os = "linux")]
mod against_the_linux_path {
    use super::*;
    use devices::guest_memory::TrackedGuestMemory;

    fn compare(kernel: &[u8]) {
        let kernel = file_with(kernel);
        let initrd = file_with(&(0..20_000u32).map(|i| (i % 253) as u8).collect::<Vec<_>>());
        let ram = arch::layout::ram_ranges(RAM_SIZE).unwrap();
        let cmdline = "console=ttyS0 reboot=k panic=-1";
        let ours = TrackedGuestMemory::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let boot = load_guest(
            &ours,
            &ram,
            &files(kernel.path(), Some(initrd.path()), cmdline),
        )
        .unwrap();
        let theirs = TrackedGuestMemory::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let linux = crate::boot::prepare_boot(
            &theirs,
            &ram,
            &crate::boot::BootConfig {
                kernel: kernel.path().to_path_buf(),
                initrd: Some(initrd.path().to_path_buf()),
                cmdline: cmdline.into(),
                cpus: 2,
            },
        )
        .unwrap();
        assert_eq!(boot.regs, linux.regs);
        assert_eq!(boot.protocol, linux.protocol);
        let mut a = vec![0u8; 32 << 20];
        let mut b = vec![0u8; 32 << 20];
        ours.read_slice(&mut a, GuestAddress(0)).unwrap();
        theirs.read_slice(&mut b, GuestAddress(0)).unwrap();
        let first_difference = a.iter().zip(&b).position(|(x, y)| x != y);
        assert_eq!(first_difference, None, "guest memory differs");
    }

    #[test]
    fn pvh_elf() {
        compare(&super::pvh_elf());
    }

    #[test]
    fn bzimage() {
        let payload: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        compare(&crate::kernel_image::tests::bzimage(17, 0x20f, 1, &payload));
    }
}
