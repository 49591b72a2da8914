//! User-space interrupt controllers for hypervisors that emulate only the local APIC (the
//! Windows Hypervisor Platform); KVM uses its in-kernel ones instead. Platform-neutral and
//! unit-tested on Linux against what KVM's in-kernel versions do.
//!
//! - `request`: `InterruptRequest`, one interrupt message to local APICs, decoded from an MSI or
//!   built by the IOAPIC, and `InterruptSink`, where the backend delivers it
//!   (`WHvRequestInterrupt` on WHP).
//! - `ioapic`: the IOAPIC's registers, redirection table and pin state.
//! - `pin`: an IOAPIC input, or an ISA IRQ on the PIC and the IOAPIC, as the `InterruptLine`
//!   devices raise.
//! - `pic`: the cascaded 8259A pair and its ELCR.
//! - `pit`: the 8254 interval timer and the speaker port's gate and output bits.
//! - `pit_timer`: the thread that pulses the PIT's IRQ 0 on time.

pub mod ioapic;
pub mod pic;
pub mod pin;
pub mod pit;
pub mod pit_timer;
pub mod request;

pub use ioapic::{Ioapic, IoapicState, IOAPIC_PINS};
pub use pic::{Pic, PicChip, PicPorts};
pub use pin::{IoapicPin, IsaIrq};
pub use pit::{HostClock, Pit, PitClock, PitPorts};
pub use pit_timer::PitTimer;
pub use request::{DeliveryMode, InterruptRequest, InterruptSink};
