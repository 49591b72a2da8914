//! The PIC pair against KVM's in-kernel one (arch/x86/kvm/i8259.c), one behaviour per test.

use std::sync::{Arc, Mutex};

use super::*;

/// Initializes both chips as Linux and firmware do: master vectors 0x20.., slave 0x28..,
/// cascade on pin 2, ICW4 with `icw4`.
fn initialized(icw4: u8) -> Pic {
    let mut pic = Pic::new();
    for (cmd, base, icw3) in [(0x20, 0x20, 0x04), (0xa0, 0x28, 0x02)] {
        pic.write_port(cmd, 0x11);
        pic.write_port(cmd + 1, base);
        pic.write_port(cmd + 1, icw3);
        pic.write_port(cmd + 1, icw4);
    }
    pic
}

fn read_isr(pic: &mut Pic, cmd: u16) -> u8 {
    pic.write_port(cmd, 0x0b);
    let isr = pic.read_port(cmd);
    pic.write_port(cmd, 0x0a);
    isr
}

const NON_SPECIFIC_EOI: u8 = 0x20;

#[test]
fn initialization_sets_the_vector_base_and_unmasks_every_pin() {
    let mut pic = initialized(0x01);
    assert_eq!(pic.read_port(0x21), 0);
    assert_eq!(pic.read_port(0xa1), 0);
    pic.write_port(0x21, 0xfb);
    assert_eq!(pic.read_port(0x21), 0xfb);
    pic.set_irq(1, true);
    // Masked: requested (IRR) but not signalled.
    assert_eq!(pic.read_port(0x20), 0x02);
    assert!(!pic.has_interrupt());
    pic.write_port(0x21, 0x00);
    assert!(pic.has_interrupt());
    assert_eq!(pic.acknowledge(), 0x21);
}

#[test]
fn an_edge_pin_requests_once_per_rising_edge() {
    let mut pic = initialized(0x01);
    pic.set_irq(0, true);
    pic.set_irq(0, true);
    assert_eq!(pic.acknowledge(), 0x20);
    pic.write_port(0x20, NON_SPECIFIC_EOI);
    // The line stayed high: no new edge, no new request.
    assert!(!pic.has_interrupt());
    pic.set_irq(0, false);
    pic.set_irq(0, true);
    assert!(pic.has_interrupt());
}

#[test]
fn a_pin_in_service_holds_back_lower_priorities_until_its_eoi() {
    let mut pic = initialized(0x01);
    pic.set_irq(3, true);
    assert_eq!(pic.acknowledge(), 0x23);
    assert_eq!(read_isr(&mut pic, 0x20), 0x08);
    pic.set_irq(4, true);
    assert!(!pic.has_interrupt(), "IRQ 4 waits behind IRQ 3 in service");
    // A higher priority interrupts the one in service.
    pic.set_irq(1, true);
    assert_eq!(pic.acknowledge(), 0x21);
    pic.write_port(0x20, NON_SPECIFIC_EOI); // ends IRQ 1, the highest in service
    assert_eq!(read_isr(&mut pic, 0x20), 0x08);
    pic.write_port(0x20, 0x60 | 3); // specific EOI for IRQ 3
    assert_eq!(read_isr(&mut pic, 0x20), 0);
    assert_eq!(pic.acknowledge(), 0x24);
}

#[test]
fn the_slave_answers_through_the_masters_pin_2() {
    let mut pic = initialized(0x01);
    pic.set_irq(10, true);
    assert!(pic.has_interrupt());
    assert_eq!(pic.acknowledge(), 0x2a);
    assert_eq!(read_isr(&mut pic, 0x20), 0x04);
    assert_eq!(read_isr(&mut pic, 0xa0), 0x04);
    // The slave is blocked by its own service until both chips get their EOI.
    pic.set_irq(11, true);
    assert!(!pic.has_interrupt());
    pic.write_port(0xa0, NON_SPECIFIC_EOI);
    pic.write_port(0x20, NON_SPECIFIC_EOI);
    assert_eq!(pic.acknowledge(), 0x2b);
}

#[test]
fn nothing_pending_acknowledges_as_the_spurious_irq_7() {
    let mut pic = initialized(0x01);
    assert_eq!(pic.acknowledge(), 0x27);
    assert_eq!(read_isr(&mut pic, 0x20), 0);
}

#[test]
fn auto_eoi_leaves_nothing_in_service() {
    let mut pic = initialized(0x03);
    pic.set_irq(5, true);
    assert_eq!(pic.acknowledge(), 0x25);
    assert_eq!(read_isr(&mut pic, 0x20), 0);
    pic.set_irq(6, true);
    assert_eq!(pic.acknowledge(), 0x26);
}

#[test]
fn a_rotating_eoi_makes_the_ended_pin_lowest_priority() {
    let mut pic = initialized(0x01);
    pic.set_irq(0, true);
    assert_eq!(pic.acknowledge(), 0x20);
    pic.write_port(0x20, 0xa0); // rotate on non-specific EOI
    pic.set_irq(0, false);
    pic.set_irq(0, true);
    pic.set_irq(5, true);
    assert_eq!(pic.acknowledge(), 0x25, "IRQ 0 now has the lowest priority");
}

#[test]
fn level_pins_follow_their_line_and_elcr_keeps_its_fixed_bits_clear() {
    let mut pic = initialized(0x01);
    pic.write_port(0x4d0, 0xff);
    pic.write_port(0x4d1, 0xff);
    assert_eq!(pic.read_port(0x4d0), 0xf8);
    assert_eq!(pic.read_port(0x4d1), 0xde);
    pic.set_irq(9, true);
    assert_eq!(pic.acknowledge(), 0x29);
    pic.write_port(0xa0, NON_SPECIFIC_EOI);
    pic.write_port(0x20, NON_SPECIFIC_EOI);
    // Still high: requested again without a new edge.
    assert_eq!(pic.acknowledge(), 0x29);
    pic.write_port(0xa0, NON_SPECIFIC_EOI);
    pic.write_port(0x20, NON_SPECIFIC_EOI);
    pic.set_irq(9, false);
    assert!(!pic.has_interrupt());
}

#[test]
fn icw1_drops_edge_requests_and_keeps_level_ones() {
    let mut pic = initialized(0x01);
    pic.write_port(0x4d0, 0x08);
    pic.set_irq(3, true); // level
    pic.set_irq(4, true); // edge
    pic.write_port(0x20, 0x11);
    pic.write_port(0x21, 0x20);
    pic.write_port(0x21, 0x04);
    pic.write_port(0x21, 0x01);
    assert_eq!(pic.read_port(0x20), 0x08);
}

#[test]
fn the_ports_reach_the_pic_through_the_bus() {
    let pic = Arc::new(Mutex::new(initialized(0x01)));
    let mut master = PicPorts::new(pic.clone(), 0x20);
    master.write(1, &[0x55]);
    let mut imr = [0; 2];
    master.read(1, &mut imr);
    assert_eq!(imr, [0x55, 0]);
    let mut elcr = PicPorts::new(pic.clone(), 0x4d0);
    elcr.write(1, &[0x22]);
    // IRQ 13 (bit 5) is fixed at edge; IRQ 9 (bit 1) takes the write.
    assert_eq!(pic.lock().unwrap().read_port(0x4d1), 0x02);
}
