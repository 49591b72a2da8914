//! Snapshots: a paused VM saved to a directory, and a VM restored from one.
//!
//! A snapshot directory holds `manifest.json` (`manifest`), `state.bin` with every vCPU's, the
//! VM's and the devices' state (`state_file`), and one memory file per `ShareableRegion`,
//! written sparsely or reflinked (`memory_file`). `writer` writes a directory atomically,
//! `job` runs a write off the event loop and reports it, `restore` checks a directory and builds
//! a VM from it.
//!
//! Not here: pausing the VM and gathering its state (`running_vm.rs`), the control API that asks
//! for a snapshot (`api/`), and live or diff snapshots (not implemented yet).

pub mod job;
pub mod manifest;
pub mod memory_file;
pub mod restore;
pub mod state_file;
pub mod writer;

pub use state_file::{DeviceStates, SnapshotState};
