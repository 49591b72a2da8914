//! COM1 (16550A at I/O 0x3f8) output and the console lock that keeps lines from different CPUs
//! apart. Formatting helpers (decimal, hex) live here so callers in CPL0 (AP start-up, the
//! exception handler) never need `core::fmt`. Input is not supported.
//!
//! Every port access is a VM exit (tens of us on the target machines), so output uses the
//! transmit FIFO as a 16550A driver does: once LSR shows THR empty, the FIFO has room for 16
//! bytes, and up to that many are written before LSR is polled again. The remaining room is
//! carried from line to line under the console lock; the FIFO only drains in the meantime. A UART
//! without a working FIFO (IIR bits 7:6 not both set after enabling it) gets one byte per poll.
use core::hint::spin_loop;
use core::marker::PhantomData;
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use crate::io::{inb, outb};

const COM1: u16 = 0x3f8;
const IIR: u16 = COM1 + 2;
const LSR: u16 = COM1 + 5;
const LSR_THR_EMPTY: u8 = 1 << 5;
/// IIR bits 7:6: both set when the FIFOs are enabled (16550A).
const IIR_FIFO_ENABLED: u8 = 0xc0;
/// Transmit FIFO depth of a 16550A.
const FIFO_DEPTH: u8 = 16;
/// Polls of LSR before a byte is written anyway (a missing or broken UART must not hang us).
const MAX_LSR_POLLS: u32 = 100_000;
/// Spins before the exception/panic path takes the console without the lock.
const FORCED_LOCK_SPINS: u32 = 10_000;

/// The console lock: `swap` compiles to `xchg`, which the CPL0 emulator handles. This, `BURST`
/// and `ROOM` are in `.data.tg_hot` (see linker.ld).
#[link_section = ".data.tg_hot"]
static LOCK: AtomicBool = AtomicBool::new(false);
/// Bytes THR takes per LSR poll: `FIFO_DEPTH` once `init` found the FIFO working, else 1.
#[link_section = ".data.tg_hot"]
static BURST: AtomicU8 = AtomicU8::new(1);
/// Bytes that may still be written without polling LSR, handed from line to line with the lock.
#[link_section = ".data.tg_hot"]
static ROOM: AtomicU8 = AtomicU8::new(0);

/// Minimal 16550 set-up: 115200 8N1, FIFOs on, interrupts off; then checks that the FIFO is on.
pub fn init() {
    outb(COM1 + 1, 0x00); // IER: no interrupts
    outb(COM1 + 3, 0x80); // LCR: DLAB on
    outb(COM1, 0x01); // DLL: divisor 1 = 115200 baud
    outb(COM1 + 1, 0x00); // DLM
    outb(COM1 + 3, 0x03); // LCR: 8N1, DLAB off
    outb(COM1 + 2, 0xc7); // FCR: enable and clear FIFOs
    outb(COM1 + 4, 0x03); // MCR: DTR, RTS (OUT2 off: no IRQ)
    if inb(IIR) & IIR_FIFO_ENABLED == IIR_FIFO_ENABLED {
        BURST.store(FIFO_DEPTH, Ordering::Relaxed);
    }
}

/// Waits (boundedly) for THR empty and returns how many bytes may be written now.
fn wait_for_room() -> u8 {
    for _ in 0..MAX_LSR_POLLS {
        if inb(LSR) & LSR_THR_EMPTY != 0 {
            return BURST.load(Ordering::Relaxed);
        }
        spin_loop();
    }
    1
}

/// One console line being written; holds the console lock until dropped.
pub struct Line {
    owns_lock: bool,
    /// Bytes that fit in the transmit FIFO without another LSR poll.
    room: u8,
    // Not Send: the lock belongs to the CPU that took it.
    _cpu_local: PhantomData<*const ()>,
}

/// Takes the console lock (spinning) and returns a writer for one line.
pub fn line() -> Line {
    while LOCK.swap(true, Ordering::Acquire) {
        spin_loop();
    }
    Line {
        owns_lock: true,
        room: ROOM.load(Ordering::Relaxed),
        _cpu_local: PhantomData,
    }
}

/// Like `line`, but for the exception and panic paths: if the lock stays busy (perhaps held by
/// the code that faulted), writes without it rather than deadlock.
pub fn line_forced() -> Line {
    for _ in 0..FORCED_LOCK_SPINS {
        if !LOCK.swap(true, Ordering::Acquire) {
            return Line {
                owns_lock: true,
                room: ROOM.load(Ordering::Relaxed),
                _cpu_local: PhantomData,
            };
        }
        spin_loop();
    }
    Line {
        owns_lock: false,
        room: 0,
        _cpu_local: PhantomData,
    }
}

/// `v` in decimal, in the end of `buf`.
pub fn decimal(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

impl Line {
    /// Writes raw bytes.
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            if self.room == 0 {
                self.room = wait_for_room();
            }
            outb(COM1, b);
            self.room -= 1;
        }
        self
    }

    /// Writes a string.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// Writes `v` in decimal.
    pub fn dec(&mut self, v: u64) -> &mut Self {
        let mut buf = [0u8; 20];
        self.bytes(decimal(v, &mut buf))
    }

    /// Writes `v` as `0x` followed by lowercase hex digits without leading zeros.
    pub fn hex(&mut self, v: u64) -> &mut Self {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; 18];
        let mut i = buf.len();
        let mut rest = v;
        loop {
            i -= 1;
            buf[i] = DIGITS[(rest & 0xf) as usize];
            rest >>= 4;
            if rest == 0 {
                break;
            }
        }
        i -= 2;
        buf[i] = b'0';
        buf[i + 1] = b'x';
        self.bytes(&buf[i..])
    }
}

impl core::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.str(s);
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.owns_lock {
            ROOM.store(self.room, Ordering::Relaxed);
            LOCK.store(false, Ordering::Release);
        }
    }
}
