//! The fuzzing entry points on hand-built inputs: well-formed chains are served, and the
//! abuses the fuzzers start from (loops, indirect tables that nest, loop, are empty, misaligned
//! or outside RAM, an available index far ahead, a used ring over the descriptors) are refused
//! without a panic. The same inputs are `fuzz/seeds/`: with `SKIFF_FUZZ_SEEDS_OUT=DIR` set,
//! `seed_inputs_are_served_or_refused` writes them to `DIR/<target>/<name>`.

#![allow(clippy::unwrap_used)]

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

use super::*;

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
/// Config byte: queue size 8, no event index.
const SIZE8: u8 = 3;

/// An input under construction: the config byte and both regions' bytes.
struct Input {
    config: u8,
    mem: Vec<u8>,
}

impl Input {
    fn new(config: u8) -> Self {
        Self {
            config,
            mem: vec![0; 2 * REGION_LEN],
        }
    }

    fn offset(addr: u64) -> usize {
        match addr {
            a if a < REGION_LEN as u64 => a as usize,
            a => (a - SECOND_REGION) as usize + REGION_LEN,
        }
    }

    fn put(&mut self, addr: u64, bytes: &[u8]) -> &mut Self {
        let at = Self::offset(addr);
        self.mem[at..at + bytes.len()].copy_from_slice(bytes);
        self
    }

    /// Descriptor `i` of the table at `table`.
    fn desc(&mut self, table: u64, i: u16, d: (u64, u32, u16, u16)) -> &mut Self {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&d.0.to_le_bytes());
        raw[8..12].copy_from_slice(&d.1.to_le_bytes());
        raw[12..14].copy_from_slice(&d.2.to_le_bytes());
        raw[14..].copy_from_slice(&d.3.to_le_bytes());
        self.put(table + 16 * u64::from(i), &raw)
    }

    /// Queue `q`'s available ring offers `heads`, and its index says `idx`.
    fn avail(&mut self, q: u16, heads: &[u16], idx: u16) -> &mut Self {
        let base = ring_base(q) + AVAIL_OFFSET;
        for (i, h) in heads.iter().enumerate() {
            self.put(base + 4 + 2 * i as u64, &h.to_le_bytes());
        }
        self.put(base + 2, &idx.to_le_bytes())
    }

    /// The bytes, cut after the last non-zero one (as a seed file would be).
    fn bytes(&self) -> Vec<u8> {
        let end = self.mem.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
        let mut out = vec![self.config];
        out.extend_from_slice(&self.mem[..end]);
        out
    }
}

const DATA: u64 = DATA_OFFSET;
const TABLE: u64 = 0x800;

/// A blk request: header (type, sector), `data` bytes, status byte; descriptors 0..3.
fn blk_request(kind: u32, sector: u64, data: u32, data_flags: u16) -> Input {
    let mut i = Input::new(SIZE8);
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&kind.to_le_bytes());
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    i.put(DATA, &hdr)
        .desc(0, 0, (DATA, 16, NEXT, 1))
        .desc(0, 1, (DATA + 0x100, data, data_flags | NEXT, 2))
        .desc(0, 2, (DATA + 0x80, 1, WRITE, 0))
        .avail(0, &[0], 1);
    i
}

/// The same request through an indirect table at `TABLE` of `len` bytes.
fn blk_indirect(table_len: u32) -> Input {
    let mut i = blk_request(0, 0, 512, WRITE);
    i.desc(TABLE, 0, (DATA, 16, NEXT, 1))
        .desc(TABLE, 1, (DATA + 0x100, 512, WRITE | NEXT, 2))
        .desc(TABLE, 2, (DATA + 0x80, 1, WRITE, 0))
        .desc(0, 0, (TABLE, table_len, INDIRECT, 0));
    i
}

fn blk_seeds() -> Vec<(&'static str, Input)> {
    let mut loop2 = blk_request(0, 0, 512, WRITE);
    loop2.desc(0, 2, (DATA + 0x80, 1, WRITE | NEXT, 0));
    let mut discard = blk_request(11, 0, 16, 0);
    let mut range = [0u8; 16];
    range[..8].copy_from_slice(&8u64.to_le_bytes());
    range[8..12].copy_from_slice(&8u32.to_le_bytes());
    discard.put(DATA + 0x100, &range);
    vec![
        ("read", blk_request(0, 0, 512, WRITE)),
        ("write", blk_request(1, 2047, 512, 0)),
        ("flush", {
            let mut f = blk_request(4, 0, 0, 0);
            f.desc(0, 0, (DATA, 16, NEXT, 2));
            f
        }),
        ("get-id", blk_request(8, 0, 20, WRITE)),
        ("discard", discard),
        ("loop", loop2),
        ("past-the-end", blk_request(0, 2048, 512, WRITE)),
        ("second-region", {
            let mut i = blk_request(0, 0, 0x1000, WRITE);
            i.desc(0, 1, (SECOND_REGION, 0x1000, WRITE | NEXT, 2));
            i
        }),
        ("indirect", blk_indirect(48)),
    ]
}

/// Chains with indirect tables, good and bad.
fn indirect_seeds() -> Vec<(&'static str, Input)> {
    let mut nested = blk_indirect(48);
    nested.desc(TABLE, 1, (TABLE + 0x100, 32, INDIRECT, 0));
    let mut looping = blk_indirect(48);
    looping.desc(TABLE, 2, (DATA + 0x80, 1, WRITE | NEXT, 0));
    let mut outside = blk_indirect(48);
    outside.desc(0, 0, (0xf000_0000, 48, INDIRECT, 0));
    let mut in_hole = blk_indirect(48);
    in_hole.desc(0, 0, (0x1ff0, 48, INDIRECT, 0));
    let mut after_head = blk_indirect(48);
    after_head
        .desc(0, 0, (DATA, 16, NEXT, 1))
        .desc(0, 1, (TABLE + 16, 32, INDIRECT, 0));
    let mut far_ahead = blk_indirect(48);
    far_ahead.avail(0, &[0], 0x8000);
    vec![
        ("indirect", blk_indirect(48)),
        ("zero-length", blk_indirect(0)),
        ("not-multiple-of-16", blk_indirect(40)),
        ("nested", nested),
        ("looping", looping),
        ("outside-ram", outside),
        ("across-the-hole", in_hole),
        ("after-a-direct-descriptor", after_head),
        ("avail-idx-far-ahead", far_ahead),
    ]
}

/// Transmit and receive chains (config bit 4 picks the receive queue).
fn net_seeds() -> Vec<(&'static str, Input)> {
    let tx = |hdr: u32, len: u32| {
        let mut i = Input::new(SIZE8);
        i.desc(0, 0, (DATA, hdr, NEXT, 1))
            .desc(0, 1, (DATA + 0x10, len, 0, 0))
            .avail(0, &[0], 1);
        i
    };
    let rx = |variant: u8, len: u32| {
        let mut i = Input::new(SIZE8 | 0x10 | (variant << 5));
        i.desc(0, 0, (DATA, len, WRITE, 0))
            .desc(0, 1, (DATA, len, WRITE, 0))
            .avail(0, &[0, 1], 2);
        i
    };
    let mut used_over_desc = tx(12, 60);
    used_over_desc.config |= 8; // event index, used_event bogus below
    used_over_desc.put(AVAIL_OFFSET + 4 + 16, &0xfff0u16.to_le_bytes());
    vec![
        ("tx", tx(12, 60)),
        ("tx-short", tx(8, 0)),
        ("rx-small", rx(1, 72)),
        ("rx-too-small", rx(2, 100)),
        ("bogus-used-event", used_over_desc),
    ]
}

/// Console output on queue 1 (second region) and input buffers on queue 0.
fn console_seeds() -> Vec<(&'static str, Input)> {
    let out = |variant: u8| {
        let mut i = Input::new(SIZE8 | (variant << 5));
        let tx = ring_base(1);
        i.put(tx + DATA, b"hello from the guest\n")
            .desc(tx, 0, (tx + DATA, 21, 0, 0))
            .avail(1, &[0], 1)
            .desc(0, 0, (DATA, 64, WRITE, 0))
            .avail(0, &[0], 1);
        i
    };
    let mut wrong_direction = out(2);
    wrong_direction.desc(ring_base(1), 0, (ring_base(1) + DATA, 21, WRITE, 0));
    let mut refused = out(0);
    refused.config |= 0x10;
    vec![
        ("output-and-input", out(2)),
        ("output-only", out(0)),
        ("wrong-direction", wrong_direction),
        ("writer-refuses", refused),
    ]
}

fn write_seeds(target: &str, seeds: &[(&str, Input)]) {
    let Some(dir) = std::env::var_os("SKIFF_FUZZ_SEEDS_OUT") else {
        return;
    };
    let dir = std::path::Path::new(&dir).join(target);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, input) in seeds {
        std::fs::write(dir.join(name), input.bytes()).unwrap();
    }
}

#[test]
fn seed_inputs_are_served_or_refused() {
    let blk = blk_seeds();
    let got: Vec<_> = blk.iter().map(|(_, i)| blk_requests(&i.bytes())).collect();
    // read, write, flush, get-id, discard, and the indirect read become work or an answer.
    for (k, (name, _)) in blk.iter().enumerate() {
        let o = got[k];
        assert_eq!(o.chains, 1, "{name}: {o:?}");
        let parsed = !matches!(*name, "loop");
        assert_eq!(o.parsed, usize::from(parsed), "{name}: {o:?}");
    }
    let io: Vec<_> = got.iter().map(|o| o.io).collect();
    assert_eq!(io, [1, 1, 1, 0, 1, 0, 0, 1, 1], "{got:?}");
    write_seeds("virtio_blk_requests", &blk);

    let indirect = indirect_seeds();
    for (name, input) in &indirect {
        let o = indirect_chains(&input.bytes());
        let expected = match *name {
            "indirect" => 3,
            "nested" => 1,
            "looping" => 3,
            "after-a-direct-descriptor" => 2,
            _ => 0,
        };
        assert_eq!(o.descriptors, expected, "{name}: {o:?}");
        let chains = usize::from(*name != "avail-idx-far-ahead");
        assert_eq!(o.chains, chains, "{name}: {o:?}");
        // Every bad table is refused by the blk parser: only the good one is a request.
        let b = blk_requests(&input.bytes());
        assert_eq!(b.parsed, usize::from(*name == "indirect"), "{name}: {b:?}");
    }
    write_seeds("virtio_indirect_chains", &indirect);

    let net = net_seeds();
    let frames: Vec<_> = net
        .iter()
        .map(|(_, i)| net_chains(&i.bytes()).frames)
        .collect();
    assert_eq!(
        frames,
        [1, 0, 2, 0, 1],
        "{:?}",
        net.iter().map(|n| n.0).collect::<Vec<_>>()
    );
    write_seeds("virtio_net_chains", &net);

    let console = console_seeds();
    let c: Vec<_> = console
        .iter()
        .map(|(_, i)| console_queues(&i.bytes()))
        .collect();
    assert_eq!(c[0].counters.tx_bytes, 21, "{c:?}");
    assert_eq!(c[0].counters.rx_bytes, 64, "{c:?}");
    assert_eq!(c[1].counters.rx_bytes, 0, "{c:?}");
    assert_eq!(c[2].counters.bad_chains, 1, "{c:?}");
    assert_eq!(c[2].counters.tx_bytes, 0, "{c:?}");
    assert_eq!(c[3].counters.lost_bytes, 21, "{c:?}");
    assert!(c.iter().all(|o| !o.broken), "{c:?}");
    write_seeds("virtio_console_queues", &console);
}

#[test]
fn a_used_ring_over_the_descriptors_and_endless_chains_are_refused() {
    // Eight chains that never end: each is taken and refused.
    let mut i = blk_request(0, 0, 512, WRITE);
    for n in 0..8 {
        i.desc(0, n, (DATA, 16, NEXT, (n + 1) % 8));
    }
    i.avail(0, &[0, 1, 2, 3, 4, 5, 6, 7], 8);
    let o = blk_requests(&i.bytes());
    assert_eq!((o.chains, o.parsed), (8, 0), "{o:?}");

    // The used ring over the descriptor table: the first completion overwrites descriptor 0
    // (id and length land in its address), so the second offer of head 0 reads a buffer
    // outside guest memory and is refused.
    let mut i = blk_request(0, 0, 512, WRITE);
    i.config |= 0x80;
    i.avail(0, &[0, 0], 2);
    let o = blk_requests(&i.bytes());
    assert_eq!((o.chains, o.parsed, o.io), (2, 1, 1), "{o:?}");

    // No input at all, and inputs one byte long.
    assert_eq!(blk_requests(&[]), BlkOutcome::default());
    assert_eq!(net_chains(&[0xff]).chains, 0);
    assert!(!console_queues(&[0x1f]).broken);
}

/// Receive chains for `net_rx_merged`: `lens` one-descriptor chains at `DATA` (they may share
/// it: a frame written over another is the driver's choice), with the frames of `variant`.
fn merged_rx(variant: u8, lens: &[u32]) -> Input {
    let mut i = Input::new(SIZE8 | (variant << 5));
    for (k, &len) in lens.iter().enumerate() {
        i.desc(0, k as u16, (DATA, len, WRITE, 0));
    }
    let heads: Vec<u16> = (0..lens.len() as u16).collect();
    i.avail(0, &heads, heads.len() as u16);
    i
}

fn merged_rx_seeds() -> Vec<(&'static str, Input)> {
    let mut readable = merged_rx(1, &[1024, 1024]);
    readable.desc(0, 1, (DATA, 1024, 0, 0));
    let mut outside = merged_rx(0, &[1024]);
    outside.desc(0, 0, (REGION_LEN as u64 - 8, 64, WRITE, 0));
    vec![
        ("spanning", merged_rx(2, &[1024; 8])),
        ("too-few", merged_rx(1, &[1024])),
        ("short", merged_rx(0, &[8, 1024])),
        ("zero-length", merged_rx(0, &[0])),
        ("readable", readable),
        ("outside", outside),
        ("ring-too-small", merged_rx(3, &[16; 8])),
    ]
}

#[test]
fn merged_receive_spans_chains_waits_for_more_and_drops_only_bad_frames() {
    let seeds = merged_rx_seeds();
    let got: Vec<_> = seeds
        .iter()
        .map(|(_, i)| {
            let o = net_rx_merged(&i.bytes());
            (o.delivered, o.dropped, o.waiting)
        })
        .collect();
    assert_eq!(
        got,
        [
            (3, 0, false), // 3012 + 3012 + 112 bytes over 3 + 3 + 1 chains
            (0, 0, true),  // 1526 bytes, 1024 offered: held
            (0, 1, false), // an 8-byte chain drops the frame, the next chain has none left
            (0, 1, false),
            (0, 1, true), // the second chain is device-readable; the next frame waits
            (0, 1, false),
            (0, 1, true), // 9000 bytes never fit 8 chains of 16: dropped; the next one waits
        ],
        "{:?}",
        seeds.iter().map(|s| s.0).collect::<Vec<_>>()
    );
    write_seeds("virtio_net_rx_merged", &seeds);
}
