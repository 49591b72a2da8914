//! The ACPI hardware-reduced power-management registers the FADT points at: a sleep control
//! register (a write with SLP_EN and SLP_TYP = S5 powers the guest off), a sleep status register,
//! and the reset register (a write of `RESET_VALUE` resets the guest).
//!
//! Three consecutive I/O ports from `ACPI_PM_PORT`. The FADT and the DSDT's `\_S5_` package
//! (arch::acpi) take the same constants, so the guest's view and this device cannot drift apart.

pub use arch::acpi::{
    ACPI_RESET_OFFSET as RESET_OFFSET, ACPI_RESET_VALUE as RESET_VALUE,
    ACPI_SLEEP_CONTROL_OFFSET as SLEEP_CONTROL_OFFSET,
    ACPI_SLEEP_STATUS_OFFSET as SLEEP_STATUS_OFFSET, S5_SLEEP_TYPE,
};
pub use arch::layout::{ACPI_PM_PORT, ACPI_PM_PORT_LEN};

use crate::bus::BusDevice;
use crate::vm_exit::{GuestEnd, VmExitSignal};

/// SLP_EN: bit 5 of the sleep control register.
const SLP_EN: u8 = 1 << 5;
/// SLP_TYP: bits 4:2 of the sleep control register.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
/// WAK_STS: bit 7 of the sleep status register.
const WAK_STS: u8 = 1 << 7;

/// The power-management register block.
#[derive(Debug)]
pub struct AcpiPm {
    exit: VmExitSignal,
    /// Rate limit for the warnings the guest's sleep requests cause.
    warnings: crate::guest_warnings::GuestWarnings,
}

impl AcpiPm {
    /// Creates the block; power-off and reset requests go to `exit`.
    pub fn new(exit: VmExitSignal) -> Self {
        Self {
            exit,
            warnings: crate::guest_warnings::GuestWarnings::new("ACPI PM"),
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == SLEEP_STATUS_OFFSET {
            // A guest polling for wake after a sleep it never reaches sees "awake".
            if let Some(b) = data.first_mut() {
                *b = WAK_STS;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            SLEEP_CONTROL_OFFSET => {
                let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if value & SLP_EN != 0 && sleep_type == S5_SLEEP_TYPE {
                    self.exit.request(GuestEnd::PowerOff);
                } else if value & SLP_EN != 0 {
                    crate::guest_warn!(
                        Some(&self.warnings),
                        "unsupported sleep",
                        "guest asked for ACPI sleep type {sleep_type}, which skiff does not support; ignored"
                    );
                }
            }
            RESET_OFFSET if value == RESET_VALUE => self.exit.request(GuestEnd::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm() -> (AcpiPm, VmExitSignal) {
        let exit = VmExitSignal::new().unwrap();
        (AcpiPm::new(exit.clone()), exit)
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut pm, exit) = pm();
        pm.write(SLEEP_CONTROL_OFFSET, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(exit.reason(), Some(GuestEnd::PowerOff));
    }

    #[test]
    fn other_sleep_types_and_missing_slp_en_do_nothing() {
        let (mut pm, exit) = pm();
        pm.write(SLEEP_CONTROL_OFFSET, &[S5_SLEEP_TYPE << 2]);
        pm.write(SLEEP_CONTROL_OFFSET, &[(3 << 2) | SLP_EN]);
        pm.write(SLEEP_CONTROL_OFFSET, &[]);
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn reset_register_resets_only_on_its_value() {
        let (mut pm, exit) = pm();
        pm.write(RESET_OFFSET, &[0x42]);
        assert_eq!(exit.reason(), None);
        pm.write(RESET_OFFSET, &[RESET_VALUE]);
        assert_eq!(exit.reason(), Some(GuestEnd::Reset));
    }

    #[test]
    fn sleep_status_reads_awake() {
        let (mut pm, _) = pm();
        let mut b = [0u8; 1];
        pm.read(SLEEP_STATUS_OFFSET, &mut b);
        assert_eq!(b[0], WAK_STS);
        pm.read(SLEEP_CONTROL_OFFSET, &mut b);
        assert_eq!(b[0], 0);
    }
}
