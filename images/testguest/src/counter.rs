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
//!
//! `counter=N,timer` also runs the LAPIC timer at `TIMER_HZ` (`timer.rs`) and watches its tick
//! count after every round: it must never go back, and never stand still for more than
//! `STALL_MS` of TSC time; the TSC must never go back either. Each line then reads
//! `testguest: counter <line> round=<r> ticks=<t> tsc_ms=<ms> ok`, where `tsc_ms` is the TSC
//! time since the previous line (or the start), and a line with more than twice the ticks that
//! time allows (an interrupt storm) fails.
use crate::bootinfo::BootInfo;
use crate::scenario::fail;
use crate::{paging, serial, timer, tsc};

const PAGE: u64 = 4096;
/// Physical address of the ledger page; the data pages follow it.
const BASE: u64 = 64 << 20;
/// Data pages: 16 MiB.
const PAGES: u64 = 4096;
/// The ledger's first word, so a stray zero page is not taken for a ledger.
const LEDGER_MAGIC: u64 = 0x4c45_4447_4552_2131;
/// Time between checks and lines.
const LINE_MS: u64 = 100;
/// Timer rate with `,timer`: each interrupt costs tens of microseconds of emulated CPL0 on the
/// target machines, so a modest rate.
const TIMER_HZ: u64 = 100;
/// Longest stretch of running TSC time without a tick before the scenario fails.
const STALL_MS: u64 = 1000;
/// A gap this long between two checks (a round takes well under a millisecond) means the
/// guest was not running: descheduled, paused, or snapshotted and restored later, where the
/// TSC may have run on (on PVM hosts the guest reads the host's TSC). Ticks missed meanwhile
/// say nothing about the timer, so the stall window starts again.
const AWAY_MS: u64 = 50;

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

/// Watches the timer's tick count and the TSC between rounds (`counter=N,timer`).
struct TickWatch {
    timer: timer::Timer,
    /// Ticks when last seen to change, and the TSC then.
    ticks: u64,
    changed_at: u64,
    /// The last TSC read: the TSC must not go back.
    tsc: u64,
    /// Ticks and TSC at the previous line.
    line_ticks: u64,
    line_tsc: u64,
}

impl TickWatch {
    fn start(info: &BootInfo) -> TickWatch {
        let timer = timer::start(info, TIMER_HZ);
        let now = tsc::now();
        let ticks = timer::ticks();
        TickWatch {
            timer,
            ticks,
            changed_at: now,
            tsc: now,
            line_ticks: ticks,
            line_tsc: now,
        }
    }

    /// After every round: ticks and TSC only go forward, and ticks keep coming while the guest
    /// runs. The TSC is read before the ticks, so a vCPU descheduled in between (with a tick
    /// pending on its return) is not taken for a stall.
    fn check(&mut self) {
        let now = tsc::now();
        let ticks = timer::ticks();
        if now < self.tsc {
            fail(|w| {
                w.str("the TSC went back from ")
                    .dec(self.tsc)
                    .str(" to ")
                    .dec(now);
            });
        }
        if tsc::ms_between(self.tsc, now) > AWAY_MS {
            self.changed_at = now;
        }
        self.tsc = now;
        if ticks < self.ticks {
            fail(|w| {
                w.str("timer ticks went back from ")
                    .dec(self.ticks)
                    .str(" to ")
                    .dec(ticks);
            });
        }
        if ticks != self.ticks {
            self.ticks = ticks;
            self.changed_at = now;
        } else if tsc::ms_between(self.changed_at, now) > STALL_MS {
            fail(|w| {
                w.str("no timer tick for ")
                    .dec(tsc::ms_between(self.changed_at, now))
                    .str(" ms (ticks=")
                    .dec(ticks)
                    .str(")");
            });
        }
    }

    /// At a line: (ticks, TSC ms since the previous line); fails on a storm.
    fn line(&mut self) -> (u64, u64) {
        self.check();
        let ms = tsc::ms_between(self.line_tsc, self.tsc);
        let delta = self.ticks - self.line_ticks;
        let allowed = 2 * ms * self.timer.hz / 1000 + 2;
        if delta > allowed {
            fail(|w| {
                w.str("interrupt storm: ")
                    .dec(delta)
                    .str(" timer ticks in ")
                    .dec(ms)
                    .str(" ms at ")
                    .dec(self.timer.hz)
                    .str(" Hz");
            });
        }
        self.line_ticks = self.ticks;
        self.line_tsc = self.tsc;
        (self.ticks, ms)
    }
}

pub fn run(info: &BootInfo, lines: u64, with_timer: bool) {
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
    let mut watch = with_timer.then(|| TickWatch::start(info));
    {
        let mut w = serial::line();
        w.str("testguest: counter start pages=").dec(PAGES);
        if with_timer {
            w.str(" timer_hz=").dec(TIMER_HZ);
        }
        w.str("\n");
    }
    for line in 1..=lines {
        let deadline = tsc::Deadline::after_ms(LINE_MS);
        while !deadline.passed() {
            round += 1;
            write_round(round);
            if let Some(watch) = &mut watch {
                watch.check();
            }
        }
        verify(round);
        let mut w = serial::line();
        w.str("testguest: counter ")
            .dec(line)
            .str(" round=")
            .dec(round);
        if let Some(watch) = &mut watch {
            let (ticks, ms) = watch.line();
            w.str(" ticks=").dec(ticks).str(" tsc_ms=").dec(ms);
        }
        w.str(" ok\n");
    }
    if let Some(watch) = watch {
        watch.timer.stop();
    }
    serial::line()
        .str("testguest: counter done lines=")
        .dec(lines)
        .str("\n");
}
