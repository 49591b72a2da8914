//! `Persist`: the one way a device's state survives a snapshot.
//!
//! A device that a snapshot keeps has a plain, serializable `State` next to it (its
//! `persist.rs`), `save` to produce it and `restore` to build the device again from it plus the
//! host resources a state cannot carry (an output sink, an eventfd, the event loop). `restore`
//! is a constructor: it goes through the same checks and set-up as a device built from the
//! command line. A saved state is untrusted input, so `restore` validates it and returns an
//! error, never panics.
//!
//! Versioning is the state file's: every `State` is part of one payload whose format version
//! the VMM checks before decoding (`vmm::snapshot::state_file`); a change to any `State`'s
//! encoding bumps that version, and older snapshots are refused with one line naming it.

/// A component whose state a snapshot keeps.
pub trait Persist: Sized {
    /// The saved state: plain data, serializable.
    type State;
    /// What `restore` needs besides the state (host resources; `()` when nothing).
    type RestoreArgs;
    /// Why a saved state cannot be restored.
    type Error;

    /// The component's state now.
    fn save(&self) -> Self::State;

    /// Builds the component again from `state` (untrusted: checked like a fresh start's
    /// configuration).
    fn restore(args: Self::RestoreArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
