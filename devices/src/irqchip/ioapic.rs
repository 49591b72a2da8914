//! The IOAPIC (82093AA programming model, version 0x11, 24 pins) in user space: the indirect
//! register window at its MMIO base, the redirection table, pin levels, and delivery of each
//! routed pin as an `InterruptRequest` to the backend's `InterruptSink`.
//!
//! It behaves as KVM's in-kernel IOAPIC does (the unit tests name each behaviour):
//! - after reset every pin is masked, the ID is 0 and the version register reads 0x0017_0011;
//! - delivery status (bit 12) and remote IRR (bit 14) are read-only;
//! - an edge pin delivers on each assertion while unmasked; an assertion while masked is not
//!   delivered on unmask;
//! - a level pin delivers while asserted, unmasked and without remote IRR, sets remote IRR, and
//!   is delivered again at the EOI of its vector if still asserted, or when unmasked while
//!   asserted;
//! - switching an entry to edge clears its remote IRR.
//!
//! It does not own the local APICs (the hypervisor emulates them) or the PIC.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::request::{DeliveryMode, InterruptRequest, InterruptSink};
use crate::bus::BusDevice;
use crate::persist::Persist;

/// Input pins.
pub const IOAPIC_PINS: usize = 24;

/// MMIO offsets: the register select and the data window.
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;

/// Indirect registers.
const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARBITRATION: u32 = 0x02;
const REG_REDIRECTION: u32 = 0x10;

/// Version 0x11 with the highest pin number in bits 23:16, as KVM reports.
const VERSION: u32 = 0x11 | ((IOAPIC_PINS as u32 - 1) << 16);

/// Redirection entry fields.
const VECTOR: u64 = 0xff;
const DELIVERY_MODE_SHIFT: u32 = 8;
const DESTINATION_LOGICAL: u64 = 1 << 11;
const DELIVERY_STATUS: u64 = 1 << 12;
const REMOTE_IRR: u64 = 1 << 14;
const LEVEL_TRIGGERED: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
const DESTINATION_SHIFT: u32 = 56;
const READ_ONLY: u64 = DELIVERY_STATUS | REMOTE_IRR;

/// The IOAPIC's state, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicState {
    /// The ID register.
    pub id: u32,
    /// The selected register.
    pub select: u32,
    /// The redirection table, one entry per pin.
    pub redirection: Vec<u64>,
    /// Pins asserted and not yet delivered (edge) or still asserted (level), one bit each.
    pub irr: u32,
}

/// The IOAPIC.
#[derive(Debug)]
pub struct Ioapic {
    id: u32,
    select: u32,
    redirection: [u64; IOAPIC_PINS],
    irr: u32,
    sink: Arc<dyn InterruptSink>,
}

impl Ioapic {
    /// An IOAPIC in its reset state, delivering to `sink`.
    pub fn new(sink: Arc<dyn InterruptSink>) -> Self {
        Self {
            id: 0,
            select: 0,
            redirection: [MASKED; IOAPIC_PINS],
            irr: 0,
            sink,
        }
    }

    /// Sets input `pin` to `level`; pins past the last are ignored.
    pub fn set_irq(&mut self, pin: usize, level: bool) {
        let Some(&entry) = self.redirection.get(pin) else {
            return;
        };
        let bit = 1u32 << pin;
        if !level {
            self.irr &= !bit;
            return;
        }
        let before = self.irr;
        self.irr |= bit;
        let edge = entry & LEVEL_TRIGGERED == 0;
        // An edge that is already pending, or a level pin the guest has not EOIed yet,
        // merges with the interrupt already on its way.
        if (edge && before == self.irr) || (!edge && entry & REMOTE_IRR != 0) {
            return;
        }
        self.service(pin);
    }

    /// The local APICs signalled an EOI for `vector`: level pins routed to it drop their
    /// remote IRR and, if still asserted, are delivered again.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for pin in 0..IOAPIC_PINS {
            let entry = self.redirection[pin];
            if entry & VECTOR != u64::from(vector)
                || entry & LEVEL_TRIGGERED == 0
                || entry & REMOTE_IRR == 0
            {
                continue;
            }
            self.redirection[pin] &= !REMOTE_IRR;
            if self.irr & (1 << pin) != 0 {
                self.service(pin);
            }
        }
    }

    /// Delivers `pin` if its entry allows it.
    fn service(&mut self, pin: usize) {
        let entry = self.redirection[pin];
        if entry & MASKED != 0 {
            return;
        }
        let Some(delivery_mode) = DeliveryMode::from_bits((entry >> DELIVERY_MODE_SHIFT) as u8)
        else {
            log::warn!(
                "IOAPIC pin {pin}: reserved delivery mode in entry {entry:#x}, not delivered"
            );
            return;
        };
        let level_triggered = entry & LEVEL_TRIGGERED != 0;
        if level_triggered {
            self.redirection[pin] |= REMOTE_IRR;
        } else {
            self.irr &= !(1 << pin);
        }
        let request = InterruptRequest {
            destination: (entry >> DESTINATION_SHIFT) as u8,
            logical_destination: entry & DESTINATION_LOGICAL != 0,
            delivery_mode,
            vector: (entry & VECTOR) as u8,
            level_triggered,
        };
        if let Err(e) = self.sink.deliver(request) {
            log::warn!("IOAPIC pin {pin}: cannot deliver {request:?}: {e}");
        }
    }

    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID | REG_ARBITRATION => (self.id & 0xf) << 24,
            REG_VERSION => VERSION,
            reg => match self.entry_half(reg) {
                Some((pin, false)) => self.redirection[pin] as u32,
                Some((pin, true)) => (self.redirection[pin] >> 32) as u32,
                None => 0,
            },
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.select {
            REG_ID => self.id = (value >> 24) & 0xf,
            reg => {
                let Some((pin, high)) = self.entry_half(reg) else {
                    return;
                };
                let old = self.redirection[pin];
                let written = if high {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                } else {
                    (old & !0xffff_ffff) | u64::from(value)
                };
                let mut entry = (written & !READ_ONLY) | (old & READ_ONLY);
                if entry & LEVEL_TRIGGERED == 0 {
                    entry &= !REMOTE_IRR;
                }
                self.redirection[pin] = entry;
                // A level pin asserted while masked is delivered once unmasked.
                if entry & LEVEL_TRIGGERED != 0
                    && entry & (MASKED | REMOTE_IRR) == 0
                    && self.irr & (1 << pin) != 0
                {
                    self.service(pin);
                }
            }
        }
    }

    /// The pin and half (high: bits 63:32) a redirection register selects.
    fn entry_half(&self, reg: u32) -> Option<(usize, bool)> {
        let index = usize::try_from(reg.checked_sub(REG_REDIRECTION)?).ok()?;
        (index < 2 * IOAPIC_PINS).then_some((index / 2, index % 2 == 1))
    }
}

/// Why a saved IOAPIC state cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("saved IOAPIC has {found} redirection entries, expected {IOAPIC_PINS}")]
pub struct IoapicStateError {
    /// Entries in the saved state.
    pub found: usize,
}

impl Persist for Ioapic {
    type State = IoapicState;
    /// Where the IOAPIC delivers its interrupts.
    type RestoreArgs = Arc<dyn InterruptSink>;
    type Error = IoapicStateError;

    fn save(&self) -> IoapicState {
        IoapicState {
            id: self.id,
            select: self.select,
            redirection: self.redirection.to_vec(),
            irr: self.irr,
        }
    }

    /// An IOAPIC in `state` delivering to `sink`; refused unless the state has one entry per
    /// pin. Other fields are cut to their width.
    fn restore(
        sink: Arc<dyn InterruptSink>,
        state: &IoapicState,
    ) -> Result<Self, IoapicStateError> {
        let found = state.redirection.len();
        Ok(Self {
            id: state.id & 0xf,
            select: state.select & 0xff,
            redirection: state
                .redirection
                .as_slice()
                .try_into()
                .map_err(|_| IoapicStateError { found })?,
            irr: state.irr & ((1 << IOAPIC_PINS) - 1),
            sink,
        })
    }
}

impl BusDevice for Ioapic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset & !0x3 {
            IOREGSEL => self.select,
            IOWIN => self.read_register(),
            _ => 0,
        };
        // Narrow reads see the bytes of the 32-bit register they cover, as KVM returns them.
        let bytes = value.to_le_bytes();
        let start = (offset & 0x3) as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(start + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Only 32-bit (and the low half of 64-bit) accesses write, as on KVM.
        let Some(value) = data
            .get(..4)
            .filter(|_| data.len() == 4 || data.len() == 8)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
        else {
            return;
        };
        match offset {
            IOREGSEL => self.select = value & 0xff,
            IOWIN => self.write_register(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
