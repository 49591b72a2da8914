//! What a snapshot keeps of a virtio-vsock device (`VsockState`): the guest CID, the host
//! socket and the next host port. Connections are not kept: the restored device listens anew
//! and, when the driver has it running again, announces a transport reset
//! (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`) so the guest drops its old ones. Host ports continue
//! where they were, so a restored VM's first host connection never carries the ports of a
//! connection the guest still holds (reset, until its owner lets go).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::device::{VirtioVsock, VsockError};
use crate::persist::Persist;

/// A virtio-vsock device's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// Guest CID.
    pub cid: u64,
    /// The listening socket `PATH` (guest connections go to `PATH_<port>`).
    pub socket: PathBuf,
    /// The host port the next host-initiated connection gets.
    pub next_host_port: u32,
}

impl Persist for VirtioVsock {
    type State = VsockState;
    type RestoreArgs = ();
    type Error = VsockError;

    fn save(&self) -> VsockState {
        VsockState {
            cid: self.cid(),
            socket: self.socket().to_path_buf(),
            next_host_port: self.next_host_port(),
        }
    }

    /// Listens again through `VirtioVsock::new` (CID range, socket checks); the driver hears
    /// a transport reset when the device is activated.
    fn restore((): (), state: &VsockState) -> Result<Self, VsockError> {
        let mut device = Self::new(state.cid, &state.socket)?;
        device.continue_host_ports(state.next_host_port);
        device.announce_transport_reset();
        Ok(device)
    }
}
