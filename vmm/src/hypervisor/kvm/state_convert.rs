//! Conversions between KVM's state structures and the neutral snapshot types in
//! `hypervisor/state.rs`: FPU, XCRs, debug registers, vCPU events, PIC, IOAPIC, PIT and clock.
//! Field by field, no ioctls; `vcpu_state.rs` and `vm_state.rs` call them in the right order.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_ioapic_state, kvm_pic_state, kvm_pit_channel_state,
    kvm_pit_state2, kvm_vcpu_events, kvm_xcr, kvm_xcrs, KVM_CLOCK_TSC_STABLE,
};

use crate::hypervisor::state::{
    ClockState, DebugRegisters, FpuState, IoapicState, PicState, PitChannel, PitState, VcpuEvents,
    Xcr, IOAPIC_PINS,
};

pub(super) fn fpu_from_kvm(f: &kvm_fpu) -> FpuState {
    FpuState {
        fpr: f.fpr,
        fcw: f.fcw,
        fsw: f.fsw,
        ftwx: f.ftwx,
        last_opcode: f.last_opcode,
        last_ip: f.last_ip,
        last_dp: f.last_dp,
        xmm: f.xmm,
        mxcsr: f.mxcsr,
    }
}

pub(super) fn fpu_to_kvm(f: &FpuState) -> kvm_fpu {
    kvm_fpu {
        fpr: f.fpr,
        fcw: f.fcw,
        fsw: f.fsw,
        ftwx: f.ftwx,
        last_opcode: f.last_opcode,
        last_ip: f.last_ip,
        last_dp: f.last_dp,
        xmm: f.xmm,
        mxcsr: f.mxcsr,
        ..Default::default()
    }
}

pub(super) fn xcrs_from_kvm(x: &kvm_xcrs) -> Vec<Xcr> {
    let n = usize::try_from(x.nr_xcrs).unwrap_or(0).min(x.xcrs.len());
    x.xcrs[..n]
        .iter()
        .map(|x| Xcr {
            index: x.xcr,
            value: x.value,
        })
        .collect()
}

/// At most 16 XCRs fit; `VcpuState::validate` has checked that before this is called.
pub(super) fn xcrs_to_kvm(x: &[Xcr]) -> kvm_xcrs {
    let mut out = kvm_xcrs::default();
    for (dst, src) in out.xcrs.iter_mut().zip(x) {
        *dst = kvm_xcr {
            xcr: src.index,
            value: src.value,
            ..Default::default()
        };
    }
    out.nr_xcrs = u32::try_from(x.len().min(out.xcrs.len())).unwrap_or(0);
    out
}

pub(super) fn debugregs_from_kvm(d: &kvm_debugregs) -> DebugRegisters {
    DebugRegisters {
        db: d.db,
        dr6: d.dr6,
        dr7: d.dr7,
        flags: d.flags,
    }
}

pub(super) fn debugregs_to_kvm(d: &DebugRegisters) -> kvm_debugregs {
    kvm_debugregs {
        db: d.db,
        dr6: d.dr6,
        dr7: d.dr7,
        flags: d.flags,
        ..Default::default()
    }
}

pub(super) fn events_from_kvm(e: &kvm_vcpu_events) -> VcpuEvents {
    VcpuEvents {
        exception_injected: e.exception.injected,
        exception_nr: e.exception.nr,
        exception_has_error_code: e.exception.has_error_code,
        exception_pending: e.exception.pending,
        exception_error_code: e.exception.error_code,
        exception_has_payload: e.exception_has_payload,
        exception_payload: e.exception_payload,
        interrupt_injected: e.interrupt.injected,
        interrupt_nr: e.interrupt.nr,
        interrupt_soft: e.interrupt.soft,
        interrupt_shadow: e.interrupt.shadow,
        nmi_injected: e.nmi.injected,
        nmi_pending: e.nmi.pending,
        nmi_masked: e.nmi.masked,
        sipi_vector: e.sipi_vector,
        flags: e.flags,
        smi_smm: e.smi.smm,
        smi_pending: e.smi.pending,
        smi_inside_nmi: e.smi.smm_inside_nmi,
        smi_latched_init: e.smi.latched_init,
        triple_fault_pending: e.triple_fault.pending,
    }
}

pub(super) fn events_to_kvm(e: &VcpuEvents) -> kvm_vcpu_events {
    let mut k = kvm_vcpu_events::default();
    k.exception.injected = e.exception_injected;
    k.exception.nr = e.exception_nr;
    k.exception.has_error_code = e.exception_has_error_code;
    k.exception.pending = e.exception_pending;
    k.exception.error_code = e.exception_error_code;
    k.exception_has_payload = e.exception_has_payload;
    k.exception_payload = e.exception_payload;
    k.interrupt.injected = e.interrupt_injected;
    k.interrupt.nr = e.interrupt_nr;
    k.interrupt.soft = e.interrupt_soft;
    k.interrupt.shadow = e.interrupt_shadow;
    k.nmi.injected = e.nmi_injected;
    k.nmi.pending = e.nmi_pending;
    k.nmi.masked = e.nmi_masked;
    k.sipi_vector = e.sipi_vector;
    k.flags = e.flags;
    k.smi.smm = e.smi_smm;
    k.smi.pending = e.smi_pending;
    k.smi.smm_inside_nmi = e.smi_inside_nmi;
    k.smi.latched_init = e.smi_latched_init;
    k.triple_fault.pending = e.triple_fault_pending;
    k
}

pub(super) fn pic_from_kvm(p: &kvm_pic_state) -> PicState {
    PicState {
        last_irr: p.last_irr,
        irr: p.irr,
        imr: p.imr,
        isr: p.isr,
        priority_add: p.priority_add,
        irq_base: p.irq_base,
        read_reg_select: p.read_reg_select,
        poll: p.poll,
        special_mask: p.special_mask,
        init_state: p.init_state,
        auto_eoi: p.auto_eoi,
        rotate_on_auto_eoi: p.rotate_on_auto_eoi,
        special_fully_nested_mode: p.special_fully_nested_mode,
        init4: p.init4,
        elcr: p.elcr,
        elcr_mask: p.elcr_mask,
    }
}

pub(super) fn pic_to_kvm(p: &PicState) -> kvm_pic_state {
    kvm_pic_state {
        last_irr: p.last_irr,
        irr: p.irr,
        imr: p.imr,
        isr: p.isr,
        priority_add: p.priority_add,
        irq_base: p.irq_base,
        read_reg_select: p.read_reg_select,
        poll: p.poll,
        special_mask: p.special_mask,
        init_state: p.init_state,
        auto_eoi: p.auto_eoi,
        rotate_on_auto_eoi: p.rotate_on_auto_eoi,
        special_fully_nested_mode: p.special_fully_nested_mode,
        init4: p.init4,
        elcr: p.elcr,
        elcr_mask: p.elcr_mask,
    }
}

pub(super) fn ioapic_from_kvm(s: &kvm_ioapic_state) -> IoapicState {
    IoapicState {
        base_address: s.base_address,
        ioregsel: s.ioregsel,
        id: s.id,
        irr: s.irr,
        redirection_table: s
            .redirtbl
            .iter()
            // SAFETY: both union members are plain integers covering the same 8 bytes, so
            // reading `bits` is valid whatever KVM wrote.
            .map(|e| unsafe { e.bits })
            .collect(),
    }
}

/// `s.redirection_table` must hold `IOAPIC_PINS` entries (`VmState::validate`); extra entries
/// are ignored and missing ones stay masked-zero.
pub(super) fn ioapic_to_kvm(s: &IoapicState) -> kvm_ioapic_state {
    // SAFETY: kvm_ioapic_state is plain old data; all-zero is a valid value.
    let mut k: kvm_ioapic_state = unsafe { std::mem::zeroed() };
    k.base_address = s.base_address;
    k.ioregsel = s.ioregsel;
    k.id = s.id;
    k.irr = s.irr;
    for (dst, &bits) in k
        .redirtbl
        .iter_mut()
        .zip(s.redirection_table.iter().take(IOAPIC_PINS))
    {
        dst.bits = bits;
    }
    k
}

fn pit_channel_from_kvm(c: &kvm_pit_channel_state) -> PitChannel {
    PitChannel {
        count: c.count,
        latched_count: c.latched_count,
        count_latched: c.count_latched,
        status_latched: c.status_latched,
        status: c.status,
        read_state: c.read_state,
        write_state: c.write_state,
        write_latch: c.write_latch,
        rw_mode: c.rw_mode,
        mode: c.mode,
        bcd: c.bcd,
        gate: c.gate,
        count_load_time: c.count_load_time,
    }
}

fn pit_channel_to_kvm(c: &PitChannel) -> kvm_pit_channel_state {
    kvm_pit_channel_state {
        count: c.count,
        latched_count: c.latched_count,
        count_latched: c.count_latched,
        status_latched: c.status_latched,
        status: c.status,
        read_state: c.read_state,
        write_state: c.write_state,
        write_latch: c.write_latch,
        rw_mode: c.rw_mode,
        mode: c.mode,
        bcd: c.bcd,
        gate: c.gate,
        count_load_time: c.count_load_time,
    }
}

pub(super) fn pit_from_kvm(p: &kvm_pit_state2) -> PitState {
    PitState {
        channels: [
            pit_channel_from_kvm(&p.channels[0]),
            pit_channel_from_kvm(&p.channels[1]),
            pit_channel_from_kvm(&p.channels[2]),
        ],
        flags: p.flags,
    }
}

pub(super) fn pit_to_kvm(p: &PitState) -> kvm_pit_state2 {
    kvm_pit_state2 {
        channels: [
            pit_channel_to_kvm(&p.channels[0]),
            pit_channel_to_kvm(&p.channels[1]),
            pit_channel_to_kvm(&p.channels[2]),
        ],
        flags: p.flags,
        ..Default::default()
    }
}

pub(super) fn clock_from_kvm(c: &kvm_clock_data) -> ClockState {
    ClockState {
        clock_ns: c.clock,
        tsc_stable: c.flags & KVM_CLOCK_TSC_STABLE != 0,
    }
}

/// The clock to set: the saved value and no flags. Without KVM_CLOCK_REALTIME KVM does not
/// advance it by the wall time since the save, so the guest's clock continues exactly where it
/// stopped (as its TSC does, restored from the saved MSR).
pub(super) fn clock_to_kvm(c: &ClockState) -> kvm_clock_data {
    kvm_clock_data {
        clock: c.clock_ns,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_every_field() {
        let e = VcpuEvents {
            exception_injected: 1,
            exception_nr: 14,
            exception_has_error_code: 1,
            exception_pending: 1,
            exception_error_code: 6,
            exception_has_payload: 1,
            exception_payload: 0xdead,
            interrupt_injected: 1,
            interrupt_nr: 0x30,
            interrupt_soft: 1,
            interrupt_shadow: 2,
            nmi_injected: 1,
            nmi_pending: 1,
            nmi_masked: 1,
            sipi_vector: 8,
            flags: 0x3f,
            smi_smm: 1,
            smi_pending: 1,
            smi_inside_nmi: 1,
            smi_latched_init: 1,
            triple_fault_pending: 1,
        };
        assert_eq!(events_from_kvm(&events_to_kvm(&e)), e);
    }

    #[test]
    fn fpu_xcrs_debugregs_round_trip() {
        let mut f = FpuState {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 7,
            ..Default::default()
        };
        f.xmm[15][3] = 9;
        f.fpr[7][0] = 1;
        assert_eq!(fpu_from_kvm(&fpu_to_kvm(&f)), f);
        let x = vec![Xcr { index: 0, value: 7 }];
        assert_eq!(xcrs_from_kvm(&xcrs_to_kvm(&x)), x);
        let d = DebugRegisters {
            db: [1, 2, 3, 4],
            dr6: 0xffff_0ff0,
            dr7: 0x400,
            flags: 0,
        };
        assert_eq!(debugregs_from_kvm(&debugregs_to_kvm(&d)), d);
    }

    #[test]
    fn platform_devices_round_trip() {
        let pic = PicState {
            irr: 1,
            imr: 0xfb,
            irq_base: 0x20,
            elcr_mask: 0xf8,
            ..Default::default()
        };
        assert_eq!(pic_from_kvm(&pic_to_kvm(&pic)), pic);
        let ioapic = IoapicState {
            base_address: 0xfec0_0000,
            ioregsel: 0x10,
            id: 0,
            irr: 4,
            redirection_table: (0..IOAPIC_PINS as u64).map(|i| 0x1_0000 | i).collect(),
        };
        assert_eq!(ioapic_from_kvm(&ioapic_to_kvm(&ioapic)), ioapic);
        let mut pit = PitState {
            flags: 1,
            ..Default::default()
        };
        pit.channels[2] = PitChannel {
            count: 0x10000,
            mode: 3,
            gate: 1,
            count_load_time: -5,
            ..Default::default()
        };
        assert_eq!(pit_from_kvm(&pit_to_kvm(&pit)), pit);
        let clock = ClockState {
            clock_ns: 123_456,
            tsc_stable: false,
        };
        assert_eq!(clock_from_kvm(&clock_to_kvm(&clock)), clock);
    }
}
