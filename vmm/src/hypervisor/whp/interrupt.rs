//! Interrupt requests (MSIs and IOAPIC deliveries, as `devices::irqchip::InterruptRequest`)
//! in the form `WHvRequestInterrupt` takes: the `WHV_INTERRUPT_CONTROL` fields. The encoding is
//! platform-neutral and unit-tested on Linux; building the Windows structure from it, and the
//! check that the constants match the `windows` crate's, are Windows-only.

use devices::irqchip::{DeliveryMode, InterruptRequest};

/// `WHV_INTERRUPT_TYPE` values (WinHvPlatformDefs.h).
const TYPE_FIXED: u64 = 0;
const TYPE_LOWEST_PRIORITY: u64 = 1;
const TYPE_NMI: u64 = 4;
const TYPE_INIT: u64 = 5;
/// `WHV_INTERRUPT_DESTINATION_MODE` and `WHV_INTERRUPT_TRIGGER_MODE` values.
const DESTINATION_LOGICAL: u64 = 1;
const TRIGGER_LEVEL: u64 = 1;

/// The fields of a `WHV_INTERRUPT_CONTROL`: the bit field (type in bits 7:0, destination mode
/// in 11:8, trigger mode in 15:12), the destination and the vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterruptControl {
    /// Type, destination mode and trigger mode.
    pub bitfield: u64,
    /// APIC ID or logical mask.
    pub destination: u32,
    /// Vector.
    pub vector: u32,
}

impl InterruptControl {
    /// The control for `request`, or `None` for the delivery modes WHP cannot request (SMI,
    /// and ExtInt, which only a PIC answers).
    pub fn from_request(request: &InterruptRequest) -> Option<Self> {
        let kind = match request.delivery_mode {
            DeliveryMode::Fixed => TYPE_FIXED,
            DeliveryMode::LowestPriority => TYPE_LOWEST_PRIORITY,
            DeliveryMode::Nmi => TYPE_NMI,
            DeliveryMode::Init => TYPE_INIT,
            DeliveryMode::Smi | DeliveryMode::ExtInt => return None,
        };
        let mode = if request.logical_destination {
            DESTINATION_LOGICAL
        } else {
            0
        };
        let trigger = if request.level_triggered {
            TRIGGER_LEVEL
        } else {
            0
        };
        Some(Self {
            bitfield: kind | (mode << 8) | (trigger << 12),
            destination: u32::from(request.destination),
            vector: u32::from(request.vector),
        })
    }

    /// The Windows structure.
    #[cfg(windows)]
    pub fn to_whv(self) -> windows::Win32::System::Hypervisor::WHV_INTERRUPT_CONTROL {
        windows::Win32::System::Hypervisor::WHV_INTERRUPT_CONTROL {
            _bitfield: self.bitfield,
            Destination: self.destination,
            Vector: self.vector,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(mode: DeliveryMode, logical: bool, level: bool) -> InterruptRequest {
        InterruptRequest {
            destination: 5,
            logical_destination: logical,
            delivery_mode: mode,
            vector: 0x41,
            level_triggered: level,
        }
    }

    #[test]
    fn fields_land_in_their_bits() {
        let c = InterruptControl::from_request(&request(DeliveryMode::Fixed, false, false));
        assert_eq!(
            c,
            Some(InterruptControl {
                bitfield: 0,
                destination: 5,
                vector: 0x41
            })
        );
        let c = InterruptControl::from_request(&request(DeliveryMode::LowestPriority, true, true))
            .unwrap();
        assert_eq!(c.bitfield, 0x1101);
        let c = InterruptControl::from_request(&request(DeliveryMode::Nmi, false, false)).unwrap();
        assert_eq!(c.bitfield, 4);
        let c = InterruptControl::from_request(&request(DeliveryMode::Init, false, false)).unwrap();
        assert_eq!(c.bitfield, 5);
    }

    #[test]
    fn an_msi_becomes_the_control_whp_expects() {
        // Physical destination 2, vector 0x30, edge: what a virtio MSI-X vector usually holds.
        let msi = InterruptRequest::from_msi(0xfee0_2000, 0x30).unwrap();
        let c = InterruptControl::from_request(&msi).unwrap();
        assert_eq!((c.bitfield, c.destination, c.vector), (0, 2, 0x30));
    }

    #[test]
    fn modes_whp_cannot_request_are_refused() {
        for mode in [DeliveryMode::Smi, DeliveryMode::ExtInt] {
            assert_eq!(
                InterruptControl::from_request(&request(mode, false, false)),
                None
            );
        }
    }

    #[cfg(windows)]
    #[test]
    fn the_constants_match_the_windows_headers() {
        use windows::Win32::System::Hypervisor as h;
        assert_eq!(TYPE_FIXED, h::WHvX64InterruptTypeFixed.0 as u64);
        assert_eq!(
            TYPE_LOWEST_PRIORITY,
            h::WHvX64InterruptTypeLowestPriority.0 as u64
        );
        assert_eq!(TYPE_NMI, h::WHvX64InterruptTypeNmi.0 as u64);
        assert_eq!(TYPE_INIT, h::WHvX64InterruptTypeInit.0 as u64);
        assert_eq!(
            DESTINATION_LOGICAL,
            h::WHvX64InterruptDestinationModeLogical.0 as u64
        );
        assert_eq!(TRIGGER_LEVEL, h::WHvX64InterruptTriggerModeLevel.0 as u64);
        let whv = InterruptControl {
            bitfield: 0x1101,
            destination: 3,
            vector: 0x50,
        }
        .to_whv();
        assert_eq!(
            (whv._bitfield, whv.Destination, whv.Vector),
            (0x1101, 3, 0x50)
        );
    }
}
