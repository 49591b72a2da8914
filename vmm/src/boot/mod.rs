//! Getting a guest ready to run its first instruction: kernel, initrd, command line, ACPI tables,
//! e820 map and the boot protocol's structures (PVH start_info or Linux boot_params), plus the
//! boot vCPU's registers.

mod elf_check;
pub mod initrd;
pub mod kernel;

use std::path::PathBuf;

use arch::layout::{RamRange, CMDLINE_MAX_SIZE, CMDLINE_START};
use devices::guest_memory::TrackedGuestMemory;
use linux_loader::cmdline::Cmdline;
use thiserror::Error;
use vm_memory::{ByteValued, GuestAddress};

use initrd::{load_initrd, InitrdError};
use kernel::{load_kernel, KernelEntry, KernelError};

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootConfig {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPU count (for the ACPI MADT).
    pub cpus: u32,
}

/// Errors from preparing the boot.
#[derive(Debug, Error)]
pub enum BootError {
    /// Loading the kernel failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// Loading the initrd failed.
    #[error(transparent)]
    Initrd(#[from] InitrdError),
    /// The command line is too long or malformed.
    #[error("kernel command line ({len} bytes) is invalid or longer than the {max}-byte limit")]
    Cmdline {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
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

pub use crate::boot_state::{BootCpuState, BootProtocol};

/// Loads everything `cfg` names into `mem`, laid out as `ram`, and returns the boot vCPU's state.
pub fn prepare_boot(
    mem: &TrackedGuestMemory,
    ram: &[RamRange],
    cfg: &BootConfig,
) -> Result<BootCpuState, BootError> {
    let kernel = load_kernel(mem, ram, &cfg.kernel)?;
    let low_ram_end = ram.first().map_or(0, RamRange::end);

    let cmdline_max = match kernel.entry {
        KernelEntry::Linux64 {
            setup_header: Some(h),
            ..
        } if h.cmdline_size > 0 => (h.cmdline_size as usize + 1).min(CMDLINE_MAX_SIZE),
        _ => CMDLINE_MAX_SIZE,
    };
    let cmdline_err = || BootError::Cmdline {
        len: cfg.cmdline.len(),
        max: cmdline_max - 1,
    };
    let cmdline = Cmdline::try_from(&cfg.cmdline, cmdline_max).map_err(|_| cmdline_err())?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|_| cmdline_err())?;

    let initrd_top = match kernel.entry {
        KernelEntry::Linux64 {
            setup_header: Some(h),
            ..
        } if h.initrd_addr_max != 0 => low_ram_end.min(u64::from(h.initrd_addr_max) + 1),
        _ => low_ram_end,
    };
    let initrd = cfg
        .initrd
        .as_ref()
        .map(|path| load_initrd(mem, path, kernel.end, initrd_top))
        .transpose()?
        .map(|i| (i.address, i.size));

    let cpus = u8::try_from(cfg.cpus).unwrap_or(u8::MAX);
    let rsdp = arch::acpi::write_acpi_tables(mem, &arch::acpi::AcpiConfig { cpus })
        .map_err(BootError::Acpi)?;
    let e820 = arch::e820::e820_map(ram);

    match kernel.entry {
        KernelEntry::Pvh(entry) => {
            arch::pvh::write_pvh_gdt(mem).map_err(BootError::Pvh)?;
            let start_info =
                arch::pvh::configure_pvh(mem, CMDLINE_START, initrd, &e820, Some(rsdp))
                    .map_err(BootError::Pvh)?;
            Ok(BootCpuState {
                protocol: BootProtocol::Pvh,
                regs: arch::pvh::pvh_boot_regs(entry, start_info),
            })
        }
        KernelEntry::Linux64 {
            entry,
            setup_header,
        } => {
            arch::linux_boot::write_long_mode_tables(mem).map_err(BootError::Linux)?;
            let header_bytes = setup_header.as_ref().map(|h| h.as_slice());
            let boot_params = arch::linux_boot::configure_linux_boot(
                mem,
                header_bytes,
                CMDLINE_START,
                cfg.cmdline.len() + 1,
                initrd,
                &e820,
                Some(rsdp),
            )
            .map_err(BootError::Linux)?;
            Ok(BootCpuState {
                protocol: BootProtocol::Linux64,
                regs: arch::linux_boot::long_mode_boot_regs(entry, boot_params),
            })
        }
    }
}

#[cfg(test)]
mod tests;
