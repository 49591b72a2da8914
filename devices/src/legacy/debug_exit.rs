//! The debug-exit port (0xf4), as QEMU's `isa-debug-exit`: a guest write ends the VM with
//! `GuestEnd::DebugExit(value)`.
//!
//! Test guests use it to report a result without a power-off path. The device covers
//! `DEBUG_EXIT_PORT_LEN` ports so that a 2- or 4-byte `out` to 0xf4 (common in test kernels)
//! reaches it whole; the value is the access's low byte. Writes starting above 0xf4 are ignored
//! and reads return all-ones. Mapping the value to a process exit code is the VMM's business.

use crate::bus::BusDevice;
use crate::vm_exit::{GuestEnd, VmExitSignal};

/// The debug-exit I/O port.
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
/// Ports to register the device for, so that accesses up to 4 bytes wide at 0xf4 fit inside it.
pub const DEBUG_EXIT_PORT_LEN: u64 = 4;

/// The debug-exit device.
#[derive(Debug)]
pub struct DebugExit {
    exit: VmExitSignal,
}

impl DebugExit {
    /// A debug-exit port that reports guest writes to `exit`.
    pub fn new(exit: VmExitSignal) -> Self {
        Self { exit }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // x86 port I/O is little-endian: the first byte is the low byte.
        if let (0, Some(&value)) = (offset, data.first()) {
            self.exit.request(GuestEnd::DebugExit(value));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::bus::Bus;

    fn device() -> (DebugExit, VmExitSignal) {
        let exit = VmExitSignal::new().unwrap();
        (DebugExit::new(exit.clone()), exit)
    }

    #[test]
    fn byte_write_records_value() {
        let (mut dev, exit) = device();
        dev.write(0, &[0x31]);
        assert_eq!(exit.reason(), Some(GuestEnd::DebugExit(0x31)));
        #[cfg(unix)]
        assert!(exit.event().read().unwrap() >= 1);
    }

    #[test]
    fn wide_write_through_the_bus_uses_low_byte() {
        let (dev, exit) = device();
        let bus = Bus::new();
        bus.insert(
            Arc::new(Mutex::new(dev)),
            DEBUG_EXIT_PORT,
            DEBUG_EXIT_PORT_LEN,
        )
        .unwrap();
        assert!(bus.write(DEBUG_EXIT_PORT, &0x0000_0210u32.to_le_bytes()));
        assert_eq!(exit.reason(), Some(GuestEnd::DebugExit(0x10)));
    }

    #[test]
    fn writes_above_the_port_are_ignored_and_reads_are_ff() {
        let (mut dev, exit) = device();
        dev.write(1, &[7]);
        dev.write(0, &[]);
        assert_eq!(exit.reason(), None);
        let mut b = [0u8; 4];
        dev.read(0, &mut b);
        assert_eq!(b, [0xff; 4]);
    }
}
