//! The `netbench=N` scenario: virtio-net throughput both ways and ping-pong latency against a
//! host peer on the tap (`scripts/net-peer`), with raw Ethernet frames of ethertype 0x88b5 and
//! no TCP. All of it runs in CPL3 and polls; the only exits are notify writes, and with
//! VIRTIO_RING_F_EVENT_IDX only those the device asks for.
//!
//! 1. transmit: N full-size frames (payload `skiff-nb-tx`), the queue kept full; timed from
//!    the first offer to the last frame returned.
//! 2. receive: the guest sends `skiff-nb-go` (again every `GO_EVERY_MS` until data comes) and
//!    the peer sends N full-size frames (`skiff-nb-rx`), keeping at most a window of them
//!    unacknowledged (fewer than the tap's queue holds, so none is dropped); the guest sends
//!    `skiff-nb-ack` with its count every `ACK_EVERY` frames. Timed from the first frame to the
//!    last; the guest stops at N, or after `IDLE_MS` without a frame.
//! 3. ping-pong: N / 10 (at least 100) rounds of a small `skiff-nb-ping` frame carrying the
//!    round number, each answered by the peer's `skiff-nb-pong` with the same number.
//!
//! Then `skiff-nb-done` tells the peer to stop. Results are lines of bytes and TSC cycles:
//! `testguest: netbench tx|rx frames=F bytes=B cycles=C tsc_khz=K` and
//! `testguest: netbench pingpong rounds=R cycles=C tsc_khz=K`.
use crate::bootinfo::BootInfo;
use crate::mmio::Region;
use crate::scenario::fail;
use crate::serial;
use crate::tsc::{self, Deadline};
use crate::virtio::queue::{Buf, Queue};
use crate::virtio::{dma, Device, F_VERSION_1};

const DEVICE_TYPE: u16 = 1;
const F_MAC: u64 = 1 << 5;
const F_EVENT_IDX: u64 = 1 << 29;
const QUEUE_MAX: u16 = 256;
const HDR_LEN: u64 = 12;
const ETH_HDR: u64 = 14;
/// A full-size Ethernet frame without FCS.
const FULL_FRAME: u64 = 1514;
const SMALL_FRAME: u64 = 60;
const BUF_LEN: u64 = 2048;
const ETHERTYPE: u16 = 0x88b5;
const TX: &[u8] = b"skiff-nb-tx";
const RX: &[u8] = b"skiff-nb-rx";
const GO: &[u8] = b"skiff-nb-go";
const PING: &[u8] = b"skiff-nb-ping";
const PONG: &[u8] = b"skiff-nb-pong";
const DONE: &[u8] = b"skiff-nb-done";
const ACK: &[u8] = b"skiff-nb-ack";
/// Receive frames per acknowledgement.
const ACK_EVERY: u64 = 64;
/// Bound on each phase (a slow host under load included).
const PHASE_MS: u64 = 120_000;
const GO_EVERY_MS: u64 = 500;
const IDLE_MS: u64 = 1_000;
const ANSWER_MS: u64 = 10_000;

struct Bench {
    dev: Device,
    rx: Queue,
    tx: Queue,
    mac: [u8; 6],
    rx_mem: Region,
    /// A full-size transmit frame (header included), shared by every stream chain.
    full: Region,
    /// Small frames for control and ping, one per slot so an in-flight one is not rewritten.
    small: Region,
    small_next: u64,
}

impl Bench {
    fn open(info: &BootInfo) -> Bench {
        let dev = Device::open(
            info,
            DEVICE_TYPE,
            "virtio-net",
            F_VERSION_1 | F_MAC | F_EVENT_IDX,
        );
        let mut rx = dev.setup_queue(0, QUEUE_MAX);
        let mut tx = dev.setup_queue(1, QUEUE_MAX);
        if dev.features & F_EVENT_IDX != 0 {
            rx.use_event_idx();
            tx.use_event_idx();
        }
        let mut mac = [0x02, 0, 0, 0, 0, 1];
        if dev.features & F_MAC != 0 {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = dev.cfg_u8(i as u64);
            }
        }
        let rx_mem = dma::alloc(BUF_LEN * u64::from(rx.size()));
        let mut bench = Bench {
            dev,
            rx,
            tx,
            mac,
            rx_mem,
            full: dma::alloc(HDR_LEN + FULL_FRAME),
            small: dma::alloc(BUF_LEN * u64::from(QUEUE_MAX)),
            small_next: 0,
        };
        bench.frame(bench.full, TX);
        for _ in 0..bench.rx.size() {
            bench.post_rx();
        }
        bench.dev.driver_ok();
        bench.rx.kick();
        bench
    }

    /// Writes a zero header and a broadcast frame carrying `payload` into `r` (zero-filled).
    fn frame(&self, r: Region, payload: &[u8]) {
        r.zero();
        let put = |off: u64, bytes: &[u8]| {
            for (i, &b) in bytes.iter().enumerate() {
                r.write::<u8>(HDR_LEN + off + i as u64, b);
            }
        };
        put(0, &[0xff; 6]);
        put(6, &self.mac);
        put(12, &ETHERTYPE.to_be_bytes());
        put(ETH_HDR, payload);
    }

    /// Offers one receive buffer (any free slot: the buffer is found again by its address).
    fn post_rx(&mut self) {
        // Descriptor `head` always carries receive buffer `head`: chains are one descriptor,
        // and the free list hands heads back in any order.
        let free_head = self.rx.peek_free_head();
        let buf = self
            .rx_mem
            .sub(u64::from(free_head) * BUF_LEN, BUF_LEN)
            .expect("rx buffer");
        if self.rx.add(&[Buf::of(&buf, true)]).is_none() {
            fail(|w| {
                w.str("receive queue full");
            });
        }
    }

    /// The receive buffer of descriptor `head`.
    fn rx_buffer(&self, head: u16) -> Region {
        self.rx_mem
            .sub(u64::from(head) * BUF_LEN, BUF_LEN)
            .expect("rx buffer")
    }

    /// Takes transmit completions (the stream frames and small frames need nothing back).
    fn reap_tx(&mut self) -> u64 {
        let mut n = 0;
        while self.tx.pop_used().is_some() {
            n += 1;
        }
        n
    }

    /// Sends a small frame: `payload` then `seq` (4 bytes, big-endian).
    fn send_small(&mut self, payload: &[u8], seq: u32) {
        let slot = self
            .small
            .sub(self.small_next * BUF_LEN, HDR_LEN + SMALL_FRAME)
            .expect("small slot");
        self.small_next = (self.small_next + 1) % u64::from(QUEUE_MAX);
        self.frame(slot, payload);
        for (i, b) in seq.to_be_bytes().iter().enumerate() {
            slot.write::<u8>(HDR_LEN + ETH_HDR + payload.len() as u64 + i as u64, *b);
        }
        while self.tx.add(&[Buf::of(&slot, false)]).is_none() {
            self.reap_tx();
        }
        self.tx.kick();
    }

    /// Whether received buffer `buf` (`len` bytes with header) is our ethertype and starts
    /// with `prefix`; if `seq` is given, followed by it.
    fn is(&self, buf: &Region, len: u64, prefix: &[u8], seq: Option<u32>) -> bool {
        let byte = |off: u64| buf.read::<u8>(HDR_LEN + off);
        let tail = if seq.is_some() { 4 } else { 0 };
        if len < HDR_LEN + ETH_HDR + prefix.len() as u64 + tail
            || u16::from_be_bytes([byte(12), byte(13)]) != ETHERTYPE
            || !prefix
                .iter()
                .enumerate()
                .all(|(k, &b)| byte(ETH_HDR + k as u64) == b)
        {
            return false;
        }
        match seq {
            None => true,
            Some(seq) => {
                let at = ETH_HDR + prefix.len() as u64;
                u32::from_be_bytes([byte(at), byte(at + 1), byte(at + 2), byte(at + 3)]) == seq
            }
        }
    }

    fn stream_tx(&mut self, frames: u64) -> u64 {
        let deadline = Deadline::after_ms(PHASE_MS);
        let chain = Buf {
            addr: self.full.base(),
            len: (HDR_LEN + FULL_FRAME) as u32,
            device_writes: false,
        };
        let (mut sent, mut done) = (0, 0);
        let start = tsc::now();
        while done < frames {
            let mut added = false;
            while sent < frames && self.tx.add(&[chain]).is_some() {
                sent += 1;
                added = true;
            }
            if added {
                self.tx.kick();
            }
            done += self.reap_tx();
            if deadline.passed() {
                self.dev.fail_timeout("transmit completions");
            }
        }
        tsc::now() - start
    }

    /// Returns (frames, payload bytes, cycles from the first frame to the last).
    fn stream_rx(&mut self, frames: u64) -> (u64, u64, u64) {
        let deadline = Deadline::after_ms(PHASE_MS);
        let (mut got, mut bytes, mut first, mut last) = (0u64, 0u64, 0u64, 0u64);
        let mut go_at = Deadline::after_ms(0);
        let mut idle = Deadline::after_ms(PHASE_MS);
        while got < frames {
            if got == 0 && go_at.passed() {
                self.send_small(GO, 0);
                go_at = Deadline::after_ms(GO_EVERY_MS);
            }
            let mut reposted = false;
            while let Some((head, len)) = self.rx.pop_used() {
                let buf = self.rx_buffer(head);
                let len = u64::from(len);
                if self.is(&buf, len, RX, None) {
                    last = tsc::now();
                    if got == 0 {
                        first = last;
                    } else {
                        bytes += len - HDR_LEN;
                    }
                    got += 1;
                    if got % ACK_EVERY == 0 {
                        self.send_small(ACK, got as u32);
                    }
                }
                self.post_rx();
                reposted = true;
            }
            if reposted {
                self.rx.kick();
                idle = Deadline::after_ms(IDLE_MS);
            }
            self.reap_tx();
            if (got > 0 && idle.passed()) || deadline.passed() {
                break;
            }
        }
        if got < 2 {
            self.dev.fail_timeout("the peer's frames");
        }
        // The first frame only starts the clock: count the others.
        (got - 1, bytes, last - first)
    }

    fn ping_pong(&mut self, rounds: u32) -> u64 {
        let start = tsc::now();
        for seq in 0..rounds {
            self.send_small(PING, seq);
            let deadline = Deadline::after_ms(ANSWER_MS);
            loop {
                let Some((head, len)) = self.rx.pop_used() else {
                    if deadline.passed() {
                        self.dev.fail_timeout("a pong");
                    }
                    continue;
                };
                let buf = self.rx_buffer(head);
                let pong = self.is(&buf, u64::from(len), PONG, Some(seq));
                self.post_rx();
                self.rx.kick();
                if pong {
                    break;
                }
            }
            self.reap_tx();
        }
        tsc::now() - start
    }
}

/// The `netbench=N` scenario.
pub fn run(info: &BootInfo, frames: u64) {
    let mut bench = Bench::open(info);
    let khz = tsc::khz();
    let cycles = bench.stream_tx(frames);
    serial::line()
        .str("testguest: netbench tx frames=")
        .dec(frames)
        .str(" bytes=")
        .dec(frames * FULL_FRAME)
        .str(" cycles=")
        .dec(cycles)
        .str(" tsc_khz=")
        .dec(khz)
        .str("\n");
    let (got, bytes, cycles) = bench.stream_rx(frames);
    serial::line()
        .str("testguest: netbench rx frames=")
        .dec(got)
        .str(" bytes=")
        .dec(bytes)
        .str(" cycles=")
        .dec(cycles)
        .str(" tsc_khz=")
        .dec(khz)
        .str("\n");
    let rounds = (frames / 10).clamp(100, u64::from(u32::MAX)) as u32;
    let cycles = bench.ping_pong(rounds);
    serial::line()
        .str("testguest: netbench pingpong rounds=")
        .dec(rounds.into())
        .str(" cycles=")
        .dec(cycles)
        .str(" tsc_khz=")
        .dec(khz)
        .str("\n");
    bench.send_small(DONE, 0);
    let deadline = Deadline::after_ms(ANSWER_MS);
    while bench.tx.pop_used().is_none() && !deadline.passed() {}
}
