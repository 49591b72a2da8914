//! PCI: one segment with one bus (bus 0), as a PCI Express host would present it.
//!
//! - `config_space`: a function's type-0 configuration header, BARs and capability list.
//! - `msix`: MSI-X vector table, PBA, masking and delivery through irqfds.
//! - `bar_allocator`: addresses for BARs from the 32-bit and 64-bit PCI windows.
//! - `bar_mapping`: the BARs' ranges on the MMIO bus and their ioeventfds, moved when the guest
//!   reprograms a BAR or toggles memory decoding.
//! - `host_bridge`: the host bridge function at 00:00.0.
//! - `root`: the devices on bus 0, and configuration access to them through ECAM (MMIO) and the
//!   legacy 0xCF8/0xCFC ports.
//!
//! A function's BARs are placed by the VMM when it builds the VM, with memory decoding on, as
//! firmware would; the guest may size them, move them and turn decoding off and on. Only
//! function 0 of each device exists; INTx is not provided.

pub mod bar_allocator;
// BAR ioeventfds and MSI-X irqfds are eventfd wiring: Unix only (see the crate's header).
#[cfg(unix)]
pub mod bar_mapping;
pub mod config_space;
pub mod host_bridge;
#[cfg(unix)]
pub mod msix;
pub mod root;

use std::sync::{Arc, Mutex};

/// A PCI function's configuration space as the configuration access mechanisms reach it.
///
/// `offset` is below 4096 and `data` is 1, 2 or 4 bytes, naturally aligned: the access
/// mechanisms check both before calling.
pub trait PciDevice: Send {
    /// Reads configuration space at `offset`.
    fn read_config(&mut self, offset: u16, data: &mut [u8]);
    /// Writes configuration space at `offset`.
    fn write_config(&mut self, offset: u16, data: &[u8]);
}

/// A PCI function shared between its configuration access and its BAR on the MMIO bus.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

pub use bar_allocator::{BarAllocError, BarAllocator, BarWindow};
#[cfg(unix)]
pub use bar_mapping::{BarMapError, BarMapping, BarSpace, IoEventRegistry};
pub use config_space::{BarDecode, BarKind, ConfigSpaceError, PciConfigSpace, PciIds};
pub use host_bridge::PciHostBridge;
#[cfg(unix)]
pub use msix::{MsiMessage, MsiRouteUpdater, Msix, MsixError};
pub use root::{PciConfigIo, PciEcam, PciRoot, PciRootError};
