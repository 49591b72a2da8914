//! virtio-vsock through its public interface: activation with mock queues, a hand-turned event
//! loop, and real Unix sockets on the host side.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::packet::{
    Header, HEADER_LEN, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN,
    SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::{VirtioVsock, VsockState, CONN_BUFFER, FIRST_HOST_PORT, HOST_CID};
use crate::guest_memory::TrackedGuestMemory;
use crate::virtio::device::{ActivateContext, VirtioDevice};
use crate::virtio::test_support::{guest_memory, DriverQueue, RecordingSignals, TestLoop};

const RAM: usize = 0x40_0000;
const QSIZE: u16 = 16;
const CID: u64 = 7;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x20_0000;
const EVENT_BUFS: u64 = 0x30_0000;

struct Driver<'a> {
    mem: &'a TrackedGuestMemory,
    rx: DriverQueue<'a>,
    tx: DriverQueue<'a>,
    event: DriverQueue<'a>,
    kicks: [EventFd; 3],
    signals: Arc<RecordingSignals>,
    rx_posted: u64,
    tx_at: u64,
    /// Used entries seen so far, per queue.
    seen: [u16; 3],
}

/// Queue `i`'s rings start at `RINGS[i]`; its used ring (moved, see `activate`) at
/// `RINGS[i] + USED_OFFSET`.
const RINGS: [u64; 3] = [0x0, 0x4000, 0x8000];
const USED_OFFSET: u64 = 0x1000;

fn activate<'a>(dev: &mut VirtioVsock, mem: &'a TrackedGuestMemory, lp: &TestLoop) -> Driver<'a> {
    use virtio_queue::QueueT;
    let rx = DriverQueue::new(mem, RINGS[0], QSIZE);
    let tx = DriverQueue::new(mem, RINGS[1], QSIZE);
    let event = DriverQueue::new(mem, RINGS[2], QSIZE);
    let (mut a, k0) = rx.activated(0);
    let (mut b, k1) = tx.activated(1);
    let (mut c, k2) = event.activated(2);
    // virtio-queue's mock places the used ring by the avail ring's entry count rather than its
    // size in bytes, so with 16 entries the two overlap; give the device a used ring of its own.
    for (q, base) in [&mut a, &mut b, &mut c].into_iter().zip(RINGS) {
        let used = base + USED_OFFSET;
        mem.write_slice(&[0u8; 0x100], GuestAddress(used)).unwrap();
        q.queue
            .set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    }
    let signals = Arc::new(RecordingSignals::default());
    dev.activate(ActivateContext {
        mem: mem.clone(),
        acked_features: 1 << 32,
        queues: vec![a, b, c],
        signals: signals.clone(),
        event_loop: lp.endpoint(),
    })
    .unwrap();
    Driver {
        mem,
        rx,
        tx,
        event,
        kicks: [k0, k1, k2],
        signals,
        rx_posted: 0,
        tx_at: 0,
        seen: [0; 3],
    }
}

fn header(op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        kind: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 4096,
        fwd_cnt: 0,
    }
}

impl Driver<'_> {
    /// Used entries (head, length) of queue `q` since the last call.
    fn take_used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let used = RINGS[q] + USED_OFFSET;
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        let mut out = Vec::new();
        while self.seen[q] != idx {
            let at = used + 4 + 8 * u64::from(self.seen[q] % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id as u16, len));
            self.seen[q] = self.seen[q].wrapping_add(1);
        }
        out
    }

    /// Posts `n` receive buffers of `len` bytes.
    fn post_rx(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            let addr = RX_BUFS + self.rx_posted * 0x1_0000;
            self.rx.add_chain(&[(addr, len, true)]);
            self.rx_posted += 1;
        }
        self.kicks[0].write(1).unwrap();
    }

    /// Sends a packet: header and payload in two descriptors.
    fn send(&mut self, h: &Header, payload: &[u8]) {
        let addr = TX_BUFS + self.tx_at * 0x1_0000;
        self.tx_at = (self.tx_at + 1) % 15;
        self.mem
            .write_slice(&h.encode(), GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(addr + 0x100))
            .unwrap();
        let mut bufs = vec![(addr, HEADER_LEN as u32, false)];
        if !payload.is_empty() {
            bufs.push((addr + 0x100, payload.len() as u32, false));
        }
        self.tx.add_chain(&bufs);
        self.kicks[1].write(1).unwrap();
    }

    /// Sends raw descriptors.
    fn send_raw(&mut self, bufs: &[(u64, u32, bool)]) {
        self.tx.add_chain(bufs);
        self.kicks[1].write(1).unwrap();
    }

    /// Packets the device delivered since the last call.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.take_used(0)
            .into_iter()
            .map(|(head, len)| {
                let addr = RX_BUFS + u64::from(head) * 0x1_0000;
                let mut h = [0u8; HEADER_LEN];
                self.mem.read_slice(&mut h, GuestAddress(addr)).unwrap();
                let h = Header::decode(&h);
                assert_eq!(len as usize, HEADER_LEN + h.len as usize);
                let mut data = vec![0u8; h.len as usize];
                self.mem
                    .read_slice(&mut data, GuestAddress(addr + HEADER_LEN as u64))
                    .unwrap();
                (h, data)
            })
            .collect()
    }
}

fn device(dir: &Path) -> VirtioVsock {
    VirtioVsock::new(CID, &dir.join("v.sock")).unwrap()
}

/// Turns the loop until the driver receives a connection request; returns its header.
fn next_request(lp: &mut TestLoop, drv: &mut Driver<'_>) -> Header {
    let mut req = None;
    turn_until(lp, || {
        req = drv.received().into_iter().find(|(h, _)| h.op == OP_REQUEST);
        req.is_some()
    });
    req.expect("a request").0
}

fn turn_until(lp: &mut TestLoop, mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        lp.turn();
        if done() {
            return;
        }
        lp.wait(10);
    }
    panic!("condition not reached");
}

#[test]
fn config_space_holds_the_cid_and_bad_cids_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let dev = device(dir.path());
    let mut cfg = [0xffu8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), CID);
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    for cid in [0, 1, 2, u64::from(u32::MAX)] {
        assert!(
            VirtioVsock::new(cid, &dir.path().join("w.sock")).is_err(),
            "cid {cid}"
        );
    }
}

#[test]
fn guest_connects_to_a_host_port_and_data_flows_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = device(dir.path());
    let listener = UnixListener::bind(dir.path().join("v.sock_1234")).unwrap();
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let mut drv = activate(&mut dev, &mem, &lp);
    drv.post_rx(15, 4096);
    // Refused: nobody listens on port 99.
    drv.send(&header(OP_REQUEST, 500, 99, 0), &[]);
    drv.send(&header(OP_REQUEST, 501, 1234, 0), &[]);
    let mut got = Vec::new();
    turn_until(&mut lp, || {
        got.extend(drv.received());
        got.len() >= 2
    });
    assert_eq!((got[0].0.op, got[0].0.dst_port), (OP_RST, 500));
    let r = got[1].0;
    assert_eq!(
        (r.op, r.src_port, r.dst_port, r.dst_cid),
        (OP_RESPONSE, 1234, 501, CID)
    );
    assert_eq!(r.buf_alloc, CONN_BUFFER);
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    drv.send(&header(OP_RW, 501, 1234, 5), b"hello");
    lp.turn();
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    // Host to guest: capped by the guest's 4096-byte buffer.
    host.write_all(&[9u8; 10000]).unwrap();
    let mut data = Vec::new();
    turn_until(&mut lp, || {
        for (h, d) in drv.received() {
            assert_eq!(h.op, OP_RW);
            data.extend(d);
        }
        data.len() >= 4096
    });
    lp.turn();
    lp.wait(50);
    lp.turn();
    for (h, d) in drv.received() {
        assert_eq!(h.op, OP_RW);
        data.extend(d);
    }
    assert_eq!(data.len(), 4096, "no more than the guest's credit");
    // The guest consumed it all: the rest follows.
    let mut credit = header(OP_CREDIT_UPDATE, 501, 1234, 0);
    credit.fwd_cnt = 4096;
    drv.send(&credit, &[]);
    turn_until(&mut lp, || {
        data.extend(drv.received().into_iter().flat_map(|(_, d)| d));
        data.len() >= 8192
    });
    // The host hangs up: the guest hears a shutdown of both directions.
    drop(host);
    let mut credit = header(OP_CREDIT_UPDATE, 501, 1234, 0);
    credit.fwd_cnt = 8192;
    drv.send(&credit, &[]);
    let mut shut = None;
    turn_until(&mut lp, || {
        for (h, d) in drv.received() {
            data.extend(d);
            if h.op == OP_SHUTDOWN {
                shut = Some(h.flags);
            }
        }
        shut.is_some()
    });
    assert_eq!(data.len(), 10000);
    assert_eq!(shut, Some(SHUTDOWN_RCV | SHUTDOWN_SEND));
    // The guest completes the close; the device answers with a reset.
    let mut bye = header(OP_SHUTDOWN, 501, 1234, 0);
    bye.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    drv.send(&bye, &[]);
    turn_until(&mut lp, || {
        drv.received().iter().any(|(h, _)| h.op == OP_RST)
    });
    assert_eq!(dev.connection_count(), 0);
    assert!(!drv.signals.needs_reset());
}

#[test]
fn host_connect_line_reaches_the_guest_and_ok_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = device(dir.path());
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let mut drv = activate(&mut dev, &mem, &lp);
    drv.post_rx(4, 4096);
    let mut host = UnixStream::connect(dir.path().join("v.sock")).unwrap();
    host.write_all(b"CONNECT 77\nearly").unwrap();
    let req = next_request(&mut lp, &mut drv);
    assert_eq!(
        (req.dst_port, req.dst_cid, req.src_cid),
        (77, CID, HOST_CID)
    );
    let hostport = req.src_port;
    drv.send(&header(OP_RESPONSE, 77, hostport, 0), &[]);
    lp.turn();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut ok = vec![0u8; format!("OK {hostport}\n").len()];
    host.read_exact(&mut ok).unwrap();
    assert_eq!(String::from_utf8(ok).unwrap(), format!("OK {hostport}\n"));
    // The bytes written behind the CONNECT line are the connection's first data.
    let mut data = Vec::new();
    turn_until(&mut lp, || {
        data.extend(drv.received().into_iter().flat_map(|(_, d)| d));
        data.len() >= 5
    });
    assert_eq!(data, b"early");
}

#[test]
fn malformed_packets_are_dropped_or_reset_and_the_device_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = device(dir.path());
    let _listener = UnixListener::bind(dir.path().join("v.sock_5")).unwrap();
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let mut drv = activate(&mut dev, &mem, &lp);
    drv.post_rx(16, 4096);
    let mut wrong_cid = header(OP_REQUEST, 1, 5, 0);
    wrong_cid.src_cid = 99;
    drv.send(&wrong_cid, &[]);
    let mut to_guest = header(OP_REQUEST, 1, 5, 0);
    to_guest.dst_cid = CID;
    drv.send(&to_guest, &[]);
    // Length past the chain, past the largest packet, short header, writable descriptor,
    // a buffer running past the end of guest memory.
    drv.send(&header(OP_RW, 1, 5, 1000), b"short");
    drv.send(&header(OP_RW, 1, 5, u32::MAX), &[]);
    drv.send_raw(&[(TX_BUFS, 20, false)]);
    drv.send_raw(&[(TX_BUFS, 44, true)]);
    drv.send_raw(&[(RAM as u64 - 8, 44, false)]);
    // Answered with RST: unknown connection, unknown op, non-stream type.
    drv.send(&header(OP_RW, 2, 5, 3), b"abc");
    drv.send(&header(42, 3, 5, 0), &[]);
    let mut dgram = header(OP_REQUEST, 4, 5, 0);
    dgram.kind = 3;
    drv.send(&dgram, &[]);
    let mut resets = Vec::new();
    turn_until(&mut lp, || {
        resets.extend(drv.received().into_iter().map(|(h, _)| (h.op, h.dst_port)));
        resets.len() >= 3
    });
    resets.sort_unstable();
    assert_eq!(resets, vec![(OP_RST, 2), (OP_RST, 3), (OP_RST, 4)]);
    assert!(!drv.signals.needs_reset());
    assert_eq!(dev.counters().dropped, 7);
    // A good connection still works.
    drv.send(&header(OP_REQUEST, 10, 5, 0), &[]);
    turn_until(&mut lp, || {
        drv.received().iter().any(|(h, _)| h.op == OP_RESPONSE)
    });
}

#[test]
fn guest_data_past_its_credit_resets_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = device(dir.path());
    let listener = UnixListener::bind(dir.path().join("v.sock_6")).unwrap();
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let mut drv = activate(&mut dev, &mem, &lp);
    drv.post_rx(16, 4096);
    drv.send(&header(OP_REQUEST, 1, 6, 0), &[]);
    turn_until(&mut lp, || {
        drv.received().iter().any(|(h, _)| h.op == OP_RESPONSE)
    });
    let (_host, _) = listener.accept().unwrap(); // never reads
    let chunk = vec![1u8; 60000];
    let mut reset = false;
    for _ in 0..100 {
        drv.send(&header(OP_RW, 1, 6, chunk.len() as u32), &chunk);
        lp.turn();
        if drv.received().iter().any(|(h, _)| h.op == OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "a guest ignoring credit was never reset");
    assert_eq!(dev.connection_count(), 0);
}

#[test]
fn restored_device_announces_a_transport_reset() {
    let dir = tempfile::tempdir().unwrap();
    let saved = VsockState {
        cid: CID,
        socket: dir.path().join("v.sock"),
        next_host_port: FIRST_HOST_PORT + 3,
    };
    let mut dev = <VirtioVsock as crate::persist::Persist>::restore((), &saved).unwrap();
    assert_eq!(crate::persist::Persist::save(&dev), saved);
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let mut drv = activate(&mut dev, &mem, &lp);
    lp.turn();
    assert!(drv.take_used(2).is_empty(), "no event buffer yet");
    drv.event.add_chain(&[(EVENT_BUFS, 8, true)]);
    mem.write_obj(0xffff_ffffu32, GuestAddress(EVENT_BUFS))
        .unwrap();
    drv.kicks[2].write(1).unwrap();
    turn_until(&mut lp, || !drv.take_used(2).is_empty());
    let id: u32 = mem.read_obj(GuestAddress(EVENT_BUFS)).unwrap();
    assert_eq!(id, 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
    // Only once: a reset of the driver does not repeat it.
    dev.reset();
    let mut drv = activate(&mut dev, &mem, &lp);
    drv.event.add_chain(&[(EVENT_BUFS, 8, true)]);
    drv.kicks[2].write(1).unwrap();
    lp.turn();
    assert!(drv.take_used(2).is_empty());
}

#[test]
fn after_a_transport_reset_nothing_reaches_the_guest_until_it_returns_the_event_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let saved = VsockState {
        cid: CID,
        socket: dir.path().join("v.sock"),
        next_host_port: FIRST_HOST_PORT + 41,
    };
    let mut dev = <VirtioVsock as crate::persist::Persist>::restore((), &saved).unwrap();
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let mut drv = activate(&mut dev, &mem, &lp);
    drv.event.add_chain(&[(EVENT_BUFS, 8, true)]);
    drv.kicks[2].write(1).unwrap();
    turn_until(&mut lp, || !drv.take_used(2).is_empty());
    // A host program connects at once, before the driver has read the reset: its request
    // must wait, or the guest would accept it and then drop it with the old sockets.
    drv.post_rx(4, 4096);
    let mut host = UnixStream::connect(dir.path().join("v.sock")).unwrap();
    host.write_all(b"CONNECT 77\n").unwrap();
    for _ in 0..20 {
        lp.turn();
        lp.wait(5);
    }
    let early: Vec<u16> = drv.received().iter().map(|(h, _)| h.op).collect();
    assert!(
        early.is_empty(),
        "packets overtook the unread transport reset: ops {early:?}"
    );
    // The driver handles the event and hands the buffer back: the request follows.
    drv.event.add_chain(&[(EVENT_BUFS + 8, 8, true)]);
    drv.kicks[2].write(1).unwrap();
    let request = next_request(&mut lp, &mut drv);
    assert_eq!(request.dst_port, 77);
    // Host ports continue where the snapshot left them: none of the guest's old (reset)
    // connections can have these.
    assert_eq!(request.src_port, FIRST_HOST_PORT + 41);
    let next = <VirtioVsock as crate::persist::Persist>::save(&dev).next_host_port;
    assert_eq!(next, FIRST_HOST_PORT + 42);
}

#[test]
fn host_connect_the_guest_never_answers_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = device(dir.path());
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let mut drv = activate(&mut dev, &mem, &lp);
    drv.post_rx(4, 4096);
    let mut host = UnixStream::connect(dir.path().join("v.sock")).unwrap();
    host.write_all(b"CONNECT 77\n").unwrap();
    let port = next_request(&mut lp, &mut drv).src_port;
    // The guest stays silent: after the timeout it hears a reset and the host sees EOF.
    let started = std::time::Instant::now();
    let mut rst = false;
    while !rst && started.elapsed() < super::muxer::CONNECT_TIMEOUT * 3 {
        lp.wait(100);
        lp.turn();
        rst = drv
            .received()
            .iter()
            .any(|(h, _)| h.op == OP_RST && h.src_port == port);
    }
    assert!(rst, "no reset for the unanswered request");
    assert!(started.elapsed() >= super::muxer::CONNECT_TIMEOUT / 2);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(
        host.read(&mut buf).unwrap(),
        0,
        "the host stream was closed without OK"
    );
    assert_eq!(dev.connection_count(), 0);
}

#[test]
fn the_driver_kicks_the_receive_queue_only_when_the_device_ran_out_of_chains() {
    const NO_NOTIFY: u16 = 1;
    let dir = tempfile::tempdir().unwrap();
    let mut dev = device(dir.path());
    let mem = guest_memory(RAM);
    let mut lp = TestLoop::new();
    let mut drv = activate(&mut dev, &mem, &lp);
    let rx_flags = |mem: &TrackedGuestMemory| -> u16 {
        mem.read_obj(GuestAddress(RINGS[0] + USED_OFFSET)).unwrap()
    };
    lp.turn();
    // Nothing for the guest yet: refills need no kick.
    assert_eq!(rx_flags(&mem), NO_NOTIFY);
    // A refused request needs a receive chain and finds none: now the device wants the kick.
    drv.send(&header(OP_REQUEST, 500, 99, 0), &[]);
    turn_until(&mut lp, || rx_flags(&mem) == 0);
    assert!(drv.received().is_empty());
    drv.post_rx(4, 4096);
    let mut got = Vec::new();
    turn_until(&mut lp, || {
        got.extend(drv.received());
        !got.is_empty()
    });
    assert_eq!((got[0].0.op, got[0].0.dst_port), (OP_RST, 500));
    // Fed again: the driver's next refills go without a kick.
    assert_eq!(rx_flags(&mem), NO_NOTIFY);
}
