//! PCI configuration access, device set-up and the `pci` scenario, all in CPL3.
//!
//! Configuration space is reached through ECAM when the command line names one (`ecam=0x<base>`,
//! for platforms without an MCFG such as QEMU 7.2 microvm) or the ACPI MCFG table describes one
//! (one MMIO access per dword), else through ports 0xcf8/0xcfc (two port accesses). Only function 0 of each
//! device on bus 0 is looked at: skiff and QEMU put every device this guest drives there.
//!
//! Every configuration access is a VM exit (tens of microseconds on the target machines), so
//! probing reads three dwords per device, `enable` reads each BAR once and sizes a BAR only when
//! it has no address yet (skiff and SeaBIOS assign them all), and the command register is
//! written only when it changes.
use core::sync::atomic::{AtomicU64, Ordering};

use crate::acpi;
use crate::bootinfo::BootInfo;
use crate::io::{inl, outl};
use crate::mmio::Region;
use crate::scenario::{fail, fail_msg};
use crate::serial::{self, Line};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;
/// ECAM bytes per bus: 32 devices x 8 functions x 4 KiB.
const ECAM_BUS_SIZE: u64 = 1 << 20;
const DEVICES: u8 = 32;

const REG_ID: u16 = 0x00;
pub const REG_COMMAND: u16 = 0x04;
const REG_CLASS: u16 = 0x08;
const REG_HEADER: u16 = 0x0c;
pub const REG_BAR0: u16 = 0x10;
const REG_CAP_PTR: u16 = 0x34;
/// Status register (upper half of the command dword) bit 4: capability list present.
const STATUS_CAP_LIST: u32 = 1 << 20;
pub const CMD_MEMORY: u32 = 1 << 1;
const CMD_BUS_MASTER: u32 = 1 << 2;
const BAR_IO: u32 = 1;
const BAR_TYPE_64: u32 = 0b100;
/// Where BAR assignment starts when no assigned BAR lies above it (skiff's 32-bit PCI window).
const BAR_WINDOW_START: u64 = 0xc000_0000;
/// BARs are never assigned at or above the IOAPIC.
const BAR_WINDOW_END: u64 = 0xfec0_0000;
/// Bound on the capability list walk (a looping list must not hang the guest).
const MAX_CAPS: u8 = 48;

/// Next free address for BAR assignment, 0 until the first assignment computes it.
static NEXT_BAR: AtomicU64 = AtomicU64::new(0);

/// Function 0 of a device on bus 0.
#[derive(Clone, Copy)]
pub struct Function {
    pub dev: u8,
    pub vendor: u16,
    pub device: u16,
    /// Class, subclass and programming interface (configuration bytes 0x0b, 0x0a, 0x09).
    pub class: u32,
    /// Header type without the multifunction bit.
    pub header: u8,
}

/// Configuration space access for bus 0.
pub struct Pci {
    ecam: Option<Region>,
}

impl Pci {
    /// ECAM at the command line's `ecam=0x<base>`, else from the MCFG table, else the legacy
    /// ports. Fails the scenario if an ECAM base is given but unusable.
    pub fn new(info: &BootInfo) -> Pci {
        let Some(base) =
            cmdline_ecam(info).or_else(|| acpi::mcfg_ecam(info.rsdp_paddr).map(|(base, _)| base))
        else {
            return Pci { ecam: None };
        };
        let Some(ecam) = Region::new(base, ECAM_BUS_SIZE) else {
            fail(|w| {
                w.str("unusable PCI ECAM base ").hex(base);
            })
        };
        Pci { ecam: Some(ecam) }
    }

    /// Reads the dword at `reg` (rounded down to 4) of device `dev`, function 0.
    pub fn read(&self, dev: u8, reg: u16) -> u32 {
        match &self.ecam {
            Some(ecam) => ecam.read::<u32>(ecam_offset(dev, reg)),
            None => {
                outl(CONFIG_ADDRESS, port_address(dev, reg));
                inl(CONFIG_DATA)
            }
        }
    }

    /// Writes the dword at `reg` (rounded down to 4) of device `dev`, function 0.
    pub fn write(&self, dev: u8, reg: u16, value: u32) {
        match &self.ecam {
            Some(ecam) => ecam.write::<u32>(ecam_offset(dev, reg), value),
            None => {
                outl(CONFIG_ADDRESS, port_address(dev, reg));
                outl(CONFIG_DATA, value);
            }
        }
    }

    /// Function 0 of device `dev`, if present.
    pub fn probe(&self, dev: u8) -> Option<Function> {
        let id = self.read(dev, REG_ID);
        if id & 0xffff == 0xffff || id == 0 {
            return None;
        }
        Some(Function {
            dev,
            vendor: id as u16,
            device: (id >> 16) as u16,
            class: self.read(dev, REG_CLASS) >> 8,
            header: (self.read(dev, REG_HEADER) >> 16) as u8 & 0x7f,
        })
    }

    /// Every present function 0 on bus 0, in device order.
    pub fn functions(&self) -> impl Iterator<Item = Function> + '_ {
        (0..DEVICES).filter_map(|dev| self.probe(dev))
    }

    /// The first function with this vendor and device ID (three accesses per device probed).
    pub fn find(&self, vendor: u16, device: u16) -> Option<Function> {
        (0..DEVICES).find_map(|dev| {
            let id = self.read(dev, REG_ID);
            (id == u32::from(vendor) | u32::from(device) << 16)
                .then(|| self.probe(dev))
                .flatten()
        })
    }

    /// Memory BAR addresses of `f` (0 for I/O BARs, absent BARs and the upper half of 64-bit
    /// ones), assigning an address to any memory BAR that has none; then turns on memory
    /// decoding and bus mastering. Fails the scenario if a BAR cannot be placed.
    pub fn enable(&self, f: &Function) -> [u64; 6] {
        self.enable_bars(f, 0x3f)
    }

    /// Like `enable`, looking only at the BARs whose bit is set in `wanted` (bit i: BAR i), so
    /// BARs a driver does not use cost no sizing (each probe is a handful of VM exits). The
    /// other entries are 0.
    pub fn enable_bars(&self, f: &Function, wanted: u8) -> [u64; 6] {
        let bar_count = match f.header {
            0 => 6,
            1 => 2,
            _ => 0,
        };
        let mut bars = [0u64; 6];
        let mut i = 0;
        while i < bar_count {
            let reg = REG_BAR0 + 4 * i as u16;
            if wanted & (1 << i) == 0 {
                i += 1;
                continue;
            }
            let low = self.read(f.dev, reg);
            if low & BAR_IO != 0 {
                i += 1;
                continue;
            }
            let is64 = low & 0b110 == BAR_TYPE_64 && i + 1 < bar_count;
            let high = if is64 { self.read(f.dev, reg + 4) } else { 0 };
            let mut addr = u64::from(low & !0xf) | u64::from(high) << 32;
            if addr == 0 {
                addr = self.assign(f.dev, reg, is64);
            }
            bars[i] = addr;
            i += if is64 { 2 } else { 1 };
        }
        let command = self.read(f.dev, REG_COMMAND);
        let wanted = command | CMD_MEMORY | CMD_BUS_MASTER;
        if wanted != command {
            // The upper half is the status register, whose bits are write-1-to-clear: write 0s.
            self.write(f.dev, REG_COMMAND, wanted & 0xffff);
        }
        bars
    }

    /// Size of the memory BAR at `reg` (0 if unimplemented), with memory decoding off meanwhile.
    fn bar_size(&self, dev: u8, reg: u16, is64: bool) -> u64 {
        let command = self.read(dev, REG_COMMAND) & 0xffff;
        if command & CMD_MEMORY != 0 {
            self.write(dev, REG_COMMAND, command & !CMD_MEMORY);
        }
        let probe = |reg: u16| {
            let old = self.read(dev, reg);
            self.write(dev, reg, u32::MAX);
            let mask = self.read(dev, reg);
            self.write(dev, reg, old);
            mask
        };
        let low = u64::from(probe(reg) & !0xf);
        let high = if is64 {
            u64::from(probe(reg + 4))
        } else {
            u64::from(u32::MAX)
        };
        if command & CMD_MEMORY != 0 {
            self.write(dev, REG_COMMAND, command);
        }
        if low == 0 && (!is64 || high == 0) {
            return 0;
        }
        (!(low | high << 32)).wrapping_add(1)
    }

    /// Gives the unassigned memory BAR at `reg` an address below 4 GiB and returns it (0 if the
    /// BAR is not implemented).
    fn assign(&self, dev: u8, reg: u16, is64: bool) -> u64 {
        let size = self.bar_size(dev, reg, is64);
        if size == 0 {
            return 0;
        }
        if NEXT_BAR.load(Ordering::Relaxed) == 0 {
            NEXT_BAR.store(self.first_free_bar_address(), Ordering::Relaxed);
        }
        let addr = NEXT_BAR.load(Ordering::Relaxed).next_multiple_of(size);
        let limit = match &self.ecam {
            Some(ecam) if ecam.base() > addr => ecam.base().min(BAR_WINDOW_END),
            _ => BAR_WINDOW_END,
        };
        if addr.checked_add(size).is_none_or(|end| end > limit) {
            fail(|w| {
                w.str("no room for a BAR of ")
                    .hex(size)
                    .str(" bytes at ")
                    .hex(addr)
                    .str(" (device ")
                    .dec(dev.into())
                    .str(")");
            });
        }
        self.write(dev, reg, addr as u32);
        if is64 {
            self.write(dev, reg + 4, 0);
        }
        NEXT_BAR.store(addr + size, Ordering::Relaxed);
        addr
    }

    /// The end of the highest memory BAR already assigned in `BAR_WINDOW_START..4 GiB` on bus 0,
    /// or `BAR_WINDOW_START`. Sizes every assigned BAR: only used on the rare assignment path.
    fn first_free_bar_address(&self) -> u64 {
        let mut end = BAR_WINDOW_START;
        for f in self.functions() {
            let count = if f.header == 0 { 6 } else { 2 };
            let mut i = 0;
            while i < count {
                let reg = REG_BAR0 + 4 * i as u16;
                let low = self.read(f.dev, reg);
                let is64 = low & (BAR_IO | 0b110) == BAR_TYPE_64 && i + 1 < count;
                let base = u64::from(low & !0xf);
                if low & BAR_IO == 0 && base >= BAR_WINDOW_START {
                    let high = if is64 { self.read(f.dev, reg + 4) } else { 0 };
                    if high == 0 {
                        end = end.max(base + self.bar_size(f.dev, reg, is64));
                    }
                }
                i += if is64 { 2 } else { 1 };
            }
        }
        end
    }

    /// The capability list of device `dev`: `(offset, first dword)` of each entry.
    pub fn capabilities(&self, dev: u8) -> Caps<'_> {
        let has_list = self.read(dev, REG_COMMAND) & STATUS_CAP_LIST != 0;
        let first = if has_list {
            (self.read(dev, REG_CAP_PTR) & 0xfc) as u16
        } else {
            0
        };
        Caps {
            pci: self,
            dev,
            next: first,
            left: MAX_CAPS,
        }
    }
}

/// Iterator over a capability list (see `Pci::capabilities`).
pub struct Caps<'a> {
    pci: &'a Pci,
    dev: u8,
    next: u16,
    left: u8,
}

impl Iterator for Caps<'_> {
    type Item = (u16, u32);

    fn next(&mut self) -> Option<(u16, u32)> {
        if self.next < 0x40 || self.left == 0 {
            return None;
        }
        self.left -= 1;
        let at = self.next;
        let dword = self.pci.read(self.dev, at);
        self.next = ((dword >> 8) & 0xfc) as u16;
        Some((at, dword))
    }
}

/// The `ecam=0x<hex>` command-line token's value, if there is one.
fn cmdline_ecam(info: &BootInfo) -> Option<u64> {
    let token = info
        .cmdline()
        .split(u8::is_ascii_whitespace)
        .find(|t| t.starts_with(b"ecam="))?;
    let digits = token[5..].strip_prefix(b"0x")?;
    if digits.is_empty() || digits.len() > 16 {
        fail_msg("bad ecam= value (want 0x followed by up to 16 hex digits)");
    }
    digits
        .iter()
        .try_fold(0u64, |v, &d| {
            let digit = (d as char).to_digit(16);
            Some(v << 4 | u64::from(digit?))
        })
        .or_else(|| fail_msg("bad ecam= value (want 0x followed by up to 16 hex digits)"))
}

fn ecam_offset(dev: u8, reg: u16) -> u64 {
    u64::from(dev) << 15 | u64::from(reg & 0xffc)
}

fn port_address(dev: u8, reg: u16) -> u32 {
    0x8000_0000 | u32::from(dev) << 11 | u32::from(reg & 0xfc)
}

/// Writes the low `digits` hex digits of `v`, zero-padded, without `0x`.
pub fn hex_fixed(w: &mut Line, v: u64, digits: u32) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for i in (0..digits).rev() {
        w.bytes(&[DIGITS[((v >> (4 * i)) & 0xf) as usize]]);
    }
}

/// The `pci` scenario: lists function 0 of every device on bus 0 and enables it.
pub fn run(info: &BootInfo) {
    let pci = Pci::new(info);
    {
        let mut w = serial::line();
        match &pci.ecam {
            Some(ecam) => w.str("testguest: pci config ecam=").hex(ecam.base()),
            None => w.str("testguest: pci config ports"),
        };
        w.str("\n");
    }
    let mut count = 0;
    for f in pci.functions() {
        pci.enable(&f);
        let mut w = serial::line();
        w.str("testguest: pci 00:");
        hex_fixed(&mut w, f.dev.into(), 2);
        w.str(".0 ");
        hex_fixed(&mut w, f.vendor.into(), 4);
        w.str(":");
        hex_fixed(&mut w, f.device.into(), 4);
        w.str(" class ");
        hex_fixed(&mut w, f.class.into(), 6);
        w.str("\n");
        count += 1;
    }
    if count == 0 {
        fail_msg("no PCI device on bus 0");
    }
    serial::line()
        .str("testguest: pci ok devices=")
        .dec(count)
        .str("\n");
}
