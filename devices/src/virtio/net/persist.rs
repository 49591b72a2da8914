//! What a snapshot keeps of a virtio-net device (`NetState`): its tap and the MAC address the
//! guest saw. Frames in flight are not kept (a snapshot drops them, as a full queue would).

use serde::{Deserialize, Serialize};

use super::device::{random_mac, NetError, VirtioNet};
use crate::persist::Persist;

/// A virtio-net device's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The tap interface.
    pub tap: String,
    /// The MAC address the guest saw.
    pub mac: [u8; 6],
}

impl NetState {
    /// The state of a new device on tap `tap` (`--net`): `mac`, or a random locally
    /// administered address (chosen here, so that the device and its saved state agree).
    pub fn for_tap(tap: &str, mac: Option<[u8; 6]>) -> Result<Self, NetError> {
        Ok(Self {
            tap: tap.to_string(),
            mac: match mac {
                Some(mac) => mac,
                None => random_mac()?,
            },
        })
    }
}

impl Persist for VirtioNet {
    type State = NetState;
    type RestoreArgs = ();
    type Error = NetError;

    fn save(&self) -> NetState {
        NetState {
            tap: self.tap_name().to_string(),
            mac: self.mac(),
        }
    }

    /// Opens the tap again through `VirtioNet::open`, with its checks.
    fn restore((): (), state: &NetState) -> Result<Self, NetError> {
        Self::open(&state.tap, Some(state.mac))
    }
}
