//! The ACPI tables skiff gives every guest: RSDP, XSDT, FADT, DSDT, MADT and MCFG.
//!
//! This module owns the table contents and their placement in `ACPI_START..ACPI_START +
//! ACPI_SIZE` (the RSDP first, where a scanning guest finds it, then each table 16-byte
//! aligned). The platform is hardware-reduced ACPI: no PM1/GPE blocks, no SCI, no FACS. It
//! describes the CPUs and interrupt controllers (MADT) and the PCI ECAM area (MCFG); the DSDT
//! holds `\_S5_`, the PCI host bridge `\_SB.PCI0` with its resources (bus numbers, the 0xCF8
//! configuration ports, the 32-bit and 64-bit MMIO windows) and a motherboard-resources device
//! reserving the ECAM area. The sleep registers for ACPI poweroff are left to the device model to
//! add here (`fadt`).

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Memory32Fixed, Name, Package,
    ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::cpuid::cpu_topology_apic_id;
use crate::layout::{
    ACPI_PM_PORT, ACPI_SIZE, ACPI_START, IOAPIC_START, LAPIC_START, PCI_CONFIG_IO_PORT,
    PCI_CONFIG_IO_PORT_LEN, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO32_SIZE, PCI_MMIO32_START,
    PCI_MMIO64_SIZE, PCI_MMIO64_START,
};

/// OEM ID in every table header.
pub const OEM_ID: [u8; 6] = *b"SKIFF ";
/// OEM table ID in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"SKIFFVM ";
const OEM_REVISION: u32 = 1;

/// `SLP_TYP` value of the `\_S5_` (soft-off) package; the ACPI sleep control register the
/// device model provides must treat a write of this value as poweroff.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Offsets of the sleep control, sleep status and reset registers from `ACPI_PM_PORT`.
pub const ACPI_SLEEP_CONTROL_OFFSET: u64 = 0;
/// See `ACPI_SLEEP_CONTROL_OFFSET`.
pub const ACPI_SLEEP_STATUS_OFFSET: u64 = 1;
/// See `ACPI_SLEEP_CONTROL_OFFSET`.
pub const ACPI_RESET_OFFSET: u64 = 2;
/// The value that, written to the reset register, resets the guest.
pub const ACPI_RESET_VALUE: u8 = 1;
/// ISA IRQ of the PIT.
pub const PIT_ISA_IRQ: u8 = 0;
/// GSI (IOAPIC pin) the PIT is wired to, stated by the MADT interrupt source override. It must
/// match the hypervisor's interrupt routing: KVM's default routing sends every ISA IRQ to the
/// IOAPIC pin of the same number, so the PIT stays on pin 0.
pub const PIT_GSI: u32 = 0;
/// Last PCI bus the ECAM area covers (1 MiB of configuration space per bus).
pub const ECAM_END_BUS: u8 = ((PCI_ECAM_SIZE >> 20) - 1) as u8;

const _: () = assert!(PCI_ECAM_SIZE >> 20 >= 1 && PCI_ECAM_SIZE >> 20 <= 256);
// The MADT stores both interrupt controller addresses as 32-bit fields.
const _: () = assert!(IOAPIC_START <= u32::MAX as u64);
const _: () = assert!(LAPIC_START <= u32::MAX as u64);
const _: () = assert!(ACPI_START.is_multiple_of(16));
// The host bridge's _CRS describes these in 16-bit and 32-bit descriptors.
const _: () = assert!(PCI_CONFIG_IO_PORT + PCI_CONFIG_IO_PORT_LEN <= 0x1_0000);
const _: () = assert!(PCI_CONFIG_IO_PORT_LEN <= 0xff);
const _: () = assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= 1 << 32);
const _: () = assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= 1 << 32);

/// Every table starts on this alignment.
const TABLE_ALIGN: u64 = 16;
/// DSDT revision 2: AML integers are 64 bits.
const DSDT_REVISION: u8 = 2;
/// MADT revision of ACPI 6.3 and later.
const MADT_REVISION: u8 = 5;
/// MADT flags bit 0, PCAT_COMPAT: the platform also has dual 8259 PICs (KVM's in-kernel
/// irqchip emulates them), which the OS must mask when it uses the IOAPIC.
const MADT_PCAT_COMPAT: u32 = 1 << 0;
/// MADT structure type 2: interrupt source override.
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
/// FADT IA-PC boot architecture flags: bit 2, VGA not present (don't probe it); bit 4, ASPM
/// controls (leave PCIe link power management alone). Bit 1 (8042) is clear: the guest need not
/// probe a PS/2 controller, which is slow under emulation. Bit 5 is clear: a CMOS RTC is present.
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 4);

/// What the ACPI tables describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs; vCPU *n* gets ACPI processor UID *n* and APIC ID
    /// `cpu_topology_apic_id(n)`.
    pub cpus: u8,
}

/// Errors from building the ACPI tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// The configuration has no CPU.
    #[error("ACPI tables need at least one CPU, got cpus = 0")]
    NoCpus,
    /// A CPU's APIC ID does not fit an xAPIC MADT entry.
    #[error("APIC ID {apic_id} of CPU {cpu} does not fit a local APIC MADT entry (max 254)")]
    ApicIdTooLarge {
        /// CPU index.
        cpu: u8,
        /// Its APIC ID.
        apic_id: u32,
    },
    /// A table does not fit the ACPI area.
    #[error(
        "ACPI table {table} ({size} bytes at {addr:#x}) does not fit the ACPI area ending at {:#x}",
        ACPI_START + ACPI_SIZE
    )]
    OutOfSpace {
        /// Table signature.
        table: &'static str,
        /// Where it would start.
        addr: u64,
        /// Its size.
        size: usize,
    },
    /// Writing a table to guest memory failed.
    #[error("writing ACPI table {table} ({len} bytes) at guest address {addr:#x}")]
    Write {
        /// Table signature.
        table: &'static str,
        /// Guest physical address.
        addr: u64,
        /// Bytes written.
        len: usize,
        /// The guest memory error.
        #[source]
        source: GuestMemoryError,
    },
}

/// Writes all tables and returns the RSDP address (`ACPI_START`), which the boot protocols pass
/// to the kernel (PVH `rsdp_paddr`, zero page `acpi_rsdp_addr`).
pub fn write_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    cfg: &AcpiConfig,
) -> Result<u64, AcpiError> {
    if cfg.cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    let mut area = TableArea::new(mem, ACPI_START + Rsdp::len() as u64);
    let dsdt_addr = area.place("DSDT", &dsdt())?;

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for (table, bytes) in [
        ("FACP", fadt(dsdt_addr)),
        ("APIC", madt(cfg)?),
        ("MCFG", mcfg()),
    ] {
        xsdt.add_entry(area.place(table, &bytes)?);
    }
    let xsdt_addr = area.place("XSDT", &aml_bytes(&xsdt))?;

    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    write(mem, "RSDP", ACPI_START, &rsdp)?;
    Ok(ACPI_START)
}

/// Hands out aligned, bounds-checked addresses in the ACPI area and writes tables there.
struct TableArea<'a, M> {
    mem: &'a M,
    next: u64,
}

impl<'a, M: GuestMemoryBackend> TableArea<'a, M> {
    fn new(mem: &'a M, start: u64) -> Self {
        TableArea { mem, next: start }
    }

    fn place(&mut self, table: &'static str, bytes: &[u8]) -> Result<u64, AcpiError> {
        let addr = self.next.next_multiple_of(TABLE_ALIGN);
        let end = addr.checked_add(bytes.len() as u64);
        if end.is_none_or(|end| end > ACPI_START + ACPI_SIZE) {
            return Err(AcpiError::OutOfSpace {
                table,
                addr,
                size: bytes.len(),
            });
        }
        write(self.mem, table, addr, bytes)?;
        self.next = addr + bytes.len() as u64;
        Ok(addr)
    }
}

fn write<M: GuestMemoryBackend>(
    mem: &M,
    table: &'static str,
    addr: u64,
    bytes: &[u8],
) -> Result<(), AcpiError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| AcpiError::Write {
            table,
            addr,
            len: bytes.len(),
            source,
        })
}

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// The DSDT: `\_S5_` so that the guest's ACPI poweroff path knows the soft-off sleep type, and
/// the `\_SB` devices (PCI host bridge, motherboard resources).
fn dsdt() -> Vec<u8> {
    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    let s5 = Name::new("_S5_".into(), &Package::new(vec![&S5_SLEEP_TYPE]));
    dsdt.append_slice(&aml_bytes(&s5));
    dsdt.append_slice(&system_bus());
    dsdt.as_slice().to_vec()
}

/// `\_SB.PCI0`, the PCI Express host bridge of segment 0 (config access through the MCFG's ECAM
/// area or ports 0xCF8/0xCFC), and `\_SB.MBRD`, which reserves the ECAM area as a motherboard
/// resource (Linux then trusts the MCFG without relying on e820 alone).
fn system_bus() -> Vec<u8> {
    let (hid, cid) = (EISAName::new("PNP0A08"), EISAName::new("PNP0A03"));
    let bus_numbers = AddressSpace::<u16>::new_bus_number(0, u16::from(ECAM_END_BUS));
    let config_ports = IO::new(
        PCI_CONFIG_IO_PORT as u16,
        PCI_CONFIG_IO_PORT as u16,
        1,
        PCI_CONFIG_IO_PORT_LEN as u8,
    );
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO32_START as u32,
        (PCI_MMIO32_START + PCI_MMIO32_SIZE - 1) as u32,
        None,
    );
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO64_START,
        PCI_MMIO64_START + PCI_MMIO64_SIZE - 1,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus_numbers, &config_ports, &mmio32, &mmio64]);
    let (hid_name, cid_name) = (
        Name::new("_HID".into(), &hid),
        Name::new("_CID".into(), &cid),
    );
    let (seg, bbn, uid) = (
        Name::new("_SEG".into(), &0u8),
        Name::new("_BBN".into(), &0u8),
        Name::new("_UID".into(), &0u8),
    );
    let crs_name = Name::new("_CRS".into(), &crs);
    let pci0 = Device::new(
        "PCI0".into(),
        vec![&hid_name, &cid_name, &seg, &bbn, &uid, &crs_name],
    );

    let mbrd_hid = EISAName::new("PNP0C02");
    let ecam = Memory32Fixed::new(true, PCI_ECAM_START as u32, PCI_ECAM_SIZE as u32);
    let mbrd_crs = ResourceTemplate::new(vec![&ecam]);
    let (mbrd_hid_name, mbrd_uid, mbrd_crs_name) = (
        Name::new("_HID".into(), &mbrd_hid),
        Name::new("_UID".into(), &1u8),
        Name::new("_CRS".into(), &mbrd_crs),
    );
    let mbrd = Device::new(
        "MBRD".into(),
        vec![&mbrd_hid_name, &mbrd_uid, &mbrd_crs_name],
    );
    aml_bytes(&Scope::new("\\_SB_".into(), vec![&pci0, &mbrd]))
}

/// The FADT (revision 6.5): hardware-reduced ACPI, power and sleep buttons (if any) as control
/// method devices, and the 64-bit DSDT pointer.
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    // Hardware-reduced power management: one-byte I/O registers (devices::legacy::acpi_pm).
    let port = |offset: u64| {
        GAS::new(
            GasSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            ACPI_PM_PORT + offset,
        )
    };
    fadt.sleep_control_reg = port(ACPI_SLEEP_CONTROL_OFFSET);
    fadt.sleep_status_reg = port(ACPI_SLEEP_STATUS_OFFSET);
    fadt.reset_reg = port(ACPI_RESET_OFFSET);
    fadt.reset_value = ACPI_RESET_VALUE;
    aml_bytes(&fadt.finalize())
}

/// The MADT: the local APIC address, one enabled local APIC per vCPU, the IOAPIC (ID 0, GSIs
/// from 0) and the PIT's interrupt source override.
fn madt(cfg: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    let mut madt = Sdt::new(
        *b"APIC",
        36,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.append_slice(&(LAPIC_START as u32).to_le_bytes());
    madt.append_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for cpu in 0..cfg.cpus {
        let apic_id = cpu_topology_apic_id(u32::from(cpu));
        // 0xff is the xAPIC broadcast ID.
        let id = u8::try_from(apic_id)
            .ok()
            .filter(|&id| id != 0xff)
            .ok_or(AcpiError::ApicIdTooLarge { cpu, apic_id })?;
        madt.append_slice(&aml_bytes(&ProcessorLocalApic::new(
            cpu,
            id,
            EnabledStatus::Enabled,
        )));
    }
    madt.append_slice(&aml_bytes(&IoApic::new(0, IOAPIC_START as u32, 0)));
    madt.append_slice(&interrupt_source_override(PIT_ISA_IRQ, PIT_GSI));
    Ok(madt.as_slice().to_vec())
}

/// MADT interrupt source override (type 2, 10 bytes) for ISA `irq` on `gsi`, with flags 0:
/// polarity and trigger mode conform to the ISA bus (active high, edge).
fn interrupt_source_override(irq: u8, gsi: u32) -> Vec<u8> {
    let mut entry = vec![
        MADT_INTERRUPT_SOURCE_OVERRIDE,
        10,
        0, /* bus: ISA */
        irq,
    ];
    entry.extend_from_slice(&gsi.to_le_bytes());
    entry.extend_from_slice(&0u16.to_le_bytes());
    entry
}

/// The MCFG: one ECAM window for PCI segment 0, buses 0..=`ECAM_END_BUS`.
fn mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(PCI_ECAM_START, 0, 0, ECAM_END_BUS);
    aml_bytes(&mcfg)
}

#[cfg(test)]
mod tests;
