//! WHP exits in neutral form, and what skiff writes back before the next run.
//!
//! `RawExit` is the part of `WHV_RUN_VP_EXIT_CONTEXT` skiff uses. The decoding from the Windows
//! structure lives with the vCPU (Windows only). `ExitDecoder` turns a `RawExit` into the
//! hypervisor seam's `VcpuExit`, so the same run loop (`vmm/src/vcpu.rs`) dispatches WHP exits
//! to the same buses as KVM exits. Unlike KVM, WHP does not finish an exit by itself: plain
//! `in`/`out` and CPUID are completed from the decoded context (`Completion`: RAX and the other
//! registers, and RIP past the instruction). String and `rep` port I/O and MMIO need the
//! instruction emulator (`WHvEmulatorTry*Emulation`); the WHP vCPU (`vcpu`) sends those to the
//! emulator before they reach this decoder, so here they come out as `Unhandled`.
//!
//! Platform-neutral; unit-tested on Linux against a fake exit source.

use super::cpuid::CpuidPlan;
use crate::hypervisor::VcpuExit;

/// The parts of a WHP exit skiff acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawExit {
    /// `WHvRunVpExitReasonX64IoPortAccess`.
    PortAccess {
        /// Port.
        port: u16,
        /// Access size in bytes (1, 2 or 4).
        size: u8,
        /// `out` (true) or `in`.
        write: bool,
        /// `ins`/`outs`.
        string: bool,
        /// A `rep` prefix.
        rep: bool,
        /// RAX at the exit.
        rax: u64,
        /// RIP of the instruction.
        rip: u64,
        /// Its length in bytes.
        instruction_length: u8,
    },
    /// `WHvRunVpExitReasonX64Cpuid`.
    Cpuid {
        /// EAX (leaf).
        leaf: u32,
        /// ECX (subleaf).
        subleaf: u32,
        /// WHP's own answer (RAX, RBX, RCX, RDX), used for leaves skiff has no entry for.
        default: [u64; 4],
        /// RIP of the instruction.
        rip: u64,
        /// Its length in bytes.
        instruction_length: u8,
    },
    /// `WHvRunVpExitReasonMemoryAccess` to this guest physical address.
    MemoryAccess {
        /// Guest physical address.
        gpa: u64,
    },
    /// `WHvRunVpExitReasonX64Halt`.
    Halt,
    /// `WHvRunVpExitReasonX64InterruptWindow`: the guest can take an interrupt now.
    InterruptWindow,
    /// `WHvRunVpExitReasonX64ApicEoi`: the guest ended a level-triggered interrupt with this
    /// vector; the vCPU forwards it to the IOAPIC.
    ApicEoi {
        /// The vector.
        vector: u8,
    },
    /// `WHvRunVpExitReasonCanceled`: `WHvCancelRunVirtualProcessor` (pause or stop).
    Canceled,
    /// `WHvRunVpExitReasonUnrecoverableException`: the guest triple-faulted.
    UnrecoverableException,
    /// `WHvRunVpExitReasonInvalidVpRegisterValue`: a register state WHP refused.
    InvalidRegisterValue,
    /// Any other exit reason.
    Other(i32),
}

/// What the WHP vCPU does with an exit before anything reaches the shared run loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuStep {
    /// Run the instruction emulator on a string or `rep` port access, then run again.
    EmulateIo,
    /// Run the instruction emulator on an MMIO access at this address, then run again.
    EmulateMmio(u64),
    /// The interrupt window opened: clear the request, inject, run again.
    InterruptWindow,
    /// Hand the EOI for this vector to the IOAPIC, then run again.
    Eoi(u8),
    /// The vCPU halted: wait for an interrupt if it can take one.
    Halt,
    /// WHP refused the register state: an internal error.
    InvalidState,
    /// Everything else: decode it into a `VcpuExit` for the run loop (`ExitDecoder`).
    Decode,
}

impl VcpuStep {
    /// The step for `raw`.
    pub fn of(raw: &RawExit) -> Self {
        match *raw {
            RawExit::PortAccess { string, rep, .. } if string || rep => Self::EmulateIo,
            RawExit::MemoryAccess { gpa } => Self::EmulateMmio(gpa),
            RawExit::InterruptWindow => Self::InterruptWindow,
            RawExit::ApicEoi { vector } => Self::Eoi(vector),
            RawExit::Halt => Self::Halt,
            RawExit::InvalidRegisterValue => Self::InvalidState,
            _ => Self::Decode,
        }
    }
}

/// Registers to write before the next run, to finish the last exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// RIP past the instruction.
    Rip(u64),
    /// RAX (an `in` result) and RIP past the instruction.
    RaxRip {
        /// New RAX.
        rax: u64,
        /// New RIP.
        rip: u64,
    },
    /// A CPUID result and RIP past the instruction.
    Cpuid {
        /// RAX, RBX, RCX, RDX.
        regs: [u64; 4],
        /// New RIP.
        rip: u64,
    },
}

/// An `in` waiting for the bus to fill `data`.
#[derive(Debug, Clone, Copy)]
struct PendingIn {
    size: u8,
    rax: u64,
    next_rip: u64,
}

/// Turns raw exits into `VcpuExit`s for one vCPU and remembers how to finish each.
#[derive(Debug)]
pub struct ExitDecoder {
    vcpu: u32,
    buffer: [u8; 4],
    pending_in: Option<PendingIn>,
    completion: Option<Completion>,
}

impl ExitDecoder {
    /// A decoder for vCPU `vcpu`.
    pub fn new(vcpu: u32) -> Self {
        Self {
            vcpu,
            buffer: [0; 4],
            pending_in: None,
            completion: None,
        }
    }

    /// What to write into the vCPU before running it again (once per exit).
    pub fn take_completion(&mut self) -> Option<Completion> {
        if let Some(p) = self.pending_in.take() {
            let size = usize::from(p.size);
            let mut value = [0u8; 8];
            value[..size].copy_from_slice(&self.buffer[..size]);
            let value = u64::from_le_bytes(value);
            // `in al`/`in ax` keep the rest of RAX; `in eax` zero-extends into RAX, as every
            // 32-bit register write in 64-bit mode does.
            let rax = match p.size {
                1 => (p.rax & !0xff) | value,
                2 => (p.rax & !0xffff) | value,
                _ => value,
            };
            return Some(Completion::RaxRip {
                rax,
                rip: p.next_rip,
            });
        }
        self.completion.take()
    }

    /// The `VcpuExit` for `raw`; `cpuid` answers CPUID exits.
    pub fn decode(&mut self, raw: RawExit, cpuid: &CpuidPlan) -> VcpuExit<'_> {
        self.pending_in = None;
        self.completion = None;
        match raw {
            RawExit::PortAccess {
                string: true, port, ..
            }
            | RawExit::PortAccess {
                rep: true, port, ..
            } => VcpuExit::Unhandled(format!(
                "string or rep port I/O at port {port:#x} (needs the WHP instruction emulator)"
            )),
            RawExit::PortAccess {
                port,
                size,
                write,
                rax,
                rip,
                instruction_length,
                ..
            } => {
                let len = match size {
                    1 | 2 | 4 => usize::from(size),
                    _ => return VcpuExit::Unhandled(format!("port I/O of size {size}")),
                };
                let next_rip = rip.wrapping_add(u64::from(instruction_length));
                if write {
                    self.buffer = (rax as u32).to_le_bytes();
                    self.completion = Some(Completion::Rip(next_rip));
                    VcpuExit::IoOut {
                        port,
                        data: &self.buffer[..len],
                    }
                } else {
                    self.buffer = [0; 4];
                    self.pending_in = Some(PendingIn {
                        size,
                        rax,
                        next_rip,
                    });
                    VcpuExit::IoIn {
                        port,
                        data: &mut self.buffer[..len],
                    }
                }
            }
            RawExit::Cpuid {
                leaf,
                subleaf,
                default,
                rip,
                instruction_length,
            } => {
                let regs = match cpuid.answer(self.vcpu, leaf, subleaf) {
                    Some(r) => r.map(u64::from),
                    None => default,
                };
                self.completion = Some(Completion::Cpuid {
                    regs,
                    rip: rip.wrapping_add(u64::from(instruction_length)),
                });
                VcpuExit::Interrupted
            }
            RawExit::MemoryAccess { gpa } => VcpuExit::Unhandled(format!(
                "MMIO at {gpa:#x} (needs the WHP instruction emulator)"
            )),
            RawExit::Halt => VcpuExit::Halt,
            RawExit::InterruptWindow | RawExit::Canceled | RawExit::ApicEoi { .. } => {
                VcpuExit::Interrupted
            }
            RawExit::UnrecoverableException => VcpuExit::Shutdown,
            RawExit::InvalidRegisterValue => VcpuExit::InternalError,
            RawExit::Other(reason) => VcpuExit::Unhandled(format!("WHP exit reason {reason:#x}")),
        }
    }
}

#[cfg(test)]
mod tests;
