//! Model-specific registers set on every vCPU before boot.
//!
//! This module owns the boot MSR list: the values a freshly reset guest should see for the
//! syscall/sysenter MSRs, `IA32_MISC_ENABLE` and the MTRR default type. It deliberately leaves
//! out the TSC (KVM keeps the vCPUs' TSCs in step by itself, and writing 0 to each vCPU
//! separately would skew them) and anything a hypervisor backend sets for its own reasons.

use crate::regs::MsrEntry;

/// `IA32_SYSENTER_CS`.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// `IA32_SYSENTER_ESP`.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// `IA32_SYSENTER_EIP`.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// `IA32_MISC_ENABLE`.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// `IA32_MTRR_DEF_TYPE`.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// `IA32_STAR`: syscall/sysret segment selectors.
pub const MSR_STAR: u32 = 0xc000_0081;
/// `IA32_LSTAR`: 64-bit syscall entry.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// `IA32_CSTAR`: compatibility-mode syscall entry.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// `IA32_FMASK`: RFLAGS mask on syscall.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// `IA32_KERNEL_GS_BASE`: the GS base `swapgs` exchanges.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// `IA32_MISC_ENABLE` bit 0: fast-string operations (`rep movs`/`stos`) enabled, as firmware
/// leaves it; Linux warns and runs slower string copies when it is clear.
pub const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// `IA32_MTRR_DEF_TYPE` bit 11: MTRRs enabled.
pub const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back.
pub const MTRR_MEM_TYPE_WB: u64 = 6;

/// The MSRs to set on each vCPU before it first runs.
///
/// The syscall and sysenter MSRs start at 0 so that nothing a previous run (or a snapshot taken
/// elsewhere) left in them survives a fresh boot. MTRRs are enabled with write-back as the
/// default type and no variable ranges: with MTRRs reported disabled, Linux also turns PAT off
/// ("MTRRs disabled, skipping PAT initialization too") and loses write-combining mappings.
pub fn boot_msrs() -> Vec<MsrEntry> {
    let zero = |index| MsrEntry { index, data: 0 };
    vec![
        zero(MSR_IA32_SYSENTER_CS),
        zero(MSR_IA32_SYSENTER_ESP),
        zero(MSR_IA32_SYSENTER_EIP),
        zero(MSR_STAR),
        zero(MSR_LSTAR),
        zero(MSR_CSTAR),
        zero(MSR_SYSCALL_MASK),
        zero(MSR_KERNEL_GS_BASE),
        MsrEntry {
            index: MSR_IA32_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
        },
        MsrEntry {
            index: MSR_MTRR_DEF_TYPE,
            data: MTRR_ENABLE | MTRR_MEM_TYPE_WB,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn boot_msr_values() {
        let msrs: HashMap<u32, u64> = boot_msrs().iter().map(|m| (m.index, m.data)).collect();
        assert_eq!(msrs.len(), boot_msrs().len(), "duplicate MSR index");
        assert_eq!(msrs[&0x2ff], 0x806);
        assert_eq!(msrs[&0x1a0], 1);
        for index in [
            0x174,
            0x175,
            0x176,
            0xc000_0081,
            0xc000_0082,
            0xc000_0083,
            0xc000_0084,
            0xc000_0102,
        ] {
            assert_eq!(msrs.get(&index), Some(&0), "MSR {index:#x}");
        }
        // The TSC (0x10) is left to the hypervisor.
        assert!(!msrs.contains_key(&0x10));
    }
}
