//! The `virtio-abuse` cases that corrupt the rings around otherwise valid requests: indirect
//! tables (empty, misaligned, nested, looping, outside RAM), an available index far ahead, a
//! used ring over the descriptors or the data, buffers in the MMIO hole, a bogus `used_event`,
//! queue and feature writes after DRIVER_OK, a reset while block I/O is in flight, and kicks
//! from several vCPUs at once.
use core::hint::spin_loop;
use core::sync::atomic::Ordering;

use super::report::{fail_case, Parts};
use super::rig::{Desc, Outcome, Rig};
use super::{
    DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, FAR, F_EVENT_IDX, SIZE, S_UNSET, T_IN, T_OUT,
    WAIT_MS,
};
use crate::bootinfo::BootInfo;
use crate::smp;
use crate::tsc::Deadline;
use crate::virtio::{
    DRIVER_FEATURE, DRIVER_FEATURE_SELECT, QUEUE_DESC, QUEUE_ENABLE, QUEUE_SELECT, QUEUE_SIZE,
};

/// Where the MMIO hole starts (the 32-bit PCI window) and the local APIC page in it.
const MMIO_HOLE: u64 = 0xe000_0000;
const LAPIC: u64 = 0xfee0_0000;

/// What happened to a chain that may be served or refused, but must not hang the device.
fn served_or_reset(r: &mut Rig, case: &str, what: &str) -> &'static str {
    match r.wait() {
        Outcome::Used(_) => "used",
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

/// Indirect tables: zero-length, not a multiple of 16, nested, looping, outside RAM and in the
/// MMIO hole are refused by every device; blk then serves a valid indirect read.
pub(super) fn indirect(rigs: &mut [Rig]) -> Parts {
    let mut p = Parts::new();
    for r in rigs.iter_mut() {
        // The table lives in the rig's spare page: a valid one-buffer table at 0x100, a second
        // table at 0x200 for the nested case. Each device gets its own valid element.
        let table = r.buf.base() + 0x100;
        let first: Desc = match &r.blk {
            Some(m) => (m.hdr.base(), 16, DESC_F_NEXT, 1),
            None if r.qi == 0 => (r.buf.base(), 64, DESC_F_WRITE, 0),
            None => (r.buf.base(), 1, 0, 0),
        };
        let cases: [(&'static str, u64, u32); 6] = [
            ("zero-length", table, 0),
            ("not-multiple-of-16", table, 40),
            ("nested", table + 0x100, 16),
            ("looping", table + 0x200, 32),
            ("outside-ram", FAR, 48),
            ("in-mmio-hole", r.bar, 48),
        ];
        for (what, addr, len) in cases {
            r.start("indirect");
            // What a console prints of a looping table: newlines only.
            r.buf.write::<u8>(0, b'\n');
            // Tables: [first] at 0x100; [indirect -> 0x100] at 0x200; a two-entry loop at 0x300.
            write_desc(r, 0x100, first);
            write_desc(r, 0x200, (table, 16, DESC_F_INDIRECT, 0));
            write_desc(r, 0x300, (first.0, first.1, first.2 | DESC_F_NEXT, 1));
            write_desc(r, 0x310, (first.0, first.1, first.2 | DESC_F_NEXT, 0));
            if let Some(m) = &r.blk {
                m.hdr.write::<u32>(0, T_IN);
                m.hdr.write::<u64>(8, 0);
                m.hdr.write::<u8>(16, S_UNSET);
            }
            r.post(&[(addr, len, DESC_F_INDIRECT, 0)]);
            let got = match r.blk.is_some() {
                true => {
                    let o = r.wait();
                    r.refused("indirect", what, o)
                }
                false => served_or_reset(r, "indirect", what),
            };
            p.add(r.name, what, None);
            p.add("got", got, None);
        }
        r.restart();
    }
    // A valid indirect read on blk: header, one sector, status.
    let r = &mut rigs[1];
    r.start("indirect");
    let m = r.mem();
    let (hdr, data) = (m.hdr.base(), m.data.base());
    m.hdr.write::<u32>(0, T_IN);
    m.hdr.write::<u64>(8, 0);
    m.hdr.write::<u8>(16, S_UNSET);
    let table = r.buf.base() + 0x100;
    write_desc(r, 0x100, (hdr, 16, DESC_F_NEXT, 1));
    write_desc(r, 0x110, (data, 512, DESC_F_WRITE | DESC_F_NEXT, 2));
    write_desc(r, 0x120, (hdr + 16, 1, DESC_F_WRITE, 0));
    r.post(&[(table, 48, DESC_F_INDIRECT, 0)]);
    match r.wait() {
        Outcome::Used(_) if r.mem().hdr.read::<u8>(16) == 0 => p.add("valid", "ok", None),
        _ => fail_case(
            "indirect",
            r.name,
            "a valid indirect read",
            "failed, status byte",
            r.mem().hdr.read::<u8>(16).into(),
        ),
    }
    r.restart();
    p
}

fn write_desc(r: &Rig, off: u64, (addr, len, flags, next): Desc) {
    r.buf.write::<u64>(off, addr);
    r.buf.write::<u32>(off + 8, len);
    r.buf.write::<u16>(off + 12, flags);
    r.buf.write::<u16>(off + 14, next);
}

/// `avail.idx` far ahead of what was offered: NEEDS_RESET, never a chain served.
pub(super) fn avail_far_ahead(rigs: &mut [Rig]) -> Parts {
    let mut p = Parts::new();
    for r in rigs.iter_mut() {
        r.start("avail-far-ahead");
        r.avail.write::<u16>(2, 0x8000);
        r.notify.write::<u16>(0, 0);
        let got = match r.wait() {
            Outcome::NeedsReset => "needs-reset",
            // A device may answer a head it never got with nothing; it must not serve more
            // than the ring holds.
            Outcome::Used(_) if r.used.read::<u16>(2) <= SIZE => "used-within-ring",
            Outcome::Used(_) => fail_case(
                "avail-far-ahead",
                r.name,
                "used index",
                "ran past the ring:",
                r.used.read::<u16>(2).into(),
            ),
            Outcome::Timeout => fail_case(
                "avail-far-ahead",
                r.name,
                "index 0x8000",
                "no NEEDS_RESET, status",
                r.status().into(),
            ),
        };
        p.add(r.name, got, None);
        r.restart();
    }
    p
}

/// The used ring placed over the descriptor table (and, for blk, over the data buffer): the
/// device may serve or refuse, the VM stays up and a reset recovers.
pub(super) fn used_overlap(rigs: &mut [Rig]) -> Parts {
    let mut p = Parts::new();
    for r in rigs.iter_mut() {
        let mut targets = [("over-descriptors", r.desc.base()), ("", 0)];
        if let Some(m) = &r.blk {
            targets[1] = ("over-data", m.data.base());
        }
        for (what, used) in targets {
            if what.is_empty() {
                continue;
            }
            r.restart();
            let (d, a, _) = r.rings();
            r.program(Some(SIZE), (d, a, used));
            r.driver_ok();
            let got = if r.needs_reset() {
                "needs-reset-at-driver-ok"
            } else {
                // The used index lands inside descriptor 0 or the data, where no poll can tell
                // it from what was there: give the device a moment, then look at its status.
                r.post_valid();
                let deadline = Deadline::after_ms(100);
                while !deadline.passed() {
                    spin_loop();
                }
                match r.needs_reset() {
                    true => "needs-reset",
                    false => "no-reset",
                }
            };
            p.add(r.name, what, None);
            p.add("got", got, None);
        }
        r.restart();
    }
    p
}

/// blk buffers in the MMIO hole (its start, the device's own BAR, the local APIC): IOERR.
pub(super) fn mmio_hole(r: &mut Rig) -> Parts {
    let mut p = Parts::new();
    let bar = r.bar;
    for (what, kind, addr, flags) in [
        ("in-hole-start", T_IN, MMIO_HOLE, DESC_F_WRITE),
        ("out-own-bar", T_OUT, bar, 0),
        ("in-own-bar", T_IN, bar, DESC_F_WRITE),
        ("in-lapic", T_IN, LAPIC, DESC_F_WRITE),
    ] {
        let o = r.blk_request("mmio-hole", kind, 32, &[(addr, 512, flags)]);
        p.add(what, r.refused("mmio-hole", what, o), None);
    }
    r.restart();
    p
}

/// EVENT_IDX with a bogus `used_event` (far ahead, then just behind): every request is still
/// completed in the used ring (the driver polls; only the interrupt may be skipped).
pub(super) fn used_event(r: &mut Rig) -> Parts {
    let mut p = Parts::new();
    let wanted = r.wanted;
    r.wanted |= F_EVENT_IDX;
    r.start("used-event");
    let used_event = 4 + 2 * u64::from(SIZE);
    let mut served = 0u64;
    for bogus in [0xfff0u16, 0x7fff, 0] {
        r.avail.write::<u16>(used_event, bogus);
        r.post_valid();
        match r.wait() {
            Outcome::Used(_) if r.mem().hdr.read::<u8>(16) == 0 => served += 1,
            _ => fail_case(
                "used-event",
                r.name,
                "a read with a bogus used_event",
                "was not served, status",
                r.status().into(),
            ),
        }
    }
    p.add("served", "", Some(served));
    r.wanted = wanted;
    r.restart();
    p
}

/// Queue size, address, enable and feature writes after DRIVER_OK: ignored (the queue keeps
/// working), NEEDS_RESET, or a stopped queue; never a device that uses the new size or
/// address.
pub(super) fn driver_ok_writes(rigs: &mut [Rig]) -> Parts {
    let mut p = Parts::new();
    for r in rigs.iter_mut() {
        r.start("driver-ok-writes");
        let c = r.dev.common;
        c.write::<u16>(QUEUE_SELECT, r.qi);
        c.write::<u16>(QUEUE_SIZE, 2);
        c.write::<u32>(QUEUE_DESC, FAR as u32);
        c.write::<u32>(QUEUE_DESC + 4, (FAR >> 32) as u32);
        c.write::<u16>(QUEUE_ENABLE, 0);
        c.write::<u32>(DRIVER_FEATURE_SELECT, 1);
        c.write::<u32>(DRIVER_FEATURE, 0);
        c.write::<u32>(DRIVER_FEATURE_SELECT, 0);
        c.write::<u32>(DRIVER_FEATURE, u32::MAX);
        let size = c.read::<u16>(QUEUE_SIZE);
        let desc = c.read::<u32>(QUEUE_DESC);
        let got = if r.needs_reset() {
            "needs-reset"
        } else if size != SIZE || u64::from(desc) != r.desc.base() & 0xffff_ffff {
            fail_case(
                "driver-ok-writes",
                r.name,
                "queue registers",
                "changed after DRIVER_OK, size",
                size.into(),
            )
        } else {
            r.post_valid();
            match r.wait() {
                Outcome::Used(_) => "ignored",
                Outcome::NeedsReset => "needs-reset",
                // A driver that disabled its queue may find it stopped; the reset below must
                // still recover it.
                Outcome::Timeout => "stalled",
            }
        };
        p.add(r.name, got, None);
        r.restart();
    }
    p
}

/// blk: reads in flight when the driver resets the device. The reset completes, nothing lands
/// in the (cleared) used ring afterwards, and the device serves the next request.
pub(super) fn reset_in_flight(r: &mut Rig) -> Parts {
    let mut p = Parts::new();
    let mut rounds = 0u64;
    for sector in [0u64, 8, 64, 1024] {
        r.start("reset-in-flight");
        let m = r.mem();
        let (hdr, data) = (m.hdr.base(), m.data.base());
        m.hdr.write::<u32>(0, T_IN);
        m.hdr.write::<u64>(8, sector);
        m.hdr.write::<u8>(16, S_UNSET);
        r.post(&[
            (hdr, 16, DESC_F_NEXT, 1),
            (data, 3 * 4096, DESC_F_WRITE | DESC_F_NEXT, 2),
            (hdr + 16, 1, DESC_F_WRITE, 0),
        ]);
        // No wait: reset at once (restart waits for status 0 and clears the rings).
        r.restart();
        let deadline = Deadline::after_ms(20);
        while !deadline.passed() {
            spin_loop();
        }
        if r.used.read::<u16>(2) != 0 {
            fail_case(
                "reset-in-flight",
                r.name,
                "used ring",
                "written after the reset, index",
                r.used.read::<u16>(2).into(),
            );
        }
        rounds += 1;
    }
    r.start("reset-in-flight");
    r.post_valid();
    match r.wait() {
        Outcome::Used(_) if r.mem().hdr.read::<u8>(16) == 0 => {}
        _ => fail_case(
            "reset-in-flight",
            r.name,
            "the read after the resets",
            "failed, status",
            r.status().into(),
        ),
    }
    p.add("resets", "", Some(rounds));
    p.add("then", "served", None);
    r.restart();
    p
}

/// blk: every AP kicks the queue (up to a thousand times each) while the BSP posts reads and
/// kicks too; each read is served.
pub(super) fn smp_kicks(info: &BootInfo, r: &mut Rig) -> Parts {
    let mut p = Parts::new();
    r.start("smp-kicks");
    smp::KICK_VALUE.store(r.qi, Ordering::Relaxed);
    smp::KICK_ADDR.store(r.notify.base(), Ordering::Release);
    // Starts the APs (or none on one CPU); each kicks once online.
    let cpus = smp::run(info);
    let mut served = 0u64;
    for _ in 0..8 {
        r.post_valid();
        for _ in 0..16 {
            r.notify.write::<u16>(0, r.qi);
        }
        match r.wait() {
            Outcome::Used(_) if r.mem().hdr.read::<u8>(16) == 0 => served += 1,
            _ => fail_case(
                "smp-kicks",
                r.name,
                "a read among kicks from every CPU",
                "failed, status",
                r.status().into(),
            ),
        }
    }
    smp::KICK_STOP.store(true, Ordering::Release);
    smp::KICK_ADDR.store(0, Ordering::Release);
    // Each AP adds its kicks once it sees the stop (or ran out of kicks).
    let deadline = Deadline::after_ms(WAIT_MS);
    while smp::KICKERS_DONE.load(Ordering::Acquire) + 1 < cpus && !deadline.passed() {
        spin_loop();
    }
    p.add("cpus", "", Some(cpus.into()));
    p.add("served", "", Some(served));
    p.add("ap-kicks", "", Some(smp::KICKED.load(Ordering::Acquire).into()));
    r.restart();
    p
}
