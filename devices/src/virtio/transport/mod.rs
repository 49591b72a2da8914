//! The virtio 1.x PCI transport (modern, non-transitional): a virtio device model becomes a PCI
//! function with vendor 0x1af4, device 0x1040 + type, revision 1, MSI-X and the virtio
//! capabilities (common, notify, ISR, device and PCI configuration access).
//!
//! - `common_config`: the common configuration structure: status, feature negotiation, queue
//!   set-up and reset, checking every guest value; its saved registers.
//! - `signals`: what device handlers use to interrupt the driver or mark the device broken.
//! - `pci_device`: the PCI function: configuration space, BAR 0 layout and dispatch, activation,
//!   and its snapshot: quiesce, save, restore and re-activation at the saved queue positions.
//! - `activation`: why a function's device could not be activated.
//! - `state`: the saved state of a function and why a saved one is refused.
//!
//! Not provided: the legacy (0.9.5) interface, INTx, packed rings, per-queue reset.

mod activation;
mod common_config;
mod pci_device;
mod signals;
mod state;

#[cfg(test)]
mod tests;

pub use activation::ActivationError;
pub use common_config::{
    CommonConfig, CommonConfigError, CommonConfigState, QueueSetupState, StatusAction,
    COMMON_CONFIG_SIZE,
};

/// "No MSI-X vector" in the vector registers.
pub const NO_VECTOR: u16 = 0xffff;
pub use pci_device::{
    msix_vector_count, TransportError, VirtioPciDevice, VirtioPciResources, MAX_QUEUES,
    NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER, VIRTIO_PCI_BAR_SIZE, VIRTIO_PCI_DEVICE_ID_BASE,
    VIRTIO_PCI_VENDOR_ID,
};
pub use signals::{SignalsState, VirtioPciSignals};
pub use state::{StateError, VirtioPciState};
