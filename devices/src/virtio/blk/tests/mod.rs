//! virtio-blk tests without KVM: a driver-side mock queue (`test_support`), a temporary disk
//! file, and the queue handler driven directly (`requests`, `bad_chains`) or through the
//! `VirtioDevice` interface and a hand-turned event loop (`device`).

#![allow(clippy::unwrap_used)]

mod bad_chains;
mod device;
pub(crate) mod driver;
mod requests;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::disk::{DiskConfig, DiskImage, IoEngineKind};
use super::engine::{probe_uring, IoEngine};
use super::queue_handler::BlkQueueHandler;
use crate::guest_memory::TrackedGuestMemory;
use crate::virtio::test_support::{guest_memory, Buf, RecordingSignals};
use driver::Driver;

pub(super) const RAM: usize = 16 << 20;
pub(super) const RINGS: u64 = 0;
pub(super) const QSIZE: u16 = 16;
/// Guest addresses of a request's parts.
pub(super) const HDR: u64 = 0x10_0000;
pub(super) const STATUS: u64 = 0x1f_0000;
pub(super) const DATA: u64 = 0x20_0000;
pub(super) const DATA2: u64 = 0x40_0000;

pub(super) const T_IN: u32 = 0;
pub(super) const T_OUT: u32 = 1;
pub(super) const T_FLUSH: u32 = 4;
pub(super) const T_GET_ID: u32 = 8;
pub(super) const T_DISCARD: u32 = 11;
pub(super) const T_WRITE_ZEROES: u32 = 13;

pub(super) const S_OK: u8 = 0;
pub(super) const S_IOERR: u8 = 1;
pub(super) const S_UNSUPP: u8 = 2;
/// Left in the status byte before a request, to see whether the device wrote it.
pub(super) const S_UNTOUCHED: u8 = 0xee;

pub(super) const ENGINES: [IoEngineKind; 2] = [IoEngineKind::IoUring, IoEngineKind::Threads];

/// A disk file filled with a known pattern: byte `i` is `i * 7 % 251`.
pub(super) fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// The handler on one queue of a temporary disk, and the driver's side of that queue.
pub(super) struct Rig<'a> {
    pub mem: &'a TrackedGuestMemory,
    pub driver: Driver<'a>,
    pub handler: BlkQueueHandler,
    pub signals: Arc<RecordingSignals>,
    pub file: tempfile::NamedTempFile,
}

impl<'a> Rig<'a> {
    /// A writable 1 MiB disk holding `pattern`.
    pub fn new(mem: &'a TrackedGuestMemory, engine: IoEngineKind) -> Self {
        Self::with(mem, engine, QSIZE, |_| {})
    }

    pub fn with(
        mem: &'a TrackedGuestMemory,
        engine: IoEngineKind,
        qsize: u16,
        tweak: impl FnOnce(&mut DiskConfig),
    ) -> Self {
        Self::build(mem, engine, qsize, false, tweak)
    }

    pub fn build(
        mem: &'a TrackedGuestMemory,
        engine: IoEngineKind,
        qsize: u16,
        event_idx: bool,
        tweak: impl FnOnce(&mut DiskConfig),
    ) -> Self {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&pattern(1 << 20)).unwrap();
        let mut cfg = DiskConfig::new(file.path());
        tweak(&mut cfg);
        let disk = Arc::new(DiskImage::open(&cfg).unwrap());
        let kind = match engine {
            IoEngineKind::IoUring if probe_uring().is_err() => IoEngineKind::Threads,
            k => k,
        };
        let engine = IoEngine::start(kind, disk.file().clone()).unwrap();
        let driver = Driver::new(mem, RINGS, qsize);
        let (mut queue, _kick) = driver.activated(0);
        queue.queue.set_event_idx(event_idx);
        let signals = Arc::new(RecordingSignals::default());
        let handler = BlkQueueHandler::new(
            mem.clone(),
            vec![queue],
            disk,
            engine,
            signals.clone(),
            Arc::new(AtomicBool::new(false)),
        );
        Self {
            mem,
            driver,
            handler,
            signals,
            file,
        }
    }

    /// Writes a request header at `addr`.
    pub fn header(&self, addr: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(addr)).unwrap();
    }

    /// Offers a chain and kicks the queue; returns the head index.
    pub fn offer(&mut self, bufs: &[Buf]) -> u16 {
        self.mem
            .write_obj(S_UNTOUCHED, GuestAddress(STATUS))
            .unwrap();
        let head = self.driver.add_chain(bufs);
        self.kick();
        head
    }

    pub fn kick(&mut self) {
        self.handler.handle_kick(0);
        self.handler.signal_used();
    }

    /// Runs completions until nothing is in flight; returns the used entries.
    pub fn finish(&mut self) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        self.handler.handle_completions();
        while self.handler.in_flight() > 0 && Instant::now() < deadline {
            let mut pfd = libc::pollfd {
                fd: self.handler.completion_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd on the stack.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            self.handler.handle_completions();
            self.handler.signal_used();
        }
        assert_eq!(self.handler.in_flight(), 0, "requests stuck in the engine");
        self.driver.take_used()
    }

    /// Header, then `bufs`, then the status byte: offered, run, and answered.
    /// Returns the status byte and the used entries.
    pub fn request(&mut self, kind: u32, sector: u64, bufs: &[Buf]) -> (u8, Vec<(u16, u32)>) {
        self.header(HDR, kind, sector);
        let mut chain = vec![(HDR, 16, false)];
        chain.extend_from_slice(bufs);
        chain.push((STATUS, 1, true));
        self.offer(&chain);
        let used = self.finish();
        (self.status(), used)
    }

    pub fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    pub fn read_guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    pub fn file_contents(&self) -> Vec<u8> {
        let mut f = self.file.reopen().unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut v = Vec::new();
        f.read_to_end(&mut v).unwrap();
        v
    }
}

/// Fresh guest memory for a rig.
pub(super) fn memory() -> TrackedGuestMemory {
    guest_memory(RAM)
}
