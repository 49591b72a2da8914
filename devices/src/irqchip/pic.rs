//! The two cascaded 8259A PICs of a PC (master at 0x20, slave at 0xa0 on the master's pin 2)
//! and their edge/level control registers (ELCR, 0x4d0 and 0x4d1), in user space.
//!
//! It behaves as KVM's in-kernel PIC does (the unit tests name each behaviour):
//! - ICW1 starts initialization: IMR, ISR and priority are cleared, and IRR keeps only the
//!   level-triggered pins; ICW2 sets the vector base (bits 7:3), ICW3 is taken and ignored,
//!   ICW4 (when ICW1 asks for it) selects auto-EOI and special fully nested mode;
//! - an edge pin is requested on a rising edge, a level pin while its line is high;
//! - acknowledging takes the highest-priority unmasked request, sets its ISR bit (not in
//!   auto-EOI mode), clears an edge request, and answers the slave's vector through pin 2;
//!   with nothing pending it answers the spurious IRQ 7 of the chip asked;
//! - OCW2 non-specific and specific EOI, rotation; OCW3 selects IRR or ISR for reads;
//! - ELCR bits for pins 0, 1, 2 (master) and 8, 13 (slave) always read zero.
//!
//! Two details follow the 8259A data sheet rather than KVM: the slave's request is the
//! master's pin 2 as a level (KVM latches it as an edge), and a poll answers 0x80 | pin, or 0
//! when nothing is pending (KVM answers the bare pin, or 7).
//!
//! The output (`has_interrupt`, `acknowledge`) is what a backend injects as an ExtINT when the
//! vCPU can take it. Not wired to a WHP vCPU yet (docs/windows.md).

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;

/// ELCR bits that can be set, per chip (KVM's `elcr_mask`).
const ELCR_MASK: [u8; 2] = [0xf8, 0xde];
/// The master's pin the slave is cascaded on.
const CASCADE_PIN: u8 = 2;

/// One 8259A.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicChip {
    /// Edge-sensing state of each pin's line.
    pub last_irr: u8,
    /// Interrupt requests.
    pub irr: u8,
    /// Interrupt mask.
    pub imr: u8,
    /// In service.
    pub isr: u8,
    /// Lowest-priority rotation base.
    pub priority_add: u8,
    /// Vector of pin 0.
    pub irq_base: u8,
    /// OCW3: reads of the command port return ISR (true) or IRR.
    pub read_isr: bool,
    /// OCW3 poll command pending.
    pub poll: bool,
    /// Special mask mode.
    pub special_mask: bool,
    /// Next initialization word expected (0: initialized; 1..=3: ICW2..ICW4).
    pub init_state: u8,
    /// Auto-EOI mode.
    pub auto_eoi: bool,
    /// Rotate on auto-EOI.
    pub rotate_on_auto_eoi: bool,
    /// Special fully nested mode.
    pub special_fully_nested: bool,
    /// ICW4 expected.
    pub init4: bool,
    /// Single (not cascaded) mode.
    pub single: bool,
    /// Level-triggered pins.
    pub elcr: u8,
}

impl PicChip {
    /// The pin of highest priority set in `mask`, or `None`.
    fn priority(&self, mask: u8) -> Option<u8> {
        (0..8u8).find(|p| mask & (1 << ((p + self.priority_add) & 7)) != 0)
    }

    /// The pin this chip requests the CPU for, if any beats what is in service.
    fn output(&self, slave_pending: bool) -> Option<u8> {
        let mut irr = self.irr;
        if slave_pending {
            irr |= 1 << CASCADE_PIN;
        }
        let requested = self.priority(irr & !self.imr)?;
        let mut in_service = self.isr;
        // Special fully nested mode (master): the slave may interrupt its own service.
        if self.special_fully_nested {
            in_service &= !(1 << CASCADE_PIN);
        }
        if self.special_mask {
            in_service &= !self.imr;
        }
        match self.priority(in_service) {
            Some(busy) if busy <= requested => None,
            _ => Some((requested + self.priority_add) & 7),
        }
    }

    fn set_irq(&mut self, pin: u8, level: bool) {
        let bit = 1 << pin;
        if self.elcr & bit != 0 {
            // Level-triggered: the request follows the line.
            if level {
                self.irr |= bit;
                self.last_irr |= bit;
            } else {
                self.irr &= !bit;
                self.last_irr &= !bit;
            }
        } else if level {
            if self.last_irr & bit == 0 {
                self.irr |= bit;
            }
            self.last_irr |= bit;
        } else {
            self.last_irr &= !bit;
        }
    }

    /// Acknowledges `pin`: into service (unless auto-EOI), edge request cleared.
    fn acknowledge(&mut self, pin: u8) {
        let bit = 1 << pin;
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (pin + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
        if self.elcr & bit == 0 {
            self.irr &= !bit;
        }
    }

    fn write_command(&mut self, value: u8) {
        if value & 0x10 != 0 {
            // ICW1.
            self.init4 = value & 1 != 0;
            self.single = value & 2 != 0;
            self.last_irr = 0;
            self.irr &= self.elcr;
            self.imr = 0;
            self.isr = 0;
            self.priority_add = 0;
            self.special_mask = false;
            self.read_isr = false;
            self.poll = false;
            self.auto_eoi = false;
            self.rotate_on_auto_eoi = false;
            self.special_fully_nested = false;
            self.init_state = 1;
        } else if value & 0x08 != 0 {
            // OCW3.
            if value & 0x04 != 0 {
                self.poll = true;
            }
            if value & 0x02 != 0 {
                self.read_isr = value & 0x01 != 0;
            }
            if value & 0x40 != 0 {
                self.special_mask = value & 0x20 != 0;
            }
        } else {
            self.ocw2(value);
        }
    }

    fn ocw2(&mut self, value: u8) {
        match value >> 5 {
            0 | 4 => self.rotate_on_auto_eoi = value >> 7 != 0,
            // Non-specific EOI, optionally rotating.
            1 | 5 => {
                if let Some(p) = self.priority(self.isr) {
                    let pin = (p + self.priority_add) & 7;
                    self.isr &= !(1 << pin);
                    if value >> 5 == 5 {
                        self.priority_add = (pin + 1) & 7;
                    }
                }
            }
            // Specific EOI, optionally rotating.
            3 | 7 => {
                let pin = value & 7;
                self.isr &= !(1 << pin);
                if value >> 5 == 7 {
                    self.priority_add = (pin + 1) & 7;
                }
            }
            // Set priority.
            6 => self.priority_add = (value + 1) & 7,
            _ => {}
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.init_state {
            0 => self.imr = value,
            1 => {
                self.irq_base = value & 0xf8;
                self.init_state = if !self.single {
                    2
                } else if self.init4 {
                    3
                } else {
                    0
                };
            }
            2 => self.init_state = if self.init4 { 3 } else { 0 },
            _ => {
                self.special_fully_nested = value & 0x10 != 0;
                self.auto_eoi = value & 0x02 != 0;
                self.init_state = 0;
            }
        }
    }
}

/// The master and slave PICs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pic {
    /// Master (0x20) and slave (0xa0).
    pub chips: [PicChip; 2],
}

impl Pic {
    /// Both chips in their power-on state (uninitialized, nothing masked).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets ISA IRQ `irq` (0..16) to `level`; others are ignored.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        if irq < 16 {
            self.chips[usize::from(irq >> 3)].set_irq(irq & 7, level);
        }
    }

    fn slave_output(&self) -> Option<u8> {
        self.chips[1].output(false)
    }

    /// Whether the master asks the CPU for an interrupt (its INTR line).
    pub fn has_interrupt(&self) -> bool {
        self.chips[0]
            .output(self.slave_output().is_some())
            .is_some()
    }

    /// The CPU's interrupt acknowledge: the vector to deliver (the spurious IRQ 7 or 15 when
    /// the request went away).
    pub fn acknowledge(&mut self) -> u8 {
        let slave = self.slave_output();
        let Some(pin) = self.chips[0].output(slave.is_some()) else {
            return self.chips[0].irq_base.wrapping_add(7);
        };
        self.chips[0].acknowledge(pin);
        if pin != CASCADE_PIN {
            return self.chips[0].irq_base.wrapping_add(pin);
        }
        match slave {
            Some(s) => {
                self.chips[1].acknowledge(s);
                self.chips[1].irq_base.wrapping_add(s)
            }
            None => self.chips[1].irq_base.wrapping_add(7),
        }
    }

    fn poll(&mut self, chip: usize) -> u8 {
        self.chips[chip].poll = false;
        let slave = chip == 0 && self.slave_output().is_some();
        match self.chips[chip].output(slave) {
            Some(pin) => {
                self.chips[chip].acknowledge(pin);
                0x80 | pin
            }
            None => 0,
        }
    }

    /// A read of one byte at I/O port `port` (0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1).
    pub fn read_port(&mut self, port: u16) -> u8 {
        match port {
            0x4d0 | 0x4d1 => self.chips[usize::from(port & 1)].elcr,
            _ => {
                let chip = usize::from(port >> 7 & 1);
                let c = &self.chips[chip];
                if c.poll {
                    self.poll(chip)
                } else if port & 1 == 1 {
                    c.imr
                } else if c.read_isr {
                    c.isr
                } else {
                    c.irr
                }
            }
        }
    }

    /// A write of one byte at I/O port `port`.
    pub fn write_port(&mut self, port: u16, value: u8) {
        match port {
            0x4d0 | 0x4d1 => {
                let chip = usize::from(port & 1);
                self.chips[chip].elcr = value & ELCR_MASK[chip];
            }
            _ => {
                let c = &mut self.chips[usize::from(port >> 7 & 1)];
                if port & 1 == 0 {
                    c.write_command(value);
                } else {
                    c.write_data(value);
                }
            }
        }
    }
}

/// The PIC on the port I/O bus at one of its ranges: `base` is 0x20, 0xa0 or 0x4d0, and each
/// range is two ports wide.
#[derive(Debug)]
pub struct PicPorts {
    pic: std::sync::Arc<std::sync::Mutex<Pic>>,
    base: u16,
}

impl PicPorts {
    /// The ports at `base` of `pic`.
    pub fn new(pic: std::sync::Arc<std::sync::Mutex<Pic>>, base: u16) -> Self {
        Self { pic, base }
    }
}

impl BusDevice for PicPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut pic = self
            .pic
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The PIC's registers are bytes; wider reads see the register in the low byte.
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u16::try_from(offset)) {
            *first = pic.read_port(self.base.wrapping_add(offset));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut pic = self
            .pic
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let (Some(&value), Ok(offset)) = (data.first(), u16::try_from(offset)) {
            pic.write_port(self.base.wrapping_add(offset), value);
        }
    }
}

#[cfg(test)]
mod tests;
