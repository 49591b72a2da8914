//! The `virtio-bar-move` scenario: moves the virtio-rng function's BAR 0 the way an OS
//! reassigning PCI resources does, then drives the device at its new address.
//!
//! In order, each step checked through what the guest sees (`num_queues` of the common
//! configuration at BAR offset 0x12 reads 1 where the device answers, all-ones in a hole):
//! sizing with memory decoding on (the size mask reads back and the device answers nowhere
//! meanwhile, then again at its address once restored); decoding off (the old address is a
//! hole), the new address written, decoding on (the device answers at the new address only);
//! a bogus address over the ECAM area (refused: configuration access still works and the
//! device answers nowhere) and back to the new address. Then the `virtio-rng` scenario runs,
//! which finds the BAR at its new address and kicks its queue there.
use crate::bootinfo::BootInfo;
use crate::mmio::Region;
use crate::pci::{Pci, CMD_MEMORY, REG_BAR0, REG_COMMAND};
use crate::scenario::fail;
use crate::serial;
use crate::virtio::{rng, VENDOR};

const RNG_ID: u16 = 0x1044;
/// `num_queues` in the common configuration (at BAR offset 0).
const NUM_QUEUES: u64 = 0x12;
/// virtio-rng's queue count.
const RNG_QUEUES: u16 = 1;
/// Where the BAR goes: in skiff's 32-bit PCI window, far above where skiff places BARs.
const NEW_BAR: u32 = 0xd000_0000;
/// An address over the ECAM area, which skiff must refuse.
const ECAM_BAR: u32 = 0xe000_0000;

/// `num_queues` as read at a BAR placed at `base`.
fn num_queues_at(base: u64) -> u16 {
    let Some(region) = Region::new(base, 0x1000) else {
        fail(|w| {
            w.str("cannot map ").hex(base);
        })
    };
    region.read::<u16>(NUM_QUEUES)
}

fn expect(base: u64, answers: bool, step: &str) {
    let got = num_queues_at(base);
    let want = if answers { RNG_QUEUES } else { 0xffff };
    if got != want {
        fail(|w| {
            w.str(step)
                .str(": num_queues at ")
                .hex(base)
                .str(" reads ")
                .hex(got.into())
                .str(", expected ")
                .hex(want.into());
        });
    }
}

/// The `virtio-bar-move` scenario.
pub fn run(info: &BootInfo) {
    let pci = Pci::new(info);
    let Some(f) = pci.find(VENDOR, RNG_ID) else {
        fail(|w| {
            w.str("no virtio-rng device on bus 0");
        })
    };
    let old = pci.enable(&f)[0];
    expect(old, true, "placed");
    let command = pci.read(f.dev, REG_COMMAND) & 0xffff;
    let set_bar = |v: u32| pci.write(f.dev, REG_BAR0, v);
    let decoding = |on: bool| {
        let value = if on {
            command | CMD_MEMORY
        } else {
            command & !CMD_MEMORY
        };
        pci.write(f.dev, REG_COMMAND, value);
    };

    // Sizing with decoding on.
    set_bar(u32::MAX);
    let mask = pci.read(f.dev, REG_BAR0);
    expect(old, false, "while sized");
    set_bar(old as u32);
    if mask != 0xffff_8000 {
        fail(|w| {
            w.str("size mask ")
                .hex(mask.into())
                .str(", expected 0xffff8000");
        });
    }
    expect(old, true, "after sizing");

    // The move, with decoding off meanwhile.
    decoding(false);
    expect(old, false, "decoding off");
    set_bar(NEW_BAR);
    expect(NEW_BAR.into(), false, "moved, decoding off");
    decoding(true);
    expect(NEW_BAR.into(), true, "moved");
    expect(old, false, "old address after the move");

    // A bogus address is refused, configuration access keeps working.
    set_bar(ECAM_BAR);
    let id = pci.read(f.dev, 0);
    if id != u32::from(VENDOR) | u32::from(RNG_ID) << 16 {
        fail(|w| {
            w.str("configuration access broken after a BAR over ECAM: ID reads ")
                .hex(id.into());
        });
    }
    expect(NEW_BAR.into(), false, "BAR over ECAM");
    set_bar(NEW_BAR);
    expect(NEW_BAR.into(), true, "back from ECAM");

    serial::line()
        .str("testguest: virtio-bar-move moved ")
        .hex(old)
        .str(" -> ")
        .hex(NEW_BAR.into())
        .str("\n");
    rng::run(info);
    expect(old, false, "old address after use");
    serial::line().str("testguest: virtio-bar-move ok\n");
}
