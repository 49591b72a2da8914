//! The io_uring engine: one ring per activated disk. Operations become SQEs (`READV`, `WRITEV`,
//! `FSYNC` with `DATASYNC`, `FALLOCATE`), submitted in one `io_uring_enter` per batch; the kernel
//! signals a registered eventfd when completions arrive. At most `MAX_IN_FLIGHT` operations are
//! in the ring; more wait in a backlog, so the completion queue (twice that size) never overflows.
//!
//! Writes to a regular file are the exception: they are copied into the page cache by the
//! calling thread (`pwritev`), which is always a disk's own thread, and their completions wait
//! for the next `reap_inline` or `reap`. See `writes_inline`.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring, Probe};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Completion, EngineError, IoOp, Next, PendingOp, MAX_IN_FLIGHT};

/// Submission-queue entries (the completion queue gets twice as many).
const RING_ENTRIES: u32 = MAX_IN_FLIGHT as u32;

/// Whether an operation skips the inline attempt in `io_uring_enter`. Reads and writes are tried
/// inline first, as io_uring does by default: a page-cache hit is copied right there, and only
/// what would block (a cache miss, a page under writeback) goes to io_uring's workers. Flushes
/// and `fallocate` block anyway, so they go to the workers at once. (Forcing large transfers to
/// the workers was measured slower here: with `blkbench`, 512 KiB requests, on 2 cores, reads
/// 6.8 vs 7.8 GB/s and writes 4.1 vs 4.3 GB/s, as each request then costs two thread hand-offs.)
fn goes_async(op: &IoOp) -> bool {
    matches!(op, IoOp::Flush | IoOp::Fallocate { .. })
}

/// Whether writes to `file` skip the ring and run in the calling thread. Most file systems (ext4
/// among them) cannot copy a buffered write into the page cache without possibly blocking, so
/// io_uring hands every such write to one of its workers, one at a time per file; the copy is the
/// same, but each write then costs a wake-up of that worker and another of the disk's thread for
/// its completion, and on a busy host each wake-up preempts the thread that was running (the
/// guest's vCPU, or the worker copying the previous write). Measured with `blkbench` (1 GiB of
/// 512 KiB writes, depth 8, 2 cores): 4.4 GB/s through the ring, 5.5-5.7 GB/s inline, and the
/// disk's thread woke about 70 times instead of 1300. Block devices keep the ring (not measured
/// here; where the kernel can take their writes without blocking, `io_uring_enter` copies them
/// inline anyway, and where it cannot, writes to different blocks still overlap).
fn writes_inline(file: &File) -> bool {
    file.metadata().is_ok_and(|m| m.file_type().is_file())
}

/// Checks that a ring can be created and supports every opcode the engine uses.
pub fn probe() -> Result<(), EngineError> {
    let ring = IoUring::new(4).map_err(EngineError::UringUnavailable)?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(EngineError::UringUnavailable)?;
    for (code, name) in [
        (opcode::Readv::CODE, "READV"),
        (opcode::Writev::CODE, "WRITEV"),
        (opcode::Fsync::CODE, "FSYNC"),
        (opcode::Fallocate::CODE, "FALLOCATE"),
    ] {
        if !probe.is_supported(code) {
            return Err(EngineError::UringOpMissing(name));
        }
    }
    Ok(())
}

/// An io_uring and the operations it is running.
pub struct UringEngine {
    ring: IoUring,
    file: Arc<File>,
    /// Operations in the ring, indexed by their SQE `user_data`.
    slots: Vec<Option<PendingOp>>,
    free: Vec<usize>,
    /// Operations waiting for a free slot.
    backlog: VecDeque<PendingOp>,
    /// SQEs pushed since the last `io_uring_enter`.
    unsubmitted: usize,
    done_fd: EventFd,
    scratch: Vec<(u64, i32)>,
    /// Writes run in the calling thread (`writes_inline`).
    inline_writes: bool,
    /// Completions of inline writes, for the next `reap`.
    inline_done: Vec<Completion>,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("in_flight", &self.in_flight())
            .field("backlog", &self.backlog.len())
            .finish_non_exhaustive()
    }
}

impl UringEngine {
    /// Creates the ring and registers its completion eventfd.
    pub fn new(file: Arc<File>) -> Result<Self, EngineError> {
        let ring = IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 2)
            .build(RING_ENTRIES)
            .map_err(EngineError::UringUnavailable)?;
        let done_fd = EventFd::new(EFD_NONBLOCK).map_err(EngineError::EventFd)?;
        // Signalled for every completion. (`register_eventfd_async`, which skips completions
        // posted during submission, also skips those io_uring posts from task work in the
        // submitting thread, such as a buffered read retried after its page came in: the
        // event loop would never hear of them.)
        ring.submitter()
            .register_eventfd(done_fd.as_raw_fd())
            .map_err(EngineError::EventFd)?;
        let inline_writes = writes_inline(&file);
        Ok(Self {
            ring,
            file,
            slots: (0..MAX_IN_FLIGHT).map(|_| None).collect(),
            free: (0..MAX_IN_FLIGHT).rev().collect(),
            backlog: VecDeque::new(),
            unsubmitted: 0,
            done_fd,
            scratch: Vec::with_capacity(MAX_IN_FLIGHT),
            inline_writes,
            inline_done: Vec::new(),
        })
    }

    /// Sends writes through the ring even on a regular file (tests of the block-device path).
    #[cfg(test)]
    pub(super) fn set_inline_writes(&mut self, inline: bool) {
        self.inline_writes = inline;
    }

    pub fn completion_fd(&self) -> &EventFd {
        &self.done_fd
    }

    pub fn in_flight(&self) -> usize {
        MAX_IN_FLIGHT - self.free.len() + self.backlog.len() + self.inline_done.len()
    }

    pub(super) fn submit(&mut self, op: PendingOp) {
        if self.inline_writes && matches!(op.op, IoOp::Write { .. }) {
            return self.write_inline(op);
        }
        match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some(op);
                self.push_sqe(slot);
            }
            None => self.backlog.push_back(op),
        }
    }

    /// Runs a write in this thread (short writes continue where they stopped, as `reap` does for
    /// the ring's); its completion waits for the next `reap`.
    fn write_inline(&mut self, mut op: PendingOp) {
        loop {
            let res = super::syscall(self.file.as_raw_fd(), &op.op);
            if let Next::Done(result) = op.advance(res) {
                self.inline_done.push(Completion {
                    tag: op.tag,
                    result,
                });
                return;
            }
        }
    }

    /// Builds the SQE for the operation in `slot` and queues it.
    fn push_sqe(&mut self, slot: usize) {
        let fd = types::Fd(self.file.as_raw_fd());
        let Some(p) = &self.slots[slot] else {
            return;
        };
        let entry: squeue::Entry = match &p.op {
            IoOp::Read { offset, iov } => {
                let (ptr, n) = iov.batch();
                // `n` is at most IOV_MAX.
                opcode::Readv::new(fd, ptr, n as u32)
                    .offset(*offset)
                    .build()
            }
            IoOp::Write { offset, iov } => {
                let (ptr, n) = iov.batch();
                opcode::Writev::new(fd, ptr, n as u32)
                    .offset(*offset)
                    .build()
            }
            IoOp::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoOp::Fallocate {
                offset, len, mode, ..
            } => opcode::Fallocate::new(fd, *len)
                .offset(*offset)
                .mode(*mode)
                .build(),
        };
        let mut entry = entry.user_data(slot as u64);
        if goes_async(&p.op) {
            entry = entry.flags(squeue::Flags::ASYNC);
        }
        // SAFETY: the SQE's pointers (the iovec array and the guest buffers it lists) belong
        // to the operation stored in `slots[slot]`, which stays there until its CQE is reaped;
        // the buffers are guest memory kept mapped for at least as long (module rule of
        // `engine`), and `drain` waits for every CQE before the engine goes away.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // The queue is full of SQEs not yet entered (cannot happen: one SQE per slot and as
            // many slots as entries). Enter them and retry once.
            self.commit();
            // SAFETY: as above.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                log::error!("virtio-blk: io_uring submission queue full");
                if let Some(p) = self.slots[slot].take() {
                    self.free.push(slot);
                    self.backlog.push_front(p);
                }
                return;
            }
        }
        self.unsubmitted += 1;
    }

    pub fn commit(&mut self) {
        while self.unsubmitted > 0 {
            match self.ring.submit() {
                // `submit` enters every SQE in the queue.
                Ok(_) => self.unsubmitted = 0,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    // EBUSY/EAGAIN: the SQEs stay queued; the next completion retries.
                    log::debug!("virtio-blk: io_uring_enter: {e}");
                    return;
                }
            }
        }
    }

    /// Moves the completions of writes done inline to `out` (no system call).
    pub fn reap_inline(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.inline_done);
    }

    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.inline_done);
        let _ = self.done_fd.read();
        loop {
            self.scratch.clear();
            self.scratch.extend(
                self.ring
                    .completion()
                    .map(|cqe| (cqe.user_data(), cqe.result())),
            );
            if self.scratch.is_empty() {
                break;
            }
            for i in 0..self.scratch.len() {
                let (slot, res) = self.scratch[i];
                self.complete_slot(slot, res, out);
            }
            self.refill();
            self.commit();
        }
        self.refill();
        self.commit();
    }

    fn complete_slot(&mut self, user_data: u64, res: i32, out: &mut Vec<Completion>) {
        let Ok(slot) = usize::try_from(user_data) else {
            return;
        };
        let Some(Some(p)) = self.slots.get_mut(slot) else {
            log::error!("virtio-blk: io_uring completion for unknown slot {slot}");
            return;
        };
        match p.advance(i64::from(res)) {
            Next::Again => self.push_sqe(slot),
            Next::Done(result) => {
                if let Some(p) = self.slots[slot].take() {
                    out.push(Completion { tag: p.tag, result });
                }
                self.free.push(slot);
            }
        }
    }

    /// Moves backlog operations into free slots.
    fn refill(&mut self) {
        while !self.free.is_empty() {
            let Some(op) = self.backlog.pop_front() else {
                break;
            };
            self.submit(op);
        }
    }

    /// Submits what is queued and blocks in one `io_uring_enter` until a completion arrives
    /// (no eventfd poll and read per completion), unless one is already there.
    pub fn wait_some(&mut self, out: &mut Vec<Completion>) {
        let start = out.len();
        self.reap(out);
        while out.len() == start && self.in_flight() > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => self.unsubmitted = 0,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => {
                    log::error!("virtio-blk: waiting for io_uring completions: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            self.reap(out);
        }
    }

    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.inline_done);
        out.extend(self.backlog.drain(..).map(|p| Completion {
            tag: p.tag,
            result: Err(libc::ECANCELED),
        }));
        self.commit();
        while self.free.len() < MAX_IN_FLIGHT {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() != Some(libc::EINTR) && e.raw_os_error() != Some(libc::EBUSY) {
                    log::error!("virtio-blk: waiting for io_uring completions: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            self.unsubmitted = 0;
            self.reap(out);
            // `reap` resubmits short transfers; nothing new is taken from the (empty) backlog.
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        let mut discard = Vec::new();
        self.drain(&mut discard);
    }
}
