//! A KVM vCPU: run and translate exits, get and set registers, CPUID, MSRs, FPU and LAPIC LINTs.

use arch::regs::{CpuidEntry, MsrEntry, SpecialRegisters, StandardRegisters};
use kvm_bindings::{kvm_fpu, CpuId, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit as KvmExit, VcpuFd};

use super::convert;
use super::dirty_log::SlotTable;
use crate::hypervisor::state::MsrValue;
use crate::hypervisor::{HypervisorError, Result, Vcpu, VcpuExit};

/// Offsets of the LVT LINT0/LINT1 registers in the local APIC page.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
/// LVT delivery modes (bits 10:8).
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// A KVM vCPU file descriptor.
#[derive(Debug)]
pub struct KvmVcpu {
    pub(super) fd: VcpuFd,
    /// Keeps every memory slot's host memory mapped while this vCPU (which holds a kernel
    /// reference to its VM) can run. Declared after `fd`, so dropped after it.
    _slots: SlotTable,
}

impl KvmVcpu {
    pub(super) fn new(fd: VcpuFd, slots: SlotTable) -> Self {
        Self { fd, _slots: slots }
    }
}

fn lapic_reg(regs: &[std::os::raw::c_char], offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        regs[offset + i] = b as std::os::raw::c_char;
    }
}

fn with_delivery_mode(lvt: u32, mode: u32) -> u32 {
    (lvt & !0x700) | (mode << 8)
}

impl Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                KvmExit::IoIn(port, data) => VcpuExit::IoIn { port, data },
                KvmExit::IoOut(port, data) => VcpuExit::IoOut { port, data },
                KvmExit::MmioRead(address, data) => VcpuExit::MmioRead { address, data },
                KvmExit::MmioWrite(address, data) => VcpuExit::MmioWrite { address, data },
                KvmExit::Hlt => VcpuExit::Halt,
                KvmExit::Shutdown => VcpuExit::Shutdown,
                KvmExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => VcpuExit::SystemReset,
                KvmExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => VcpuExit::SystemPowerOff,
                KvmExit::InternalError => VcpuExit::InternalError,
                KvmExit::FailEntry(reason, _) => VcpuExit::FailEntry { reason },
                KvmExit::Intr => VcpuExit::Interrupted,
                other => VcpuExit::Unhandled(format!("{other:?}")),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(VcpuExit::Interrupted)
            }
            Err(e) => Err(HypervisorError::ioctl("KVM_RUN", e)),
        }
    }

    fn internal_error_info(&mut self) -> (u32, String) {
        let run = self.fd.get_kvm_run();
        // SAFETY: called right after KVM_EXIT_INTERNAL_ERROR, so the kernel filled the `internal`
        // member of the exit union; `ndata` is clamped to the array length below.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let reason = match internal.suberror {
            1 => "emulation failure",
            2 => "simultaneous exception",
            3 => "delivery event",
            4 => "unexpected exit reason",
            _ => "unknown",
        };
        (
            internal.suberror,
            format!(
                "{reason} (suberror {}, data {:x?})",
                internal.suberror,
                &internal.data[..n]
            ),
        )
    }

    fn regs(&self) -> Result<StandardRegisters> {
        let r = self
            .fd
            .get_regs()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_REGS", e))?;
        Ok(convert::regs_from_kvm(&r))
    }

    fn set_regs(&self, regs: &StandardRegisters) -> Result<()> {
        self.fd
            .set_regs(&convert::regs_to_kvm(regs))
            .map_err(|e| HypervisorError::ioctl("KVM_SET_REGS", e))
    }

    fn sregs(&self) -> Result<SpecialRegisters> {
        let s = self
            .fd
            .get_sregs()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_SREGS", e))?;
        Ok(convert::sregs_from_kvm(&s))
    }

    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<()> {
        let base = self
            .fd
            .get_sregs()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_SREGS", e))?;
        self.fd
            .set_sregs(&convert::sregs_to_kvm(sregs, &base))
            .map_err(|e| HypervisorError::ioctl("KVM_SET_SREGS", e))
    }

    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()> {
        let kvm_entries: Vec<_> = entries.iter().map(convert::cpuid_to_kvm).collect();
        let cpuid =
            CpuId::from_entries(&kvm_entries).map_err(|_| HypervisorError::ListTooLong {
                what: "CPUID leaves",
                count: kvm_entries.len(),
            })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_CPUID2", e))
    }

    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()> {
        let values: Vec<MsrValue> = msrs
            .iter()
            .map(|m| MsrValue {
                index: m.index,
                data: m.data,
            })
            .collect();
        super::msrs::write_msrs(&self.fd, &values)
    }

    fn reset_fpu(&self) -> Result<()> {
        // x87 control word and MXCSR at their architectural reset values.
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd
            .set_fpu(&fpu)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_FPU", e))
    }

    fn setup_lapic_lint(&self) -> Result<()> {
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_LAPIC", e))?;
        let lint0 = lapic_reg(&lapic.regs, APIC_LVT_LINT0);
        set_lapic_reg(
            &mut lapic.regs,
            APIC_LVT_LINT0,
            with_delivery_mode(lint0, APIC_MODE_EXTINT),
        );
        let lint1 = lapic_reg(&lapic.regs, APIC_LVT_LINT1);
        set_lapic_reg(
            &mut lapic.regs,
            APIC_LVT_LINT1,
            with_delivery_mode(lint1, APIC_MODE_NMI),
        );
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_LAPIC", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mode_replaces_only_bits_10_to_8() {
        assert_eq!(with_delivery_mode(0x0001_0700, APIC_MODE_NMI), 0x0001_0400);
        assert_eq!(
            with_delivery_mode(0x0000_00ff, APIC_MODE_EXTINT),
            0x0000_07ff
        );
    }

    #[test]
    fn lapic_register_bytes_round_trip() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lapic_reg(&mut regs, APIC_LVT_LINT1, 0xdead_beef);
        assert_eq!(lapic_reg(&regs, APIC_LVT_LINT1), 0xdead_beef);
        assert_eq!(lapic_reg(&regs, APIC_LVT_LINT0), 0);
    }
}
