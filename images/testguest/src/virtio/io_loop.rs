//! The `io-loop=N` scenario, for snapshot tests of virtio-net and virtio-console: opens both
//! once, then runs N rounds on the same queues, one line each, about 100 ms apart, so a test can
//! snapshot between rounds and restore in a new process that continues them.
//!
//! Round r: a ping frame whose payload is `PING` then r (two bytes, big-endian), answered by
//! the host with a pong frame carrying `PONG` then the same two bytes; then the console line
//! `testguest: io-loop console round=r`, answered by one byte of host input, the digit r % 10.
use crate::bootinfo::BootInfo;
use crate::scenario::fail;
use crate::serial;
use crate::tsc::Deadline;
use crate::virtio::console::ConsolePort;
use crate::virtio::net::{NetPort, PING, PONG};

const ROUND_MS: u64 = 100;
/// How long a round waits for the pong and for the console byte (the host may be slow under
/// load, and a restore may sit between the request and the answer).
const ANSWER_MS: u64 = 30_000;

/// `prefix` then `round` as two big-endian bytes, in `out`; returns the length.
fn tagged(prefix: &[u8], round: u16, out: &mut [u8; 32]) -> usize {
    out[..prefix.len()].copy_from_slice(prefix);
    out[prefix.len()..prefix.len() + 2].copy_from_slice(&round.to_be_bytes());
    prefix.len() + 2
}

/// `testguest: io-loop console round=<round>\n` in `out`; returns the length.
fn console_line(round: u64, out: &mut [u8; 64]) -> usize {
    const TEXT: &[u8] = b"testguest: io-loop console round=";
    out[..TEXT.len()].copy_from_slice(TEXT);
    let mut buf = [0u8; 20];
    let digits = serial::decimal(round, &mut buf);
    let end = TEXT.len() + digits.len();
    out[TEXT.len()..end].copy_from_slice(digits);
    out[end] = b'\n';
    end + 1
}

/// The `io-loop=N` scenario (N < 65536).
pub fn run(info: &BootInfo, rounds: u64) {
    let mut net = NetPort::open(info, false);
    let mut console = ConsolePort::open_another(info);
    serial::line().str("testguest: io-loop start\n");
    for round in 1..=rounds {
        let r = round as u16;
        let mut buf = [0u8; 32];
        let n = tagged(PING, r, &mut buf);
        net.send(&buf[..n]);
        let n = tagged(PONG, r, &mut buf);
        if net
            .receive(&buf[..n], Deadline::after_ms(ANSWER_MS))
            .is_none()
        {
            fail(|w| {
                w.str("no pong for round ")
                    .dec(round)
                    .str(" (")
                    .dec(net.ignored)
                    .str(" other frames received)");
            });
        }
        let mut line = [0u8; 64];
        let n = console_line(round, &mut line);
        console.write(&line[..n]);
        let want = b'0' + (round % 10) as u8;
        match console.read_byte(Deadline::after_ms(ANSWER_MS)) {
            Some(b) if b == want => {}
            got => fail(|w| {
                w.str("console round ").dec(round).str(": input ");
                match got {
                    Some(b) => w.hex(b.into()),
                    None => w.str("none"),
                };
                w.str(", expected ").hex(want.into());
            }),
        }
        serial::line()
            .str("testguest: io-loop round=")
            .dec(round)
            .str(" ok\n");
        let pause = Deadline::after_ms(ROUND_MS);
        while !pause.passed() {
            core::hint::spin_loop();
        }
    }
    serial::line()
        .str("testguest: io-loop done rounds=")
        .dec(rounds)
        .str("\n");
}
