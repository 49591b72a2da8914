//! The 8254 programmable interval timer in user space, for hypervisors without an in-kernel one
//! (WHP), behaving as KVM's in-kernel PIT does: three channels at 1.193182 MHz behind ports
//! 0x40-0x43, and port 0x61 for channel 2's gate and output (the PC speaker port).
//!
//! Like KVM's, the counters are not stepped: a channel remembers when its count was loaded and
//! works its value and output out from the time since, per mode (0 to 5). Reads and writes follow
//! the access mode (low byte, high byte, or low then high), with counter latches, status
//! latches and read-back commands. Channel 0 drives IRQ 0: modes 2 and 3 pulse it every period
//! (never more often than every 200 µs, KVM's default floor), modes 0, 1 and 4 once. Whoever
//! owns the PIT calls `expire` at `next_deadline` (a timer thread); periods missed in between are
//! coalesced into one pulse, as KVM does with reinjection off. The clock is a trait so tests
//! step time by hand.
//!
//! What it leaves out, as KVM does: BCD counting (the bit is kept, counting stays binary), and
//! the gate's effect in modes 0 and 4. Platform-neutral; unit-tested on Linux.

use std::fmt::Debug;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::bus::BusDevice;
use crate::interrupt::InterruptLine;

/// The input clock, in Hz.
pub const PIT_FREQUENCY: u64 = 1_193_182;
/// The first counter port (channel 0); channels 1 and 2 follow, then the control port.
pub const PIT_PORT: u16 = 0x40;
/// The control word port.
pub const PIT_CONTROL_PORT: u16 = 0x43;
/// The PC speaker / NMI status port, where channel 2's gate and output are.
pub const SPEAKER_PORT: u16 = 0x61;
/// Shortest period of a periodic channel 0, in ns (KVM's `min_timer_period_us` default).
pub const MIN_PERIOD_NS: u64 = 200_000;

const NS_PER_SEC: u64 = 1_000_000_000;
/// Access modes, and the read/write states that step through them (1, low byte only, is the
/// default arm of each match).
const RW_MSB: u8 = 2;
const RW_WORD0: u8 = 3;
const RW_WORD1: u8 = 4;
/// A channel never programmed since reset.
const MODE_UNSET: u8 = 0xff;

/// Monotonic time in ns, for the PIT.
pub trait PitClock: Send + Sync + Debug {
    /// Nanoseconds since a fixed point.
    fn now_ns(&self) -> u64;
}

/// The host's monotonic clock.
#[derive(Debug)]
pub struct HostClock(Instant);

impl Default for HostClock {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl PitClock for HostClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

#[derive(Debug, Clone, Copy)]
struct Channel {
    /// The loaded count, 1 to 0x10000 (a written 0 means 0x10000).
    count: u32,
    load_time: u64,
    latched_count: u16,
    /// The access mode the latched count is read in, or 0 when no count is latched.
    count_latched: u8,
    status: u8,
    status_latched: bool,
    read_state: u8,
    write_state: u8,
    write_latch: u8,
    rw_mode: u8,
    mode: u8,
    bcd: bool,
    gate: bool,
}

impl Channel {
    fn reset(gate: bool, now: u64) -> Self {
        Self {
            count: 0x10000,
            load_time: now,
            latched_count: 0,
            count_latched: 0,
            status: 0,
            status_latched: false,
            read_state: 0,
            write_state: 0,
            write_latch: 0,
            rw_mode: 0,
            mode: MODE_UNSET,
            bcd: false,
            gate,
        }
    }

    /// Input clock ticks since the count was loaded.
    fn ticks(&self, now: u64) -> u64 {
        let ns = u128::from(now.saturating_sub(self.load_time));
        u64::try_from(ns * u128::from(PIT_FREQUENCY) / u128::from(NS_PER_SEC)).unwrap_or(u64::MAX)
    }

    fn counter(&self, now: u64) -> u16 {
        let d = self.ticks(now);
        let count = u64::from(self.count);
        let value = match self.mode {
            0 | 1 | 4 | 5 => count.wrapping_sub(d) & 0xffff,
            // Square wave counts down by two.
            3 => count - (d.wrapping_mul(2) % count),
            // Mode 2, and a channel never programmed.
            _ => count - d % count,
        };
        value as u16
    }

    fn output(&self, now: u64) -> bool {
        let d = self.ticks(now);
        let count = u64::from(self.count);
        match self.mode {
            1 => d < count,
            2 => d.is_multiple_of(count) && d != 0,
            3 => d % count < (count + 1) >> 1,
            4 | 5 => d == count,
            // Mode 0, and a channel never programmed.
            _ => d >= count,
        }
    }

    fn latch_count(&mut self, now: u64) {
        if self.count_latched == 0 {
            self.latched_count = self.counter(now);
            self.count_latched = self.rw_mode;
        }
    }

    fn latch_status(&mut self, now: u64) {
        if !self.status_latched {
            self.status = (u8::from(self.output(now)) << 7)
                | (self.rw_mode << 4)
                | (self.mode << 1)
                | u8::from(self.bcd);
            self.status_latched = true;
        }
    }

    fn read(&mut self, now: u64) -> u8 {
        if self.status_latched {
            self.status_latched = false;
            return self.status;
        }
        if self.count_latched != 0 {
            let [low, high] = self.latched_count.to_le_bytes();
            return match self.count_latched {
                RW_MSB => {
                    self.count_latched = 0;
                    high
                }
                RW_WORD0 => {
                    self.count_latched = RW_MSB;
                    low
                }
                _ => {
                    self.count_latched = 0;
                    low
                }
            };
        }
        let [low, high] = self.counter(now).to_le_bytes();
        match self.read_state {
            RW_MSB => high,
            RW_WORD0 => {
                self.read_state = RW_WORD1;
                low
            }
            RW_WORD1 => {
                self.read_state = RW_WORD0;
                high
            }
            _ => low,
        }
    }
}

/// The timer of channel 0: when IRQ 0 is next due, and the period after that if periodic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timer {
    deadline: u64,
    period: Option<u64>,
}

/// The 8254.
#[derive(Debug)]
pub struct Pit {
    clock: Arc<dyn PitClock>,
    irq0: Arc<dyn InterruptLine>,
    channels: [Channel; 3],
    speaker_data_on: bool,
    timer: Option<Timer>,
}

impl Pit {
    /// A PIT in its reset state (no channel programmed, channel 2's gate low), raising IRQ 0
    /// through `irq0`.
    pub fn new(clock: Arc<dyn PitClock>, irq0: Arc<dyn InterruptLine>) -> Self {
        let now = clock.now_ns();
        Self {
            clock,
            irq0,
            channels: [
                Channel::reset(true, now),
                Channel::reset(true, now),
                Channel::reset(false, now),
            ],
            speaker_data_on: false,
            timer: None,
        }
    }

    fn load_count(&mut self, channel: usize, value: u32, now: u64) {
        let count = if value == 0 { 0x10000 } else { value };
        let c = &mut self.channels[channel];
        c.count = count;
        c.load_time = now;
        if channel != 0 {
            return;
        }
        let interval = u64::from(count) * NS_PER_SEC / PIT_FREQUENCY;
        self.timer = match c.mode {
            0 | 1 | 4 => Some(Timer {
                deadline: now.saturating_add(interval),
                period: None,
            }),
            2 | 3 => {
                let period = interval.max(MIN_PERIOD_NS);
                Some(Timer {
                    deadline: now.saturating_add(period),
                    period: Some(period),
                })
            }
            _ => None,
        };
    }

    fn write_control(&mut self, value: u8, now: u64) {
        let channel = usize::from(value >> 6);
        if channel == 3 {
            // Read-back: bit 1 + n selects channel n; bit 5 clear latches counts, bit 4 clear
            // latches statuses.
            for (n, c) in self.channels.iter_mut().enumerate() {
                if value & (2 << n) != 0 {
                    if value & 0x20 == 0 {
                        c.latch_count(now);
                    }
                    if value & 0x10 == 0 {
                        c.latch_status(now);
                    }
                }
            }
            return;
        }
        let c = &mut self.channels[channel];
        let access = (value >> 4) & 3;
        if access == 0 {
            c.latch_count(now);
            return;
        }
        c.rw_mode = access;
        c.read_state = access;
        c.write_state = access;
        let mode = (value >> 1) & 7;
        // Modes 6 and 7 are modes 2 and 3.
        c.mode = if mode > 5 { mode - 4 } else { mode };
        c.bcd = value & 1 != 0;
    }

    fn write_counter(&mut self, channel: usize, value: u8, now: u64) {
        let c = &mut self.channels[channel];
        match c.write_state {
            RW_MSB => self.load_count(channel, u32::from(value) << 8, now),
            RW_WORD0 => {
                c.write_latch = value;
                c.write_state = RW_WORD1;
            }
            RW_WORD1 => {
                let low = c.write_latch;
                c.write_state = RW_WORD0;
                self.load_count(channel, u32::from(low) | (u32::from(value) << 8), now);
            }
            _ => self.load_count(channel, u32::from(value), now),
        }
    }

    fn set_gate(&mut self, channel: usize, gate: bool, now: u64) {
        let c = &mut self.channels[channel];
        // Modes 1, 2, 3 and 5 restart counting on a rising edge; modes 0 and 4 would pause,
        // which KVM does not model either.
        if matches!(c.mode, 1 | 2 | 3 | 5) && !c.gate && gate {
            c.load_time = now;
        }
        c.gate = gate;
    }

    /// A read of `port` (0x40-0x43 or 0x61); other ports read all ones.
    pub fn read_port(&mut self, port: u16) -> u8 {
        let now = self.clock.now_ns();
        match port {
            0x40..=0x42 => self.channels[usize::from(port - PIT_PORT)].read(now),
            // The control port is write-only.
            PIT_CONTROL_PORT => 0xff,
            SPEAKER_PORT => {
                // Bit 4 is the DRAM refresh toggle, which software polls for short delays.
                let refresh = (now >> 14) & 1 != 0;
                let c2 = &self.channels[2];
                (u8::from(c2.output(now)) << 5)
                    | (u8::from(refresh) << 4)
                    | (u8::from(self.speaker_data_on) << 1)
                    | u8::from(c2.gate)
            }
            _ => 0xff,
        }
    }

    /// A write of `value` to `port` (0x40-0x43 or 0x61); other ports are ignored.
    pub fn write_port(&mut self, port: u16, value: u8) {
        let now = self.clock.now_ns();
        match port {
            0x40..=0x42 => self.write_counter(usize::from(port - PIT_PORT), value, now),
            PIT_CONTROL_PORT => self.write_control(value, now),
            SPEAKER_PORT => {
                self.speaker_data_on = value & 2 != 0;
                self.set_gate(2, value & 1 != 0, now);
            }
            _ => {}
        }
    }

    /// When IRQ 0 is next due (clock ns), if channel 0 has a timer running.
    pub fn next_deadline(&self) -> Option<u64> {
        self.timer.map(|t| t.deadline)
    }

    /// Pulses IRQ 0 if its deadline has passed, and sets the next one (periodic modes) or stops
    /// the timer (one-shot). Periods missed since are coalesced. Returns whether it pulsed.
    pub fn expire(&mut self) -> bool {
        let now = self.clock.now_ns();
        let Some(timer) = self.timer else {
            return false;
        };
        if timer.deadline > now {
            return false;
        }
        self.timer = timer.period.map(|period| {
            let missed = (now - timer.deadline) / period;
            Timer {
                deadline: timer
                    .deadline
                    .saturating_add(period.saturating_mul(missed + 1)),
                period: Some(period),
            }
        });
        if let Err(e) = self.irq0.trigger() {
            log::warn!("PIT: raising IRQ 0 failed: {e}");
        }
        true
    }
}

/// The PIT on the port I/O bus: one instance at 0x40 (four ports) and one at 0x61 (one port).
#[derive(Debug)]
pub struct PitPorts {
    pit: Arc<Mutex<Pit>>,
    base: u16,
}

impl PitPorts {
    /// The ports at `base` (`PIT_PORT` or `SPEAKER_PORT`) of `pit`.
    pub fn new(pit: Arc<Mutex<Pit>>, base: u16) -> Self {
        Self { pit, base }
    }
}

impl BusDevice for PitPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut pit = self.pit.lock().unwrap_or_else(PoisonError::into_inner);
        // The PIT's registers are bytes; wider reads see the register in the low byte.
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u16::try_from(offset)) {
            *first = pit.read_port(self.base.wrapping_add(offset));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut pit = self.pit.lock().unwrap_or_else(PoisonError::into_inner);
        if let (Some(&value), Ok(offset)) = (data.first(), u16::try_from(offset)) {
            pit.write_port(self.base.wrapping_add(offset), value);
        }
    }
}

#[cfg(test)]
mod tests;
