//! vCPU threads: `KVM_RUN` and the device handlers its exits reach.
//!
//! Besides running the vCPU, a vCPU thread reads its state when the VM pauses for a snapshot,
//! reprograms interrupt routes and ioeventfds when the guest moves a BAR or writes an MSI-X
//! entry, and activates a virtio device when the guest sets DRIVER_OK: a disk's activation
//! creates its eventfds, epoll and io_uring and starts its thread (and, without io_uring, its
//! worker pool). Threads started here run under this filter as well as their own, so the disk
//! thread's and the disk workers' calls are allowed here too (`disk::activation`).

use seccompiler::BackendError;
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

#[cfg(target_arch = "x86_64")]
use kvm_bindings::kvm_cpuid2;
use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_ioeventfd, kvm_irq_routing, kvm_irqfd, kvm_lapic_state,
    kvm_mp_state, kvm_msi, kvm_msrs, kvm_nested_state, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, KVMIO,
};

use super::{disk, AllowList};

ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
ioctl_io_nr!(KVM_KVMCLOCK_CTRL, KVMIO, 0xad);
ioctl_iowr_nr!(KVM_GET_NESTED_STATE, KVMIO, 0xbe, kvm_nested_state);
ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_xsave);

/// `TUNSETOFFLOAD` (`_IOW('T', 208, unsigned int)`).
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `TUNSETVNETHDRSZ` (`_IOW('T', 216, int)`).
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// The `ioctl` requests a vCPU thread makes: on its vCPU fd (run, and the state a snapshot
/// reads), on the VM fd (interrupt routes, irqfds, ioeventfds, MSIs its device handlers set),
/// and on a tap when virtio-net is activated.
fn ioctl_requests() -> Vec<u64> {
    [
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_GET_SREGS(),
        KVM_GET_MSRS(),
        KVM_GET_FPU(),
        KVM_GET_LAPIC(),
        KVM_GET_CPUID2(),
        KVM_GET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_GET_TSC_KHZ(),
        KVM_GET_XSAVE(),
        KVM_GET_XSAVE2(),
        KVM_GET_XCRS(),
        KVM_GET_NESTED_STATE(),
        KVM_KVMCLOCK_CTRL(),
        KVM_CHECK_EXTENSION(),
        KVM_SET_GSI_ROUTING(),
        KVM_IRQFD(),
        KVM_IOEVENTFD(),
        KVM_SIGNAL_MSI(),
        libc::FIONBIO,
        // virtio-net activation: the tap's offloads follow the features the driver accepted.
        TUNSETOFFLOAD,
        TUNSETVNETHDRSZ,
    ]
    .to_vec()
}

pub(super) fn add(list: &mut AllowList) -> Result<(), BackendError> {
    list.call_if_arg(libc::SYS_ioctl, 1, &ioctl_requests())?;
    list.calls(&[
        // Eventfds (device kicks, completions), the serial port's output.
        libc::SYS_read,
        // A pause or stop wakes the event loop with a signal.
        libc::SYS_tgkill,
        // vhost-user messages on sockets already open (a vring call fd switched when the guest
        // masks or unmasks an MSI-X vector).
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
    ]);
    disk::activation(list)
}
