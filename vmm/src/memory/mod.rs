//! Guest memory: the `ShareableRegion` list and everything that creates, checks and maps it.
//!
//! - `region`: `ShareableRegion` and `Mappable`, the one description of guest RAM.
//! - `backing`: the file behind RAM (sealed memfd, huge-page memfd, user file).
//! - `validate`: checks on a region list before anything maps it.
//! - `mapped_ram`: RAM as the host mappings registered with the hypervisor, read and written by
//!   guest address (what the WHP instruction emulator reaches).
//! - `section`, `view`, `section_ram` (Windows): RAM as a pagefile-backed or file-backed
//!   section, views of it that unmap on drop, and the regions mapped at their file offsets.
//! - `view_memory`: those views (any `SlotMemory`) as vm-memory's
//!   `GuestMemoryBackend`, which the boot loader writes through on Windows.
//! - `host_mapping`: one region's mapping in this process, kept alive by its handle, whose bytes
//!   snapshot writers hand to the kernel.
//! - `share`: the regions as a vhost-user backend maps them (descriptor, offset, user address).
//! - `slot_memory`: `SlotMemory`, a region's host mapping as a VM's memory slot holds it.
//! - `guest_ram` (this file): lays RAM out around the MMIO hole, creates the backing, validates
//!   and maps every region `MAP_SHARED` into the `vm-memory` view devices use.

pub mod region;

#[cfg(target_os = "linux")]
pub mod backing;
#[cfg(target_os = "linux")]
mod guest_ram;
#[cfg(target_os = "linux")]
mod host_mapping;
mod mapped_ram;
#[cfg(target_os = "linux")]
pub mod share;
pub mod slot_memory;
pub mod validate;

#[cfg(windows)]
pub mod section;
#[cfg(windows)]
mod section_ram;
#[cfg(windows)]
pub mod view;
#[cfg(any(windows, test))]
pub mod view_memory;

#[cfg(target_os = "linux")]
pub use guest_ram::{GuestRam, MemoryConfig, MemoryError};
#[cfg(target_os = "linux")]
pub use host_mapping::RegionMapping;
pub use mapped_ram::MappedRam;
pub use region::{Mappable, ShareableRegion};
#[cfg(windows)]
pub use section_ram::{SectionRam, SectionRamError};
pub use slot_memory::SlotMemory;
