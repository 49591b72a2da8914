//! The block I/O engine: runs file operations off the event loop and reports completions through
//! an eventfd the queue handler watches.
//!
//! Two back-ends share one interface: `uring` (io_uring, where the host kernel has it) and
//! `pool` (a few threads doing `preadv`/`pwritev`). An operation (`IoOp`) is one file access;
//! the engine retries short transfers and interrupted calls itself, so a completion is either the
//! whole operation or an error number. What an operation means for the guest (status byte, used
//! ring, dirty bitmap) is the queue handler's business, not the engine's. `uring::goes_async`
//! says which operations run inline and which on io_uring's workers, and why.
//!
//! Memory safety rests on one rule the caller keeps: the guest memory an `IoVecs` points into
//! stays mapped until the engine has reported that operation complete (or `drain` has returned).
//! The queue handler holds the VM's `TrackedGuestMemory` for as long as it owns an engine, and the
//! engine drains itself on drop.

mod pool;
mod uring;

use std::fs::File;
use std::io;
use std::sync::Arc;

use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use super::disk::IoEngineKind;
use pool::WorkerPool;
use uring::UringEngine;

/// Operations the queue handler keeps in flight before it stops taking new requests.
pub const MAX_IN_FLIGHT: usize = 256;

/// Most iovecs one `preadv`/`pwritev` takes (`UIO_MAXIOV`); longer lists go in several calls.
const IOV_MAX: usize = 1024;

/// Stalled retries (EINTR, EAGAIN, zero progress) before an operation fails with EIO.
const MAX_STALLS: u8 = 16;

/// Why an engine could not start.
#[derive(Debug, Error)]
pub enum EngineError {
    /// `io_uring_setup` failed (kernel without io_uring, or disabled by sysctl/seccomp).
    #[error("io_uring is not available")]
    UringUnavailable(#[source] io::Error),
    /// The kernel's io_uring lacks an operation the engine needs.
    #[error("io_uring lacks the {0} operation")]
    UringOpMissing(&'static str),
    /// The completion eventfd could not be created or registered.
    #[error("cannot set up the completion eventfd")]
    EventFd(#[source] io::Error),
    /// A worker thread could not be spawned.
    #[error("cannot start an I/O worker thread")]
    Thread(#[source] io::Error),
}

/// A list of host buffers (pointers into guest memory) consumed front to back.
#[derive(Debug)]
pub struct IoVecs {
    iov: Vec<libc::iovec>,
    start: usize,
}

// SAFETY: the iovecs point into guest memory, which is MAP_SHARED, stays mapped while the
// operation is in flight (see the module comment), and is accessed by the guest concurrently
// anyway; handing the pointer list to another thread adds no aliasing the guest can't cause.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// Wraps `iov` (each entry must point into memory that outlives the operation).
    pub fn new(iov: Vec<libc::iovec>) -> Self {
        let mut v = Self { iov, start: 0 };
        v.advance(0);
        v
    }

    /// Bytes left to transfer (the tests follow short transfers with it, the fuzzing seam
    /// checks planned transfers with it).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn remaining_len(&self) -> usize {
        self.iov[self.start..].iter().map(|v| v.iov_len).sum()
    }

    /// Whether everything was transferred.
    pub fn is_empty(&self) -> bool {
        self.start >= self.iov.len()
    }

    /// The next batch for one system call: pointer and count (at most `IOV_MAX`).
    fn batch(&self) -> (*const libc::iovec, usize) {
        let rest = &self.iov[self.start..];
        (rest.as_ptr(), rest.len().min(IOV_MAX))
    }

    /// Marks `n` bytes as transferred, dropping finished entries (and empty ones).
    fn advance(&mut self, mut n: usize) {
        while let Some(cur) = self.iov.get_mut(self.start) {
            if n >= cur.iov_len {
                n -= cur.iov_len;
                self.start += 1;
                continue;
            }
            if n > 0 {
                cur.iov_base = cur.iov_base.cast::<u8>().wrapping_add(n).cast();
                cur.iov_len -= n;
            }
            break;
        }
    }
}

/// What to do when the file system does not support a `fallocate` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsupported {
    /// Report success (a discard is only a hint).
    Succeed,
    /// Try this mode instead (once).
    TryMode(i32),
    /// Report the error.
    Fail,
}

/// One file operation.
#[derive(Debug)]
pub enum IoOp {
    /// Read from the file at `offset` into the buffers.
    Read {
        /// File offset.
        offset: u64,
        /// Destination buffers.
        iov: IoVecs,
    },
    /// Write the buffers to the file at `offset`.
    Write {
        /// File offset.
        offset: u64,
        /// Source buffers.
        iov: IoVecs,
    },
    /// `fdatasync`.
    Flush,
    /// `fallocate(mode, offset, len)` (hole punching and zeroing).
    Fallocate {
        /// File offset.
        offset: u64,
        /// Byte count.
        len: u64,
        /// `FALLOC_FL_*` flags.
        mode: i32,
        /// What to do on EOPNOTSUPP.
        unsupported: Unsupported,
    },
}

/// A finished operation: the caller's tag and success or an errno value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The tag given to `submit`.
    pub tag: u64,
    /// `Ok`, or the error number.
    pub result: Result<(), i32>,
}

/// What follows one system call's result.
enum Next {
    Done(Result<(), i32>),
    Again,
}

/// An operation with its progress, as both back-ends track it.
#[derive(Debug)]
struct PendingOp {
    tag: u64,
    op: IoOp,
    stalls: u8,
}

impl PendingOp {
    fn new(tag: u64, op: IoOp) -> Self {
        Self { tag, op, stalls: 0 }
    }

    /// Folds one system call's result (bytes or `-errno`) into the operation.
    fn advance(&mut self, res: i64) -> Next {
        if res < 0 {
            let errno = i32::try_from(-res).unwrap_or(libc::EIO);
            if let IoOp::Fallocate {
                mode, unsupported, ..
            } = &mut self.op
            {
                if errno == libc::EOPNOTSUPP {
                    return match *unsupported {
                        Unsupported::Succeed => Next::Done(Ok(())),
                        Unsupported::TryMode(m) => {
                            *mode = m;
                            *unsupported = Unsupported::Fail;
                            Next::Again
                        }
                        Unsupported::Fail => Next::Done(Err(errno)),
                    };
                }
            }
            if errno == libc::EINTR || errno == libc::EAGAIN {
                return self.stall();
            }
            return Next::Done(Err(errno));
        }
        match &mut self.op {
            IoOp::Read { offset, iov } | IoOp::Write { offset, iov } => {
                if iov.is_empty() {
                    return Next::Done(Ok(()));
                }
                if res == 0 {
                    // End of file or no progress: the file shrank under us.
                    return self.stall();
                }
                let n = usize::try_from(res).unwrap_or(usize::MAX);
                iov.advance(n);
                *offset = offset.saturating_add(res.unsigned_abs());
                if iov.is_empty() {
                    Next::Done(Ok(()))
                } else {
                    Next::Again
                }
            }
            IoOp::Flush | IoOp::Fallocate { .. } => Next::Done(Ok(())),
        }
    }

    fn stall(&mut self) -> Next {
        self.stalls += 1;
        if self.stalls >= MAX_STALLS {
            Next::Done(Err(libc::EIO))
        } else {
            Next::Again
        }
    }
}

/// Offsets beyond `i64::MAX` cannot reach the kernel; the request parser never produces them.
fn file_offset(offset: u64) -> Result<i64, i32> {
    i64::try_from(offset).map_err(|_| libc::EINVAL)
}

/// Checks that io_uring works here with every operation the engine uses.
pub fn probe_uring() -> Result<(), EngineError> {
    uring::probe()
}

/// The engine a device runs its I/O on.
#[derive(Debug)]
pub enum IoEngine {
    /// io_uring (boxed: its ring state is large).
    Uring(Box<UringEngine>),
    /// Worker threads.
    Threads(WorkerPool),
}

impl IoEngine {
    /// Starts an engine of `kind` on `file` (`Auto` must have been resolved by the caller; it
    /// means io_uring here).
    pub fn start(kind: IoEngineKind, file: Arc<File>) -> Result<Self, EngineError> {
        match kind {
            IoEngineKind::Auto | IoEngineKind::IoUring => {
                Ok(Self::Uring(Box::new(UringEngine::new(file)?)))
            }
            IoEngineKind::Threads => Ok(Self::Threads(WorkerPool::new(file)?)),
        }
    }

    /// A short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Uring(_) => "io_uring",
            Self::Threads(_) => "threads",
        }
    }

    /// Signalled when completions are ready for `reap`.
    pub fn completion_fd(&self) -> &EventFd {
        match self {
            Self::Uring(e) => e.completion_fd(),
            Self::Threads(e) => e.completion_fd(),
        }
    }

    /// Queues an operation; `commit` starts everything queued.
    pub fn submit(&mut self, tag: u64, op: IoOp) {
        match self {
            Self::Uring(e) => e.submit(PendingOp::new(tag, op)),
            Self::Threads(e) => e.submit(PendingOp::new(tag, op)),
        }
    }

    /// Hands queued operations to the kernel or the workers.
    pub fn commit(&mut self) {
        match self {
            Self::Uring(e) => e.commit(),
            Self::Threads(_) => {}
        }
    }

    /// Moves the operations that finished during `submit` (writes done inline) to `out`: no
    /// system call, so cheap enough after every request.
    pub fn reap_inline(&mut self, out: &mut Vec<Completion>) {
        match self {
            Self::Uring(e) => e.reap_inline(out),
            Self::Threads(_) => {}
        }
    }

    /// Moves finished operations to `out` without blocking.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        match self {
            Self::Uring(e) => e.reap(out),
            Self::Threads(e) => e.reap(out),
        }
    }

    /// Blocks until at least one operation completed (returns at once when none is in flight),
    /// moving finished operations to `out`. For a thread of its own (skiff's vhost-user
    /// backend); a disk thread's loop waits on `completion_fd` instead.
    pub fn wait_some(&mut self, out: &mut Vec<Completion>) {
        match self {
            Self::Uring(e) => e.wait_some(out),
            Self::Threads(e) => {
                let start = out.len();
                e.reap(out);
                while out.len() == start && e.in_flight() > 0 {
                    let mut fd = libc::pollfd {
                        fd: std::os::fd::AsRawFd::as_raw_fd(e.completion_fd()),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: `fd` is one valid pollfd on the stack for the duration of the
                    // call; the timeout bounds the wait should a signal be consumed early.
                    unsafe { libc::poll(&mut fd, 1, 100) };
                    e.reap(out);
                }
            }
        }
    }

    /// Operations submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        match self {
            Self::Uring(e) => e.in_flight(),
            Self::Threads(e) => e.in_flight(),
        }
    }

    /// Blocks until no operation is in flight. Operations not yet started are cancelled
    /// (ECANCELED); all completions go to `out`.
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        match self {
            Self::Uring(e) => e.drain(out),
            Self::Threads(e) => e.drain(out),
        }
    }
}

/// Runs one system call of `op` on `fd`, returning bytes or `-errno` (the worker pool's path;
/// io_uring builds the same calls as SQEs).
fn syscall(fd: i32, op: &IoOp) -> i64 {
    let ret: i64 = match op {
        IoOp::Read { offset, iov } | IoOp::Write { offset, iov } => {
            let off = match file_offset(*offset) {
                Ok(o) => o,
                Err(e) => return -i64::from(e),
            };
            let (ptr, n) = iov.batch();
            // `n` is at most IOV_MAX, so it fits.
            let n = n as i32;
            if matches!(op, IoOp::Read { .. }) {
                // SAFETY: `ptr` points at `n` iovecs owned by `op`; each covers guest memory
                // that stays mapped until this operation completes (module rule).
                (unsafe { libc::preadv(fd, ptr, n, off) }) as i64
            } else {
                // SAFETY: as for preadv; the kernel only reads the buffers.
                (unsafe { libc::pwritev(fd, ptr, n, off) }) as i64
            }
        }
        // SAFETY: fdatasync on a descriptor the engine keeps open; no memory is passed.
        IoOp::Flush => i64::from(unsafe { libc::fdatasync(fd) }),
        IoOp::Fallocate {
            offset, len, mode, ..
        } => {
            let (Ok(off), Ok(len)) = (file_offset(*offset), file_offset(*len)) else {
                return -i64::from(libc::EINVAL);
            };
            // SAFETY: fallocate on a descriptor the engine keeps open; no memory is passed.
            i64::from(unsafe { libc::fallocate(fd, *mode, off, len) })
        }
    };
    if ret < 0 {
        -i64::from(
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    } else {
        ret
    }
}

#[cfg(test)]
mod tests;
