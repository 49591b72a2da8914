//! The worker-pool engine: a few threads take operations from a shared queue, run them with
//! blocking `preadv`/`pwritev`/`fdatasync`/`fallocate` straight into guest memory, and post
//! completions behind an eventfd. Used where io_uring is missing or disabled.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{syscall, Completion, EngineError, Next, PendingOp};

/// Worker threads per disk: enough to keep several large requests moving on a small host.
const WORKERS: usize = 4;

#[derive(Debug, Default)]
struct Jobs {
    queue: VecDeque<PendingOp>,
    shutdown: bool,
}

#[derive(Debug)]
struct Shared {
    file: Arc<File>,
    jobs: Mutex<Jobs>,
    wake: Condvar,
    done: Mutex<Vec<Completion>>,
    done_fd: EventFd,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Threads running blocking file I/O.
#[derive(Debug)]
pub struct WorkerPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    in_flight: usize,
}

impl WorkerPool {
    /// Starts the workers.
    pub fn new(file: Arc<File>) -> Result<Self, EngineError> {
        let done_fd = EventFd::new(EFD_NONBLOCK).map_err(EngineError::EventFd)?;
        let shared = Arc::new(Shared {
            file,
            jobs: Mutex::new(Jobs::default()),
            wake: Condvar::new(),
            done: Mutex::new(Vec::new()),
            done_fd,
        });
        let mut pool = Self {
            shared,
            workers: Vec::with_capacity(WORKERS),
            in_flight: 0,
        };
        for i in 0..WORKERS {
            let shared = pool.shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("skiff-blk-io{i}"))
                .spawn(move || {
                    crate::thread_kind::enter(crate::thread_kind::ThreadKind::DiskWorker);
                    worker(&shared)
                })
                .map_err(EngineError::Thread)?;
            pool.workers.push(handle);
        }
        Ok(pool)
    }

    pub fn completion_fd(&self) -> &EventFd {
        &self.shared.done_fd
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub(super) fn submit(&mut self, op: PendingOp) {
        lock(&self.shared.jobs).queue.push_back(op);
        self.in_flight += 1;
        self.shared.wake.notify_one();
    }

    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        // Clear the counter first: a completion posted after the swap below signals again.
        let _ = self.shared.done_fd.read();
        let mut done = lock(&self.shared.done);
        self.in_flight = self.in_flight.saturating_sub(done.len());
        out.append(&mut done);
    }

    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        let cancelled: Vec<PendingOp> = lock(&self.shared.jobs).queue.drain(..).collect();
        self.in_flight = self.in_flight.saturating_sub(cancelled.len());
        out.extend(cancelled.into_iter().map(|p| Completion {
            tag: p.tag,
            result: Err(libc::ECANCELED),
        }));
        self.reap(out);
        while self.in_flight > 0 {
            wait_readable(&self.shared.done_fd);
            self.reap(out);
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        let mut discard = Vec::new();
        self.drain(&mut discard);
        lock(&self.shared.jobs).shutdown = true;
        self.shared.wake.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(shared: &Shared) {
    let fd = shared.file.as_raw_fd();
    loop {
        let mut op = {
            let mut jobs = lock(&shared.jobs);
            loop {
                if let Some(op) = jobs.queue.pop_front() {
                    break op;
                }
                if jobs.shutdown {
                    return;
                }
                jobs = shared
                    .wake
                    .wait(jobs)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        let result = loop {
            match op.advance(syscall(fd, &op.op)) {
                Next::Done(r) => break r,
                Next::Again => {}
            }
        };
        lock(&shared.done).push(Completion {
            tag: op.tag,
            result,
        });
        if let Err(e) = shared.done_fd.write(1) {
            // Cannot happen short of 2^64 pending writes; the drain loop polls anyway.
            log::error!("virtio-blk worker: cannot signal a completion: {e}");
        }
    }
}

/// Waits (with a timeout, so a lost wake-up only costs time) until `fd` is readable.
fn wait_readable(fd: &EventFd) {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one pollfd that lives on this stack frame for the whole call.
    unsafe { libc::poll(&mut pfd, 1, 50) };
}
