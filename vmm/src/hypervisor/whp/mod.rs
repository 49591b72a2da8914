//! The Windows Hypervisor Platform backend.
//!
//! - `library`: `winhvplatform.dll` and `winhvemulation.dll`, loaded at run time into typed
//!   function pointers, and the check that the platform is present and enabled.
//!
//! What this backend does not have yet (partitions, vCPUs, GPA mapping of `SectionRam`'s views,
//! the run loop) is listed in docs/windows.md.

pub mod library;

pub use library::{WhpLibrary, WhpLoadError};
