//! The PIT against what KVM's in-kernel 8254 does, with time stepped by hand.

use super::*;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

#[derive(Debug, Default)]
struct FakeClock(AtomicU64);

impl PitClock for FakeClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Default)]
struct Pulses(AtomicUsize);

impl InterruptLine for Pulses {
    fn trigger(&self) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Setup {
    pit: Pit,
    clock: Arc<FakeClock>,
    pulses: Arc<Pulses>,
}

impl Setup {
    fn new() -> Self {
        let clock = Arc::new(FakeClock::default());
        clock.0.store(1_000_000_000, Ordering::SeqCst);
        let pulses = Arc::new(Pulses::default());
        Self {
            pit: Pit::new(clock.clone(), pulses.clone()),
            clock,
            pulses,
        }
    }

    /// Moves time on by `ticks` input clock periods (rounded up to whole ns, so exactly
    /// `ticks` have passed).
    fn advance_ticks(&self, ticks: u64) {
        let ns = (ticks * NS_PER_SEC).div_ceil(PIT_FREQUENCY);
        self.clock.0.fetch_add(ns, Ordering::SeqCst);
    }

    fn advance_ns(&self, ns: u64) {
        self.clock.0.fetch_add(ns, Ordering::SeqCst);
    }

    fn now(&self) -> u64 {
        self.clock.0.load(Ordering::SeqCst)
    }

    fn pulses(&self) -> usize {
        self.pulses.0.load(Ordering::SeqCst)
    }

    /// Programs `channel` with `mode` in low-then-high access and loads `count`.
    fn program(&mut self, channel: u8, mode: u8, count: u16) {
        self.pit
            .write_port(0x43, (channel << 6) | 0x30 | (mode << 1));
        let [low, high] = count.to_le_bytes();
        self.pit.write_port(0x40 + u16::from(channel), low);
        self.pit.write_port(0x40 + u16::from(channel), high);
    }

    /// Latches `channel`'s count and reads it low, then high.
    fn latched(&mut self, channel: u8) -> u16 {
        self.pit.write_port(0x43, channel << 6);
        let port = 0x40 + u16::from(channel);
        u16::from_le_bytes([self.pit.read_port(port), self.pit.read_port(port)])
    }
}

#[test]
fn mode_2_counts_down_from_the_low_then_high_count() {
    let mut s = Setup::new();
    s.program(0, 2, 0x1000);
    s.advance_ticks(100);
    assert_eq!(s.latched(0), 0x1000 - 100);
    // Mode 2 reloads: after a whole period and 5 ticks it is 5 below the count again.
    s.advance_ticks(0x1000 - 100 + 5);
    assert_eq!(s.latched(0), 0x1000 - 5);
}

#[test]
fn a_latch_freezes_the_count_until_it_is_read_and_a_second_latch_waits() {
    let mut s = Setup::new();
    s.program(0, 2, 1000);
    s.advance_ticks(10);
    s.pit.write_port(0x43, 0x00);
    s.advance_ticks(200);
    // Latching again before reading keeps the first latch, as KVM does.
    s.pit.write_port(0x43, 0x00);
    let low = s.pit.read_port(0x40);
    let high = s.pit.read_port(0x40);
    assert_eq!(u16::from_le_bytes([low, high]), 990);
    // Without a latch, reads see the live count.
    let low = s.pit.read_port(0x40);
    let high = s.pit.read_port(0x40);
    assert_eq!(u16::from_le_bytes([low, high]), 790);
}

#[test]
fn low_byte_only_and_high_byte_only_access() {
    let mut s = Setup::new();
    // Channel 1, mode 2, low byte only: 0x20 loads 0x20.
    s.pit.write_port(0x43, 0x40 | 0x10 | 0x04);
    s.pit.write_port(0x41, 0x20);
    s.advance_ticks(4);
    assert_eq!(s.pit.read_port(0x41), 0x1c);
    assert_eq!(
        s.pit.read_port(0x41),
        0x1c,
        "low-byte access reads the low byte each time"
    );
    // High byte only: 0x20 loads 0x2000, and reads give the high byte.
    s.pit.write_port(0x43, 0x40 | 0x20 | 0x04);
    s.pit.write_port(0x41, 0x20);
    s.advance_ticks(0x100);
    assert_eq!(s.pit.read_port(0x41), 0x1f);
    // A latch in high-byte mode is read in one access.
    s.pit.write_port(0x43, 0x40);
    assert_eq!(s.pit.read_port(0x41), 0x1f);
    s.advance_ticks(0x100);
    assert_eq!(s.pit.read_port(0x41), 0x1e);
}

#[test]
fn a_zero_count_is_0x10000() {
    let mut s = Setup::new();
    s.program(0, 2, 0);
    s.advance_ticks(1);
    assert_eq!(s.latched(0), 0xffff);
}

#[test]
fn mode_0_output_rises_at_terminal_count_and_the_counter_wraps() {
    let mut s = Setup::new();
    s.program(0, 0, 100);
    let status = |s: &mut Setup| {
        s.pit.write_port(0x43, 0xe2); // read-back, status only, channel 0
        s.pit.read_port(0x40)
    };
    assert_eq!(status(&mut s) & 0x80, 0);
    s.advance_ticks(99);
    assert_eq!(status(&mut s) & 0x80, 0);
    s.advance_ticks(1);
    assert_eq!(status(&mut s) & 0x80, 0x80);
    s.advance_ticks(5);
    assert_eq!(s.latched(0), 0xfffb);
}

#[test]
fn mode_3_counts_by_two_with_the_output_high_for_the_first_half() {
    let mut s = Setup::new();
    s.program(2, 3, 100);
    s.pit.write_port(0x61, 0x01); // gate 2 up (counting restarts)
    s.advance_ticks(10);
    assert_eq!(s.latched(2), 80);
    assert_eq!(s.pit.read_port(0x61) & 0x20, 0x20);
    s.advance_ticks(45); // 55 ticks: second half of the period
    assert_eq!(s.pit.read_port(0x61) & 0x20, 0);
    s.advance_ticks(45); // 100 ticks: a new period
    assert_eq!(s.pit.read_port(0x61) & 0x20, 0x20);
}

#[test]
fn read_back_latches_status_then_count_for_the_selected_channels() {
    let mut s = Setup::new();
    s.program(0, 2, 500);
    s.program(1, 4, 300);
    s.advance_ticks(50);
    // Read-back of channels 0 and 1, count and status.
    s.pit.write_port(0x43, 0xc0 | 0x02 | 0x04);
    s.advance_ticks(100);
    // Status first: output, access mode 3, mode, binary.
    assert_eq!(s.pit.read_port(0x40), (3 << 4) | (2 << 1));
    assert_eq!(
        u16::from_le_bytes([s.pit.read_port(0x40), s.pit.read_port(0x40)]),
        450
    );
    assert_eq!(s.pit.read_port(0x41), (3 << 4) | (4 << 1));
    assert_eq!(
        u16::from_le_bytes([s.pit.read_port(0x41), s.pit.read_port(0x41)]),
        250
    );
    // Channel 2 was not selected: nothing latched, its status is not returned.
    s.pit.write_port(0x43, 0xc0 | 0x08 | 0x20); // status only, channel 2
    assert_eq!(s.pit.read_port(0x42), 0xff << 1); // never programmed: KVM's mode 0xff
}

#[test]
fn modes_6_and_7_are_modes_2_and_3_and_bcd_is_kept_in_the_status() {
    let mut s = Setup::new();
    s.pit.write_port(0x43, 0x30 | (7 << 1) | 1);
    s.pit.write_port(0x43, 0xe2);
    // Bit 7 is the output: high at the start of a square wave.
    assert_eq!(s.pit.read_port(0x40), 0x80 | (3 << 4) | (3 << 1) | 1);
    s.pit.write_port(0x43, 0x30 | (6 << 1));
    s.pit.write_port(0x43, 0xe2);
    assert_eq!(s.pit.read_port(0x40) & 0x0e, 2 << 1);
}

#[test]
fn the_speaker_port_reports_gate_data_and_output_and_a_rising_gate_restarts() {
    let mut s = Setup::new();
    assert_eq!(s.pit.read_port(0x61) & 0x03, 0, "gate 2 starts low");
    s.program(2, 2, 1000);
    s.pit.write_port(0x61, 0x03);
    assert_eq!(s.pit.read_port(0x61) & 0x03, 0x03);
    s.advance_ticks(300);
    assert_eq!(s.latched(2), 700);
    // Dropping and raising the gate reloads the count in mode 2.
    s.pit.write_port(0x61, 0x00);
    s.pit.write_port(0x61, 0x01);
    s.advance_ticks(10);
    assert_eq!(s.latched(2), 990);
    // The refresh bit toggles every 2^14 ns.
    let before = s.pit.read_port(0x61) & 0x10;
    s.advance_ns(1 << 14);
    assert_ne!(s.pit.read_port(0x61) & 0x10, before);
}

#[test]
fn periodic_channel_0_pulses_irq0_each_period_and_coalesces_missed_ones() {
    let mut s = Setup::new();
    assert_eq!(s.pit.next_deadline(), None, "no timer before programming");
    let start = s.now();
    s.program(0, 2, 11932); // about 10 ms
    let period = 11932 * NS_PER_SEC / PIT_FREQUENCY;
    assert_eq!(s.pit.next_deadline(), Some(start + period));
    s.advance_ns(period - 1);
    assert!(!s.pit.expire());
    s.advance_ns(1);
    assert!(s.pit.expire());
    assert_eq!(s.pulses(), 1);
    assert_eq!(s.pit.next_deadline(), Some(start + 2 * period));
    // Five periods late: one pulse, and the next deadline is the next period boundary.
    s.advance_ns(5 * period + 10);
    assert!(s.pit.expire());
    assert!(!s.pit.expire());
    assert_eq!(s.pulses(), 2);
    assert_eq!(s.pit.next_deadline(), Some(start + 7 * period));
}

#[test]
fn one_shot_channel_0_pulses_once() {
    let mut s = Setup::new();
    s.program(0, 0, 1193);
    s.advance_ns(2_000_000);
    assert!(s.pit.expire());
    assert_eq!(s.pit.next_deadline(), None);
    s.advance_ns(2_000_000);
    assert!(!s.pit.expire());
    assert_eq!(s.pulses(), 1);
}

#[test]
fn a_tiny_periodic_count_is_held_to_the_minimum_period() {
    let mut s = Setup::new();
    let start = s.now();
    s.program(0, 2, 2);
    assert_eq!(s.pit.next_deadline(), Some(start + MIN_PERIOD_NS));
    // Only channel 0 runs a timer.
    let mut s = Setup::new();
    s.program(1, 2, 100);
    assert_eq!(s.pit.next_deadline(), None);
}

#[test]
fn the_ports_work_through_the_bus() {
    let s = Setup::new();
    let pit = Arc::new(Mutex::new(s.pit));
    let bus = crate::bus::Bus::new();
    bus.insert(
        Arc::new(Mutex::new(PitPorts::new(pit.clone(), PIT_PORT))),
        0x40,
        4,
    )
    .unwrap();
    bus.insert(
        Arc::new(Mutex::new(PitPorts::new(pit.clone(), SPEAKER_PORT))),
        0x61,
        1,
    )
    .unwrap();
    bus.write(0x43, &[0x34]);
    bus.write(0x40, &[0x00]);
    bus.write(0x40, &[0x10]);
    bus.write(0x61, &[0x01]);
    s.clock
        .0
        .fetch_add(100 * NS_PER_SEC / PIT_FREQUENCY + 1, Ordering::SeqCst);
    bus.write(0x43, &[0x00]);
    let mut low = [0u8; 2];
    bus.read(0x40, &mut low);
    let mut high = [0u8; 1];
    bus.read(0x40, &mut high);
    assert_eq!(u16::from_le_bytes([low[0], high[0]]), 0x1000 - 100);
    assert_eq!(low[1], 0, "a wide read has the register in the low byte");
    let mut speaker = [0u8; 1];
    bus.read(0x61, &mut speaker);
    assert_eq!(speaker[0] & 1, 1);
    assert!(pit.lock().unwrap().next_deadline().is_some());
}
