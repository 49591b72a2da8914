//! What a vhost-user device is, as the VMM describes it to the frontend: the device type, the
//! backend's socket, the queue count, and (virtio-fs) the tag; plus `SharedMemoryRegion`, one
//! guest memory region as the backend must map it.
//!
//! The command-line form (`--vhost-user type=...,socket=...`) is parsed in the VMM's config
//! module; this module holds only the typed result and its per-type defaults.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

/// Queue size every vhost-user queue offers the driver.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// Longest virtio-fs tag (`virtio_fs_config.tag`).
pub const FS_TAG_BYTES: usize = 36;

/// Which virtio device the backend implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VhostUserKind {
    /// virtio-blk (type 2).
    Blk,
    /// virtio-fs (type 26).
    Fs,
    /// virtio-net (type 1).
    Net,
    /// virtio-vsock (type 19).
    Vsock,
    /// virtio-rng (type 4).
    Rng,
    /// Any other virtio device type, given by number.
    Generic(u32),
}

impl VhostUserKind {
    /// The virtio device type.
    pub fn device_type(self) -> u32 {
        match self {
            Self::Net => 1,
            Self::Blk => 2,
            Self::Rng => 4,
            Self::Vsock => 19,
            Self::Fs => 26,
            Self::Generic(t) => t,
        }
    }

    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Blk => "vhost-user-blk",
            Self::Fs => "vhost-user-fs",
            Self::Net => "vhost-user-net",
            Self::Vsock => "vhost-user-vsock",
            Self::Rng => "vhost-user-rng",
            Self::Generic(_) => "vhost-user",
        }
    }

    /// Queues the device has when `queues=` is not given.
    pub fn default_queues(self) -> u16 {
        match self {
            Self::Blk | Self::Rng | Self::Generic(_) => 1,
            // virtio-fs: the high-priority queue and one request queue; net: rx and tx.
            Self::Fs | Self::Net => 2,
            // vsock: rx, tx and event.
            Self::Vsock => 3,
        }
    }

    /// Bytes of device configuration space the frontend asks the backend for (`GET_CONFIG`).
    pub fn config_len(self) -> usize {
        match self {
            // virtio_blk_config up to write_zeroes_may_unmap and its padding.
            Self::Blk => 60,
            // tag[36], num_request_queues.
            Self::Fs => FS_TAG_BYTES + 4,
            // mac, status, max_virtqueue_pairs, mtu.
            Self::Net => 10,
            // guest_cid.
            Self::Vsock => 8,
            Self::Rng | Self::Generic(_) => 0,
        }
    }
}

/// One `--vhost-user` device, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserConfig {
    /// The device type.
    pub kind: VhostUserKind,
    /// The backend's listening Unix socket.
    pub socket: PathBuf,
    /// Number of queues.
    pub queues: u16,
    /// virtio-fs mount tag (used when the backend does not supply the configuration space).
    pub tag: Option<String>,
    /// Reconnect after the backend goes away, retrying this often (without it the device is
    /// marked broken).
    pub reconnect: Option<Duration>,
}

impl VhostUserConfig {
    /// A device of `kind` on `socket` with its default queue count.
    pub fn new(kind: VhostUserKind, socket: impl Into<PathBuf>) -> Self {
        Self {
            kind,
            socket: socket.into(),
            queues: kind.default_queues(),
            tag: None,
            reconnect: None,
        }
    }
}

/// One guest memory region as the backend maps it: `size` bytes of `fd` from `file_offset`
/// hold guest physical `guest_address` onwards, mapped in this process at `host_address`.
#[derive(Debug)]
pub struct SharedMemoryRegion {
    /// Guest physical address.
    pub guest_address: u64,
    /// Size in bytes.
    pub size: u64,
    /// Where this process mapped the region (the vhost-user "user address").
    pub host_address: u64,
    /// The backing file.
    pub fd: OwnedFd,
    /// Offset of the region in the file (`mmap_offset`).
    pub file_offset: u64,
}
