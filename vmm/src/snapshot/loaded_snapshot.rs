//! `LoadedSnapshot`: a snapshot directory whose manifest and state have been read and checked
//! (`restore::load`), which `authorize` decides about and `restore` builds a VM from.

use std::path::PathBuf;

use super::auth::Authentication;
use super::dir::SnapshotFile;
use super::host_resource::HostResource;
use super::manifest::SnapshotManifest;
use super::state_file::SnapshotState;

/// A snapshot directory whose manifest and state have been read and checked.
#[derive(Debug)]
pub struct LoadedSnapshot {
    /// The directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: SnapshotManifest,
    /// Its decoded state.
    pub state: SnapshotState,
    /// Its memory files, one per region, opened inside the directory and size-checked.
    pub memory_files: Vec<SnapshotFile>,
    /// Every host resource it names (equal to the manifest's list).
    pub resources: Vec<HostResource>,
    /// Whether it is authenticated as this user's.
    pub authentication: Authentication,
}
