//! What a snapshot keeps of one virtio PCI function, and why a saved one can be refused.
//!
//! `VirtioPciState` gathers the function's parts, each saved by its owner: the PCI
//! configuration space (`PciConfigSpace::save`: BAR as programmed, so a BAR the guest moved
//! is mapped there again on restore, command register, MSI-X enable and mask), the MSI-X table and PBA (`Msix::save`), the common configuration (feature
//! selects, acked features, status, queue set-up), the signals (vectors, ISR, configuration
//! generation, needs-reset), and, for an active device, each queue's position. What the device
//! behind the function is (a disk, a tap) is its own state (`crate::persist::Persist`), saved
//! beside this by the VMM. The state file is untrusted: `VirtioPciDevice::restore` checks every
//! value against the device rebuilt from its own state and refuses, with a `StateError`,
//! anything a guest could not have produced.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::activation::ActivationError;
use super::common_config::{CommonConfigError, CommonConfigState};
use super::signals::SignalsState;
use crate::pci::config_space::{ConfigSpaceError, ConfigSpaceState};
use crate::pci::msix::{MsixError, MsixState};
use crate::virtio::device::QueueProgress;

/// Everything a snapshot keeps of one virtio PCI function's transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    /// The PCI configuration space.
    pub config: ConfigSpaceState,
    /// MSI-X table and pending bits.
    pub msix: MsixState,
    /// The common configuration.
    pub common: CommonConfigState,
    /// Vectors, ISR, generation, needs-reset.
    pub signals: SignalsState,
    /// For a device the driver activated (`DRIVER_OK`) and that was running: each enabled
    /// queue's position. Empty otherwise.
    pub progress: Vec<QueueProgress>,
}

/// Why a saved virtio PCI function cannot be restored.
#[derive(Debug, Error)]
pub enum StateError {
    /// The saved configuration space is unusable.
    #[error("virtio {device}: saved PCI configuration space")]
    ConfigSpace {
        /// Device name.
        device: &'static str,
        /// Why.
        #[source]
        source: ConfigSpaceError,
    },
    /// The saved MSI-X state is unusable.
    #[error("virtio {device}: saved MSI-X state")]
    Msix {
        /// Device name.
        device: &'static str,
        /// Why.
        #[source]
        source: MsixError,
    },
    /// A saved common-configuration value out of range.
    #[error("virtio {device}: saved state is invalid")]
    CommonConfig {
        /// Device name.
        device: &'static str,
        /// Which value, and why.
        #[source]
        source: Box<CommonConfigError>,
    },
    /// Queue positions saved for a device the driver never activated.
    #[error(
        "virtio {device}: saved state is invalid: queue positions saved for a device the driver never activated"
    )]
    ProgressWithoutDriverOk {
        /// Device name.
        device: &'static str,
    },
    /// Activating the restored device failed.
    #[error("virtio {device}: cannot activate the restored device")]
    Activate {
        /// Device name.
        device: &'static str,
        /// Why.
        #[source]
        source: Box<ActivationError>,
    },
}
