//! Injecting the PIC's interrupts into a WHP vCPU. WHP emulates only the local APIC, and its
//! `WHvRequestInterrupt` has no ExtINT type, so an interrupt from the user-space 8259A goes in
//! the way the CPU takes one from its INTR pin: when the guest can take it (RFLAGS.IF set, no
//! interrupt shadow after `sti`/`mov ss`, no event already pending), skiff acknowledges the PIC
//! and writes the vector as the vCPU's pending external interruption; when it cannot, skiff asks
//! WHP for an interrupt-window exit and tries again then. Only the boot vCPU takes PIC
//! interrupts (its LINT0 is ExtINT, as firmware leaves it).
//!
//! Platform-neutral: the decision and the register encodings, unit-tested on Linux; the vCPU
//! reads and writes the registers.

/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;
/// `WHV_X64_INTERRUPT_STATE_REGISTER` bit 0: interrupt shadow.
const INTERRUPT_SHADOW: u64 = 1;
/// `WHV_X64_PENDING_INTERRUPTION_REGISTER` bit 0: an interruption is pending.
const INTERRUPTION_PENDING: u64 = 1;
/// Its vector, bits 31:16 (the type in bits 3:1 is 0, `WHvX64PendingInterrupt`).
const INTERRUPTION_VECTOR_SHIFT: u32 = 16;
/// `WHV_X64_DELIVERABILITY_NOTIFICATIONS_REGISTER` bit 1: exit when interrupts can be taken.
pub const INTERRUPT_WINDOW_NOTIFICATION: u64 = 1 << 1;

/// What to do before running the vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtIntAction {
    /// Nothing: the PIC asks for nothing.
    Nothing,
    /// Acknowledge the PIC and inject its vector now.
    Inject,
    /// Ask for an interrupt-window exit.
    RequestWindow,
}

/// The action for a PIC that does (`pic_pending`) or does not ask for an interrupt, given the
/// vCPU's RFLAGS, interrupt-state and pending-interruption registers.
pub fn ext_int_action(
    pic_pending: bool,
    rflags: u64,
    interrupt_state: u64,
    pending_interruption: u64,
) -> ExtIntAction {
    if !pic_pending {
        ExtIntAction::Nothing
    } else if rflags & RFLAGS_IF != 0
        && interrupt_state & INTERRUPT_SHADOW == 0
        && pending_interruption & INTERRUPTION_PENDING == 0
    {
        ExtIntAction::Inject
    } else {
        ExtIntAction::RequestWindow
    }
}

/// The pending-interruption register value that injects external interrupt `vector`.
pub fn pending_external_interrupt(vector: u8) -> u64 {
    INTERRUPTION_PENDING | (u64::from(vector) << INTERRUPTION_VECTOR_SHIFT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pic_interrupt_is_injected_only_when_the_guest_can_take_it() {
        assert_eq!(ext_int_action(false, 0x202, 0, 0), ExtIntAction::Nothing);
        assert_eq!(ext_int_action(true, 0x202, 0, 0), ExtIntAction::Inject);
        // Interrupts off, an `sti` shadow, or an event already on its way: wait for a window.
        assert_eq!(
            ext_int_action(true, 0x002, 0, 0),
            ExtIntAction::RequestWindow
        );
        assert_eq!(
            ext_int_action(true, 0x202, 1, 0),
            ExtIntAction::RequestWindow
        );
        assert_eq!(
            ext_int_action(true, 0x202, 0, 1),
            ExtIntAction::RequestWindow
        );
        // The shadow's neighbour bit (NMI masked) does not block a maskable interrupt.
        assert_eq!(ext_int_action(true, 0x202, 2, 0), ExtIntAction::Inject);
    }

    #[test]
    fn the_pending_interruption_carries_the_vector_as_an_external_interrupt() {
        assert_eq!(pending_external_interrupt(0x20), 0x0020_0001);
        assert_eq!(pending_external_interrupt(0xff), 0x00ff_0001);
        // Type bits 3:1 are 0 (external interrupt); no error code.
        assert_eq!(pending_external_interrupt(0x30) & 0xe, 0);
    }
}
