//! virtio 1.x devices over PCI.
//!
//! `device` is the seam between the PCI transport and each device model: the transport owns
//! feature negotiation, queue set-up, status and interrupts; a device owns its configuration space
//! and what it does with its queues once activated. Each device is a folder (`blk/`, `net/`, ...)
//! split by job: `device.rs` (config, features, activation), an `event-manager` subscriber that
//! knows which queue kicked, the request parsing, testable without KVM, and `persist.rs`, what a
//! snapshot keeps of the device (`crate::persist::Persist`).

pub mod blk;
pub mod console;
pub mod device;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod net;
pub mod queue_ops;
pub mod rng;
pub mod subscription;
#[cfg(test)]
pub(crate) mod test_support;
pub mod transport;
pub mod vsock;

pub use device::{
    ActivateContext, ActivateError, ActivatedQueue, AsAny, DeviceDirtyLog, DeviceSignals,
    DirtyLogError, EventLoop, QueueProgress, VirtioDevice,
};
