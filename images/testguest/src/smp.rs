//! The `smp` scenario: counts CPUs from the ACPI MADT, starts every AP with INIT-SIPI-SIPI
//! through the xAPIC and waits for each to check in. Also owns the 16-bit AP trampoline and
//! `ap_main`.
//!
//! The BSP side runs in CPL3 (the LAPIC page is identity-mapped user-accessible and uncached, and
//! `rdtsc` is native there). APs never leave CPL0: each runs the trampoline (real -> protected ->
//! long mode, shared with the BSP's path in entry.rs), prints one line, bumps `ONLINE`, and
//! halts with interrupts off, so parked APs cost the host nothing. Before halting, an AP kicks
//! the virtio notify register in `KICK_ADDR` if a scenario set one (`virtio-abuse`: kicks from
//! several vCPUs at once), a bounded number of times.
use core::arch::global_asm;
use core::arch::x86_64::{__cpuid, _rdtsc, CpuidResult};
use core::hint::spin_loop;
use core::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};

use crate::acpi;
use crate::bootinfo::BootInfo;
use crate::lapic::{self, Lapic};
use crate::scenario::{fail, fail_msg};
use crate::{cpu, serial};

/// Physical page the trampoline is copied to; the SIPI vector is its page number.
pub const TRAMPOLINE: u64 = 0x8000;
/// Highest APIC ID with an AP stack (entry.rs sizes the stacks from it).
pub const MAX_APIC_ID: u32 = 63;

const ICR_INIT_ASSERT: u32 = 0x0000_4500;
const ICR_STARTUP: u32 = 0x0000_4600;
/// How long the BSP waits for all APs, in microseconds.
const AP_TIMEOUT_US: u64 = 10_000_000;
/// TSC rate assumed when CPUID reports none.
const DEFAULT_TSC_MHZ: u64 = 3000;

/// APs that have printed their line.
static ONLINE: AtomicU32 = AtomicU32::new(0);

/// A virtio notify register each AP writes `KICK_VALUE` to once online (0: none), until
/// `KICK_STOP` is set or it has kicked `AP_KICKS` times; `KICKED` counts the kicks.
pub static KICK_ADDR: AtomicU64 = AtomicU64::new(0);
pub static KICK_VALUE: AtomicU16 = AtomicU16::new(0);
pub static KICK_STOP: AtomicBool = AtomicBool::new(false);
pub static KICKED: AtomicU32 = AtomicU32::new(0);
/// APs that have finished kicking (their kicks are in `KICKED`).
pub static KICKERS_DONE: AtomicU32 = AtomicU32::new(0);
/// Most kicks per AP (CPL0 is emulated: each costs a few microseconds and a VM exit).
const AP_KICKS: u32 = 1000;

global_asm!(
    r#"
    /* Copied to {tramp} and entered by SIPI in real mode with CS = {tramp} >> 4, IP = 0.
     * Position-independent: data is addressed as {tramp} + offset with DS = 0. */
    .pushsection .text.ap_trampoline, "ax"
    .code16
    .global ap_trampoline_start
ap_trampoline_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl {tramp} + ap_tramp_gdt_desc - ap_trampoline_start
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl ${kernel_cs32}, $ap_entry32
    .balign 8
ap_tramp_gdt_desc:
    .word {gdt_limit}
    .quad tg_gdt
    .global ap_trampoline_end
ap_trampoline_end:
    .code64
    .popsection
"#,
    tramp = const TRAMPOLINE,
    kernel_cs32 = const cpu::KERNEL_CS32,
    gdt_limit = const cpu::GDT_LIMIT,
    options(att_syntax)
);

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
}

/// AP entry from entry.rs, in CPL0 on the AP's own stack. Kept short: CPL0 is emulated.
pub extern "C" fn ap_main(apic_id: u32) -> ! {
    serial::line()
        .str("testguest: smp cpu ")
        .dec(apic_id.into())
        .str(" online\n");
    ONLINE.fetch_add(1, Ordering::Release);
    let addr = KICK_ADDR.load(Ordering::Acquire);
    if addr != 0 {
        let value = KICK_VALUE.load(Ordering::Relaxed);
        let mut kicks = 0;
        while kicks < AP_KICKS && !KICK_STOP.load(Ordering::Acquire) {
            // SAFETY: the scenario set `addr` to a virtio notify register in the identity-mapped,
            // uncached MMIO hole; the store reaches the device, never a Rust object.
            unsafe { core::ptr::write_volatile(addr as *mut u16, value) };
            kicks += 1;
        }
        KICKED.fetch_add(kicks, Ordering::Release);
        KICKERS_DONE.fetch_add(1, Ordering::Release);
    }
    cpu::park()
}

/// CPUID leaf `leaf`. `__cpuid` became a safe function only in recent Rust.
#[allow(unused_unsafe)]
fn cpuid(leaf: u32) -> CpuidResult {
    // SAFETY: CPUID is always available in long mode and has no side effects.
    unsafe { __cpuid(leaf) }
}

/// TSC rate for timeouts only. CPUID runs in CPL3 here and may report the host's leaves under
/// PVM, which is good enough for a delay.
fn tsc_mhz() -> u64 {
    let max_leaf = cpuid(0).eax;
    if max_leaf >= 0x16 {
        let base_mhz = cpuid(0x16).eax & 0xffff;
        if base_mhz != 0 {
            return base_mhz.into();
        }
    }
    if max_leaf >= 0x15 {
        let l = cpuid(0x15);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            return u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax) / 1_000_000;
        }
    }
    DEFAULT_TSC_MHZ
}

fn rdtsc() -> u64 {
    // SAFETY: CR4.TSD is clear (entry.rs), so rdtsc works in CPL3; it has no side effects.
    unsafe { _rdtsc() }
}

fn delay_us(us: u64, mhz: u64) {
    let start = rdtsc();
    while rdtsc().wrapping_sub(start) < us * mhz {
        spin_loop();
    }
}

/// Copies the trampoline to its page. Refuses if that page holds an ACPI table.
fn install_trampoline(info: &BootInfo) {
    let mut clash = false;
    acpi::for_each_table(info.rsdp_paddr, |s, e| {
        clash |= s < TRAMPOLINE + 4096 && e > TRAMPOLINE;
    });
    if clash {
        fail(|w| {
            w.str("an ACPI table overlaps the AP trampoline page ")
                .hex(TRAMPOLINE);
        });
    }
    let src = core::ptr::addr_of!(ap_trampoline_start);
    let len = core::ptr::addr_of!(ap_trampoline_end) as usize - src as usize;
    // SAFETY: the source is the trampoline's bytes in the image; the destination page is RAM
    // below 1 MiB that holds nothing the guest still needs (start_info was copied at boot, no
    // ACPI table is there); the two do not overlap.
    unsafe { core::ptr::copy_nonoverlapping(src, TRAMPOLINE as *mut u8, len) };
}

/// Starts every AP and waits for each to check in; returns the CPU count.
pub fn run(info: &BootInfo) -> u32 {
    let madt = lapic::madt(info);
    let ids = madt.apic_ids();
    serial::line()
        .str("testguest: smp cpus=")
        .dec(ids.len() as u64)
        .str("\n");
    if ids.is_empty() {
        fail_msg("MADT lists no enabled CPU");
    }
    let lapic = Lapic::new(&madt);
    // The LAPIC ID register, not CPUID: CPUID in CPL3 may return the host's APIC ID under PVM.
    let bsp = (lapic.read(lapic::ID) >> 24) as u8;
    if !ids.contains(&bsp) {
        fail(|w| {
            w.str("the BSP's APIC ID ")
                .dec(bsp.into())
                .str(" is not in the MADT");
        });
    }
    if let Some(&id) = ids.iter().find(|&&id| u32::from(id) > MAX_APIC_ID) {
        fail(|w| {
            w.str("APIC ID ")
                .dec(id.into())
                .str(" is above the supported maximum ")
                .dec(MAX_APIC_ID.into());
        });
    }

    let aps = ids.len() as u32 - 1;
    if aps > 0 {
        install_trampoline(info);
        // Software-enable the BSP's APIC (spurious vector 0xff); IF stays 0, nothing is delivered.
        lapic.write(lapic::SVR, lapic::SVR_ENABLE | 0xff);
        let mhz = tsc_mhz();
        let before = ONLINE.load(Ordering::Acquire);
        let vector = (TRAMPOLINE >> 12) as u32;
        for &id in ids.iter().filter(|&&id| id != bsp) {
            lapic.send_ipi(id, ICR_INIT_ASSERT);
            delay_us(10_000, mhz);
            lapic.send_ipi(id, ICR_STARTUP | vector);
            delay_us(200, mhz);
            lapic.send_ipi(id, ICR_STARTUP | vector);
        }
        let start = rdtsc();
        while ONLINE.load(Ordering::Acquire) - before < aps {
            if rdtsc().wrapping_sub(start) > AP_TIMEOUT_US * mhz {
                let online = ONLINE.load(Ordering::Acquire) - before;
                fail(|w| {
                    w.str("only ")
                        .dec(online.into())
                        .str(" of ")
                        .dec(aps.into())
                        .str(" APs came online within 10 s");
                });
            }
            spin_loop();
        }
    }
    serial::line()
        .str("testguest: smp ok cpus=")
        .dec(ids.len() as u64)
        .str("\n");
    ids.len() as u32
}
