//! A halted WHP vCPU: when WHP hands a `hlt` back to skiff, the vCPU thread waits here until
//! skiff requests an interrupt (a device, the IOAPIC or an MSI through `WHvRequestInterrupt`),
//! a pause or stop cancels the run, or a short recheck interval passes. Interrupts WHP raises by
//! itself (its local APIC timer) do not come through skiff, so the wait is bounded and the vCPU
//! runs again after it. A `hlt` with interrupts disabled can only end by NMI or reset: that one
//! ends the VM, as the KVM backend's `Halt` exit does.
//!
//! Platform-neutral; unit-tested on Linux.

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;

/// How long a halted vCPU waits before it runs again when nothing woke it.
pub const HALT_RECHECK: Duration = Duration::from_millis(1);

/// Whether a vCPU halted with `rflags` can be woken by an interrupt.
pub fn wakeable(rflags: u64) -> bool {
    rflags & RFLAGS_IF != 0
}

/// A wake-up flag one halted vCPU waits on.
#[derive(Debug, Default)]
pub struct HaltWake {
    woken: Mutex<bool>,
    changed: Condvar,
}

impl HaltWake {
    /// Wakes the vCPU if it waits, or makes its next wait return at once.
    pub fn notify(&self) {
        *self.woken.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.changed.notify_all();
    }

    /// Waits until `notify` or `timeout`; true when woken. Consumes the wake-up.
    pub fn wait(&self, timeout: Duration) -> bool {
        let guard = self.woken.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut woken, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |w| !*w)
            .unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut *woken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn only_a_halt_with_interrupts_enabled_can_be_woken() {
        assert!(wakeable(0x202));
        assert!(!wakeable(0x002));
    }

    #[test]
    fn a_notify_before_the_wait_is_not_lost_and_is_consumed() {
        let w = HaltWake::default();
        w.notify();
        assert!(w.wait(Duration::from_secs(5)));
        assert!(!w.wait(Duration::from_millis(1)));
    }

    #[test]
    fn a_notify_from_another_thread_ends_the_wait_early() {
        let w = Arc::new(HaltWake::default());
        let start = Instant::now();
        let t = {
            let w = w.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                w.notify();
            })
        };
        assert!(w.wait(Duration::from_secs(10)));
        assert!(start.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
    }

    #[test]
    fn without_a_notify_the_wait_times_out() {
        let w = HaltWake::default();
        let start = Instant::now();
        assert!(!w.wait(Duration::from_millis(10)));
        assert!(start.elapsed() >= Duration::from_millis(10));
    }
}
