//! virtio-blk (device type 2) and its scenarios: `virtio-blk` (capacity, GET_ID, a 1 MiB
//! pattern written, flushed, read back and checked; or, on a read-only disk, a write refused with
//! IOERR) and `blkbench=<MiB>` (streaming writes then reads, 512 KiB requests, 8 in flight,
//! timed with the TSC) and `blkloop=<rounds>` (rounds of a 64 KiB write, flush and read-back,
//! each with its own pattern, 500 ms apart, for backend restarts between rounds).
//!
//! Requests are header (device-readable), data (one or more descriptors), status byte
//! (device-writable). Up to `MAX_DEPTH` are in flight, one per slot; each slot owns its header
//! and status byte in `hdrs`.
use crate::bootinfo::BootInfo;
use crate::mmio::Region;
use crate::scenario::fail;
use crate::serial;
use crate::tsc::{self, Deadline};
use crate::virtio::queue::{Buf, Queue};
use crate::virtio::{dma, Device, F_VERSION_1};

const DEVICE_TYPE: u16 = 2;
const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
// Device configuration offsets.
const CFG_CAPACITY: u64 = 0;
const CFG_SIZE_MAX: u64 = 8;
const CFG_SEG_MAX: u64 = 12;

pub(super) const T_IN: u32 = 0;
pub(super) const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
pub(super) const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
/// Written into a slot's status byte before submitting, so a status the device never wrote shows.
const S_UNSET: u8 = 0xff;

pub(super) const SECTOR: u64 = 512;
const QUEUE_MAX: u16 = 256;
const MAX_DEPTH: usize = 8;
/// Per-slot header (16 bytes) and status byte, rounded up.
const SLOT_BYTES: u64 = 32;
/// Most data descriptors one request may use.
const MAX_SEGMENTS: usize = 128;
const REQUEST_TIMEOUT_MS: u64 = 10_000;
const ID_LEN: u64 = 20;
/// Every u64 of test data is its byte offset on the disk XOR this.
pub const PATTERN: u64 = 0xa5a5_a5a5_a5a5_a5a5;
pub(super) const POISON: u64 = 0xdead_dead_dead_dead;

/// `virtio-blk`: sectors `[0, TEST_SECTORS)` in requests of `TEST_REQUEST` bytes.
const TEST_SECTORS: u64 = 2048;
const TEST_REQUEST: u64 = 64 << 10;
/// `blkloop`: bytes per round (one request), pause between rounds, and how long one request may
/// wait (long: a vhost-user backend may be restarting meanwhile).
const LOOP_BYTES: u64 = 64 << 10;
const LOOP_PAUSE_MS: u64 = 500;
const LOOP_REQUEST_TIMEOUT_MS: u64 = 60_000;
/// How often a waiting `blkloop` request looks at the device status.
const STATUS_POLL_MS: u64 = 100;
/// `blkbench` request size.
const BENCH_REQUEST: u64 = 512 << 10;

pub(super) struct Blk {
    dev: Device,
    q: Queue,
    capacity: u64,
    /// Largest data descriptor (SIZE_MAX), and most data descriptors per request (SEG_MAX).
    seg_bytes: u64,
    seg_max: u64,
    hdrs: Region,
    /// Head descriptor -> slot.
    slot_of: [u8; QUEUE_MAX as usize],
    /// Per slot: request type and first sector, for messages.
    what: [(u32, u64); MAX_DEPTH],
}

impl Blk {
    pub(super) fn open(info: &BootInfo) -> Blk {
        let wanted = F_VERSION_1 | F_SIZE_MAX | F_SEG_MAX | F_RO | F_FLUSH;
        let dev = Device::open(info, DEVICE_TYPE, "virtio-blk", wanted);
        let q = dev.setup_queue(0, QUEUE_MAX);
        let capacity = dev.cfg_u64(CFG_CAPACITY);
        let seg_bytes = match dev.features & F_SIZE_MAX {
            0 => 1 << 30,
            _ => u64::from(dev.cfg_u32(CFG_SIZE_MAX)).max(SECTOR) / SECTOR * SECTOR,
        };
        let seg_max = match dev.features & F_SEG_MAX {
            0 => MAX_SEGMENTS as u64,
            _ => u64::from(dev.cfg_u32(CFG_SEG_MAX)).clamp(1, MAX_SEGMENTS as u64),
        };
        dev.driver_ok();
        Blk {
            dev,
            q,
            capacity,
            seg_bytes,
            seg_max,
            hdrs: dma::alloc(SLOT_BYTES * MAX_DEPTH as u64),
            slot_of: [0; QUEUE_MAX as usize],
            what: [(0, 0); MAX_DEPTH],
        }
    }

    fn readonly(&self) -> bool {
        self.dev.features & F_RO != 0
    }

    /// How many `request`-byte requests fit in the queue at once, at most `MAX_DEPTH`.
    fn depth(&self, request: u64) -> usize {
        let per_request = 2 + request.div_ceil(self.seg_bytes);
        (u64::from(self.q.size()) / per_request).min(MAX_DEPTH as u64) as usize
    }

    /// Offers request `kind` at `sector` with `data` in slot `slot` (not notified yet).
    fn submit(&mut self, slot: usize, kind: u32, sector: u64, data: Option<Region>) {
        let hdr = SLOT_BYTES * slot as u64;
        self.hdrs.write::<u32>(hdr, kind);
        self.hdrs.write::<u32>(hdr + 4, 0);
        self.hdrs.write::<u64>(hdr + 8, sector);
        self.hdrs.write::<u8>(hdr + 16, S_UNSET);
        let mut bufs = [Buf::of(&self.hdrs, false); MAX_SEGMENTS + 2];
        bufs[0] = Buf::of(&self.hdrs.sub(hdr, 16).expect("slot header"), false);
        let mut n = 1;
        if let Some(data) = data {
            let device_writes = kind != T_OUT;
            let mut off = 0;
            while off < data.len() {
                let len = (data.len() - off).min(self.seg_bytes);
                if n > self.seg_max as usize {
                    fail(|w| {
                        w.str("a request of ")
                            .dec(data.len())
                            .str(" bytes needs more than SEG_MAX=")
                            .dec(self.seg_max)
                            .str(" segments");
                    });
                }
                let seg = data.sub(off, len).expect("segment inside the data");
                bufs[n] = Buf::of(&seg, device_writes);
                n += 1;
                off += len;
            }
        }
        bufs[n] = Buf::of(&self.hdrs.sub(hdr + 16, 1).expect("slot status"), true);
        let Some(head) = self.q.add(&bufs[..=n]) else {
            fail(|w| {
                w.str("virtqueue full (")
                    .dec(n as u64 + 1)
                    .str(" descriptors)");
            })
        };
        self.slot_of[usize::from(head)] = slot as u8;
        self.what[slot] = (kind, sector);
    }

    /// Waits for the next completion and returns its head descriptor.
    fn wait_head(&mut self) -> u16 {
        match self.q.wait(Deadline::after_ms(REQUEST_TIMEOUT_MS)) {
            Some((head, _)) => head,
            None => self.dev.fail_timeout("a virtio-blk request"),
        }
    }

    /// Slot and status of the completed request whose chain started at `head`.
    fn finished(&self, head: u16) -> (usize, u8) {
        let slot = usize::from(self.slot_of[usize::from(head)]);
        (slot, self.hdrs.read::<u8>(SLOT_BYTES * slot as u64 + 16))
    }

    /// Runs one request in slot 0 and returns its status.
    pub(super) fn one(&mut self, kind: u32, sector: u64, data: Option<Region>) -> u8 {
        self.submit(0, kind, sector, data);
        self.q.kick();
        let head = self.wait_head();
        self.finished(head).1
    }

    /// Runs one request in slot 0 and returns its status, waiting up to `timeout_ms` and
    /// failing at once when the device reports DEVICE_NEEDS_RESET.
    fn one_watched(&mut self, kind: u32, sector: u64, data: Option<Region>, timeout_ms: u64) -> u8 {
        self.submit(0, kind, sector, data);
        self.q.kick();
        let deadline = Deadline::after_ms(timeout_ms);
        loop {
            if let Some((head, _)) = self.q.wait(Deadline::after_ms(STATUS_POLL_MS)) {
                return self.finished(head).1;
            }
            if self.dev.needs_reset() || deadline.passed() {
                self.dev.fail_timeout("a virtio-blk request");
            }
        }
    }

    pub(super) fn fail_status(&self, slot: usize, status: u8) -> ! {
        let (kind, sector) = self.what[slot];
        fail(|w| {
            w.str("request type ")
                .dec(kind.into())
                .str(" at sector ")
                .dec(sector)
                .str(" completed with status ")
                .dec(status.into());
        })
    }

    /// Transfers `bytes` from sector `first` on in `request`-byte requests (`kind` is T_IN or
    /// T_OUT), keeping up to `depth` in flight. `buffer(k, slot)` is the memory for request `k`.
    fn stream(
        &mut self,
        kind: u32,
        first: u64,
        bytes: u64,
        request: u64,
        depth: usize,
        buffer: impl Fn(u64, usize) -> Region,
    ) {
        let count = bytes.div_ceil(request);
        let (mut next, mut done) = (0u64, 0u64);
        let mut busy = [false; MAX_DEPTH];
        while done < count {
            let mut added = false;
            while next < count {
                let Some(slot) = busy[..depth].iter().position(|b| !b) else {
                    break;
                };
                let len = request.min(bytes - next * request);
                let data = buffer(next, slot).sub(0, len).expect("request buffer");
                self.submit(slot, kind, first + next * request / SECTOR, Some(data));
                busy[slot] = true;
                next += 1;
                added = true;
            }
            if added {
                self.q.kick();
            }
            // Wait for one completion, then take every other one already there, so that the
            // refill above offers several requests for one notification.
            let mut head = self.wait_head();
            loop {
                let (slot, status) = self.finished(head);
                if status != S_OK {
                    self.fail_status(slot, status);
                }
                busy[slot] = false;
                done += 1;
                match self.q.pop_used() {
                    Some((next_head, _)) => head = next_head,
                    None => break,
                }
            }
        }
    }

    /// FLUSH, if the device offers it (without it, completed writes are already durable).
    pub(super) fn flush(&mut self) {
        if self.dev.features & F_FLUSH != 0 {
            let status = self.one(T_FLUSH, 0, None);
            if status != S_OK {
                self.fail_status(0, status);
            }
        }
    }

    /// Prints the capacity line with the GET_ID string.
    fn print_identity(&mut self) {
        let id = dma::alloc(ID_LEN);
        let status = self.one(T_GET_ID, 0, Some(id.sub(0, ID_LEN).expect("id buffer")));
        if status != S_OK {
            self.fail_status(0, status);
        }
        let mut w = serial::line();
        w.str("testguest: virtio-blk capacity=")
            .dec(self.capacity)
            .str(" id=");
        for off in 0..ID_LEN {
            match id.read::<u8>(off) {
                0 => break,
                b @ 0x21..=0x7e => w.bytes(&[b]),
                _ => w.str("?"),
            };
        }
        w.str("\n");
    }

    pub(super) fn need_sectors(&self, sectors: u64) {
        if self.capacity < sectors {
            fail(|w| {
                w.str("disk has ")
                    .dec(self.capacity)
                    .str(" sectors, need ")
                    .dec(sectors);
            });
        }
    }
}

/// The `virtio-blk` scenario.
pub fn run(info: &BootInfo) {
    let mut blk = Blk::open(info);
    blk.print_identity();
    if blk.readonly() {
        let sector = dma::alloc(SECTOR).sub(0, SECTOR);
        let status = blk.one(T_OUT, 0, sector);
        if status != S_IOERR {
            fail(|w| {
                w.str("write to a read-only disk completed with status ")
                    .dec(status.into())
                    .str(", want 1 (IOERR)");
            });
        }
        serial::line().str("testguest: virtio-blk readonly ok\n");
        return;
    }
    blk.need_sectors(TEST_SECTORS);
    let bytes = TEST_SECTORS * SECTOR;
    let depth = blk.depth(TEST_REQUEST).max(1);
    let out = dma::alloc(bytes);
    out.fill_words(|off| off ^ PATTERN);
    let slice = |r: Region| move |k: u64, _| r.sub(k * TEST_REQUEST, TEST_REQUEST).expect("data");
    blk.stream(T_OUT, 0, bytes, TEST_REQUEST, depth, slice(out));
    blk.flush();
    let back = dma::alloc(bytes);
    back.fill_words(|_| POISON);
    blk.stream(T_IN, 0, bytes, TEST_REQUEST, depth, slice(back));
    for off in (0..bytes).step_by(8) {
        let got = back.read::<u64>(off);
        if got != off ^ PATTERN {
            fail(|w| {
                w.str("read back ")
                    .hex(got)
                    .str(" at disk offset ")
                    .hex(off)
                    .str(", wrote ")
                    .hex(off ^ PATTERN);
            });
        }
    }
    serial::line()
        .str("testguest: virtio-blk ok written=")
        .dec(bytes)
        .str("\n");
}

/// The `blkbench=<MiB>` scenario.
pub fn bench(info: &BootInfo, mib: u64) {
    let mut blk = Blk::open(info);
    if blk.readonly() {
        fail(|w| {
            w.str("the disk is read-only");
        });
    }
    let bytes = mib << 20;
    blk.need_sectors(bytes / SECTOR);
    let depth = blk.depth(BENCH_REQUEST);
    if depth == 0 {
        fail(|w| {
            w.str("a 512 KiB request does not fit in the virtqueue");
        });
    }
    let buffers = dma::alloc(BENCH_REQUEST * depth as u64);
    buffers.fill_words(|off| off ^ PATTERN);
    let slot_buffer = |_, slot: usize| {
        buffers
            .sub(slot as u64 * BENCH_REQUEST, BENCH_REQUEST)
            .expect("slot")
    };
    let khz = tsc::khz();
    for (kind, name) in [(T_OUT, "write"), (T_IN, "read")] {
        let start = tsc::now();
        blk.stream(kind, 0, bytes, BENCH_REQUEST, depth, slot_buffer);
        let cycles = tsc::now() - start;
        serial::line()
            .str("testguest: blkbench ")
            .str(name)
            .str(" bytes=")
            .dec(bytes)
            .str(" cycles=")
            .dec(cycles)
            .str(" tsc_khz=")
            .dec(khz)
            .str("\n");
        if kind == T_OUT {
            // Outside the timed phase: the data reaches stable storage before the reads.
            blk.flush();
        }
    }
}

/// The data pattern of `blkloop` round `round`: every u64 at byte offset o holds o ^ this.
pub fn loop_pattern(round: u64) -> u64 {
    PATTERN ^ round.wrapping_mul(0x0100_0000_0000_0001)
}

/// The `blkloop=<rounds>` scenario: per round, write `LOOP_BYTES` of the round's pattern at
/// sector 0, flush, read back and check, print `testguest: blkloop round=R ok`, then wait
/// `LOOP_PAUSE_MS` (a CPL3 TSC wait). Finally `testguest: blkloop ok rounds=N`.
pub fn loop_rounds(info: &BootInfo, rounds: u64) {
    let mut blk = Blk::open(info);
    if blk.readonly() {
        fail(|w| {
            w.str("the disk is read-only");
        });
    }
    blk.need_sectors(LOOP_BYTES / SECTOR);
    let out = dma::alloc(LOOP_BYTES);
    let back = dma::alloc(LOOP_BYTES);
    for round in 1..=rounds {
        let pattern = loop_pattern(round);
        out.fill_words(|off| off ^ pattern);
        back.fill_words(|_| POISON);
        for (kind, data) in [(T_OUT, Some(out)), (T_FLUSH, None), (T_IN, Some(back))] {
            if kind == T_FLUSH && blk.dev.features & F_FLUSH == 0 {
                continue;
            }
            let status = blk.one_watched(kind, 0, data, LOOP_REQUEST_TIMEOUT_MS);
            if status != S_OK {
                blk.fail_status(0, status);
            }
        }
        for off in (0..LOOP_BYTES).step_by(8) {
            let got = back.read::<u64>(off);
            if got != off ^ pattern {
                fail(|w| {
                    w.str("round ")
                        .dec(round)
                        .str(": read back ")
                        .hex(got)
                        .str(" at disk offset ")
                        .hex(off)
                        .str(", wrote ")
                        .hex(off ^ pattern);
                });
            }
        }
        serial::line()
            .str("testguest: blkloop round=")
            .dec(round)
            .str(" ok\n");
        let pause = Deadline::after_ms(LOOP_PAUSE_MS);
        while !pause.passed() {
            core::hint::spin_loop();
        }
    }
    serial::line()
        .str("testguest: blkloop ok rounds=")
        .dec(rounds)
        .str("\n");
}
