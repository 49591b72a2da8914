//! A KVM VM: memory slots, the in-kernel irqchip and PIT, irqfds, ioeventfds and MSI routes
//! (those two in `irq.rs`), vCPU creation, and the slot table dirty logging uses
//! (`dirty_log.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::dirty_log::{record_slot, KvmDirtyLog, Slot, SlotTable};
use super::vcpu::KvmVcpu;
use crate::hypervisor::{
    DirtyLog, HypervisorError, IoEvents, MsiRoute, MsiRouting, Result, Vcpu, Vm,
};

/// Where KVM places the three-page TSS it needs for real-mode emulation on Intel: inside the MMIO
/// hole, above the local APIC, clear of RAM and devices.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// A KVM VM file descriptor.
#[derive(Debug)]
pub struct KvmVm {
    pub(super) fd: VmFd,
    /// Every memory slot registered, for dirty logging (`dirty_log.rs`).
    slots: SlotTable,
    /// Whether the slots log dirty pages (shared with every `dirty_log` handle).
    tracking: Arc<AtomicBool>,
}

impl KvmVm {
    pub(super) fn new(fd: VmFd) -> Self {
        Self {
            fd,
            slots: SlotTable::default(),
            tracking: Arc::default(),
        }
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
        let flags = if self.tracking.load(Ordering::Acquire) {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: guest_address,
            memory_size: size,
            userspace_addr: host_address,
        };
        // SAFETY: the caller guarantees the host range is a live mapping that outlives the VM.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|e| {
            HypervisorError::MapMemory {
                slot,
                guest_address,
                size,
                source: e.into(),
            }
        })?;
        record_slot(
            &self.slots,
            Slot {
                slot,
                guest_address,
                size,
                host_address,
            },
        );
        Ok(())
    }

    fn create_platform_devices(&self) -> Result<()> {
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_TSS_ADDR", e))?;
        self.fd
            .create_irq_chip()
            .map_err(|e| HypervisorError::ioctl("KVM_CREATE_IRQCHIP", e))?;
        // The speaker port is left to a dummy so that Linux's PIT calibration through port 0x61
        // works without a userspace device.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(|e| HypervisorError::ioctl("KVM_CREATE_PIT2", e))
    }

    fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(event, gsi)
            .map_err(|e| HypervisorError::Irqfd {
                gsi,
                source: e.into(),
            })
    }

    fn ioevents(&self) -> Result<Arc<dyn IoEvents>> {
        Ok(Arc::new(super::irq::KvmIoEvents::new(&self.fd)?))
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
        let fd =
            self.fd
                .create_vcpu(u64::from(index))
                .map_err(|e| HypervisorError::CreateVcpu {
                    index,
                    source: e.into(),
                })?;
        Ok(Box::new(KvmVcpu::new(fd)))
    }

    fn dirty_log(&self) -> Result<Arc<dyn DirtyLog>> {
        Ok(Arc::new(KvmDirtyLog::new(
            &self.fd,
            self.slots.clone(),
            self.tracking.clone(),
        )?))
    }
}
