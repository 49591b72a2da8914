//! Port I/O and MMIO buses: map address ranges to devices and dispatch vCPU accesses.
//!
//! One `Bus` type serves both address spaces; the vCPU loop owns one of each. Devices sit behind
//! `Arc<Mutex<..>>` because several vCPU threads may access the same device. Reads from
//! addresses no device claims return all-ones (as on real hardware); writes there are dropped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

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

/// An address space of non-overlapping device ranges.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|(b, e)| (b, e.len)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `base..base+len`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        if let Some((&other, _)) = self
            .ranges
            .range(..end)
            .next_back()
            .filter(|(&b, e)| b + e.len > base)
        {
            return Err(BusError::Overlap { base, len, other });
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Every occupied range as `(base, len)`, in address order.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.ranges.iter().map(|(&b, e)| (b, e.len)).collect()
    }

    /// The device covering `addr` and the offset of `addr` within it, if the whole access
    /// `addr..addr+size` lies inside that device's range.
    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Entry)> {
        let (&base, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= entry.len).then_some((offset, entry))
    }

    /// Dispatches a read; returns false (and fills `data` with 0xff) when no device claims it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, entry)) => {
                entry
                    .device
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
            Some((offset, entry)) => {
                entry
                    .device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .write(offset, data);
                true
            }
            None => false,
        }
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
        let mut bus = Bus::new();
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
        let mut bus = Bus::new();
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
        let mut bus = Bus::new();
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
}
