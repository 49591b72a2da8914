//! vhost-user: virtio devices whose queues are served by another process.
//!
//! - `config`: what a `--vhost-user` device is (type, socket, queues, tag) and the guest memory
//!   regions it shares with its backend (`SharedMemoryRegion`, one per `ShareableRegion`).
//! - `connection`: the frontend's side of the protocol on top of the `vhost` crate: connecting
//!   (with one-line errors for a missing path, a non-socket, a refused connection), the
//!   feature handshake, the memory table, per-queue ring set-up and tear-down.
//! - `fs_config`: virtio-fs's configuration space (tag, request queue count), from the backend
//!   or built from `tag=` and `queues=`.
//! - `device`: `VhostUserDevice`, the `VirtioDevice` the PCI transport drives.
//! - `session`: what the device shares with its watcher and reconnect thread (the connection,
//!   the driver's rings) and bringing a connection's rings up.
//! - `watchdog`: bounds every request (a backend that stalls mid-reply cannot hang a vCPU).
//! - `call_forwarder`: the event-loop subscriber that turns the backend's "used buffer" eventfds
//!   into MSI-X interrupts.
//! - `hangup`: the event-loop subscriber that notices when the backend goes away.
//! - `reconnect`: with `reconnect=`, the thread that connects again and replays the set-up.
//! - `quiesce`: stopping the rings for a snapshot and where each restarts.
//! - `persist`: what a snapshot keeps of the device (its configuration) and restoring it.
//! - `dirty_log`: the memfd bitmap a backend logs the guest pages it writes in, and reading it.
//! - `log_control`: switching a backend's dirty log on and off for a live snapshot
//!   (`DeviceDirtyLog`).
//! - `fuzzing`: the entry point of the `fuzz/` crate (replies from a hostile backend).
//! - `blk_backend`: skiff's own vhost-user-blk backend process (`skiff vhost-user-blk`).
//!
//! Everything a backend sends is untrusted: replies are parsed by the `vhost` crate, checked
//! again here where their values matter (feature bits, queue counts, config sizes), and any
//! failure becomes an error or a broken device, never a panic.

pub mod blk_backend;
mod call_forwarder;
pub mod config;
mod connection;
mod device;
mod dirty_log;
mod fs_config;
#[doc(hidden)]
pub mod fuzzing;
mod hangup;
mod log_control;
mod persist;
mod quiesce;
mod reconnect;
mod session;
mod watchdog;

#[cfg(test)]
mod tests;

pub use config::{ConfigError, SharedMemoryRegion, VhostUserConfig, VhostUserKind};
pub use connection::VhostUserError;
pub use device::VhostUserDevice;
pub use persist::VhostUserState;
