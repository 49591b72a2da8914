//! Port I/O and MMIO buses: map address ranges to devices and dispatch vCPU accesses.
//!
//! One `Bus` type serves both address spaces; the vCPU loop owns one of each. Devices sit behind
//! `Arc<Mutex<..>>` because several vCPU threads may access the same device. Reads from
//! addresses no device claims return all-ones (as on real hardware); writes there are dropped.
//!
//! Ranges can be added and removed while vCPUs run (a guest moving a PCI BAR): the range map
//! sits behind a read-write lock that a dispatch holds only to find the device, never while
//! the device handles the access. So a device may change the bus from inside its own handler
//! (a configuration write reached through ECAM, itself on this bus) without deadlock; the lock
//! order is always device, then bus. A `Bus` is a handle: clones share one address space.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use thiserror::Error;

/// A device on a bus. `offset` is relative to the base the device was inserted at.
pub trait BusDevice: Send {
    /// Handles a read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shareable bus device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors from building a bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range is empty or wraps around the address space.
    #[error("bus range at {base:#x} with length {len:#x} is empty or wraps")]
    InvalidRange {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The new range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other:#x}")]
    Overlap {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
        /// Base of the device it overlaps.
        other: u64,
    },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

type RangeMap = BTreeMap<u64, Entry>;

/// An address space of non-overlapping device ranges (a shared handle: see the module comment).
#[derive(Clone, Default)]
pub struct Bus {
    ranges: Arc<RwLock<RangeMap>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.ranges()).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, RangeMap> {
        self.ranges.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn map_mut(&self) -> std::sync::RwLockWriteGuard<'_, RangeMap> {
        self.ranges.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Places `device` at `base..base+len`, unless that range is empty, wraps, or overlaps a
    /// device already there.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let mut ranges = self.map_mut();
        check_free(&ranges, base, len)?;
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Whether `base..base+len` is a valid range that no device occupies.
    pub fn check_free(&self, base: u64, len: u64) -> Result<(), BusError> {
        check_free(&self.map(), base, len)
    }

    /// Takes the device placed at exactly `base` off the bus and returns it; accesses there
    /// then read as all-ones. `None` if no range starts at `base`.
    pub fn remove(&self, base: u64) -> Option<SharedDevice> {
        self.map_mut().remove(&base).map(|e| e.device)
    }

    /// Every occupied range as `(base, len)`, in address order.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.map().iter().map(|(&b, e)| (b, e.len)).collect()
    }

    /// The device covering `addr` and the offset of `addr` within it, if the whole access
    /// `addr..addr+size` lies inside that device's range. The bus lock is released on return,
    /// before the caller locks the device.
    fn find(&self, addr: u64, size: usize) -> Option<(u64, SharedDevice)> {
        let ranges = self.map();
        let (&base, entry) = ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= entry.len).then(|| (offset, entry.device.clone()))
    }

    /// Dispatches a read; returns false (and fills `data` with 0xff) when no device claims it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, device)) => {
                device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when no device claims it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, device)) => {
                device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

fn check_free(ranges: &RangeMap, base: u64, len: u64) -> Result<(), BusError> {
    let end = base
        .checked_add(len)
        .filter(|_| len > 0)
        .ok_or(BusError::InvalidRange { base, len })?;
    match ranges
        .range(..end)
        .next_back()
        .filter(|(&b, e)| b + e.len > base)
    {
        Some((&other, _)) => Err(BusError::Overlap { base, len, other }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b, [2]);
        assert!(bus.write(0x3ff, &[9]));
        assert_eq!(dev.lock().unwrap().last_write, vec![(7, vec![9])]);
    }

    #[test]
    fn unclaimed_and_straddling_accesses_are_not_dispatched() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let bus = Bus::new();
        bus.insert(dev, 0x10, 4).unwrap();
        let mut b = [0u8; 2];
        assert!(
            !bus.read(0x13, &mut b),
            "access straddles the end of the range"
        );
        assert_eq!(b, [0xff, 0xff]);
        assert!(!bus.write(0x14, &[1]));
        assert!(!bus.read(0x0f, &mut b[..1]));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let bus = Bus::new();
        let d = || Arc::new(Mutex::new(Recorder::default())) as SharedDevice;
        bus.insert(d(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(d(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1,
                other: 0x100
            })
        );
        assert_eq!(
            bus.insert(d(), 0xf8, 0x9),
            Err(BusError::Overlap {
                base: 0xf8,
                len: 9,
                other: 0x100
            })
        );
        assert!(bus.insert(d(), 0x110, 1).is_ok());
        assert!(bus.insert(d(), 0xf0, 0x10).is_ok());
        assert_eq!(
            bus.insert(d(), 5, 0),
            Err(BusError::InvalidRange { base: 5, len: 0 })
        );
        assert_eq!(
            bus.insert(d(), u64::MAX, 2),
            Err(BusError::InvalidRange {
                base: u64::MAX,
                len: 2
            })
        );
    }

    #[test]
    fn removed_ranges_become_holes_and_free_again() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let bus = Bus::new();
        let other = bus.clone();
        bus.insert(dev.clone(), 0x1000, 0x100).unwrap();
        assert!(other.read(0x1010, &mut [0u8; 1]), "clones share the bus");
        assert!(
            bus.remove(0x1001).is_none(),
            "only a range's base removes it"
        );
        assert!(bus.remove(0x1000).is_some());
        let mut b = [0u8; 2];
        assert!(!bus.read(0x1010, &mut b));
        assert_eq!(b, [0xff, 0xff]);
        assert!(!bus.write(0x1010, &[1]));
        assert!(dev.lock().unwrap().last_write.is_empty());
        assert_eq!(bus.check_free(0x1000, 0x100), Ok(()));
        bus.insert(dev.clone(), 0x2000, 0x100).unwrap();
        assert!(bus.write(0x2004, &[7]));
        assert_eq!(dev.lock().unwrap().last_write, vec![(4, vec![7])]);
        assert_eq!(
            bus.check_free(0x1f80, 0x100),
            Err(BusError::Overlap {
                base: 0x1f80,
                len: 0x100,
                other: 0x2000
            })
        );
    }

    /// A device that changes the bus from inside its own handler, as a PCI function moving
    /// its BAR from a configuration write that arrived through ECAM (on the same bus) does.
    struct SelfMover {
        bus: Bus,
        me: Option<SharedDevice>,
        at: u64,
    }

    impl BusDevice for SelfMover {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0x5a);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            let to = u64::from(data[0]) << 8;
            if let Some(me) = self.me.clone() {
                self.bus.remove(self.at);
                self.bus.insert(me, to, 0x10).unwrap();
                self.at = to;
            }
        }
    }

    #[test]
    fn a_device_can_move_itself_while_handling_an_access() {
        let bus = Bus::new();
        let mover = Arc::new(Mutex::new(SelfMover {
            bus: bus.clone(),
            me: None,
            at: 0x100,
        }));
        mover.lock().unwrap().me = Some(mover.clone());
        bus.insert(mover.clone(), 0x100, 0x10).unwrap();
        // Other threads keep reading while it moves.
        let reader = {
            let bus = bus.clone();
            std::thread::spawn(move || {
                for _ in 0..10_000 {
                    let mut b = [0u8; 1];
                    bus.read(0x100, &mut b);
                    assert!(b == [0x5a] || b == [0xff]);
                }
            })
        };
        for _ in 0..100 {
            assert!(bus.write(0x100, &[0x02]));
            assert!(bus.write(0x200, &[0x01]));
        }
        reader.join().unwrap();
        assert_eq!(bus.ranges(), vec![(0x100, 0x10)]);
        mover.lock().unwrap().me = None; // break the cycle
    }
}
