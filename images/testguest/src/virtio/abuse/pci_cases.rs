//! The `virtio-abuse` cases that misprogram PCI itself: MSI-X entries with addresses outside
//! the local APIC's 0xFEE… window, writes to the (read-only) pending-bit array, mask storms on
//! an entry and on the whole function; writes to the read-only capability list, the ROM BAR
//! and one half of a 64-bit BAR while memory decoding is on. After each, the device serves a
//! request again.
use super::report::{fail_case, Parts};
use super::rig::{Outcome, Rig};
use super::{CAP_ID_MSIX, REG_BAR0};
use crate::bootinfo::BootInfo;
use crate::mmio::Region;
use crate::pci::{Function, Pci};
use crate::virtio::{MODERN_ID_BASE, NO_VECTOR, QUEUE_MSIX_VECTOR, QUEUE_SELECT, VENDOR};

const REG_CAP_PTR: u16 = 0x34;
const REG_ROM: u16 = 0x30;
const MSIX_ENABLE: u32 = 1 << 31;
const MSIX_FUNCTION_MASK: u32 = 1 << 30;
/// Mask and unmask rounds of each storm (each access is a VM exit).
const STORM: u32 = 64;

fn function(pci: &Pci, r: &Rig) -> Function {
    pci.find(VENDOR, MODERN_ID_BASE + r.kind)
        .unwrap_or_else(|| fail_case("pci", r.name, "device", "vanished, type", r.kind.into()))
}

/// A request after the abuse: served (or the device asks for a reset, which the next case's
/// restart gives it).
fn still_serves(r: &mut Rig, case: &str, what: &str) -> &'static str {
    r.post_valid();
    match r.wait() {
        Outcome::Used(_) => "served",
        Outcome::NeedsReset => "needs-reset",
        Outcome::Timeout => fail_case(
            case,
            r.name,
            what,
            "no answer and no NEEDS_RESET, status",
            r.status().into(),
        ),
    }
}

/// MSI-X: entry 0 aimed at addresses outside 0xFEE…, unmasked, used by the driven queue; PBA
/// writes; mask storms. The device keeps serving; the PBA does not take writes.
pub(super) fn msix_table(info: &BootInfo, rigs: &mut [Rig]) -> Parts {
    let mut p = Parts::new();
    let pci = Pci::new(info);
    for r in rigs.iter_mut() {
        let f = function(&pci, r);
        let Some((cap, dword)) = pci
            .capabilities(f.dev)
            .find(|&(_, d)| d & 0xff == CAP_ID_MSIX)
        else {
            fail_case("msix-table", r.name, "MSI-X", "capability missing", 0)
        };
        let bars = pci.enable(&f);
        let place = |reg: u32| {
            let base = bars.get((reg & 7) as usize).copied().unwrap_or(0);
            Region::new(base + u64::from(reg & !7), 16)
                .unwrap_or_else(|| fail_case("msix-table", r.name, "BAR", "unusable", base))
        };
        let table = place(pci.read(f.dev, cap + 4));
        let pba = place(pci.read(f.dev, cap + 8));
        r.start("msix-table");
        pci.write(f.dev, cap, (dword & !MSIX_FUNCTION_MASK) | MSIX_ENABLE);
        let c = r.dev.common;
        let mut served = 0u64;
        for (lo, hi) in [
            (0x0000_1000u32, 0u32),
            (0xfed0_0000, 0),
            (0xfee0_0000, 0xffff_ffff),
        ] {
            table.write::<u32>(0, lo);
            table.write::<u32>(4, hi);
            table.write::<u32>(8, 0x31);
            table.write::<u32>(12, 0);
            c.write::<u16>(QUEUE_SELECT, r.qi);
            c.write::<u16>(QUEUE_MSIX_VECTOR, 0);
            served += u64::from(still_serves(r, "msix-table", "a bogus MSI address") == "served");
            if r.needs_reset() {
                r.start("msix-table");
            }
        }
        // The pending-bit array is read-only.
        let pending = pba.read::<u32>(0);
        pba.write::<u32>(0, u32::MAX);
        pba.write::<u32>(4, u32::MAX);
        let after = pba.read::<u32>(0);
        if after != pending && after == u32::MAX {
            fail_case(
                "msix-table",
                r.name,
                "PBA",
                "took a write, reads",
                after.into(),
            );
        }
        // Mask storms: one entry, then the whole function.
        for _ in 0..STORM {
            table.write::<u32>(12, 1);
            table.write::<u32>(12, 0);
        }
        for _ in 0..STORM {
            pci.write(f.dev, cap, dword | MSIX_ENABLE | MSIX_FUNCTION_MASK);
            pci.write(f.dev, cap, (dword & !MSIX_FUNCTION_MASK) | MSIX_ENABLE);
        }
        let after_storm = still_serves(r, "msix-table", "a request after the mask storms");
        // Put everything back: entry masked, no vector, MSI-X off.
        table.write::<u32>(12, 1);
        c.write::<u16>(QUEUE_SELECT, r.qi);
        c.write::<u16>(QUEUE_MSIX_VECTOR, NO_VECTOR);
        pci.write(f.dev, cap, dword & !(MSIX_ENABLE | MSIX_FUNCTION_MASK));
        p.add(r.name, "bogus-addresses-served", Some(served));
        p.add("after-storm", after_storm, None);
        r.restart();
    }
    p
}

/// Configuration space: the capability pointer and a `next` byte are read-only, the ROM BAR
/// reads back 0 (no ROM), the register after the device's BAR (a 64-bit BAR's upper half, or
/// an unimplemented BAR) takes all-ones without harm, and the BAR written one half at a time
/// with decoding on (moved above 4 GiB, sized in place) works again once restored.
pub(super) fn config_space(info: &BootInfo, rigs: &mut [Rig]) -> Parts {
    let mut p = Parts::new();
    let pci = Pci::new(info);
    for r in rigs.iter_mut() {
        let f = function(&pci, r);
        let dev = f.dev;
        r.restart();
        let caps_before = pci.capabilities(dev).count();
        let ptr = pci.read(dev, REG_CAP_PTR);
        pci.write(dev, REG_CAP_PTR, 0);
        if let Some((at, dword)) = pci.capabilities(dev).next() {
            pci.write(dev, at, dword & !0xff00);
        }
        let caps_after = pci.capabilities(dev).count();
        if pci.read(dev, REG_CAP_PTR) != ptr || caps_after != caps_before {
            fail_case(
                "config-space",
                r.name,
                "capability list",
                "changed by writes, now has",
                caps_after as u64,
            );
        }
        pci.write(dev, REG_ROM, u32::MAX);
        let rom = pci.read(dev, REG_ROM);
        pci.write(dev, REG_ROM, 0);
        // The BAR holding the common configuration, written one half at a time.
        let bars = pci.enable(&f);
        let index = bars.iter().position(|&b| b == r.bar).unwrap_or(0);
        let reg = REG_BAR0 + 4 * index as u16;
        let low = pci.read(dev, reg);
        let bar64 = low & 0b110 == 0b100 && index < 5;
        let status = r.status();
        let mut next_reads = 0;
        if index < 5 {
            // The upper half of a 64-bit BAR, or the next (unimplemented) BAR.
            let high = pci.read(dev, reg + 4);
            pci.write(dev, reg + 4, if bar64 { high ^ 1 } else { u32::MAX });
            next_reads = pci.read(dev, reg + 4);
            pci.write(dev, reg + 4, high);
            if !bar64 && next_reads != 0 {
                fail_case(
                    "config-space",
                    r.name,
                    "unimplemented BAR",
                    "after all-ones reads",
                    next_reads.into(),
                );
            }
        }
        pci.write(dev, reg, u32::MAX);
        pci.write(dev, reg, low);
        if r.status() != status {
            fail_case(
                "config-space",
                r.name,
                "BAR",
                "restored but the device reads status",
                r.status().into(),
            );
        }
        r.start("config-space");
        let works = still_serves(r, "config-space", "a request after the BAR writes");
        p.add(r.name, if bar64 { "bar64" } else { "bar32" }, None);
        p.add("next-bar", "", Some(next_reads.into()));
        p.add("rom", "", Some(rom.into()));
        p.add("then", works, None);
        r.restart();
    }
    p
}
