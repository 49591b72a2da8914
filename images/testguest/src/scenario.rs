//! The scenario runner: splits the command line into tokens, runs the recognised ones in order,
//! and owns the verdict lines (`done`, `FAIL`) and exit codes. The scenarios themselves live in
//! their own modules (memcheck, smp, pci, virtio::*); the tiny ones (hello, exit=N, fault, panic,
//! spin, flood) live here.
use core::sync::atomic::{AtomicU8, Ordering};

use crate::bootinfo::BootInfo;
use crate::serial::{self, Line};
use crate::virtio::{abuse, blk, console, fs, net, rng};
use crate::{counter, io, memcheck, pci, power, smp};

/// Exit code when every scenario passed.
pub const EXIT_OK: u8 = 0;
/// Exit code after a `FAIL` line.
pub const EXIT_FAIL: u8 = 33;
/// Exit code after a `PANIC` line.
pub const EXIT_PANIC: u8 = 34;

/// Names used in FAIL lines, indexed by `CURRENT`.
const NAMES: [&str; 35] = [
    "boot",
    "hello",
    "memcheck",
    "smp",
    "exit",
    "fault",
    "panic",
    "spin",
    "pci",
    "virtio-rng",
    "virtio-blk",
    "blkbench",
    "virtio-net",
    "virtio-console",
    "counter",
    "poweroff",
    "acpi-reset",
    "virtio-abuse",
    "virtio-loop",
    "virtio-fs",
    "virtio-bar-move",
    "io-loop",
    "blkloop",
    "vsock-echo",
    "vsock-serve",
    "vsock-flood",
    "vsock-vanish",
    "vsock-abuse",
    "vsock-snapshot",
    "agent",
    "agent-listen",
    "flood",
    "agent-console",
    "agent-nofs",
    "netbench",
];
const BOOT: u8 = 0;
const HELLO: u8 = 1;
const MEMCHECK: u8 = 2;
const SMP: u8 = 3;
const EXIT: u8 = 4;
const FAULT: u8 = 5;
const PANIC: u8 = 6;
const SPIN: u8 = 7;
const PCI: u8 = 8;
const VIRTIO_RNG: u8 = 9;
const VIRTIO_BLK: u8 = 10;
const BLKBENCH: u8 = 11;
const VIRTIO_NET: u8 = 12;
const VIRTIO_CONSOLE: u8 = 13;
const COUNTER: u8 = 14;
const POWEROFF: u8 = 15;
const ACPI_RESET: u8 = 16;
const VIRTIO_ABUSE: u8 = 17;
const VIRTIO_LOOP: u8 = 18;
const VIRTIO_FS: u8 = 19;
const VIRTIO_BAR_MOVE: u8 = 20;
const IO_LOOP: u8 = 21;
const BLKLOOP: u8 = 22;
const VSOCK_ECHO: u8 = 23;
const VSOCK_SERVE: u8 = 24;
const VSOCK_FLOOD: u8 = 25;
const VSOCK_VANISH: u8 = 26;
const VSOCK_ABUSE: u8 = 27;
const VSOCK_SNAPSHOT: u8 = 28;
const AGENT: u8 = 29;
const AGENT_LISTEN: u8 = 30;
const FLOOD: u8 = 31;
const AGENT_CONSOLE: u8 = 32;
const AGENT_NOFS: u8 = 33;
const NETBENCH: u8 = 34;

/// The scenario now running, for FAIL lines from the exception handler. In `.data.tg_hot` (see
/// linker.ld).
#[link_section = ".data.tg_hot"]
static CURRENT: AtomicU8 = AtomicU8::new(BOOT);

/// Name of the scenario now running (`boot` before the first one).
pub fn current_name() -> &'static str {
    NAMES
        .get(usize::from(CURRENT.load(Ordering::Relaxed)))
        .copied()
        .unwrap_or("?")
}

/// Prints `testguest: FAIL <scenario>: <reason>`, where `reason` writes the reason, and exits 33.
pub fn fail(reason: impl FnOnce(&mut Line)) -> ! {
    {
        let mut w = serial::line();
        w.str("testguest: FAIL ").str(current_name()).str(": ");
        reason(&mut w);
        w.str("\n");
    }
    io::exit(EXIT_FAIL)
}

/// `fail` with a fixed reason.
pub fn fail_msg(reason: &str) -> ! {
    fail(|w| {
        w.str(reason);
    })
}

/// Runs every recognised token of the command line in order, then prints `testguest: done` and
/// exits 0. Unknown tokens (such as `console=ttyS0`) are ignored.
pub fn run_all(info: &BootInfo) -> ! {
    for token in info.cmdline().split(u8::is_ascii_whitespace) {
        let start = |id: u8| CURRENT.store(id, Ordering::Relaxed);
        match token {
            b"hello" => {
                start(HELLO);
                serial::line().str("testguest: hello\n");
            }
            b"memcheck" => {
                start(MEMCHECK);
                memcheck::run(info);
            }
            b"smp" => {
                start(SMP);
                smp::run(info);
            }
            b"fault" => {
                start(FAULT);
                // SAFETY: ud2 raises #UD on purpose; the exception handler reports it and exits.
                unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
            }
            b"panic" => {
                start(PANIC);
                panic!("panic requested on the command line");
            }
            b"spin" => {
                // A hung guest, for the VMM's timeout and signal tests: prints once, then loops
                // in CPL3 forever without exiting.
                start(SPIN);
                serial::line().str("testguest: spinning\n");
                loop {
                    core::hint::spin_loop();
                }
            }
            b"flood" => {
                // Serial output without end, for the VMM's output-backpressure tests: a
                // numbered line after another, never exiting.
                start(FLOOD);
                let mut n: u64 = 0;
                loop {
                    serial::line()
                        .str("testguest: flood ")
                        .dec(n)
                        .str(" the quick brown fox jumps over the lazy dog\n");
                    n = n.wrapping_add(1);
                }
            }
            b"pci" => {
                start(PCI);
                pci::run(info);
            }
            b"virtio-rng" => {
                start(VIRTIO_RNG);
                rng::run(info);
            }
            b"virtio-blk" => {
                start(VIRTIO_BLK);
                blk::run(info);
            }
            b"virtio-net" => {
                start(VIRTIO_NET);
                net::run(info);
            }
            b"poweroff" => {
                start(POWEROFF);
                power::poweroff(info);
            }
            b"acpi-reset" => {
                start(ACPI_RESET);
                power::reset(info);
            }
            b"virtio-abuse" => {
                start(VIRTIO_ABUSE);
                abuse::run(info);
            }
            b"virtio-console" => {
                start(VIRTIO_CONSOLE);
                console::run(info);
            }
            b"agent" => {
                start(AGENT);
                crate::virtio::agent::run(info, true);
            }
            b"agent-nofs" => {
                start(AGENT_NOFS);
                crate::virtio::agent::run(info, false);
            }
            b"agent-listen" => {
                start(AGENT_LISTEN);
                crate::virtio::agent::listen(info);
            }
            b"agent-console" => {
                start(AGENT_CONSOLE);
                crate::virtio::agent::console(info);
            }
            b"virtio-bar-move" => {
                start(VIRTIO_BAR_MOVE);
                crate::virtio::bar_move::run(info);
            }
            _ if token.starts_with(b"blkbench=") => {
                start(BLKBENCH);
                let digits = &token[9..];
                match parse_u64(digits).filter(|&mib| mib > 0 && mib < 1 << 24) {
                    Some(mib) => blk::bench(info, mib),
                    None => fail(|w| {
                        w.str("bad size \"")
                            .bytes(digits)
                            .str("\" (want MiB, 1..16777215)");
                    }),
                }
            }
            _ if token.starts_with(b"netbench=") => {
                start(NETBENCH);
                match parse_u64(&token[9..]).filter(|&n| (2..1 << 32).contains(&n)) {
                    Some(frames) => crate::virtio::netbench::run(info, frames),
                    None => fail_msg("bad frame count (want netbench=N, 2 <= N < 2^32)"),
                }
            }
            _ if token.starts_with(b"virtio-loop=") => {
                start(VIRTIO_LOOP);
                match parse_u64(&token[12..]).filter(|&n| (1..100_000).contains(&n)) {
                    Some(rounds) => crate::virtio::snapshot_loop::run(info, rounds),
                    None => fail_msg("bad round count (want virtio-loop=N, 1 <= N < 100000)"),
                }
            }
            _ if token.starts_with(b"virtio-fs=") => {
                start(VIRTIO_FS);
                fs::run(info, &token[10..]);
            }
            _ if token.starts_with(b"io-loop=") => {
                start(IO_LOOP);
                match parse_u64(&token[8..]).filter(|&n| (1..65_536).contains(&n)) {
                    Some(rounds) => crate::virtio::io_loop::run(info, rounds),
                    None => fail_msg("bad round count (want io-loop=N, 1 <= N < 65536)"),
                }
            }
            _ if token.starts_with(b"blkloop=") => {
                // Rounds of blk write and read-back, for vhost-user backend restarts.
                start(BLKLOOP);
                match parse_u64(&token[8..]).filter(|&n| n > 0 && n < 1 << 20) {
                    Some(rounds) => blk::loop_rounds(info, rounds),
                    None => fail_msg("bad round count (want blkloop=N, 1 <= N < 1048576)"),
                }
            }
            _ if token.starts_with(b"vsock-") => {
                use crate::virtio::vsock_cases as vc;
                let (name, args) = match token.iter().position(|&b| b == b'=') {
                    Some(at) => (&token[..at], &token[at + 1..]),
                    None => (token, &token[token.len()..]),
                };
                let (id, case): (u8, fn(&BootInfo, &[u8])) = match name {
                    b"vsock-echo" => (VSOCK_ECHO, vc::echo),
                    b"vsock-serve" => (VSOCK_SERVE, vc::serve),
                    b"vsock-flood" => (VSOCK_FLOOD, vc::flood),
                    b"vsock-vanish" => (VSOCK_VANISH, vc::vanish),
                    b"vsock-abuse" => (VSOCK_ABUSE, vc::abuse),
                    b"vsock-snapshot" => (VSOCK_SNAPSHOT, vc::snapshot),
                    _ => continue,
                };
                start(id);
                case(info, args);
            }
            _ if token.starts_with(b"counter=") => {
                start(COUNTER);
                let (count, timer) = match token[8..].strip_suffix(b",timer") {
                    Some(count) => (count, true),
                    None => (&token[8..], false),
                };
                match parse_u64(count).filter(|&n| n > 0) {
                    Some(lines) => counter::run(info, lines, timer),
                    None => fail_msg("bad line count (want counter=N or counter=N,timer, N >= 1)"),
                }
            }
            _ if token.starts_with(b"exit=") => {
                start(EXIT);
                let Some(code) = parse_u8(&token[5..]) else {
                    fail(|w| {
                        w.str("bad exit code \"")
                            .bytes(&token[5..])
                            .str("\" (want 0..255)");
                    })
                };
                serial::line()
                    .str("testguest: exit ")
                    .dec(code.into())
                    .str("\n");
                io::exit(code);
            }
            _ => {}
        }
    }
    CURRENT.store(BOOT, Ordering::Relaxed);
    serial::line().str("testguest: done\n");
    io::exit(EXIT_OK)
}

/// Parses a decimal 0..=255.
fn parse_u8(digits: &[u8]) -> Option<u8> {
    if digits.len() > 3 {
        return None;
    }
    parse_u64(digits).and_then(|v| u8::try_from(v).ok())
}

/// Parses a decimal of at most 18 digits (so it cannot overflow).
fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u64::from(d - b'0');
    }
    Some(v)
}
