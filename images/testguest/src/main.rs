//! testguest: a no_std PVH guest for skiff's integration tests.
//!
//! This file owns the crate layout, the Rust entry point (reached in CPL3 after `entry.rs` has
//! switched to long mode and dropped privilege) and the panic handler. It does not own any
//! assembly or hardware set-up.
#![no_std]
#![no_main]

#[cfg(not(all(target_arch = "x86_64", target_os = "none")))]
compile_error!("testguest builds only with --target x86_64-unknown-none (see README.md)");

mod acpi;
mod bootinfo;
mod counter;
mod cpu;
mod entry;
mod io;
mod lapic;
mod memcheck;
mod mmio;
mod paging;
mod pci;
mod power;
mod scenario;
mod serial;
mod smp;
mod timer;
mod tsc;
mod virtio;

use core::fmt::Write;
use core::panic::PanicInfo;

/// First Rust code on the BSP, running in CPL3 with IOPL=3. `start_info` is the physical address
/// the loader passed in `ebx`.
extern "C" fn rust_main(start_info: u64) -> ! {
    // The IDT must be valid before anything can fault; then the console. The identity map grows
    // on demand (`paging::map`).
    cpu::fill_idt();
    serial::init();

    let info = match bootinfo::BootInfo::read(start_info) {
        Ok(info) => info,
        Err(reason) => scenario::fail(|w| {
            w.str(reason)
                .str(" (start_info at ")
                .hex(start_info)
                .str(")");
        }),
    };
    serial::line()
        .str("testguest: boot cmdline=\"")
        .bytes(info.cmdline())
        .str("\"\n");
    scenario::run_all(&info)
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    {
        let mut w = serial::line_forced();
        // Formatting errors cannot happen: the writer never fails.
        let _ = write!(w, "testguest: PANIC {}", info.message());
        if let Some(loc) = info.location() {
            let _ = write!(w, " at {}:{}", loc.file(), loc.line());
        }
        w.str("\n");
    }
    io::exit(scenario::EXIT_PANIC)
}
