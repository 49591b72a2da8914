//! Decoding `WHV_RUN_VP_EXIT_CONTEXT`, what `WHvRunVirtualProcessor` fills in, into the neutral
//! `RawExit`. Windows only (it reads the `windows` crate's structures); its tests build exit
//! contexts by hand, so they run under wine without a hypervisor.

use windows::Win32::System::Hypervisor as whv;
use windows::Win32::System::Hypervisor::WHV_RUN_VP_EXIT_CONTEXT;

use super::exit::RawExit;

/// `WHV_X64_IO_PORT_ACCESS_INFO` bits: IsWrite (0), AccessSize (3:1), StringOp (4), RepPrefix (5).
const IO_WRITE: u32 = 1;
const IO_SIZE_SHIFT: u32 = 1;
const IO_SIZE_MASK: u32 = 0x7;
const IO_STRING: u32 = 1 << 4;
const IO_REP: u32 = 1 << 5;
/// `WHV_VP_EXIT_CONTEXT` bit field: InstructionLength in bits 3:0.
const INSTRUCTION_LENGTH_MASK: u8 = 0xf;

/// The neutral form of `context`.
pub fn raw_exit(context: &WHV_RUN_VP_EXIT_CONTEXT) -> RawExit {
    let vp = &context.VpContext;
    let rip = vp.Rip;
    let instruction_length = vp._bitfield & INSTRUCTION_LENGTH_MASK;
    match context.ExitReason {
        whv::WHvRunVpExitReasonX64IoPortAccess => {
            // SAFETY: WHP fills the IoPortAccess member for this exit reason; it is plain data.
            let io = unsafe { context.Anonymous.IoPortAccess };
            // SAFETY: AsUINT32 covers the whole union; every bit pattern is a valid u32.
            let info = unsafe { io.AccessInfo.AsUINT32 };
            RawExit::PortAccess {
                port: io.PortNumber,
                size: ((info >> IO_SIZE_SHIFT) & IO_SIZE_MASK) as u8,
                write: info & IO_WRITE != 0,
                string: info & IO_STRING != 0,
                rep: info & IO_REP != 0,
                rax: io.Rax,
                rip,
                instruction_length,
            }
        }
        whv::WHvRunVpExitReasonX64Cpuid => {
            // SAFETY: WHP fills the CpuidAccess member for this exit reason; it is plain data.
            let c = unsafe { context.Anonymous.CpuidAccess };
            RawExit::Cpuid {
                leaf: c.Rax as u32,
                subleaf: c.Rcx as u32,
                default: [
                    c.DefaultResultRax,
                    c.DefaultResultRbx,
                    c.DefaultResultRcx,
                    c.DefaultResultRdx,
                ],
                rip,
                instruction_length,
            }
        }
        whv::WHvRunVpExitReasonMemoryAccess => RawExit::MemoryAccess {
            // SAFETY: WHP fills the MemoryAccess member for this exit reason; it is plain data.
            gpa: unsafe { context.Anonymous.MemoryAccess }.Gpa,
        },
        whv::WHvRunVpExitReasonX64Halt => RawExit::Halt,
        whv::WHvRunVpExitReasonX64InterruptWindow => RawExit::InterruptWindow,
        whv::WHvRunVpExitReasonX64ApicEoi => RawExit::ApicEoi {
            // SAFETY: WHP fills the ApicEoi member for this exit reason; it is plain data.
            vector: unsafe { context.Anonymous.ApicEoi }.InterruptVector as u8,
        },
        whv::WHvRunVpExitReasonCanceled => RawExit::Canceled,
        whv::WHvRunVpExitReasonUnrecoverableException => RawExit::UnrecoverableException,
        whv::WHvRunVpExitReasonInvalidVpRegisterValue => RawExit::InvalidRegisterValue,
        other => RawExit::Other(other.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use windows::Win32::System::Hypervisor::{
        WHvRunVpExitReasonCanceled, WHvRunVpExitReasonInvalidVpRegisterValue,
        WHvRunVpExitReasonMemoryAccess, WHvRunVpExitReasonUnrecoverableException,
        WHvRunVpExitReasonX64Cpuid, WHvRunVpExitReasonX64Halt,
        WHvRunVpExitReasonX64InterruptWindow, WHvRunVpExitReasonX64IoPortAccess,
        WHvRunVpExitReasonX64MsrAccess, WHV_X64_CPUID_ACCESS_CONTEXT,
        WHV_X64_IO_PORT_ACCESS_CONTEXT, WHV_X64_IO_PORT_ACCESS_INFO,
    };

    fn context() -> WHV_RUN_VP_EXIT_CONTEXT {
        let mut c = WHV_RUN_VP_EXIT_CONTEXT::default();
        c.VpContext.Rip = 0xfff0;
        c.VpContext._bitfield = 0x20 | 2; // CR8 in the high nibble must not leak in
        c
    }

    #[test]
    fn port_access_decodes_direction_size_prefixes_and_rax() {
        let mut c = context();
        c.ExitReason = WHvRunVpExitReasonX64IoPortAccess;
        c.Anonymous.IoPortAccess = WHV_X64_IO_PORT_ACCESS_CONTEXT {
            AccessInfo: WHV_X64_IO_PORT_ACCESS_INFO {
                AsUINT32: IO_WRITE | (4 << IO_SIZE_SHIFT),
            },
            PortNumber: 0xf4,
            Rax: 0x1234_5678,
            ..Default::default()
        };
        assert_eq!(
            raw_exit(&c),
            RawExit::PortAccess {
                port: 0xf4,
                size: 4,
                write: true,
                string: false,
                rep: false,
                rax: 0x1234_5678,
                rip: 0xfff0,
                instruction_length: 2,
            }
        );
        c.Anonymous.IoPortAccess.AccessInfo.AsUINT32 = (1 << IO_SIZE_SHIFT) | IO_STRING | IO_REP;
        assert!(matches!(
            raw_exit(&c),
            RawExit::PortAccess {
                write: false,
                size: 1,
                string: true,
                rep: true,
                ..
            }
        ));
    }

    #[test]
    fn cpuid_decodes_leaf_subleaf_and_whps_default_answer() {
        let mut c = context();
        c.ExitReason = WHvRunVpExitReasonX64Cpuid;
        c.Anonymous.CpuidAccess = WHV_X64_CPUID_ACCESS_CONTEXT {
            Rax: 0xffff_ffff_0000_000b,
            Rcx: 1,
            DefaultResultRax: 10,
            DefaultResultRbx: 11,
            DefaultResultRcx: 12,
            DefaultResultRdx: 13,
            ..Default::default()
        };
        assert_eq!(
            raw_exit(&c),
            RawExit::Cpuid {
                leaf: 0xb,
                subleaf: 1,
                default: [10, 11, 12, 13],
                rip: 0xfff0,
                instruction_length: 2,
            }
        );
    }

    #[test]
    fn the_other_reasons_map_one_to_one() {
        let mut c = context();
        for (reason, expected) in [
            (WHvRunVpExitReasonX64Halt, RawExit::Halt),
            (
                WHvRunVpExitReasonX64InterruptWindow,
                RawExit::InterruptWindow,
            ),
            (WHvRunVpExitReasonCanceled, RawExit::Canceled),
            (
                WHvRunVpExitReasonUnrecoverableException,
                RawExit::UnrecoverableException,
            ),
            (
                WHvRunVpExitReasonInvalidVpRegisterValue,
                RawExit::InvalidRegisterValue,
            ),
            (WHvRunVpExitReasonX64MsrAccess, RawExit::Other(0x1000)),
        ] {
            c.ExitReason = reason;
            assert_eq!(raw_exit(&c), expected, "{reason:?}");
        }
        c.ExitReason = windows::Win32::System::Hypervisor::WHvRunVpExitReasonX64ApicEoi;
        c.Anonymous.ApicEoi.InterruptVector = 0x31;
        assert_eq!(raw_exit(&c), RawExit::ApicEoi { vector: 0x31 });
        c.ExitReason = WHvRunVpExitReasonMemoryAccess;
        c.Anonymous.MemoryAccess.Gpa = 0xfec0_0010;
        assert_eq!(raw_exit(&c), RawExit::MemoryAccess { gpa: 0xfec0_0010 });
    }
}
