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
