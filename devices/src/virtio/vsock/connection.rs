//! One vsock stream connection: the host Unix stream, the guest-to-host bytes the host has not
//! taken yet, and both directions' credit (virtio 1.2 section 5.10.6.3).
//!
//! Guest to host: skiff advertises `buf_alloc = CONN_BUFFER` and `fwd_cnt` (bytes written to
//! the host stream). A well-behaved guest never has more than `buf_alloc` bytes in flight, so
//! `to_host` never holds more than that; a guest that sends past its credit is reset.
//! Host to guest: skiff reads the host stream only while the guest's advertised buffer has
//! room (`peer_free`), so nothing is buffered on that side at all.
//!
//! Not here: the packets themselves (`muxer`), and epoll registration (`queue_handler`).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use super::CONN_BUFFER;

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// A host program asked for it (`CONNECT P`); skiff sent `OP_REQUEST` and waits for the
    /// guest's `OP_RESPONSE`.
    AwaitingGuest,
    /// Data flows.
    Established,
}

/// What draining `to_host` into the host stream did.
#[derive(Debug, PartialEq, Eq)]
pub enum Flush {
    /// Everything buffered went out.
    Done,
    /// The host stream is full; the rest waits for it to become writable.
    Blocked,
    /// The host end is gone (or the write failed): the connection must be reset.
    Broken(io::ErrorKind),
}

/// The guest sent more than the credit it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditExceeded;

/// One connection.
#[derive(Debug)]
pub struct Connection {
    /// The host end.
    pub stream: UnixStream,
    pub state: ConnState,
    /// Guest bytes the host stream has not taken yet (at most `CONN_BUFFER`).
    to_host: VecDeque<u8>,
    /// Bytes received from the guest (wrapping).
    rx_cnt: u32,
    /// Bytes written to the host stream (wrapping): our `fwd_cnt`.
    pub fwd_cnt: u32,
    /// The `fwd_cnt` the guest last saw from us.
    pub fwd_cnt_sent: u32,
    /// Bytes sent to the guest (wrapping).
    tx_cnt: u32,
    /// The guest's advertised receive buffer and how much of it its reader consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// The guest will send no more (`SHUTDOWN_SEND`); the host stream's write side is shut
    /// once `to_host` is empty.
    pub guest_done_sending: bool,
    /// The guest will receive no more (`SHUTDOWN_RCV`): the host stream is not read.
    pub guest_done_receiving: bool,
    /// The host stream's write side was shut.
    host_write_shut: bool,
    /// The host stream reached end of file.
    pub host_eof: bool,
}

impl Connection {
    /// A connection on `stream` in `state`, with the guest's credit from its first packet.
    pub fn new(
        stream: UnixStream,
        state: ConnState,
        peer_buf_alloc: u32,
        peer_fwd_cnt: u32,
    ) -> Self {
        Self {
            stream,
            state,
            to_host: VecDeque::new(),
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            tx_cnt: 0,
            peer_buf_alloc,
            peer_fwd_cnt,
            guest_done_sending: false,
            guest_done_receiving: false,
            host_write_shut: false,
            host_eof: false,
        }
    }

    /// Takes the guest's credit fields from any packet it sent on this connection.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// Bytes the guest can take now. A guest claiming to have consumed more than it was sent
    /// gets nothing until its numbers make sense again.
    pub fn peer_free(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest bytes in our buffer from the guest's point of view (received, not yet reported as
    /// forwarded).
    fn guest_view_used(&self) -> u32 {
        self.rx_cnt.wrapping_sub(self.fwd_cnt_sent)
    }

    /// Whether the guest should hear our new `fwd_cnt`: it has used half its credit or more
    /// and we forwarded bytes since it last heard.
    pub fn credit_update_due(&self) -> bool {
        self.fwd_cnt != self.fwd_cnt_sent && self.guest_view_used() >= CONN_BUFFER / 2
    }

    /// Whether guest data waits for the host stream.
    pub fn has_pending_to_host(&self) -> bool {
        !self.to_host.is_empty()
    }

    /// Takes `data` from the guest: writes what the host stream accepts now and buffers the
    /// rest. `Err` when the guest exceeded the credit we gave it.
    pub fn take_guest_data(&mut self, data: &[u8]) -> Result<Flush, CreditExceeded> {
        let len = u32::try_from(data.len()).map_err(|_| CreditExceeded)?;
        let outstanding = self.rx_cnt.wrapping_sub(self.fwd_cnt);
        if u64::from(outstanding) + u64::from(len) > u64::from(CONN_BUFFER) {
            return Err(CreditExceeded);
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(len);
        if !self.to_host.is_empty() {
            self.to_host.extend(data);
            return Ok(Flush::Blocked);
        }
        let mut written = 0;
        while written < data.len() {
            match self.stream.write(&data[written..]) {
                Ok(0) => return Ok(Flush::Broken(io::ErrorKind::WriteZero)),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Ok(Flush::Broken(e.kind())),
            }
        }
        self.fwd_cnt = self.fwd_cnt.wrapping_add(written as u32);
        if written < data.len() {
            self.to_host.extend(&data[written..]);
            return Ok(Flush::Blocked);
        }
        Ok(self.finish_if_done())
    }

    /// Writes buffered guest data to the host stream until it is empty or the stream is full.
    pub fn flush(&mut self) -> Flush {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Flush::Broken(io::ErrorKind::WriteZero),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flush::Blocked,
                Err(e) => return Flush::Broken(e.kind()),
            }
        }
        self.finish_if_done()
    }

    /// With everything written: shuts the host stream's write side once the guest said it
    /// sends no more.
    fn finish_if_done(&mut self) -> Flush {
        if self.guest_done_sending && !self.host_write_shut && self.to_host.is_empty() {
            self.host_write_shut = true;
            // The host may already have closed its end; a reset follows from its side then.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Flush::Done
    }

    /// Whether the host stream should be read now: established, the guest still receives and
    /// has room, and the host has not ended.
    pub fn wants_host_data(&self) -> bool {
        self.state == ConnState::Established
            && !self.guest_done_receiving
            && !self.host_eof
            && self.peer_free() > 0
    }

    /// Reads at most `buf.len()` (capped to the guest's free credit) bytes from the host.
    /// `Ok(0)` is end of file (also recorded in `host_eof`); `WouldBlock` means nothing now.
    pub fn read_host(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = (self.peer_free() as usize).min(buf.len());
        if room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        loop {
            match self.stream.read(&mut buf[..room]) {
                Ok(0) => {
                    self.host_eof = true;
                    return Ok(0);
                }
                Ok(n) => {
                    self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::new(a, ConnState::Established, 4096, 0), b)
    }

    #[test]
    fn guest_credit_bounds_reads() {
        let (mut c, mut host) = pair();
        host.write_all(&[7u8; 10000]).unwrap();
        let mut buf = vec![0u8; 65536];
        assert_eq!(c.read_host(&mut buf).unwrap(), 4096);
        assert_eq!(c.peer_free(), 0);
        assert!(!c.wants_host_data());
        assert_eq!(
            c.read_host(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        c.update_peer_credit(4096, 1000);
        assert_eq!(c.peer_free(), 1000);
        assert_eq!(c.read_host(&mut buf).unwrap(), 1000);
        // A guest claiming more consumed than sent gets nothing.
        c.update_peer_credit(4096, 9000);
        assert_eq!(c.peer_free(), 0);
    }

    #[test]
    fn guest_data_beyond_credit_is_refused() {
        let (mut c, _host) = pair();
        assert_eq!(
            c.take_guest_data(&vec![1u8; CONN_BUFFER as usize]),
            Ok(Flush::Done)
        );
        // The host took it all (the socket buffer is large enough): credit is back.
        assert!(c.credit_update_due());
        c.fwd_cnt_sent = c.fwd_cnt;
        assert!(!c.credit_update_due());
    }

    #[test]
    fn buffered_data_waits_for_a_slow_host_and_stays_bounded() {
        let (mut c, mut host) = pair();
        let chunk = vec![5u8; 4096];
        let mut sent = 0usize;
        while c.take_guest_data(&chunk).is_ok() {
            sent += chunk.len();
            assert!(sent <= 64 << 20, "never refused");
        }
        assert!(c.has_pending_to_host());
        assert!(c.to_host.len() <= CONN_BUFFER as usize);
        // The host reads everything; the buffer drains and the guest's credit returns.
        let mut got = vec![0u8; sent];
        let reader = std::thread::spawn(move || {
            host.read_exact(&mut got).unwrap();
            got
        });
        while c.flush() == Flush::Blocked {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let got = reader.join().unwrap();
        assert!(got.iter().all(|&b| b == 5));
        assert_eq!(c.fwd_cnt as usize, sent);
    }

    #[test]
    fn guest_shutdown_send_shuts_the_host_write_side_after_the_data() {
        let (mut c, mut host) = pair();
        c.take_guest_data(b"bye").unwrap();
        c.guest_done_sending = true;
        assert_eq!(c.flush(), Flush::Done);
        let mut all = Vec::new();
        host.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"bye");
    }
}
