//! BAR 0 moves: the function on a real `Bus` with a fake hypervisor, driven through its
//! configuration space as a guest would (decoding off, new address, decoding on; sizing;
//! refused addresses), and mapped at its saved address on restore.

use std::sync::{Arc, Mutex};

use super::*;
use crate::bus::{Bus, BusDevice};
use crate::pci::bar_mapping::test_registry::Registry;
use crate::pci::bar_mapping::BarSpace;
use crate::pci::config_space::{COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY};
use crate::pci::PciDevice;

const WINDOW: (u64, u64) = (0xc000_0000, 0x2000_0000);
const NEW: u64 = 0xd000_8000;

struct Placed {
    bus: Bus,
    registry: Arc<Registry>,
    dev: Arc<Mutex<VirtioPciDevice>>,
    kicks: Vec<EventFd>,
}

/// A harness function on its own bus, attached but not mapped yet.
fn attached(h: Harness) -> Placed {
    let bus = Bus::new();
    let registry = Arc::new(Registry::default());
    let kicks = (0..2)
        .map(|q| h.dev.queue_notify(q).unwrap().1.try_clone().unwrap())
        .collect();
    let space = BarSpace::new(bus.clone(), registry.clone());
    let dev = Arc::new(Mutex::new(h.dev));
    let as_bus_device: Arc<Mutex<dyn BusDevice>> = dev.clone();
    let bar = space
        .add(
            "fake",
            Arc::downgrade(&as_bus_device),
            VIRTIO_PCI_BAR_SIZE,
            vec![WINDOW],
            &dev.lock().unwrap().notify_events(),
        )
        .unwrap();
    dev.lock().unwrap().set_bar_mapping(bar);
    Placed {
        bus,
        registry,
        dev,
        kicks,
    }
}

impl Placed {
    fn cfg_write(&self, offset: usize, value: u32, len: usize) {
        self.dev
            .lock()
            .unwrap()
            .write_config(offset as u16, &value.to_le_bytes()[..len]);
    }
    fn cfg_read(&self, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        self.dev.lock().unwrap().read_config(offset, &mut b);
        u32::from_le_bytes(b)
    }
    fn decoding(&self, on: bool) {
        let command = if on {
            COMMAND_MEMORY | COMMAND_BUS_MASTER
        } else {
            COMMAND_BUS_MASTER
        };
        self.cfg_write(COMMAND, u32::from(command), 2);
    }
    /// `num_queues` read through the bus at a BAR placed at `base` (all-ones: nothing there).
    fn num_queues_at(&self, base: u64) -> u16 {
        let mut b = [0u8; 2];
        self.bus.read(base + NUM_QUEUES, &mut b);
        u16::from_le_bytes(b)
    }
    fn notify_addresses(base: u64) -> Vec<u64> {
        vec![base + NOTIFY_OFFSET, base + NOTIFY_OFFSET + 4]
    }
}

#[test]
fn guest_moves_the_bar_with_decoding_off_then_on() {
    let p = attached(harness());
    assert_eq!(p.num_queues_at(BAR), 0xffff, "not mapped before map_bar");
    p.dev.lock().unwrap().map_bar().unwrap();
    assert_eq!(p.num_queues_at(BAR), 2);
    assert_eq!(p.registry.addresses(), Placed::notify_addresses(BAR));
    assert_eq!(
        p.cfg_read(0x04) & 0xffff,
        u32::from(COMMAND_MEMORY),
        "placed with decoding on"
    );

    p.decoding(false);
    assert_eq!(p.num_queues_at(BAR), 0xffff, "decoding off: a hole");
    p.cfg_write(0x10, NEW as u32, 4);
    assert_eq!(p.dev.lock().unwrap().mapped_bar(), None);
    p.decoding(true);
    assert_eq!(p.dev.lock().unwrap().mapped_bar(), Some(NEW));
    assert_eq!(p.num_queues_at(NEW), 2);
    assert_eq!(p.num_queues_at(BAR), 0xffff, "old place no longer answers");
    assert_eq!(p.registry.addresses(), Placed::notify_addresses(NEW));

    // MSI-X table and PBA at the new place.
    let entry = NEW + 0x4000 + 16;
    assert!(p.bus.write(entry, &0xfee0_1000u32.to_le_bytes()));
    let mut b = [0u8; 4];
    p.bus.read(entry, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0xfee0_1000);
    p.bus.read(NEW + 0x6000, &mut b);
    assert_eq!(b, [0; 4], "PBA answers (nothing pending)");
    // A notification that takes an MMIO exit at the new place still reaches its queue.
    assert!(p.bus.write(NEW + NOTIFY_OFFSET + 4, &1u16.to_le_bytes()));
    assert_eq!(p.kicks[1].read().unwrap(), 1);
    assert!(!p.bus.write(BAR + NOTIFY_OFFSET, &0u16.to_le_bytes()));
    assert!(p.kicks[0].read().is_err(), "old notify address is dead");
}

#[test]
fn sizing_with_decoding_on_maps_nothing_at_all_ones_and_comes_back() {
    let p = attached(harness());
    p.dev.lock().unwrap().map_bar().unwrap();
    p.cfg_write(0x10, u32::MAX, 4);
    assert_eq!(p.cfg_read(0x10), 0xffff_8000, "size mask");
    assert_eq!(p.dev.lock().unwrap().mapped_bar(), None);
    assert!(p.bus.ranges().is_empty(), "nothing at 0xffff8000");
    p.cfg_write(0x10, BAR as u32, 4);
    assert_eq!(p.num_queues_at(BAR), 2);
    assert_eq!(p.registry.addresses(), Placed::notify_addresses(BAR));
}

#[test]
fn refused_addresses_leave_the_bar_unmapped_until_a_valid_one() {
    let p = attached(harness());
    p.dev.lock().unwrap().map_bar().unwrap();
    let other: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Registryless));
    p.bus.insert(other, 0xc800_0000, 0x1000).unwrap();
    for bad in [0xe000_0000u32, 0x0010_0000, 0xfee0_0000, 0xc800_0000, 0] {
        p.cfg_write(0x10, bad, 4);
        assert_eq!(p.cfg_read(0x10), bad, "the register holds what was written");
        assert_eq!(p.dev.lock().unwrap().mapped_bar(), None, "{bad:#x}");
        assert_eq!(p.bus.ranges(), vec![(0xc800_0000, 0x1000)], "{bad:#x}");
    }
    // Rewriting a refused address, or the command register unchanged, changes nothing.
    p.decoding(true);
    assert_eq!(p.dev.lock().unwrap().mapped_bar(), None);
    p.cfg_write(0x10, NEW as u32, 4);
    assert_eq!(p.num_queues_at(NEW), 2);
    assert_eq!(p.registry.addresses(), Placed::notify_addresses(NEW));
}

/// Stands for another device's BAR.
struct Registryless;

impl BusDevice for Registryless {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0x11);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[test]
fn restore_maps_the_bar_where_the_guest_had_moved_it() {
    let p = attached(harness());
    p.dev.lock().unwrap().map_bar().unwrap();
    p.decoding(false);
    p.cfg_write(0x10, NEW as u32, 4);
    p.decoding(true);
    let moved = p.dev.lock().unwrap().save();
    p.decoding(false);
    let off = p.dev.lock().unwrap().save();

    let fresh = attached(harness());
    fresh.dev.lock().unwrap().restore(&moved).unwrap();
    assert_eq!(fresh.dev.lock().unwrap().mapped_bar(), None, "mapped later");
    fresh.dev.lock().unwrap().map_bar().unwrap();
    assert_eq!(fresh.num_queues_at(NEW), 2);
    assert_eq!(fresh.num_queues_at(BAR), 0xffff);
    assert_eq!(fresh.registry.addresses(), Placed::notify_addresses(NEW));

    let fresh = attached(harness());
    fresh.dev.lock().unwrap().restore(&off).unwrap();
    fresh.dev.lock().unwrap().map_bar().unwrap();
    assert!(fresh.bus.ranges().is_empty(), "decoding was off");
    fresh.decoding(true);
    assert_eq!(fresh.num_queues_at(NEW), 2);
}
