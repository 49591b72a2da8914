//! The IOAPIC against KVM's in-kernel behaviour (virt/kvm/ioapic.c), one behaviour per test.

use std::sync::Mutex;

use super::*;

#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<InterruptRequest>>);

impl InterruptSink for Recorder {
    fn deliver(&self, request: InterruptRequest) -> std::io::Result<()> {
        self.0.lock().unwrap().push(request);
        Ok(())
    }
}

impl Recorder {
    fn take(&self) -> Vec<InterruptRequest> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn ioapic() -> (Ioapic, Arc<Recorder>) {
    let sink = Arc::new(Recorder::default());
    (Ioapic::new(sink.clone()), sink)
}

fn write_reg(io: &mut Ioapic, reg: u32, value: u32) {
    io.write(IOREGSEL, &reg.to_le_bytes());
    io.write(IOWIN, &value.to_le_bytes());
}

fn read_reg(io: &mut Ioapic, reg: u32) -> u32 {
    io.write(IOREGSEL, &reg.to_le_bytes());
    let mut b = [0; 4];
    io.read(IOWIN, &mut b);
    u32::from_le_bytes(b)
}

fn route(io: &mut Ioapic, pin: u32, low: u32, destination: u8) {
    write_reg(io, 0x10 + 2 * pin + 1, u32::from(destination) << 24);
    write_reg(io, 0x10 + 2 * pin, low);
}

const LEVEL: u32 = 1 << 15;

#[test]
fn reset_masks_every_pin_and_reports_version_0x11_with_24_pins() {
    let (mut io, _) = ioapic();
    assert_eq!(read_reg(&mut io, 0x01), 0x0017_0011);
    assert_eq!(read_reg(&mut io, 0x00), 0);
    for pin in 0..24 {
        assert_eq!(read_reg(&mut io, 0x10 + 2 * pin), 1 << 16, "pin {pin}");
        assert_eq!(read_reg(&mut io, 0x11 + 2 * pin), 0, "pin {pin}");
    }
    // Past the table: reads as zero.
    assert_eq!(read_reg(&mut io, 0x10 + 48), 0);
}

#[test]
fn the_id_register_holds_four_bits_and_arbitration_mirrors_it() {
    let (mut io, _) = ioapic();
    write_reg(&mut io, 0x00, 0xff00_0000);
    assert_eq!(read_reg(&mut io, 0x00), 0x0f00_0000);
    assert_eq!(read_reg(&mut io, 0x02), 0x0f00_0000);
    // The version register ignores writes.
    write_reg(&mut io, 0x01, 0);
    assert_eq!(read_reg(&mut io, 0x01), 0x0017_0011);
}

#[test]
fn delivery_status_and_remote_irr_are_read_only() {
    let (mut io, _) = ioapic();
    write_reg(
        &mut io,
        0x10,
        0x30 | (1 << 12) | (1 << 14) | LEVEL | (1 << 16),
    );
    assert_eq!(read_reg(&mut io, 0x10), 0x30 | LEVEL | (1 << 16));
    write_reg(&mut io, 0x11, 0xab00_0000);
    assert_eq!(read_reg(&mut io, 0x11), 0xab00_0000);
}

#[test]
fn narrow_reads_see_bytes_of_the_register_and_narrow_writes_are_ignored() {
    let (mut io, _) = ioapic();
    io.write(IOREGSEL, &[0x01, 0, 0, 0]);
    let mut b = [0; 2];
    io.read(IOWIN + 2, &mut b);
    assert_eq!(b, [0x17, 0x00]);
    io.write(IOREGSEL, &[0x10]);
    let mut sel = [0; 4];
    io.read(IOREGSEL, &mut sel);
    assert_eq!(u32::from_le_bytes(sel), 0x01);
}

#[test]
fn an_edge_pin_delivers_on_every_assertion() {
    let (mut io, sink) = ioapic();
    route(&mut io, 4, 0x24, 1);
    io.set_irq(4, true);
    io.set_irq(4, false);
    io.set_irq(4, true);
    let got = sink.take();
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[0],
        InterruptRequest {
            destination: 1,
            logical_destination: false,
            delivery_mode: DeliveryMode::Fixed,
            vector: 0x24,
            level_triggered: false,
        }
    );
}

#[test]
fn an_edge_asserted_while_masked_is_not_delivered_on_unmask() {
    let (mut io, sink) = ioapic();
    route(&mut io, 3, 0x23 | (1 << 16), 0);
    io.set_irq(3, true);
    route(&mut io, 3, 0x23, 0);
    assert!(sink.take().is_empty());
    // A new edge after the line drops is delivered.
    io.set_irq(3, false);
    io.set_irq(3, true);
    assert_eq!(sink.take().len(), 1);
}

#[test]
fn a_level_pin_waits_for_the_eoi_of_its_vector() {
    let (mut io, sink) = ioapic();
    route(&mut io, 9, 0x29 | LEVEL, 0);
    io.set_irq(9, true);
    assert_eq!(sink.take().len(), 1);
    assert_ne!(
        read_reg(&mut io, 0x10 + 18) & (1 << 14),
        0,
        "remote IRR set"
    );
    // Still asserted, not EOIed: nothing new.
    io.set_irq(9, true);
    assert!(sink.take().is_empty());
    // Another vector's EOI changes nothing.
    io.end_of_interrupt(0x30);
    assert!(sink.take().is_empty());
    // The EOI with the line still high delivers again.
    io.end_of_interrupt(0x29);
    let again = sink.take();
    assert_eq!(again.len(), 1);
    assert!(again[0].level_triggered);
    // Line low, then EOI: remote IRR clears and nothing is delivered.
    io.set_irq(9, false);
    io.end_of_interrupt(0x29);
    assert!(sink.take().is_empty());
    assert_eq!(read_reg(&mut io, 0x10 + 18) & (1 << 14), 0);
}

#[test]
fn a_level_pin_asserted_while_masked_is_delivered_on_unmask() {
    let (mut io, sink) = ioapic();
    route(&mut io, 10, 0x2a | LEVEL | (1 << 16), 2);
    io.set_irq(10, true);
    assert!(sink.take().is_empty());
    route(&mut io, 10, 0x2a | LEVEL, 2);
    let got = sink.take();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].destination, 2);
}

#[test]
fn switching_to_edge_clears_remote_irr() {
    let (mut io, sink) = ioapic();
    route(&mut io, 5, 0x25 | LEVEL, 0);
    io.set_irq(5, true);
    assert_eq!(sink.take().len(), 1);
    route(&mut io, 5, 0x25, 0);
    assert_eq!(read_reg(&mut io, 0x10 + 10) & (1 << 14), 0);
}

#[test]
fn logical_destinations_and_delivery_modes_reach_the_request() {
    let (mut io, sink) = ioapic();
    // Logical mask 0x03, lowest priority.
    route(&mut io, 1, 0x31 | (1 << 8) | (1 << 11), 0x03);
    io.set_irq(1, true);
    // NMI.
    route(&mut io, 2, 4 << 8, 0);
    io.set_irq(2, true);
    // Reserved mode 3: dropped.
    route(&mut io, 6, 0x26 | (3 << 8), 0);
    io.set_irq(6, true);
    let got = sink.take();
    assert_eq!(got.len(), 2);
    assert!(got[0].logical_destination);
    assert_eq!(got[0].destination, 0x03);
    assert_eq!(got[0].delivery_mode, DeliveryMode::LowestPriority);
    assert_eq!(got[1].delivery_mode, DeliveryMode::Nmi);
}

#[test]
fn pins_past_the_last_are_ignored() {
    let (mut io, sink) = ioapic();
    io.set_irq(24, true);
    io.set_irq(usize::MAX, true);
    assert!(sink.take().is_empty());
}

#[test]
fn state_survives_save_and_restore() {
    let (mut io, sink) = ioapic();
    write_reg(&mut io, 0x00, 0x0200_0000);
    route(&mut io, 7, 0x27 | LEVEL, 1);
    io.set_irq(7, true);
    sink.take();
    let state = io.save();
    let mut back = Ioapic::restore(sink.clone(), &state).unwrap();
    assert_eq!(back.save(), state);
    // The restored remote IRR still holds back the asserted line until the EOI.
    back.end_of_interrupt(0x27);
    assert_eq!(sink.take().len(), 1);
    let short = IoapicState {
        redirection: vec![0; 3],
        ..state
    };
    assert_eq!(
        Ioapic::restore(sink, &short).err(),
        Some(IoapicStateError { found: 3 })
    );
}
