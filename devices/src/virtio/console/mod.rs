//! virtio-console (device type 3) with one port, the guest's `hvc0`: receiveq0 carries host
//! input to the guest, transmitq0 guest output to a host writer (skiff's stdout).
//!
//! `device` holds the configuration space and activation; `queue_handler` is the event-loop
//! subscriber that moves bytes; `input` is the handle the VMM's stdin reader feeds; `persist` is what a snapshot keeps.
//! Not here:
//! multiport, the control queues, terminal resizing, emergency writes.

mod device;
mod input;
mod persist;
pub(crate) mod queue_handler;

#[cfg(test)]
mod tests;

pub use device::{ConsoleError, VirtioConsole};
pub use input::{ConsoleInput, INPUT_CAPACITY};
pub use persist::ConsoleState;
pub use queue_handler::ConsoleCounters;

/// Index of receiveq0 (host to guest).
pub const RX_QUEUE: u16 = 0;
/// Index of transmitq0 (guest to host).
pub const TX_QUEUE: u16 = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 64;
