//! The local APIC through its xAPIC MMIO page, from CPL3: found through the ACPI MADT, its
//! registers, IPIs (for `smp`) and the timer registers (for `timer.rs`).
//!
//! The page is identity-mapped user-accessible and uncached (`paging.rs`), so every access is a
//! plain volatile load or store, and a VM exit to the in-kernel LAPIC. Deliberately not here:
//! what the IPIs and the timer are used for.
use crate::acpi::{self, Madt, RootTable};
use crate::bootinfo::BootInfo;
use crate::paging;
use crate::scenario::{fail, fail_msg};

pub const ID: u64 = 0x20;
pub const EOI: u64 = 0xb0;
pub const SVR: u64 = 0xf0;
pub const ICR_LOW: u64 = 0x300;
pub const ICR_HIGH: u64 = 0x310;
pub const LVT_TIMER: u64 = 0x320;
pub const TIMER_INITIAL_COUNT: u64 = 0x380;
pub const TIMER_CURRENT_COUNT: u64 = 0x390;
pub const TIMER_DIVIDE: u64 = 0x3e0;

/// SVR bit 8: the APIC is software-enabled (else every LVT entry stays masked).
pub const SVR_ENABLE: u32 = 1 << 8;
/// LVT mask bit.
pub const LVT_MASKED: u32 = 1 << 16;
/// LVT timer mode bits 18:17 = 01: periodic.
pub const LVT_TIMER_PERIODIC: u32 = 1 << 17;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;

/// The ACPI MADT, or a FAIL line saying why there is none.
pub fn madt(info: &BootInfo) -> Madt {
    let Some(rsdp) = acpi::find_rsdp(info.rsdp_paddr) else {
        fail(|w| {
            w.str("no ACPI RSDP (start_info rsdp_paddr ")
                .hex(info.rsdp_paddr)
                .str(", none in 0xe0000-0xfffff)");
        })
    };
    let root = RootTable::new(rsdp).unwrap_or_else(|e| fail_msg(e));
    let Some(addr) = root.find(b"APIC") else {
        fail_msg("no MADT (APIC) table in the RSDT/XSDT")
    };
    Madt::parse(addr).unwrap_or_else(|e| fail_msg(e))
}

/// The calling CPU's local APIC (every CPU sees its own at the same address).
pub struct Lapic {
    base: u64,
}

impl Lapic {
    /// The LAPIC at the MADT's base, mapped; a FAIL line if the base is unusable.
    pub fn new(madt: &Madt) -> Lapic {
        let base = madt.lapic_base;
        if base == 0 || base & 0xfff != 0 || !paging::map(base, base + 4096) {
            fail(|w| {
                w.str("unusable local APIC base ").hex(base);
            });
        }
        Lapic { base }
    }

    /// Physical (and virtual: identity-mapped) address of register `reg`.
    pub fn addr(&self, reg: u64) -> u64 {
        self.base + reg
    }

    pub fn write(&self, reg: u64, value: u32) {
        // SAFETY: `base` is the LAPIC MMIO page, which `new` had `paging::map` make accessible
        // (user, uncached); the access is an aligned 32-bit volatile store.
        unsafe { ((self.base + reg) as *mut u32).write_volatile(value) };
    }

    pub fn read(&self, reg: u64) -> u32 {
        // SAFETY: as for `write`.
        unsafe { ((self.base + reg) as *const u32).read_volatile() }
    }

    /// Sends `icr_low` to `apic_id` and waits (bounded) until the APIC has sent it.
    pub fn send_ipi(&self, apic_id: u8, icr_low: u32) {
        self.write(ICR_HIGH, u32::from(apic_id) << 24);
        self.write(ICR_LOW, icr_low);
        for _ in 0..1_000_000 {
            if self.read(ICR_LOW) & ICR_DELIVERY_PENDING == 0 {
                return;
            }
            core::hint::spin_loop();
        }
    }
}
