//! virtio-net with many frames through rings that wrap: `VIRTIO_RING_F_EVENT_IDX` interrupt
//! and kick suppression (the driver side counts both), and `VIRTIO_NET_F_MRG_RXBUF` frames
//! spanning receive chains, a driver offering too few of them, and chains no frame fits. The
//! driver is blk's ring-level test driver; a datagram socket pair stands in for the tap.

#![allow(clippy::unwrap_used)]

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::{frame, RAM};
use crate::guest_memory::TrackedGuestMemory;
use crate::virtio::blk::tests::driver::Driver;
use crate::virtio::device::{ActivateContext, VirtioDevice};
use crate::virtio::net::tap::Tap;
use crate::virtio::net::{VirtioNet, VNET_HDR_LEN};
use crate::virtio::test_support::{guest_memory, Buf, RecordingSignals, TestLoop};
use vm_memory::{Bytes, GuestAddress};

const VERSION_1: u64 = 1 << 32;
const EVENT_IDX: u64 = 1 << 29;
const MRG_RXBUF: u64 = 1 << 15;
const SIZE: u16 = 256;
const RX_RINGS: u64 = 0;
const TX_RINGS: u64 = 0x8000;
/// Receive buffers start here, one 2 KiB slot per descriptor.
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x30_0000;

struct Guest<'a> {
    mem: &'a TrackedGuestMemory,
    rx: Driver<'a>,
    tx: Driver<'a>,
    rx_kick: EventFd,
    tx_kick: EventFd,
    signals: Arc<RecordingSignals>,
    /// Interrupts the guest took, by queue.
    irqs: [usize; 2],
    /// Kicks the guest had to make (what `vring_need_event` asked for with EVENT_IDX).
    tx_kicks: usize,
}

fn start<'a>(
    dev: &mut VirtioNet,
    mem: &'a TrackedGuestMemory,
    lp: &TestLoop,
    acked: u64,
    size: u16,
) -> Guest<'a> {
    let rx = Driver::new(mem, RX_RINGS, size);
    let tx = Driver::new(mem, TX_RINGS, size);
    let (mut rxa, rx_kick) = rx.activated(0);
    let (mut txa, tx_kick) = tx.activated(1);
    // As the transport does when the driver accepted the feature.
    rxa.queue.set_event_idx(acked & EVENT_IDX != 0);
    txa.queue.set_event_idx(acked & EVENT_IDX != 0);
    let signals = Arc::new(RecordingSignals::default());
    dev.activate(ActivateContext {
        mem: mem.clone(),
        acked_features: acked,
        queues: vec![rxa, txa],
        signals: signals.clone(),
        event_loop: lp.endpoint(),
    })
    .unwrap();
    Guest {
        mem,
        rx,
        tx,
        rx_kick,
        tx_kick,
        signals,
        irqs: [0; 2],
        tx_kicks: 0,
    }
}

impl Guest<'_> {
    fn take_irqs(&mut self) {
        for q in self.signals.take_notified() {
            self.irqs[usize::from(q)] += 1;
        }
    }

    /// Offers one receive chain of `lens` descriptors; returns its head.
    fn offer_rx(&mut self, at: u64, lens: &[u32]) -> u16 {
        let mut addr = at;
        let bufs: Vec<_> = lens
            .iter()
            .map(|&len| {
                let buf = (addr, len, true);
                addr += u64::from(len).max(1);
                buf
            })
            .collect();
        let head = self.rx.add_chain(&bufs);
        self.rx_kick.write(1).unwrap();
        head
    }

    /// Offers `n` frames on the transmit queue, kicking once if the device asked for it.
    fn send(&mut self, n: usize, event_idx: bool) {
        let old = self.tx.avail_idx();
        for i in 0..n {
            let slot = TX_BUFS + (i as u64) * 2048;
            let mut buf = vec![0u8; VNET_HDR_LEN];
            buf.extend_from_slice(&frame(&[i as u8; 100]));
            self.mem.write_slice(&buf, GuestAddress(slot)).unwrap();
            self.tx.add_chain(&[(slot, buf.len() as u32, false)]);
        }
        let new = self.tx.avail_idx();
        let event = self.tx.avail_event();
        // `vring_need_event`: kick when `avail_event` lies in (old, new].
        let kick = !event_idx || new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old);
        if kick {
            self.tx_kicks += 1;
            self.tx_kick.write(1).unwrap();
        }
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

fn socket_device() -> (VirtioNet, UnixDatagram) {
    let (ours, peer) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    peer.set_nonblocking(true).unwrap();
    let dev = VirtioNet::new(Tap::from_socket(OwnedFd::from(ours)), None).unwrap();
    (dev, peer)
}

/// Header (all zero) + frame, as the tap delivers it.
fn from_tap(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; VNET_HDR_LEN];
    v.extend_from_slice(&frame(
        &(0..len - VNET_HDR_LEN - 14)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>(),
    ));
    v
}

const ROUNDS: usize = 8;
const PER_ROUND: usize = 16;

/// 128 frames each way in 8 rounds, with the guest asking for one receive and one transmit
/// interrupt at the end: returns (receive interrupts, transmit interrupts, kicks).
fn irqs_for_128_frames(acked: u64) -> (usize, usize, usize) {
    let frames = ROUNDS * PER_ROUND;
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let (mut dev, peer) = socket_device();
    let mut g = start(&mut dev, &mem, &lp, acked, SIZE);
    for i in 0..frames {
        g.offer_rx(RX_BUFS + i as u64 * 2048, &[2048]);
    }
    g.rx.set_used_event(frames as u16 - 1);
    g.tx.set_used_event(frames as u16 - 1);
    lp.turn();
    g.take_irqs();
    let sent = from_tap(200);
    let mut rx_used = 0;
    let mut tx_used = 0;
    let event_idx = acked & EVENT_IDX != 0;
    for _ in 0..ROUNDS {
        for _ in 0..PER_ROUND {
            peer.send(&sent).unwrap();
        }
        g.send(PER_ROUND, event_idx);
        lp.turn();
        g.take_irqs();
        rx_used += g.rx.take_used().len();
        tx_used += g.tx.take_used().len();
        while peer.recv(&mut [0u8; 4096]).is_ok() {}
    }
    assert_eq!((rx_used, tx_used), (frames, frames), "acked {acked:#x}");
    let c = dev.counters().unwrap();
    assert_eq!((c.rx_frames, c.tx_frames), (frames as u64, frames as u64));
    (g.irqs[0], g.irqs[1], g.tx_kicks)
}

#[test]
fn event_idx_takes_far_fewer_interrupts_and_kicks_than_frames() {
    let (rx_irqs, tx_irqs, kicks) = irqs_for_128_frames(VERSION_1 | EVENT_IDX);
    assert_eq!(
        (rx_irqs, tx_irqs),
        (1, 1),
        "one interrupt each way, where used_event asked"
    );
    assert_eq!(kicks, ROUNDS, "one kick per batch, not per frame");
    // Without the feature the device interrupts after every batch it handles.
    let (rx_irqs, tx_irqs, kicks) = irqs_for_128_frames(VERSION_1);
    assert_eq!((rx_irqs, tx_irqs, kicks), (ROUNDS, ROUNDS, ROUNDS));
}

#[test]
fn event_idx_device_asks_for_a_kick_when_it_runs_out_of_buffers() {
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let (mut dev, peer) = socket_device();
    let mut g = start(&mut dev, &mem, &lp, VERSION_1 | EVENT_IDX, SIZE);
    g.offer_rx(RX_BUFS, &[2048]);
    let sent = from_tap(300);
    for _ in 0..2 {
        peer.send(&sent).unwrap();
    }
    lp.turn();
    assert_eq!(g.rx.take_used().len(), 1);
    assert_eq!(g.rx.avail_event(), 1, "the next buffer offered must kick");
    g.offer_rx(RX_BUFS + 2048, &[2048]);
    lp.turn();
    assert_eq!(g.rx.take_used(), vec![(1, 300)]);
}

#[test]
fn mrg_rxbuf_frame_spans_chains_with_num_buffers() {
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let (mut dev, peer) = socket_device();
    let mut g = start(&mut dev, &mem, &lp, VERSION_1 | MRG_RXBUF, SIZE);
    let heads: Vec<u16> = (0..3)
        .map(|i| g.offer_rx(RX_BUFS + i * 0x1000, &[1024]))
        .collect();
    let sent = from_tap(2500);
    peer.send(&sent).unwrap();
    lp.turn();
    assert_eq!(
        g.rx.take_used(),
        vec![(heads[0], 1024), (heads[1], 1024), (heads[2], 2500 - 2048)]
    );
    let mut got = g.read(RX_BUFS, 1024);
    got.extend(g.read(RX_BUFS + 0x1000, 1024));
    got.extend(g.read(RX_BUFS + 0x2000, 2500 - 2048));
    assert_eq!(&got[10..12], &3u16.to_le_bytes(), "num_buffers");
    assert_eq!(&got[VNET_HDR_LEN..], &sent[VNET_HDR_LEN..]);
    assert_eq!(
        g.signals.take_notified(),
        vec![0],
        "one interrupt per frame"
    );
}

#[test]
fn mrg_rxbuf_chain_of_several_descriptors_takes_a_frame_too() {
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let (mut dev, peer) = socket_device();
    let mut g = start(&mut dev, &mem, &lp, VERSION_1 | MRG_RXBUF, SIZE);
    let a = g.offer_rx(RX_BUFS, &[VNET_HDR_LEN as u32, 500]);
    let b = g.offer_rx(RX_BUFS + 0x1000, &[0, 600, 100]);
    let sent = from_tap(1000);
    peer.send(&sent).unwrap();
    lp.turn();
    assert_eq!(
        g.rx.take_used(),
        vec![(a, 512), (b, 1000 - 512)],
        "a zero-length descriptor inside a chain is skipped"
    );
    let mut got = g.read(RX_BUFS, VNET_HDR_LEN + 500);
    got.extend(g.read(RX_BUFS + 0x1000 + 1, 488));
    assert_eq!(got, {
        let mut s = sent.clone();
        s[10..12].copy_from_slice(&2u16.to_le_bytes());
        s
    });
}

#[test]
fn mrg_rxbuf_too_few_buffers_hold_the_frame_until_more_come() {
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    for acked in [VERSION_1 | MRG_RXBUF, VERSION_1 | MRG_RXBUF | EVENT_IDX] {
        let (mut dev, peer) = socket_device();
        let mut g = start(&mut dev, &mem, &lp, acked, SIZE);
        let first = g.offer_rx(RX_BUFS, &[1500]);
        let big = from_tap(4000);
        let small = from_tap(100);
        peer.send(&big).unwrap();
        peer.send(&small).unwrap();
        lp.turn();
        assert!(
            g.rx.take_used().is_empty(),
            "1500 bytes: not enough for 4000"
        );
        assert_eq!(lp.wait(30), 0, "waiting for buffers does not spin");
        let second = g.offer_rx(RX_BUFS + 0x1000, &[1500]);
        lp.turn();
        assert!(g.rx.take_used().is_empty(), "3000 bytes: still not enough");
        let third = g.offer_rx(RX_BUFS + 0x2000, &[1500]);
        let fourth = g.offer_rx(RX_BUFS + 0x3000, &[1500]);
        lp.turn();
        assert_eq!(
            g.rx.take_used(),
            vec![(first, 1500), (second, 1500), (third, 1000), (fourth, 100)],
            "acked {acked:#x}: the held frame whole, then the next one"
        );
        let mut got = g.read(RX_BUFS, 1500);
        got.extend(g.read(RX_BUFS + 0x1000, 1500));
        got.extend(g.read(RX_BUFS + 0x2000, 1000));
        assert_eq!(&got[10..12], &3u16.to_le_bytes());
        assert_eq!(&got[VNET_HDR_LEN..], &big[VNET_HDR_LEN..]);
        assert_eq!(&g.read(RX_BUFS + 0x3000 + 10, 2), &1u16.to_le_bytes());
        let c = dev.counters().unwrap();
        assert_eq!((c.rx_frames, c.rx_dropped), (2, 0));
        dev.reset();
    }
}

#[test]
fn mrg_rxbuf_unusable_chains_drop_one_frame_and_never_the_device() {
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let (mut dev, peer) = socket_device();
    let mut g = start(&mut dev, &mem, &lp, VERSION_1 | MRG_RXBUF | EVENT_IDX, SIZE);
    let sent = from_tap(3000);
    // Each case: chains offered, then one frame. The frame is dropped and every chain it
    // took comes back with length 0.
    let cases: Vec<(&str, Vec<Vec<Buf>>)> = vec![
        ("zero-length chain", vec![vec![(RX_BUFS, 0, true)]]),
        (
            "shorter than the header",
            vec![
                vec![(RX_BUFS, 2048, true)],
                vec![(RX_BUFS + 0x1000, 8, true)],
            ],
        ),
        (
            "device-readable",
            vec![
                vec![(RX_BUFS, 2048, true)],
                vec![(RX_BUFS + 0x1000, 2048, false)],
            ],
        ),
        (
            "outside guest memory",
            vec![vec![(RAM as u64 - 16, 2048, true)]],
        ),
        ("length wraps", vec![vec![(RX_BUFS, u32::MAX, true)]]),
    ];
    for (what, chains) in cases {
        let heads: Vec<u16> = chains.iter().map(|c| g.rx.add_chain(c)).collect();
        g.rx_kick.write(1).unwrap();
        peer.send(&sent).unwrap();
        lp.turn();
        let expected: Vec<(u16, u32)> = heads.iter().map(|&h| (h, 0)).collect();
        assert_eq!(g.rx.take_used(), expected, "{what}");
        assert!(!g.signals.needs_reset(), "{what}");
    }
    // A ring that can never hold the frame: all its chains come back, nothing hangs.
    dev.reset();
    let mut g = start(&mut dev, &mem, &lp, VERSION_1 | MRG_RXBUF, 16);
    for i in 0..16 {
        g.offer_rx(RX_BUFS + i * 64, &[64]);
    }
    peer.send(&sent).unwrap();
    lp.turn();
    let used = g.rx.take_used();
    assert_eq!(used.len(), 16);
    assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
    // The device still works.
    let head = g.offer_rx(RX_BUFS, &[2048]);
    peer.send(&from_tap(500)).unwrap();
    lp.turn();
    assert_eq!(g.rx.take_used(), vec![(head, 500)]);
    let c = dev.counters().unwrap();
    assert_eq!((c.rx_frames, c.rx_dropped), (1, 1));
}
