//! Port I/O primitives (8-bit, and 32-bit for PCI configuration) and the debug-exit port (0xf4).
//! Nothing else in the guest issues `in` or `out` directly. Works in CPL3 through RFLAGS.IOPL=3
//! and the TSS I/O bitmap (see `cpu.rs`; PVM honours only the bitmap).
use core::arch::asm;

use crate::{cpu, serial};

/// The VMM's debug-exit port: a one-byte write ends the VM with that exit code
/// (QEMU's isa-debug-exit turns `v` into `(v << 1) | 1`).
pub const EXIT_PORT: u16 = 0xf4;

/// Writes one byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O touches no memory the compiler knows about; the guest only uses the fixed
    // COM1, debug-exit and PCI configuration ports, and IOPL=3 / the TSS I/O bitmap allow it at
    // any privilege level.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads one byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`; reading COM1 registers has no memory effects.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Writes a 32-bit value to an I/O port (PCI configuration mechanism #1, see `pci.rs`).
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`; only the PCI configuration ports 0xcf8/0xcfc are used this way.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a 32-bit value from an I/O port.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outl`; reading PCI configuration data has no memory effects.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Ends the VM with `code` through the debug-exit port. If the VMM has no such port, says so on
/// the console and halts this CPU forever.
pub fn exit(code: u8) -> ! {
    outb(EXIT_PORT, code);
    serial::line()
        .str("testguest: exit port 0xf4 did not stop the VM (code ")
        .dec(code.into())
        .str("); halting\n");
    cpu::halt_forever()
}
