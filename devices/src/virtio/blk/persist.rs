//! What a snapshot keeps of a virtio-blk device (`BlkState`): the disk as configured. Queue
//! positions and registers are the transport's; a snapshot finishes every request first
//! (`VirtioDevice::quiesce`), so no I/O is in flight to keep.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::device::{BlkError, VirtioBlk};
use super::disk::{DiskConfig, IoEngineKind};
use crate::persist::Persist;

/// A virtio-blk device's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkState {
    /// The disk file or block device.
    pub path: PathBuf,
    /// Writes refused.
    pub readonly: bool,
    /// `GET_ID` serial.
    pub id: Option<String>,
    /// Request queues.
    pub queues: u16,
    /// The engine as configured (`io=`): `Auto` chooses again on the restoring host, `IoUring`
    /// fails there as `skiff run` would when the host lacks io_uring.
    pub engine: IoEngineKind,
}

impl From<&DiskConfig> for BlkState {
    fn from(cfg: &DiskConfig) -> Self {
        Self {
            path: cfg.path.clone(),
            readonly: cfg.readonly,
            id: cfg.id.clone(),
            queues: cfg.queues,
            engine: cfg.engine,
        }
    }
}

impl BlkState {
    /// The disk configuration that builds this device.
    pub fn config(&self) -> DiskConfig {
        DiskConfig {
            path: self.path.clone(),
            readonly: self.readonly,
            id: self.id.clone(),
            queues: self.queues,
            engine: self.engine,
        }
    }
}

impl Persist for VirtioBlk {
    type State = BlkState;
    type RestoreArgs = ();
    type Error = BlkError;

    fn save(&self) -> BlkState {
        BlkState {
            path: self.disk().path().to_path_buf(),
            readonly: self.readonly(),
            id: self.id().map(str::to_string),
            queues: self.num_queues(),
            engine: self.configured_engine(),
        }
    }

    /// Opens the disk again through `VirtioBlk::new`, with its checks (queue count, id
    /// length, file type, size, lock).
    fn restore((): (), state: &BlkState) -> Result<Self, BlkError> {
        Self::new(&state.config())
    }
}
