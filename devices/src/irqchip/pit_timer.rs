//! `PitTimer`: the thread that pulses the PIT's IRQ 0 on time. It sleeps until channel 0's next
//! deadline (`Pit::next_deadline`), or at most `PIT_TIMER_POLL` so that a guest reprogramming
//! the channel to a shorter period is seen soon, then calls `Pit::expire`. Stopped and joined on
//! drop. Only for hypervisors without an in-kernel PIT (WHP); KVM's runs in the kernel.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::pit::{Pit, PitClock};

/// The longest the thread sleeps before it looks at the PIT again.
pub const PIT_TIMER_POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Default)]
struct Stop {
    stopped: Mutex<bool>,
    changed: Condvar,
}

/// The running timer thread.
#[derive(Debug)]
pub struct PitTimer {
    stop: Arc<Stop>,
    thread: Option<JoinHandle<()>>,
}

impl PitTimer {
    /// Starts the thread (named `pit-timer`) for `pit`, whose clock is `clock`.
    pub fn start(pit: Arc<Mutex<Pit>>, clock: Arc<dyn PitClock>) -> std::io::Result<Self> {
        let stop = Arc::new(Stop::default());
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("pit-timer".into())
                .spawn(move || run(&pit, &*clock, &stop))?
        };
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

fn run(pit: &Mutex<Pit>, clock: &dyn PitClock, stop: &Stop) {
    let mut stopped = stop.stopped.lock().unwrap_or_else(PoisonError::into_inner);
    while !*stopped {
        let deadline = {
            let mut pit = pit.lock().unwrap_or_else(PoisonError::into_inner);
            pit.expire();
            pit.next_deadline()
        };
        let wait = deadline.map_or(PIT_TIMER_POLL, |d| {
            Duration::from_nanos(d.saturating_sub(clock.now_ns())).min(PIT_TIMER_POLL)
        });
        stopped = stop
            .changed
            .wait_timeout(stopped, wait)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

impl Drop for PitTimer {
    fn drop(&mut self) {
        *self
            .stop
            .stopped
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
        self.stop.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::InterruptLine;
    use crate::irqchip::pit::HostClock;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    #[derive(Debug, Default)]
    struct Pulses(AtomicUsize);

    impl InterruptLine for Pulses {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn a_periodic_channel_0_pulses_irq0_from_the_thread_until_dropped() {
        let clock: Arc<dyn PitClock> = Arc::new(HostClock::default());
        let pulses = Arc::new(Pulses::default());
        let pit = Arc::new(Mutex::new(Pit::new(clock.clone(), pulses.clone())));
        {
            // Channel 0, mode 2, count 11932: a pulse about every 10 ms.
            let mut p = pit.lock().unwrap();
            for (port, value) in [(0x43, 0x34), (0x40, 0x9c), (0x40, 0x2e)] {
                p.write_port(port, value);
            }
        }
        let timer = PitTimer::start(pit, clock).unwrap();
        let start = Instant::now();
        while pulses.0.load(Ordering::SeqCst) < 3 {
            assert!(start.elapsed() < Duration::from_secs(10), "no IRQ 0 pulses");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(timer);
        let after = pulses.0.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(pulses.0.load(Ordering::SeqCst), after, "pulses after drop");
    }
}
