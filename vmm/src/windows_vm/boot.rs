//! Getting a guest ready to run on Windows: the kernel (`kernel_image`), the command line, the
//! initrd, the ACPI tables, the e820 map and the boot protocol's structures written into any
//! vm-memory guest memory (on Windows, `ViewMemory` over the section views), and the boot
//! vCPU's registers. The same placement and the same `arch` writers as the Linux path's
//! `boot::prepare_boot`, without linux-loader.
//!
//! Platform-neutral; unit-tested on Linux.

use std::path::{Path, PathBuf};

use arch::layout::{RamRange, CMDLINE_MAX_SIZE, CMDLINE_START};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::boot_state::place_initrd;
pub use crate::boot_state::{BootCpuState, BootProtocol};
use crate::kernel_image::{load_image, ImageEntry, KernelImageError};

/// Where `cmdline_size` sits in the bzImage setup header (file offset 0x238 less 0x1f1).
const HEADER_CMDLINE_SIZE: usize = 0x238 - 0x1f1;
/// Where `initrd_addr_max` sits in the bzImage setup header (file offset 0x22c less 0x1f1).
const HEADER_INITRD_ADDR_MAX: usize = 0x22c - 0x1f1;

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    /// Kernel image (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPU count (for the ACPI MADT).
    pub cpus: u32,
}

/// Why the guest could not be loaded.
#[derive(Debug, Error)]
pub enum GuestBootError {
    /// A file cannot be read, or is not a regular file.
    #[error("cannot read {what} {path}")]
    Read {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel image is refused.
    #[error("kernel image {path}")]
    Kernel {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: KernelImageError,
    },
    /// The command line is too long or holds a character the boot protocol does not carry.
    #[error("kernel command line ({len} bytes) is invalid or longer than the {max}-byte limit")]
    Cmdline {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The initrd does not fit.
    #[error("initrd {path} ({size} bytes) does not fit in guest RAM between the kernel's end {low:#x} and {high:#x}")]
    InitrdTooLarge {
        /// The path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Lowest usable address.
        low: u64,
        /// Highest usable address (exclusive).
        high: u64,
    },
    /// Writing the command line or the initrd failed.
    #[error("cannot write the {0} into guest memory")]
    Write(&'static str),
    /// Writing ACPI tables failed.
    #[error("cannot write the ACPI tables")]
    Acpi(#[source] arch::acpi::AcpiError),
    /// Writing PVH structures failed.
    #[error("cannot write the PVH boot structures")]
    Pvh(#[source] arch::pvh::PvhError),
    /// Writing Linux boot structures failed.
    #[error("cannot write the Linux boot structures")]
    Linux(#[source] arch::linux_boot::LinuxBootError),
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, GuestBootError> {
    let err = |source| GuestBootError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if !meta.is_file() {
        return Err(err(std::io::Error::other("not a regular file")));
    }
    std::fs::read(path).map_err(err)
}

/// How much of the initrd is read into memory at a time on its way into guest RAM.
const INITRD_CHUNK: usize = 1 << 20;

/// Copies the initrd at `path` into the highest page-aligned spot between `low` and `high`,
/// a chunk at a time; its `(address, size)`.
fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    low: u64,
    high: u64,
) -> Result<(u64, u64), GuestBootError> {
    let err = |source| GuestBootError::Read {
        what: "initrd",
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if !meta.is_file() {
        return Err(err(std::io::Error::other("not a regular file")));
    }
    let size = meta.len();
    let address = place_initrd(size, low, high).ok_or_else(|| GuestBootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        low,
        high,
    })?;
    let mut chunk = vec![0u8; INITRD_CHUNK];
    let mut done = 0u64;
    while done < size {
        let n = usize::try_from(size - done).map_or(INITRD_CHUNK, |left| left.min(INITRD_CHUNK));
        std::io::Read::read_exact(&mut file, &mut chunk[..n]).map_err(err)?;
        mem.write_slice(&chunk[..n], GuestAddress(address + done))
            .map_err(|_| GuestBootError::Write("initrd"))?;
        done += n as u64;
    }
    Ok((address, size))
}

fn header_u32(header: &[u8], at: usize) -> u32 {
    header
        .get(at..at + 4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Loads everything `files` names into `mem`, laid out as `ram`, and returns the boot vCPU's
/// state.
pub fn load_guest<M: GuestMemoryBackend>(
    mem: &M,
    ram: &[RamRange],
    files: &BootFiles,
) -> Result<BootCpuState, GuestBootError> {
    let image = read_file("kernel", &files.kernel)?;
    let kernel = load_image(mem, ram, &image).map_err(|source| GuestBootError::Kernel {
        path: files.kernel.clone(),
        source,
    })?;
    drop(image);
    let header = match &kernel.entry {
        ImageEntry::Linux64 {
            setup_header: Some(h),
            ..
        } => Some(h.as_slice()),
        _ => None,
    };
    let low_ram_end = ram.first().map_or(0, RamRange::end);

    let cmdline_max = match header.map(|h| header_u32(h, HEADER_CMDLINE_SIZE)) {
        Some(size) if size > 0 => (size as usize + 1).min(CMDLINE_MAX_SIZE),
        _ => CMDLINE_MAX_SIZE,
    };
    let cmdline = files.cmdline.as_bytes();
    if cmdline.len() >= cmdline_max || !cmdline.iter().all(|c| (b' '..=b'~').contains(c)) {
        return Err(GuestBootError::Cmdline {
            len: cmdline.len(),
            max: cmdline_max - 1,
        });
    }
    let mut terminated = cmdline.to_vec();
    terminated.push(0);
    mem.write_slice(&terminated, GuestAddress(CMDLINE_START))
        .map_err(|_| GuestBootError::Write("kernel command line"))?;

    let initrd_top = match header.map(|h| header_u32(h, HEADER_INITRD_ADDR_MAX)) {
        Some(max) if max != 0 => low_ram_end.min(u64::from(max) + 1),
        _ => low_ram_end,
    };
    let initrd = match &files.initrd {
        None => None,
        Some(path) => Some(load_initrd(mem, path, kernel.end, initrd_top)?),
    };

    let cpus = u8::try_from(files.cpus).unwrap_or(u8::MAX);
    let rsdp = arch::acpi::write_acpi_tables(mem, &arch::acpi::AcpiConfig { cpus })
        .map_err(GuestBootError::Acpi)?;
    let e820 = arch::e820::e820_map(ram);
    match kernel.entry {
        ImageEntry::Pvh(entry) => {
            arch::pvh::write_pvh_gdt(mem).map_err(GuestBootError::Pvh)?;
            let start_info =
                arch::pvh::configure_pvh(mem, CMDLINE_START, initrd, &e820, Some(rsdp))
                    .map_err(GuestBootError::Pvh)?;
            Ok(BootCpuState {
                protocol: BootProtocol::Pvh,
                regs: arch::pvh::pvh_boot_regs(entry, start_info),
            })
        }
        ImageEntry::Linux64 {
            entry,
            setup_header,
        } => {
            arch::linux_boot::write_long_mode_tables(mem).map_err(GuestBootError::Linux)?;
            let boot_params = arch::linux_boot::configure_linux_boot(
                mem,
                setup_header.as_deref(),
                CMDLINE_START,
                files.cmdline.len() + 1,
                initrd,
                &e820,
                Some(rsdp),
            )
            .map_err(GuestBootError::Linux)?;
            Ok(BootCpuState {
                protocol: BootProtocol::Linux64,
                regs: arch::linux_boot::long_mode_boot_regs(entry, boot_params),
            })
        }
    }
}

#[cfg(test)]
#[path = "boot_tests.rs"]
mod tests;
