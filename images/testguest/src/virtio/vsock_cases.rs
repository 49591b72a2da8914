//! The vsock scenarios, each driven from the host side by `tests/tests/vsock.rs`:
//! - `vsock-echo=PORT,BYTES,CONNS`: CONNS connections to host PORT at once, each sending BYTES
//!   of a pattern and checking that the host echoes them back; then closes them.
//! - `vsock-serve=PORT,CONNS`: listens on PORT and echoes CONNS host-initiated connections
//!   (all at once), each until the host shuts down sending.
//! - `vsock-flood=PORT,BYTES`: sends BYTES to host PORT, saying when it waits for credit.
//! - `vsock-vanish=PORT`: connects, sends a line, and waits for the host to go away.
//! - `vsock-abuse=PORT`: sends malformed packets, then checks that an echo still works.
//! - `vsock-snapshot=PORT`: echoes once, waits for a transport reset (a restore), then echoes
//!   on a new guest connection and on a host connection to guest port PORT+1.
//!
//! The pattern byte at offset i of connection k is `(i * 7 + k * 13 + i / 251) & 0xff`.
use crate::bootinfo::BootInfo;
use crate::scenario::fail;
use crate::serial;
use crate::tsc::{self, Deadline};
use crate::virtio::queue::Buf;
use crate::virtio::vsock::{
    fail_err, Conn, Error, Header, Vsock, HOST_CID, MAX_CONNS, MAX_TX_PAYLOAD, OP_CREDIT_UPDATE,
    OP_RW, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Generous: the host side may be slow under load, and a test may pause a peer on purpose.
const LONG_MS: u64 = 120_000;
const CHUNK: usize = MAX_TX_PAYLOAD as usize;

fn pattern(k: usize, i: u64) -> u8 {
    ((i * 7 + k as u64 * 13 + i / 251) & 0xff) as u8
}

fn fill(k: usize, from: u64, out: &mut [u8]) {
    for (j, b) in out.iter_mut().enumerate() {
        *b = pattern(k, from + j as u64);
    }
}

/// Parses `a,b,c` decimals into `out`; returns how many.
fn parse_list(args: &[u8], out: &mut [u64]) -> usize {
    let mut n = 0;
    for part in args.split(|&b| b == b',') {
        if n == out.len()
            || part.is_empty()
            || part.len() > 18
            || !part.iter().all(u8::is_ascii_digit)
        {
            return 0;
        }
        out[n] = part.iter().fold(0, |v, &d| v * 10 + u64::from(d - b'0'));
        n += 1;
    }
    n
}

fn args<const N: usize>(args: &[u8], usage: &str) -> [u64; N] {
    let mut out = [0u64; N];
    if parse_list(args, &mut out) != N || out[0] == 0 || out[0] > u64::from(u32::MAX) {
        fail(|w| {
            w.str("bad arguments \"")
                .bytes(args)
                .str("\" (want ")
                .str(usage)
                .str(")");
        });
    }
    out
}

/// One connection's progress in `echo`.
#[derive(Clone, Copy)]
struct Echo {
    conn: Option<Conn>,
    sent: u64,
    got: u64,
    shut: bool,
}

/// `vsock-echo=PORT,BYTES,CONNS`.
pub fn echo(info: &BootInfo, a: &[u8]) {
    let [port, bytes, conns] = args::<3>(a, "vsock-echo=PORT,BYTES,CONNS");
    let conns = conns as usize;
    if conns == 0 || conns > MAX_CONNS {
        fail(|w| {
            w.str("CONNS must be 1 to ").dec(MAX_CONNS as u64);
        });
    }
    let mut v = Vsock::open(info);
    let port = port as u32;
    let mut state = [Echo {
        conn: None,
        sent: 0,
        got: 0,
        shut: false,
    }; MAX_CONNS];
    for s in state.iter_mut().take(conns) {
        match v.connect(port, Deadline::after_ms(LONG_MS)) {
            Ok(c) => s.conn = Some(c),
            Err(e) => fail_err("connect", e),
        }
    }
    serial::line()
        .str("testguest: vsock echo connected conns=")
        .dec(conns as u64)
        .str("\n");
    let deadline = Deadline::after_ms(LONG_MS);
    let mut buf = [0u8; CHUNK];
    let mut done = 0;
    while done < conns {
        done = 0;
        for (k, s) in state.iter_mut().enumerate().take(conns) {
            let Some(c) = s.conn else { continue };
            if s.sent < bytes {
                let n = (bytes - s.sent).min(CHUNK as u64) as usize;
                fill(k, s.sent, &mut buf[..n]);
                match v.try_send(c, &buf[..n]) {
                    Ok(sent) => s.sent += sent as u64,
                    Err(e) => fail_err("send", e),
                }
            } else if !s.shut {
                v.shutdown(c, SHUTDOWN_SEND);
                s.shut = true;
            }
            match v.try_recv(c, &mut buf) {
                Ok(n) => {
                    for (j, &b) in buf[..n].iter().enumerate() {
                        let at = s.got + j as u64;
                        if b != pattern(k, at) {
                            fail(|w| {
                                w.str("connection ")
                                    .dec(k as u64)
                                    .str(": byte ")
                                    .dec(at)
                                    .str(" is ")
                                    .hex(b.into())
                                    .str(", sent ")
                                    .hex(pattern(k, at).into());
                            });
                        }
                    }
                    s.got += n as u64;
                }
                Err(e) => fail_err("recv", e),
            }
            if s.got > bytes {
                fail_msg_conn(k, "more bytes echoed than sent");
            }
            if s.got == bytes && s.shut {
                done += 1;
            }
        }
        if done < conns && deadline.passed() {
            v.fail_timeout("the echoes");
        }
    }
    let mut resets = 0;
    for s in state.iter().take(conns) {
        if let Some(c) = s.conn {
            if v.close(c, Deadline::after_ms(10_000)) {
                resets += 1;
            }
        }
    }
    serial::line()
        .str("testguest: vsock echo ok conns=")
        .dec(conns as u64)
        .str(" bytes=")
        .dec(bytes * conns as u64)
        .str(" closed=")
        .dec(resets)
        .str("\n");
}

fn fail_msg_conn(k: usize, what: &str) -> ! {
    fail(|w| {
        w.str("connection ").dec(k as u64).str(": ").str(what);
    })
}

/// Echoes what `c` received, as far as the peer's credit allows; returns the bytes moved, or
/// `None` once the peer is done (shut down sending and everything was echoed).
fn echo_some(v: &mut Vsock, c: Conn, buf: &mut [u8]) -> Result<Option<usize>, Error> {
    // Only take what can be sent back at once: nothing needs buffering here.
    let room = v.send_room(c).min(buf.len());
    let n = v.try_recv(c, &mut buf[..room])?;
    if n > 0 {
        v.send(c, &buf[..n], Deadline::after_ms(LONG_MS))?;
        return Ok(Some(n));
    }
    if v.available(c) == 0 && v.peer_shutdown(c) & SHUTDOWN_SEND != 0 {
        return Ok(None);
    }
    Ok(Some(0))
}

/// `vsock-serve=PORT,CONNS`.
pub fn serve(info: &BootInfo, a: &[u8]) {
    let [port, conns] = args::<2>(a, "vsock-serve=PORT,CONNS");
    let conns = conns as usize;
    if conns == 0 || conns > MAX_CONNS {
        fail(|w| {
            w.str("CONNS must be 1 to ").dec(MAX_CONNS as u64);
        });
    }
    let mut v = Vsock::open(info);
    let port = port as u32;
    v.listen(port);
    serial::line()
        .str("testguest: vsock listening port=")
        .dec(port.into())
        .str("\n");
    serve_on(&mut v, port, conns);
}

fn serve_on(v: &mut Vsock, port: u32, conns: usize) {
    let mut open: [Option<Conn>; MAX_CONNS] = [None; MAX_CONNS];
    let mut accepted = 0;
    let mut finished = 0;
    let mut total = 0u64;
    let mut buf = [0u8; CHUNK];
    let deadline = Deadline::after_ms(LONG_MS);
    while finished < conns {
        if accepted < conns {
            if let Ok(c) = v.accept(port, Deadline::after_ms(0)) {
                open[accepted] = Some(c);
                accepted += 1;
            }
        }
        for slot in open.iter_mut().take(accepted) {
            let Some(c) = *slot else { continue };
            match echo_some(v, c, &mut buf) {
                Ok(Some(n)) => total += n as u64,
                Ok(None) => {
                    v.shutdown(c, SHUTDOWN_SEND);
                    v.close(c, Deadline::after_ms(10_000));
                    *slot = None;
                    finished += 1;
                }
                Err(e) => fail_err("echo", e),
            }
        }
        if deadline.passed() {
            v.fail_timeout("the host connections");
        }
    }
    serial::line()
        .str("testguest: vsock serve ok conns=")
        .dec(conns as u64)
        .str(" bytes=")
        .dec(total)
        .str("\n");
}

/// `vsock-flood=PORT,BYTES`.
pub fn flood(info: &BootInfo, a: &[u8]) {
    let [port, bytes] = args::<2>(a, "vsock-flood=PORT,BYTES");
    let mut v = Vsock::open(info);
    let c = v
        .connect(port as u32, Deadline::after_ms(LONG_MS))
        .unwrap_or_else(|e| fail_err("connect", e));
    let mut buf = [0u8; CHUNK];
    let mut sent = 0u64;
    let mut blocked_since: Option<u64> = None;
    let mut said = false;
    let deadline = Deadline::after_ms(LONG_MS);
    while sent < bytes {
        let n = (bytes - sent).min(CHUNK as u64) as usize;
        fill(0, sent, &mut buf[..n]);
        let done = v
            .try_send(c, &buf[..n])
            .unwrap_or_else(|e| fail_err("send", e));
        sent += done as u64;
        if done > 0 {
            blocked_since = None;
            continue;
        }
        let since = *blocked_since.get_or_insert_with(tsc::now);
        if !said && tsc::ms_between(since, tsc::now()) >= 500 {
            said = true;
            serial::line()
                .str("testguest: vsock flood waiting for credit sent=")
                .dec(sent)
                .str("\n");
        }
        if deadline.passed() {
            v.fail_timeout("credit from the host");
        }
    }
    let closed = v.close(c, Deadline::after_ms(LONG_MS));
    serial::line()
        .str("testguest: vsock flood ok sent=")
        .dec(sent)
        .str(" waited=")
        .dec(said.into())
        .str(" closed=")
        .dec(closed.into())
        .str("\n");
}

/// `vsock-vanish=PORT`.
pub fn vanish(info: &BootInfo, a: &[u8]) {
    let [port] = args::<1>(a, "vsock-vanish=PORT");
    let mut v = Vsock::open(info);
    let c = v
        .connect(port as u32, Deadline::after_ms(LONG_MS))
        .unwrap_or_else(|e| fail_err("connect", e));
    v.send(c, b"hello from the guest\n", Deadline::after_ms(LONG_MS))
        .unwrap_or_else(|e| fail_err("send", e));
    let mut buf = [0u8; 64];
    let how = loop {
        match v.recv(c, &mut buf, Deadline::after_ms(LONG_MS)) {
            Ok(0) => break "shutdown",
            Ok(_) => {}
            Err(Error::Reset) => break "reset",
            Err(e) => fail_err("waiting for the host to go", e),
        }
    };
    let (local, _) = v.ports(c);
    serial::line()
        .str("testguest: vsock peer gone port=")
        .dec(local.into())
        .str(" via=")
        .str(how)
        .str(" flags=")
        .dec(v.peer_shutdown(c).into())
        .str("\n");
    // The connection is unusable now; closing it must still work.
    v.close(c, Deadline::after_ms(10_000));
    serial::line().str("testguest: vsock vanish ok\n");
}

/// One packet header from the guest to the host, for `abuse`.
fn raw(v: &Vsock, op: u16, len: u32) -> [u8; 44] {
    let h = Header {
        src_cid: v.cid(),
        dst_cid: HOST_CID,
        src_port: 4000,
        dst_port: 4001,
        len,
        kind: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 4096,
        fwd_cnt: 0,
    };
    let mut b = [0u8; 44];
    b[0..8].copy_from_slice(&h.src_cid.to_le_bytes());
    b[8..16].copy_from_slice(&h.dst_cid.to_le_bytes());
    b[16..20].copy_from_slice(&h.src_port.to_le_bytes());
    b[20..24].copy_from_slice(&h.dst_port.to_le_bytes());
    b[24..28].copy_from_slice(&h.len.to_le_bytes());
    b[28..30].copy_from_slice(&h.kind.to_le_bytes());
    b[30..32].copy_from_slice(&h.op.to_le_bytes());
    b[36..40].copy_from_slice(&h.buf_alloc.to_le_bytes());
    b
}

/// `vsock-abuse=PORT`.
pub fn abuse(info: &BootInfo, a: &[u8]) {
    let [port] = args::<1>(a, "vsock-abuse=PORT");
    let mut v = Vsock::open(info);
    let scratch = crate::virtio::dma::alloc(4096);
    // Answered with RST: data, credit update and an unknown op on no connection, and a
    // datagram-type packet.
    let mut expect_resets: u32 = 0;
    for op in [OP_RW, OP_CREDIT_UPDATE, 99u16, 0] {
        let mut b = raw(&v, op, 0);
        if op == 0 {
            b[28] = 2; // type: not a stream
            b[30] = 1; // op: request
        }
        v.send_raw(&b, &[]);
        expect_resets += 1;
    }
    // Dropped: wrong source CID, wrong destination CID, a header cut short, a length past
    // the chain, a length past the largest packet, a device-writable descriptor.
    let mut b = raw(&v, OP_RW, 0);
    b[0] ^= 0x55;
    v.send_raw(&b, &[]);
    let mut b = raw(&v, OP_RW, 0);
    b[8] = 7;
    v.send_raw(&b, &[]);
    v.send_raw(&raw(&v, OP_RW, 0)[..20], &[]);
    v.send_raw(&raw(&v, OP_RW, 1000), &[]);
    v.send_raw(
        &raw(&v, OP_RW, 70_000),
        &[Buf {
            addr: scratch.base(),
            len: 4096,
            device_writes: false,
        }],
    );
    v.send_raw(
        &raw(&v, OP_RW, 16),
        &[Buf {
            addr: scratch.base(),
            len: 16,
            device_writes: true,
        }],
    );
    // A length field near u32::MAX and a buffer outside guest memory.
    v.send_raw(&raw(&v, OP_RW, u32::MAX), &[]);
    v.send_raw(
        &raw(&v, OP_RW, 64),
        &[Buf {
            addr: 0xffff_ffff_f000,
            len: 64,
            device_writes: false,
        }],
    );
    let deadline = Deadline::after_ms(10_000);
    while v.stray_resets < expect_resets {
        v.poll();
        if deadline.passed() {
            fail(|w| {
                w.str("expected ")
                    .dec(expect_resets.into())
                    .str(" resets, got ")
                    .dec(v.stray_resets.into());
            });
        }
    }
    if v.needs_reset() {
        fail(|w| {
            w.str("the device gave up after malformed packets");
        });
    }
    // Still working: an echo through the host.
    let c = v
        .connect(port as u32, Deadline::after_ms(LONG_MS))
        .unwrap_or_else(|e| fail_err("connect after abuse", e));
    v.send(c, b"still alive", Deadline::after_ms(LONG_MS))
        .unwrap_or_else(|e| fail_err("send after abuse", e));
    let mut buf = [0u8; 11];
    let mut got = 0;
    while got < buf.len() {
        got += v
            .recv(c, &mut buf[got..], Deadline::after_ms(LONG_MS))
            .unwrap_or_else(|e| fail_err("recv after abuse", e));
    }
    if &buf != b"still alive" {
        fail(|w| {
            w.str("echo after abuse came back as \"")
                .bytes(&buf)
                .str("\"");
        });
    }
    v.close(c, Deadline::after_ms(10_000));
    serial::line()
        .str("testguest: vsock abuse ok resets=")
        .dec(v.stray_resets.into())
        .str("\n");
}

/// Sends `msg` on `c` and checks the echo.
fn echo_once(v: &mut Vsock, c: Conn, msg: &[u8]) {
    v.send(c, msg, Deadline::after_ms(LONG_MS))
        .unwrap_or_else(|e| fail_err("send", e));
    let mut buf = [0u8; 64];
    let mut got = 0;
    while got < msg.len() {
        got += v
            .recv(c, &mut buf[got..msg.len()], Deadline::after_ms(LONG_MS))
            .unwrap_or_else(|e| fail_err("recv", e));
    }
    if &buf[..msg.len()] != msg {
        fail(|w| {
            w.str("echo came back as \"")
                .bytes(&buf[..msg.len()])
                .str("\"");
        });
    }
}

/// `vsock-snapshot=PORT`.
pub fn snapshot(info: &BootInfo, a: &[u8]) {
    let [port] = args::<1>(a, "vsock-snapshot=PORT");
    let port = port as u32;
    let mut v = Vsock::open(info);
    let c = v
        .connect(port, Deadline::after_ms(LONG_MS))
        .unwrap_or_else(|e| fail_err("connect", e));
    echo_once(&mut v, c, b"before the snapshot");
    serial::line().str("testguest: vsock snapshot ready\n");
    let deadline = Deadline::after_ms(LONG_MS);
    while v.transport_resets == 0 {
        v.poll();
        if deadline.passed() {
            v.fail_timeout("a transport reset");
        }
    }
    if !v.is_reset(c) {
        fail(|w| {
            w.str("the connection survived the transport reset");
        });
    }
    serial::line()
        .str("testguest: vsock transport reset cid=")
        .dec(v.cid())
        .str("\n");
    let c = v
        .connect(port, Deadline::after_ms(LONG_MS))
        .unwrap_or_else(|e| fail_err("connect after restore", e));
    echo_once(&mut v, c, b"after the restore");
    v.close(c, Deadline::after_ms(10_000));
    v.listen(port + 1);
    serial::line()
        .str("testguest: vsock listening port=")
        .dec(u64::from(port) + 1)
        .str("\n");
    serve_on(&mut v, port + 1, 1);
    serial::line().str("testguest: vsock snapshot ok\n");
}
