//! `MappedRam`: guest RAM as a list of host mappings registered with the hypervisor (guest
//! address, size, host address), read and written by guest physical address with every access
//! bounds-checked. It is what the WHP instruction emulator's memory callback reaches for the
//! memory operand of string I/O and MMIO instructions (`whp::emulation::GuestRam`). Each range
//! holds its `SlotMemory`, so the emulator never reaches memory that is no longer mapped.
//!
//! Platform-neutral; unit-tested on Linux over plain buffers.

use std::sync::{Arc, PoisonError, RwLock};

use super::SlotMemory;
use crate::hypervisor::whp::emulation::GuestRam;

#[derive(Debug)]
struct Range {
    guest_address: u64,
    memory: Arc<dyn SlotMemory>,
}

impl Range {
    /// The host address of `gpa..gpa + len` when this range holds all of it.
    fn host(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        let offset = gpa.checked_sub(self.guest_address)?;
        let end = offset.checked_add(u64::try_from(len).ok()?)?;
        if end > self.memory.size() {
            return None;
        }
        // SAFETY: `offset + len` is within the mapping (checked above), so the result stays
        // inside it.
        Some(unsafe { self.memory.as_ptr().add(usize::try_from(offset).ok()?) })
    }
}

/// Registered host mappings of guest RAM.
#[derive(Debug, Default)]
pub struct MappedRam {
    ranges: RwLock<Vec<Range>>,
}

impl MappedRam {
    /// Adds `memory` as guest `guest_address..guest_address + memory.size()`.
    pub fn add(&self, guest_address: u64, memory: Arc<dyn SlotMemory>) {
        self.ranges
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Range {
                guest_address,
                memory,
            });
    }

    fn host(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        self.ranges
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find_map(|r| r.host(gpa, len))
    }
}

impl GuestRam for MappedRam {
    fn read(&self, gpa: u64, data: &mut [u8]) -> bool {
        let Some(host) = self.host(gpa, data.len()) else {
            return false;
        };
        // SAFETY: `host..host + data.len()` lies inside one registered mapping (checked by
        // `Range::host`), which the range keeps mapped (`SlotMemory`); `data` is a separate
        // allocation. Guest RAM
        // may change under a running vCPU, so this is a plain byte copy.
        unsafe { std::ptr::copy_nonoverlapping(host, data.as_mut_ptr(), data.len()) };
        true
    }

    fn write(&self, gpa: u64, data: &[u8]) -> bool {
        let Some(host) = self.host(gpa, data.len()) else {
            return false;
        };
        // SAFETY: as in `read`, with the copy going the other way.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), host, data.len()) };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::slot_memory::TestMemory;

    #[test]
    fn accesses_inside_a_range_reach_its_host_bytes_and_others_do_not() {
        let low = TestMemory::new(0x100);
        let high = TestMemory::new(0x100);
        let ram = MappedRam::default();
        ram.add(0x1000, low.clone());
        ram.add(0x8000, high.clone());
        assert!(ram.write(0x10fc, b"abcd"));
        assert!(ram.write(0x8000, b"xy"));
        let mut back = [0u8; 4];
        assert!(ram.read(0x10fc, &mut back));
        assert_eq!(&back, b"abcd");
        // Crossing the end of a range, between ranges, or wrapping: refused, untouched.
        assert!(!ram.write(0x10fe, b"zzzz"));
        assert!(!ram.read(0x2000, &mut back));
        assert!(!ram.read(u64::MAX - 1, &mut back));
        assert_eq!(&back, b"abcd");
        drop(ram);
        assert_eq!(low.bytes(0xfc, 4), b"abcd");
        assert_eq!(high.bytes(0, 2), b"xy");
    }
}
