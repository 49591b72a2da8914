//! A periodic LAPIC timer interrupt and its tick count, for scenarios that check interrupts keep
//! arriving (`counter=N,timer`, across snapshots). Owns the interrupt vectors 32 (timer) and 47
//! (spurious), their CPL0 stubs, the calibration of the timer against the TSC, and `TICKS`.
//!
//! The xAPIC timer runs in periodic mode, set up from CPL3 through the MMIO page (`lapic.rs`).
//! Its count rate is measured against the TSC first (one-shot, masked, for `CALIBRATE_MS`), so
//! the rate is right on any host. Each interrupt enters CPL0 (emulated at about 1 us per
//! instruction on the target machines), so the stub is five instructions: count, EOI, return.
//! IF is set through `cpu::enable_interrupts`. `stop` masks the timer again; IF stays set, with
//! no source left.
use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::bootinfo::BootInfo;
use crate::lapic::{self, Lapic};
use crate::scenario::fail;
use crate::{cpu, tsc};

/// The timer's vector: the lowest one the LAPIC may deliver.
pub const VECTOR: u8 = 32;
/// The spurious-interrupt vector (SVR); its stub only returns (no EOI for spurious ones).
const SPURIOUS_VECTOR: u8 = 47;
/// How long the calibration counts, in TSC milliseconds.
const CALIBRATE_MS: u64 = 20;
/// Divide configuration 0b0011: the timer counts at the APIC bus rate / 16.
const DIVIDE_BY_16: u32 = 0b0011;

/// Interrupts taken on the timer vector since boot. Written only by the CPL0 stub.
static TICKS: AtomicU64 = AtomicU64::new(0);
/// Address of the LAPIC's EOI register, for the stub (0 until `start`).
static EOI_ADDR: AtomicU64 = AtomicU64::new(0);

global_asm!(
    r#"
    .pushsection .text.interrupts, "ax"
    .balign 16
    .global tg_timer_interrupt
tg_timer_interrupt:
    pushq %rax
    incq {ticks}(%rip)
    movq {eoi}(%rip), %rax
    movl $0, (%rax)
    popq %rax
    iretq

    .balign 16
    .global tg_spurious_interrupt
tg_spurious_interrupt:
    iretq
    .popsection
"#,
    ticks = sym TICKS,
    eoi = sym EOI_ADDR,
    options(att_syntax)
);

extern "C" {
    static tg_timer_interrupt: u8;
    static tg_spurious_interrupt: u8;
}

/// Timer ticks so far.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// The running timer.
pub struct Timer {
    lapic: Lapic,
    /// Configured rate.
    pub hz: u64,
}

/// Starts the LAPIC timer at `hz` interrupts per second on the calling CPU (the BSP) and
/// enables interrupts. FAILs if the LAPIC timer does not count.
pub fn start(info: &BootInfo, hz: u64) -> Timer {
    let lapic = Lapic::new(&lapic::madt(info));
    EOI_ADDR.store(lapic.addr(lapic::EOI), Ordering::Relaxed);
    cpu::set_gate(
        VECTOR.into(),
        core::ptr::addr_of!(tg_timer_interrupt) as u64,
    );
    cpu::set_gate(
        SPURIOUS_VECTOR.into(),
        core::ptr::addr_of!(tg_spurious_interrupt) as u64,
    );
    lapic.write(lapic::SVR, lapic::SVR_ENABLE | u32::from(SPURIOUS_VECTOR));
    lapic.write(lapic::TIMER_DIVIDE, DIVIDE_BY_16);
    // Calibrate: a masked one-shot count from the top, for CALIBRATE_MS of TSC time.
    lapic.write(lapic::LVT_TIMER, lapic::LVT_MASKED | u32::from(VECTOR));
    lapic.write(lapic::TIMER_INITIAL_COUNT, u32::MAX);
    let deadline = tsc::Deadline::after_ms(CALIBRATE_MS);
    while !deadline.passed() {
        core::hint::spin_loop();
    }
    let counted = u64::from(u32::MAX - lapic.read(lapic::TIMER_CURRENT_COUNT));
    let period = counted * 1000 / (CALIBRATE_MS * hz);
    if period == 0 || period > u64::from(u32::MAX) {
        fail(|w| {
            w.str("the LAPIC timer counted ")
                .dec(counted)
                .str(" in ")
                .dec(CALIBRATE_MS)
                .str(" ms: no usable period for ")
                .dec(hz)
                .str(" Hz");
        });
    }
    lapic.write(lapic::TIMER_INITIAL_COUNT, 0);
    lapic.write(
        lapic::LVT_TIMER,
        lapic::LVT_TIMER_PERIODIC | u32::from(VECTOR),
    );
    lapic.write(lapic::TIMER_INITIAL_COUNT, period as u32);
    cpu::enable_interrupts();
    Timer { lapic, hz }
}

impl Timer {
    /// Masks and stops the timer.
    pub fn stop(self) {
        self.lapic
            .write(lapic::LVT_TIMER, lapic::LVT_MASKED | u32::from(VECTOR));
        self.lapic.write(lapic::TIMER_INITIAL_COUNT, 0);
    }
}
