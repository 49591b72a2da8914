//! The `agent`, `agent-nofs` and `agent-listen` scenarios: the skiff guest agent's protocol (`agent-protocol`)
//! over vsock, so `skiff exec` and `skiff ctl exec` can be tested end to end on hosts whose KVM
//! cannot run Linux user space. `agent` connects to the host's port 1024 as the real agent does
//! under `skiff exec`, after setting up a virtio-fs device as a kernel's driver would
//! (`agent-nofs` leaves it alone, as a kernel without virtio-fs support does); `agent-listen` listens on port 1024 as it does under `skiff run --agent`;
//! `agent-console` speaks it on virtio-console port 0, for VMMs without vsock (QEMU in
//! `scripts/bench-exec`).
//! An `Exec` names one of these instead of a program:
//!
//! - `exit=N`, `true`, `false`: exit with N, 0, 1.
//! - `echo ARGS...`: ARGS joined by spaces and a newline on stdout; `warn ARGS...`: on stderr.
//! - `flood=BYTES`: BYTES of `a..z` on stdout (a newline every 64th byte).
//! - `signal=N`: end as if killed by signal N.
//! - `spin`: never ends by itself; reports `TimedOut` once the exec's timeout passes.
//! - `sleep=MS`: waits MS milliseconds (serving the connection), then exits 0.
//! - `read-ram`: reads a word of every RAM page, prints `PAGES pages read`, exits 0.
//! - `die`: the guest ends (debug exit 7) in the middle of the exec.
//! - `garbage`: bytes that are not a frame.
//! - `put PATH WORDS...`: WORDS joined by spaces and a newline become the file PATH
//!   (`agent_files.rs`: a few small files in RAM, kept across connections and snapshots).
//! - `cat PATH`: the file PATH on stdout, or `cat: PATH: no such file` and exit 1.
//! - anything else: `NAME: command not found` on stderr and exit 127, as the real agent does.
//!
//! Each exec leaves `testguest: agent exec NAME` on the serial console, printed once its
//! replies are sent (or, for an exec that waits, as it starts waiting), so the line's VM exits
//! are not between the `Exec` and its `Exit`. Replies to requests the host sent together
//! (`Hello`, `Resume`, `Exec`) leave with one transmit kick.
//!
//! `ReadFile` and `WriteFile` (replace, or append) use the same files. Under `agent-listen`, a
//! reply the host has reset (it gave up on that connection) drops the connection and the agent
//! accepts the next one; under `agent`, whose one connection is the run, it fails the guest. `Shutdown` powers the VM
//! off; `Quiesce` and `Resume` answer `Done` (there is nothing to stop).
use agent_protocol::{
    ByteList, ErrorCode, ExitStatus, Header, Message, WriteFlags, AGENT_PORT, HEADER_LEN,
};

use crate::bootinfo::BootInfo;
use crate::io;
use crate::serial;
use crate::tsc::Deadline;
use crate::virtio::agent_files::{Files, MAX_DATA};
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
/// The longest console line an exec leaves (longer names are cut).
const LOG_LINE: usize = 96;

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
    /// Sends all of `data`; an error only when the vsock peer reset the connection.
    fn send_all(&mut self, data: &[u8]) -> Result<(), crate::virtio::vsock::Error> {
        match self {
            Channel::Vsock(v, c) => v.send(*c, data, Deadline::after_ms(FOREVER_MS)),
            Channel::Console(port) => {
                port.write_all(data);
                Ok(())
            }
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

    /// Does the device work a waiting program would leave undone (and sends what is queued).
    fn idle(&mut self) {
        if let Channel::Vsock(v, _) = self {
            v.flush();
            v.poll();
        }
    }

    /// Whether received bytes wait to be read (after taking what the device delivered).
    fn has_input(&mut self) -> bool {
        match self {
            Channel::Vsock(v, c) => {
                v.poll();
                v.available(*c) > 0
            }
            Channel::Console(_) => false,
        }
    }

    /// Sends what is queued (replies share one transmit kick until the agent waits).
    fn flush(&mut self) {
        if let Channel::Vsock(v, _) = self {
            v.flush();
        }
    }
}

struct Link {
    ch: Channel,
    out: [u8; HEADER_LEN + OUT_CHUNK],
    /// `agent-listen`: a send the host reset ends this connection, not the guest (the host
    /// gave up on it and connects again). `agent`: the one connection is the run; it fails.
    survive_reset: bool,
    /// A send failed: nothing more goes out, and `serve` returns after this request.
    broken: bool,
    /// The console line of the exec being run, printed once its replies are on their way
    /// (every byte on the 16550 is a VM exit: tens of microseconds each on the PVM hosts, a
    /// millisecond or more per line, which would otherwise sit between an `Exec` and its `Exit`).
    log: [u8; LOG_LINE],
    log_len: usize,
}

impl Link {
    fn send(&mut self, req: u32, msg: &Message<'_>) {
        if self.broken {
            return;
        }
        let n = match msg.encode(req, &mut self.out) {
            Ok(n) => n,
            Err(_) => crate::scenario::fail_msg("a reply does not fit the send buffer"),
        };
        let out = self.out;
        if let Err(e) = self.ch.send_all(&out[..n]) {
            if !self.survive_reset {
                fail_err("send", e);
            }
            serial::line().str("testguest: agent: a send failed, the connection is dropped\n");
            self.broken = true;
        }
    }

    /// Remembers `name` for the console line `testguest: agent exec NAME`.
    fn log_exec(&mut self, name: &[u8]) {
        const PREFIX: &[u8] = b"testguest: agent exec ";
        let take = name.len().min(LOG_LINE - PREFIX.len() - 1);
        self.log[..PREFIX.len()].copy_from_slice(PREFIX);
        self.log[PREFIX.len()..PREFIX.len() + take].copy_from_slice(&name[..take]);
        self.log[PREFIX.len() + take] = b'\n';
        self.log_len = PREFIX.len() + take + 1;
    }

    /// Sends what is queued, then prints the pending console line: the agent is about to wait,
    /// and the host has its replies.
    fn settle(&mut self) {
        self.ch.flush();
        if self.log_len > 0 {
            serial::line().bytes(&self.log[..self.log_len]);
            self.log_len = 0;
        }
    }

    /// `settle`, then the channel's idle work: for execs that wait.
    fn idle(&mut self) {
        self.settle();
        self.ch.idle();
    }

    /// Fills `buf`; false when the host closed the connection first. Replies go out (and the
    /// exec's console line is printed) once the agent would wait: not while requests the host
    /// sent together are still being read.
    fn read_exact(&mut self, buf: &mut [u8]) -> bool {
        if !self.ch.has_input() {
            self.settle();
        }
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

/// `agent`: sets up a virtio-fs device if there is one (as a kernel's driver would at boot,
/// before `skiff exec` starts its agent), connects to the host's port 1024 and serves that
/// connection; the VM ends when it closes. `agent-nofs` is the same in a guest without a
/// virtio-fs driver (it leaves the device alone).
pub fn run(info: &BootInfo, drive_fs: bool) -> ! {
    let mut v = Vsock::open(info);
    // Only when `skiff exec` shares files (`skiff.root=`, `skiff.share=` on the command line):
    // looking for a device that is not there costs a config-space exit per PCI slot. Kept for
    // the guest's life: dropping the device would reset it.
    let shares = info
        .cmdline()
        .split(|&b| b == b' ')
        .any(|w| w.starts_with(b"skiff.root=") || w.starts_with(b"skiff.share="));
    let fs = (drive_fs && shares)
        .then(|| crate::virtio::fs::set_up_if_present(info))
        .flatten();
    if fs.is_some() {
        serial::line().str("testguest: agent: virtio-fs device set up\n");
    }
    v.set_batched_kicks(true);
    let c = match v.connect(AGENT_PORT, Deadline::after_ms(60_000)) {
        Ok(c) => c,
        Err(e) => fail_err("connect to the host's agent port", e),
    };
    let mut link = Link {
        ch: Channel::Vsock(v, c),
        out: [0; HEADER_LEN + OUT_CHUNK],
        survive_reset: false,
        broken: false,
        log: [0; LOG_LINE],
        log_len: 0,
    };
    let mut files = Files::new();
    serve(info, &mut link, &mut files);
    serial::line().str("testguest: agent: the host closed the connection\n");
    io::exit(0);
}

/// `agent-listen`: listens on port 1024 (as the agent does for `skiff run --agent`) and serves
/// host connections one after another until one asks for a shutdown.
pub fn listen(info: &BootInfo) -> ! {
    let mut v = Vsock::open(info);
    v.set_batched_kicks(true);
    v.listen(AGENT_PORT);
    serial::line().str("testguest: agent listening\n");
    let mut files = Files::new();
    loop {
        let c = match v.accept(AGENT_PORT, Deadline::after_ms(FOREVER_MS)) {
            Ok(c) => c,
            Err(e) => fail_err("accept", e),
        };
        let mut link = Link {
            ch: Channel::Vsock(v, c),
            out: [0; HEADER_LEN + OUT_CHUNK],
            survive_reset: true,
            broken: false,
            log: [0; LOG_LINE],
            log_len: 0,
        };
        serve(info, &mut link, &mut files);
        let Channel::Vsock(mut back, c) = link.ch else {
            crate::scenario::fail_msg("the listener's channel is not vsock");
        };
        back.close(c, Deadline::after_ms(1000));
        v = back;
    }
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
        survive_reset: false,
        broken: false,
        log: [0; LOG_LINE],
        log_len: 0,
    };
    let mut files = Files::new();
    loop {
        serve(info, &mut link, &mut files);
    }
}

/// Answers requests until the host closes the connection (or sends something malformed).
fn serve(info: &BootInfo, link: &mut Link, files: &mut Files) {
    let mut head = [0u8; HEADER_LEN];
    let mut payload = [0u8; MAX_REQUEST];
    loop {
        if link.broken || !link.read_exact(&mut head) {
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
            }) => exec(info, link, req, argv, timeout_ms, files),
            Ok(Message::ReadFile { path }) => match files.get(path) {
                Some(data) => {
                    let mut copy = [0u8; MAX_DATA];
                    copy[..data.len()].copy_from_slice(data);
                    link.send(req, &Message::FileData(&copy[..data.len()]));
                    link.send(req, &Message::Done);
                }
                None => link.error(req, ErrorCode::Io, "no such file"),
            },
            Ok(Message::WriteFile {
                flags, path, data, ..
            }) => {
                let mut joined = [0u8; MAX_DATA];
                let mut n = 0;
                if flags.has(WriteFlags::APPEND) {
                    if let Some(old) = files.get(path) {
                        joined[..old.len()].copy_from_slice(old);
                        n = old.len();
                    }
                }
                let result = if n + data.len() > MAX_DATA {
                    Err("a file over 512 bytes")
                } else {
                    joined[n..n + data.len()].copy_from_slice(data);
                    files.put(path, &joined[..n + data.len()])
                };
                match result {
                    Ok(()) => link.send(req, &Message::Done),
                    Err(why) => link.error(req, ErrorCode::Io, why),
                }
            }
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
fn exec(
    info: &BootInfo,
    link: &mut Link,
    req: u32,
    argv: ByteList<'_>,
    timeout_ms: u64,
    files: &mut Files,
) {
    let mut args = argv.iter();
    let name = args.next().unwrap_or(b"");
    link.log_exec(name);
    link.send(req, &Message::Started { pid: 1 });
    let status = match name {
        b"true" => ExitStatus::Code(0),
        b"false" => ExitStatus::Code(1),
        b"echo" | b"warn" => {
            let mut line = [0u8; OUT_CHUNK];
            let n = join_line(args, &mut line);
            let data = &line[..n];
            let msg = if name == b"echo" {
                Message::Stdout(data)
            } else {
                Message::Stderr(data)
            };
            link.send(req, &msg);
            ExitStatus::Code(0)
        }
        b"put" => {
            let path = args.next().unwrap_or(b"");
            let mut data = [0u8; MAX_DATA];
            let n = join_line(args, &mut data);
            match files.put(path, &data[..n]) {
                Ok(()) => ExitStatus::Code(0),
                Err(why) => {
                    link.send(req, &Message::Stderr(why.as_bytes()));
                    ExitStatus::Code(1)
                }
            }
        }
        b"cat" => {
            let path = args.next().unwrap_or(b"");
            match files.get(path) {
                Some(data) => {
                    let mut copy = [0u8; MAX_DATA];
                    copy[..data.len()].copy_from_slice(data);
                    link.send(req, &Message::Stdout(&copy[..data.len()]));
                    ExitStatus::Code(0)
                }
                None => {
                    link.send(req, &Message::Stderr(b"cat: no such file\n"));
                    ExitStatus::Code(1)
                }
            }
        }
        b"read-ram" => {
            let pages = crate::memcheck::read_all(info);
            let mut line = [0u8; 64];
            let n = decimal(pages, &mut line);
            let tail = b" pages read\n";
            line[n..n + tail.len()].copy_from_slice(tail);
            link.send(req, &Message::Stdout(&line[..n + tail.len()]));
            ExitStatus::Code(0)
        }
        b"spin" => {
            let deadline = Deadline::after_ms(if timeout_ms == 0 {
                FOREVER_MS
            } else {
                timeout_ms
            });
            while !deadline.passed() {
                link.idle();
            }
            ExitStatus::TimedOut
        }
        b"die" => {
            link.settle();
            serial::line().str("testguest: agent dies mid-exec\n");
            io::exit(DIE_CODE);
        }
        b"garbage" => {
            let junk = *b"this is not an agent frame, at all";
            if let Err(e) = link.ch.send_all(&junk) {
                fail_err("send", e);
            }
            // The host should give up on the connection; wait for it to end the VM.
            loop {
                link.idle();
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
                (b"sleep", Some(ms)) => {
                    let deadline = Deadline::after_ms(ms);
                    while !deadline.passed() {
                        link.idle();
                    }
                    ExitStatus::Code(0)
                }
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

/// `v` in decimal at the start of `out` (at least 20 bytes); the length.
fn decimal(mut v: u64, out: &mut [u8]) -> usize {
    let mut digits = [0u8; 20];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..n {
        out[i] = digits[n - 1 - i];
    }
    n
}

/// `args` joined by spaces and ended by a newline in `line` (cut at its length); the length.
fn join_line<'a>(args: impl Iterator<Item = &'a [u8]>, line: &mut [u8]) -> usize {
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
    n
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
