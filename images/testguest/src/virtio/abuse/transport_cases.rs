//! The `virtio-abuse` cases that misprogram the transport: queue sizes, ring addresses, MSI-X
//! vectors, queue selects and BAR accesses.
use super::report::{fail_case, Parts};
use super::rig::{raw_read, raw_write, Outcome, Rig};
use super::{COMMON_CFG_END, FAR, SIZE};
use crate::virtio::{
    CONFIG_GENERATION, DEVICE_FEATURE, DEVICE_FEATURE_SELECT, MSIX_CONFIG, NO_VECTOR, QUEUE_DESC,
    QUEUE_ENABLE, QUEUE_MSIX_VECTOR, QUEUE_SELECT, QUEUE_SIZE,
};

/// Case 1: queue_size 3, then enable and DRIVER_OK: NEEDS_RESET, or the size write refused.
pub(super) fn queue_size(rigs: &mut [Rig]) -> Parts {
    let mut p = Parts::new();
    for r in rigs.iter_mut() {
        r.restart();
        let c = r.dev.common;
        c.write::<u16>(QUEUE_SELECT, r.qi);
        c.write::<u16>(QUEUE_SIZE, 3);
        let back = c.read::<u16>(QUEUE_SIZE);
        let at_write = r.needs_reset();
        // Carry on as a driver that did not look.
        r.program(None, r.rings());
        r.driver_ok();
        let at_driver_ok = r.needs_reset();
        let what = match (at_write, at_driver_ok) {
            (true, _) => "needs-reset-at-write",
            (false, true) => "needs-reset-at-driver-ok",
            (false, false) if back != 3 => "size-refused",
            _ => fail_case(
                "queue-size",
                r.name,
                "size 3",
                "accepted, reads back",
                back.into(),
            ),
        };
        p.add(r.name, what, None);
        p.add("size-reads", "", Some(back.into()));
    }
    for r in rigs.iter_mut() {
        r.restart();
    }
    p
}

/// Case 2: Rings outside guest RAM: NEEDS_RESET at enable, DRIVER_OK or the first kick.
pub(super) fn ring_address(rigs: &mut [Rig]) -> Parts {
    let mut p = Parts::new();
    for r in rigs.iter_mut() {
        let (d, a, u) = r.rings();
        let straddle = r.ram_end.saturating_sub(16);
        for (what, rings) in [
            ("desc", (FAR, a, u)),
            ("avail", (d, FAR, u)),
            ("used", (d, a, FAR)),
            ("used-at-ram-end", (d, a, straddle)),
        ] {
            r.restart();
            r.program(Some(SIZE), rings);
            let when = if r.needs_reset() {
                "enable"
            } else {
                r.driver_ok();
                if r.needs_reset() {
                    "driver-ok"
                } else {
                    r.post_valid();
                    match r.wait() {
                        Outcome::NeedsReset => "kick",
                        Outcome::Used(_) => fail_case(
                            "ring-address",
                            r.name,
                            what,
                            "ring outside RAM was used, status",
                            r.status().into(),
                        ),
                        Outcome::Timeout => fail_case(
                            "ring-address",
                            r.name,
                            what,
                            "no NEEDS_RESET after a kick, status",
                            r.status().into(),
                        ),
                    }
                }
            };
            p.add(r.name, what, None);
            p.add("at", when, None);
        }
        r.restart();
    }
    p
}

/// Case 8: MSI-X vectors beyond the table read back as NO_VECTOR.
pub(super) fn msix_vector(rigs: &mut [Rig]) -> Parts {
    let mut p = Parts::new();
    for r in rigs.iter_mut() {
        r.restart();
        let c = r.dev.common;
        c.write::<u16>(QUEUE_SELECT, r.qi);
        let table = r.msix_table;
        let mut refused = 0u64;
        for v in [500u16, table, 0x7fff, 0xfffe] {
            if v < table {
                continue;
            }
            c.write::<u16>(QUEUE_MSIX_VECTOR, v);
            let q = c.read::<u16>(QUEUE_MSIX_VECTOR);
            c.write::<u16>(MSIX_CONFIG, v);
            let m = c.read::<u16>(MSIX_CONFIG);
            if q != NO_VECTOR {
                fail_case(
                    "msix-vector",
                    r.name,
                    "queue vector",
                    "out of range reads back",
                    q.into(),
                );
            }
            if m != NO_VECTOR {
                fail_case(
                    "msix-vector",
                    r.name,
                    "config vector",
                    "out of range reads back",
                    m.into(),
                );
            }
            refused += 1;
        }
        p.add(r.name, "no-vector", Some(refused));
        p.add("table-size", "", Some(table.into()));
        r.restart();
    }
    p
}

/// Queue selectors beyond num_queues: queue_size reads 0, writes change nothing.
pub(super) fn queue_select(rigs: &mut [Rig]) -> Parts {
    let mut p = Parts::new();
    for r in rigs.iter_mut() {
        r.restart();
        let c = r.dev.common;
        for sel in [r.num_queues, 0xffff] {
            c.write::<u16>(QUEUE_SELECT, sel);
            c.write::<u16>(QUEUE_SIZE, SIZE);
            c.write::<u32>(QUEUE_DESC, r.desc.base() as u32);
            c.write::<u16>(QUEUE_ENABLE, 1);
            let size = c.read::<u16>(QUEUE_SIZE);
            let enable = c.read::<u16>(QUEUE_ENABLE);
            if size != 0 || enable != 0 {
                fail_case(
                    "queue-select",
                    r.name,
                    "a missing queue",
                    "reads size|enable<<16",
                    u64::from(size) | u64::from(enable) << 16,
                );
            }
        }
        c.write::<u16>(QUEUE_SELECT, r.qi);
        let size0 = c.read::<u16>(QUEUE_SIZE);
        let desc0 = c.read::<u32>(QUEUE_DESC);
        if size0 != r.max || desc0 != 0 {
            fail_case(
                "queue-select",
                r.name,
                "queue 0",
                "changed by writes to a missing queue, size",
                size0.into(),
            );
        }
        p.add(r.name, "ignored", None);
        p.add("num-queues", "", Some(r.num_queues.into()));
        r.restart();
    }
    p
}

/// Case 9: Unaligned and out-of-range BAR accesses: reads give zero or all-ones, writes change
/// nothing, the VM stays up.
pub(super) fn bar_access(rigs: &mut [Rig]) -> Parts {
    let mut p = Parts::new();
    for r in rigs.iter_mut() {
        r.restart();
        let c = r.dev.common;
        let common = c.base();
        let status = r.status();
        c.write::<u32>(DEVICE_FEATURE_SELECT, 1);
        let features_hi = c.read::<u32>(DEVICE_FEATURE);
        let end = r.bar + r.bar_size;
        // Reads past the structure's end and at the BAR's end: zero or all-ones.
        let mut zeros = 0u64;
        for (addr, width) in [
            (common + COMMON_CFG_END + 4, 4),
            (common + 0x3f, 4),
            (common + 0x3d, 2),
            (common + 0x39, 1),
            (end - 16, 4),
            (end - 4, 4),
            (end - 8, 8),
        ] {
            let v = raw_read(addr, width);
            let ones = u64::MAX >> (64 - 8 * width);
            if v != 0 && v != ones {
                fail_case(
                    "bar-access",
                    r.name,
                    "read",
                    "at BAR offset got",
                    (addr - r.bar) << 32 | (v & 0xffff_ffff),
                );
            }
            zeros += u64::from(v == 0);
        }
        // Unaligned reads inside the structure, and a 64-bit read: any value, no crash.
        let _ = raw_read(common + 0x13, 4);
        let _ = raw_read(common + 0x01, 2);
        let _ = raw_read(common + QUEUE_DESC, 8);
        // Writes past the structure's end, at the BAR's end and just past it.
        raw_write(common + COMMON_CFG_END, 4, 0xffff_ffff);
        raw_write(common + 0x3d, 4, 0);
        raw_write(common + 0x3f, 2, 0xffff);
        raw_write(end - 16, 4, 0);
        raw_write(end - 4, 4, 0);
        // A read across the BAR's end (the next page may be another device's): any value.
        let _ = raw_read(end - 2, 4);
        let after = r.status();
        let hi_after = c.read::<u32>(DEVICE_FEATURE);
        if after != status || hi_after != features_hi {
            fail_case(
                "bar-access",
                r.name,
                "writes outside the structure",
                "changed the status to",
                after.into(),
            );
        }
        // Unaligned writes across fields inside the structure: anything may happen but a
        // crash; the reset below must still work.
        raw_write(common + CONFIG_GENERATION, 2, 0);
        raw_write(common + 0x17, 2, 0);
        let odd = r.status();
        p.add(r.name, "zero-reads", Some(zeros));
        p.add("status-after-unaligned-writes", "", Some(odd.into()));
        r.restart();
    }
    p
}
