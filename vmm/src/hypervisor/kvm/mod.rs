//! The KVM implementation of the hypervisor seam (`/dev/kvm` through `kvm-ioctls`).

mod convert;
mod dirty_log;
mod irq;
mod msrs;
mod state_convert;
mod vcpu;
mod vcpu_state;
mod vm;
mod vm_state;

use std::io;

use arch::regs::CpuidEntry;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm};

use super::{Hypervisor, HypervisorError, Result, Vm};

pub use vcpu::KvmVcpu;
pub use vcpu_state::read_host_facts;
pub use vm::KvmVm;

const KVM_PATH: &str = "/dev/kvm";

/// An open `/dev/kvm`.
#[derive(Debug)]
pub struct KvmHypervisor {
    kvm: Kvm,
}

impl KvmHypervisor {
    /// Opens `/dev/kvm` and checks the capabilities skiff relies on.
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            libc::ENOENT => HypervisorError::NotPresent {
                path: KVM_PATH.into(),
            },
            libc::EACCES | libc::EPERM => HypervisorError::NoPermission {
                path: KVM_PATH.into(),
            },
            errno => HypervisorError::Open {
                path: KVM_PATH.into(),
                source: io::Error::from_raw_os_error(errno),
            },
        })?;
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(HypervisorError::MissingCapability(name));
            }
        }
        Ok(Self { kvm })
    }
}

impl Hypervisor for KvmHypervisor {
    fn create_vm(&self) -> Result<Box<dyn Vm>> {
        let fd = self
            .kvm
            .create_vm()
            .map_err(|e| HypervisorError::ioctl("KVM_CREATE_VM", e))?;
        Ok(Box::new(KvmVm::new(fd)))
    }

    fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    fn max_memory_slots(&self) -> usize {
        self.kvm.get_nr_memslots()
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| HypervisorError::ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
        Ok(cpuid
            .as_slice()
            .iter()
            .map(convert::cpuid_from_kvm)
            .collect())
    }
}
