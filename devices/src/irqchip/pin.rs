//! `IoapicPin`: one IOAPIC input as an `InterruptLine`, so a device written against the
//! interrupt seam (the serial port, say) raises its interrupt through the user-space IOAPIC
//! where the hypervisor has none in the kernel.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use super::ioapic::Ioapic;
use super::pic::Pic;
use crate::interrupt::InterruptLine;

/// IOAPIC input `pin`. Each trigger is a pulse (assert, then deassert), as a KVM irqfd raises
/// its GSI.
#[derive(Debug, Clone)]
pub struct IoapicPin {
    ioapic: Arc<Mutex<Ioapic>>,
    pin: usize,
}

impl IoapicPin {
    /// Input `pin` of `ioapic`.
    pub fn new(ioapic: Arc<Mutex<Ioapic>>, pin: usize) -> Self {
        Self { ioapic, pin }
    }
}

impl InterruptLine for IoapicPin {
    fn trigger(&self) -> io::Result<()> {
        let mut ioapic = self.ioapic.lock().unwrap_or_else(PoisonError::into_inner);
        ioapic.set_irq(self.pin, true);
        ioapic.set_irq(self.pin, false);
        Ok(())
    }
}

/// ISA interrupt `irq` as KVM's default routing raises it: PIC input `irq` and IOAPIC pin
/// `gsi` (the pin the MADT states for it; skiff's tables keep every ISA IRQ on the pin of the
/// same number). Each trigger is a pulse on both.
#[derive(Debug, Clone)]
pub struct IsaIrq {
    pic: Arc<Mutex<Pic>>,
    ioapic: Arc<Mutex<Ioapic>>,
    irq: u8,
    gsi: usize,
}

impl IsaIrq {
    /// ISA `irq` on PIC input `irq` and IOAPIC pin `gsi`.
    pub fn new(pic: Arc<Mutex<Pic>>, ioapic: Arc<Mutex<Ioapic>>, irq: u8, gsi: usize) -> Self {
        Self {
            pic,
            ioapic,
            irq,
            gsi,
        }
    }
}

impl InterruptLine for IsaIrq {
    fn trigger(&self) -> io::Result<()> {
        {
            let mut pic = self.pic.lock().unwrap_or_else(PoisonError::into_inner);
            pic.set_irq(self.irq, true);
            pic.set_irq(self.irq, false);
        }
        IoapicPin::new(self.ioapic.clone(), self.gsi).trigger()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::irqchip::{InterruptRequest, InterruptSink};
    use crate::legacy::serial::Serial;

    #[derive(Debug, Default)]
    struct Count(Mutex<Vec<InterruptRequest>>);

    impl InterruptSink for Count {
        fn deliver(&self, request: InterruptRequest) -> io::Result<()> {
            self.0.lock().unwrap().push(request);
            Ok(())
        }
    }

    #[test]
    fn the_serial_port_interrupts_through_an_ioapic_pin() {
        let sink = Arc::new(Count::default());
        let ioapic = Arc::new(Mutex::new(Ioapic::new(sink.clone())));
        // Route pin 4 (COM1) edge-triggered to vector 0x24 on APIC 0.
        {
            let mut io = ioapic.lock().unwrap();
            io.write(0x00, &0x18u32.to_le_bytes());
            io.write(0x10, &0x24u32.to_le_bytes());
        }
        let mut serial = Serial::new(None, IoapicPin::new(ioapic.clone(), 4));
        // IER: THR-empty interrupt on; the UART raises it at once (THR is empty).
        serial.write(1, &[0x02]);
        let got = sink.0.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].vector, 0x24);
        // The pulse leaves the pin deasserted, so the next interrupt is a new edge: the guest
        // reads IIR (acknowledging THR-empty), writes a byte, and THR is empty again.
        serial.read(2, &mut [0]);
        serial.write(0, b"x");
        assert_eq!(sink.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn an_isa_irq_reaches_the_pic_input_and_its_ioapic_pin() {
        let sink = Arc::new(Count::default());
        let ioapic = Arc::new(Mutex::new(Ioapic::new(sink.clone())));
        let pic = Arc::new(Mutex::new(Pic::new()));
        {
            // IOAPIC pin 2 edge-triggered to vector 0x30 on APIC 0.
            let mut io = ioapic.lock().unwrap();
            io.write(0x00, &0x14u32.to_le_bytes());
            io.write(0x10, &0x30u32.to_le_bytes());
        }
        {
            // Master PIC: ICW1 edge + ICW4, vector base 0x20, slave on 2, 8086 mode; unmasked.
            let mut p = pic.lock().unwrap();
            for (port, value) in [
                (0x20, 0x11),
                (0x21, 0x20),
                (0x21, 0x04),
                (0x21, 0x01),
                (0x21, 0x00),
            ] {
                p.write_port(port, value);
            }
        }
        let line = IsaIrq::new(pic.clone(), ioapic, 0, 2);
        line.trigger().unwrap();
        let got = sink.0.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].vector, 0x30);
        let mut p = pic.lock().unwrap();
        assert!(p.has_interrupt());
        assert_eq!(p.acknowledge(), 0x20);
    }
}
