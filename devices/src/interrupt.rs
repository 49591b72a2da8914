//! The seam through which a device raises an interrupt line, whatever the hypervisor.
//!
//! On KVM a line is an eventfd registered as an irqfd, so a write raises the guest interrupt
//! in the kernel without a trip through skiff. A backend without irqfds (the Windows Hypervisor
//! Platform) implements the same trait by asserting the pin on its user-space interrupt
//! controller, which then requests the interrupt from the hypervisor. This module owns only the
//! trait and its eventfd implementation, not the routing of lines to vectors.

use std::fmt::Debug;
use std::io;

/// An interrupt line a device can raise. Edge semantics: each `trigger` is one interrupt
/// request; several requests before the guest takes the first may merge into one.
pub trait InterruptLine: Send + Sync + Debug {
    /// Raises the line. Never blocks.
    fn trigger(&self) -> io::Result<()>;
}

#[cfg(unix)]
impl InterruptLine for vmm_sys_util::eventfd::EventFd {
    fn trigger(&self) -> io::Result<()> {
        match self.write(1) {
            // The counter is saturated: the interrupt is already pending, nothing is lost.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
#[cfg(unix)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn an_eventfd_line_counts_triggers_and_survives_saturation() {
        let line = EventFd::new(EFD_NONBLOCK).unwrap();
        line.trigger().unwrap();
        line.trigger().unwrap();
        assert_eq!(line.read().unwrap(), 2);
        // Fill the counter to its maximum: a further trigger is already pending, not an error.
        line.write(u64::MAX - 1).unwrap();
        line.trigger().unwrap();
        assert_eq!(line.read().unwrap(), u64::MAX - 1);
    }
}
