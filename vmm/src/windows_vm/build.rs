//! Building a VM on Windows in named steps, as the Linux builder does:
//!
//! 1. `load_guest_ram`: guest RAM as `SectionRam` (a pagefile-backed section, or one over the
//!    `file=` file; each `ShareableRegion` its own view at its file offset), and the kernel,
//!    initrd, command line and boot structures written into those views (`ViewMemory`). No
//!    hypervisor is needed up to here.
//! 2. `build_vm`: the WHP partition for the VM's vCPU count (`WhpHypervisor::new` loads the
//!    platform, or says in one line why it cannot), every view registered with
//!    `WHvMapGpaRange`, the IOAPIC, PIC and PIT, the legacy devices (COM1 on ISA IRQ 4, the
//!    i8042, debug-exit, ACPI PM) on the buses the vCPUs' emulators reach, and the vCPUs with
//!    CPUID, MSRs, FPU, LINTs and, on the boot vCPU, the boot registers. Port 0x61 is the
//!    PIT's (gate and speaker bits), as with KVM's in-kernel PIT, so the i8042 takes only its
//!    data (0x60) and status/command (0x64) ports here.
//!
//! Drop order keeps every mapping alive while something may use it: the vCPUs, then the
//! partition (which unmaps its GPA ranges), then the views.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusDevice, BusError};
use devices::interrupt::InterruptLine;
use devices::irqchip::pit::SPEAKER_PORT;
use devices::irqchip::PitPorts;
use devices::legacy::acpi_pm::AcpiPm;
use devices::legacy::debug_exit::{DebugExit, DEBUG_EXIT_PORT, DEBUG_EXIT_PORT_LEN};
use devices::legacy::i8042::{I8042, I8042_PORT, I8042_PORT_LEN};
use devices::legacy::serial::{Serial, COM1_IRQ, COM1_PORT, COM1_PORT_LEN};
use devices::vm_exit::VmExitSignal;
use thiserror::Error;

use super::args::{RamBacking, WindowsVmConfig};
use super::boot::{load_guest, BootCpuState, GuestBootError};
use super::wait::VcpuKick;
use crate::config::SerialConfig;
use crate::hypervisor::whp::vcpu::VcpuCanceller;
use crate::hypervisor::whp::vm::MAX_MEMORY_RANGES;
use crate::hypervisor::whp::{WhpHypervisor, WhpLoadError, WhpPlatform, WhpVm};
use crate::hypervisor::{Hypervisor, HypervisorError, Vcpu, Vm};
use crate::memory::section::SectionBacking;
use crate::memory::view_memory::section_memory;
use crate::memory::{SectionRam, SectionRamError};
use crate::vcpu::{VcpuContext, VcpuControl};

/// Why the VM could not be built.
#[derive(Debug, Error)]
pub enum WindowsBuildError {
    /// Guest RAM could not be created or mapped.
    #[error(transparent)]
    Memory(#[from] SectionRamError),
    /// The views do not form a valid guest memory (overlapping or unsorted regions).
    #[error("cannot describe guest RAM to vm-memory: {0}")]
    GuestMemory(String),
    /// The kernel, initrd or boot structures could not be loaded.
    #[error(transparent)]
    Boot(#[from] GuestBootError),
    /// The Windows Hypervisor Platform is missing or disabled (exit code 123).
    #[error(transparent)]
    Unavailable(#[from] WhpLoadError),
    /// More vCPUs than the partition takes.
    #[error("--cpus {requested} is more than the {max} vCPUs a WHP partition takes here")]
    TooManyVcpus {
        /// Asked for.
        requested: u32,
        /// The limit.
        max: usize,
    },
    /// A hypervisor call failed.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// Two devices claim the same addresses.
    #[error("cannot place a device on the bus")]
    Bus(#[source] BusError),
    /// The serial output file cannot be opened.
    #[error("cannot open the serial output file {path}")]
    SerialFile {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The VM-end signal could not be made.
    #[error("cannot create the VM-end signal")]
    ExitSignal(#[source] std::io::Error),
}

/// Guest RAM with the guest loaded into it.
#[derive(Debug)]
pub struct LoadedGuest {
    /// The RAM (shared with the `ViewMemory` that wrote it, which is gone by now).
    pub ram: Arc<SectionRam>,
    /// The boot vCPU's state.
    pub boot: BootCpuState,
}

/// Step 1: guest RAM and the guest loaded into it. A `file=` RAM file skiff created is removed
/// again when a later step fails.
pub fn load_guest_ram(cfg: &WindowsVmConfig) -> Result<LoadedGuest, WindowsBuildError> {
    let backing = match &cfg.memory.backing {
        RamBacking::Pagefile => SectionBacking::Pagefile,
        RamBacking::File(path) => SectionBacking::File(path.clone()),
    };
    let ram = Arc::new(SectionRam::create(
        &backing,
        cfg.memory.size,
        MAX_MEMORY_RANGES,
    )?);
    let loaded = section_memory(&ram)
        .map_err(|e| WindowsBuildError::GuestMemory(e.to_string()))
        .and_then(|mem| {
            let ranges: Vec<_> = ram
                .regions()
                .iter()
                .map(|r| arch::layout::RamRange {
                    start: r.guest_address,
                    size: r.size,
                })
                .collect();
            Ok(load_guest(&mem, &ranges, &cfg.boot)?)
        });
    match loaded {
        Ok(boot) => Ok(LoadedGuest { ram, boot }),
        Err(e) => {
            let created = ram.created_file();
            // Unmapped and closed first: Windows keeps a mapped file.
            drop(ram);
            remove_created_file(cfg, created);
            Err(e)
        }
    }
}

/// Removes the `file=` RAM file when skiff `created` it for this run (call once every view and
/// handle of it is gone).
pub fn remove_created_file(cfg: &WindowsVmConfig, created: bool) {
    if let (RamBacking::File(path), true) = (&cfg.memory.backing, created) {
        let _ = std::fs::remove_file(path);
    }
}

/// A built WHP VM, ready to run.
pub struct WindowsVm {
    /// The vCPUs with their run-loop contexts and kicks (dropped first).
    pub vcpus: Vec<(VcpuContext, Box<dyn VcpuKick>)>,
    /// Where the guest's end is recorded.
    pub exit: VmExitSignal,
    /// COM1.
    pub serial: Arc<Mutex<Serial>>,
    vm: WhpVm,
    ram: Arc<SectionRam>,
}

impl std::fmt::Debug for WindowsVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowsVm")
            .field("vcpus", &self.vcpus.len())
            .field("regions", &self.ram.regions().len())
            .finish_non_exhaustive()
    }
}

impl WindowsVm {
    /// Ends the VM: vCPUs first, then the partition, then guest RAM.
    pub fn into_ram(self) -> Arc<SectionRam> {
        let Self { vcpus, vm, ram, .. } = self;
        drop(vcpus);
        drop(vm);
        ram
    }
}

impl VcpuKick for VcpuCanceller {
    fn kick(&self) -> std::io::Result<()> {
        self.cancel()
            .map_err(|e| std::io::Error::other(crate::error_chain(&e)))
    }
}

/// COM1's interrupt: ISA IRQ 4 of the user-space PIC and IOAPIC.
#[derive(Debug)]
struct SharedLine(Arc<dyn InterruptLine>);

impl InterruptLine for SharedLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }
}

/// Step 2: the WHP VM on `guest`'s RAM.
pub fn build_vm(
    cfg: &WindowsVmConfig,
    guest: &LoadedGuest,
) -> Result<WindowsVm, WindowsBuildError> {
    let cpus = cfg.boot.cpus;
    let hypervisor = WhpHypervisor::new(cpus)?;
    let max = hypervisor.max_vcpus();
    if usize::try_from(cpus).map_or(true, |n| n > max) {
        return Err(WindowsBuildError::TooManyVcpus {
            requested: cpus,
            max,
        });
    }
    let vm = hypervisor.create_whp_vm()?;
    for (slot, (region, memory)) in guest
        .ram
        .regions()
        .iter()
        .zip(guest.ram.slot_memory())
        .enumerate()
    {
        let slot =
            u32::try_from(slot).map_err(|_| HypervisorError::TooManySlots { index: slot })?;
        vm.map_memory(slot, region.guest_address, memory)?;
    }
    vm.create_platform_devices()?;
    let exit = VmExitSignal::new().map_err(WindowsBuildError::ExitSignal)?;
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let (Some(platform), Some(com1_irq)) = (
        vm.platform(),
        u8::try_from(COM1_IRQ).ok().and_then(|irq| vm.isa_irq(irq)),
    ) else {
        return Err(HypervisorError::NotSupported(
            "a WHP VM without its platform devices after create_platform_devices",
        )
        .into());
    };
    let serial = attach_devices(&platform, com1_irq, &cfg.serial, &exit, &pio, &mmio)?;
    vm.attach_buses(pio.clone(), mmio.clone());
    let vcpus = create_vcpus(&hypervisor, &vm, cpus, &guest.boot)?
        .into_iter()
        .zip(0..)
        .map(|(vcpu, index)| {
            let kick = vm.canceller(index).ok_or(HypervisorError::call(
                "finding a WHP vCPU's canceller",
                std::io::Error::other(format!("no vCPU {index}")),
            ))?;
            let ctx = VcpuContext {
                index,
                vcpu,
                pio: pio.clone(),
                mmio: mmio.clone(),
                exit: exit.clone(),
                control: Arc::new(VcpuControl::new(index)),
            };
            Ok((ctx, Box::new(kick) as Box<dyn VcpuKick>))
        })
        .collect::<Result<Vec<_>, HypervisorError>>()?;
    Ok(WindowsVm {
        vcpus,
        exit,
        serial,
        vm,
        ram: guest.ram.clone(),
    })
}

/// The IOAPIC, PIC and PIT (its speaker port 0x61 included) on the buses, then COM1 (raising
/// `com1_irq`), the i8042's two ports, the debug-exit port and ACPI PM as on Linux.
fn attach_devices(
    platform: &WhpPlatform,
    com1_irq: Arc<dyn InterruptLine>,
    serial_cfg: &SerialConfig,
    exit: &VmExitSignal,
    pio: &Bus,
    mmio: &Bus,
) -> Result<Arc<Mutex<Serial>>, WindowsBuildError> {
    let output: Option<Box<dyn Write + Send>> = match serial_cfg {
        SerialConfig::Stdio => Some(Box::new(std::io::stdout())),
        SerialConfig::Off => None,
        SerialConfig::File(path) => Some(Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| WindowsBuildError::SerialFile {
                    path: path.clone(),
                    source,
                })?,
        )),
    };
    let serial = Arc::new(Mutex::new(Serial::new(output, SharedLine(com1_irq))));
    let bus = |r: Result<(), BusError>| r.map_err(WindowsBuildError::Bus);
    bus(platform.attach(pio, mmio))?;
    bus(pio.insert(
        Arc::new(Mutex::new(PitPorts::new(
            platform.pit.clone(),
            SPEAKER_PORT,
        ))),
        u64::from(SPEAKER_PORT),
        1,
    ))?;
    bus(pio.insert(serial.clone(), COM1_PORT, COM1_PORT_LEN))?;
    let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone())));
    for offset in [0, I8042_PORT_LEN - 1] {
        let port = I8042Port {
            i8042: i8042.clone(),
            offset,
        };
        bus(pio.insert(Arc::new(Mutex::new(port)), I8042_PORT + offset, 1))?;
    }
    bus(pio.insert(
        Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
        DEBUG_EXIT_PORT,
        DEBUG_EXIT_PORT_LEN,
    ))?;
    bus(pio.insert(
        Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
        arch::layout::ACPI_PM_PORT,
        arch::layout::ACPI_PM_PORT_LEN,
    ))?;
    Ok(serial)
}

/// One port of the i8042 (data at offset 0, status/command at offset 4) on its own bus range.
struct I8042Port {
    i8042: Arc<Mutex<I8042>>,
    offset: u64,
}

impl BusDevice for I8042Port {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.i8042
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .read(self.offset + offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.i8042
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .write(self.offset + offset, data);
    }
}

/// `count` vCPUs with CPUID, MSRs, FPU and LINTs; the boot vCPU with the boot registers (the
/// Linux builder's `create_vcpus` for a fresh boot).
fn create_vcpus(
    hypervisor: &WhpHypervisor,
    vm: &WhpVm,
    count: u32,
    boot: &BootCpuState,
) -> Result<Vec<Box<dyn Vcpu>>, HypervisorError> {
    let supported = hypervisor.supported_cpuid()?;
    let msrs = arch::msr::boot_msrs();
    (0..count)
        .map(|index| {
            let vcpu = vm.create_vcpu(index)?;
            let mut cpuid = supported.clone();
            arch::cpuid::adjust_cpuid(&mut cpuid, index, count);
            vcpu.set_cpuid(&cpuid)?;
            vcpu.set_msrs(&msrs)?;
            vcpu.reset_fpu()?;
            vcpu.setup_lapic_lint()?;
            if index == 0 {
                let mut sregs = vcpu.sregs()?;
                boot.apply_sregs(&mut sregs);
                vcpu.set_sregs(&sregs)?;
                vcpu.set_regs(&boot.regs)?;
            }
            Ok(vcpu)
        })
        .collect()
}

#[cfg(test)]
#[path = "build_tests.rs"]
mod tests;
