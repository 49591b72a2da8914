//! The `poweroff` and `acpi-reset` scenarios: end the VM the way an ACPI operating system does on
//! a hardware-reduced platform. `poweroff` finds the FADT's sleep control register and the DSDT's
//! `\_S5_` sleep type and writes SLP_TYP | SLP_EN; `acpi-reset` writes the FADT's reset value to
//! its reset register. Either returning means the VMM ignored the request: a FAIL.

use crate::acpi::{find_rsdp, RootTable};
use crate::bootinfo::BootInfo;
use crate::io;
use crate::paging::read;
use crate::scenario::fail_msg;
use crate::serial;

/// FADT field offsets (ACPI 6.x).
const FADT_FLAGS: u64 = 112;
const FADT_RESET_REG: u64 = 116;
const FADT_RESET_VALUE: u64 = 128;
const FADT_DSDT: u64 = 40;
const FADT_X_DSDT: u64 = 140;
const FADT_SLEEP_CONTROL_REG: u64 = 244;
/// FADT flags.
const RESET_REG_SUP: u32 = 1 << 10;
const HW_REDUCED_ACPI: u32 = 1 << 20;
/// GAS address space: system I/O.
const GAS_SYSTEM_IO: u8 = 1;
/// SLP_EN and the SLP_TYP shift in the sleep control register.
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
/// AML opcodes needed to read `Name(_S5_, Package() { n, ... })`.
const AML_PACKAGE_OP: u8 = 0x12;
const AML_ZERO_OP: u8 = 0x00;
const AML_ONE_OP: u8 = 0x01;
const AML_BYTE_PREFIX: u8 = 0x0a;

fn fadt(info: &BootInfo) -> u64 {
    let Some(rsdp) = find_rsdp(info.rsdp_paddr) else {
        fail_msg("no ACPI RSDP")
    };
    let root = RootTable::new(rsdp).unwrap_or_else(|e| fail_msg(e));
    root.find(b"FACP").unwrap_or_else(|| fail_msg("no FADT"))
}

/// The I/O port of a GAS in system I/O space.
fn gas_port(addr: u64) -> u16 {
    let space = read::<u8>(addr).unwrap_or(0xff);
    let port = read::<u64>(addr + 4).unwrap_or(0);
    if space != GAS_SYSTEM_IO || port == 0 || port > 0xffff {
        fail_msg("register is not a system I/O port");
    }
    port as u16
}

/// The first value of the DSDT's `\_S5_` package.
fn s5_sleep_type(fadt: u64) -> u8 {
    let dsdt = match read::<u64>(fadt + FADT_X_DSDT) {
        Some(x) if x != 0 => x,
        _ => u64::from(read::<u32>(fadt + FADT_DSDT).unwrap_or(0)),
    };
    let len = u64::from(read::<u32>(dsdt + 4).unwrap_or(0)).min(1 << 20);
    let byte = |a: u64| read::<u8>(a).unwrap_or(0xff);
    let mut at = dsdt + 36;
    while at + 8 < dsdt + len {
        if [byte(at), byte(at + 1), byte(at + 2), byte(at + 3)] == *b"_S5_"
            && byte(at + 4) == AML_PACKAGE_OP
        {
            // PkgLength: bits 7:6 of its first byte count the bytes that follow it.
            let pkg_len_bytes = u64::from(byte(at + 5) >> 6) + 1;
            let first = at + 5 + pkg_len_bytes + 1; // skip NumElements
            return match byte(first) {
                AML_ZERO_OP => 0,
                AML_ONE_OP => 1,
                AML_BYTE_PREFIX => byte(first + 1),
                _ => fail_msg("\\_S5_ package does not start with an integer"),
            };
        }
        at += 1;
    }
    fail_msg("no \\_S5_ object in the DSDT")
}

/// `poweroff`: ACPI S5 through the FADT's sleep control register.
pub fn poweroff(info: &BootInfo) -> ! {
    let fadt = fadt(info);
    let flags = read::<u32>(fadt + FADT_FLAGS).unwrap_or(0);
    if flags & HW_REDUCED_ACPI == 0 {
        fail_msg("FADT is not hardware-reduced");
    }
    let port = gas_port(fadt + FADT_SLEEP_CONTROL_REG);
    let sleep_type = s5_sleep_type(fadt);
    serial::line()
        .str("testguest: poweroff sleep_type=")
        .dec(sleep_type.into())
        .str("\n");
    io::outb(port, ((sleep_type & 7) << SLP_TYP_SHIFT) | SLP_EN);
    fail_msg("the VM is still running after the ACPI poweroff")
}

/// `acpi-reset`: the FADT's reset register.
pub fn reset(info: &BootInfo) -> ! {
    let fadt = fadt(info);
    if read::<u32>(fadt + FADT_FLAGS).unwrap_or(0) & RESET_REG_SUP == 0 {
        fail_msg("FADT has no reset register");
    }
    let port = gas_port(fadt + FADT_RESET_REG);
    let value = read::<u8>(fadt + FADT_RESET_VALUE).unwrap_or(0);
    serial::line().str("testguest: acpi-reset\n");
    io::outb(port, value);
    fail_msg("the VM is still running after the ACPI reset")
}
