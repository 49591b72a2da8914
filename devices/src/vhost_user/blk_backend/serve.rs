//! The backend process's outer loop: open the disk once, listen on the socket, and serve one
//! frontend connection after another (a frontend that restarts, or a VM that reconnects, finds
//! the socket still there). Each connection gets a fresh backend and daemon, so no ring or
//! memory state leaks from one frontend to the next.

use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::backend::BlkBackend;
use crate::virtio::blk::{BlkError, DiskConfig, IoEngineKind, VirtioBlk};

/// Serial number `GET_ID` returns.
const DISK_ID: &str = "skiff-vhost-user-blk";

/// What `skiff vhost-user-blk` serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkBackendConfig {
    /// The listening socket to create (an existing socket file is replaced).
    pub socket: PathBuf,
    /// The raw disk image.
    pub disk: PathBuf,
    /// Refuse writes and offer `VIRTIO_BLK_F_RO`.
    pub readonly: bool,
    /// Stop after the first frontend disconnects (tests, one-shot use).
    pub once: bool,
}

/// Why the backend could not start or stopped.
#[derive(Debug, Error)]
pub enum BlkBackendError {
    /// The disk could not be opened (missing, wrong size, locked).
    #[error(transparent)]
    Disk(#[from] BlkError),
    /// The socket could not be created.
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: vhost::vhost_user::Error,
    },
    /// The I/O engine could not start.
    #[error("cannot start the I/O engine for {path}")]
    Engine {
        /// The disk path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: crate::virtio::blk::engine::EngineError,
    },
    /// The vhost-user daemon failed outside a connection.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
}

/// Serves `cfg.disk` on `cfg.socket` until killed (or, with `once`, until the first frontend
/// leaves).
pub fn serve(cfg: &BlkBackendConfig) -> Result<(), BlkBackendError> {
    let blk = VirtioBlk::new(&DiskConfig {
        path: cfg.disk.clone(),
        readonly: cfg.readonly,
        id: Some(DISK_ID.to_string()),
        queues: 1,
        engine: IoEngineKind::Auto,
    })?;
    let mut listener =
        Listener::new(&cfg.socket, true).map_err(|source| BlkBackendError::Listen {
            path: cfg.socket.clone(),
            source,
        })?;
    log::info!(
        "vhost-user-blk: serving {} on {}",
        cfg.disk.display(),
        cfg.socket.display()
    );
    // The disk and the socket are open: from here on the process (and every thread the
    // daemon starts) only serves them.
    crate::thread_kind::enter(crate::thread_kind::ThreadKind::VhostUserBlkBackend);
    loop {
        let backend =
            Arc::new(
                BlkBackend::new(&blk).map_err(|source| BlkBackendError::Engine {
                    path: cfg.disk.clone(),
                    source,
                })?,
            );
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("vhost-user-blk".into(), backend, mem)
            .map_err(|e| BlkBackendError::Daemon(e.to_string()))?;
        daemon
            .start(&mut listener)
            .map_err(|e| BlkBackendError::Daemon(e.to_string()))?;
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => log::info!("vhost-user-blk: the frontend disconnected"),
            Err(e) => log::warn!("vhost-user-blk: the connection ended: {e}"),
        }
        if cfg.once {
            return Ok(());
        }
    }
}
