//! virtio-net (device type 1) on a host tap interface: one receive and one transmit queue.
//!
//! `device` holds the configuration space (MAC, link status), feature negotiation (checksum
//! and segmentation offloads where the tap takes them) and activation; `queue_handler` is the
//! event-loop subscriber that moves frames between the queues and the tap; `frames` copies one
//! frame between a descriptor chain and a host buffer, checking everything the guest wrote;
//! `tap` is the host side; `persist` is what a snapshot keeps (tap name, MAC). Not here: multiqueue, the control queue, mergeable receive buffers.

mod device;
pub(crate) mod frames;
mod persist;
mod queue_handler;
pub mod tap;

#[cfg(test)]
mod tests;

pub use device::{NetError, VirtioNet};
pub use persist::NetState;
pub use queue_handler::NetCounters;
pub use tap::{Tap, TapError};

/// Size of the virtio-net header in front of every frame (`virtio_net_hdr_v1`: VERSION_1
/// devices always include `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// Largest frame (without the virtio-net header): a 64 KiB IP packet behind an Ethernet
/// header with one VLAN tag, as a segmentation offload can produce.
pub const MAX_FRAME_LEN: usize = 65535 + 18;

/// Largest buffer the device moves in one go: header plus frame.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;

/// Index of the receive queue.
pub const RX_QUEUE: u16 = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: u16 = 1;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
