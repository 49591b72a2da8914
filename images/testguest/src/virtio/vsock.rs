//! virtio-vsock (device type 19): a small polled stream-socket driver for the scenarios in
//! `vsock_cases` and for the guest-agent scenarios.
//!
//! API: `Vsock::open`, then `connect(port)` to a host port, or `listen(port)` + `accept(port)`
//! for host-initiated connections; `send` (waits for the peer's credit), `recv` (Ok(0) once
//! the peer shut down sending), `shutdown(flags)`, `close`. `poll` does all the device work
//! (the other calls poll while they wait) and is what a server loop calls.
//!
//! Everything runs in CPL3 without interrupts: receive buffers (`RX_BUFS` x `RX_BUF_LEN`,
//! header and payload in one buffer) are reposted as they are consumed; each connection has a
//! `CONN_BUF`-byte receive ring, which is the credit (`buf_alloc`) it advertises; transmit
//! packets go out of `TX_SLOTS` slots. A transport reset event marks every connection reset.
//! Receive refills are kicked only while the device asks for it (it sets `NO_NOTIFY` while it
//! has chains), and with `set_batched_kicks` consecutive packets share one transmit kick.
use crate::bootinfo::BootInfo;
use crate::mmio::Region;
use crate::scenario::fail;
use crate::tsc::Deadline;
use crate::virtio::queue::{Buf, Queue};
use crate::virtio::{dma, Device, F_VERSION_1};

const DEVICE_TYPE: u16 = 19;
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const EVENT_QUEUE: u16 = 2;
const QUEUE_MAX: u16 = 64;
const EVENT_BUFS: usize = 4;

pub const HOST_CID: u64 = 2;
pub const HDR_LEN: u64 = 44;
const RX_BUFS: usize = 32;
const RX_BUF_LEN: u64 = 4096;
const TX_SLOTS: usize = 16;
const TX_SLOT_LEN: u64 = 4096;
/// Largest payload of one packet this driver sends.
pub const MAX_TX_PAYLOAD: u64 = TX_SLOT_LEN - HDR_LEN;
/// Receive ring per connection: the credit it gives the peer.
pub const CONN_BUF: u32 = 8192;
/// Most connections at once.
pub const MAX_CONNS: usize = 80;
const MAX_LISTENERS: usize = 8;
/// First local port of guest-initiated connections.
const FIRST_LOCAL_PORT: u32 = 49152;

pub const TYPE_STREAM: u16 = 1;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
const EVENT_TRANSPORT_RESET: u32 = 0;

/// Why a call did not succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The peer reset the connection (or refused it, or a transport reset dropped it).
    Reset,
    /// The deadline passed.
    Timeout,
    /// No free connection slot.
    Full,
}

/// A connection handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conn(usize);

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Connecting,
    Established,
    Reset,
}

#[derive(Clone, Copy)]
struct Slot {
    state: State,
    local_port: u32,
    peer_port: u32,
    /// Accepted by `accept` (host-initiated) or made by `connect`.
    owned: bool,
    ring: Option<Region>,
    /// Bytes written into / read from the ring (wrapping counters).
    ring_in: u32,
    ring_out: u32,
    fwd_sent: u32,
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// SHUTDOWN flags the peer sent.
    peer_shut: u32,
}

const FREE: Slot = Slot {
    state: State::Free,
    local_port: 0,
    peer_port: 0,
    owned: false,
    ring: None,
    ring_in: 0,
    ring_out: 0,
    fwd_sent: 0,
    tx_cnt: 0,
    peer_buf_alloc: 0,
    peer_fwd_cnt: 0,
    peer_shut: 0,
};

/// One packet header (`struct virtio_vsock_hdr`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    fn read(r: &Region) -> Header {
        Header {
            src_cid: r.read::<u64>(0),
            dst_cid: r.read::<u64>(8),
            src_port: r.read::<u32>(16),
            dst_port: r.read::<u32>(20),
            len: r.read::<u32>(24),
            kind: r.read::<u16>(28),
            op: r.read::<u16>(30),
            flags: r.read::<u32>(32),
            buf_alloc: r.read::<u32>(36),
            fwd_cnt: r.read::<u32>(40),
        }
    }

    pub fn write(&self, r: &Region) {
        r.write::<u64>(0, self.src_cid);
        r.write::<u64>(8, self.dst_cid);
        r.write::<u32>(16, self.src_port);
        r.write::<u32>(20, self.dst_port);
        r.write::<u32>(24, self.len);
        r.write::<u16>(28, self.kind);
        r.write::<u16>(30, self.op);
        r.write::<u32>(32, self.flags);
        r.write::<u32>(36, self.buf_alloc);
        r.write::<u32>(40, self.fwd_cnt);
    }
}

/// The device, its queues and the connection table.
pub struct Vsock {
    dev: Device,
    rx: Queue,
    tx: Queue,
    ev: Queue,
    cid: u64,
    rx_mem: Region,
    rx_buf_of: [u8; QUEUE_MAX as usize],
    tx_mem: Region,
    tx_busy: [bool; TX_SLOTS],
    tx_slot_of: [u8; QUEUE_MAX as usize],
    ev_mem: Region,
    ev_buf_of: [u8; QUEUE_MAX as usize],
    conns: [Slot; MAX_CONNS],
    listeners: [u32; MAX_LISTENERS],
    next_port: u32,
    /// Transport-reset events seen.
    pub transport_resets: u32,
    /// Resets received for no connection of ours (answers to abuse).
    pub stray_resets: u32,
    /// Packets received that made no sense (peer sent past our credit, unknown op).
    pub bad_packets: u32,
    /// Transmit kicks wait until the driver is about to wait (`set_batched_kicks`).
    batch_kicks: bool,
    /// Packets were queued since the last transmit kick.
    tx_unkicked: bool,
}

impl Vsock {
    /// Opens the device (with `Device::open`, a fresh DMA arena), posts receive and event
    /// buffers and starts it.
    pub fn open(info: &BootInfo) -> Vsock {
        let dev = Device::open(info, DEVICE_TYPE, "virtio-vsock", F_VERSION_1);
        let rx = dev.setup_queue(RX_QUEUE, QUEUE_MAX);
        let tx = dev.setup_queue(TX_QUEUE, QUEUE_MAX);
        let ev = dev.setup_queue(EVENT_QUEUE, QUEUE_MAX);
        let cid = dev.cfg_u64(0);
        let mut v = Vsock {
            dev,
            rx,
            tx,
            ev,
            cid,
            rx_mem: dma::alloc(RX_BUF_LEN * RX_BUFS as u64),
            rx_buf_of: [0; QUEUE_MAX as usize],
            tx_mem: dma::alloc(TX_SLOT_LEN * TX_SLOTS as u64),
            tx_busy: [false; TX_SLOTS],
            tx_slot_of: [0; QUEUE_MAX as usize],
            ev_mem: dma::alloc(8 * EVENT_BUFS as u64),
            ev_buf_of: [0; QUEUE_MAX as usize],
            conns: [FREE; MAX_CONNS],
            listeners: [0; MAX_LISTENERS],
            next_port: FIRST_LOCAL_PORT,
            transport_resets: 0,
            stray_resets: 0,
            bad_packets: 0,
            batch_kicks: false,
            tx_unkicked: false,
        };
        for i in 0..RX_BUFS {
            v.post_rx(i);
        }
        for i in 0..EVENT_BUFS {
            v.post_event(i);
        }
        v.dev.driver_ok();
        v.rx.kick();
        v.ev.kick();
        v
    }

    /// With `on`, packets queued one after another share one transmit kick (one VM exit and one
    /// device wake-up), given when the driver next waits for anything (the peer's data, credit,
    /// a free slot, a connection) or `flush` is called. For a request/reply loop such as the
    /// agent's: its replies to a batch of requests leave together. Off by default: the scenarios
    /// that test the device see each packet kicked as it is queued.
    pub fn set_batched_kicks(&mut self, on: bool) {
        self.batch_kicks = on;
        if !on {
            self.flush();
        }
    }

    /// Kicks the transmit queue if packets wait for a kick.
    pub fn flush(&mut self) {
        if self.tx_unkicked {
            self.tx_unkicked = false;
            self.tx.kick();
        }
    }

    /// The guest's CID as the device reports it.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// Whether the device gave up (DEVICE_NEEDS_RESET).
    pub fn needs_reset(&self) -> bool {
        self.dev.needs_reset()
    }

    fn rx_buf(&self, i: usize) -> Region {
        self.rx_mem
            .sub(i as u64 * RX_BUF_LEN, RX_BUF_LEN)
            .expect("rx buffer")
    }

    fn post_rx(&mut self, i: usize) {
        let head = self
            .rx
            .add(&[Buf::of(&self.rx_buf(i), true)])
            .expect("rx queue has room");
        self.rx_buf_of[usize::from(head)] = i as u8;
    }

    fn post_event(&mut self, i: usize) {
        let buf = self.ev_mem.sub(i as u64 * 8, 8).expect("event buffer");
        let head = self
            .ev
            .add(&[Buf::of(&buf, true)])
            .expect("event queue has room");
        self.ev_buf_of[usize::from(head)] = i as u8;
    }

    /// Frees transmit slots the device is done with.
    fn reclaim_tx(&mut self) {
        while let Some((head, _)) = self.tx.pop_used() {
            self.tx_busy[usize::from(self.tx_slot_of[usize::from(head)])] = false;
        }
    }

    /// A free transmit slot, waiting up to 5 s for one.
    fn tx_slot(&mut self) -> usize {
        let deadline = Deadline::after_ms(5000);
        loop {
            self.reclaim_tx();
            if let Some(i) = self.tx_busy.iter().position(|b| !b) {
                return i;
            }
            if deadline.passed() {
                self.dev.fail_timeout("a free vsock transmit slot");
            }
            self.flush();
            core::hint::spin_loop();
        }
    }

    /// Sends raw bytes as one device-readable buffer, followed by `extra` descriptors (for
    /// malformed packets).
    pub fn send_raw(&mut self, bytes: &[u8], extra: &[Buf]) {
        let i = self.tx_slot();
        let slot = self
            .tx_mem
            .sub(i as u64 * TX_SLOT_LEN, TX_SLOT_LEN)
            .expect("tx slot");
        let n = (bytes.len() as u64).min(TX_SLOT_LEN);
        for (k, &b) in bytes.iter().take(n as usize).enumerate() {
            slot.write::<u8>(k as u64, b);
        }
        let mut bufs = [Buf {
            addr: 0,
            len: 0,
            device_writes: false,
        }; 4];
        bufs[0] = Buf {
            addr: slot.base(),
            len: n.max(1) as u32,
            device_writes: false,
        };
        let count = 1 + extra.len().min(3);
        bufs[1..count].copy_from_slice(&extra[..count - 1]);
        self.send_chain(i, &bufs[..count]);
    }

    fn send_chain(&mut self, slot: usize, bufs: &[Buf]) {
        let head = self.tx.add(bufs).unwrap_or_else(|| {
            self.reclaim_tx();
            self.tx.add(bufs).expect("tx queue has room")
        });
        self.tx_busy[slot] = true;
        self.tx_slot_of[usize::from(head)] = slot as u8;
        if self.batch_kicks {
            self.tx_unkicked = true;
        } else {
            self.tx.kick();
        }
    }

    /// Sends a packet on connection slot `c` (or for ports with no slot when `c` is None).
    fn send_pkt(
        &mut self,
        ports: (u32, u32),
        op: u16,
        flags: u32,
        payload: &[u8],
        fwd: (u32, u32),
    ) {
        let i = self.tx_slot();
        let slot = self
            .tx_mem
            .sub(i as u64 * TX_SLOT_LEN, TX_SLOT_LEN)
            .expect("tx slot");
        let h = Header {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: ports.0,
            dst_port: ports.1,
            len: payload.len() as u32,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: fwd.0,
            fwd_cnt: fwd.1,
        };
        h.write(&slot);
        for (k, &b) in payload.iter().enumerate() {
            slot.write::<u8>(HDR_LEN + k as u64, b);
        }
        let len = HDR_LEN + payload.len() as u64;
        self.send_chain(
            i,
            &[Buf {
                addr: slot.base(),
                len: len as u32,
                device_writes: false,
            }],
        );
    }

    fn send_on(&mut self, c: usize, op: u16, flags: u32, payload: &[u8]) {
        let s = self.conns[c];
        self.conns[c].fwd_sent = s.ring_out;
        self.send_pkt(
            (s.local_port, s.peer_port),
            op,
            flags,
            payload,
            (CONN_BUF, s.ring_out),
        );
    }

    /// The live connection with these ports. A reset connection is closed: it takes no more
    /// packets, and a new connection may reuse its ports (skiff's device continues host ports
    /// across a snapshot, but a device that numbers them from the start again after a restore
    /// would give the host's first connection the ports of one the guest still holds, reset,
    /// until its owner lets go).
    fn find(&self, local: u32, peer: u32) -> Option<usize> {
        self.conns.iter().position(|s| {
            !matches!(s.state, State::Free | State::Reset)
                && s.local_port == local
                && s.peer_port == peer
        })
    }

    fn new_slot(&mut self, local: u32, peer: u32, state: State) -> Option<usize> {
        let c = self.conns.iter().position(|s| s.state == State::Free)?;
        let ring = match self.conns[c].ring {
            Some(r) => r,
            None => dma::alloc(u64::from(CONN_BUF)),
        };
        self.conns[c] = Slot {
            state,
            local_port: local,
            peer_port: peer,
            ring: Some(ring),
            ..FREE
        };
        Some(c)
    }

    /// Handles everything the device has returned: received packets, transmit completions,
    /// events.
    pub fn poll(&mut self) {
        // Events first: a transport reset drops the connections made before it, not the ones
        // packets received after it make. Returning the buffer (the kick) tells the device the
        // reset was seen.
        let mut events = false;
        while let Some((head, len)) = self.ev.pop_used() {
            let i = usize::from(self.ev_buf_of[usize::from(head)]);
            let id = self.ev_mem.read::<u32>(i as u64 * 8);
            if len >= 4 && id == EVENT_TRANSPORT_RESET {
                self.transport_resets += 1;
                self.cid = self.dev.cfg_u64(0);
                for s in self.conns.iter_mut().filter(|s| s.state != State::Free) {
                    s.state = State::Reset;
                }
            }
            self.post_event(i);
            events = true;
        }
        if events {
            self.ev.kick();
        }
        let mut reposted = false;
        while let Some((head, len)) = self.rx.pop_used() {
            let i = usize::from(self.rx_buf_of[usize::from(head)]);
            let buf = self.rx_buf(i);
            if u64::from(len) >= HDR_LEN {
                let h = Header::read(&buf);
                self.handle(&h, &buf, u64::from(len) - HDR_LEN);
            } else {
                self.bad_packets += 1;
            }
            self.post_rx(i);
            reposted = true;
        }
        if reposted {
            self.rx.kick();
        }
        self.reclaim_tx();
    }

    fn handle(&mut self, h: &Header, buf: &Region, room: u64) {
        let Some(c) = self.find(h.dst_port, h.src_port) else {
            match h.op {
                OP_REQUEST if self.listeners.contains(&h.dst_port) && h.dst_port != 0 => {
                    match self.new_slot(h.dst_port, h.src_port, State::Established) {
                        Some(c) => {
                            self.conns[c].peer_buf_alloc = h.buf_alloc;
                            self.conns[c].peer_fwd_cnt = h.fwd_cnt;
                            self.send_on(c, OP_RESPONSE, 0, &[]);
                        }
                        None => self.send_pkt((h.dst_port, h.src_port), OP_RST, 0, &[], (0, 0)),
                    }
                }
                OP_RST => self.stray_resets += 1,
                _ => self.send_pkt((h.dst_port, h.src_port), OP_RST, 0, &[], (0, 0)),
            }
            return;
        };
        let s = &mut self.conns[c];
        s.peer_buf_alloc = h.buf_alloc;
        s.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RESPONSE if s.state == State::Connecting => s.state = State::Established,
            OP_RST => s.state = State::Reset,
            OP_SHUTDOWN => s.peer_shut |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND),
            OP_RW => {
                let len = u64::from(h.len).min(room);
                let used = s.ring_in.wrapping_sub(s.ring_out);
                if len > u64::from(CONN_BUF - used) || s.state != State::Established {
                    self.bad_packets += 1;
                    return;
                }
                let Some(ring) = s.ring else { return };
                let mut at = s.ring_in;
                for k in 0..len {
                    let b = buf.read::<u8>(HDR_LEN + k);
                    ring.write::<u8>(u64::from(at % CONN_BUF), b);
                    at = at.wrapping_add(1);
                }
                s.ring_in = at;
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.send_on(c, OP_CREDIT_UPDATE, 0, &[]),
            _ => self.bad_packets += 1,
        }
    }

    /// Accepts host connections to `port` from now on.
    pub fn listen(&mut self, port: u32) {
        if let Some(l) = self.listeners.iter_mut().find(|l| **l == 0 || **l == port) {
            *l = port;
        }
    }

    /// Waits for a host connection to `port` that no `accept` returned yet.
    pub fn accept(&mut self, port: u32, deadline: Deadline) -> Result<Conn, Error> {
        loop {
            self.flush();
            self.poll();
            if let Some(c) = self
                .conns
                .iter()
                .position(|s| s.state == State::Established && !s.owned && s.local_port == port)
            {
                self.conns[c].owned = true;
                return Ok(Conn(c));
            }
            if deadline.passed() {
                return Err(Error::Timeout);
            }
        }
    }

    /// Connects to host port `port`.
    pub fn connect(&mut self, port: u32, deadline: Deadline) -> Result<Conn, Error> {
        let local = self.next_port;
        self.next_port = self.next_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
        let c = self
            .new_slot(local, port, State::Connecting)
            .ok_or(Error::Full)?;
        self.conns[c].owned = true;
        self.send_on(c, OP_REQUEST, 0, &[]);
        loop {
            self.flush();
            self.poll();
            match self.conns[c].state {
                State::Established => return Ok(Conn(c)),
                State::Reset => {
                    self.conns[c].state = State::Free;
                    return Err(Error::Reset);
                }
                _ => {}
            }
            if deadline.passed() {
                self.conns[c].state = State::Free;
                return Err(Error::Timeout);
            }
        }
    }

    /// Bytes the peer can take now.
    fn credit(&self, c: usize) -> u32 {
        let s = &self.conns[c];
        s.peer_buf_alloc
            .saturating_sub(s.tx_cnt.wrapping_sub(s.peer_fwd_cnt))
    }

    /// Whether the peer reset the connection.
    pub fn is_reset(&self, c: Conn) -> bool {
        self.conns[c.0].state == State::Reset
    }

    /// SHUTDOWN flags the peer sent so far.
    pub fn peer_shutdown(&self, c: Conn) -> u32 {
        self.conns[c.0].peer_shut
    }

    /// The connection's (local, peer) ports.
    pub fn ports(&self, c: Conn) -> (u32, u32) {
        (self.conns[c.0].local_port, self.conns[c.0].peer_port)
    }

    /// Sends what the peer's credit allows now (at most one packet); returns the bytes sent.
    pub fn try_send(&mut self, c: Conn, data: &[u8]) -> Result<usize, Error> {
        self.poll();
        if self.conns[c.0].state != State::Established
            || self.conns[c.0].peer_shut & SHUTDOWN_RCV != 0
        {
            return Err(Error::Reset);
        }
        let n = (self.credit(c.0) as usize)
            .min(data.len())
            .min(MAX_TX_PAYLOAD as usize);
        if n > 0 {
            self.send_on(c.0, OP_RW, 0, &data[..n]);
            let s = &mut self.conns[c.0];
            s.tx_cnt = s.tx_cnt.wrapping_add(n as u32);
        }
        Ok(n)
    }

    /// Sends all of `data`, waiting for credit until `deadline`.
    pub fn send(&mut self, c: Conn, data: &[u8], deadline: Deadline) -> Result<(), Error> {
        let mut off = 0;
        while off < data.len() {
            off += self.try_send(c, &data[off..])?;
            if off < data.len() {
                // Waiting for credit: what is queued must reach the peer first.
                self.flush();
                if deadline.passed() {
                    return Err(Error::Timeout);
                }
            }
        }
        Ok(())
    }

    /// Bytes `try_send` could send now (the peer's credit).
    pub fn send_room(&mut self, c: Conn) -> usize {
        self.credit(c.0) as usize
    }

    /// Bytes waiting in the receive ring.
    pub fn available(&self, c: Conn) -> usize {
        let s = &self.conns[c.0];
        s.ring_in.wrapping_sub(s.ring_out) as usize
    }

    /// Takes received bytes without waiting: `Ok(n)` (n may be 0 while data is still to come),
    /// `Err(Reset)` when the connection is gone with nothing left to read.
    pub fn try_recv(&mut self, c: Conn, out: &mut [u8]) -> Result<usize, Error> {
        self.poll();
        let s = self.conns[c.0];
        let avail = s.ring_in.wrapping_sub(s.ring_out) as usize;
        if avail == 0 && s.state == State::Reset {
            return Err(Error::Reset);
        }
        let n = avail.min(out.len());
        let Some(ring) = s.ring else { return Ok(0) };
        let mut at = s.ring_out;
        for b in out.iter_mut().take(n) {
            *b = ring.read::<u8>(u64::from(at % CONN_BUF));
            at = at.wrapping_add(1);
        }
        self.conns[c.0].ring_out = at;
        // Tell the peer about the room once half the ring is free again.
        if at.wrapping_sub(self.conns[c.0].fwd_sent) >= CONN_BUF / 2
            && self.conns[c.0].state == State::Established
        {
            self.send_on(c.0, OP_CREDIT_UPDATE, 0, &[]);
        }
        Ok(n)
    }

    /// Waits for received bytes: `Ok(n > 0)`, or `Ok(0)` once the peer shut down sending and
    /// everything was read.
    pub fn recv(&mut self, c: Conn, out: &mut [u8], deadline: Deadline) -> Result<usize, Error> {
        loop {
            let n = self.try_recv(c, out)?;
            if n > 0 || out.is_empty() {
                return Ok(n);
            }
            if self.conns[c.0].peer_shut & SHUTDOWN_SEND != 0 {
                return Ok(0);
            }
            self.flush();
            if deadline.passed() {
                return Err(Error::Timeout);
            }
        }
    }

    /// Sends SHUTDOWN with `flags` (`SHUTDOWN_SEND`, `SHUTDOWN_RCV` or both).
    pub fn shutdown(&mut self, c: Conn, flags: u32) {
        if self.conns[c.0].state == State::Established {
            self.send_on(c.0, OP_SHUTDOWN, flags, &[]);
        }
    }

    /// Shuts both directions, waits (until `deadline`) for the peer's reset that completes a
    /// close, and frees the slot. Returns whether the reset came.
    pub fn close(&mut self, c: Conn, deadline: Deadline) -> bool {
        self.shutdown(c, SHUTDOWN_RCV | SHUTDOWN_SEND);
        let mut reset = false;
        loop {
            self.flush();
            self.poll();
            if self.conns[c.0].state == State::Reset {
                reset = true;
                break;
            }
            if deadline.passed() {
                // Like Linux after its close timeout: reset it ourselves.
                self.send_on(c.0, OP_RST, 0, &[]);
                self.flush();
                break;
            }
        }
        self.conns[c.0].state = State::Free;
        reset
    }

    /// Fails the scenario with `what` and the device status.
    pub fn fail_timeout(&self, what: &str) -> ! {
        self.dev.fail_timeout(what)
    }
}

/// Fails the scenario with `what` and the error.
pub fn fail_err(what: &str, e: Error) -> ! {
    fail(|w| {
        w.str(what).str(": ").str(match e {
            Error::Reset => "connection reset",
            Error::Timeout => "timed out",
            Error::Full => "no free connection slot",
        });
    })
}
