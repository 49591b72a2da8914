//! Snapshots: a paused VM saved to a directory, and a VM restored from one.
//!
//! A snapshot directory holds `manifest.json` (`manifest`), `state.bin` with every vCPU's, the
//! VM's and the devices' state (`state_file`), and one memory file per `ShareableRegion`,
//! written sparsely or reflinked (`memory_file`). `writer` writes a directory atomically,
//! `job` runs a write off the event loop and reports it, `restore` checks a directory and builds
//! a VM from it.
//!
//! `dirty` gathers and writes dirty page sets, `live` copies memory while the guest runs,
//! `chain` resolves a diff's parents and layers their memory files (restore and `merge`, which
//! folds a diff into a full snapshot), `files` holds the file operations every writer shares,
//! `progress` counts a write's bytes for the control API. `integrity` sums each memory file when it is complete and
//! verifies a directory against its manifest; `stale` removes the temporary directories of
//! snapshot writers that were killed; `memory_lock` is the shared lock a copy-on-write restore
//! holds on the files it maps.
//!
//! A snapshot is untrusted input: `dir` opens its files relative to the directory (regular
//! files only, sizes checked before reading), `resources` lists the host resources it names (each a
//! `host_resource::HostResource`),
//! `auth` authenticates it as this user's (HMAC under a per-user key), and `authorize` decides
//! what a restore may open outside the directory (see docs/snapshot-trust.md).
//!
//! Not here: pausing the VM and gathering its state (`running_vm/`), the control API that asks
//! for a snapshot (`api/`).

use std::path::PathBuf;

pub mod auth;
pub mod authorize;
pub mod chain;
pub mod dir;
pub mod dirty;
pub mod files;
pub mod host_resource;
pub mod integrity;
pub mod job;
pub mod live;
pub mod loaded_snapshot;
pub mod manifest;
pub mod memory_file;
pub mod memory_lock;
pub mod merge;
pub mod progress;
pub mod resources;
pub mod restore;
pub mod stale;
pub mod state_file;
pub mod writer;

#[cfg(test)]
mod tests;

pub use state_file::{DeviceStates, SnapshotState};

/// What a snapshot request asks for (`PUT /vm/snapshot`, `skiff ctl snapshot`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    /// The directory to create (absolute).
    pub dir: PathBuf,
    /// End the VM once the snapshot is complete.
    pub stop: bool,
    /// Copy memory while the guest runs; pause only for the last dirty pages and the state.
    pub live: bool,
    /// Only the pages dirtied since the VM's previous snapshot, layered over it.
    pub diff: bool,
}
