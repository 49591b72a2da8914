//! The `virtio-abuse` cases that post bogus virtio-blk requests (looping chains, buffers outside
//! RAM, wrong directions, oversized lengths, sectors past the end), and the check that a reset
//! device works again.
use super::report::{fail_case, Parts};
use super::rig::{BlkCase, Desc, Outcome, Rig};
use super::{DESC_F_NEXT, DESC_F_WRITE, FAR, PROOF_SECTOR, SECTOR, SIZE, S_UNSET, T_IN, T_OUT};
use crate::virtio::blk::PATTERN;

/// Case 3: Descriptor chains that loop or leave the table: IOERR or NEEDS_RESET.
pub(super) fn desc_loop(r: &mut Rig) -> Parts {
    let mut p = Parts::new();
    let m = r.mem();
    let (hdr, data) = (m.hdr.base(), m.data.base());
    let loops: [(&'static str, [Desc; 2]); 3] = [
        (
            "two-loop",
            [
                (hdr, 16, DESC_F_NEXT, 1),
                (data, 512, DESC_F_WRITE | DESC_F_NEXT, 0),
            ],
        ),
        ("self-loop", [(hdr, 16, DESC_F_NEXT, 0), (0, 0, 0, 0)]),
        (
            "next-outside-table",
            [
                (hdr, 16, DESC_F_NEXT, 1),
                (data, 512, DESC_F_WRITE | DESC_F_NEXT, SIZE),
            ],
        ),
    ];
    for (what, chain) in loops {
        let n = if what == "self-loop" { 1 } else { 2 };
        let got = r.bad_chain("desc-loop", what, &chain[..n]);
        p.add(what, got, None);
    }
    r.restart();
    p
}

/// Case 4: Data buffers outside guest RAM: IOERR or NEEDS_RESET, nothing written to the disk.
pub(super) fn data_address(r: &mut Rig) -> Parts {
    let mut p = Parts::new();
    let straddle = r.ram_end.saturating_sub(256);
    for (what, kind, addr, flags) in [
        ("out-far", T_OUT, FAR, 0),
        ("in-far", T_IN, FAR, DESC_F_WRITE),
        ("out-at-ram-end", T_OUT, straddle, 0),
        ("out-wrapping", T_OUT, u64::MAX - 255, 0),
    ] {
        let o = r.blk_request("data-address", kind, 8, &[(addr, 512, flags)]);
        p.add(what, r.refused("data-address", what, o), None);
    }
    r.restart();
    p
}

/// Case 5: Wrong directions: IOERR.
pub(super) fn direction(r: &mut Rig) -> Parts {
    let mut p = Parts::new();
    let data = r.mem().data.base();
    let cases: [BlkCase; 3] = [
        ("in-device-readable", T_IN, [(data, 512, 0), (0, 0, 0)], 1),
        (
            "out-device-writable",
            T_OUT,
            [(data, 512, DESC_F_WRITE), (0, 0, 0)],
            1,
        ),
        (
            "readable-after-writable",
            T_IN,
            [(data, 512, DESC_F_WRITE), (data + 4096, 512, 0)],
            2,
        ),
    ];
    for (what, kind, bufs, n) in cases {
        let o = r.blk_request("direction", kind, 16, &bufs[..n]);
        p.add(what, r.refused("direction", what, o), None);
    }
    // A device-writable header.
    let m = r.mem();
    let (hdr, data) = (m.hdr.base(), m.data.base());
    let chain = [
        (hdr, 16, DESC_F_WRITE | DESC_F_NEXT, 1),
        (data, 512, DESC_F_WRITE | DESC_F_NEXT, 2),
        (hdr + 16, 1, DESC_F_WRITE, 0),
    ];
    p.add(
        "header-writable",
        r.bad_chain("direction", "header-writable", &chain),
        None,
    );
    r.restart();
    p
}

/// Case 6: Oversized lengths: IOERR or NEEDS_RESET.
pub(super) fn oversized(r: &mut Rig) -> Parts {
    let mut p = Parts::new();
    let data = r.mem().data.base();
    let cases: [BlkCase; 4] = [
        (
            "in-4g",
            T_IN,
            [(data, 0xffff_f000, DESC_F_WRITE), (0, 0, 0)],
            1,
        ),
        ("out-4g", T_OUT, [(data, 0xffff_f000, 0), (0, 0, 0)], 1),
        (
            "in-sum-over-4g",
            T_IN,
            [
                (data, 0x8000_0000, DESC_F_WRITE),
                (data, 0x8000_0200, DESC_F_WRITE),
            ],
            2,
        ),
        ("out-not-sectors", T_OUT, [(data, 513, 0), (0, 0, 0)], 1),
    ];
    for (what, kind, bufs, n) in cases {
        let o = r.blk_request("oversized", kind, 24, &bufs[..n]);
        p.add(what, r.refused("oversized", what, o), None);
    }
    r.restart();
    p
}

/// Case 7: Sectors beyond the capacity: IOERR.
pub(super) fn sector_range(r: &mut Rig) -> Parts {
    let mut p = Parts::new();
    let cap = r.mem().capacity;
    let data = r.mem().data.base();
    for (what, kind, sector, len, flags) in [
        ("in-at-capacity", T_IN, cap, 512, DESC_F_WRITE),
        ("out-across-the-end", T_OUT, cap.saturating_sub(1), 1024, 0),
        ("in-max-sector", T_IN, u64::MAX, 512, DESC_F_WRITE),
        ("out-offset-overflow", T_OUT, 1 << 55, 512, 0),
    ] {
        let o = r.blk_request("sector-range", kind, sector, &[(data, len, flags)]);
        p.add(what, r.refused("sector-range", what, o), None);
    }
    p.add("capacity", "", Some(cap));
    r.restart();
    p
}

/// After all that and a reset, each device serves a valid request.
pub(super) fn after_reset(rng: &mut Rig, blk: &mut Rig) -> Parts {
    let mut p = Parts::new();
    rng.start("after-reset");
    rng.post_valid();
    let buf = rng.buf;
    match rng.wait() {
        Outcome::Used(len) if len > 0 && len <= 64 => {
            let first = buf.read::<u8>(0);
            if len > 8 && (1..u64::from(len)).all(|i| buf.read::<u8>(i) == first) {
                fail_case(
                    "after-reset",
                    rng.name,
                    "request",
                    "returned one repeated byte",
                    first.into(),
                );
            }
            p.add("rng", "bytes", Some(len.into()));
        }
        Outcome::Used(len) => fail_case(
            "after-reset",
            rng.name,
            "request",
            "returned length",
            len.into(),
        ),
        _ => fail_case(
            "after-reset",
            rng.name,
            "request",
            "failed, status",
            rng.status().into(),
        ),
    }
    rng.restart();

    // Write the proof sector, then read it back.
    let base = PROOF_SECTOR * SECTOR;
    let data = blk.mem().data;
    blk.start("after-reset");
    data.fill_words(|o| (base + o) ^ PATTERN);
    let m = blk.mem();
    let (hdr, status) = (m.hdr.base(), m.hdr.base() + 16);
    let one = |rig: &mut Rig, kind: u32, buf: u64, flags: u16| {
        let m = rig.mem();
        m.hdr.write::<u32>(0, kind);
        m.hdr.write::<u32>(4, 0);
        m.hdr.write::<u64>(8, PROOF_SECTOR);
        m.hdr.write::<u8>(16, S_UNSET);
        rig.post(&[
            (hdr, 16, DESC_F_NEXT, 1),
            (buf, SECTOR as u32, flags | DESC_F_NEXT, 2),
            (status, 1, DESC_F_WRITE, 0),
        ]);
        match rig.wait() {
            Outcome::Used(_) => rig.mem().hdr.read::<u8>(16),
            _ => fail_case(
                "after-reset",
                rig.name,
                "request",
                "failed, status",
                rig.status().into(),
            ),
        }
    };
    let s = one(blk, T_OUT, data.base(), 0);
    if s != 0 {
        fail_case(
            "after-reset",
            blk.name,
            "write",
            "completed with status",
            s.into(),
        );
    }
    let back = data.sub(4096, SECTOR).expect("read buffer");
    back.zero();
    let s = one(blk, T_IN, back.base(), DESC_F_WRITE);
    if s != 0 {
        fail_case(
            "after-reset",
            blk.name,
            "read",
            "completed with status",
            s.into(),
        );
    }
    for o in (0..SECTOR).step_by(8) {
        if back.read::<u64>(o) != (base + o) ^ PATTERN {
            fail_case("after-reset", blk.name, "read back", "differs at byte", o);
        }
    }
    p.add("blk", "sector-written-and-read", Some(PROOF_SECTOR));
    blk.restart();
    p
}
