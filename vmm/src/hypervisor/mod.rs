//! The hypervisor seam: what skiff needs from KVM and WHP, in neutral types.
//!
//! `Hypervisor` opens the platform and creates VMs; `Vm` maps guest memory regions as slots, sets
//! up the platform interrupt controller and creates vCPUs; `Vcpu` runs and reports exits and gets
//! or sets register state. No KVM type crosses this boundary: registers, CPUID and MSRs use the
//! `arch::regs` types, and exits use `VcpuExit` below.

use arch::regs::{CpuidEntry, MsrEntry, SpecialRegisters, StandardRegisters};
use thiserror::Error;

#[cfg(target_os = "linux")]
pub mod kvm;
pub mod state;
pub mod whp;

/// A failed hypervisor operation, naming the values it failed on (slot, GSI, MSR, ioctl).
#[derive(Debug, Error)]
pub enum HypervisorError {
    /// The hypervisor device is missing.
    #[error("{path} does not exist: this host has no KVM (load the kvm module, or enable virtualization)")]
    NotPresent {
        /// The device path.
        path: String,
    },
    /// The hypervisor device cannot be opened by this user.
    #[error("no permission to open {path} (add the user to the kvm group, or run as root)")]
    NoPermission {
        /// The device path.
        path: String,
    },
    /// The hypervisor backend does not offer this (yet).
    #[error("{0} is not supported by this hypervisor backend")]
    NotSupported(&'static str),
    /// A call into the platform's hypervisor API (WHP) with no further value to name failed.
    #[error("{call} failed")]
    Call {
        /// The API function, or what was being done.
        call: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The hypervisor device could not be opened for another reason.
    #[error("cannot open {path}")]
    Open {
        /// The device path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The host hypervisor lacks a capability skiff needs.
    #[error("the host hypervisor lacks the required capability {0}")]
    MissingCapability(&'static str),
    /// The VM descriptor could not be duplicated for a handle shared with other threads.
    #[error("cannot duplicate the VM descriptor")]
    DuplicateVm(#[source] std::io::Error),
    /// An ioctl with no further value to name failed.
    #[error("{ioctl} failed")]
    Ioctl {
        /// The ioctl, as the kernel names it.
        ioctl: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A guest memory region could not be mapped as a memory slot.
    #[error("cannot map memory slot {slot} (guest {guest_address:#x}, {size:#x} bytes)")]
    MapMemory {
        /// The slot number.
        slot: u32,
        /// Guest physical address of the region.
        guest_address: u64,
        /// The region's size in bytes.
        size: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// More memory regions than memory slot numbers.
    #[error("guest memory region {index} has no memory slot number (at most {max})", max = u32::MAX)]
    TooManySlots {
        /// The region's index.
        index: usize,
    },
    /// Dirty page logging could not be switched on one memory slot.
    #[error("cannot turn dirty page logging {} on memory slot {slot}", if *.on { "on" } else { "off" })]
    DirtyLogging {
        /// The slot number.
        slot: u32,
        /// Whether logging was being turned on.
        on: bool,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A memory slot's dirty bitmap could not be read.
    #[error("KVM_GET_DIRTY_LOG failed on memory slot {slot}")]
    GetDirtyLog {
        /// The slot number.
        slot: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Dirty pages were asked for while tracking is off.
    #[error("dirty page tracking is off")]
    TrackingOff,
    /// An eventfd could not be bound to an interrupt line.
    #[error("cannot bind an irqfd to GSI {gsi}")]
    Irqfd {
        /// The interrupt line.
        gsi: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd could not be bound to (or unbound from) guest MMIO writes.
    #[error("cannot {} an ioeventfd at MMIO address {address:#x}", if *.deassign { "unbind" } else { "bind" })]
    IoEvent {
        /// The MMIO address.
        address: u64,
        /// Whether the binding was being removed.
        deassign: bool,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An MSI route would replace a pin of the platform's interrupt controllers.
    #[error("MSI route on GSI {gsi}, an interrupt controller pin (MSI routes start at GSI {first})", first = FIRST_MSI_GSI)]
    MsiRouteOnPin {
        /// The route's GSI.
        gsi: u32,
    },
    /// A list (MSI routes, CPUID leaves, MSRs) is longer than KVM's structure can hold.
    #[error("{count} {what} do not fit in one KVM list")]
    ListTooLong {
        /// What the list holds.
        what: &'static str,
        /// Its length.
        count: usize,
    },
    /// A vCPU could not be created.
    #[error("cannot create vCPU {index}")]
    CreateVcpu {
        /// The vCPU number.
        index: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The host refused an MSR value.
    #[error("the host refused MSR {index:#x} (value {data:#x})")]
    MsrRefused {
        /// The MSR index.
        index: u32,
        /// The value written.
        data: u64,
    },
    /// An XSAVE area of the host's size could not be allocated.
    #[error("cannot allocate an XSAVE area of {size} bytes")]
    XsaveAllocation {
        /// The size asked for.
        size: usize,
    },
    /// Saved state does not have the shape KVM needs.
    #[error("the saved {what} state is invalid")]
    InvalidState {
        /// "vCPU" or "VM".
        what: &'static str,
        /// What is wrong (boxed: the error stays small on every path that returns it).
        #[source]
        source: Box<state::StateError>,
    },
    /// The host cannot run the saved guest's TSC at its frequency.
    #[error("cannot run the saved guest's TSC at {saved_khz} kHz on this host ({host_khz} kHz)")]
    TscFrequency {
        /// The saved frequency.
        saved_khz: u32,
        /// This host's frequency.
        host_khz: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The guest runs a nested guest, whose state cannot be saved.
    #[error("the guest runs a nested guest; saving nested virtualization state is not supported")]
    NestedGuest,
    /// A vCPU was asked for before the VM's buses were attached (WHP).
    #[error("cannot create vCPU {index}: no buses attached (attach_buses comes first)")]
    NoBuses {
        /// The vCPU.
        index: u32,
    },
    /// A vCPU index past the VM's processor count (WHP fixes it at creation).
    #[error("cannot create vCPU {index}: the VM has {count} processors")]
    VcpuIndex {
        /// The vCPU asked for.
        index: u32,
        /// The VM's processors.
        count: usize,
    },
    /// The MSI route table was refused.
    #[error("cannot set MSI routes")]
    MsiRoutes(#[source] whp::msi_routes::MsiRouteError),
    /// The WHP partition could not be set up.
    #[cfg(windows)]
    #[error("cannot set up the WHP partition")]
    Partition(#[source] whp::partition::PartitionError),
}

impl HypervisorError {
    /// Wraps the error of a failed hypervisor API call that has no further value to name.
    pub fn call(call: &'static str, source: impl Into<std::io::Error>) -> Self {
        Self::Call {
            call,
            source: source.into(),
        }
    }

    /// Wraps the OS error of a failed `ioctl` that has no further value to name.
    pub fn ioctl(ioctl: &'static str, source: impl Into<std::io::Error>) -> Self {
        Self::Ioctl {
            ioctl,
            source: source.into(),
        }
    }
}

/// Result type of the hypervisor seam.
pub type Result<T> = std::result::Result<T, HypervisorError>;

/// The platform hypervisor.
pub trait Hypervisor: Send + Sync {
    /// Creates an empty VM.
    fn create_vm(&self) -> Result<Box<dyn Vm>>;
    /// How many vCPUs one VM may have.
    fn max_vcpus(&self) -> usize;
    /// How many memory slots one VM may have.
    fn max_memory_slots(&self) -> usize;
    /// The CPUID leaves the host can give a guest.
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>>;
}

/// One virtual machine.
pub trait Vm: Send + Sync + VmSnapshot {
    /// Maps `memory` as guest physical `guest_address..guest_address + memory.size()`, in
    /// memory slot `slot`. The VM keeps `memory` for as long as the hypervisor can reach the
    /// slot (on KVM: as long as the VM's descriptor or any vCPU's is open).
    fn map_memory(
        &self,
        slot: u32,
        guest_address: u64,
        memory: std::sync::Arc<dyn crate::memory::SlotMemory>,
    ) -> Result<()>;
    /// Creates the platform interrupt controllers and timer: in-kernel PIC, IOAPIC, local APICs
    /// and PIT on KVM.
    fn create_platform_devices(&self) -> Result<()>;
    /// Makes every write to `event` raise interrupt line `gsi`.
    #[cfg(target_os = "linux")]
    fn register_irqfd(&self, event: &vmm_sys_util::eventfd::EventFd, gsi: u32) -> Result<()>;
    /// A handle that binds and unbinds MMIO ioeventfds from any thread, for devices whose
    /// guest-programmed BARs move while the VM runs. It keeps the VM's descriptor open.
    #[cfg(target_os = "linux")]
    fn ioevents(&self) -> Result<std::sync::Arc<dyn IoEvents>>;
    /// Replaces every MSI route (see `MsiRouting::set_msi_routes`).
    fn set_msi_routes(&self, routes: &[MsiRoute]) -> Result<()>;
    /// A handle that sets this VM's MSI routes from any thread, for devices whose guest-programmed
    /// MSI-X tables change the routes while the VM runs. It keeps the VM's descriptor open.
    fn msi_routing(&self) -> Result<std::sync::Arc<dyn MsiRouting>>;
    /// Creates vCPU number `index` (also its APIC ID). The platform devices must exist first.
    fn create_vcpu(&self, index: u32) -> Result<Box<dyn Vcpu>>;
    /// A handle that tracks which guest pages vCPUs write (see `DirtyLog`), usable from any
    /// thread. It keeps the VM's descriptor open.
    fn dirty_log(&self) -> Result<std::sync::Arc<dyn DirtyLog>>;
}

/// The pages vCPUs wrote in one memory slot: one bit per 4 KiB page from `guest_address`,
/// page `64 * w + b` in bit `b` of word `w`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotDirtyPages {
    /// Guest physical address of the slot's first page.
    pub guest_address: u64,
    /// The slot's size in bytes.
    pub size: u64,
    /// The bitmap.
    pub bitmap: Vec<u64>,
}

/// Dirty page tracking for live and diff snapshots: which guest pages vCPUs wrote since the
/// last look. Only writes through the hypervisor's memory slots are seen; writes skiff's own
/// devices make through guest memory are tracked by `vm-memory`'s bitmap instead, and writes by
/// another process mapping the memory (a vhost-user backend) by neither.
pub trait DirtyLog: Send + Sync {
    /// Turns tracking on or off for every memory slot mapped so far. Turning it on starts
    /// with every page clean.
    fn set_tracking(&self, on: bool) -> Result<()>;
    /// Whether tracking is on.
    fn is_tracking(&self) -> bool;
    /// Every slot's pages written since tracking started or since the last call, and marks
    /// them clean again. Fails while tracking is off.
    fn take_dirty_pages(&self) -> Result<Vec<SlotDirtyPages>>;
}

/// First GSI free for MSI routes: GSIs below it are the platform's interrupt controller pins
/// (IOAPIC pins 0..24, which also cover the PIC's 16).
pub const FIRST_MSI_GSI: u32 = 24;

/// One MSI route: interrupts raised on `gsi` (through an irqfd) are delivered as the MSI
/// message `address`/`data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiRoute {
    /// The GSI, at least `FIRST_MSI_GSI`.
    pub gsi: u32,
    /// MSI address.
    pub address: u64,
    /// MSI data.
    pub data: u32,
}

/// Binds eventfds to guest MMIO writes.
#[cfg(target_os = "linux")]
pub trait IoEvents: Send + Sync {
    /// Makes a guest write of any width to MMIO address `address` signal `event` in the
    /// kernel, without an exit to skiff; the value written is not matched.
    fn register(&self, event: &vmm_sys_util::eventfd::EventFd, address: u64) -> Result<()>;
    /// Undoes `register(event, address)`.
    fn unregister(&self, event: &vmm_sys_util::eventfd::EventFd, address: u64) -> Result<()>;
}

/// Sets a VM's MSI routes.
pub trait MsiRouting: Send + Sync {
    /// Replaces every MSI route: afterwards each `route.gsi` (at least `FIRST_MSI_GSI`) delivers
    /// its MSI, and other GSIs above the platform's interrupt pins deliver nothing. The
    /// platform's own routes (GSIs below `FIRST_MSI_GSI`) are kept as the platform set them up.
    fn set_msi_routes(&self, routes: &[MsiRoute]) -> Result<()>;
}

/// Why `Vcpu::run` returned.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// Port read: fill `data`.
    IoIn {
        /// Port.
        port: u16,
        /// Bytes to fill.
        data: &'a mut [u8],
    },
    /// Port write.
    IoOut {
        /// Port.
        port: u16,
        /// Bytes written.
        data: &'a [u8],
    },
    /// MMIO read: fill `data`.
    MmioRead {
        /// Guest physical address.
        address: u64,
        /// Bytes to fill.
        data: &'a mut [u8],
    },
    /// MMIO write.
    MmioWrite {
        /// Guest physical address.
        address: u64,
        /// Bytes written.
        data: &'a [u8],
    },
    /// The vCPU halted and no in-kernel irqchip will wake it.
    Halt,
    /// Triple fault: the CPU shut down.
    Shutdown,
    /// The guest asked for a reset (e.g. PSCI/ACPI reset handled in kernel).
    SystemReset,
    /// The guest asked for power off.
    SystemPowerOff,
    /// The hypervisor could not continue (e.g. emulation failure); `Vcpu::internal_error_info`
    /// describes it.
    InternalError,
    /// VM entry failed.
    FailEntry {
        /// Hardware failure reason.
        reason: u64,
    },
    /// A signal interrupted the run; check for a stop request.
    Interrupted,
    /// An exit skiff does not handle.
    Unhandled(String),
}

/// One virtual CPU. Used only by its own thread.
pub trait Vcpu: Send + VcpuSnapshot {
    /// Runs until the next exit.
    fn run(&mut self) -> Result<VcpuExit<'_>>;
    /// General-purpose registers.
    fn regs(&self) -> Result<StandardRegisters>;
    /// Sets general-purpose registers.
    fn set_regs(&self, regs: &StandardRegisters) -> Result<()>;
    /// Segment and control registers.
    fn sregs(&self) -> Result<SpecialRegisters>;
    /// Sets segment and control registers.
    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<()>;
    /// Sets the CPUID leaves the guest sees.
    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()>;
    /// Writes MSRs.
    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()>;
    /// Puts the FPU/SSE state in its power-on configuration.
    fn reset_fpu(&self) -> Result<()>;
    /// Describes the last `VcpuExit::InternalError`: its suberror code and a one-line text.
    fn internal_error_info(&mut self) -> (u32, String);
    /// Programs the local APIC's LINT0 as ExtINT and LINT1 as NMI, as firmware would.
    fn setup_lapic_lint(&self) -> Result<()>;
}

// --- Snapshot state (issue 5): saving and restoring what the hypervisor keeps for a VM. ---

/// Saving and restoring one vCPU's state. Call only while the vCPU is out of `run` (paused),
/// from the thread that runs it (or before its thread starts).
pub trait VcpuSnapshot {
    /// Reads every piece of state a restore needs. State the host cannot give (nested
    /// virtualization state when the host refuses it) is left out and named in the second value.
    fn save_state(&self) -> Result<(state::VcpuState, state::SkippedState)>;
    /// Puts `state` back, in the order the hypervisor needs.
    fn restore_state(&self, state: &state::VcpuState) -> Result<()>;
}

/// Saving and restoring the VM-wide state: in-kernel interrupt controllers, timer and clock.
pub trait VmSnapshot {
    /// Reads the platform devices' state and the clock. Every vCPU must be paused.
    fn save_state(&self) -> Result<state::VmState>;
    /// Puts the interrupt controllers and timer back (after `create_platform_devices`).
    fn restore_devices(&self, state: &state::VmState) -> Result<()>;
    /// Sets the guest clock to the saved value (last, once every vCPU is restored), so the
    /// guest sees no jump.
    fn restore_clock(&self, state: &state::VmState) -> Result<()>;
}
