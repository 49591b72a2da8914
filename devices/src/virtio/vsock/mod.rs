//! virtio-vsock (device type 19) in process: a stream socket transport between the guest and
//! host programs, with the host side on Unix sockets in the hybrid convention of Firecracker
//! and Cloud Hypervisor.
//!
//! - A guest connection to port P goes to the Unix socket `PATH_P` (skiff connects to it when
//!   the guest sends `OP_REQUEST`; refused or missing gives the guest `OP_RST`).
//! - A host program connects to `PATH` (skiff listens there), writes `CONNECT P\n`, gets
//!   `OK <hostport>\n` once the guest accepted, and then talks to guest port P.
//!
//! `device` holds the configuration space (the guest CID), features and activation;
//! `queue_handler` is the event-loop subscriber that moves packets between the queues and the
//! host sockets; `muxer` is the connection table and the protocol (credit, shutdown, reset);
//! `connection` one connection's state and buffers; `host` the Unix-socket side (listener,
//! `CONNECT` handshakes, non-blocking connects); `packet` the header and descriptor chains;
//! `persist` what a snapshot keeps (CID, socket).
//!
//! Not here: datagram and seqpacket sockets, and vsock through vhost-user (a separate device).

mod connection;
mod device;
mod host;
mod muxer;
mod packet;
mod persist;
mod queue_handler;

#[cfg(test)]
mod tests;

pub use device::{VirtioVsock, VsockError};
pub use host::HostSideError;
pub use persist::VsockState;

/// virtio device type of a socket device.
pub const DEVICE_TYPE_VSOCK: u32 = 19;

/// The host's CID (`VMADDR_CID_HOST`): packets from the guest must be addressed to it.
pub const HOST_CID: u64 = 2;

/// The first host port of host-initiated connections (the ports a guest sees them come from):
/// numbering continues upward from here, across snapshots.
pub const FIRST_HOST_PORT: u32 = 1 << 30;

/// Lowest CID a guest may have (0-2 are reserved: hypervisor, local, host).
pub const MIN_GUEST_CID: u64 = 3;

/// Highest CID a guest may have: the device reads it as 64 bits but Linux uses 32, and
/// `u32::MAX` is `VMADDR_CID_ANY`.
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// Index of the receive (device to driver) queue.
pub const RX_QUEUE: u16 = 0;
/// Index of the transmit (driver to device) queue.
pub const TX_QUEUE: u16 = 1;
/// Index of the event queue.
pub const EVENT_QUEUE: u16 = 2;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// Largest payload of one packet, in either direction (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Receive buffer skiff advertises per connection (`buf_alloc`): the most guest data it holds
/// for a host socket that does not read.
pub const CONN_BUFFER: u32 = 64 * 1024;

/// Most connections at once (guest- and host-initiated together); more are refused with RST.
pub const MAX_CONNECTIONS: usize = 512;

/// Most host programs at once that connected to `PATH` and have not finished `CONNECT P\n`.
pub const MAX_HANDSHAKES: usize = 64;
