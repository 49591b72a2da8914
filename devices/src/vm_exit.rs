//! How devices ask the VM to stop: a shared, first-request-wins record of why the guest ended,
//! plus an eventfd (Unix) that wakes whoever waits for the VM to end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

#[cfg(unix)]
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the guest stopped running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestEnd {
    /// The guest wrote this byte to the debug-exit port.
    DebugExit(u8),
    /// The guest powered itself off (ACPI, or a clean HLT of all vCPUs where applicable).
    PowerOff,
    /// The guest asked for a reset (i8042 pulse, triple-fault-free reboot, KVM system reset).
    Reset,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// The vCPU that faulted.
        vcpu: u32,
    },
    /// The hypervisor could not continue running a vCPU (e.g. KVM emulation failure).
    InternalError {
        /// The vCPU that failed.
        vcpu: u32,
        /// The hypervisor's suberror code.
        suberror: u32,
    },
    /// The VMM gave up waiting (`--timeout`).
    Timeout,
    /// The VMM itself failed while running the guest.
    VmmError,
    /// The host asked skiff to stop with this signal (SIGINT, SIGTERM, SIGHUP).
    HostSignal(i32),
    /// The VMM's control API stopped the guest (shutdown, or a snapshot taken with `stop`).
    Stopped,
}

/// Shared between every device, vCPU and the main thread: records the first `GuestEnd` and
/// signals an eventfd.
#[derive(Debug, Clone)]
pub struct VmExitSignal {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    // Set once `reason` holds a value: lets vCPU loops check for a stop without the lock.
    requested: AtomicBool,
    reason: Mutex<Option<GuestEnd>>,
    #[cfg(unix)]
    event: EventFd,
}

impl VmExitSignal {
    /// Creates a signal (on Unix with a fresh non-blocking eventfd).
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            inner: Arc::new(Inner {
                requested: AtomicBool::new(false),
                reason: Mutex::new(None),
                #[cfg(unix)]
                event: EventFd::new(EFD_NONBLOCK)?,
            }),
        })
    }

    /// Records `end` unless an earlier end was already recorded, and wakes the waiter.
    pub fn request(&self, end: GuestEnd) {
        let mut reason = self
            .inner
            .reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if reason.is_none() {
            *reason = Some(end);
            self.inner.requested.store(true, Ordering::Release);
        }
        // A failed write means the counter is saturated, i.e. the waiter is already signalled.
        #[cfg(unix)]
        let _ = self.inner.event.write(1);
    }

    /// The recorded end, if any.
    pub fn reason(&self) -> Option<GuestEnd> {
        *self
            .inner
            .reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether an end has been requested.
    pub fn is_requested(&self) -> bool {
        self.inner.requested.load(Ordering::Acquire)
    }

    /// The eventfd written on every request, for polling.
    #[cfg(unix)]
    pub fn event(&self) -> &EventFd {
        &self.inner.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins() {
        let s = VmExitSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        s.request(GuestEnd::DebugExit(7));
        s.request(GuestEnd::Reset);
        assert_eq!(s.reason(), Some(GuestEnd::DebugExit(7)));
        #[cfg(unix)]
        assert!(s.event().read().unwrap() >= 1);
    }
}
