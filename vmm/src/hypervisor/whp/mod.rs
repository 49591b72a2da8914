//! The Windows Hypervisor Platform backend.
//!
//! - `library` (Windows): `winhvplatform.dll` and `winhvemulation.dll`, loaded at run time into
//!   typed function pointers, and the check that the platform is present and enabled.
//! - `cpuid`: the partition's CPUID result and exit lists from skiff's per-vCPU tables, and the
//!   answers to CPUID exits (platform-neutral, unit-tested on Linux).
//!
//! What this backend does not have yet (partitions, vCPUs, GPA mapping of `SectionRam`'s views,
//! the run loop) is listed in docs/windows.md.

pub mod cpuid;
#[cfg(windows)]
pub mod library;

#[cfg(windows)]
pub use library::{WhpLibrary, WhpLoadError};
