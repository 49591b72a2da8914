//! The `counter=N` scenario, for snapshot tests: a CPL3 loop that keeps writing an increasing
//! round number into every page of a 16 MiB buffer, and records each finished round in a ledger
//! page. Every 100 ms of TSC time it checks that every page holds the ledger's round and that
//! the ledger agrees with the round the loop keeps in a register, then prints
//! `testguest: counter <line> round=<r> ok`. After N lines it prints `testguest: counter done
//! lines=N` and the next scenario runs.
//!
//! Restored from a snapshot mid-run, the loop carries on with the next line number: registers,
//! stack and memory all come from the same instant, or the check fails. A page whose memory was
//! not saved (zero), or saved from another moment, gives `FAIL counter: page ...`.
use crate::bootinfo::BootInfo;
use crate::scenario::fail;
use crate::{paging, serial, tsc};

const PAGE: u64 = 4096;
/// Physical address of the ledger page; the data pages follow it.
const BASE: u64 = 64 << 20;
/// Data pages: 16 MiB.
const PAGES: u64 = 4096;
/// The ledger's first word, so a stray zero page is not taken for a ledger.
const LEDGER_MAGIC: u64 = 0x4c45_4447_4552_2131;
/// Time between checks and lines.
const LINE_MS: u64 = 100;

/// The ledger page: a magic word, then the last finished round.
struct Ledger;

impl Ledger {
    fn write(round: u64) {
        // SAFETY: BASE is RAM checked in `run`, identity-mapped writable from CPL3, and used by
        // nothing else while this scenario runs.
        unsafe {
            (BASE as *mut u64).write_volatile(LEDGER_MAGIC);
            ((BASE + 8) as *mut u64).write_volatile(round);
        }
    }

    fn read() -> (u64, u64) {
        // SAFETY: as for `write`.
        unsafe {
            (
                (BASE as *const u64).read_volatile(),
                ((BASE + 8) as *const u64).read_volatile(),
            )
        }
    }
}

fn page_addr(page: u64) -> u64 {
    BASE + PAGE * (1 + page)
}

/// The second word written to `page` in `round`: ties the value to the page, so pages that
/// alias each other are caught.
fn tag(round: u64, page: u64) -> u64 {
    round.rotate_left(17) ^ page.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Writes one round into every data page, then the ledger.
fn write_round(round: u64) {
    for page in 0..PAGES {
        let a = page_addr(page);
        // SAFETY: the data pages are RAM checked in `run`, identity-mapped writable, and used
        // by nothing else while this scenario runs.
        unsafe {
            (a as *mut u64).write_volatile(round);
            ((a + PAGE - 8) as *mut u64).write_volatile(tag(round, page));
        }
    }
    Ledger::write(round);
}

/// Checks every page against the ledger and the ledger against `round` (the loop's own count).
fn verify(round: u64) {
    let (magic, recorded) = Ledger::read();
    if magic != LEDGER_MAGIC || recorded != round {
        fail(|w| {
            w.str("ledger says round ")
                .dec(recorded)
                .str(" (magic ")
                .hex(magic)
                .str(") but the loop is at round ")
                .dec(round);
        });
    }
    for page in 0..PAGES {
        let a = page_addr(page);
        // SAFETY: as in `write_round`.
        let (first, last) = unsafe {
            (
                (a as *const u64).read_volatile(),
                ((a + PAGE - 8) as *const u64).read_volatile(),
            )
        };
        if first != round || last != tag(round, page) {
            fail(|w| {
                w.str("page ")
                    .hex(a)
                    .str(" holds round ")
                    .dec(first)
                    .str(" tag ")
                    .hex(last)
                    .str("; the ledger is at round ")
                    .dec(round);
            });
        }
    }
}

pub fn run(info: &BootInfo, lines: u64) {
    let end = page_addr(PAGES);
    if !info.ram().iter().any(|r| r.start <= BASE && r.end >= end) {
        fail(|w| {
            w.str("needs RAM at ")
                .hex(BASE)
                .str("-")
                .hex(end)
                .str(" (give the guest at least 96 MiB)");
        });
    }
    if !paging::map(BASE, end) {
        fail(|w| {
            w.str("cannot map ").hex(BASE).str("-").hex(end);
        });
    }
    let mut round = 0;
    write_round(round);
    serial::line()
        .str("testguest: counter start pages=")
        .dec(PAGES)
        .str("\n");
    for line in 1..=lines {
        let deadline = tsc::Deadline::after_ms(LINE_MS);
        while !deadline.passed() {
            round += 1;
            write_round(round);
        }
        verify(round);
        serial::line()
            .str("testguest: counter ")
            .dec(line)
            .str(" round=")
            .dec(round)
            .str(" ok\n");
    }
    serial::line()
        .str("testguest: counter done lines=")
        .dec(lines)
        .str("\n");
}
