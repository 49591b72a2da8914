//! The PCI host bridge at 00:00.0: a function with only an identity (class 06/00, host bridge),
//! no BARs and no capabilities. Linux's type-1 configuration probe looks for it on bus 0.

use super::config_space::{PciConfigSpace, PciIds};
use super::PciDevice;

/// Vendor and device ID of the host bridge: Red Hat's generic PCI Express host bridge IDs, which
/// carry no chipset quirks in guest kernels.
pub const HOST_BRIDGE_IDS: PciIds = PciIds {
    vendor: 0x1b36,
    device: 0x0008,
    revision: 0,
    class: 0x06,
    subclass: 0x00,
    prog_if: 0x00,
    subsystem_vendor: 0x1b36,
    subsystem: 0x0008,
};

/// The host bridge function.
#[derive(Debug)]
pub struct PciHostBridge {
    config: PciConfigSpace,
}

impl PciHostBridge {
    /// A host bridge with `HOST_BRIDGE_IDS`.
    pub fn new() -> Self {
        Self {
            config: PciConfigSpace::new(HOST_BRIDGE_IDS),
        }
    }
}

impl Default for PciHostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for PciHostBridge {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(usize::from(offset), data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config.write(usize::from(offset), data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifies_as_a_host_bridge() {
        let mut b = PciHostBridge::new();
        let mut d = [0u8; 4];
        b.read_config(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0008_1b36);
        b.read_config(8, &mut d);
        assert_eq!(d[3], 0x06, "class: bridge");
        assert_eq!(d[2], 0x00, "subclass: host bridge");
        b.write_config(0x10, &[0xff; 4]);
        b.read_config(0x10, &mut d);
        assert_eq!(d, [0; 4], "no BARs");
    }
}
