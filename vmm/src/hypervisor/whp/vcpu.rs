//! `WhpVcpu`: one WHP virtual processor behind the hypervisor seam's `Vcpu` trait.
//!
//! `run` writes back what finished the last exit (`ExitDecoder`'s completion), runs the
//! processor, and decodes the exit context. String and `rep` port I/O and MMIO go through the
//! instruction emulator, whose callbacks reach the same buses the shared run loop uses; plain
//! `in`/`out`, CPUID, cancels and the rest leave as the seam's `VcpuExit`s for that loop. A `hlt`
//! with interrupts enabled waits on the vCPU's `HaltWake` (see `halt`); an EOI for a
//! level-triggered vector goes to the EOI handler (the IOAPIC). Before each run the boot vCPU
//! takes the PIC's interrupt or asks for an interrupt window (`ext_int`). `VcpuCanceller` stops a run from
//! another thread (`WHvCancelRunVirtualProcessor`) for pause and stop.
//!
//! Registers go through the neutral `arch::regs` types (`registers`). Snapshots of WHP vCPUs are
//! not supported yet (`HypervisorError::NotSupported`).
//!
//! Windows only; compiled and clippy-checked here but never run (wine has no hypervisor). Its
//! register value conversions are tested under wine.

use std::ffi::c_void;
use std::sync::{Arc, Mutex, PoisonError};

use arch::regs::{CpuidEntry, MsrEntry, SpecialRegisters, StandardRegisters};
use devices::bus::Bus;
use devices::irqchip::Pic;
use windows::Win32::System::Hypervisor::{
    WHvRegisterInterruptState, WHvRegisterPendingInterruption,
    WHvX64RegisterDeliverabilityNotifications, WHvX64RegisterFpControlStatus, WHvX64RegisterRflags,
    WHvX64RegisterXmmControlStatus, WHV_REGISTER_NAME, WHV_REGISTER_VALUE, WHV_RUN_VP_EXIT_CONTEXT,
    WHV_TRANSLATE_GVA_FLAGS, WHV_TRANSLATE_GVA_RESULT, WHV_TRANSLATE_GVA_RESULT_CODE,
    WHV_X64_SEGMENT_REGISTER, WHV_X64_SEGMENT_REGISTER_0, WHV_X64_TABLE_REGISTER,
};

use super::cpuid::CpuidPlan;
use super::emulation::{check_status, EmulatedAccess, EmulationError, GuestRam};
use super::emulator::{CallbackContext, Emulator, VpAccess};
use super::exit::{Completion, ExitDecoder, VcpuStep};
use super::exit_context::raw_exit;
use super::ext_int::{
    ext_int_action, pending_external_interrupt, ExtIntAction, INTERRUPT_WINDOW_NOTIFICATION,
};
use super::halt::{wakeable, HaltWake, HALT_RECHECK};
use super::partition::Partition;
use super::registers::{self, WhpRegister, WhpSegment, WhpValue};
use crate::hypervisor::state::{SkippedState, VcpuState};
use crate::hypervisor::{HypervisorError, Result, Vcpu, VcpuExit, VcpuSnapshot};
use arch::regs::DescriptorTable;

/// Offsets of the LVT LINT0/LINT1 registers in the local APIC page, and their delivery modes.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;
/// The local APIC page WHP reads and writes as interrupt controller state.
const APIC_PAGE: usize = 4096;
/// FPU control word and MXCSR at power-on.
const FPU_CONTROL_RESET: u16 = 0x37f;
const MXCSR_RESET: u32 = 0x1f80;

/// Where a vCPU's emulated accesses go.
#[derive(Clone)]
pub struct VcpuIo {
    /// Port I/O bus (the run loop's own).
    pub pio: Arc<Bus>,
    /// MMIO bus (the run loop's own).
    pub mmio: Arc<Bus>,
    /// Guest RAM.
    pub ram: Arc<dyn GuestRam>,
    /// Called with the vector of each EOI WHP reports (the IOAPIC's `end_of_interrupt`).
    pub eoi: Option<Arc<dyn Fn(u8) + Send + Sync>>,
    /// The PIC whose interrupts this vCPU takes (the boot vCPU only).
    pub pic: Option<Arc<Mutex<Pic>>>,
}

impl std::fmt::Debug for VcpuIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuIo").finish_non_exhaustive()
    }
}

/// The value WHP holds for `value`.
pub fn to_whv(value: WhpValue) -> WHV_REGISTER_VALUE {
    match value {
        WhpValue::U64(v) => WHV_REGISTER_VALUE { Reg64: v },
        WhpValue::Segment(s) => WHV_REGISTER_VALUE {
            Segment: WHV_X64_SEGMENT_REGISTER {
                Base: s.base,
                Limit: s.limit,
                Selector: s.selector,
                Anonymous: WHV_X64_SEGMENT_REGISTER_0 {
                    Attributes: s.attributes,
                },
            },
        },
        WhpValue::Table(t) => WHV_REGISTER_VALUE {
            Table: WHV_X64_TABLE_REGISTER {
                Pad: [0; 3],
                Limit: t.limit,
                Base: t.base,
            },
        },
    }
}

/// The kind of value register `name` holds, read from `value`.
pub fn from_whv(name: WhpRegister, value: &WHV_REGISTER_VALUE) -> WhpValue {
    use WhpRegister as R;
    match name {
        R::Es | R::Cs | R::Ss | R::Ds | R::Fs | R::Gs | R::Ldtr | R::Tr => {
            // SAFETY: WHP fills the Segment member for segment registers; plain data.
            let s = unsafe { value.Segment };
            WhpValue::Segment(WhpSegment {
                base: s.Base,
                limit: s.Limit,
                selector: s.Selector,
                // SAFETY: Attributes covers the whole attribute union.
                attributes: unsafe { s.Anonymous.Attributes },
            })
        }
        R::Idtr | R::Gdtr => {
            // SAFETY: WHP fills the Table member for GDTR and IDTR; plain data.
            let t = unsafe { value.Table };
            WhpValue::Table(DescriptorTable {
                base: t.Base,
                limit: t.Limit,
            })
        }
        // SAFETY: every other register skiff names is 64 bits wide.
        _ => WhpValue::U64(unsafe { value.Reg64 }),
    }
}

fn names(list: &[WhpRegister]) -> Vec<WHV_REGISTER_NAME> {
    list.iter().map(|r| WHV_REGISTER_NAME(*r as i32)).collect()
}

/// A vCPU's registers and translations through the partition (the emulator's `VpAccess`).
struct Vp<'a> {
    partition: &'a Partition,
    index: u32,
}

impl VpAccess for Vp<'_> {
    fn get_registers(
        &self,
        names: &[WHV_REGISTER_NAME],
        values: &mut [WHV_REGISTER_VALUE],
    ) -> windows::core::Result<()> {
        let count = names.len().min(values.len()) as u32;
        // SAFETY: both arrays hold at least `count` elements.
        unsafe {
            (self.partition.lib().get_registers)(
                self.partition.handle(),
                self.index,
                names.as_ptr(),
                count,
                values.as_mut_ptr(),
            )
        }
        .ok()
    }

    fn set_registers(
        &self,
        names: &[WHV_REGISTER_NAME],
        values: &[WHV_REGISTER_VALUE],
    ) -> windows::core::Result<()> {
        let count = names.len().min(values.len()) as u32;
        // SAFETY: both arrays hold at least `count` elements.
        unsafe {
            (self.partition.lib().set_registers)(
                self.partition.handle(),
                self.index,
                names.as_ptr(),
                count,
                values.as_ptr(),
            )
        }
        .ok()
    }

    fn translate_gva(
        &self,
        gva: u64,
        flags: WHV_TRANSLATE_GVA_FLAGS,
    ) -> windows::core::Result<(WHV_TRANSLATE_GVA_RESULT_CODE, u64)> {
        let mut result = WHV_TRANSLATE_GVA_RESULT::default();
        let mut gpa = 0;
        // SAFETY: valid out-pointers for the call.
        unsafe {
            (self.partition.lib().translate_gva)(
                self.partition.handle(),
                self.index,
                gva,
                flags,
                &mut result,
                &mut gpa,
            )
        }
        .ok()?;
        Ok((result.ResultCode, gpa))
    }
}

/// Stops a WHP vCPU's run from any thread, and wakes it if it waits in a halt.
#[derive(Debug, Clone)]
pub struct VcpuCanceller {
    partition: Arc<Partition>,
    index: u32,
    wake: Arc<HaltWake>,
}

impl VcpuCanceller {
    /// The canceller of vCPU `index` of `partition`, whose halts wait on `wake`.
    pub(super) fn new(partition: Arc<Partition>, index: u32, wake: Arc<HaltWake>) -> Self {
        Self {
            partition,
            index,
            wake,
        }
    }

    /// Makes the vCPU's current or next `WHvRunVirtualProcessor` return
    /// (`WHvRunVpExitReasonCanceled`), and ends a halt wait.
    pub fn cancel(&self) -> Result<()> {
        self.wake.notify();
        // SAFETY: the partition and the vCPU index are live while the partition lives.
        unsafe {
            (self.partition.lib().cancel_run_virtual_processor)(
                self.partition.handle(),
                self.index,
                0,
            )
        }
        .ok()
        .map_err(|e| HypervisorError::call("WHvCancelRunVirtualProcessor", e))
    }
}

/// One WHP virtual processor, deleted on drop.
pub struct WhpVcpu {
    partition: Arc<Partition>,
    index: u32,
    cpuid: Arc<CpuidPlan>,
    decoder: ExitDecoder,
    emulator: Emulator,
    io: VcpuIo,
    wake: Arc<HaltWake>,
    exit: WHV_RUN_VP_EXIT_CONTEXT,
    last_failure: String,
}

impl std::fmt::Debug for WhpVcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhpVcpu")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl WhpVcpu {
    /// Creates virtual processor `index` of `partition`, with its emulator; `wake` is what
    /// interrupt requests for it notify.
    pub fn create(
        partition: Arc<Partition>,
        index: u32,
        cpuid: Arc<CpuidPlan>,
        io: VcpuIo,
        wake: Arc<HaltWake>,
    ) -> Result<Self> {
        // SAFETY: the partition is set up and live.
        unsafe { (partition.lib().create_virtual_processor)(partition.handle(), index, 0) }
            .ok()
            .map_err(|e| HypervisorError::call("WHvCreateVirtualProcessor", e))?;
        let emulator = match Emulator::create(partition.lib_arc()) {
            Ok(e) => e,
            Err(e) => {
                // SAFETY: the processor was created above and is deleted once.
                let _ = unsafe {
                    (partition.lib().delete_virtual_processor)(partition.handle(), index)
                };
                return Err(HypervisorError::call("WHvEmulatorCreateEmulator", e));
            }
        };
        Ok(Self {
            partition,
            index,
            cpuid,
            decoder: ExitDecoder::new(index),
            emulator,
            io,
            wake,
            exit: WHV_RUN_VP_EXIT_CONTEXT::default(),
            last_failure: String::new(),
        })
    }

    /// A handle that cancels this vCPU's runs from another thread.
    pub fn canceller(&self) -> VcpuCanceller {
        VcpuCanceller {
            partition: self.partition.clone(),
            index: self.index,
            wake: self.wake.clone(),
        }
    }

    fn vp(&self) -> Vp<'_> {
        Vp {
            partition: &self.partition,
            index: self.index,
        }
    }

    fn get(&self, list: &[WhpRegister]) -> Result<Vec<WHV_REGISTER_VALUE>> {
        let names = names(list);
        let mut values = vec![WHV_REGISTER_VALUE::default(); names.len()];
        self.vp()
            .get_registers(&names, &mut values)
            .map_err(|e| HypervisorError::call("WHvGetVirtualProcessorRegisters", e))?;
        Ok(values)
    }

    fn set(&self, list: &[(WhpRegister, WhpValue)]) -> Result<()> {
        let names: Vec<_> = list
            .iter()
            .map(|(n, _)| WHV_REGISTER_NAME(*n as i32))
            .collect();
        let values: Vec<_> = list.iter().map(|(_, v)| to_whv(*v)).collect();
        self.set_raw(&names, &values)
    }

    fn set_raw(&self, names: &[WHV_REGISTER_NAME], values: &[WHV_REGISTER_VALUE]) -> Result<()> {
        self.vp()
            .set_registers(names, values)
            .map_err(|e| HypervisorError::call("WHvSetVirtualProcessorRegisters", e))
    }

    fn write_completion(&self, completion: Completion) -> Result<()> {
        use WhpRegister as R;
        let list: Vec<(WhpRegister, WhpValue)> = match completion {
            Completion::Rip(rip) => vec![(R::Rip, WhpValue::U64(rip))],
            Completion::RaxRip { rax, rip } => {
                vec![(R::Rax, WhpValue::U64(rax)), (R::Rip, WhpValue::U64(rip))]
            }
            Completion::Cpuid { regs, rip } => vec![
                (R::Rax, WhpValue::U64(regs[0])),
                (R::Rbx, WhpValue::U64(regs[1])),
                (R::Rcx, WhpValue::U64(regs[2])),
                (R::Rdx, WhpValue::U64(regs[3])),
                (R::Rip, WhpValue::U64(rip)),
            ],
        };
        self.set(&list)
    }

    /// Hands the PIC's interrupt to the guest when it can take one, or asks for an
    /// interrupt-window exit (see `ext_int`).
    fn inject_pic_interrupt(&self) -> Result<()> {
        let Some(pic) = &self.io.pic else {
            return Ok(());
        };
        if !pic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .has_interrupt()
        {
            return Ok(());
        }
        let names = [
            WHvX64RegisterRflags,
            WHvRegisterInterruptState,
            WHvRegisterPendingInterruption,
        ];
        let mut values = [WHV_REGISTER_VALUE::default(); 3];
        self.vp()
            .get_registers(&names, &mut values)
            .map_err(|e| HypervisorError::call("WHvGetVirtualProcessorRegisters", e))?;
        // SAFETY: the three registers are read as their raw 64-bit images.
        let [rflags, state, pending] = values.map(|v| unsafe { v.Reg64 });
        // The PIC may have withdrawn its request meanwhile; `acknowledge` then gives the
        // spurious vector, as the hardware does.
        match ext_int_action(true, rflags, state, pending) {
            ExtIntAction::Inject => {
                let vector = pic
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .acknowledge();
                self.set_raw(
                    &[WHvRegisterPendingInterruption],
                    &[WHV_REGISTER_VALUE {
                        Reg64: pending_external_interrupt(vector),
                    }],
                )
            }
            ExtIntAction::RequestWindow => self.set_raw(
                &[WHvX64RegisterDeliverabilityNotifications],
                &[WHV_REGISTER_VALUE {
                    Reg64: INTERRUPT_WINDOW_NOTIFICATION,
                }],
            ),
            ExtIntAction::Nothing => Ok(()),
        }
    }

    /// Runs the emulator on the current exit (port I/O when `io`, MMIO otherwise). `None`
    /// when it finished the instruction, else why not.
    fn emulate(&mut self, io: bool) -> Result<Option<EmulationError>> {
        let vp = Vp {
            partition: &self.partition,
            index: self.index,
        };
        let context = CallbackContext {
            access: EmulatedAccess {
                pio: &self.io.pio,
                mmio: &self.io.mmio,
                ram: &*self.io.ram,
            },
            vp: &vp,
        };
        let status = if io {
            // SAFETY: the exit reason is port I/O, for which WHP fills IoPortAccess.
            let access = unsafe { self.exit.Anonymous.IoPortAccess };
            self.emulator
                .try_io(&context, &self.exit.VpContext, &access)
                .map_err(|e| HypervisorError::call("WHvEmulatorTryIoEmulation", e))?
        } else {
            // SAFETY: the exit reason is a memory access, for which WHP fills MemoryAccess.
            let access = unsafe { self.exit.Anonymous.MemoryAccess };
            self.emulator
                .try_mmio(&context, &self.exit.VpContext, &access)
                .map_err(|e| HypervisorError::call("WHvEmulatorTryMmioEmulation", e))?
        };
        Ok(check_status(status).err())
    }
}

impl Drop for WhpVcpu {
    fn drop(&mut self) {
        // SAFETY: the processor was created by `create` and is deleted once, here.
        let hr = unsafe {
            (self.partition.lib().delete_virtual_processor)(self.partition.handle(), self.index)
        };
        if let Err(e) = hr.ok() {
            log::warn!("WHvDeleteVirtualProcessor {} failed: {e}", self.index);
        }
    }
}

impl Vcpu for WhpVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        loop {
            if let Some(completion) = self.decoder.take_completion() {
                self.write_completion(completion)?;
            }
            self.inject_pic_interrupt()?;
            // SAFETY: `exit` is a WHV_RUN_VP_EXIT_CONTEXT of the size passed, written during
            // the call; the partition and processor are live.
            unsafe {
                (self.partition.lib().run_virtual_processor)(
                    self.partition.handle(),
                    self.index,
                    (&raw mut self.exit).cast::<c_void>(),
                    size_of::<WHV_RUN_VP_EXIT_CONTEXT>() as u32,
                )
            }
            .ok()
            .map_err(|e| HypervisorError::call("WHvRunVirtualProcessor", e))?;
            let raw = raw_exit(&self.exit);
            match VcpuStep::of(&raw) {
                VcpuStep::EmulateIo => {
                    if let Some(why) = self.emulate(true)? {
                        self.last_failure = format!("string port I/O: {why}");
                        return Ok(VcpuExit::InternalError);
                    }
                }
                VcpuStep::EmulateMmio(gpa) => {
                    if let Some(why) = self.emulate(false)? {
                        self.last_failure = format!("MMIO at {gpa:#x}: {why}");
                        return Ok(VcpuExit::InternalError);
                    }
                }
                VcpuStep::InterruptWindow => {
                    // The window is open: stop asking, and inject at the top of the loop.
                    self.set_raw(
                        &[WHvX64RegisterDeliverabilityNotifications],
                        &[WHV_REGISTER_VALUE { Reg64: 0 }],
                    )?;
                }
                VcpuStep::Eoi(vector) => {
                    if let Some(eoi) = &self.io.eoi {
                        eoi(vector);
                    }
                }
                VcpuStep::Halt => {
                    // SAFETY: RFLAGS is 64 bits wide.
                    let rflags = unsafe { self.get(&[WhpRegister::Rflags])?[0].Reg64 };
                    if !wakeable(rflags) {
                        return Ok(VcpuExit::Halt);
                    }
                    self.wake.wait(HALT_RECHECK);
                    // Back to the run loop, which looks at pause and stop requests.
                    return Ok(VcpuExit::Interrupted);
                }
                VcpuStep::InvalidState => {
                    self.last_failure = "WHP refused the vCPU's register state".into();
                    return Ok(VcpuExit::InternalError);
                }
                VcpuStep::Decode => return Ok(self.decoder.decode(raw, &self.cpuid)),
            }
        }
    }

    fn regs(&self) -> Result<StandardRegisters> {
        let values = self.get(&registers::STANDARD)?;
        // SAFETY: the general-purpose registers, RIP and RFLAGS are 64 bits wide.
        let v: [u64; 18] = std::array::from_fn(|i| unsafe { values[i].Reg64 });
        Ok(registers::standard_from_values(v))
    }

    fn set_regs(&self, regs: &StandardRegisters) -> Result<()> {
        let values = registers::standard_values(regs);
        let list: Vec<_> = registers::STANDARD
            .iter()
            .zip(values)
            .map(|(n, v)| (*n, WhpValue::U64(v)))
            .collect();
        self.set(&list)
    }

    fn sregs(&self) -> Result<SpecialRegisters> {
        let wanted: Vec<WhpRegister> = registers::special_to_whp(&SpecialRegisters::default())
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let values = self.get(&wanted)?;
        let list: Vec<_> = wanted
            .iter()
            .zip(&values)
            .map(|(n, v)| (*n, from_whv(*n, v)))
            .collect();
        registers::special_from_whp(&list).ok_or(HypervisorError::NotSupported(
            "a special register list WHP did not fill",
        ))
    }

    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<()> {
        self.set(&registers::special_to_whp(sregs))
    }

    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()> {
        // WHP takes CPUID for the whole partition before set-up (`CpuidPlan`); a vCPU can only
        // confirm that its table is the one the plan was built from.
        if self.cpuid.table(self.index) == Some(entries) {
            Ok(())
        } else {
            Err(HypervisorError::NotSupported(
                "changing a vCPU's CPUID after the WHP partition is set up",
            ))
        }
    }

    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()> {
        let mut list = Vec::with_capacity(msrs.len());
        for m in msrs {
            match registers::msr_register(m.index) {
                Some(register) => list.push((register, WhpValue::U64(m.data))),
                None => log::debug!(
                    "WHP has no register for MSR {:#x}; left as WHP sets it",
                    m.index
                ),
            }
        }
        self.set(&list)
    }

    fn reset_fpu(&self) -> Result<()> {
        let names = [
            WHvX64RegisterFpControlStatus,
            WHvX64RegisterXmmControlStatus,
        ];
        let mut values = [WHV_REGISTER_VALUE::default(); 2];
        self.vp()
            .get_registers(&names, &mut values)
            .map_err(|e| HypervisorError::call("WHvGetVirtualProcessorRegisters", e))?;
        // SAFETY: these two registers hold the control/status unions; plain data.
        unsafe {
            let fp = &mut values[0].FpControlStatus.Anonymous;
            fp.FpControl = FPU_CONTROL_RESET;
            fp.FpStatus = 0;
            fp.FpTag = 0;
            values[1].XmmControlStatus.Anonymous.XmmStatusControl = MXCSR_RESET;
        }
        self.set_raw(&names, &values)
    }

    fn internal_error_info(&mut self) -> (u32, String) {
        (0, std::mem::take(&mut self.last_failure))
    }

    fn setup_lapic_lint(&self) -> Result<()> {
        let lib = self.partition.lib();
        let mut page = vec![0u8; APIC_PAGE];
        let mut written = 0u32;
        // SAFETY: `page` is APIC_PAGE writable bytes; `written` is a valid out-pointer.
        unsafe {
            (lib.get_apic_state)(
                self.partition.handle(),
                self.index,
                page.as_mut_ptr().cast(),
                APIC_PAGE as u32,
                &mut written,
            )
        }
        .ok()
        .map_err(|e| HypervisorError::call("WHvGetVirtualProcessorInterruptControllerState2", e))?;
        set_lint_modes(&mut page);
        // SAFETY: `page` is APIC_PAGE readable bytes.
        unsafe {
            (lib.set_apic_state)(
                self.partition.handle(),
                self.index,
                page.as_ptr().cast(),
                APIC_PAGE as u32,
            )
        }
        .ok()
        .map_err(|e| HypervisorError::call("WHvSetVirtualProcessorInterruptControllerState2", e))
    }
}

/// Programs LINT0 as ExtINT and LINT1 as NMI in a local APIC page, as firmware would.
pub fn set_lint_modes(page: &mut [u8]) {
    for (offset, mode) in [
        (APIC_LVT_LINT0, APIC_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_MODE_NMI),
    ] {
        let Some(bytes) = page.get_mut(offset..offset + 4) else {
            continue;
        };
        let mut lvt = [0u8; 4];
        lvt.copy_from_slice(bytes);
        let lvt = (u32::from_le_bytes(lvt) & !0x700) | (mode << 8);
        bytes.copy_from_slice(&lvt.to_le_bytes());
    }
}

impl VcpuSnapshot for WhpVcpu {
    fn save_state(&self) -> Result<(VcpuState, SkippedState)> {
        Err(HypervisorError::NotSupported("snapshots of WHP vCPUs"))
    }

    fn restore_state(&self, _state: &VcpuState) -> Result<()> {
        Err(HypervisorError::NotSupported("snapshots of WHP vCPUs"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arch::regs::Segment;

    #[test]
    fn segments_and_tables_round_trip_through_whp_values() {
        let code = registers::segment_to_whp(&Segment {
            base: 0x1000,
            limit: 0xffff_ffff,
            selector: 0x10,
            type_: 0xb,
            present: true,
            s: true,
            l: true,
            g: true,
            ..Default::default()
        });
        let v = to_whv(WhpValue::Segment(code));
        // SAFETY: written as a segment just above.
        let raw = unsafe { v.Segment };
        // SAFETY: Attributes covers the attribute union.
        let attributes = unsafe { raw.Anonymous.Attributes };
        assert_eq!((raw.Base, raw.Selector, attributes), (0x1000, 0x10, 0xa09b));
        assert_eq!(from_whv(WhpRegister::Cs, &v), WhpValue::Segment(code));

        let gdt = DescriptorTable {
            base: 0x500,
            limit: 0x27,
        };
        let v = to_whv(WhpValue::Table(gdt));
        assert_eq!(from_whv(WhpRegister::Gdtr, &v), WhpValue::Table(gdt));
        let v = to_whv(WhpValue::U64(0x8000_0011));
        assert_eq!(from_whv(WhpRegister::Cr0, &v), WhpValue::U64(0x8000_0011));
    }

    #[test]
    fn lint_modes_keep_the_rest_of_the_lvt() {
        let mut page = vec![0u8; APIC_PAGE];
        page[APIC_LVT_LINT0..APIC_LVT_LINT0 + 4].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        page[APIC_LVT_LINT1..APIC_LVT_LINT1 + 4].copy_from_slice(&0x0001_0700u32.to_le_bytes());
        set_lint_modes(&mut page);
        let lvt = |o: usize| u32::from_le_bytes(page[o..o + 4].try_into().unwrap());
        assert_eq!(lvt(APIC_LVT_LINT0), 0x0001_0700);
        assert_eq!(lvt(APIC_LVT_LINT1), 0x0001_0400);
        // A page too short is left alone rather than indexed past its end.
        let mut short = vec![0u8; 0x352];
        set_lint_modes(&mut short);
        assert!(short.iter().all(|b| *b == 0));
    }
}
