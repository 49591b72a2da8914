//! Fuzz target: the kernel loader (ELF vmlinux with or without a PVH note, bzImage) and the
//! boot preparation after it (command line, ACPI tables, PVH start_info or boot_params), into
//! 64 MiB of guest RAM, through `prepare_boot` as `skiff run` calls it. The image is written to
//! a scratch file, because skiff loads kernels from paths. A refusal must be one line.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use arch::layout::RamRange;
use devices::guest_memory::TrackedGuestMemory;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;
use vmm::boot::{prepare_boot, BootConfig};

const RAM: u64 = 64 << 20;

fn memory() -> &'static TrackedGuestMemory {
    static MEM: OnceLock<TrackedGuestMemory> = OnceLock::new();
    MEM.get_or_init(|| {
        TrackedGuestMemory::from_ranges(&[(GuestAddress(0), RAM as usize)])
            .expect("64 MiB of guest RAM")
    })
}

fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("skiff-fuzz-kernel-{}", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    if std::fs::write(path, data).is_err() {
        return;
    }
    let mem = memory();
    let cfg = BootConfig {
        kernel: path.clone(),
        initrd: None,
        cmdline: "console=ttyS0".into(),
        cpus: 2,
    };
    let ram = [RamRange {
        start: 0,
        size: RAM,
    }];
    if let Err(e) = prepare_boot(mem, &ram, &cfg) {
        let line = devices::error_chain(&e);
        assert!(!line.contains('\n'), "a multi-line error: {line:?}");
    }
});
