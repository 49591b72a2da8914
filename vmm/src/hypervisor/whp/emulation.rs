//! What the WHP instruction emulator's callbacks do, in neutral form: a port access goes to the
//! port I/O bus, a memory access to guest RAM when RAM holds it and to the MMIO bus otherwise
//! (the emulator reaches guest RAM through the same callback for the memory operand of
//! `ins`/`outs` and of MMIO instructions such as `movs`), and the emulator's status word is
//! read into one line. The `extern "system"` callbacks that unpack the Windows structures live in
//! `emulator` (Windows only).
//!
//! Platform-neutral; unit-tested on Linux against real buses and a fake RAM.

use devices::bus::Bus;
use thiserror::Error;

/// A guest access the emulator asked for that skiff refuses.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EmulationError {
    /// A port access of a size x86 does not have.
    #[error("port {port:#x}: access of {size} bytes")]
    PortSize {
        /// Port.
        port: u16,
        /// Size the emulator asked for.
        size: u16,
    },
    /// A memory access of a size the callback structure cannot hold.
    #[error("guest physical {gpa:#x}: access of {size} bytes")]
    MemorySize {
        /// Guest physical address.
        gpa: u64,
        /// Size the emulator asked for.
        size: u8,
    },
    /// The emulator did not finish the instruction; the message names every failure bit.
    #[error("emulation failed{} (status {status:#x})", failure_reasons(*status))]
    Failed {
        /// `WHV_EMULATOR_STATUS` as the emulator returned it.
        status: u32,
    },
}

/// Guest RAM as the emulator's memory callback reaches it.
pub trait GuestRam: Send + Sync {
    /// Copies guest physical `gpa..gpa + data.len()` into `data`; false (and `data` untouched)
    /// when RAM does not hold all of it.
    fn read(&self, gpa: u64, data: &mut [u8]) -> bool;
    /// Copies `data` to guest physical `gpa..`; false (and nothing written) when RAM does not
    /// hold all of it.
    fn write(&self, gpa: u64, data: &[u8]) -> bool;
}

/// The buses and RAM one vCPU's emulator callbacks reach.
#[derive(Clone, Copy)]
pub struct EmulatedAccess<'a> {
    /// Port I/O bus.
    pub pio: &'a Bus,
    /// MMIO bus.
    pub mmio: &'a Bus,
    /// Guest RAM.
    pub ram: &'a dyn GuestRam,
}

impl std::fmt::Debug for EmulatedAccess<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatedAccess").finish_non_exhaustive()
    }
}

impl EmulatedAccess<'_> {
    /// One port access of `size` bytes (1, 2 or 4): a write sends the low bytes of `*data`, a
    /// read puts the bytes read into `*data`, zero-extended.
    pub fn port(
        &self,
        write: bool,
        port: u16,
        size: u16,
        data: &mut u32,
    ) -> Result<(), EmulationError> {
        let len = match size {
            1 | 2 | 4 => usize::from(size),
            _ => return Err(EmulationError::PortSize { port, size }),
        };
        let mut bytes = data.to_le_bytes();
        if write {
            self.pio.write(u64::from(port), &bytes[..len]);
        } else {
            bytes = [0; 4];
            self.pio.read(u64::from(port), &mut bytes[..len]);
            *data = u32::from_le_bytes(bytes);
        }
        Ok(())
    }

    /// One memory access of `size` bytes (1 to 8) at `gpa`: RAM when it holds every byte,
    /// the MMIO bus otherwise. A read fills `data[..size]` and zeroes the rest.
    pub fn memory(
        &self,
        write: bool,
        gpa: u64,
        size: u8,
        data: &mut [u8; 8],
    ) -> Result<(), EmulationError> {
        let len = match size {
            1..=8 => usize::from(size),
            _ => return Err(EmulationError::MemorySize { gpa, size }),
        };
        if write {
            let bytes = &data[..len];
            if !self.ram.write(gpa, bytes) {
                self.mmio.write(gpa, bytes);
            }
        } else {
            let mut bytes = [0u8; 8];
            if !self.ram.read(gpa, &mut bytes[..len]) {
                self.mmio.read(gpa, &mut bytes[..len]);
            }
            *data = bytes;
        }
        Ok(())
    }
}

/// `WHV_EMULATOR_STATUS` bits, in the order WinHvEmulation.h declares them.
const STATUS_BITS: [&str; 10] = [
    "emulation successful",
    "internal emulation failure",
    "I/O port callback failed",
    "memory callback failed",
    "GVA translation callback failed",
    "GVA translation gave an unaligned GPA",
    "get-registers callback failed",
    "set-registers callback failed",
    "an interrupt caused an intercept",
    "the guest cannot be faulted",
];

/// `Ok` when the emulator's status says it finished the instruction, otherwise
/// `EmulationError::Failed`, whose message lists every failure bit it set.
pub fn check_status(status: u32) -> Result<(), EmulationError> {
    if status & 1 != 0 {
        return Ok(());
    }
    Err(EmulationError::Failed { status })
}

/// The failure bits of an emulator status as ": a, b", or nothing when none is set.
fn failure_reasons(status: u32) -> String {
    let reasons: Vec<&str> = STATUS_BITS
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(bit, _)| status & (1 << bit) != 0)
        .map(|(_, text)| *text)
        .collect();
    if reasons.is_empty() {
        String::new()
    } else {
        format!(": {}", reasons.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::bus::BusDevice;
    use std::sync::{Arc, Mutex};

    /// Records every access and answers reads with a fixed pattern.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
        reads: Vec<(u64, usize)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.reads.push((offset, data.len()));
            for (i, b) in data.iter_mut().enumerate() {
                *b = 0xa0 + i as u8;
            }
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    /// One RAM region of 0x1000 bytes at 0x1000.
    struct FakeRam(Mutex<Vec<u8>>);

    impl FakeRam {
        const BASE: u64 = 0x1000;
        fn range(&self, gpa: u64, len: usize) -> Option<std::ops::Range<usize>> {
            let start = usize::try_from(gpa.checked_sub(Self::BASE)?).ok()?;
            let end = start.checked_add(len)?;
            (end <= 0x1000).then_some(start..end)
        }
    }

    impl GuestRam for FakeRam {
        fn read(&self, gpa: u64, data: &mut [u8]) -> bool {
            let Some(r) = self.range(gpa, data.len()) else {
                return false;
            };
            data.copy_from_slice(&self.0.lock().unwrap()[r]);
            true
        }
        fn write(&self, gpa: u64, data: &[u8]) -> bool {
            let Some(r) = self.range(gpa, data.len()) else {
                return false;
            };
            self.0.lock().unwrap()[r].copy_from_slice(data);
            true
        }
    }

    struct Setup {
        pio: Bus,
        mmio: Bus,
        ram: FakeRam,
        port_dev: Arc<Mutex<Recorder>>,
        mmio_dev: Arc<Mutex<Recorder>>,
    }

    fn setup() -> Setup {
        let pio = Bus::new();
        let mmio = Bus::new();
        let port_dev = Arc::new(Mutex::new(Recorder::default()));
        let mmio_dev = Arc::new(Mutex::new(Recorder::default()));
        pio.insert(port_dev.clone(), 0x3f8, 8).unwrap();
        mmio.insert(mmio_dev.clone(), 0xfec0_0000, 0x1000).unwrap();
        Setup {
            pio,
            mmio,
            ram: FakeRam(Mutex::new(vec![0; 0x1000])),
            port_dev,
            mmio_dev,
        }
    }

    impl Setup {
        fn access(&self) -> EmulatedAccess<'_> {
            EmulatedAccess {
                pio: &self.pio,
                mmio: &self.mmio,
                ram: &self.ram,
            }
        }
    }

    #[test]
    fn a_port_write_sends_the_low_bytes_and_a_read_zero_extends() {
        let s = setup();
        let mut data = 0x1122_3344;
        s.access().port(true, 0x3f9, 2, &mut data).unwrap();
        assert_eq!(s.port_dev.lock().unwrap().writes, [(1, vec![0x44, 0x33])]);
        let mut data = 0xffff_ffff;
        s.access().port(false, 0x3fa, 1, &mut data).unwrap();
        assert_eq!(data, 0xa0);
        assert_eq!(s.port_dev.lock().unwrap().reads, [(2, 1)]);
        // Nobody at the port: all ones, as the bus answers.
        let mut data = 0;
        s.access().port(false, 0x80, 2, &mut data).unwrap();
        assert_eq!(data, 0xffff);
    }

    #[test]
    fn a_port_access_of_an_odd_size_is_refused() {
        let s = setup();
        let mut data = 0;
        assert_eq!(
            s.access().port(true, 0x3f8, 3, &mut data),
            Err(EmulationError::PortSize {
                port: 0x3f8,
                size: 3
            })
        );
        assert!(s.port_dev.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn memory_in_ram_goes_to_ram_and_the_rest_to_the_mmio_bus() {
        let s = setup();
        let mut data = *b"abcdefgh";
        s.access().memory(true, 0x1ffc, 4, &mut data).unwrap();
        assert_eq!(&s.ram.0.lock().unwrap()[0xffc..], b"abcd");
        let mut back = [0xee; 8];
        s.access().memory(false, 0x1ffd, 2, &mut back).unwrap();
        assert_eq!(back, [b'b', b'c', 0, 0, 0, 0, 0, 0]);
        assert!(s.mmio_dev.lock().unwrap().writes.is_empty());

        let mut data = [1, 2, 3, 4, 5, 6, 7, 8];
        s.access().memory(true, 0xfec0_0010, 4, &mut data).unwrap();
        assert_eq!(
            s.mmio_dev.lock().unwrap().writes,
            [(0x10, vec![1, 2, 3, 4])]
        );
        let mut back = [0xee; 8];
        s.access().memory(false, 0xfec0_0020, 8, &mut back).unwrap();
        assert_eq!(back, [0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7]);
    }

    #[test]
    fn an_access_running_past_the_end_of_ram_is_not_split_into_ram() {
        let s = setup();
        let mut data = [9; 8];
        // Two bytes in RAM, two past it: RAM is left alone and the bus (nobody there) drops it.
        s.access().memory(true, 0x1ffe, 4, &mut data).unwrap();
        assert_eq!(&s.ram.0.lock().unwrap()[0xffe..], [0, 0]);
        let mut back = [0; 8];
        s.access().memory(false, 0x1ffe, 4, &mut back).unwrap();
        assert_eq!(back, [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
    }

    #[test]
    fn a_memory_access_of_zero_or_more_than_eight_bytes_is_refused() {
        let s = setup();
        let mut data = [0; 8];
        for size in [0, 9, 16] {
            assert_eq!(
                s.access().memory(false, 0x1000, size, &mut data),
                Err(EmulationError::MemorySize { gpa: 0x1000, size })
            );
        }
    }

    #[test]
    fn the_status_word_reads_as_one_line() {
        assert_eq!(check_status(1), Ok(()));
        assert_eq!(check_status(1 | 1 << 3), Ok(()));
        assert_eq!(
            check_status(1 << 3 | 1 << 9).unwrap_err().to_string(),
            "emulation failed: memory callback failed, the guest cannot be faulted (status 0x208)"
        );
        assert_eq!(
            check_status(0).unwrap_err().to_string(),
            "emulation failed (status 0x0)"
        );
    }
}
