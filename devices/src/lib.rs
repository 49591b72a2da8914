//! skiff's emulated devices.
//!
//! `bus` routes port I/O and MMIO accesses from vCPU exits to devices; `vm_exit` is how a device
//! asks the VM to stop (debug-exit port, i8042 reset); `legacy` holds the PC devices a test or
//! Linux guest expects (16550 serial, i8042, debug-exit); `pci` the PCI host bridge and
//! configuration space; `guest_memory` the one name for guest memory as the VMM and the devices
//! share it; `guest_warnings` the rate limit for warnings a guest causes; `virtio` the virtio 1.x
//! transport and devices; `vhost_user` virtio devices served by another process (the frontend)
//! and skiff's own backends; `interrupt` the seam through which a device raises an interrupt
//! line; `irqchip` the user-space IOAPIC for hypervisors without an in-kernel one; `persist` the
//! trait through which a device's state survives a snapshot; `thread_kind` names the kinds of
//! thread skiff runs and the hook each calls when it starts (the VMM confines it there). Devices
//! never block: a handler runs on a vCPU thread and must return quickly.
//!
//! On Windows only the platform-neutral part builds: the bus, the legacy devices, PCI
//! configuration space, the interrupt seam and the guest memory type. virtio, vhost-user, MSI-X
//! delivery and BAR ioeventfds need eventfds (and virtio-queue needs vm-memory's Unix-only
//! `rawfd`), so they are `cfg(unix)`.

pub mod bus;
#[cfg(unix)]
pub mod file_type;
pub mod guest_memory;
pub mod guest_warnings;
pub mod interrupt;
pub mod irqchip;
pub mod legacy;
pub mod pci;
pub mod persist;
pub mod thread_kind;
#[cfg(unix)]
pub mod vhost_user;
#[cfg(unix)]
pub mod virtio;
pub mod vm_exit;

/// `e` and its sources on one line, `": "`-separated, for log messages (a source whose text
/// the line already ends with is not repeated).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}
