//! What a snapshot keeps of a virtio-console device (`ConsoleState`): nothing beyond the
//! transport's registers and queue positions. Host input not yet delivered is not kept.

use std::io::Write;

use serde::{Deserialize, Serialize};

use super::device::{ConsoleError, VirtioConsole};
use crate::persist::Persist;

/// A virtio-console device's saved state (none of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState;

impl Persist for VirtioConsole {
    type State = ConsoleState;
    /// Where guest output goes, as for `new`.
    type RestoreArgs = Box<dyn Write + Send>;
    type Error = ConsoleError;

    fn save(&self) -> ConsoleState {
        ConsoleState
    }

    fn restore(output: Box<dyn Write + Send>, _: &ConsoleState) -> Result<Self, ConsoleError> {
        Self::new(output)
    }
}
