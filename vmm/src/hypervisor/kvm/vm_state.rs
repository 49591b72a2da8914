//! Saving and restoring a KVM VM's own state for snapshots: the in-kernel PIC pair, IOAPIC and
//! PIT, and the kvmclock. The `VmSnapshot` implementation; the field conversions are in
//! `state_convert.rs`, the vCPUs' state in `vcpu_state.rs`.

use kvm_bindings::{
    kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;

use super::state_convert as sc;
use super::vm::KvmVm;
use crate::hypervisor::state::VmState;
use crate::hypervisor::{HypervisorError, Result, VmSnapshot};

fn get_chip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip)
        .map_err(|e| HypervisorError::ioctl("KVM_GET_IRQCHIP", e))?;
    Ok(chip)
}

impl VmSnapshot for KvmVm {
    fn save_state(&self) -> Result<VmState> {
        let fd = &self.fd;
        let master = get_chip(fd, KVM_IRQCHIP_PIC_MASTER)?;
        let slave = get_chip(fd, KVM_IRQCHIP_PIC_SLAVE)?;
        let ioapic = get_chip(fd, KVM_IRQCHIP_IOAPIC)?;
        let pit = fd
            .get_pit2()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_PIT2", e))?;
        // The clock is read with every vCPU paused, so it is the guest's time at the pause.
        let clock = fd
            .get_clock()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_CLOCK", e))?;
        // SAFETY: KVM filled the union member named by `chip_id` (PIC); every member is a plain
        // integer struct, valid for any bit pattern.
        let pic_master = sc::pic_from_kvm(unsafe { &master.chip.pic });
        // SAFETY: as above.
        let pic_slave = sc::pic_from_kvm(unsafe { &slave.chip.pic });
        // SAFETY: as above (IOAPIC).
        let ioapic = sc::ioapic_from_kvm(unsafe { &ioapic.chip.ioapic });
        Ok(VmState {
            pic_master,
            pic_slave,
            ioapic,
            pit: sc::pit_from_kvm(&pit),
            clock: sc::clock_from_kvm(&clock),
        })
    }

    fn restore_devices(&self, state: &VmState) -> Result<()> {
        let fd = &self.fd;
        state
            .validate()
            .map_err(|e| HypervisorError::InvalidState {
                what: "VM",
                source: Box::new(e),
            })?;
        // The chips exist once `create_platform_devices` ran; their state goes in before any
        // vCPU runs, so no interrupt is routed through a half-restored controller.
        let mut chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_PIC_MASTER,
            ..Default::default()
        };
        chip.chip.pic = sc::pic_to_kvm(&state.pic_master);
        fd.set_irqchip(&chip)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_IRQCHIP (PIC master)", e))?;
        let mut chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_PIC_SLAVE,
            ..Default::default()
        };
        chip.chip.pic = sc::pic_to_kvm(&state.pic_slave);
        fd.set_irqchip(&chip)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_IRQCHIP (PIC slave)", e))?;
        let mut chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        chip.chip.ioapic = sc::ioapic_to_kvm(&state.ioapic);
        fd.set_irqchip(&chip)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_IRQCHIP (IOAPIC)", e))?;
        fd.set_pit2(&sc::pit_to_kvm(&state.pit))
            .map_err(|e| HypervisorError::ioctl("KVM_SET_PIT2", e))
    }

    fn restore_clock(&self, state: &VmState) -> Result<()> {
        // Last, after every vCPU's TSC MSR: KVM derives each vCPU's kvmclock from its TSC and
        // the VM's clock offset, and this call sets that offset so the guest reads exactly the
        // saved time (no KVM_CLOCK_REALTIME: the guest sees no jump, as after a pause).
        self.fd
            .set_clock(&sc::clock_to_kvm(&state.clock))
            .map_err(|e| HypervisorError::ioctl("KVM_SET_CLOCK", e))
    }
}
