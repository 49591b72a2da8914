//! `HostResource`: one host resource a snapshot names (a disk, tap, vhost-user or vsock
//! socket, a diff's parent directory, or the recorded-only kernel, initrd and memory backing),
//! as `manifest.json` lists it and messages show it.
//!
//! Not here: deriving the list from a snapshot's state (`resources`) and deciding what a
//! restore may open (`authorize`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The id of a diff's parent directory in resource lists and messages.
pub const PARENT_ID: &str = "parent";

/// One host resource a snapshot names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum HostResource {
    /// A virtio-blk disk file or block device (opened on restore).
    Disk {
        /// The device id (`--disk id=`).
        id: String,
        /// The disk.
        path: PathBuf,
        /// Opened read-only.
        readonly: bool,
    },
    /// A virtio-net tap interface (opened, or created, on restore).
    Net {
        /// The device id (`--net id=`).
        id: String,
        /// The interface name.
        tap: String,
    },
    /// A vhost-user backend's socket (connected to on restore).
    VhostUser {
        /// The device id (`--vhost-user id=`).
        id: String,
        /// The socket.
        socket: PathBuf,
    },
    /// A vsock device's listening socket (created on restore, replacing a stale socket file
    /// there; guest connections go to `socket_PORT`).
    Vsock {
        /// The device id (`--vsock id=`).
        id: String,
        /// The socket.
        socket: PathBuf,
    },
    /// A diff snapshot's parent directory (its memory files are read on restore).
    Parent {
        /// The directory.
        path: PathBuf,
    },
    /// The kernel the VM booted (recorded only; restore does not open it).
    Kernel {
        /// The image.
        path: PathBuf,
    },
    /// The initrd the VM booted (recorded only).
    Initrd {
        /// The image.
        path: PathBuf,
    },
    /// The VM's original `--memory file=` backing (recorded only; restore maps the snapshot's
    /// own memory files).
    MemoryBacking {
        /// The file.
        path: PathBuf,
    },
}

impl HostResource {
    /// Whether restore opens it (the others are recorded for the reader only).
    pub fn opened_on_restore(&self) -> bool {
        matches!(
            self,
            Self::Disk { .. }
                | Self::Net { .. }
                | Self::VhostUser { .. }
                | Self::Vsock { .. }
                | Self::Parent { .. }
        )
    }

    /// The kind, as in `manifest.json` and on the command line.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Disk { .. } => "disk",
            Self::Net { .. } => "net",
            Self::VhostUser { .. } => "vhost-user",
            Self::Vsock { .. } => "vsock",
            Self::Parent { .. } => "parent",
            Self::Kernel { .. } => "kernel",
            Self::Initrd { .. } => "initrd",
            Self::MemoryBacking { .. } => "memory-backing",
        }
    }

    /// The device id, or the kind for a resource that is not a device.
    pub fn id(&self) -> &str {
        match self {
            Self::Disk { id, .. }
            | Self::Net { id, .. }
            | Self::VhostUser { id, .. }
            | Self::Vsock { id, .. } => id,
            Self::Parent { .. } => PARENT_ID,
            other => other.kind(),
        }
    }

    /// The path or interface name, for messages.
    pub fn location(&self) -> String {
        match self {
            Self::Net { tap, .. } => format!("tap {tap:?}"),
            Self::Disk { path, .. }
            | Self::VhostUser { socket: path, .. }
            | Self::Vsock { socket: path, .. }
            | Self::Parent { path }
            | Self::Kernel { path }
            | Self::Initrd { path }
            | Self::MemoryBacking { path } => path.display().to_string(),
        }
    }
}
