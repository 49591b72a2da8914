//! virtio-net through its public interface: activation with mock queues, a hand-turned event
//! loop, and a datagram socket pair standing in for the tap. The same driver helpers serve
//! `real_tap`, the tests on a real tap.

#![allow(clippy::unwrap_used)]

mod real_tap;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::tap::Tap;
use super::{NetCounters, VirtioNet, VNET_HDR_LEN};
use crate::guest_memory::TrackedGuestMemory;
use crate::virtio::device::{ActivateContext, VirtioDevice};
use crate::virtio::test_support::{guest_memory, DriverQueue, RecordingSignals, TestLoop};

pub(super) const RAM: usize = 0x40_0000;
const RX_RINGS: u64 = 0x0;
const TX_RINGS: u64 = 0x4000;
const QSIZE: u16 = 16;
const VERSION_1: u64 = 1 << 32;
pub(super) const ETHERTYPE: u16 = 0x88b5; // IEEE local experimental

/// A broadcast Ethernet frame carrying `payload`.
pub(super) fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub(super) struct Driver<'a> {
    mem: &'a TrackedGuestMemory,
    pub(super) rx: DriverQueue<'a>,
    pub(super) tx: DriverQueue<'a>,
    rx_kick: EventFd,
    tx_kick: EventFd,
    pub(super) signals: Arc<RecordingSignals>,
}

pub(super) fn activate<'a>(
    dev: &mut VirtioNet,
    mem: &'a TrackedGuestMemory,
    lp: &TestLoop,
    acked: u64,
) -> Driver<'a> {
    let rx = DriverQueue::new(mem, RX_RINGS, QSIZE);
    let tx = DriverQueue::new(mem, TX_RINGS, QSIZE);
    let (rxa, rx_kick) = rx.activated(0);
    let (txa, tx_kick) = tx.activated(1);
    let signals = Arc::new(RecordingSignals::default());
    dev.activate(ActivateContext {
        mem: mem.clone(),
        acked_features: acked,
        queues: vec![rxa, txa],
        signals: signals.clone(),
        event_loop: lp.endpoint(),
    })
    .unwrap();
    Driver {
        mem,
        rx,
        tx,
        rx_kick,
        tx_kick,
        signals,
    }
}

impl Driver<'_> {
    /// Puts header + frame in guest memory at `addr` and offers it on the TX queue.
    pub(super) fn send(&mut self, addr: u64, frame: &[u8]) -> u16 {
        let mut buf = vec![0u8; VNET_HDR_LEN];
        buf.extend_from_slice(frame);
        self.mem.write_slice(&buf, GuestAddress(addr)).unwrap();
        let head = self.tx.add_chain(&[
            (addr, VNET_HDR_LEN as u32, false),
            (addr + VNET_HDR_LEN as u64, frame.len() as u32, false),
        ]);
        self.tx_kick.write(1).unwrap();
        head
    }

    pub(super) fn offer_rx(&mut self, addr: u64, len: u32) -> u16 {
        let head = self.rx.add_chain(&[(addr, len, true)]);
        self.rx_kick.write(1).unwrap();
        head
    }

    pub(super) fn read(&self, addr: u64, len: usize) -> Vec<u8> {
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

fn recv(peer: &UnixDatagram) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 70000];
    match peer.recv(&mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e) => panic!("recv: {e}"),
    }
}

#[test]
fn tx_frame_reaches_the_host_side() {
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let (mut dev, peer) = socket_device();
    let mut d = activate(&mut dev, &mem, &lp, VERSION_1);
    let head = d.send(0x10_0000, &frame(b"to the host"));
    lp.turn();
    let got = recv(&peer).expect("a frame on the host side");
    assert_eq!(&got[..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN]);
    assert_eq!(&got[VNET_HDR_LEN..], frame(b"to the host").as_slice());
    assert_eq!(d.tx.take_used(), vec![(head, 0)]);
    assert_eq!(d.signals.take_notified(), vec![1]);
    assert_eq!(
        dev.counters(),
        Some(NetCounters {
            tx_frames: 1,
            ..Default::default()
        })
    );
}

#[test]
fn rx_frame_lands_in_guest_buffer_with_num_buffers_1() {
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let (mut dev, peer) = socket_device();
    let mut d = activate(&mut dev, &mem, &lp, VERSION_1);
    let head = d.offer_rx(0x20_0000, 2048);
    let mut sent = vec![0u8; VNET_HDR_LEN];
    sent.extend_from_slice(&frame(b"to the guest"));
    peer.send(&sent).unwrap();
    lp.turn();
    assert_eq!(d.rx.take_used(), vec![(head, sent.len() as u32)]);
    let got = d.read(0x20_0000, sent.len());
    assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers");
    assert_eq!(&got[VNET_HDR_LEN..], &sent[VNET_HDR_LEN..]);
    assert_eq!(d.signals.take_notified(), vec![0]);
}

#[test]
fn rx_header_flags_reach_only_a_driver_with_guest_csum() {
    const DATA_VALID: u8 = 2;
    const GUEST_CSUM: u64 = 1 << 1;
    for (acked, expected) in [(VERSION_1, 0), (VERSION_1 | GUEST_CSUM, DATA_VALID)] {
        let mem = guest_memory(RAM);
        let mut lp = TestLoop::new();
        let (mut dev, peer) = socket_device();
        let mut d = activate(&mut dev, &mem, &lp, acked);
        d.offer_rx(0x20_0000, 2048);
        let mut sent = vec![0u8; VNET_HDR_LEN];
        sent[0] = DATA_VALID;
        sent.extend_from_slice(&frame(b"csum"));
        peer.send(&sent).unwrap();
        lp.turn();
        assert_eq!(d.rx.take_used().len(), 1);
        assert_eq!(d.read(0x20_0000, 1), [expected], "acked {acked:#x}");
    }
}

#[test]
fn rx_waits_for_buffers_without_spinning_then_delivers() {
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let (mut dev, peer) = socket_device();
    let mut d = activate(&mut dev, &mem, &lp, VERSION_1);
    lp.turn();
    let mut sent = vec![0u8; VNET_HDR_LEN];
    sent.extend_from_slice(&frame(b"early"));
    peer.send(&sent).unwrap();
    peer.send(&sent).unwrap();
    lp.turn();
    assert!(d.rx.take_used().is_empty());
    // The tap (still readable: one more frame queued) is off the loop until a kick.
    assert_eq!(
        lp.wait(50),
        0,
        "the loop must not wake for a tap it cannot serve"
    );
    let first = d.offer_rx(0x20_0000, 2048);
    lp.turn();
    assert_eq!(d.rx.take_used(), vec![(first, sent.len() as u32)]);
    let second = d.offer_rx(0x21_0000, 2048);
    lp.turn();
    assert_eq!(d.rx.take_used(), vec![(second, sent.len() as u32)]);
    assert_eq!(
        d.read(0x21_0000 + VNET_HDR_LEN as u64, 5 + 14)[14..],
        *b"early"
    );
}

#[test]
fn bad_tx_chains_are_returned_unused_and_the_queue_goes_on() {
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let (mut dev, peer) = socket_device();
    let mut d = activate(&mut dev, &mem, &lp, VERSION_1);
    let wrong_dir = d.tx.add_chain(&[(0x10_0000, 64, true)]);
    let short = d.tx.add_chain(&[(0x10_0000, 4, false)]);
    let outside = d.tx.add_chain(&[(RAM as u64 - 16, 64, false)]);
    let huge = d.tx.add_chain(&[(0x10_0000, u32::MAX, false)]);
    let good = d.send(0x11_0000, &frame(b"still works"));
    lp.turn();
    assert_eq!(
        d.tx.take_used(),
        vec![
            (wrong_dir, 0),
            (short, 0),
            (outside, 0),
            (huge, 0),
            (good, 0)
        ]
    );
    let got = recv(&peer).expect("the good frame");
    assert_eq!(&got[VNET_HDR_LEN..], frame(b"still works").as_slice());
    assert!(recv(&peer).is_none(), "nothing from the bad chains");
    assert!(!d.signals.needs_reset());
    let c = dev.counters().unwrap();
    assert_eq!((c.tx_frames, c.tx_dropped), (1, 4));
}

#[test]
fn bad_rx_chains_drop_the_frame_not_the_device() {
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let (mut dev, peer) = socket_device();
    let mut d = activate(&mut dev, &mem, &lp, VERSION_1);
    let readable = d.rx.add_chain(&[(0x20_0000, 2048, false)]);
    let tiny = d.rx.add_chain(&[(0x21_0000, 8, true)]);
    let outside = d.rx.add_chain(&[(RAM as u64 - 100, 2048, true)]);
    let good = d.rx.add_chain(&[(0x22_0000, 2048, true)]);
    let mut sent = vec![0u8; VNET_HDR_LEN];
    sent.extend_from_slice(&frame(b"x"));
    for _ in 0..4 {
        peer.send(&sent).unwrap();
    }
    d.rx_kick.write(1).unwrap();
    lp.turn();
    assert_eq!(
        d.rx.take_used(),
        vec![
            (readable, 0),
            (tiny, 0),
            (outside, 0),
            (good, sent.len() as u32)
        ]
    );
    assert!(!d.signals.needs_reset());
    assert_eq!(
        d.read(0x20_0000, 16),
        vec![0u8; 16],
        "a readable buffer is not written"
    );
    let c = dev.counters().unwrap();
    assert_eq!((c.rx_frames, c.rx_dropped), (1, 3));
}

#[test]
fn unusable_queues_mark_the_device_broken() {
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let (mut dev, peer) = socket_device();
    let mut d = activate(&mut dev, &mem, &lp, VERSION_1);
    d.tx.add_raw_head(QSIZE + 3);
    d.tx_kick.write(1).unwrap();
    lp.turn();
    assert!(d.signals.needs_reset(), "head index beyond the queue");
    // Further kicks are ignored, without spinning or panicking.
    d.send(0x10_0000, &frame(b"ignored"));
    lp.turn();
    assert!(d.tx.take_used().is_empty());
    assert_eq!(lp.wait(20), 0);

    dev.reset();
    let d = activate(&mut dev, &mem, &lp, VERSION_1);
    d.rx.set_avail_idx(QSIZE * 3);
    d.rx_kick.write(1).unwrap();
    peer.send(&[0u8; 32]).unwrap();
    lp.turn();
    assert!(
        d.signals.needs_reset(),
        "available index beyond the queue size"
    );
}

#[test]
fn reset_stops_the_handler() {
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let (mut dev, peer) = socket_device();
    let mut d = activate(&mut dev, &mem, &lp, VERSION_1);
    lp.turn();
    dev.reset();
    assert_eq!(dev.counters(), None);
    d.send(0x10_0000, &frame(b"after reset"));
    lp.turn();
    assert!(recv(&peer).is_none());
    assert!(d.tx.take_used().is_empty());
    assert_eq!(lp.wait(20), 0, "the handler's fds left the loop");
}

#[test]
fn a_driver_may_enable_only_the_transmit_queue() {
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let (mut dev, peer) = socket_device();
    let mut tx = DriverQueue::new(&mem, TX_RINGS, QSIZE);
    let (txa, tx_kick) = tx.activated(1);
    let signals = Arc::new(RecordingSignals::default());
    dev.activate(ActivateContext {
        mem: mem.clone(),
        acked_features: VERSION_1,
        queues: vec![txa],
        signals: signals.clone(),
        event_loop: lp.endpoint(),
    })
    .unwrap();
    let mut buf = vec![0u8; VNET_HDR_LEN];
    buf.extend_from_slice(&frame(b"tx only"));
    mem.write_slice(&buf, GuestAddress(0x10_0000)).unwrap();
    let head = tx.add_chain(&[(0x10_0000, buf.len() as u32, false)]);
    tx_kick.write(1).unwrap();
    peer.send(&buf).unwrap(); // a frame for the guest, which has no receive queue
    lp.turn();
    assert_eq!(tx.take_used(), vec![(head, 0)]);
    assert_eq!(recv(&peer).unwrap(), buf);
    assert!(!signals.needs_reset());
    assert_eq!(lp.wait(20), 0, "the unserved tap is off the loop");
}

#[test]
fn activation_refuses_queues_the_device_does_not_have() {
    let mem = guest_memory(RAM);
    let lp = TestLoop::new();
    let (mut dev, _peer) = socket_device();
    let q = DriverQueue::new(&mem, RX_RINGS, QSIZE);
    for (index, expected) in [(2, "queue 2 does not exist"), (0, "queue 0 given twice")] {
        let (a, _kick) = q.activated(0);
        let (b, _kick) = q.activated(index);
        let err = dev
            .activate(ActivateContext {
                mem: mem.clone(),
                acked_features: VERSION_1,
                queues: vec![a, b],
                signals: Arc::new(RecordingSignals::default()),
                event_loop: lp.endpoint(),
            })
            .unwrap_err();
        assert!(err.to_string().contains(expected), "{err}");
    }
}
