//! Time from the TSC, read in CPL3 (native there; CR4.TSD is clear): the TSC rate for reports and
//! deadlines for bounded polling.
//!
//! The rate comes from CPUID, also executed in CPL3. Under PVM that returns the host's leaves
//! rather than the guest's, which is what a guest whose TSC runs at the host's rate wants. Order:
//! the hypervisor timing leaf 0x4000_0010 (TSC kHz), then leaf 0x15 (crystal ratio), then leaf
//! 0x16 (base MHz). With none of them `khz` reports 0 and deadlines assume 3 GHz.
use core::arch::x86_64::{__cpuid, _rdtsc, CpuidResult};
use core::sync::atomic::{AtomicU64, Ordering};

/// TSC rate assumed for deadlines when CPUID gives none.
const DEFAULT_KHZ: u64 = 3_000_000;
/// CPUID leaf 1 ECX bit 31: running under a hypervisor.
const HYPERVISOR_BIT: u32 = 1 << 31;
/// `khz()` once computed; `u64::MAX` before (CPUID can exit to the host, so it is asked once).
static KHZ: AtomicU64 = AtomicU64::new(u64::MAX);

/// CPUID leaf `leaf`. `__cpuid` became a safe function only in recent Rust.
#[allow(unused_unsafe)]
fn cpuid(leaf: u32) -> CpuidResult {
    // SAFETY: CPUID is always available in long mode and has no side effects.
    unsafe { __cpuid(leaf) }
}

/// The TSC now.
pub fn now() -> u64 {
    // SAFETY: CR4.TSD is clear (entry.rs), so rdtsc works in CPL3; it has no side effects.
    unsafe { _rdtsc() }
}

/// The TSC rate in kHz from CPUID, or 0 if CPUID does not say.
pub fn khz() -> u64 {
    let cached = KHZ.load(Ordering::Relaxed);
    if cached != u64::MAX {
        return cached;
    }
    let khz = khz_from_cpuid();
    KHZ.store(khz, Ordering::Relaxed);
    khz
}

fn khz_from_cpuid() -> u64 {
    if cpuid(1).ecx & HYPERVISOR_BIT != 0 && cpuid(0x4000_0000).eax >= 0x4000_0010 {
        let khz = cpuid(0x4000_0010).eax;
        if khz != 0 {
            return khz.into();
        }
    }
    let max_leaf = cpuid(0).eax;
    if max_leaf >= 0x15 {
        let l = cpuid(0x15);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            return u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax) / 1000;
        }
    }
    if max_leaf >= 0x16 {
        let mhz = cpuid(0x16).eax & 0xffff;
        if mhz != 0 {
            return u64::from(mhz) * 1000;
        }
    }
    0
}

/// The TSC rate in kHz for time arithmetic: `khz()`, or the assumed default when CPUID says none.
fn khz_or_default() -> u64 {
    match khz() {
        0 => DEFAULT_KHZ,
        k => k,
    }
}

/// Milliseconds of TSC time from `earlier` to `later` (0 if `later` is not after `earlier`).
pub fn ms_between(earlier: u64, later: u64) -> u64 {
    later.saturating_sub(earlier) / khz_or_default()
}

/// A point in TSC time after which bounded polls give up.
#[derive(Clone, Copy)]
pub struct Deadline(u64);

impl Deadline {
    /// `ms` milliseconds from now.
    pub fn after_ms(ms: u64) -> Deadline {
        Deadline(now().saturating_add(ms.saturating_mul(khz_or_default())))
    }

    /// Whether the deadline has passed.
    pub fn passed(&self) -> bool {
        now() > self.0
    }
}
