//! What a vhost-user device is, as the VMM describes it to the frontend: the device type, the
//! backend's socket, the queue count, and (virtio-fs) the tag; plus `SharedMemoryRegion`, one
//! guest memory region as the backend must map it.
//!
//! The command-line form (`--vhost-user type=...,socket=...`) is parsed in the VMM's config
//! module; this module holds the typed result, its per-type defaults, and `check`, which a
//! snapshot's saved copy (untrusted) must pass before a device is built from it.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// Queue size every vhost-user queue offers the driver.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// Longest virtio-fs tag (`virtio_fs_config.tag`).
pub const FS_TAG_BYTES: usize = 36;

/// Most queues a vhost-user device may have.
pub const MAX_QUEUES: u16 = 64;

/// Longest reconnect interval, in seconds.
pub const MAX_RECONNECT_SECS: u64 = 1_000_000;

/// Which virtio device the backend implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

/// One `--vhost-user` device, validated (a snapshot keeps it as the device's state).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

/// Why a `VhostUserConfig` (a snapshot's saved copy, untrusted) is refused: the value the
/// command line would not accept.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// No socket path.
    #[error("empty socket path")]
    EmptySocket,
    /// A queue count outside what the device type allows.
    #[error("{queues} queues (expected {least} to {MAX_QUEUES})")]
    Queues {
        /// The saved count.
        queues: u16,
        /// The least the device type needs.
        least: u16,
    },
    /// A generic device type outside 1..=63.
    #[error("virtio device type {0} (expected 1 to 63)")]
    DeviceType(u32),
    /// A tag on a device that is not virtio-fs.
    #[error("a tag on a device that is not virtio-fs")]
    TagNotFs,
    /// A virtio-fs tag of the wrong length.
    #[error("tag of {0} bytes (expected 1 to {FS_TAG_BYTES})")]
    TagLength(usize),
    /// A reconnect interval of zero or above `MAX_RECONNECT_SECS`.
    #[error("reconnect interval {0:?}")]
    Reconnect(Duration),
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

    /// Whether every value is one the command line accepts (a saved copy is untrusted): the
    /// queue count (1 to `MAX_QUEUES`, at least 2 for virtio-fs), a tag only for virtio-fs and
    /// of 1 to `FS_TAG_BYTES` bytes, a generic type of 1 to 63, a positive reconnect interval
    /// of at most `MAX_RECONNECT_SECS`, a socket path. `Err` names the bad value.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.socket.as_os_str().is_empty() {
            return Err(ConfigError::EmptySocket);
        }
        let least = if self.kind == VhostUserKind::Fs { 2 } else { 1 };
        if !(least..=MAX_QUEUES).contains(&self.queues) {
            return Err(ConfigError::Queues {
                queues: self.queues,
                least,
            });
        }
        if let VhostUserKind::Generic(id) = self.kind {
            if !(1..64).contains(&id) {
                return Err(ConfigError::DeviceType(id));
            }
        }
        match &self.tag {
            Some(_) if self.kind != VhostUserKind::Fs => return Err(ConfigError::TagNotFs),
            Some(tag) if tag.is_empty() || tag.len() > FS_TAG_BYTES => {
                return Err(ConfigError::TagLength(tag.len()))
            }
            _ => {}
        }
        if let Some(every) = self.reconnect {
            if every.is_zero() || every > Duration::from_secs(MAX_RECONNECT_SECS) {
                return Err(ConfigError::Reconnect(every));
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_saved_device_with_a_value_the_command_line_refuses_is_refused() {
        let good = VhostUserConfig::new(VhostUserKind::Blk, "/run/blk.sock");
        assert_eq!(good.check(), Ok(()));
        let bad = |change: &dyn Fn(&mut VhostUserConfig)| {
            let mut cfg = good.clone();
            change(&mut cfg);
            cfg.check().expect_err("accepted").to_string()
        };
        assert!(bad(&|c| c.queues = 0).contains("0 queues"));
        assert!(bad(&|c| c.queues = MAX_QUEUES + 1).contains("65 queues"));
        assert!(bad(&|c| c.socket = PathBuf::new()).contains("socket"));
        assert!(bad(&|c| c.tag = Some("t".into())).contains("not virtio-fs"));
        assert!(bad(&|c| c.kind = VhostUserKind::Generic(0)).contains("type 0"));
        assert!(bad(&|c| c.kind = VhostUserKind::Generic(64)).contains("type 64"));
        assert!(bad(&|c| c.reconnect = Some(Duration::ZERO)).contains("reconnect"));
        let fs = |tag: &str, queues| VhostUserConfig {
            tag: Some(tag.into()),
            queues,
            ..VhostUserConfig::new(VhostUserKind::Fs, "/s")
        };
        assert_eq!(fs("shared", 2).check(), Ok(()));
        assert!(fs("shared", 1)
            .check()
            .unwrap_err()
            .to_string()
            .contains("1 queues"));
        assert!(fs("", 2)
            .check()
            .unwrap_err()
            .to_string()
            .contains("tag of 0 bytes"));
        assert!(fs(&"x".repeat(FS_TAG_BYTES + 1), 2)
            .check()
            .unwrap_err()
            .to_string()
            .contains("tag of 37 bytes"));
    }
}
