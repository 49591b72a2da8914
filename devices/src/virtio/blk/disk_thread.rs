//! A disk's own thread: every activated virtio-blk device runs its queue handler on a thread of
//! its own, an `event_manager` loop over the queues' kick eventfds and the I/O engine's
//! completion eventfd, instead of on the VMM's event loop.
//!
//! Why: a guest streaming requests wakes its device once per kick and once per completion.
//! On a thread of its own those wake-ups concern nobody else, and the thread may block in a file
//! operation (the io_uring engine copies buffered writes into the page cache right there, which
//! the kernel may throttle) without holding up the serial port, the network or the control API.
//! Cloud Hypervisor and crosvm give each device a thread for the same reasons; QEMU does with
//! `iothread=`.
//!
//! Stopping is the device's job first (its `stopped` flag, checked under the handler's lock, and
//! the engine drained), then `stop` wakes the thread through an eventfd and joins it, so no run
//! of the handler is left when `reset` returns.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Watches the stop eventfd and tells the loop to end.
struct StopWatch {
    fd: EventFd,
    stopping: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.fd.read();
        self.stopping.store(true, Ordering::Release);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            // Without the watch the loop would never end: end it now instead.
            log::error!("disk thread: cannot watch its stop eventfd: {e:?}");
            self.stopping.store(true, Ordering::Release);
        }
    }
}

/// A running disk thread; `stop` (or drop) ends and joins it.
#[derive(Debug)]
pub(crate) struct DiskThread {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

fn loop_error(e: event_manager::Error) -> io::Error {
    io::Error::other(format!("disk thread event loop: {e:?}"))
}

impl DiskThread {
    /// Starts thread `name` running `handler` (its `init` registers the handler's fds, on the
    /// calling thread, before this returns).
    pub(crate) fn start(name: String, handler: Subscriber) -> io::Result<Self> {
        let mut events: EventManager<Subscriber> = EventManager::new().map_err(loop_error)?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stopping = Arc::new(AtomicBool::new(false));
        events.add_subscriber(Arc::new(Mutex::new(StopWatch {
            fd: stop.try_clone()?,
            stopping: stopping.clone(),
        })));
        events.add_subscriber(handler);
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            crate::thread_kind::enter(crate::thread_kind::ThreadKind::Disk);
            while !stopping.load(Ordering::Acquire) {
                if let Err(e) = events.run() {
                    // epoll_wait failing on a valid epoll fd is a bug, not a condition to
                    // retry; the device stops serving and says why.
                    log::error!("{}", loop_error(e));
                    return;
                }
            }
        })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Ends the thread's loop and waits for it.
    pub(crate) fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if let Err(e) = self.stop.write(1) {
            // Cannot happen for an eventfd below its maximum count; joining would hang.
            log::error!("disk thread: cannot signal it to stop: {e}; leaving it detached");
            return;
        }
        if thread.join().is_err() {
            log::error!("disk thread panicked");
        }
    }
}

impl Drop for DiskThread {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Counts the kicks of one eventfd and reports each, with the thread it ran on.
    struct Counter {
        kick: EventFd,
        seen: mpsc::Sender<String>,
    }

    impl MutEventSubscriber for Counter {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let _ = self.kick.read();
            let name = std::thread::current().name().unwrap_or("").to_string();
            let _ = self.seen.send(name);
        }

        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.kick, EventSet::IN)).unwrap();
        }
    }

    #[test]
    fn the_handler_runs_on_the_named_thread_until_stopped() {
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let handler = Arc::new(Mutex::new(Counter {
            kick: kick.try_clone().unwrap(),
            seen: tx,
        }));
        let thread = DiskThread::start("test-disk".into(), handler).unwrap();
        kick.write(1).unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            "test-disk"
        );
        thread.stop();
        // The loop (and with it the handler) is gone: the channel's sender was dropped.
        kick.write(1).unwrap();
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(mpsc::RecvTimeoutError::Disconnected)
        ));
    }
}
