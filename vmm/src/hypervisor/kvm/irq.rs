//! KVM interrupt and notification plumbing beyond the irqchip itself: MMIO ioeventfds (a guest
//! write signals an eventfd in the kernel) and the GSI routing table with MSI routes.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so every update carries KVM's default
//! routes too: the ones `KVM_CREATE_IRQCHIP` installs (kernel `kvm_setup_default_irq_routing`):
//! GSIs 0..16 to the PIC pin of the same number (master for 0..8, slave for 8..16) and GSIs
//! 0..24 to the IOAPIC pin of the same number.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};

use kvm_bindings::{
    kvm_ioeventfd, kvm_ioeventfd_flag_nr_deassign, kvm_irq_routing_entry, KvmIrqRouting, KVMIO,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use super::dirty_log::SlotTable;
use crate::hypervisor::{HypervisorError, IoEvents, MsiRoute, MsiRouting, Result, FIRST_MSI_GSI};

/// Pins of the in-kernel IOAPIC.
const IOAPIC_PINS: u32 = 24;
/// Pins of the two cascaded in-kernel PICs.
const PIC_PINS: u32 = 16;

const _: () = assert!(FIRST_MSI_GSI == IOAPIC_PINS);

ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
ioctl_iow_nr!(
    KVM_SET_GSI_ROUTING,
    KVMIO,
    0x6a,
    kvm_bindings::kvm_irq_routing
);

/// Binds (or with `deassign`, unbinds) `event` to guest writes of any width at MMIO `address`,
/// with no data match. KVM finds the binding to remove by eventfd, address, length, data match
/// and flags, so an unbind must be made with the same values as the bind: both come from here.
fn mmio_ioevent(vm: &File, event: &EventFd, address: u64, deassign: bool) -> Result<()> {
    let arg = kvm_ioeventfd {
        addr: address,
        len: 0,
        fd: event.as_raw_fd(),
        // No data match, MMIO (not PIO).
        flags: if deassign {
            1 << kvm_ioeventfd_flag_nr_deassign
        } else {
            0
        },
        ..Default::default()
    };
    // SAFETY: `vm` is a KVM VM descriptor and `arg` a fully initialised `kvm_ioeventfd` that the
    // kernel only reads; `event` stays open as long as the caller keeps it (KVM holds its own
    // reference to the eventfd).
    let rc = unsafe { ioctl_with_ref(vm, KVM_IOEVENTFD(), &arg) };
    if rc < 0 {
        return Err(HypervisorError::IoEvent {
            address,
            deassign,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn irqchip_entry(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = irqchip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_entry(route: &MsiRoute) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi: route.gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = route.address as u32;
    e.u.msi.address_hi = (route.address >> 32) as u32;
    e.u.msi.data = route.data;
    e
}

/// KVM's default irqchip routes.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::with_capacity((IOAPIC_PINS + PIC_PINS) as usize);
    for gsi in 0..IOAPIC_PINS {
        routes.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < PIC_PINS {
            let pic = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push(irqchip_entry(gsi, pic, gsi % 8));
        }
    }
    routes
}

/// The full routing table: the default routes, then one entry per MSI route.
fn routing_table(routes: &[MsiRoute]) -> Result<Vec<kvm_irq_routing_entry>> {
    if let Some(r) = routes.iter().find(|r| r.gsi < FIRST_MSI_GSI) {
        return Err(HypervisorError::MsiRouteOnPin { gsi: r.gsi });
    }
    let mut table = default_routes();
    table.extend(routes.iter().map(msi_entry));
    Ok(table)
}

/// Installs the default routes plus `routes`.
pub(super) fn set_msi_routes(vm: &VmFd, routes: &[MsiRoute]) -> Result<()> {
    let table = routing_table(routes)?;
    let routing =
        KvmIrqRouting::from_entries(&table).map_err(|_| HypervisorError::ListTooLong {
            what: "interrupt routes",
            count: table.len(),
        })?;
    vm.set_gsi_routing(&routing)
        .map_err(|e| HypervisorError::ioctl("KVM_SET_GSI_ROUTING", e))
}

/// A duplicate of the VM's descriptor, so a handle can be shared with device models on any
/// thread while the `KvmVm` itself stays with its owner.
fn duplicate(vm: &VmFd) -> Result<File> {
    // SAFETY: the descriptor belongs to `vm`, which is open for the duration of this call.
    let borrowed = unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) };
    let owned = borrowed
        .try_clone_to_owned()
        .map_err(HypervisorError::DuplicateVm)?;
    Ok(File::from(owned))
}

/// Binds and unbinds MMIO ioeventfds through a duplicate of the VM's descriptor.
#[derive(Debug)]
pub(super) struct KvmIoEvents {
    vm: File,
    /// Keeps every memory slot's host memory mapped while `vm` can reach the VM.
    _slots: SlotTable,
}

impl KvmIoEvents {
    pub(super) fn new(vm: &VmFd, slots: SlotTable) -> Result<Self> {
        Ok(Self {
            vm: duplicate(vm)?,
            _slots: slots,
        })
    }
}

impl IoEvents for KvmIoEvents {
    fn register(&self, event: &EventFd, address: u64) -> Result<()> {
        mmio_ioevent(&self.vm, event, address, false)
    }

    fn unregister(&self, event: &EventFd, address: u64) -> Result<()> {
        mmio_ioevent(&self.vm, event, address, true)
    }
}

/// Sets the routes through a duplicate of the VM's descriptor, so it can be shared with device
/// models on any thread while the `KvmVm` itself stays with its owner.
#[derive(Debug)]
pub(super) struct KvmMsiRouting {
    vm: File,
    /// Keeps every memory slot's host memory mapped while `vm` can reach the VM.
    _slots: SlotTable,
}

impl KvmMsiRouting {
    pub(super) fn new(vm: &VmFd, slots: SlotTable) -> Result<Self> {
        Ok(Self {
            vm: duplicate(vm)?,
            _slots: slots,
        })
    }
}

impl MsiRouting for KvmMsiRouting {
    fn set_msi_routes(&self, routes: &[MsiRoute]) -> Result<()> {
        let table = routing_table(routes)?;
        let routing =
            KvmIrqRouting::from_entries(&table).map_err(|_| HypervisorError::ListTooLong {
                what: "interrupt routes",
                count: table.len(),
            })?;
        // SAFETY: `self.vm` is a KVM VM descriptor; the kernel reads the routing header and its
        // `nr` entries, which `routing` holds.
        let rc =
            unsafe { ioctl_with_ref(&self.vm, KVM_SET_GSI_ROUTING(), routing.as_fam_struct_ref()) };
        if rc < 0 {
            return Err(HypervisorError::ioctl(
                "KVM_SET_GSI_ROUTING",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn irqchip(e: &kvm_irq_routing_entry) -> (u32, u32, u32) {
        assert_eq!(e.type_, KVM_IRQ_ROUTING_IRQCHIP);
        // SAFETY: irqchip entries hold the `irqchip` member of the union.
        let chip = unsafe { e.u.irqchip };
        (e.gsi, chip.irqchip, chip.pin)
    }

    #[test]
    fn default_table_matches_kvm() {
        let t = default_routes();
        assert_eq!(t.len(), 40, "24 IOAPIC pins + 16 PIC pins");
        let all: Vec<_> = t.iter().map(irqchip).collect();
        assert!(all.contains(&(0, KVM_IRQCHIP_IOAPIC, 0)));
        assert!(all.contains(&(0, KVM_IRQCHIP_PIC_MASTER, 0)));
        assert!(all.contains(&(4, KVM_IRQCHIP_PIC_MASTER, 4)));
        assert!(all.contains(&(9, KVM_IRQCHIP_PIC_SLAVE, 1)));
        assert!(all.contains(&(15, KVM_IRQCHIP_PIC_SLAVE, 7)));
        assert!(all.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
        assert!(!all
            .iter()
            .any(|&(g, chip, _)| g >= 16 && chip != KVM_IRQCHIP_IOAPIC));
    }

    #[test]
    fn msi_routes_follow_the_defaults() {
        let t = routing_table(&[MsiRoute {
            gsi: 24,
            address: 0x1_fee0_1000,
            data: 0x4041,
        }])
        .unwrap();
        let e = t.last().unwrap();
        assert_eq!((e.gsi, e.type_), (24, KVM_IRQ_ROUTING_MSI));
        // SAFETY: MSI entries hold the `msi` member of the union.
        let msi = unsafe { e.u.msi };
        assert_eq!(
            (msi.address_lo, msi.address_hi, msi.data),
            (0xfee0_1000, 1, 0x4041)
        );
        let refused = routing_table(&[MsiRoute {
            gsi: 23,
            address: 0,
            data: 0,
        }])
        .unwrap_err();
        assert!(
            refused.to_string().contains("GSI 23"),
            "the message names the GSI: {refused}"
        );
    }
}
