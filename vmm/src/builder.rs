//! Builds a VM from a `VmConfig` in named steps: check inputs, guest memory, hypervisor VM,
//! boot (kernel, initrd, tables), legacy devices, PCI devices, vCPUs. Each step is a function; the builder only
//! composes them. If a step fails, a memory file the build created is removed again.
//!
//! Restore (`snapshot::restore`) composes the same steps, handing the device steps saved
//! states (each device's own `Persist::State`, the transport's `VirtioPciState`) instead of
//! the command line's; nothing here knows the snapshot's file format.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusError};
use devices::legacy::acpi_pm::{AcpiPm, ACPI_PM_PORT, ACPI_PM_PORT_LEN};
use devices::legacy::debug_exit::{DebugExit, DEBUG_EXIT_PORT, DEBUG_EXIT_PORT_LEN};
use devices::legacy::i8042::{I8042State, I8042, I8042_PORT, I8042_PORT_LEN};
use devices::legacy::serial::{Serial, SerialState, COM1_IRQ, COM1_PORT, COM1_PORT_LEN};
use devices::persist::Persist;
use devices::virtio::console::ConsoleInput;
use devices::virtio::transport::{StateError, VirtioPciDevice, VirtioPciState};
use devices::vm_exit::VmExitSignal;
use event_manager::{EventManager, MutEventSubscriber};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::{prepare_boot, BootConfig, BootCpuState, BootError};
use crate::config::{SerialConfig, VmConfig};
use crate::guest_output::GuestOutputs;
use crate::hypervisor::kvm::KvmHypervisor;
use crate::hypervisor::state::VcpuState;
use crate::hypervisor::{Hypervisor, HypervisorError, Vcpu, Vm};
use crate::memory::backing::BackingKind;
use crate::memory::{GuestRam, MemoryError, RegionMapping};
use crate::pci_devices::{map_bars, PciDevices, PciDevicesError};
use crate::virtio_devices::{DeviceContext, DeviceError, Origin, VirtioDeviceState};

/// The VM's event loop (`event-manager`): device handlers, host input, signals, the VM's end.
pub type VmEvents = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// Errors from building a VM.
#[derive(Debug, Error)]
pub enum BuildError {
    /// An input file (kernel, initrd) or the serial output file cannot serve (boxed: the
    /// error is large and rare).
    #[error(transparent)]
    HostFile(Box<crate::host_file::HostFileError>),
    /// The hypervisor refused.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// More vCPUs than the host allows.
    #[error("--cpus {requested} exceeds the host's limit of {max} vCPUs")]
    TooManyVcpus {
        /// Requested.
        requested: u32,
        /// Host limit.
        max: usize,
    },
    /// The memory backing is larger than the host can hold.
    #[error("--memory size {size:#x} exceeds the host's {total:#x} bytes of RAM (use file= for a larger, file-backed guest)")]
    MemoryExceedsHost {
        /// Requested.
        size: u64,
        /// Host total.
        total: u64,
    },
    /// Guest memory could not be built.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Boot preparation failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The writer thread for guest output could not be started.
    #[error("cannot start the guest output writer")]
    OutputWriter(#[source] std::io::Error),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// Device placement failed.
    #[error("cannot place a device on the bus")]
    Bus(#[source] BusError),
    /// The event loop could not be created.
    #[error("cannot create the event loop: {0}")]
    EventLoop(String),
    /// The PCI devices could not be built (boxed: it is the largest cause).
    #[error(transparent)]
    Pci(Box<PciDevicesError>),
    /// A virtio device could not be built (boxed: large).
    #[error(transparent)]
    Device(Box<DeviceError>),
    /// A saved virtio device state cannot be used.
    #[error(transparent)]
    VirtioState(#[from] StateError),
    /// A saved vCPU state cannot be put back.
    #[error("cannot restore vCPU {index}")]
    VcpuState {
        /// The vCPU.
        index: u32,
        /// The cause.
        #[source]
        source: HypervisorError,
    },
    /// A saved serial port state cannot be used.
    #[error("cannot restore the serial port")]
    SerialState(#[source] devices::legacy::serial::SerialError),
}

impl From<std::convert::Infallible> for BuildError {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

impl From<DeviceError> for BuildError {
    fn from(e: DeviceError) -> Self {
        Self::Device(Box::new(e))
    }
}

impl From<PciDevicesError> for BuildError {
    fn from(e: PciDevicesError) -> Self {
        Self::Pci(Box::new(e))
    }
}

/// A VM ready to run: memory, hypervisor VM, buses, devices and vCPUs in their boot state.
pub struct BuiltVm {
    /// Guest RAM. Must outlive `vm` (its mappings back the memory slots).
    pub ram: GuestRam,
    /// The hypervisor VM.
    pub vm: Box<dyn Vm>,
    /// vCPUs, index = APIC ID.
    pub vcpus: Vec<Box<dyn Vcpu>>,
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// The serial port (the event loop feeds it host input).
    pub serial: Arc<Mutex<Serial>>,
    /// The i8042 controller (kept for snapshots).
    pub i8042: Arc<Mutex<I8042>>,
    /// Where the guest's end is recorded.
    pub exit: VmExitSignal,
    /// The event loop the devices were built against (their handlers join it when the driver
    /// activates them); the runner runs it. `None`: the runner makes a fresh one.
    pub events: Option<VmEvents>,
    /// The virtio console's input (`--console`): the runner feeds it stdin instead of the
    /// serial port.
    pub console_input: Option<ConsoleInput>,
    /// The virtio PCI functions, in the order they were added (kept for snapshots).
    pub virtio: VirtioFunctions,
    /// Where guest output goes (bounded buffers drained by writer threads); the runner
    /// takes it to report dropped output.
    pub outputs: GuestOutputs,
}

/// The VM's virtio PCI functions, in bus order.
pub type VirtioFunctions = Vec<Arc<Mutex<VirtioPciDevice>>>;

impl std::fmt::Debug for BuiltVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltVm")
            .field("regions", &self.ram.regions().len())
            .field("vcpus", &self.vcpus.len())
            .finish()
    }
}

/// Builds the VM `cfg` describes.
pub fn build_vm(cfg: &VmConfig) -> Result<BuiltVm, BuildError> {
    check_input("kernel", &cfg.kernel)?;
    if let Some(initrd) = &cfg.initrd {
        check_input("initrd", initrd)?;
    }
    check_memory_fits_host(cfg)?;
    let hypervisor = KvmHypervisor::new()?;
    let max = hypervisor.max_vcpus();
    if usize::try_from(cfg.cpus).map_or(true, |n| n > max) {
        return Err(BuildError::TooManyVcpus {
            requested: cfg.cpus,
            max,
        });
    }
    let ram = GuestRam::create(&cfg.memory, hypervisor.max_memory_slots())?;
    build_on_ram(&hypervisor, cfg, ram).map_err(|(e, ram)| {
        if let BackingKind::File(path) = &cfg.memory.backing {
            if ram.created_file() {
                let _ = std::fs::remove_file(path);
            }
        }
        e
    })
}

fn build_on_ram(
    hypervisor: &dyn Hypervisor,
    cfg: &VmConfig,
    ram: GuestRam,
) -> Result<BuiltVm, (BuildError, GuestRam)> {
    match build_parts(hypervisor, cfg, &ram) {
        Ok(parts) => Ok(parts.with_ram(ram)),
        Err(e) => Err((e, ram)),
    }
}

/// A built VM but for its guest RAM, which the caller keeps until every step succeeded (a
/// failed build may have to remove the RAM's file).
pub(crate) struct VmParts {
    pub(crate) vm: Box<dyn Vm>,
    pub(crate) vcpus: Vec<Box<dyn Vcpu>>,
    pub(crate) legacy: LegacyDevices,
    pub(crate) mmio: Bus,
    pub(crate) exit: VmExitSignal,
    pub(crate) events: VmEvents,
    pub(crate) pci: PciFunctions,
    pub(crate) outputs: GuestOutputs,
}

impl VmParts {
    /// The VM, with its guest RAM.
    pub(crate) fn with_ram(self, ram: GuestRam) -> BuiltVm {
        BuiltVm {
            ram,
            vm: self.vm,
            vcpus: self.vcpus,
            pio: Arc::new(self.legacy.pio),
            mmio: Arc::new(self.mmio),
            serial: self.legacy.serial,
            i8042: self.legacy.i8042,
            exit: self.exit,
            events: Some(self.events),
            console_input: self.pci.console_input,
            virtio: self.pci.functions,
            outputs: self.outputs,
        }
    }
}

fn build_parts(
    hypervisor: &dyn Hypervisor,
    cfg: &VmConfig,
    ram: &GuestRam,
) -> Result<VmParts, BuildError> {
    let vm = create_vm(hypervisor, ram)?;
    let boot = prepare_boot(
        ram.memory(),
        &ram_ranges(ram),
        &BootConfig {
            kernel: cfg.kernel.clone(),
            initrd: cfg.initrd.clone(),
            cmdline: cfg.cmdline.clone(),
            cpus: cfg.cpus,
        },
    )?;
    let exit = VmExitSignal::new().map_err(BuildError::EventFd)?;
    let mut outputs = GuestOutputs::default();
    let mut legacy = create_legacy_devices(&*vm, &cfg.serial, &mut outputs, &exit, None)?;
    let events = VmEvents::new().map_err(|e| BuildError::EventLoop(format!("{e:?}")))?;
    let mut mmio = Bus::new();
    let devices = VirtioDeviceState::from_config(cfg)?;
    let pci = create_pci_devices(
        &*vm,
        ram,
        &devices,
        None,
        &events,
        &mut outputs,
        &mut legacy.pio,
        &mut mmio,
    )?;
    let vcpus = create_vcpus(hypervisor, &*vm, cfg.cpus, VcpuStart::Boot(&boot))?;
    Ok(VmParts {
        vm,
        vcpus,
        legacy,
        mmio,
        exit,
        events,
        pci,
        outputs,
    })
}

impl From<crate::host_file::HostFileError> for BuildError {
    fn from(e: crate::host_file::HostFileError) -> Self {
        Self::HostFile(Box::new(e))
    }
}

fn check_input(what: &'static str, path: &Path) -> Result<(), BuildError> {
    crate::host_file::open_regular(what, path)?;
    Ok(())
}

/// Refuses anonymous (memfd) guest RAM larger than the host's physical memory: such a guest
/// could be killed by SIGBUS when shmem runs out. File-backed RAM may be larger.
fn check_memory_fits_host(cfg: &VmConfig) -> Result<(), BuildError> {
    if matches!(cfg.memory.backing, BackingKind::File(_)) {
        return Ok(());
    }
    let total = host_ram_bytes();
    if total > 0 && cfg.memory.size > total {
        return Err(BuildError::MemoryExceedsHost {
            size: cfg.memory.size,
            total,
        });
    }
    Ok(())
}

/// The host's physical memory in bytes (0 when unknown).
pub(crate) fn host_ram_bytes() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(pages)
        .unwrap_or(0)
        .saturating_mul(u64::try_from(page).unwrap_or(0))
}

fn ram_ranges(ram: &GuestRam) -> Vec<arch::layout::RamRange> {
    ram.regions()
        .iter()
        .map(|r| arch::layout::RamRange {
            start: r.guest_address,
            size: r.size,
        })
        .collect()
}

/// Step: the hypervisor VM with one memory slot per region and its platform devices.
pub(crate) fn create_vm(
    hypervisor: &dyn Hypervisor,
    ram: &GuestRam,
) -> Result<Box<dyn Vm>, BuildError> {
    let vm = hypervisor.create_vm()?;
    let mappings = RegionMapping::of_each(ram.memory());
    for (slot, (region, mapping)) in ram.memory().iter().zip(mappings).enumerate() {
        let slot =
            u32::try_from(slot).map_err(|_| HypervisorError::TooManySlots { index: slot })?;
        vm.map_memory(slot, region.start_addr().0, Arc::new(mapping))?;
    }
    // Memory slots first: with an in-kernel irqchip present, each slot registration waits for
    // an SRCU grace period (measured: 0.2 ms before, 5-11 ms after on a 256 MiB slot).
    vm.create_platform_devices()?;
    Ok(vm)
}

/// The legacy devices on the I/O bus.
pub(crate) struct LegacyDevices {
    /// The I/O bus they are on (the PCI step adds configuration access).
    pub(crate) pio: Bus,
    /// COM1.
    pub(crate) serial: Arc<Mutex<Serial>>,
    /// The i8042 controller.
    pub(crate) i8042: Arc<Mutex<I8042>>,
}

/// Step: COM1, the i8042 and the debug-exit port on the I/O bus; in the saved states
/// `saved` when a snapshot is being restored. The serial port writes into a sink of `outputs`.
pub(crate) fn create_legacy_devices(
    vm: &dyn Vm,
    serial_cfg: &SerialConfig,
    outputs: &mut GuestOutputs,
    exit: &VmExitSignal,
    saved: Option<(&SerialState, &I8042State)>,
) -> Result<LegacyDevices, BuildError> {
    let output: Option<Box<dyn Write + Send>> = match serial_cfg {
        SerialConfig::Stdio => Some(Box::new(
            outputs.stdout().map_err(BuildError::OutputWriter)?,
        )),
        SerialConfig::Off => None,
        SerialConfig::File(path) => {
            let file = crate::host_file::open_serial_output(path)?;
            let name = format!("serial file {}", path.display());
            Some(Box::new(
                outputs.file(name, file).map_err(BuildError::OutputWriter)?,
            ))
        }
    };
    let irq = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&irq, COM1_IRQ)?;
    let (serial, i8042) = match saved {
        None => (Serial::new(output, irq), I8042::new(exit.clone())),
        Some((serial, i8042)) => (
            Serial::restore((output, Box::new(irq)), serial).map_err(BuildError::SerialState)?,
            I8042::restore(exit.clone(), i8042)?,
        ),
    };
    let serial = Arc::new(Mutex::new(serial));
    let i8042 = Arc::new(Mutex::new(i8042));
    let pio = Bus::new();
    pio.insert(serial.clone(), COM1_PORT, COM1_PORT_LEN)
        .map_err(BuildError::Bus)?;
    pio.insert(i8042.clone(), I8042_PORT, I8042_PORT_LEN)
        .map_err(BuildError::Bus)?;
    pio.insert(
        Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
        DEBUG_EXIT_PORT,
        DEBUG_EXIT_PORT_LEN,
    )
    .map_err(BuildError::Bus)?;
    pio.insert(
        Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
        ACPI_PM_PORT,
        ACPI_PM_PORT_LEN,
    )
    .map_err(BuildError::Bus)?;
    Ok(LegacyDevices { pio, serial, i8042 })
}

/// The virtio PCI functions a VM has, and the console's input when it has a console.
pub(crate) struct PciFunctions {
    /// The functions, in bus order.
    pub(crate) functions: VirtioFunctions,
    /// The virtio console's input (`--console`).
    pub(crate) console_input: Option<ConsoleInput>,
}

/// Step: the PCI host bridge, configuration access and the virtio `devices`, each built from
/// its state in this order (so BARs and GSIs fall where they were for a restore). For a restore,
/// `saved` holds each function's transport state, which goes in once the functions are
/// attached; devices the driver had running are active again when this returns.
#[allow(clippy::too_many_arguments)]
pub(crate) fn create_pci_devices(
    vm: &dyn Vm,
    ram: &GuestRam,
    devices: &[VirtioDeviceState],
    saved: Option<&[VirtioPciState]>,
    events: &VmEvents,
    outputs: &mut GuestOutputs,
    pio: &mut Bus,
    mmio: &mut Bus,
) -> Result<PciFunctions, BuildError> {
    let mut pci = PciDevices::new(vm, ram.memory().clone(), events.remote_endpoint())?;
    let origin = if saved.is_some() {
        Origin::Snapshot
    } else {
        Origin::Boot
    };
    let mut ctx = DeviceContext {
        ram,
        event_loop: events.remote_endpoint(),
        outputs,
        console_input: None,
    };
    for device in devices {
        pci.add_virtio_device(device.build(origin, &mut ctx)?)?;
    }
    let functions = pci.attach(pio, mmio)?;
    match saved {
        None => map_bars(&functions)?,
        Some(saved) => {
            for (function, state) in functions.iter().zip(saved) {
                function
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .restore(state)?;
            }
            // Every saved BAR address is back, so BARs the guest swapped do not collide. One
            // the running VM had refused (outside the window, over another BAR) stays
            // unmapped, as it was.
            if let Err(e) = map_bars(&functions) {
                log::warn!("restoring the BARs: {}", crate::error_chain(&e));
            }
        }
    }
    Ok(PciFunctions {
        functions,
        console_input: ctx.console_input,
    })
}

/// Where the vCPUs start.
pub(crate) enum VcpuStart<'a> {
    /// A fresh boot: the boot vCPU at the kernel's entry.
    Boot(&'a BootCpuState),
    /// A restore: each vCPU in its saved state (one per vCPU, index = APIC ID).
    Saved(&'a [VcpuState]),
}

/// Step: `count` vCPUs. For a boot, with CPUID, MSRs, FPU and LAPIC set up; the boot vCPU gets
/// the boot registers, the others wait in the in-kernel LAPIC for INIT/SIPI. For a restore,
/// each in its saved state in full (its own ordering is in `hypervisor/kvm/vcpu_state.rs`).
pub(crate) fn create_vcpus(
    hypervisor: &dyn Hypervisor,
    vm: &dyn Vm,
    count: u32,
    start: VcpuStart<'_>,
) -> Result<Vec<Box<dyn Vcpu>>, BuildError> {
    let boot = match start {
        VcpuStart::Boot(boot) => boot,
        VcpuStart::Saved(saved) => {
            return (0..count)
                .zip(saved)
                .map(|(index, saved)| {
                    let vcpu = vm.create_vcpu(index)?;
                    vcpu.restore_state(saved)
                        .map_err(|source| BuildError::VcpuState { index, source })?;
                    Ok(vcpu)
                })
                .collect();
        }
    };
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
                // Segment state first: the general registers do not depend on it, but the
                // protocol's CR0/EFER must be in place before the vCPU first runs.
                let mut sregs = vcpu.sregs()?;
                boot.apply_sregs(&mut sregs);
                vcpu.set_sregs(&sregs)?;
                vcpu.set_regs(&boot.regs)?;
            }
            Ok(vcpu)
        })
        .collect()
}
