//! Bus 0 of PCI segment 0 and the two ways a guest reaches its configuration spaces: ECAM (a
//! 4 KiB MMIO window per function, `PciEcam`) and configuration mechanism #1 (an address
//! register at port 0xCF8 and a data window at 0xCFC..0xD00, `PciConfigIo`).
//!
//! Both check every access before it reaches a device: 1, 2 or 4 bytes, naturally aligned,
//! inside the function's 4 KiB. Anything else, and any access to a bus, device or function that
//! does not exist, reads as all-ones and writes nothing, as on real hardware.

use std::sync::{Arc, PoisonError};

use thiserror::Error;

use super::host_bridge::PciHostBridge;
use super::{PciDevice, SharedPciDevice};
use crate::bus::BusDevice;

/// Device numbers on one bus.
pub const DEVICES_PER_BUS: usize = 32;
/// Bytes of configuration space per function.
const FUNCTION_CONFIG_SIZE: u64 = 4096;
/// CONFIG_ADDRESS bit 31: the access goes to configuration space.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;

/// Errors from populating the bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciRootError {
    /// All 32 device numbers are taken.
    #[error("PCI bus 0 is full: all {DEVICES_PER_BUS} device numbers are in use")]
    BusFull,
}

/// The devices on bus 0 (function 0 of each); the host bridge is device 0.
pub struct PciRoot {
    devices: Vec<Option<SharedPciDevice>>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let used: Vec<usize> = (0..DEVICES_PER_BUS)
            .filter(|&d| self.devices[d].is_some())
            .collect();
        f.debug_struct("PciRoot").field("devices", &used).finish()
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// A bus with the host bridge at device 0.
    pub fn new() -> Self {
        let mut devices: Vec<Option<SharedPciDevice>> = vec![None; DEVICES_PER_BUS];
        devices[0] = Some(Arc::new(std::sync::Mutex::new(PciHostBridge::new())));
        Self { devices }
    }

    /// Puts `device` at the lowest free device number and returns that number.
    pub fn add_device(&mut self, device: SharedPciDevice) -> Result<u8, PciRootError> {
        let slot = self
            .devices
            .iter()
            .position(Option::is_none)
            .ok_or(PciRootError::BusFull)?;
        self.devices[slot] = Some(device);
        // slot < DEVICES_PER_BUS = 32.
        Ok(slot as u8)
    }

    fn function(&self, bus: u8, device: u8, function: u8) -> Option<&SharedPciDevice> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.devices.get(usize::from(device))?.as_ref()
    }

    /// Reads `data` from the configuration space of `bus:device.function` at `offset`; invalid
    /// accesses and absent functions read as all-ones.
    pub fn read_config(&self, bus: u8, device: u8, function: u8, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some(offset) = valid_access(offset, data.len()) else {
            return;
        };
        if let Some(f) = self.function(bus, device, function) {
            lock(f).read_config(offset, data);
        }
    }

    /// Writes `data` to the configuration space of `bus:device.function` at `offset`; invalid
    /// accesses and absent functions are ignored.
    pub fn write_config(&self, bus: u8, device: u8, function: u8, offset: u64, data: &[u8]) {
        let Some(offset) = valid_access(offset, data.len()) else {
            return;
        };
        if let Some(f) = self.function(bus, device, function) {
            lock(f).write_config(offset, data);
        }
    }
}

fn lock(f: &SharedPciDevice) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    f.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The offset as a register number if `len` bytes at `offset` are a valid configuration access.
fn valid_access(offset: u64, len: usize) -> Option<u16> {
    let ok = matches!(len, 1 | 2 | 4)
        && offset.is_multiple_of(len as u64)
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= FUNCTION_CONFIG_SIZE);
    ok.then_some(offset as u16)
}

/// ECAM: configuration space as MMIO, at `PCI_ECAM_START` on the MMIO bus. Offset bits 27:20
/// select the bus, 19:15 the device, 14:12 the function, 11:0 the register.
#[derive(Debug)]
pub struct PciEcam {
    root: Arc<PciRoot>,
}

impl PciEcam {
    /// ECAM access to `root`.
    pub fn new(root: Arc<PciRoot>) -> Self {
        Self { root }
    }
}

fn ecam_decode(offset: u64) -> (u8, u8, u8, u64) {
    (
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
        offset & 0xfff,
    )
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >> 28 != 0 {
            data.fill(0xff);
            return;
        }
        let (bus, device, function, reg) = ecam_decode(offset);
        self.root.read_config(bus, device, function, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >> 28 != 0 {
            return;
        }
        let (bus, device, function, reg) = ecam_decode(offset);
        self.root.write_config(bus, device, function, reg, data);
    }
}

/// Configuration mechanism #1 at ports 0xCF8..0xD00 on the I/O bus: CONFIG_ADDRESS (a 32-bit
/// register at offset 0) selects bus, device, function and register; CONFIG_DATA (offsets
/// 4..8) accesses it.
#[derive(Debug)]
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: u32,
}

impl PciConfigIo {
    /// Port access to `root`.
    pub fn new(root: Arc<PciRoot>) -> Self {
        Self { root, address: 0 }
    }

    /// The selected function and the register for a data access at `data_offset` (0..4), if
    /// CONFIG_ADDRESS enables configuration access.
    fn target(&self, data_offset: u64) -> Option<(u8, u8, u8, u64)> {
        let a = self.address;
        (a & CONFIG_ADDRESS_ENABLE != 0).then(|| {
            (
                (a >> 16) as u8,
                ((a >> 11) & 0x1f) as u8,
                ((a >> 8) & 0x7) as u8,
                u64::from(a & 0xfc) + data_offset,
            )
        })
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        match offset {
            // CONFIG_ADDRESS is a 32-bit register.
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => {
                let data_offset = offset - 4;
                // The access must stay inside the 4-byte data window.
                if data_offset + data.len() as u64 > 4 {
                    return;
                }
                if let Some((bus, device, function, reg)) = self.target(data_offset) {
                    self.root.read_config(bus, device, function, reg, data);
                }
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                let mut v = [0u8; 4];
                v.copy_from_slice(data);
                // Bits 1:0 are reserved and read as zero.
                self.address = u32::from_le_bytes(v) & !0b11;
            }
            4..=7 => {
                let data_offset = offset - 4;
                if data_offset + data.len() as u64 > 4 {
                    return;
                }
                if let Some((bus, device, function, reg)) = self.target(data_offset) {
                    self.root.write_config(bus, device, function, reg, data);
                }
            }
            // Narrower writes to 0xCF8..0xCFB (0xCF9 is a chipset reset register elsewhere, 0xCFB
            // selects the mechanism on old chipsets) are ignored.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config_space::{BarKind, PciConfigSpace, PciIds};
    use std::sync::Mutex;

    struct Function(PciConfigSpace);

    impl PciDevice for Function {
        fn read_config(&mut self, offset: u16, data: &mut [u8]) {
            self.0.read(usize::from(offset), data);
        }
        fn write_config(&mut self, offset: u16, data: &[u8]) {
            self.0.write(usize::from(offset), data);
        }
    }

    fn root_with_device() -> Arc<PciRoot> {
        let mut config = PciConfigSpace::new(PciIds {
            vendor: 0x1af4,
            device: 0x1044,
            revision: 1,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        });
        config
            .add_bar(0, BarKind::Memory32, 0x4000, 0xc000_0000)
            .unwrap();
        let mut root = PciRoot::new();
        assert_eq!(
            root.add_device(Arc::new(Mutex::new(Function(config))))
                .unwrap(),
            1
        );
        Arc::new(root)
    }

    fn ecam_addr(bus: u64, dev: u64, func: u64, reg: u64) -> u64 {
        (bus << 20) | (dev << 15) | (func << 12) | reg
    }

    fn read_u32(dev: &mut dyn BusDevice, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        dev.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn ecam_reaches_functions_by_address() {
        let mut ecam = PciEcam::new(root_with_device());
        assert_eq!(
            read_u32(&mut ecam, ecam_addr(0, 0, 0, 0)),
            0x0008_1b36,
            "host bridge"
        );
        assert_eq!(read_u32(&mut ecam, ecam_addr(0, 1, 0, 0)), 0x1044_1af4);
        let mut w = [0u8; 2];
        ecam.read(ecam_addr(0, 1, 0, 2), &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1044);
        // BAR size probing through ECAM.
        ecam.write(ecam_addr(0, 1, 0, 0x10), &[0xff; 4]);
        assert_eq!(read_u32(&mut ecam, ecam_addr(0, 1, 0, 0x10)), 0xffff_c000);
        for absent in [
            ecam_addr(0, 2, 0, 0),
            ecam_addr(0, 1, 1, 0),
            ecam_addr(1, 0, 0, 0),
            ecam_addr(255, 31, 7, 0xffc),
        ] {
            assert_eq!(read_u32(&mut ecam, absent), 0xffff_ffff, "{absent:#x}");
        }
    }

    #[test]
    fn ecam_rejects_unaligned_oversized_and_out_of_range_accesses() {
        let mut ecam = PciEcam::new(root_with_device());
        let mut d = [0u8; 4];
        ecam.read(ecam_addr(0, 1, 0, 2), &mut d);
        assert_eq!(d, [0xff; 4], "unaligned dword");
        let mut q = [0u8; 8];
        ecam.read(ecam_addr(0, 1, 0, 0), &mut q);
        assert_eq!(q, [0xff; 8], "8-byte access");
        let mut t = [0u8; 3];
        ecam.read(ecam_addr(0, 1, 0, 0), &mut t);
        assert_eq!(t, [0xff; 3]);
        ecam.read(1 << 28, &mut d);
        assert_eq!(d, [0xff; 4], "past the ECAM area");
        ecam.read(u64::MAX - 3, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Unaligned and oversized writes change nothing.
        ecam.write(ecam_addr(0, 1, 0, 0x11), &[0xff; 4]);
        ecam.write(ecam_addr(0, 1, 0, 0x10), &[0xff; 8]);
        ecam.write(u64::MAX, &[0xff]);
        assert_eq!(read_u32(&mut ecam, ecam_addr(0, 1, 0, 0x10)), 0xc000_0000);
        // The extended space reads as zero (no extended capabilities).
        assert_eq!(read_u32(&mut ecam, ecam_addr(0, 1, 0, 0x100)), 0);
    }

    #[test]
    fn cf8_mechanism_selects_and_accesses() {
        let mut io = PciConfigIo::new(root_with_device());
        let select = |io: &mut PciConfigIo, dev: u32, reg: u32| {
            io.write(0, &(0x8000_0000 | (dev << 11) | reg).to_le_bytes());
        };
        select(&mut io, 1, 0);
        assert_eq!(
            read_u32(&mut io, 0),
            0x8000_0800,
            "CONFIG_ADDRESS reads back"
        );
        assert_eq!(read_u32(&mut io, 4), 0x1044_1af4);
        let mut b = [0u8; 1];
        io.read(7, &mut b);
        assert_eq!(b[0], 0x10, "byte 3 of the vendor/device dword");
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1044);
        select(&mut io, 1, 0x10);
        io.write(4, &[0xff; 4]);
        assert_eq!(read_u32(&mut io, 4), 0xffff_c000, "BAR size probing");
        select(&mut io, 0, 0);
        assert_eq!(read_u32(&mut io, 4), 0x0008_1b36);
    }

    #[test]
    fn cf8_mechanism_ignores_bad_accesses() {
        let mut io = PciConfigIo::new(root_with_device());
        // Disabled: data reads all-ones.
        io.write(0, &0x0000_0800u32.to_le_bytes());
        assert_eq!(read_u32(&mut io, 4), 0xffff_ffff);
        // Byte write to 0xCFB (mechanism select) does not change the address.
        io.write(3, &[0x01]);
        assert_eq!(read_u32(&mut io, 0), 0x0000_0800);
        let mut w = [0u8; 2];
        io.read(0, &mut w);
        assert_eq!(w, [0xff; 2], "narrow CONFIG_ADDRESS read");
        // Straddling the end of the data window.
        io.write(0, &0x8000_0800u32.to_le_bytes());
        let mut d = [0u8; 4];
        io.read(6, &mut d);
        assert_eq!(d, [0xff; 4]);
        io.write(5, &[0xff; 4]);
        // Absent bus and function.
        io.write(0, &0x8001_0000u32.to_le_bytes());
        assert_eq!(read_u32(&mut io, 4), 0xffff_ffff);
        io.write(0, &0x8000_0900u32.to_le_bytes());
        assert_eq!(read_u32(&mut io, 4), 0xffff_ffff);
    }

    #[test]
    fn bus_fills_up() {
        let mut root = PciRoot::new();
        for expect in 1..32u8 {
            let f = Function(PciConfigSpace::new(
                crate::pci::host_bridge::HOST_BRIDGE_IDS,
            ));
            assert_eq!(root.add_device(Arc::new(Mutex::new(f))), Ok(expect));
        }
        let f = Function(PciConfigSpace::new(
            crate::pci::host_bridge::HOST_BRIDGE_IDS,
        ));
        assert_eq!(
            root.add_device(Arc::new(Mutex::new(f))),
            Err(PciRootError::BusFull)
        );
    }
}
