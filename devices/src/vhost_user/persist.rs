//! What a snapshot keeps of a vhost-user device (`VhostUserState`): its `--vhost-user`
//! configuration (type, socket, queues, tag, reconnect). The backend keeps no state skiff
//! relies on; restore connects again, and the transport brings the rings up at their saved
//! positions.

use serde::{Deserialize, Serialize};

use super::config::{SharedMemoryRegion, VhostUserConfig};
use super::connection::VhostUserError;
use super::device::VhostUserDevice;
use crate::persist::Persist;
use crate::virtio::EventLoop;

/// A vhost-user device's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostUserState {
    /// The device's configuration.
    pub config: VhostUserConfig,
}

impl Persist for VhostUserDevice {
    type State = VhostUserState;
    /// The guest memory to share with the backend and the event loop that watches its socket,
    /// as for `new`.
    type RestoreArgs = (Vec<SharedMemoryRegion>, EventLoop);
    type Error = VhostUserError;

    fn save(&self) -> VhostUserState {
        VhostUserState {
            config: self.config().clone(),
        }
    }

    /// Checks the saved configuration as `--vhost-user` parsing does (`VhostUserConfig::check`),
    /// then connects, handshakes and sends the memory table through `VhostUserDevice::new`.
    fn restore(
        (regions, event_loop): Self::RestoreArgs,
        state: &VhostUserState,
    ) -> Result<Self, VhostUserError> {
        state
            .config
            .check()
            .map_err(|source| VhostUserError::SavedConfig {
                socket: state.config.socket.clone(),
                source,
            })?;
        Self::new(&state.config, regions, event_loop)
    }
}
