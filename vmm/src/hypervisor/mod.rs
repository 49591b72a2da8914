//! The hypervisor seam: what skiff needs from KVM (and, later, WHP), in neutral types.
//!
//! `Hypervisor` opens the platform and creates VMs; `Vm` maps guest memory regions as slots, sets
//! up the platform interrupt controller and creates vCPUs; `Vcpu` runs and reports exits and gets
//! or sets register state. No KVM type crosses this boundary: registers, CPUID and MSRs use the
//! `arch::regs` types, and exits use `VcpuExit` below.

use arch::regs::{CpuidEntry, MsrEntry, SpecialRegisters, StandardRegisters};
use thiserror::Error;

#[cfg(target_os = "linux")]
pub mod kvm;

/// A failed hypervisor operation: which operation, and the OS error.
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
    /// The host hypervisor lacks a capability skiff needs.
    #[error("the host hypervisor lacks the required capability {0}")]
    MissingCapability(&'static str),
    /// An operation failed.
    #[error("{op} failed")]
    Op {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl HypervisorError {
    /// Wraps an OS error from operation `op`.
    pub fn op(op: &'static str, source: impl Into<std::io::Error>) -> Self {
        Self::Op {
            op,
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
pub trait Vm: Send + Sync {
    /// Maps `size` bytes of host memory at `host_address` as guest physical `guest_address..`,
    /// in memory slot `slot`.
    ///
    /// # Safety
    /// `host_address..host_address + size` must be a live, writable mapping that outlives the VM
    /// (or the slot's removal).
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_address: u64,
        size: u64,
        host_address: u64,
    ) -> Result<()>;
    /// Creates the platform interrupt controllers and timer: in-kernel PIC, IOAPIC, local APICs
    /// and PIT on KVM.
    fn create_platform_devices(&self) -> Result<()>;
    /// Makes every write to `event` raise interrupt line `gsi`.
    #[cfg(target_os = "linux")]
    fn register_irqfd(&self, event: &vmm_sys_util::eventfd::EventFd, gsi: u32) -> Result<()>;
    /// Creates vCPU number `index` (also its APIC ID). The platform devices must exist first.
    fn create_vcpu(&self, index: u32) -> Result<Box<dyn Vcpu>>;
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
pub trait Vcpu: Send {
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
