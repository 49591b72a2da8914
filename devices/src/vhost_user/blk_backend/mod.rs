//! skiff's own vhost-user-blk backend (`skiff vhost-user-blk --socket PATH --disk FILE
//! [--readonly]`): a separate process that serves a raw disk file to any vhost-user frontend
//! (skiff, QEMU) through the `vhost-user-backend` crate.
//!
//! It is the in-process virtio-blk device turned inside out, not a second implementation: the
//! disk is opened, locked, and described (features, configuration space, engine choice) by
//! `VirtioBlk::new`; every request is parsed and checked by `virtio::blk::request`, and runs on
//! the same I/O engine (io_uring, or worker threads).
//!
//! - `backend`: the `VhostUserBackend` implementation (features, config, memory updates).
//! - `queue`: serving one kicked queue: chains to requests to engine operations to used ring.
//! - `serve`: the listening socket and the connection loop; its errors.

mod backend;
mod queue;
mod serve;

pub use serve::{serve, BlkBackendConfig, BlkBackendError};

use vhost_user_backend::bitmap::BitmapMmapRegion;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Guest memory as the backend maps it: each region's bitmap is the frontend's dirty log once
/// it sends one (`SET_LOG_BASE`), so every write the backend makes is logged.
type BackendMemory = GuestMemoryAtomic<GuestMemoryMmap<BitmapMmapRegion>>;
