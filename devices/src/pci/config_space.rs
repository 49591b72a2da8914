//! The 256-byte configuration space of one PCI function with a type-0 header: identification,
//! command and status, memory BARs (with size probing), and the capability list.
//!
//! Every register is plain bytes plus a per-bit write mask, so one write path handles the command
//! register, BARs (whose low address bits and type bits are read-only, which is what makes writing
//! all-ones read back the size), the interrupt line and writable capability fields. Side effects
//! of a write (MSI-X enable, the virtio PCI configuration access window) are the owning device's
//! job. Whether and where a BAR decodes (`bar_decode`) follows from the command register's
//! memory-enable bit and the BAR's value: the owner maps or moves the BAR to match. The extended space (offsets 256..4096) reads as zero: no extended capabilities. I/O BARs,
//! expansion ROMs and INTx are not offered.

use thiserror::Error;

/// Size of the conventional configuration space this type stores.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Size of the PCI Express (extended) configuration space of one function.
pub const EXTENDED_CONFIG_SPACE_SIZE: u16 = 4096;

/// Vendor ID register.
pub const VENDOR_ID: usize = 0x00;
/// Device ID register.
pub const DEVICE_ID: usize = 0x02;
/// Command register.
pub const COMMAND: usize = 0x04;
/// Status register.
pub const STATUS: usize = 0x06;
/// Revision ID register.
pub const REVISION_ID: usize = 0x08;
/// Class code: programming interface byte (the subclass and base class follow).
pub const CLASS_PROG_IF: usize = 0x09;
/// Header type register.
pub const HEADER_TYPE: usize = 0x0e;
/// First base address register.
pub const BAR0: usize = 0x10;
/// Subsystem vendor ID register.
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
/// Subsystem ID register.
pub const SUBSYSTEM_ID: usize = 0x2e;
/// Capabilities pointer.
pub const CAPABILITIES_POINTER: usize = 0x34;
/// Interrupt line (scratch register for the OS).
pub const INTERRUPT_LINE: usize = 0x3c;

/// Command register: memory space enable.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus master enable.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: the capability list is present.
pub const STATUS_CAPABILITIES: u16 = 1 << 4;

/// Number of BARs in a type-0 header.
pub const BAR_COUNT: usize = 6;
/// First byte after the header, where capabilities start.
const FIRST_CAPABILITY: usize = 0x40;
/// Memory BAR type bits: 64-bit.
const BAR_MEM64: u32 = 0b10 << 1;
/// Memory BAR: prefetchable.
const BAR_PREFETCHABLE: u32 = 1 << 3;
/// Low bits of a memory BAR that are flags, not address.
const BAR_FLAG_BITS: u32 = 0xf;

/// Errors from laying out a configuration space.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigSpaceError {
    /// A BAR number outside 0..6, or a 64-bit BAR at 5 (it needs two registers).
    #[error("BAR {index} does not exist or has no room for a {bits}-bit BAR")]
    BarIndex {
        /// BAR number.
        index: usize,
        /// 32 or 64.
        bits: u32,
    },
    /// The BAR (or its upper half) is already in use.
    #[error("BAR {index} is already in use")]
    BarInUse {
        /// BAR number.
        index: usize,
    },
    /// A BAR size that is not a power of two of at least 16 bytes, or too large for its type.
    #[error(
        "BAR {index}: invalid size {size:#x} (a power of two, at least 16, within the BAR's width)"
    )]
    BarSize {
        /// BAR number.
        index: usize,
        /// Size.
        size: u64,
    },
    /// A BAR address not aligned to its size.
    #[error("BAR {index}: address {address:#x} is not aligned to its size {size:#x}")]
    BarAlignment {
        /// BAR number.
        index: usize,
        /// Address.
        address: u64,
        /// Size.
        size: u64,
    },
    /// A saved configuration space of the wrong size.
    #[error("saved configuration space has {0} bytes, expected {CONFIG_SPACE_SIZE}")]
    StateSize(usize),
    /// The capability does not fit the rest of the configuration space.
    #[error("capability {id:#04x} of {len} bytes does not fit at offset {offset:#x}")]
    CapabilityTooLarge {
        /// Capability ID.
        id: u8,
        /// Its length.
        len: usize,
        /// Where it would go.
        offset: usize,
    },
}

/// The identity of a PCI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision ID.
    pub revision: u8,
    /// Base class code.
    pub class: u8,
    /// Subclass code.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// A memory BAR's width and prefetchability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Memory32,
    /// 64-bit memory BAR (uses the next register for the upper half).
    Memory64 {
        /// Prefetchable.
        prefetchable: bool,
    },
}

/// Where a memory BAR should respond, as its registers and the command register say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarDecode {
    /// Nowhere: memory decoding is off, or the BAR holds its size mask (the guest is sizing it,
    /// so the all-ones "address" is not a place).
    Off,
    /// The guest wrote the lower half of a 64-bit BAR and not yet the upper half (nor the
    /// command register): the new address is incomplete, keep the BAR where it is.
    Updating,
    /// At this address.
    At(u64),
}

#[derive(Debug, Clone, Copy)]
struct BarInfo {
    kind: BarKind,
    size: u64,
}

/// What a snapshot keeps of a configuration space: its bytes as the guest sees them. Only the
/// bits the guest may write (command register, BAR addresses, interrupt line, writable
/// capability fields such as MSI-X enable and mask) are taken back on restore; the layout comes
/// from the device rebuilt from its configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConfigSpaceState {
    /// The conventional space, `CONFIG_SPACE_SIZE` bytes.
    pub bytes: Vec<u8>,
}

/// One function's configuration space.
#[derive(Clone)]
pub struct PciConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    writable: [u8; CONFIG_SPACE_SIZE],
    bars: [Option<BarInfo>; BAR_COUNT],
    /// BAR registers taken by the upper half of a 64-bit BAR.
    bar_upper: [bool; BAR_COUNT],
    /// 64-bit BARs whose lower half was written since their upper half (see `BarDecode::Updating`).
    bar_half_written: [bool; BAR_COUNT],
    next_capability: usize,
    last_capability: Option<usize>,
}

impl std::fmt::Debug for PciConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfigSpace")
            .field("vendor", &format_args!("{:#06x}", self.read_u16(VENDOR_ID)))
            .field("device", &format_args!("{:#06x}", self.read_u16(DEVICE_ID)))
            .finish_non_exhaustive()
    }
}

impl PciConfigSpace {
    /// A type-0 header with `ids`, command register cleared, no BARs and no capabilities.
    pub fn new(ids: PciIds) -> Self {
        let mut s = Self {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            bars: [None; BAR_COUNT],
            bar_upper: [false; BAR_COUNT],
            bar_half_written: [false; BAR_COUNT],
            next_capability: FIRST_CAPABILITY,
            last_capability: None,
        };
        s.set_u16(VENDOR_ID, ids.vendor);
        s.set_u16(DEVICE_ID, ids.device);
        s.bytes[REVISION_ID] = ids.revision;
        s.bytes[CLASS_PROG_IF] = ids.prog_if;
        s.bytes[CLASS_PROG_IF + 1] = ids.subclass;
        s.bytes[CLASS_PROG_IF + 2] = ids.class;
        s.bytes[HEADER_TYPE] = 0; // type 0, single function
        s.set_u16(SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        s.set_u16(SUBSYSTEM_ID, ids.subsystem);
        let command = COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        s.writable[COMMAND..COMMAND + 2].copy_from_slice(&command.to_le_bytes());
        s.writable[INTERRUPT_LINE] = 0xff;
        s
    }

    /// Adds memory BAR `index` of `size` bytes (a power of two, at least 16) at `address`.
    pub fn add_bar(
        &mut self,
        index: usize,
        kind: BarKind,
        size: u64,
        address: u64,
    ) -> Result<(), ConfigSpaceError> {
        let (bits, flags, max) = match kind {
            BarKind::Memory32 => (32, 0, 1u64 << 31),
            BarKind::Memory64 { prefetchable } => (
                64,
                BAR_MEM64 | if prefetchable { BAR_PREFETCHABLE } else { 0 },
                1u64 << 63,
            ),
        };
        let registers = if bits == 64 { 2 } else { 1 };
        if index + registers > BAR_COUNT {
            return Err(ConfigSpaceError::BarIndex { index, bits });
        }
        if (index..index + registers).any(|i| self.bars[i].is_some() || self.bar_upper[i]) {
            return Err(ConfigSpaceError::BarInUse { index });
        }
        if size < 16 || !size.is_power_of_two() || size > max {
            return Err(ConfigSpaceError::BarSize { index, size });
        }
        if address & (size - 1) != 0 || (bits == 32 && address > u64::from(u32::MAX)) {
            return Err(ConfigSpaceError::BarAlignment {
                index,
                address,
                size,
            });
        }
        let address_mask = !(size - 1);
        let reg = BAR0 + 4 * index;
        self.set_u32(reg, (address as u32 & !BAR_FLAG_BITS) | flags);
        self.set_writable_u32(reg, address_mask as u32 & !BAR_FLAG_BITS);
        if registers == 2 {
            self.set_u32(reg + 4, (address >> 32) as u32);
            self.set_writable_u32(reg + 4, (address_mask >> 32) as u32);
            self.bar_upper[index + 1] = true;
        }
        self.bars[index] = Some(BarInfo { kind, size });
        Ok(())
    }

    /// The address BAR `index` currently holds (as the guest last programmed it), if it exists.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let info = self.bars.get(index).copied().flatten()?;
        let reg = BAR0 + 4 * index;
        let low = u64::from(self.read_u32(reg) & !BAR_FLAG_BITS);
        Some(match info.kind {
            BarKind::Memory32 => low,
            BarKind::Memory64 { .. } => low | (u64::from(self.read_u32(reg + 4)) << 32),
        })
    }

    /// Where BAR `index` should respond now, if it exists: nowhere while memory decoding is off
    /// or while it holds its size mask, and not yet while a 64-bit address is half written.
    pub fn bar_decode(&self, index: usize) -> Option<BarDecode> {
        let info = self.bars.get(index).copied().flatten()?;
        let address = self.bar_address(index)?;
        let size_mask = match info.kind {
            BarKind::Memory32 => !(info.size - 1) & u64::from(u32::MAX),
            BarKind::Memory64 { .. } => !(info.size - 1),
        };
        Some(
            if self.read_u16(COMMAND) & COMMAND_MEMORY == 0 || address == size_mask {
                BarDecode::Off
            } else if self.bar_half_written[index] {
                BarDecode::Updating
            } else {
                BarDecode::At(address)
            },
        )
    }

    /// The size of BAR `index`, if it exists.
    pub fn bar_size(&self, index: usize) -> Option<u64> {
        self.bars.get(index).copied().flatten().map(|b| b.size)
    }

    /// Appends a capability: `id`, the link byte, then `body`. Bits set in `writable` (indexed
    /// like `body`; shorter means the rest is read-only) may be changed by the guest. Returns the
    /// capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigSpaceError> {
        let offset = self.next_capability;
        let len = 2 + body.len();
        if offset + len > CONFIG_SPACE_SIZE {
            return Err(ConfigSpaceError::CapabilityTooLarge { id, len, offset });
        }
        self.bytes[offset] = id;
        self.bytes[offset + 1] = 0;
        self.bytes[offset + 2..offset + len].copy_from_slice(body);
        for (i, mask) in writable.iter().take(body.len()).enumerate() {
            self.writable[offset + 2 + i] = *mask;
        }
        // The link bytes are all below 256 by the check above.
        match self.last_capability {
            Some(prev) => self.bytes[prev + 1] = offset as u8,
            None => self.bytes[CAPABILITIES_POINTER] = offset as u8,
        }
        let status = self.read_u16(STATUS) | STATUS_CAPABILITIES;
        self.set_u16(STATUS, status);
        self.last_capability = Some(offset);
        self.next_capability = (offset + len).next_multiple_of(4);
        Ok(offset)
    }

    /// Reads `data.len()` bytes at `offset` as the guest sees them: the conventional space, then
    /// zeros up to 4096 (no extended capabilities), all-ones beyond.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i);
            *byte = match self.bytes.get(at) {
                Some(b) => *b,
                None if at < usize::from(EXTENDED_CONFIG_SPACE_SIZE) => 0,
                None => 0xff,
            };
        }
    }

    /// Applies a guest write of `data` at `offset`: only writable bits change. A write to the
    /// lower half of a 64-bit BAR leaves it `Updating` until its upper half or the command
    /// register is written.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, value) in data.iter().enumerate() {
            let at = offset.saturating_add(i);
            if let (Some(byte), Some(mask)) = (self.bytes.get_mut(at), self.writable.get(at)) {
                *byte = (*byte & !mask) | (value & mask);
            }
        }
        let end = offset.saturating_add(data.len());
        let touches = |reg: usize| offset < reg + 4 && end > reg;
        if offset < COMMAND + 2 && end > COMMAND {
            self.bar_half_written = [false; BAR_COUNT];
        }
        for index in 0..BAR_COUNT {
            let is64 = matches!(
                self.bars[index],
                Some(BarInfo {
                    kind: BarKind::Memory64 { .. },
                    ..
                })
            );
            let reg = BAR0 + 4 * index;
            if is64 && touches(reg + 4) {
                self.bar_half_written[index] = false;
            } else if is64 && touches(reg) {
                self.bar_half_written[index] = true;
            }
        }
    }

    /// Reads a 16-bit register (offset within the conventional space).
    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// Reads a 32-bit register (offset within the conventional space).
    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Sets bytes regardless of the write mask (the device's own view of read-only fields).
    pub fn set_bytes(&mut self, offset: usize, value: &[u8]) {
        for (i, v) in value.iter().enumerate() {
            if let Some(b) = self.bytes.get_mut(offset.saturating_add(i)) {
                *b = *v;
            }
        }
    }

    /// Sets a 16-bit register regardless of the write mask.
    pub fn set_u16(&mut self, offset: usize, value: u16) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// Sets a 32-bit register regardless of the write mask.
    pub fn set_u32(&mut self, offset: usize, value: u32) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// The state a snapshot keeps.
    pub fn save(&self) -> ConfigSpaceState {
        ConfigSpaceState {
            bytes: self.bytes.to_vec(),
        }
    }

    /// Takes back the guest-writable bits of `state` (an untrusted snapshot): read-only fields
    /// keep this space's values, so identity and layout cannot be changed by a saved file.
    pub fn restore(&mut self, state: &ConfigSpaceState) -> Result<(), ConfigSpaceError> {
        if state.bytes.len() != CONFIG_SPACE_SIZE {
            return Err(ConfigSpaceError::StateSize(state.bytes.len()));
        }
        for ((byte, mask), saved) in self.bytes.iter_mut().zip(&self.writable).zip(&state.bytes) {
            *byte = (*byte & !mask) | (saved & mask);
        }
        self.bar_half_written = [false; BAR_COUNT];
        Ok(())
    }

    fn set_writable_u32(&mut self, offset: usize, mask: u32) {
        if let Some(w) = self.writable.get_mut(offset..offset + 4) {
            w.copy_from_slice(&mask.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1af4,
            device: 0x1044,
            revision: 1,
            class: 0xff,
            subclass: 0x00,
            prog_if: 0x00,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        }
    }

    #[test]
    fn header_reads_back_ids_and_keeps_read_only_fields() {
        let mut c = PciConfigSpace::new(ids());
        assert_eq!(c.read_u32(0), 0x1044_1af4);
        assert_eq!(c.read_u32(0x08), 0xff00_0001, "class code and revision");
        assert_eq!(c.read_u32(0x2c), 0x1100_1af4);
        c.write(0, &[0xff; 4]);
        c.write(0x08, &[0; 4]);
        assert_eq!(c.read_u32(0), 0x1044_1af4, "IDs are read-only");
        assert_eq!(c.read_u32(0x08), 0xff00_0001);
        c.write(COMMAND, &[0xff, 0xff]);
        assert_eq!(
            c.read_u16(COMMAND),
            COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE,
            "only the memory, bus master and INTx-disable bits stick"
        );
        c.write(INTERRUPT_LINE, &[0x0b]);
        assert_eq!(
            c.read_u16(INTERRUPT_LINE),
            0x000b,
            "line writable, pin stays 0"
        );
    }

    #[test]
    fn bar32_size_probing() {
        let mut c = PciConfigSpace::new(ids());
        c.add_bar(0, BarKind::Memory32, 0x8000, 0xc000_8000)
            .unwrap();
        assert_eq!(c.read_u32(BAR0), 0xc000_8000);
        assert_eq!(c.bar_address(0), Some(0xc000_8000));
        c.write(BAR0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read_u32(BAR0), 0xffff_8000, "size mask, memory, 32-bit");
        assert_eq!(!(c.read_u32(BAR0) & !0xf) + 1, 0x8000);
        c.write(BAR0, &0xc000_8000u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0xc000_8000));
        // Unused BARs read as zero and stay zero.
        c.write(BAR0 + 4, &[0xff; 4]);
        assert_eq!(c.read_u32(BAR0 + 4), 0);
        assert_eq!(c.bar_address(1), None);
    }

    #[test]
    fn bar64_size_probing_spans_two_registers() {
        let mut c = PciConfigSpace::new(ids());
        let addr = 0x180_0000_0000u64;
        c.add_bar(2, BarKind::Memory64 { prefetchable: true }, 1 << 33, addr)
            .unwrap();
        assert_eq!(
            c.read_u32(BAR0 + 8),
            0b1100,
            "64-bit, prefetchable, low bits clear"
        );
        assert_eq!(c.read_u32(BAR0 + 12), 0x180);
        c.write(BAR0 + 8, &[0xff; 4]);
        c.write(BAR0 + 12, &[0xff; 4]);
        let size_mask =
            u64::from(c.read_u32(BAR0 + 8) & !0xf) | (u64::from(c.read_u32(BAR0 + 12)) << 32);
        assert_eq!(!size_mask + 1, 1 << 33);
        assert_eq!(c.bar_size(2), Some(1 << 33));
        assert_eq!(
            c.add_bar(3, BarKind::Memory32, 0x1000, 0),
            Err(ConfigSpaceError::BarInUse { index: 3 })
        );
    }

    #[test]
    fn bar_layout_errors() {
        let mut c = PciConfigSpace::new(ids());
        assert_eq!(
            c.add_bar(
                5,
                BarKind::Memory64 {
                    prefetchable: false
                },
                0x1000,
                0
            ),
            Err(ConfigSpaceError::BarIndex { index: 5, bits: 64 })
        );
        assert_eq!(
            c.add_bar(6, BarKind::Memory32, 0x1000, 0),
            Err(ConfigSpaceError::BarIndex { index: 6, bits: 32 })
        );
        assert!(matches!(
            c.add_bar(0, BarKind::Memory32, 0x1800, 0),
            Err(ConfigSpaceError::BarSize { .. })
        ));
        assert!(matches!(
            c.add_bar(0, BarKind::Memory32, 0x1000, 0x800),
            Err(ConfigSpaceError::BarAlignment { .. })
        ));
        assert!(matches!(
            c.add_bar(0, BarKind::Memory32, 0x1000, 1 << 32),
            Err(ConfigSpaceError::BarAlignment { .. })
        ));
    }

    #[test]
    fn capability_list_links_in_order() {
        let mut c = PciConfigSpace::new(ids());
        assert_eq!(c.read_u16(STATUS) & STATUS_CAPABILITIES, 0);
        let a = c.add_capability(0x11, &[0; 10], &[]).unwrap();
        let b = c
            .add_capability(
                0x09,
                &[14, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                &[0, 0, 0xff],
            )
            .unwrap();
        assert_eq!(
            c.read_u16(STATUS) & STATUS_CAPABILITIES,
            STATUS_CAPABILITIES
        );
        // Walk the list as a guest would.
        let mut found = vec![];
        let mut next = usize::from(c.read_u16(CAPABILITIES_POINTER) as u8);
        while next != 0 {
            found.push((next, c.read_u16(next) as u8));
            next = usize::from((c.read_u16(next) >> 8) as u8);
        }
        assert_eq!(found, vec![(a, 0x11), (b, 0x09)]);
        assert_eq!(a, 0x40);
        assert_eq!(b % 4, 0);
        // Only the declared byte of the second capability is writable.
        c.write(b, &[0xff; 8]);
        let mut bytes = [0u8; 8];
        c.read(b, &mut bytes);
        assert_eq!(bytes, [0x09, 0, 14, 1, 0xff, 0, 0, 0]);
        assert!(matches!(
            c.add_capability(0x09, &[0; 250], &[]),
            Err(ConfigSpaceError::CapabilityTooLarge { .. })
        ));
    }

    #[test]
    fn save_restore_keeps_writable_bits_only() {
        let mut c = PciConfigSpace::new(ids());
        c.add_bar(0, BarKind::Memory32, 0x8000, 0xc000_8000)
            .unwrap();
        let cap = c.add_capability(0x11, &[0; 10], &[0x00, 0xc0]).unwrap();
        c.write(
            COMMAND,
            &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes(),
        );
        c.write(cap + 2, &[0, 0xc0]);
        c.write(INTERRUPT_LINE, &[9]);
        let mut saved = c.save();
        let mut fresh = PciConfigSpace::new(ids());
        fresh
            .add_bar(0, BarKind::Memory32, 0x8000, 0xc000_8000)
            .unwrap();
        fresh.add_capability(0x11, &[0; 10], &[0x00, 0xc0]).unwrap();
        // A tampered vendor ID and capability pointer are not taken back.
        saved.bytes[VENDOR_ID] = 0x12;
        saved.bytes[CAPABILITIES_POINTER] = 0x80;
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.read_u16(COMMAND), COMMAND_MEMORY | COMMAND_BUS_MASTER);
        assert_eq!(fresh.read_u16(cap + 2), 0xc000);
        assert_eq!(fresh.read_u16(INTERRUPT_LINE), 9);
        assert_eq!(fresh.read_u16(VENDOR_ID), 0x1af4);
        assert_eq!(fresh.read_u16(CAPABILITIES_POINTER) as u8, 0x40);
        assert_eq!(fresh.bar_address(0), Some(0xc000_8000));
        saved.bytes.pop();
        assert_eq!(fresh.restore(&saved), Err(ConfigSpaceError::StateSize(255)));
    }

    #[test]
    fn extended_space_reads_zero_and_beyond_reads_ones() {
        let mut c = PciConfigSpace::new(ids());
        let mut b = [0x55u8; 4];
        c.read(0x100, &mut b);
        assert_eq!(b, [0; 4]);
        c.read(4094, &mut b);
        assert_eq!(b, [0, 0, 0xff, 0xff]);
        c.write(0x100, &[1, 2, 3, 4]);
        c.write(usize::MAX, &[1, 2]);
        c.read(0x100, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn bar32_decode_follows_memory_enable_and_ignores_the_size_probe() {
        let mut c = PciConfigSpace::new(ids());
        c.add_bar(0, BarKind::Memory32, 0x8000, 0xc000_8000)
            .unwrap();
        assert_eq!(c.bar_decode(0), Some(BarDecode::Off), "decoding starts off");
        assert_eq!(c.bar_decode(1), None);
        c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(c.bar_decode(0), Some(BarDecode::At(0xc000_8000)));
        // A new address applies on the write itself while decoding is on.
        c.write(BAR0, &0xd000_0000u32.to_le_bytes());
        assert_eq!(c.bar_decode(0), Some(BarDecode::At(0xd000_0000)));
        // Sizing with decoding on: the all-ones value is not an address.
        c.write(BAR0, &[0xff; 4]);
        assert_eq!(c.bar_decode(0), Some(BarDecode::Off));
        c.write(BAR0, &0xd000_0000u32.to_le_bytes());
        assert_eq!(c.bar_decode(0), Some(BarDecode::At(0xd000_0000)));
        // Byte-wise writes take effect byte by byte (a 32-bit BAR has no pending state).
        c.write(BAR0 + 3, &[0xc1]);
        assert_eq!(c.bar_decode(0), Some(BarDecode::At(0xc100_0000)));
        c.write(COMMAND, &0u16.to_le_bytes());
        assert_eq!(c.bar_decode(0), Some(BarDecode::Off));
        assert_eq!(c.bar_address(0), Some(0xc100_0000), "the register keeps it");
    }

    #[test]
    fn bar64_decode_waits_for_the_upper_half() {
        let mut c = PciConfigSpace::new(ids());
        let size = 0x4000u64;
        c.add_bar(
            2,
            BarKind::Memory64 {
                prefetchable: false,
            },
            size,
            0x180_0000_0000,
        )
        .unwrap();
        c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(c.bar_decode(2), Some(BarDecode::At(0x180_0000_0000)));
        c.write(BAR0 + 8, &0x0000_c000u32.to_le_bytes());
        assert_eq!(
            c.bar_decode(2),
            Some(BarDecode::Updating),
            "low half alone is not an address yet"
        );
        c.write(BAR0 + 12, &0x190u32.to_le_bytes());
        assert_eq!(c.bar_decode(2), Some(BarDecode::At(0x190_0000_c000)));
        // A guest that only changes the low half completes it by enabling decoding.
        c.write(COMMAND, &0u16.to_le_bytes());
        c.write(BAR0 + 8, &0x0001_0000u32.to_le_bytes());
        assert_eq!(c.bar_decode(2), Some(BarDecode::Off));
        c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(c.bar_decode(2), Some(BarDecode::At(0x190_0001_0000)));
        // Sizing both halves with decoding on never decodes at the mask.
        c.write(BAR0 + 8, &[0xff; 4]);
        assert_eq!(c.bar_decode(2), Some(BarDecode::Updating));
        c.write(BAR0 + 12, &[0xff; 4]);
        assert_eq!(c.bar_decode(2), Some(BarDecode::Off));
        c.write(BAR0 + 8, &0x0001_0000u32.to_le_bytes());
        c.write(BAR0 + 12, &0x190u32.to_le_bytes());
        assert_eq!(c.bar_decode(2), Some(BarDecode::At(0x190_0001_0000)));
        // A one-dword write spanning only the upper half completes too; restore clears any
        // half-written state.
        c.write(BAR0 + 8, &0x0000_8000u32.to_le_bytes());
        let saved = c.save();
        c.restore(&saved).unwrap();
        assert_eq!(c.bar_decode(2), Some(BarDecode::At(0x190_0000_8000)));
    }
}
