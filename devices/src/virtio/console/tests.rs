//! virtio-console through its public interface: mock queues, a hand-turned event loop, a
//! shared buffer as the output and `ConsoleInput` as the keyboard.

#![allow(clippy::unwrap_used)]

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{ConsoleCounters, VirtioConsole};
use crate::guest_memory::TrackedGuestMemory;
use crate::virtio::device::{ActivateContext, VirtioDevice};
use crate::virtio::test_support::{guest_memory, DriverQueue, RecordingSignals, TestLoop};

const RAM: usize = 0x40_0000;
const QSIZE: u16 = 16;

#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl SharedBuf {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

struct Driver<'a> {
    mem: &'a TrackedGuestMemory,
    rx: DriverQueue<'a>,
    tx: DriverQueue<'a>,
    rx_kick: EventFd,
    tx_kick: EventFd,
    signals: Arc<RecordingSignals>,
}

fn activate<'a>(dev: &mut VirtioConsole, mem: &'a TrackedGuestMemory, lp: &TestLoop) -> Driver<'a> {
    let rx = DriverQueue::new(mem, 0, QSIZE);
    let tx = DriverQueue::new(mem, 0x4000, QSIZE);
    let (rxa, rx_kick) = rx.activated(0);
    let (txa, tx_kick) = tx.activated(1);
    let signals = Arc::new(RecordingSignals::default());
    dev.activate(ActivateContext {
        mem: mem.clone(),
        acked_features: 1 << 32,
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

fn console() -> (VirtioConsole, SharedBuf) {
    let out = SharedBuf::default();
    (VirtioConsole::new(Box::new(out.clone())).unwrap(), out)
}

impl Driver<'_> {
    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

#[test]
fn guest_output_reaches_the_writer() {
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let (mut dev, out) = console();
    let mut d = activate(&mut dev, &mem, &lp);
    mem.write_slice(b"hello, ", GuestAddress(0x10_0000))
        .unwrap();
    mem.write_slice(b"hvc0\n", GuestAddress(0x20_0000)).unwrap();
    let head =
        d.tx.add_chain(&[(0x10_0000, 7, false), (0x20_0000, 5, false)]);
    d.tx_kick.write(1).unwrap();
    lp.turn();
    assert_eq!(out.take(), b"hello, hvc0\n");
    assert_eq!(d.tx.take_used(), vec![(head, 0)]);
    assert_eq!(d.signals.take_notified(), vec![1]);
    assert_eq!(dev.counters().unwrap().tx_bytes, 12);
}

#[test]
fn host_input_reaches_guest_buffers_before_and_after_activation() {
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let (mut dev, _out) = console();
    let input = dev.input();
    assert_eq!(input.enqueue(b"early"), 5);
    let mut d = activate(&mut dev, &mem, &lp);
    lp.turn();
    assert!(d.rx.take_used().is_empty(), "no buffers yet");
    // Two bytes of room, then the rest in the next buffer.
    let small = d.rx.add_chain(&[(0x10_0000, 2, true)]);
    let big = d.rx.add_chain(&[(0x11_0000, 64, true)]);
    d.rx_kick.write(1).unwrap();
    lp.turn();
    assert_eq!(d.rx.take_used(), vec![(small, 2), (big, 3)]);
    assert_eq!(d.read(0x10_0000, 2), b"ea");
    assert_eq!(d.read(0x11_0000, 3), b"rly");
    assert_eq!(d.signals.take_notified(), vec![0]);

    // Input typed while a buffer waits is delivered on the input wake-up alone.
    let waiting = d.rx.add_chain(&[(0x12_0000, 64, true)]);
    d.rx_kick.write(1).unwrap();
    lp.turn();
    assert!(d.rx.take_used().is_empty(), "no input, buffer kept");
    input.enqueue(b"ls\n");
    lp.turn();
    assert_eq!(d.rx.take_used(), vec![(waiting, 3)]);
    assert_eq!(d.read(0x12_0000, 3), b"ls\n");
    assert_eq!(input.pending(), 0);
}

#[test]
fn bad_chains_move_no_bytes() {
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let (mut dev, out) = console();
    let input = dev.input();
    let mut d = activate(&mut dev, &mem, &lp);
    mem.write_slice(b"secret", GuestAddress(0x10_0000)).unwrap();
    let writable_tx = d.tx.add_chain(&[(0x10_0000, 6, true)]);
    let mixed_tx =
        d.tx.add_chain(&[(0x10_0000, 6, false), (0x11_0000, 6, true)]);
    let outside_tx =
        d.tx.add_chain(&[(0x10_0000, 6, false), (RAM as u64 - 2, 6, false)]);
    d.tx_kick.write(1).unwrap();
    lp.turn();
    assert_eq!(
        d.tx.take_used(),
        vec![(writable_tx, 0), (mixed_tx, 0), (outside_tx, 0)]
    );
    assert!(out.take().is_empty(), "nothing printed from bad chains");

    input.enqueue(b"key");
    let readable_rx = d.rx.add_chain(&[(0x20_0000, 16, false)]);
    let outside_rx = d.rx.add_chain(&[(RAM as u64 - 1, 16, true)]);
    let good_rx = d.rx.add_chain(&[(0x21_0000, 16, true)]);
    d.rx_kick.write(1).unwrap();
    lp.turn();
    assert_eq!(
        d.rx.take_used(),
        vec![(readable_rx, 0), (outside_rx, 0), (good_rx, 3)]
    );
    assert_eq!(
        d.read(0x21_0000, 3),
        b"key",
        "input kept for the good buffer"
    );
    assert!(!d.signals.needs_reset());
    assert_eq!(
        dev.counters(),
        Some(ConsoleCounters {
            tx_bytes: 0,
            rx_bytes: 3,
            bad_chains: 5,
            lost_bytes: 0
        })
    );
}

#[test]
fn unusable_queue_needs_reset_and_reset_keeps_input() {
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let (mut dev, out) = console();
    let mut d = activate(&mut dev, &mem, &lp);
    d.tx.add_raw_head(QSIZE);
    d.tx_kick.write(1).unwrap();
    lp.turn();
    assert!(d.signals.needs_reset());
    assert_eq!(lp.wait(20), 0, "a broken device leaves the loop alone");

    dev.reset();
    assert_eq!(dev.counters(), None);
    dev.input().enqueue(b"again");
    lp.turn();
    let mut d = activate(&mut dev, &mem, &lp);
    let head = d.rx.add_chain(&[(0x30_0000, 16, true)]);
    d.rx_kick.write(1).unwrap();
    mem.write_slice(b"ok", GuestAddress(0x31_0000)).unwrap();
    d.tx.add_chain(&[(0x31_0000, 2, false)]);
    d.tx_kick.write(1).unwrap();
    lp.turn();
    assert_eq!(d.rx.take_used(), vec![(head, 5)]);
    assert_eq!(d.read(0x30_0000, 5), b"again");
    assert_eq!(out.take(), b"ok");
    assert!(!d.signals.needs_reset());
}

#[test]
fn config_space_is_zero_and_read_only() {
    let (mut dev, _out) = console();
    assert_eq!(dev.device_type(), 3);
    assert_eq!(dev.queue_max_sizes().len(), 2);
    assert_ne!(dev.device_features() & (1 << 32), 0, "VERSION_1");
    dev.write_config(8, &[1, 2, 3, 4]);
    let mut cfg = [0xffu8; 12];
    dev.read_config(0, &mut cfg);
    assert_eq!(cfg, [0; 12]);
    dev.read_config(u64::MAX, &mut cfg[..4]);
    assert_eq!(cfg, [0; 12]);
}

#[test]
fn a_driver_may_set_up_only_transmitq0() {
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let (mut dev, out) = console();
    let mut tx = DriverQueue::new(&mem, 0x4000, QSIZE);
    let (txa, tx_kick) = tx.activated(1);
    let signals = Arc::new(RecordingSignals::default());
    dev.activate(ActivateContext {
        mem: mem.clone(),
        acked_features: 1 << 32,
        queues: vec![txa],
        signals: signals.clone(),
        event_loop: lp.endpoint(),
    })
    .unwrap();
    dev.input().enqueue(b"typed, never read");
    mem.write_slice(b"hi\n", GuestAddress(0x10_0000)).unwrap();
    let head = tx.add_chain(&[(0x10_0000, 3, false)]);
    tx_kick.write(1).unwrap();
    lp.turn();
    assert_eq!(tx.take_used(), vec![(head, 0)]);
    assert_eq!(out.take(), b"hi\n");
    assert!(!signals.needs_reset());
    assert_eq!(dev.input().pending(), 17, "input waits for a receive queue");
}
