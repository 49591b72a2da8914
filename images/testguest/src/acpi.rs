//! Read-only ACPI discovery through the identity map: finds the RSDP, walks the RSDT/XSDT,
//! parses the MADT's enabled processor Local APIC entries and the MCFG's ECAM area, and lists
//! where the tables live so memcheck can leave them alone. All checksums are verified. Runs in
//! CPL3.
use crate::paging::read;

/// Most CPUs the MADT parser records.
pub const MAX_CPUS: usize = 64;
const SDT_HEADER_LEN: u64 = 36;
/// Sanity bound on a table's length.
const MAX_TABLE_LEN: u64 = 1 << 20;
const BIOS_AREA: (u64, u64) = (0xe_0000, 0x10_0000);

fn checksum_ok(addr: u64, len: u64) -> bool {
    let mut sum = 0u8;
    for i in 0..len {
        match read::<u8>(addr + i) {
            Some(b) => sum = sum.wrapping_add(b),
            None => return false,
        }
    }
    sum == 0
}

fn signature(addr: u64, len: usize) -> [u8; 8] {
    let mut sig = [0u8; 8];
    for (i, b) in sig.iter_mut().enumerate().take(len) {
        *b = read::<u8>(addr + i as u64).unwrap_or(0);
    }
    sig
}

fn is_rsdp(addr: u64) -> bool {
    signature(addr, 8) == *b"RSD PTR " && checksum_ok(addr, 20)
}

/// The RSDP: `hint` (start_info.rsdp_paddr) if non-zero and valid, else the first one found on a
/// 16-byte boundary in 0xe0000..0x100000.
pub fn find_rsdp(hint: u64) -> Option<u64> {
    if hint != 0 {
        return is_rsdp(hint).then_some(hint);
    }
    (BIOS_AREA.0..BIOS_AREA.1).step_by(16).find(|&a| is_rsdp(a))
}

/// RSDP length: 20 bytes for revision 0, the Length field (36) from revision 2.
fn rsdp_len(rsdp: u64) -> u64 {
    if read::<u8>(rsdp + 15).unwrap_or(0) >= 2 {
        u64::from(read::<u32>(rsdp + 20).unwrap_or(36)).clamp(20, 36)
    } else {
        20
    }
}

/// A validated system description table's length.
fn table_len(addr: u64) -> Result<u64, &'static str> {
    let len = u64::from(read::<u32>(addr + 4).ok_or("ACPI table pointer outside mapped memory")?);
    if !(SDT_HEADER_LEN..=MAX_TABLE_LEN).contains(&len) {
        return Err("ACPI table has an implausible length");
    }
    if !checksum_ok(addr, len) {
        return Err("ACPI table checksum mismatch");
    }
    Ok(len)
}

/// The root table (XSDT for revision >= 2 with a non-zero pointer, else RSDT).
pub struct RootTable {
    addr: u64,
    entry_size: u64,
    entries: u64,
}

impl RootTable {
    pub fn new(rsdp: u64) -> Result<RootTable, &'static str> {
        if rsdp_len(rsdp) > 20 && !checksum_ok(rsdp, rsdp_len(rsdp)) {
            return Err("RSDP extended checksum mismatch");
        }
        let xsdt = if read::<u8>(rsdp + 15).unwrap_or(0) >= 2 {
            read::<u64>(rsdp + 24).unwrap_or(0)
        } else {
            0
        };
        let (addr, entry_size, sig) = if xsdt != 0 {
            (xsdt, 8, *b"XSDT")
        } else {
            (u64::from(read::<u32>(rsdp + 16).unwrap_or(0)), 4, *b"RSDT")
        };
        if addr == 0 {
            return Err("RSDP has no RSDT/XSDT pointer");
        }
        let len = table_len(addr)?;
        if signature(addr, 4)[..4] != sig {
            return Err("root table signature is not RSDT/XSDT");
        }
        Ok(RootTable {
            addr,
            entry_size,
            entries: (len - SDT_HEADER_LEN) / entry_size,
        })
    }

    /// Address of table `i`, or `None` past the end.
    fn entry(&self, i: u64) -> Option<u64> {
        if i >= self.entries {
            return None;
        }
        let at = self.addr + SDT_HEADER_LEN + i * self.entry_size;
        if self.entry_size == 8 {
            read::<u64>(at)
        } else {
            read::<u32>(at).map(u64::from)
        }
    }

    /// The first table with signature `sig`.
    pub fn find(&self, sig: &[u8; 4]) -> Option<u64> {
        (0..self.entries)
            .filter_map(|i| self.entry(i))
            .find(|&a| signature(a, 4)[..4] == sig[..])
    }
}

/// CPUs from the MADT.
pub struct Madt {
    /// Local APIC MMIO base (the override entry wins over the header field).
    pub lapic_base: u64,
    apic_ids: [u8; MAX_CPUS],
    count: usize,
}

impl Madt {
    /// Parses the MADT at `addr`: enabled (flags bit 0) Processor Local APIC entries (type 0).
    pub fn parse(addr: u64) -> Result<Madt, &'static str> {
        let len = table_len(addr)?;
        let mut madt = Madt {
            lapic_base: u64::from(read::<u32>(addr + 36).ok_or("MADT truncated")?),
            apic_ids: [0; MAX_CPUS],
            count: 0,
        };
        let mut off = 44;
        while off + 2 <= len {
            let kind = read::<u8>(addr + off).ok_or("MADT truncated")?;
            let entry_len = u64::from(read::<u8>(addr + off + 1).ok_or("MADT truncated")?);
            if entry_len < 2 || off + entry_len > len {
                return Err("MADT entry has a bad length");
            }
            match kind {
                0 if entry_len >= 8 => {
                    let apic_id = read::<u8>(addr + off + 3).ok_or("MADT truncated")?;
                    let flags = read::<u32>(addr + off + 4).ok_or("MADT truncated")?;
                    if flags & 1 != 0 {
                        if madt.count == MAX_CPUS {
                            return Err("MADT lists more CPUs than testguest supports (64)");
                        }
                        madt.apic_ids[madt.count] = apic_id;
                        madt.count += 1;
                    }
                }
                5 if entry_len >= 12 => {
                    madt.lapic_base = read::<u64>(addr + off + 4).ok_or("MADT truncated")?;
                }
                _ => {}
            }
            off += entry_len;
        }
        Ok(madt)
    }

    /// APIC IDs of the enabled CPUs, in MADT order.
    pub fn apic_ids(&self) -> &[u8] {
        &self.apic_ids[..self.count]
    }
}

/// The PCI ECAM area of segment 0 from the MCFG table: `(base, last_bus)` for the entry whose
/// bus range starts at 0. `None` if there is no valid MCFG or no such entry.
pub fn mcfg_ecam(hint: u64) -> Option<(u64, u8)> {
    const MCFG_ENTRIES: u64 = 44;
    const MCFG_ENTRY_LEN: u64 = 16;
    let root = RootTable::new(find_rsdp(hint)?).ok()?;
    let mcfg = root.find(b"MCFG")?;
    let len = table_len(mcfg).ok()?;
    let mut off = MCFG_ENTRIES;
    while off + MCFG_ENTRY_LEN <= len {
        let entry = mcfg + off;
        let base = read::<u64>(entry)?;
        let segment = read::<u16>(entry + 8)?;
        let (first_bus, last_bus) = (read::<u8>(entry + 10)?, read::<u8>(entry + 11)?);
        if segment == 0 && first_bus == 0 && base != 0 {
            return Some((base, last_bus));
        }
        off += MCFG_ENTRY_LEN;
    }
    None
}

/// Calls `f(start, end)` for every ACPI structure the guest can find: the RSDP, the root table,
/// each table it lists, and the DSDT and FACS named by the FADT. Silently stops at anything
/// invalid: this only serves to keep memcheck off the tables.
pub fn for_each_table(hint: u64, mut f: impl FnMut(u64, u64)) {
    let Some(rsdp) = find_rsdp(hint) else { return };
    f(rsdp, rsdp + rsdp_len(rsdp));
    let Ok(root) = RootTable::new(rsdp) else {
        return;
    };
    f(
        root.addr,
        root.addr + u64::from(read::<u32>(root.addr + 4).unwrap_or(0)),
    );
    for table in (0..root.entries).filter_map(|i| root.entry(i)) {
        let Ok(len) = table_len(table) else { continue };
        f(table, table + len);
        if signature(table, 4)[..4] == *b"FACP" {
            // FIRMWARE_CTRL (36) / X_FIRMWARE_CTRL (132), DSDT (40) / X_DSDT (140).
            for (off32, off64) in [(36u64, 132u64), (40, 140)] {
                let x = if len >= off64 + 8 {
                    read::<u64>(table + off64).unwrap_or(0)
                } else {
                    0
                };
                let p = if x != 0 {
                    x
                } else {
                    u64::from(read::<u32>(table + off32).unwrap_or(0))
                };
                if p == 0 {
                    continue;
                }
                if let Some(plen) = read::<u32>(p + 4) {
                    f(p, p + u64::from(plen).min(MAX_TABLE_LEN));
                }
            }
        }
    }
}
