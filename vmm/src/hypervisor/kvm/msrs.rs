//! Reading and writing a KVM vCPU's MSRs in the chunks KVM accepts: boot set-up (`vcpu.rs`)
//! and snapshots (`vcpu_state.rs`) both go through here.

use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MAX_MSR_ENTRIES};
use kvm_ioctls::VcpuFd;

use crate::hypervisor::state::MsrValue;
use crate::hypervisor::{HypervisorError, Result};

fn op(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> HypervisorError {
    move |e| HypervisorError::ioctl(what, e)
}

/// Reads every MSR in `indices` that KVM can read. KVM_GET_MSRS stops at the first MSR it
/// cannot read (some listed MSRs depend on CPUID features the guest lacks); that one is skipped
/// and the read goes on after it.
pub(super) fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<MsrValue>> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<_> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| HypervisorError::ListTooLong {
            what: "MSRs",
            count: entries.len(),
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(op("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice().iter().take(n).map(|m| MsrValue {
            index: m.index,
            data: m.data,
        }));
        let consumed = if n < chunk.len() { n + 1 } else { n };
        rest = &rest[consumed.min(rest.len())..];
    }
    Ok(out)
}

/// Writes `msrs` in chunks KVM accepts; fails naming the first MSR the host refused.
pub(super) fn write_msrs(fd: &VcpuFd, msrs: &[MsrValue]) -> Result<()> {
    for chunk in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<_> = chunk
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let list = Msrs::from_entries(&entries).map_err(|_| HypervisorError::ListTooLong {
            what: "MSRs",
            count: entries.len(),
        })?;
        let written = fd.set_msrs(&list).map_err(op("KVM_SET_MSRS"))?;
        if written != entries.len() {
            let refused = entries.get(written);
            return Err(HypervisorError::MsrRefused {
                index: refused.map_or(0, |e| e.index),
                data: refused.map_or(0, |e| e.data),
            });
        }
    }
    Ok(())
}
