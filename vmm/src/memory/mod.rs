//! Guest memory: the `ShareableRegion` list and everything that creates, checks and maps it.
//!
//! - `region`: `ShareableRegion` and `Mappable`, the one description of guest RAM.
//! - `backing`: the file behind RAM (sealed memfd, huge-page memfd, user file).
//! - `validate`: checks on a region list before anything maps it.
//! - `share`: the regions as a vhost-user backend maps them (descriptor, offset, user address).
//! - `guest_ram` (this file): lays RAM out around the MMIO hole, creates the backing, validates
//!   and maps every region `MAP_SHARED` into the `vm-memory` view devices use.

pub mod region;

#[cfg(target_os = "linux")]
pub mod backing;
#[cfg(target_os = "linux")]
mod guest_ram;
#[cfg(target_os = "linux")]
pub mod share;
#[cfg(target_os = "linux")]
pub mod validate;

#[cfg(target_os = "linux")]
pub use guest_ram::{GuestMemory, GuestRam, MemoryConfig, MemoryError};
pub use region::{Mappable, ShareableRegion};
