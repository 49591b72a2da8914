//! Saving and restoring a KVM vCPU's state for snapshots: the `VcpuSnapshot` implementation.
//!
//! Owns the order of the KVM ioctls (each constraint is commented next to its call) and the
//! host facts the order needs: the MSR index list and the XSAVE area size, read once from
//! `/dev/kvm`. The conversions between KVM structures and the neutral types live in
//! `state_convert.rs`. Deliberately not here: when a vCPU is paused (`vcpu.rs` in the crate
//! root) and how state reaches a file (`snapshot/`).

use std::sync::OnceLock;

use kvm_bindings::{kvm_xsave, Xsave, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, KvmNestedStateBuffer, VcpuFd};

use super::convert;
use super::msrs::{read_msrs, write_msrs};
use super::state_convert as sc;
use super::vcpu::KvmVcpu;
use crate::hypervisor::state::{CpuidLeaf, MsrValue, SkippedState, VcpuState, XSAVE_LEGACY_SIZE};
use crate::hypervisor::{HypervisorError, Result, VcpuSnapshot};

/// `IA32_TSC_DEADLINE`.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// TSC frequencies closer than this (parts per million) count as equal: hosts calibrate the
/// TSC at boot and rarely agree to the kHz.
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

/// What `/dev/kvm` says about this host, read once per process.
#[derive(Debug)]
struct HostFacts {
    /// Every MSR KVM can save and restore.
    msr_indices: Vec<u32>,
    /// Size of `struct kvm_xsave` KVM_GET_XSAVE2 fills, if the host has KVM_CAP_XSAVE2.
    xsave2_size: Option<usize>,
    /// Whether KVM_GET_NESTED_STATE exists at all.
    nested_state: bool,
}

/// Reads what `/dev/kvm` says about the host now, so that a vCPU thread saving its state later
/// opens nothing (its seccomp filter and the Landlock sandbox would not let it).
pub fn read_host_facts() -> Result<()> {
    host_facts().map(|_| ())
}

fn host_facts() -> Result<&'static HostFacts> {
    // The failure is kept as what failed and the errno (`HypervisorError` is not `Clone`), so
    // every caller gets the same error; `None` is opening the device.
    static FACTS: OnceLock<
        std::result::Result<HostFacts, (Option<&'static str>, kvm_ioctls::Error)>,
    > = OnceLock::new();
    let facts = FACTS.get_or_init(|| {
        let kvm = Kvm::new().map_err(|e| (None, e))?;
        let msr_indices = kvm
            .get_msr_index_list()
            .map_err(|e| (Some("KVM_GET_MSR_INDEX_LIST"), e))?
            .as_slice()
            .to_vec();
        let xsave2 = kvm.check_extension_int(Cap::Xsave2);
        Ok(HostFacts {
            msr_indices,
            xsave2_size: usize::try_from(xsave2).ok().filter(|&n| n > 0),
            nested_state: kvm.check_extension(Cap::NestedState),
        })
    });
    facts.as_ref().map_err(|&(ioctl, errno)| match ioctl {
        Some(ioctl) => HypervisorError::ioctl(ioctl, errno),
        None => HypervisorError::Open {
            path: "/dev/kvm".into(),
            source: errno.into(),
        },
    })
}

fn op(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> HypervisorError {
    move |e| HypervisorError::ioctl(what, e)
}

impl VcpuSnapshot for KvmVcpu {
    fn save_state(&self) -> Result<(VcpuState, SkippedState)> {
        let fd = &self.fd;
        let facts = host_facts()?;
        let mut skipped = Vec::new();
        // MP state first: KVM_GET_MP_STATE makes KVM accept pending INIT/SIPI events, which can
        // change the registers and the LAPIC read below.
        let mp_state = fd.get_mp_state().map_err(op("KVM_GET_MP_STATE"))?.mp_state;
        let regs = fd.get_regs().map_err(op("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(op("KVM_GET_SREGS"))?;
        let fpu = fd.get_fpu().map_err(op("KVM_GET_FPU"))?;
        let xsave = read_xsave(fd, facts)?;
        let xcrs = fd.get_xcrs().map_err(op("KVM_GET_XCRS"))?;
        let debug_regs = fd.get_debug_regs().map_err(op("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(op("KVM_GET_LAPIC"))?;
        // The TSC frequency is informative on the same host; a host that cannot report it
        // (no KVM_CAP_GET_TSC_KHZ) gives a snapshot that restores only on a like host.
        let tsc_khz = fd.get_tsc_khz().ok();
        if tsc_khz.is_none() {
            skipped.push("TSC frequency (KVM_GET_TSC_KHZ failed)".to_string());
        }
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(op("KVM_GET_CPUID2"))?;
        let msrs = read_msrs(fd, &facts.msr_indices)?;
        log::debug!(
            "vCPU state: {} of the {} MSRs KVM lists read back; XSAVE area {} bytes",
            msrs.len(),
            facts.msr_indices.len(),
            xsave.len()
        );
        if facts.nested_state {
            check_nested_state(fd, &mut skipped)?;
        } else {
            skipped.push("nested virtualization state (host lacks KVM_CAP_NESTED_STATE)".into());
        }
        // Events last: the GET ioctls above may still have moved a pending event, and this is
        // the one that must reflect the final word.
        let events = fd.get_vcpu_events().map_err(op("KVM_GET_VCPU_EVENTS"))?;
        let state = VcpuState {
            cpuid: cpuid
                .as_slice()
                .iter()
                .map(|e| CpuidLeaf::from(&convert::cpuid_from_kvm(e)))
                .collect(),
            mp_state,
            regs: convert::regs_from_kvm(&regs),
            sregs: convert::sregs_from_kvm(&sregs),
            interrupt_bitmap: sregs.interrupt_bitmap,
            fpu: sc::fpu_from_kvm(&fpu),
            xsave: Some(xsave),
            xcrs: sc::xcrs_from_kvm(&xcrs),
            debug_regs: sc::debugregs_from_kvm(&debug_regs),
            lapic: lapic.regs.iter().map(|&b| b as u8).collect(),
            msrs,
            events: sc::events_from_kvm(&events),
            tsc_khz,
        };
        Ok((state, skipped))
    }

    fn restore_state(&self, state: &VcpuState) -> Result<()> {
        let fd = &self.fd;
        let facts = host_facts()?;
        state
            .validate()
            .map_err(|e| HypervisorError::InvalidState {
                what: "vCPU",
                source: Box::new(e),
            })?;
        // 1. CPUID first: it decides which MSRs, XSAVE components and CR4 bits KVM accepts below.
        let cpuid: Vec<_> = state
            .cpuid
            .iter()
            .map(|l| convert::cpuid_to_kvm(&l.into()))
            .collect();
        let cpuid = kvm_bindings::CpuId::from_entries(&cpuid).map_err(|_| {
            HypervisorError::ListTooLong {
                what: "CPUID leaves",
                count: cpuid.len(),
            }
        })?;
        fd.set_cpuid2(&cpuid).map_err(op("KVM_SET_CPUID2"))?;
        // 2. TSC frequency before the TSC value, so the restored TSC counts at the saved rate.
        if let Some(khz) = state.tsc_khz {
            restore_tsc_khz(fd, khz)?;
        }
        // 3. Special registers before the LAPIC: they carry IA32_APIC_BASE, which decides
        //    whether KVM reads the LAPIC page below as xAPIC or x2APIC.
        let base = fd.get_sregs().map_err(op("KVM_GET_SREGS"))?;
        let mut sregs = convert::sregs_to_kvm(&state.sregs, &base);
        sregs.interrupt_bitmap = state.interrupt_bitmap;
        fd.set_sregs(&sregs).map_err(op("KVM_SET_SREGS"))?;
        // 4. General registers (KVM_SET_REGS drops a pending exception; the events restored
        //    last put it back).
        fd.set_regs(&convert::regs_to_kvm(&state.regs))
            .map_err(op("KVM_SET_REGS"))?;
        // 5. FPU, then the XSAVE area, which contains the FPU image too and so wins; XCR0 after
        //    it, as KVM checks the XSAVE header against the guest's CPUID, not XCR0.
        fd.set_fpu(&sc::fpu_to_kvm(&state.fpu))
            .map_err(op("KVM_SET_FPU"))?;
        if let Some(xsave) = &state.xsave {
            write_xsave(fd, facts, xsave)?;
        }
        fd.set_xcrs(&sc::xcrs_to_kvm(&state.xcrs))
            .map_err(op("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&sc::debugregs_to_kvm(&state.debug_regs))
            .map_err(op("KVM_SET_DEBUGREGS"))?;
        // 6. LAPIC after the sregs (APIC base, above) and before the MSRs: KVM accepts the TSC
        //    deadline only while the LAPIC timer is in TSC-deadline mode.
        let mut lapic = kvm_bindings::kvm_lapic_state::default();
        for (dst, &src) in lapic.regs.iter_mut().zip(&state.lapic) {
            *dst = src as std::os::raw::c_char;
        }
        fd.set_lapic(&lapic).map_err(op("KVM_SET_LAPIC"))?;
        // 7. MSRs, with IA32_TSC_DEADLINE in a second, later call: the deadline is compared with
        //    the TSC, so the TSC must hold its restored value first.
        let (deadline, rest): (Vec<MsrValue>, Vec<MsrValue>) = state
            .msrs
            .iter()
            .partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
        write_msrs(fd, &rest)?;
        write_msrs(fd, &deadline)?;
        // 8. MP state after the LAPIC (a vCPU waiting for SIPI needs its LAPIC in place) and
        //    after the registers, which KVM_SET_MP_STATE may reset for INIT_RECEIVED.
        fd.set_mp_state(kvm_bindings::kvm_mp_state {
            mp_state: state.mp_state,
        })
        .map_err(op("KVM_SET_MP_STATE"))?;
        // 9. Events last: KVM_SET_REGS, KVM_SET_SREGS and KVM_SET_MP_STATE clear or change
        //    pending exceptions, interrupts and NMIs; this puts the saved ones back.
        fd.set_vcpu_events(&sc::events_to_kvm(&state.events))
            .map_err(op("KVM_SET_VCPU_EVENTS"))?;
        // Tell a kvmclock guest it was stopped, so its soft-lockup watchdog does not fire.
        // Fails with EINVAL when the guest never enabled kvmclock; nothing to tell then.
        let _ = fd.kvmclock_ctrl();
        Ok(())
    }
}

/// Returns the XSAVE area as bytes: KVM_GET_XSAVE2 when the host has it (the area may be larger
/// than 4 KiB with AMX), else KVM_GET_XSAVE.
fn read_xsave(fd: &VcpuFd, facts: &HostFacts) -> Result<Vec<u8>> {
    let words: Vec<u32> = match facts.xsave2_size {
        Some(size) if size > std::mem::size_of::<kvm_xsave>() => {
            let mut xsave = new_xsave(size)?;
            // SAFETY: `xsave` was allocated for `size` bytes, the size KVM_CAP_XSAVE2 reported
            // for this host, which is what KVM_GET_XSAVE2 writes.
            unsafe { fd.get_xsave2(&mut xsave) }.map_err(op("KVM_GET_XSAVE2"))?;
            let s = xsave.as_fam_struct_ref();
            s.xsave
                .region
                .iter()
                .chain(xsave.as_slice())
                .copied()
                .collect()
        }
        _ => fd.get_xsave().map_err(op("KVM_GET_XSAVE"))?.region.to_vec(),
    };
    Ok(words.iter().flat_map(|w| w.to_le_bytes()).collect())
}

fn new_xsave(size: usize) -> Result<Xsave> {
    let extra = size
        .saturating_sub(std::mem::size_of::<kvm_xsave>())
        .div_ceil(std::mem::size_of::<u32>());
    Xsave::new(extra).map_err(|_| HypervisorError::XsaveAllocation { size })
}

fn write_xsave(fd: &VcpuFd, facts: &HostFacts, bytes: &[u8]) -> Result<()> {
    // The buffer must be at least as large as the host's XSAVE area, which KVM reads whole;
    // bytes beyond what was saved stay zero (components the saved guest never enabled).
    let host = facts.xsave2_size.unwrap_or(XSAVE_LEGACY_SIZE);
    let size = host.max(bytes.len()).max(XSAVE_LEGACY_SIZE);
    let mut xsave = new_xsave(size)?;
    let words = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    let legacy_words = XSAVE_LEGACY_SIZE / 4;
    let mut words = words.enumerate();
    {
        // SAFETY: only the fixed `region` array is written; the FAM length stays untouched.
        let s = unsafe { xsave.as_mut_fam_struct() };
        for (i, w) in words.by_ref().take(legacy_words) {
            s.xsave.region[i] = w;
        }
    }
    for (i, w) in words {
        if let Some(slot) = xsave.as_mut_slice().get_mut(i - legacy_words) {
            *slot = w;
        }
    }
    // SAFETY: `xsave` holds at least the host's XSAVE size (KVM_CAP_XSAVE2, or 4 KiB without
    // it), so KVM_SET_XSAVE reads only memory the buffer owns.
    unsafe { fd.set_xsave2(&xsave) }.map_err(op("KVM_SET_XSAVE"))
}

fn restore_tsc_khz(fd: &VcpuFd, saved: u32) -> Result<()> {
    let Ok(current) = fd.get_tsc_khz() else {
        return Ok(());
    };
    let diff = u64::from(current.abs_diff(saved));
    if diff * 1_000_000 > u64::from(saved) * TSC_KHZ_TOLERANCE_PPM {
        fd.set_tsc_khz(saved)
            .map_err(|e| HypervisorError::TscFrequency {
                saved_khz: saved,
                host_khz: current,
                source: e.into(),
            })?;
    }
    Ok(())
}

/// Nested virtualization state: PVM hosts (and others) answer KVM_GET_NESTED_STATE with EINVAL;
/// that is noted and skipped. A guest actually running a nested guest is refused, since its
/// state would be lost.
fn check_nested_state(fd: &VcpuFd, skipped: &mut SkippedState) -> Result<()> {
    let mut buffer = KvmNestedStateBuffer::empty();
    match fd.nested_state(&mut buffer) {
        Ok(None) => Ok(()),
        Ok(Some(_)) => Err(HypervisorError::NestedGuest),
        Err(e) => {
            skipped.push(format!(
                "nested virtualization state (KVM_GET_NESTED_STATE: {e})"
            ));
            Ok(())
        }
    }
}
