//! `InterruptRequest`: one interrupt message for local APICs, as an MSI or an IOAPIC
//! redirection entry describes it, and `InterruptSink`, the backend that delivers it.

use std::fmt::Debug;

/// The MSI address window: bits 31:20 of every MSI address are 0xFEE, and the upper half is
/// zero (an extended destination ID there needs x2APIC, which the VM does not offer).
const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;
const MSI_ADDRESS_MASK: u64 = 0xffff_ffff_fff0_0000;

/// How the local APIC delivers an interrupt (the 3-bit field of MSI data and IOAPIC entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    /// Vectored, to every destination.
    Fixed,
    /// Vectored, to the lowest-priority destination.
    LowestPriority,
    /// System management interrupt.
    Smi,
    /// Non-maskable interrupt.
    Nmi,
    /// INIT.
    Init,
    /// External interrupt: the vector comes from the PIC.
    ExtInt,
}

impl DeliveryMode {
    /// Decodes the 3-bit field; the reserved encodings (3 and 6) give `None`.
    pub fn from_bits(bits: u8) -> Option<Self> {
        match bits & 0x7 {
            0 => Some(Self::Fixed),
            1 => Some(Self::LowestPriority),
            2 => Some(Self::Smi),
            4 => Some(Self::Nmi),
            5 => Some(Self::Init),
            7 => Some(Self::ExtInt),
            _ => None,
        }
    }
}

/// One interrupt to deliver to local APICs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterruptRequest {
    /// Destination APIC ID (physical) or logical destination mask.
    pub destination: u8,
    /// Whether `destination` is a logical mask.
    pub logical_destination: bool,
    /// Delivery mode.
    pub delivery_mode: DeliveryMode,
    /// The vector (ignored for NMI, INIT and SMI).
    pub vector: u8,
    /// Level-triggered: the local APIC sends an EOI back for it.
    pub level_triggered: bool,
}

impl InterruptRequest {
    /// Decodes an MSI message (`address`, `data`) as the local APIC reads it, or `None` for an
    /// address outside the 0xFEEx_xxxx window or a reserved delivery mode. The redirection
    /// hint is ignored, as KVM does for physical destinations.
    pub fn from_msi(address: u64, data: u32) -> Option<Self> {
        if address & MSI_ADDRESS_MASK != MSI_ADDRESS_BASE {
            return None;
        }
        Some(Self {
            destination: (address >> 12) as u8,
            logical_destination: address & (1 << 2) != 0,
            delivery_mode: DeliveryMode::from_bits((data >> 8) as u8)?,
            vector: data as u8,
            level_triggered: data & (1 << 15) != 0,
        })
    }
}

/// Where interrupt requests go: the hypervisor's local APICs.
pub trait InterruptSink: Send + Sync + Debug {
    /// Delivers `request`. Never blocks.
    fn deliver(&self, request: InterruptRequest) -> std::io::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_msi_decodes_as_the_local_apic_reads_it() {
        // Physical destination 3, fixed, vector 0x41, edge.
        let r = InterruptRequest::from_msi(0xfee0_3000, 0x41).unwrap();
        assert_eq!(
            r,
            InterruptRequest {
                destination: 3,
                logical_destination: false,
                delivery_mode: DeliveryMode::Fixed,
                vector: 0x41,
                level_triggered: false,
            }
        );
        // Logical destination mask 0x0f, lowest priority, level-triggered.
        let r = InterruptRequest::from_msi(0xfee0_f00c, 0xc131).unwrap();
        assert!(r.logical_destination);
        assert_eq!(r.destination, 0x0f);
        assert_eq!(r.delivery_mode, DeliveryMode::LowestPriority);
        assert!(r.level_triggered);
        assert_eq!(r.vector, 0x31);
        // NMI.
        assert_eq!(
            InterruptRequest::from_msi(0xfee0_0000, 0x400)
                .unwrap()
                .delivery_mode,
            DeliveryMode::Nmi
        );
    }

    #[test]
    fn messages_outside_the_window_or_with_reserved_modes_are_refused() {
        assert_eq!(InterruptRequest::from_msi(0xfec0_0000, 0x41), None);
        assert_eq!(InterruptRequest::from_msi(0x1_fee0_0000, 0x41), None);
        assert_eq!(InterruptRequest::from_msi(0xfee0_0000, 0x341), None);
        assert_eq!(InterruptRequest::from_msi(0xfee0_0000, 0x641), None);
    }
}
