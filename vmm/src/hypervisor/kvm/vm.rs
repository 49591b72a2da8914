//! A KVM VM: memory slots, the in-kernel irqchip and PIT, irqfds, ioeventfds and MSI routes
//! (those two in `irq.rs`), vCPU creation, and the slot table dirty logging uses
//! (`dirty_log.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::dirty_log::{record_slot, KvmDirtyLog, Slot, SlotTable};
use super::vcpu::KvmVcpu;
use crate::hypervisor::{
    DirtyLog, HypervisorError, IoEvents, MsiRoute, MsiRouting, Result, Vcpu, Vm,
};
use crate::memory::SlotMemory;

/// Where KVM places the three-page TSS it needs for real-mode emulation on Intel: inside the MMIO
/// hole, above the local APIC, clear of RAM and devices.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// A KVM VM file descriptor.
#[derive(Debug)]
pub struct KvmVm {
    pub(super) fd: VmFd,
    /// Every memory slot registered, with its memory: for dirty logging (`dirty_log.rs`), and
    /// shared with every handle that can reach the VM in the kernel, so each slot's memory
    /// stays mapped as long as the guest can use it. Declared after `fd`, so dropped after it.
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
    fn map_memory(&self, slot: u32, guest_address: u64, memory: Arc<dyn SlotMemory>) -> Result<()> {
        let flags = if self.tracking.load(Ordering::Acquire) {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        let record = Slot {
            slot,
            guest_address,
            memory,
        };
        let region = record.region(flags);
        // SAFETY: the range is `record.memory`, a readable and writable mapping (`SlotMemory`'s
        // contract) that the slot table keeps mapped; every holder of a kernel reference to
        // this VM (its descriptor, each duplicate, each vCPU) holds the table, so the mapping
        // outlives the slot.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|e| {
            HypervisorError::MapMemory {
                slot,
                guest_address,
                size: region.memory_size,
                source: e.into(),
            }
        })?;
        record_slot(&self.slots, record);
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
        Ok(Arc::new(super::irq::KvmIoEvents::new(
            &self.fd,
            self.slots.clone(),
        )?))
    }

    fn set_msi_routes(&self, routes: &[MsiRoute]) -> Result<()> {
        super::irq::set_msi_routes(&self.fd, routes)
    }

    fn msi_routing(&self) -> Result<std::sync::Arc<dyn MsiRouting>> {
        Ok(std::sync::Arc::new(super::irq::KvmMsiRouting::new(
            &self.fd,
            self.slots.clone(),
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
        Ok(Box::new(KvmVcpu::new(fd, self.slots.clone())))
    }

    fn dirty_log(&self) -> Result<Arc<dyn DirtyLog>> {
        Ok(Arc::new(KvmDirtyLog::new(
            &self.fd,
            self.slots.clone(),
            self.tracking.clone(),
        )?))
    }
}
