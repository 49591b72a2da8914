//! The connection table and the vsock stream protocol as the device speaks it: what each
//! packet from the guest does (connect, accept, data, credit, shutdown, reset), what goes back
//! to the guest (control packets first, then host data round-robin over the connections whose
//! streams are readable), and which host fds want watching for what.
//!
//! Everything from the guest is untrusted: packets with wrong CIDs are dropped, packets for
//! unknown connections or of unknown type or operation get `OP_RST`, and a guest that breaks
//! the protocol on a connection (data past its credit, data after its own shutdown, a second
//! `OP_REQUEST`) has that connection reset. Nothing here panics on guest input.
//!
//! Not here: descriptor chains (`packet`), epoll (`queue_handler`).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::connection::{ConnState, Connection, Flush};
use super::host::{connect_nonblocking, port_path, HandshakeStep, HostSide};
use super::packet::{
    Header, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::{CONN_BUFFER, FIRST_HOST_PORT, HOST_CID, MAX_CONNECTIONS};

/// A connection's ports: (host port, guest port).
pub type Key = (u32, u32);

/// Most control packets waiting for receive buffers; the transmit queue is not read beyond
/// it, so a guest that sends without ever reading cannot make skiff buffer replies.
pub const CONTROL_LIMIT: usize = 1024;

/// How long a host program's `CONNECT` waits for the guest's answer before skiff gives up
/// (resets the request and closes the host stream).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A packet without payload for the guest; credit fields are filled when it is sent.
#[derive(Debug, Clone, Copy)]
struct Control {
    key: Key,
    op: u16,
    flags: u32,
}

/// What the device has seen, for tests and diagnostics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VsockCounters {
    /// Packets from the guest dropped (wrong CIDs, malformed chains).
    pub dropped: u64,
    /// Resets sent to the guest.
    pub resets_sent: u64,
    /// Payload bytes guest to host and host to guest.
    pub bytes_to_host: u64,
    pub bytes_to_guest: u64,
}

/// Per-connection extras the muxer keeps next to `Connection`.
#[derive(Debug)]
struct Entry {
    conn: Connection,
    /// On the `readable` list.
    queued_readable: bool,
    /// A credit update is on the control list.
    update_queued: bool,
    /// The guest shut both directions: reset once `to_host` is flushed.
    closing: bool,
    /// The host stream hung up (both directions).
    host_hup: bool,
    /// When skiff sent the guest `OP_REQUEST` for a host `CONNECT` still unanswered.
    requested_at: Option<Instant>,
}

/// The connection table.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    host: HostSide,
    conns: HashMap<Key, Entry>,
    by_fd: HashMap<RawFd, Key>,
    control: VecDeque<Control>,
    readable: VecDeque<Key>,
    /// Connections whose wanted epoll interest may have changed.
    dirty: Vec<Key>,
    /// Streams of removed connections, to unregister before they close.
    closed: Vec<UnixStream>,
    next_host_port: u32,
    /// Connections with `requested_at` set.
    awaiting: usize,
    pub counters: VsockCounters,
}

impl Muxer {
    /// An empty table for guest `guest_cid`, host side on `host`.
    pub fn new(guest_cid: u64, host: HostSide) -> Self {
        Self {
            guest_cid,
            host,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            control: VecDeque::new(),
            readable: VecDeque::new(),
            dirty: Vec::new(),
            closed: Vec::new(),
            next_host_port: FIRST_HOST_PORT,
            awaiting: 0,
            counters: VsockCounters::default(),
        }
    }

    /// The host port the next host-initiated connection gets (or the first free one after it).
    pub fn next_host_port(&self) -> u32 {
        self.next_host_port
    }

    /// Continues host port numbering at `port` (a restored device: the guest may still hold
    /// reset connections with the ports handed out before the snapshot). Ports below the host
    /// range start it again.
    pub fn continue_host_ports(&mut self, port: u32) {
        self.next_host_port = port.max(FIRST_HOST_PORT);
    }

    /// The host side (listener and handshakes).
    pub fn host(&mut self) -> &mut HostSide {
        &mut self.host
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Closes every connection (driver reset, or a restored VM whose guest sockets are gone).
    /// Host programs see end of file; pending packets for the guest are dropped.
    pub fn clear(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        self.control.clear();
        self.readable.clear();
    }

    /// Whether control packets fill the backlog (stop reading the transmit queue).
    pub fn control_full(&self) -> bool {
        self.control.len() >= CONTROL_LIMIT
    }

    /// Whether anything waits to go to the guest.
    pub fn has_rx_work(&self) -> bool {
        !self.control.is_empty() || !self.readable.is_empty()
    }

    /// Takes the connections whose interest must be recomputed.
    pub fn take_dirty(&mut self) -> Vec<Key> {
        std::mem::take(&mut self.dirty)
    }

    /// Takes the streams of removed connections (unregister, then drop).
    pub fn take_closed(&mut self) -> Vec<UnixStream> {
        std::mem::take(&mut self.closed)
    }

    /// Every connection (to recompute all interests).
    pub fn keys(&self) -> Vec<Key> {
        self.conns.keys().copied().collect()
    }

    /// The connection on host fd `fd`.
    pub fn key_of(&self, fd: RawFd) -> Option<Key> {
        self.by_fd.get(&fd).copied()
    }

    /// The stream of `key` and the interest it wants: readable while the guest can take data
    /// (and has receive buffers: `rx_starved` false) and nobody has queued it already,
    /// writable while guest data waits for it. `None` when the connection is gone.
    pub fn interest(&self, key: Key, rx_starved: bool) -> Option<(&UnixStream, bool, bool)> {
        let e = self.conns.get(&key)?;
        let read = e.conn.wants_host_data() && !rx_starved && !e.queued_readable;
        let write = e.conn.has_pending_to_host();
        Some((&e.conn.stream, read, write))
    }

    fn push_control(&mut self, key: Key, op: u16, flags: u32) {
        if op == OP_RST {
            self.counters.resets_sent += 1;
        }
        self.control.push_back(Control { key, op, flags });
    }

    fn remove(&mut self, key: Key) {
        if let Some(e) = self.conns.remove(&key) {
            if e.requested_at.is_some() {
                self.awaiting -= 1;
            }
            self.by_fd.remove(&e.conn.stream.as_raw_fd());
            self.closed.push(e.conn.stream);
        }
    }

    /// Removes `key` and tells the guest.
    fn reset(&mut self, key: Key) {
        self.remove(key);
        self.push_control(key, OP_RST, 0);
    }

    fn insert(&mut self, key: Key, conn: Connection) {
        self.by_fd.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(
            key,
            Entry {
                conn,
                queued_readable: false,
                update_queued: false,
                closing: false,
                host_hup: false,
                requested_at: None,
            },
        );
        self.dirty.push(key);
    }

    fn queue_credit_update(&mut self, key: Key) {
        if let Some(e) = self.conns.get_mut(&key) {
            if !e.update_queued {
                e.update_queued = true;
                self.control.push_back(Control {
                    key,
                    op: OP_CREDIT_UPDATE,
                    flags: 0,
                });
            }
        }
    }

    /// After a flush or a write: reset on a broken host stream, finish a close, or tell the
    /// guest about credit it may be waiting for.
    fn after_flush(&mut self, key: Key, flush: Flush) {
        match flush {
            Flush::Broken(kind) => {
                log::debug!("vsock: host end of {key:?} failed ({kind:?}); resetting");
                self.reset(key);
            }
            Flush::Blocked => self.dirty.push(key),
            Flush::Done => {
                let Some(e) = self.conns.get(&key) else {
                    return;
                };
                if e.closing {
                    self.reset(key);
                    return;
                }
                if e.conn.credit_update_due() {
                    self.queue_credit_update(key);
                }
                self.dirty.push(key);
            }
        }
    }

    /// One packet from the guest, with its payload.
    pub fn guest_packet(&mut self, h: &Header, payload: &[u8]) {
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            self.counters.dropped += 1;
            log::debug!(
                "vsock: dropped a packet from CID {} to CID {} (guest is {})",
                h.src_cid,
                h.dst_cid,
                self.guest_cid
            );
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.kind != TYPE_STREAM {
            if h.op != OP_RST {
                self.push_control(key, OP_RST, 0);
            }
            return;
        }
        if h.op == OP_REQUEST {
            self.guest_connect(key, h);
            return;
        }
        if !self.conns.contains_key(&key) {
            if h.op != OP_RST {
                self.push_control(key, OP_RST, 0);
            }
            return;
        }
        if h.op == OP_RST {
            self.remove(key);
            return;
        }
        let Some(e) = self.conns.get_mut(&key) else {
            return;
        };
        e.conn.update_peer_credit(h.buf_alloc, h.fwd_cnt);
        self.dirty.push(key);
        match h.op {
            OP_RESPONSE => self.guest_accepted(key),
            OP_RW => {
                if e.conn.state != ConnState::Established || e.conn.guest_done_sending {
                    return self.reset(key);
                }
                match e.conn.take_guest_data(payload) {
                    Ok(flush) => {
                        self.counters.bytes_to_host += payload.len() as u64;
                        self.after_flush(key, flush);
                    }
                    Err(_) => {
                        log::debug!("vsock: guest sent past its credit on {key:?}; resetting");
                        self.reset(key);
                    }
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.queue_credit_update(key),
            OP_SHUTDOWN => {
                if h.flags & SHUTDOWN_RCV != 0 {
                    e.conn.guest_done_receiving = true;
                }
                if h.flags & SHUTDOWN_SEND != 0 {
                    e.conn.guest_done_sending = true;
                }
                if e.conn.guest_done_receiving && e.conn.guest_done_sending {
                    // Both directions closed: the spec's orderly close ends with our reset,
                    // after the guest's last bytes reached the host.
                    e.closing = true;
                }
                let flush = e.conn.flush();
                self.after_flush(key, flush);
            }
            _ => self.reset(key),
        }
    }

    /// `OP_REQUEST`: connect to `PATH_P`.
    fn guest_connect(&mut self, key: Key, h: &Header) {
        if self.conns.contains_key(&key) {
            // A second request on a live connection: the guest lost track; start over.
            return self.reset(key);
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            log::warn!(
                "vsock: {MAX_CONNECTIONS} connections open; refusing guest port {}",
                key.1
            );
            return self.push_control(key, OP_RST, 0);
        }
        let path = port_path(self.host.path(), key.0);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let conn = Connection::new(stream, ConnState::Established, h.buf_alloc, h.fwd_cnt);
                self.insert(key, conn);
                self.push_control(key, OP_RESPONSE, 0);
            }
            Err(e) => {
                log::debug!("vsock: guest connect to {}: {e}", path.display());
                self.push_control(key, OP_RST, 0);
            }
        }
    }

    /// `OP_RESPONSE` to our `OP_REQUEST`: tell the host program.
    fn guest_accepted(&mut self, key: Key) {
        let Some(e) = self.conns.get_mut(&key) else {
            return;
        };
        if e.conn.state != ConnState::AwaitingGuest {
            return self.reset(key);
        }
        e.conn.state = ConnState::Established;
        if e.requested_at.take().is_some() {
            self.awaiting -= 1;
        }
        let line = format!("OK {}\n", key.0);
        // A fresh stream's buffer takes a dozen bytes; anything short of that is a dead peer.
        match e.conn.stream.write(line.as_bytes()) {
            Ok(n) if n == line.len() => self.dirty.push(key),
            _ => self.reset(key),
        }
    }

    /// A host program finished `CONNECT port` on `stream`: ask the guest.
    fn host_connect(&mut self, guest_port: u32, stream: UnixStream) {
        if self.conns.len() >= MAX_CONNECTIONS {
            log::warn!("vsock: {MAX_CONNECTIONS} connections open; refusing CONNECT {guest_port}");
            return;
        }
        let mut host_port = self.next_host_port;
        while self.conns.contains_key(&(host_port, guest_port)) {
            host_port = host_port.wrapping_add(1).max(FIRST_HOST_PORT);
        }
        self.next_host_port = host_port.wrapping_add(1).max(FIRST_HOST_PORT);
        let key = (host_port, guest_port);
        // The guest's credit arrives with its response.
        self.insert(key, Connection::new(stream, ConnState::AwaitingGuest, 0, 0));
        if let Some(e) = self.conns.get_mut(&key) {
            e.requested_at = Some(Instant::now());
        }
        self.awaiting += 1;
        self.push_control(key, OP_REQUEST, 0);
    }

    /// Gives up on host `CONNECT`s the guest left unanswered for `CONNECT_TIMEOUT` (the guest
    /// hears `OP_RST`, the host program sees its stream close). Returns how long until the
    /// next one expires, if any waits.
    pub fn expire_requests(&mut self, now: Instant) -> Option<Duration> {
        if self.awaiting == 0 {
            return None;
        }
        let mut next: Option<Duration> = None;
        let mut expired = Vec::new();
        for (key, e) in &self.conns {
            let Some(at) = e.requested_at else { continue };
            let left = CONNECT_TIMEOUT.saturating_sub(now.saturating_duration_since(at));
            if left.is_zero() {
                expired.push(*key);
            } else {
                next = Some(next.map_or(left, |n| n.min(left)));
            }
        }
        for key in expired {
            log::debug!("vsock: the guest did not answer CONNECT {} in time", key.1);
            self.reset(key);
        }
        next
    }

    /// Handshake fd `fd` is readable. Returns true when the handshake is over (the caller
    /// stops watching `fd` as a handshake; a connection may now own it).
    pub fn handshake_ready(&mut self, fd: RawFd) -> bool {
        match self.host.advance(fd) {
            HandshakeStep::Wait => false,
            HandshakeStep::Closed => true,
            HandshakeStep::Connect(port, stream) => {
                self.host_connect(port, stream);
                true
            }
        }
    }

    /// The host stream of `key` is ready: `readable` (or hung up), `writable`.
    pub fn host_ready(&mut self, key: Key, readable: bool, writable: bool, hup: bool) {
        let Some(e) = self.conns.get_mut(&key) else {
            return;
        };
        if hup {
            e.host_hup = true;
        }
        if writable || (hup && e.conn.has_pending_to_host()) {
            let flush = e.conn.flush();
            self.after_flush(key, flush);
        }
        let Some(e) = self.conns.get_mut(&key) else {
            return;
        };
        if (readable || hup) && e.conn.wants_host_data() && !e.queued_readable {
            e.queued_readable = true;
            self.readable.push_back(key);
        }
        self.dirty.push(key);
    }

    fn header(&self, key: Key, op: u16, flags: u32, len: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUFFER,
            fwd_cnt,
        }
    }

    /// The next packet for the guest, with at most `buf.len()` payload bytes read into `buf`:
    /// control packets first, then host data. `None` when nothing is ready.
    pub fn next_for_guest(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        while let Some(c) = self.control.pop_front() {
            let fwd_cnt = match self.conns.get_mut(&c.key) {
                Some(e) => {
                    if c.op == OP_CREDIT_UPDATE {
                        e.update_queued = false;
                    }
                    e.conn.fwd_cnt_sent = e.conn.fwd_cnt;
                    e.conn.fwd_cnt
                }
                // A credit update for a connection gone since has nothing to say.
                None if c.op == OP_CREDIT_UPDATE => continue,
                None => 0,
            };
            return Some((self.header(c.key, c.op, c.flags, 0, fwd_cnt), 0));
        }
        if buf.is_empty() {
            // A receive chain with room for a header only: data waits for a bigger one.
            return None;
        }
        while let Some(key) = self.readable.pop_front() {
            let Some(e) = self.conns.get_mut(&key) else {
                continue;
            };
            e.queued_readable = false;
            if !e.conn.wants_host_data() {
                self.dirty.push(key);
                continue;
            }
            match e.conn.read_host(buf) {
                Ok(0) => {
                    // End of file: the host sends no more; it receives no more either if it
                    // hung up completely.
                    let flags = SHUTDOWN_SEND | if e.host_hup { SHUTDOWN_RCV } else { 0 };
                    let fwd_cnt = e.conn.fwd_cnt;
                    e.conn.fwd_cnt_sent = fwd_cnt;
                    self.dirty.push(key);
                    return Some((self.header(key, OP_SHUTDOWN, flags, 0, fwd_cnt), 0));
                }
                Ok(n) => {
                    let fwd_cnt = e.conn.fwd_cnt;
                    e.conn.fwd_cnt_sent = fwd_cnt;
                    if e.conn.wants_host_data() {
                        // More may be there: come back after the others (round-robin).
                        e.queued_readable = true;
                        self.readable.push_back(key);
                    } else {
                        self.dirty.push(key);
                    }
                    self.counters.bytes_to_guest += n as u64;
                    let len = n as u32;
                    return Some((self.header(key, OP_RW, 0, len, fwd_cnt), n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.dirty.push(key),
                Err(e) => {
                    log::debug!("vsock: reading the host end of {key:?}: {e}");
                    self.reset(key);
                    if let Some(c) = self.control.pop_back() {
                        return Some((self.header(c.key, c.op, c.flags, 0, 0), 0));
                    }
                }
            }
        }
        None
    }

    /// The packet `next_for_guest` just returned could not be written to the guest (its
    /// chain was outside guest memory): a control packet goes back to the front; lost data
    /// breaks the stream, so its connection is reset.
    pub fn undeliverable(&mut self, h: &Header) {
        let key = (h.src_port, h.dst_port);
        if h.op == OP_RW {
            self.reset(key);
        } else {
            self.control.push_front(Control {
                key,
                op: h.op,
                flags: h.flags,
            });
        }
    }
}
