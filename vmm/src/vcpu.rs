//! The vCPU thread: `KVM_RUN`, dispatch each port or MMIO exit to its bus, repeat until the VM
//! ends. Handlers are short and never block; anything that ends the guest is recorded in the
//! shared `VmExitSignal`, which also stops every other vCPU.

use std::sync::Arc;

use devices::bus::Bus;
use devices::vm_exit::{GuestEnd, VmExitSignal};

use crate::hypervisor::{Vcpu, VcpuExit};

/// Everything one vCPU thread owns or shares.
pub struct VcpuContext {
    /// vCPU number (also its APIC ID).
    pub index: u32,
    /// The hypervisor vCPU.
    pub vcpu: Box<dyn Vcpu>,
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where the guest's end is recorded.
    pub exit: VmExitSignal,
}

impl std::fmt::Debug for VcpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuContext")
            .field("index", &self.index)
            .finish()
    }
}

/// Runs the vCPU until the VM ends. Returns a one-line description when this vCPU ended the VM
/// abnormally (triple fault, internal error, hypervisor failure), for the final report.
pub fn run_vcpu(mut ctx: VcpuContext) -> Option<String> {
    let index = ctx.index;
    while !ctx.exit.is_requested() {
        let end = match ctx.vcpu.run() {
            Ok(VcpuExit::IoIn { port, data }) => {
                ctx.pio.read(u64::from(port), data);
                continue;
            }
            Ok(VcpuExit::IoOut { port, data }) => {
                ctx.pio.write(u64::from(port), data);
                continue;
            }
            Ok(VcpuExit::MmioRead { address, data }) => {
                ctx.mmio.read(address, data);
                continue;
            }
            Ok(VcpuExit::MmioWrite { address, data }) => {
                ctx.mmio.write(address, data);
                continue;
            }
            Ok(VcpuExit::Interrupted) => continue,
            Ok(VcpuExit::SystemReset) => (GuestEnd::Reset, None),
            Ok(VcpuExit::SystemPowerOff) => (GuestEnd::PowerOff, None),
            Ok(VcpuExit::Shutdown) => (
                GuestEnd::TripleFault { vcpu: index },
                Some(format!("vCPU {index} triple-faulted{}", at_rip(&*ctx.vcpu))),
            ),
            Ok(VcpuExit::InternalError) => {
                let (suberror, text) = ctx.vcpu.internal_error_info();
                (
                    GuestEnd::InternalError {
                        vcpu: index,
                        suberror,
                    },
                    Some(format!(
                        "vCPU {index}: KVM internal error: {text}{}",
                        at_rip(&*ctx.vcpu)
                    )),
                )
            }
            Ok(VcpuExit::FailEntry { reason }) => (
                GuestEnd::InternalError {
                    vcpu: index,
                    suberror: 0,
                },
                Some(format!(
                    "vCPU {index}: VM entry failed (hardware reason {reason:#x})"
                )),
            ),
            Ok(VcpuExit::Halt) => (
                GuestEnd::VmmError,
                Some(format!("vCPU {index} halted with no irqchip to wake it")),
            ),
            Ok(VcpuExit::Unhandled(what)) => (
                GuestEnd::VmmError,
                Some(format!("vCPU {index}: unhandled exit {what}")),
            ),
            Err(e) => (
                GuestEnd::VmmError,
                Some(format!("vCPU {index}: {}", crate::error_chain(&e))),
            ),
        };
        ctx.exit.request(end.0);
        return end.1;
    }
    None
}

fn at_rip(vcpu: &dyn Vcpu) -> String {
    vcpu.regs()
        .map(|r| format!(" at rip {:#x}", r.rip))
        .unwrap_or_default()
}
