//! What a snapshot keeps of a virtio-rng device (`RngState`): nothing beyond the transport's
//! registers and queue positions.

use std::convert::Infallible;

use serde::{Deserialize, Serialize};

use super::device::VirtioRng;
use crate::persist::Persist;

/// A virtio-rng device's saved state (none of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState;

impl Persist for VirtioRng {
    type State = RngState;
    type RestoreArgs = ();
    type Error = Infallible;

    fn save(&self) -> RngState {
        RngState
    }

    fn restore((): (), _: &RngState) -> Result<Self, Infallible> {
        Ok(Self::new())
    }
}
