//! A KVM VM: memory slots, the in-kernel irqchip and PIT, irqfds, ioeventfds and MSI routes
//! (those two in `irq.rs`), vCPU creation.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::vcpu::KvmVcpu;
use crate::hypervisor::{HypervisorError, MsiRoute, MsiRouting, Result, Vcpu, Vm};

/// Where KVM places the three-page TSS it needs for real-mode emulation on Intel: inside the MMIO
/// hole, above the local APIC, clear of RAM and devices.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// A KVM VM file descriptor.
#[derive(Debug)]
pub struct KvmVm {
    pub(super) fd: VmFd,
}

impl KvmVm {
    pub(super) fn new(fd: VmFd) -> Self {
        Self { fd }
    }
}

impl Vm for KvmVm {
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_address: u64,
        size: u64,
        host_address: u64,
    ) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_address,
            memory_size: size,
            userspace_addr: host_address,
        };
        // SAFETY: the caller guarantees the host range is a live mapping that outlives the VM.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|e| HypervisorError::op("KVM_SET_USER_MEMORY_REGION", e))
    }

    fn create_platform_devices(&self) -> Result<()> {
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| HypervisorError::op("KVM_SET_TSS_ADDR", e))?;
        self.fd
            .create_irq_chip()
            .map_err(|e| HypervisorError::op("KVM_CREATE_IRQCHIP", e))?;
        // The speaker port is left to a dummy so that Linux's PIT calibration through port 0x61
        // works without a userspace device.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(|e| HypervisorError::op("KVM_CREATE_PIT2", e))
    }

    fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(event, gsi)
            .map_err(|e| HypervisorError::op("KVM_IRQFD", e))
    }

    fn register_ioevent(&self, event: &EventFd, address: u64, len: u32) -> Result<()> {
        super::irq::register_mmio_ioevent(&self.fd, event, address, len)
    }

    fn set_msi_routes(&self, routes: &[MsiRoute]) -> Result<()> {
        super::irq::set_msi_routes(&self.fd, routes)
    }

    fn msi_routing(&self) -> Result<std::sync::Arc<dyn MsiRouting>> {
        Ok(std::sync::Arc::new(super::irq::KvmMsiRouting::new(
            &self.fd,
        )?))
    }

    fn create_vcpu(&self, index: u32) -> Result<Box<dyn Vcpu>> {
        let fd = self
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|e| HypervisorError::op("KVM_CREATE_VCPU", e))?;
        Ok(Box::new(KvmVcpu::new(fd)))
    }
}
