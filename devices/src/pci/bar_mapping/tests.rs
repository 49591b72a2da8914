//! Unit tests of BAR moves on a real `Bus` with a fake hypervisor.

#![allow(clippy::unwrap_used)]

use super::test_registry::Registry;
use super::*;

struct Answer(u8);

impl BusDevice for Answer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(self.0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

const WINDOW: (u64, u64) = (0xc000_0000, 0x2000_0000);
const SIZE: u64 = 0x8000;
const X: u64 = 0xc000_0000;
const Y: u64 = 0xd000_8000;

/// A function: the device on the bus (answering `id`), its BAR and its two kicks.
struct Function {
    _device: Arc<Mutex<dyn BusDevice>>,
    _kicks: Vec<EventFd>,
    bar: BarMapping,
}

struct Rig {
    bus: Bus,
    registry: Arc<Registry>,
    space: BarSpace,
}

fn rig(refuse: Vec<u64>) -> Rig {
    let bus = Bus::new();
    let registry = Arc::new(Registry {
        refuse,
        ..Registry::default()
    });
    let space = BarSpace::new(bus.clone(), registry.clone());
    Rig {
        bus,
        registry,
        space,
    }
}

impl Rig {
    fn function(&self, id: u8) -> Function {
        let device: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Answer(id)));
        let kicks: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let bar = self
            .space
            .add(
                "test",
                Arc::downgrade(&device),
                SIZE,
                vec![WINDOW],
                &[(0x3000, &kicks[0]), (0x3004, &kicks[1])],
            )
            .unwrap();
        Function {
            _device: device,
            _kicks: kicks,
            bar,
        }
    }
    /// Which function answers at `address` (0xff: none).
    fn at(&self, address: u64) -> u8 {
        let mut b = [0u8; 1];
        self.bus.read(address + 8, &mut b);
        b[0]
    }
    fn bound(&self) -> Vec<u64> {
        self.registry.addresses()
    }
}

fn notify(base: u64) -> Vec<u64> {
    vec![base + 0x3000, base + 0x3004]
}

#[test]
fn moves_range_and_ioeventfds_and_unmaps_while_decoding_is_off() {
    let r = rig(vec![]);
    let f = r.function(0x42);
    f.bar.map(Some(X)).unwrap();
    assert_eq!(r.at(X), 0x42);
    assert_eq!(r.bound(), notify(X));
    f.bar.update(BarDecode::At(Y));
    assert_eq!(r.at(X), 0xff, "old range is a hole");
    assert_eq!(r.at(Y), 0x42);
    assert_eq!(f.bar.mapped(), Some(Y));
    assert_eq!(r.bound(), notify(Y));
    let binds = r.registry.binds();
    // Decoding off and on again at the same place: off the bus meanwhile, the ioeventfds
    // stay bound (no rebinding).
    f.bar.update(BarDecode::Off);
    assert_eq!(r.at(Y), 0xff);
    assert_eq!(f.bar.mapped(), None);
    assert!(r.bus.ranges().is_empty());
    f.bar.update(BarDecode::Updating);
    assert_eq!(
        f.bar.mapped(),
        None,
        "a half-written address changes nothing"
    );
    f.bar.update(BarDecode::At(Y));
    assert_eq!(r.at(Y), 0x42);
    assert_eq!(r.bound(), notify(Y));
    assert_eq!(r.registry.binds(), binds);
    // Decoding off, then on at another place: bound there only.
    f.bar.update(BarDecode::Off);
    f.bar.update(BarDecode::At(X));
    assert_eq!(r.at(X), 0x42);
    assert_eq!(r.bound(), notify(X));
    f.bar.update(BarDecode::Updating);
    assert_eq!(r.at(X), 0x42);
}

#[test]
fn refuses_addresses_outside_the_windows_or_over_another_device() {
    let r = rig(vec![]);
    let f = r.function(0x42);
    let other: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Answer(0x77)));
    r.bus.insert(other, 0xc001_0000, 0x1000).unwrap();
    f.bar.update(BarDecode::At(X));
    assert_eq!(r.at(X), 0x42);
    for bad in [
        0x1000_0000, // RAM
        0xe000_0000, // ECAM, past the window
        0xbfff_c000, // straddles the window's start
        0xdfff_c000, // straddles the window's end
        0xfee0_0000, // local APIC
        0xc001_0000, // the other device
        u64::MAX - 0x7fff,
    ] {
        f.bar.update(BarDecode::At(bad));
        assert_eq!(f.bar.mapped(), None, "{bad:#x} refused");
        assert_eq!(r.at(X), 0xff, "old place let go for {bad:#x}");
        assert_eq!(r.at(0xc001_0000), 0x77, "the other device is untouched");
        assert!(
            r.bound()
                .iter()
                .all(|&a| !(0xc001_0000..0xc001_1000).contains(&a)),
            "nothing bound over the other device"
        );
    }
    assert!(matches!(
        f.bar.map(Some(0xc001_0000)),
        Err(BarMapError::Bus(BusError::Overlap { .. }))
    ));
    assert!(matches!(
        f.bar.map(Some(0x1000_0000)),
        Err(BarMapError::OutsideWindows { .. })
    ));
    f.bar.update(BarDecode::At(0xc002_0000));
    assert_eq!(r.at(0xc002_0000), 0x42);
    assert_eq!(r.bound(), notify(0xc002_0000));
}

#[test]
fn a_bar_waiting_for_a_range_gets_it_when_it_is_freed() {
    // An OS swapping two BARs one register write at a time.
    let r = rig(vec![]);
    let (a, b) = (r.function(0xa), r.function(0xb));
    a.bar.map(Some(X)).unwrap();
    b.bar.map(Some(Y)).unwrap();
    a.bar.update(BarDecode::At(Y));
    assert_eq!(a.bar.mapped(), None, "Y is still b's");
    assert_eq!(r.at(Y), 0xb);
    b.bar.update(BarDecode::At(X));
    assert_eq!((a.bar.mapped(), b.bar.mapped()), (Some(Y), Some(X)));
    assert_eq!((r.at(X), r.at(Y)), (0xb, 0xa));
    let mut all = notify(X);
    all.extend(notify(Y));
    assert_eq!(r.bound(), all);
}

#[test]
fn stale_ioeventfds_give_way_to_a_bar_that_takes_their_range() {
    let r = rig(vec![]);
    let (a, b) = (r.function(0xa), r.function(0xb));
    a.bar.map(Some(X)).unwrap();
    b.bar.map(Some(Y)).unwrap();
    a.bar.update(BarDecode::Off); // a's ioeventfds stay at X
    let binds = r.registry.binds();
    b.bar.update(BarDecode::At(X));
    assert_eq!(r.at(X), 0xb);
    // a's ioeventfds gave way: b's bound at X (a second binding there would be refused).
    assert_eq!(r.registry.binds(), binds + 2);
    assert_eq!(r.bound(), notify(X));
    a.bar.update(BarDecode::At(X));
    assert_eq!(a.bar.mapped(), None, "X is b's");
    a.bar.update(BarDecode::At(Y));
    assert_eq!(r.at(Y), 0xa);
    let mut all = notify(X);
    all.extend(notify(Y));
    assert_eq!(r.bound(), all);
}

#[test]
fn a_refused_ioeventfd_leaves_the_bar_mapped_and_the_rest_bound() {
    let r = rig(vec![X + 0x3004]);
    let f = r.function(0x42);
    let err = f.bar.map(Some(X)).unwrap_err();
    assert!(
        matches!(err, BarMapError::IoEvent { address, .. } if address == X + 0x3004),
        "{err}"
    );
    assert_eq!(r.at(X), 0x42);
    assert_eq!(r.bound(), vec![X + 0x3000]);
    // Moving unbinds exactly what was bound (the fake fails on anything else).
    f.bar.map(Some(Y)).unwrap();
    assert_eq!(r.bound(), notify(Y));
}

#[test]
fn a_dropped_device_is_not_mapped() {
    let r = rig(vec![]);
    let f = r.function(0x42);
    drop(f._device);
    assert!(matches!(f.bar.map(Some(X)), Err(BarMapError::DeviceGone)));
    assert!(r.bus.ranges().is_empty());
}
