//! The `agent` and `agent-listen` scenarios: the skiff guest agent's protocol (`agent-protocol`)
//! over vsock, so `skiff exec` and `skiff ctl exec` can be tested end to end on hosts whose KVM
//! cannot run Linux user space. `agent` connects to the host's port 1024 as the real agent does
//! under `skiff exec`; `agent-listen` listens on port 1024 as it does under `skiff run --agent`.
//! An `Exec` names one of these instead of a program:
//!
//! - `exit=N`, `true`, `false`: exit with N, 0, 1.
//! - `echo ARGS...`: ARGS joined by spaces and a newline on stdout; `warn ARGS...`: on stderr.
//! - `flood=BYTES`: BYTES of `a..z` on stdout (a newline every 64th byte).
//! - `signal=N`: end as if killed by signal N.
//! - `spin`: never ends by itself; reports `TimedOut` once the exec's timeout passes.
//! - `die`: the guest ends (debug exit 7) in the middle of the exec.
//! - `garbage`: bytes that are not a frame.
//! - anything else: `NAME: command not found` on stderr and exit 127, as the real agent does.
//!
//! `Shutdown` powers the VM off; `Quiesce` and `Resume` answer `Done` (there is nothing to stop).
//!
//! The console stays quiet on the way (each byte is a VM exit): only `spin` and `die` say
//! that they run.
use agent_protocol::{ByteList, ErrorCode, ExitStatus, Header, Message, AGENT_PORT, HEADER_LEN};

use crate::bootinfo::BootInfo;
use crate::io;
use crate::serial;
use crate::tsc::Deadline;
use crate::virtio::console::ConsolePort;
use crate::virtio::vsock::{fail_err, Conn, Vsock};

/// The largest request payload the test guest takes.
const MAX_REQUEST: usize = 4096;
/// The largest payload it sends in one frame.
const OUT_CHUNK: usize = 4096;
/// A wait with no real limit (the host ends the VM when it gives up).
const FOREVER_MS: u64 = 24 * 3600 * 1000;
/// The debug-exit code of `die`.
const DIE_CODE: u8 = 7;

/// The byte stream the protocol runs over. One lives for the whole scenario and the guest has
/// no allocator to box the larger variant, so the size difference is fine.
#[allow(clippy::large_enum_variant)]
enum Channel {
    /// A vsock connection.
    Vsock(Vsock, Conn),
    /// virtio-console port 0 (for VMMs without vsock: QEMU here has no vhost-vsock).
    Console(ConsolePort),
}

impl Channel {
    fn send_all(&mut self, data: &[u8]) {
        match self {
            Channel::Vsock(v, c) => {
                if let Err(e) = v.send(*c, data, Deadline::after_ms(FOREVER_MS)) {
                    fail_err("send", e);
                }
            }
            Channel::Console(port) => port.write_all(data),
        }
    }

    /// Some bytes (Ok(0): the host closed the stream).
    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, ()> {
        match self {
            Channel::Vsock(v, c) => v
                .recv(*c, buf, Deadline::after_ms(FOREVER_MS))
                .map_err(|_| ()),
            Channel::Console(port) => loop {
                match port.read(buf, Deadline::after_ms(FOREVER_MS)) {
                    Some(0) | None => continue,
                    Some(n) => return Ok(n),
                }
            },
        }
    }

    /// Does the device work a waiting program would leave undone.
    fn idle(&mut self) {
        if let Channel::Vsock(v, _) = self {
            v.poll();
        }
    }
}

struct Link {
    ch: Channel,
    out: [u8; HEADER_LEN + OUT_CHUNK],
}

impl Link {
    fn send(&mut self, req: u32, msg: &Message<'_>) {
        let n = match msg.encode(req, &mut self.out) {
            Ok(n) => n,
            Err(_) => crate::scenario::fail_msg("a reply does not fit the send buffer"),
        };
        let out = self.out;
        self.ch.send_all(&out[..n]);
    }

    /// Fills `buf`; false when the host closed the connection first.
    fn read_exact(&mut self, buf: &mut [u8]) -> bool {
        let mut got = 0;
        while got < buf.len() {
            match self.ch.recv(&mut buf[got..]) {
                Ok(0) | Err(()) => return false,
                Ok(n) => got += n,
            }
        }
        true
    }

    fn error(&mut self, req: u32, code: ErrorCode, message: &str) {
        self.send(
            req,
            &Message::Error {
                code,
                message: message.as_bytes(),
            },
        );
    }
}

/// `agent`: connects to the host's port 1024 and serves that connection; the VM ends when it
/// closes.
pub fn run(info: &BootInfo) -> ! {
    let mut v = Vsock::open(info);
    let c = match v.connect(AGENT_PORT, Deadline::after_ms(60_000)) {
        Ok(c) => c,
        Err(e) => fail_err("connect to the host's agent port", e),
    };
    let mut link = Link {
        ch: Channel::Vsock(v, c),
        out: [0; HEADER_LEN + OUT_CHUNK],
    };
    serve(info, &mut link);
    serial::line().str("testguest: agent: the host closed the connection\n");
    io::exit(0);
}

/// `agent-console`: serves the protocol on virtio-console port 0 (one stream, no
/// connections: the host program is whatever reads and writes the port), until a `Shutdown`.
pub fn console(info: &BootInfo) -> ! {
    crate::virtio::dma::reset(info);
    let port = ConsolePort::open_another(info);
    serial::line().str("testguest: agent on the console\n");
    let mut link = Link {
        ch: Channel::Console(port),
        out: [0; HEADER_LEN + OUT_CHUNK],
    };
    loop {
        serve(info, &mut link);
    }
}

/// `agent-listen`: listens on port 1024 (as the agent does for `skiff run --agent`) and serves
/// host connections one after another until one asks for a shutdown.
pub fn listen(info: &BootInfo) -> ! {
    let mut v = Vsock::open(info);
    v.listen(AGENT_PORT);
    serial::line().str("testguest: agent listening\n");
    loop {
        let c = match v.accept(AGENT_PORT, Deadline::after_ms(FOREVER_MS)) {
            Ok(c) => c,
            Err(e) => fail_err("accept", e),
        };
        let mut link = Link {
            ch: Channel::Vsock(v, c),
            out: [0; HEADER_LEN + OUT_CHUNK],
        };
        serve(info, &mut link);
        let Channel::Vsock(mut back, c) = link.ch else {
            crate::scenario::fail_msg("the listener's channel is not vsock");
        };
        back.close(c, Deadline::after_ms(1000));
        v = back;
    }
}

/// Answers requests until the host closes the connection (or sends something malformed).
fn serve(info: &BootInfo, link: &mut Link) {
    let mut head = [0u8; HEADER_LEN];
    let mut payload = [0u8; MAX_REQUEST];
    loop {
        if !link.read_exact(&mut head) {
            return;
        }
        let header = match Header::decode(&head) {
            Ok(h) => h,
            Err(_) => {
                link.error(0, ErrorCode::Malformed, "bad frame header");
                return;
            }
        };
        let len = header.len as usize;
        if len > MAX_REQUEST {
            link.error(
                header.request,
                ErrorCode::Malformed,
                "request over 4096 bytes",
            );
            return;
        }
        if !link.read_exact(&mut payload[..len]) {
            return;
        }
        let req = header.request;
        match Message::decode(header.kind, &payload[..len]) {
            Ok(Message::Hello { .. }) => link.send(
                req,
                &Message::HelloReply {
                    version: u32::from(agent_protocol::VERSION),
                    features: 0,
                    agent: b"skiff-testguest",
                },
            ),
            Ok(Message::Exec {
                argv, timeout_ms, ..
            }) => exec(link, req, argv, timeout_ms),
            Ok(Message::Quiesce | Message::Resume { .. }) => link.send(req, &Message::Done),
            Ok(Message::Shutdown) => {
                link.send(req, &Message::Done);
                crate::power::poweroff(info);
            }
            Ok(Message::Stdin(_) | Message::StdinEof) => {}
            Ok(_) => link.error(req, ErrorCode::Unsupported, "not in the test guest's agent"),
            Err(_) => {
                link.error(req, ErrorCode::Malformed, "bad payload");
                return;
            }
        }
    }
}

fn parse_num(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0, |v, &d| v * 10 + u64::from(d - b'0')))
}

/// Runs one exec "program" and sends its output and end.
fn exec(link: &mut Link, req: u32, argv: ByteList<'_>, timeout_ms: u64) {
    let mut args = argv.iter();
    let name = args.next().unwrap_or(b"");
    link.send(req, &Message::Started { pid: 1 });
    let status = match name {
        b"true" => ExitStatus::Code(0),
        b"false" => ExitStatus::Code(1),
        b"echo" | b"warn" => {
            let mut line = [0u8; OUT_CHUNK];
            let mut n = 0;
            for (i, a) in args.enumerate() {
                if i > 0 && n < line.len() {
                    line[n] = b' ';
                    n += 1;
                }
                let take = a.len().min(line.len() - n);
                line[n..n + take].copy_from_slice(&a[..take]);
                n += take;
            }
            if n < line.len() {
                line[n] = b'\n';
                n += 1;
            }
            let data = &line[..n];
            let msg = if name == b"echo" {
                Message::Stdout(data)
            } else {
                Message::Stderr(data)
            };
            link.send(req, &msg);
            ExitStatus::Code(0)
        }
        b"spin" => {
            // The one program that runs until stopped says so, for tests that wait for it.
            serial::line().str("testguest: agent exec spin\n");
            let deadline = Deadline::after_ms(if timeout_ms == 0 {
                FOREVER_MS
            } else {
                timeout_ms
            });
            while !deadline.passed() {
                link.ch.idle();
            }
            ExitStatus::TimedOut
        }
        b"die" => {
            serial::line().str("testguest: agent dies mid-exec\n");
            io::exit(DIE_CODE);
        }
        b"garbage" => {
            link.ch.send_all(b"this is not an agent frame, at all");
            // The host should give up on the connection; wait for it to end the VM.
            loop {
                link.ch.idle();
            }
        }
        _ => {
            let (key, value) = match name.iter().position(|&b| b == b'=') {
                Some(at) => (&name[..at], parse_num(&name[at + 1..])),
                None => (name, None),
            };
            match (key, value) {
                (b"exit", Some(code)) if code < 256 => ExitStatus::Code(code as i32),
                (b"signal", Some(sig)) if (1..65).contains(&sig) => ExitStatus::Signal(sig as i32),
                (b"flood", Some(bytes)) => {
                    flood(link, req, bytes);
                    ExitStatus::Code(0)
                }
                _ => {
                    not_found(link, req, name);
                    ExitStatus::Code(127)
                }
            }
        }
    };
    link.send(req, &Message::Exit(status));
}

/// `flood=BYTES`: `a..z` with a newline every 64th byte.
fn flood(link: &mut Link, req: u32, bytes: u64) {
    let mut chunk = [0u8; OUT_CHUNK];
    let mut sent: u64 = 0;
    while sent < bytes {
        let n = (bytes - sent).min(OUT_CHUNK as u64) as usize;
        for (j, b) in chunk[..n].iter_mut().enumerate() {
            let i = sent + j as u64;
            *b = if i % 64 == 63 {
                b'\n'
            } else {
                b'a' + (i % 26) as u8
            };
        }
        link.send(req, &Message::Stdout(&chunk[..n]));
        sent += n as u64;
    }
}

/// What a shell says for a program it cannot find.
fn not_found(link: &mut Link, req: u32, name: &[u8]) {
    const PREFIX: &[u8] = b"testguest: ";
    const SUFFIX: &[u8] = b": command not found\n";
    let mut line = [0u8; 256];
    let take = name.len().min(line.len() - PREFIX.len() - SUFFIX.len());
    let mut n = 0;
    for part in [PREFIX, &name[..take], SUFFIX] {
        line[n..n + part.len()].copy_from_slice(part);
        n += part.len();
    }
    link.send(req, &Message::Stderr(&line[..n]));
}
