//! Why a virtio PCI function's device could not be activated: on the driver's `DRIVER_OK`, on
//! resuming after a snapshot, or on restoring one (`VirtioPciDevice::activate_at`). Not here:
//! the device model's own refusals (`ActivateError`, wrapped as `Device`).

use thiserror::Error;

use crate::virtio::device::ActivateError;

/// Why activation failed.
#[derive(Debug, Error)]
pub enum ActivationError {
    /// An enabled queue's set-up is refused now (the device is marked as needing a reset).
    #[error("virtio {device}: an enabled queue's set-up is refused")]
    QueueRefused {
        /// Device name.
        device: &'static str,
    },
    /// A saved queue position names a queue that is not enabled, or one named twice.
    #[error("virtio {device}: saved position of queue {queue} does not match an enabled queue")]
    Progress {
        /// Device name.
        device: &'static str,
        /// Queue index the position names.
        queue: u16,
    },
    /// A queue's notification eventfd could not be shared with the device model.
    #[error("virtio {device}: cannot share queue {queue}'s eventfd")]
    ShareEventFd {
        /// Device name.
        device: &'static str,
        /// Queue index.
        queue: u16,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The device model refused activation.
    #[error(transparent)]
    Device(#[from] ActivateError),
}
