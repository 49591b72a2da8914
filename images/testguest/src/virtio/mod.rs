//! A minimal modern virtio-pci driver (virtio 1.x section 4.1), in CPL3, polled.
//!
//! `Device::open` finds the first PCI function 1af4:(1040 + type) on bus 0, enables it, locates
//! the common, notify and device configuration structures through its vendor capabilities,
//! resets it and negotiates features. `setup_queue` then builds split virtqueues (`queue.rs`) in
//! RAM from `dma.rs`, and `driver_ok` starts the device. MSI-X vectors are set to NO_VECTOR:
//! the guest never takes interrupts. Dropping a `Device` resets it, which releases its queues.
//!
//! Register accesses are VM exits (~50 us each on the target machines): set-up costs a few dozen,
//! and each batch of requests costs one notify write at most.
pub mod abuse;
pub mod agent;
pub mod agent_files;
pub mod bar_move;
pub mod blk;
pub mod console;
pub mod dma;
pub mod fs;
pub mod fuse;
pub mod io_loop;
pub mod net;
pub mod netbench;
pub mod queue;
pub mod rng;
pub mod snapshot_loop;
pub mod vsock;
pub mod vsock_cases;

use crate::bootinfo::BootInfo;
use crate::mmio::Region;
use crate::pci::{hex_fixed, Pci};
use crate::scenario::fail;
use crate::tsc::Deadline;
use queue::Queue;

pub const VENDOR: u16 = 0x1af4;
/// Modern (non-transitional) devices have PCI device ID 0x1040 + virtio device type.
const MODERN_ID_BASE: u16 = 0x1040;
pub const F_VERSION_1: u64 = 1 << 32;

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 64;
const STATUS_FAILED: u8 = 128;
const NO_VECTOR: u16 = 0xffff;

// virtio_pci_common_cfg offsets.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const MSIX_CONFIG: u64 = 0x10;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
const COMMON_CFG_LEN: u64 = 0x38;

const CAP_ID_VENDOR: u32 = 0x09;
const CFG_COMMON: usize = 1;
const CFG_NOTIFY: usize = 2;
const CFG_DEVICE: usize = 4;
/// How long a reset may take to read back as 0.
const RESET_TIMEOUT_MS: u64 = 1000;

/// An opened virtio-pci device.
pub struct Device {
    common: Region,
    notify: Region,
    notify_multiplier: u32,
    device_cfg: Option<Region>,
    /// The negotiated features.
    pub features: u64,
}

/// Whether a virtio device of type `device_type` sits on bus 0.
pub fn present(info: &BootInfo, device_type: u16) -> bool {
    Pci::new(info)
        .find(VENDOR, MODERN_ID_BASE + device_type)
        .is_some()
}

impl Device {
    /// Opens the first device of virtio type `device_type` (`name` is for messages), starts a
    /// fresh DMA arena, resets the device and negotiates `wanted & offered`, which must include
    /// VERSION_1. One device per scenario, or more with `open_another`.
    pub fn open(info: &BootInfo, device_type: u16, name: &str, wanted: u64) -> Device {
        dma::reset(info);
        Self::open_another(info, device_type, name, wanted)
    }

    /// Like `open`, keeping the DMA arena (and the queues of devices opened before).
    pub fn open_another(info: &BootInfo, device_type: u16, name: &str, wanted: u64) -> Device {
        let pci = Pci::new(info);
        let id = MODERN_ID_BASE + device_type;
        let Some(f) = pci.find(VENDOR, id) else {
            fail(|w| {
                w.str("no ").str(name).str(" device (PCI 1af4:");
                hex_fixed(w, id.into(), 4);
                w.str(") on bus 0");
            })
        };
        // The capabilities of each cfg_type the driver uses (the first of each type wins):
        // (BAR, offset, length), and the notify multiplier. Only the BARs they name are
        // enabled.
        let mut caps: [Option<(usize, u64, u64)>; 5] = [None; 5];
        let mut notify_multiplier = 0;
        let mut wanted_bars = 0u8;
        for (at, dword) in pci.capabilities(f.dev) {
            let cfg_type = (dword >> 24) as usize;
            if dword & 0xff != CAP_ID_VENDOR
                || !matches!(cfg_type, CFG_COMMON | CFG_NOTIFY | CFG_DEVICE)
                || caps[cfg_type].is_some()
            {
                continue;
            }
            let bar = (pci.read(f.dev, at + 4) & 0xff) as usize;
            let offset = u64::from(pci.read(f.dev, at + 8));
            let length = u64::from(pci.read(f.dev, at + 12));
            caps[cfg_type] = Some((bar, offset, length));
            if bar < 6 {
                wanted_bars |= 1 << bar;
            }
            if cfg_type == CFG_NOTIFY {
                notify_multiplier = pci.read(f.dev, at + 16);
            }
        }
        let bars = pci.enable_bars(&f, wanted_bars);
        let mut regions: [Option<Region>; 5] = [None; 5];
        for (cfg_type, cap) in caps.iter().enumerate() {
            let Some((bar, offset, length)) = *cap else {
                continue;
            };
            let base = bars.get(bar).copied().unwrap_or(0);
            let region = (base != 0)
                .then(|| Region::new(base + offset, length))
                .flatten();
            if region.is_none() {
                fail(|w| {
                    w.str("capability type ")
                        .dec(cfg_type as u64)
                        .str(" names unusable BAR ")
                        .dec(bar as u64)
                        .str(" at ")
                        .hex(base)
                        .str(" + ")
                        .hex(offset)
                        .str(" length ")
                        .hex(length);
                });
            }
            regions[cfg_type] = region;
        }
        let (Some(common), Some(notify)) = (regions[CFG_COMMON], regions[CFG_NOTIFY]) else {
            fail(|w| {
                w.str(name)
                    .str(" has no common or notify configuration capability");
            })
        };
        if common.len() < COMMON_CFG_LEN {
            fail(|w| {
                w.str("common configuration too short: ").dec(common.len());
            });
        }
        let mut dev = Device {
            common,
            notify,
            notify_multiplier,
            device_cfg: regions[CFG_DEVICE],
            features: 0,
        };
        dev.reset();
        dev.set_status(STATUS_ACKNOWLEDGE);
        dev.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        dev.negotiate(wanted);
        dev.common.write::<u16>(MSIX_CONFIG, NO_VECTOR);
        dev
    }

    fn status(&self) -> u8 {
        self.common.read::<u8>(DEVICE_STATUS)
    }

    fn set_status(&self, status: u8) {
        self.common.write::<u8>(DEVICE_STATUS, status);
    }

    /// Resets the device and waits until the reset is complete.
    pub fn reset(&self) {
        self.set_status(0);
        let deadline = Deadline::after_ms(RESET_TIMEOUT_MS);
        while self.status() != 0 {
            if deadline.passed() {
                fail(|w| {
                    w.str("device status still ")
                        .hex(self.status().into())
                        .str(" a second after reset");
                });
            }
        }
    }

    fn negotiate(&mut self, wanted: u64) {
        let c = &self.common;
        c.write::<u32>(DEVICE_FEATURE_SELECT, 0);
        let low = c.read::<u32>(DEVICE_FEATURE);
        c.write::<u32>(DEVICE_FEATURE_SELECT, 1);
        let offered = u64::from(low) | u64::from(c.read::<u32>(DEVICE_FEATURE)) << 32;
        if offered & F_VERSION_1 == 0 {
            fail(|w| {
                w.str("device does not offer VERSION_1 (features ")
                    .hex(offered)
                    .str(")");
            });
        }
        let features = offered & wanted;
        c.write::<u32>(DRIVER_FEATURE_SELECT, 0);
        c.write::<u32>(DRIVER_FEATURE, features as u32);
        c.write::<u32>(DRIVER_FEATURE_SELECT, 1);
        c.write::<u32>(DRIVER_FEATURE, (features >> 32) as u32);
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.set_status(status);
        let got = self.status();
        if got & STATUS_FEATURES_OK == 0 {
            fail(|w| {
                w.str("device refused features ")
                    .hex(features)
                    .str(" (status ")
                    .hex(got.into())
                    .str(")");
            });
        }
        self.features = features;
    }

    /// Sets up and enables queue `index` with at most `max_size` entries.
    pub fn setup_queue(&self, index: u16, max_size: u16) -> Queue {
        let c = &self.common;
        c.write::<u16>(QUEUE_SELECT, index);
        let offered = c.read::<u16>(QUEUE_SIZE);
        if offered == 0 {
            fail(|w| {
                w.str("queue ").dec(index.into()).str(" does not exist");
            });
        }
        // Largest power of two within both limits.
        let limit = offered.min(max_size).max(1);
        let size = 1u16 << (15 - limit.leading_zeros());
        if size != offered {
            c.write::<u16>(QUEUE_SIZE, size);
        }
        c.write::<u16>(QUEUE_MSIX_VECTOR, NO_VECTOR);
        let notify_off =
            u64::from(c.read::<u16>(QUEUE_NOTIFY_OFF)) * u64::from(self.notify_multiplier);
        let Some(notify) = self.notify.sub(notify_off, 2) else {
            fail(|w| {
                w.str("queue ")
                    .dec(index.into())
                    .str(" notify offset ")
                    .hex(notify_off)
                    .str(" is outside the notify region");
            })
        };
        let q = Queue::new(index, size, notify);
        let (desc, avail, used) = q.addresses();
        for (reg, addr) in [
            (QUEUE_DESC, desc),
            (QUEUE_DRIVER, avail),
            (QUEUE_DEVICE, used),
        ] {
            c.write::<u32>(reg, addr as u32);
            c.write::<u32>(reg + 4, (addr >> 32) as u32);
        }
        c.write::<u16>(QUEUE_ENABLE, 1);
        q
    }

    /// Sets DRIVER_OK: the device may now use its queues.
    pub fn driver_ok(&self) {
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    }

    /// Whether the device has set DEVICE_NEEDS_RESET (or the driver FAILED).
    pub fn needs_reset(&self) -> bool {
        self.status() & (STATUS_NEEDS_RESET | STATUS_FAILED) != 0
    }

    /// Fails the scenario with `what` and the device status (which may show NEEDS_RESET).
    pub fn fail_timeout(&self, what: &str) -> ! {
        let status = self.status();
        fail(|w| {
            w.str("timeout waiting for ")
                .str(what)
                .str(" (device status ")
                .hex(status.into());
            if status & (STATUS_NEEDS_RESET | STATUS_FAILED) != 0 {
                w.str(": needs reset");
            }
            w.str(")");
        })
    }

    fn device_cfg(&self) -> &Region {
        self.device_cfg.as_ref().unwrap_or_else(|| {
            fail(|w| {
                w.str("device has no device-specific configuration capability");
            })
        })
    }

    /// Reads a byte of the device-specific configuration.
    pub fn cfg_u8(&self, off: u64) -> u8 {
        self.device_cfg().read::<u8>(off)
    }

    /// Reads a u32 of the device-specific configuration.
    pub fn cfg_u32(&self, off: u64) -> u32 {
        self.device_cfg().read::<u32>(off)
    }

    /// Reads a u64 of the device-specific configuration as two u32 halves, retrying until the
    /// configuration generation is the same before and after.
    pub fn cfg_u64(&self, off: u64) -> u64 {
        loop {
            let before = self.common.read::<u8>(CONFIG_GENERATION);
            let low = self.cfg_u32(off);
            let high = self.cfg_u32(off + 4);
            if self.common.read::<u8>(CONFIG_GENERATION) == before {
                return u64::from(low) | u64::from(high) << 32;
            }
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.reset();
    }
}
