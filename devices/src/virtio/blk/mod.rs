//! virtio-blk (device type 2) on a raw disk file or block device.
//!
//! Split by job: `disk` opens, checks and locks the backing file; `device` is the `VirtioDevice`
//! the transport drives (features, configuration space, activation and reset); `disk_thread` is
//! the thread each activated disk runs on; `queue_handler` is the subscriber on that thread's
//! loop that pops descriptor chains when a queue is kicked and completes requests when the I/O
//! engine reports; `request` parses and checks one request; `engine` runs the file I/O
//! (io_uring, or a worker pool where io_uring is missing); `persist` is what a snapshot keeps.
//! The PCI transport, feature negotiation and interrupts are not here (`transport`, `pci`).

pub mod device;
pub mod disk;
mod disk_thread;
pub(crate) mod engine;
mod persist;
mod queue_handler;
pub(crate) mod request;

pub use device::{BlkError, VirtioBlk};
pub use disk::{DiskConfig, DiskError, IoEngineKind};
pub use persist::BlkState;

#[cfg(test)]
pub(crate) mod tests;
