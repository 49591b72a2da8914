//! Snapshot state of one vCPU and of one VM, in neutral, serializable types.
//!
//! These are the values a snapshot stores and a restore puts back: architectural x86_64 state
//! (registers, FPU/XSAVE, MSRs, local APIC page, pending events) and the platform devices a
//! hypervisor emulates in the kernel (PIC, IOAPIC, PIT, the paravirtual clock). The field names
//! follow the x86 and 8259/8254/82093 data sheets, not any hypervisor's structures; each backend
//! converts (`kvm/vcpu_state.rs`, `kvm/vm_state.rs`). Deliberately not here: the order in which
//! the values must be put back, which is a backend concern and documented next to its calls,
//! and the encoding on disk (`snapshot/state_file.rs`).
//!
//! Sizes a restore relies on (the LAPIC page, the XSAVE area) are checked by `validate`, since a
//! snapshot file is untrusted input.

use arch::regs::{
    CpuidEntry, DescriptorTable, MsrEntry, Segment, SpecialRegisters, StandardRegisters,
};
use serde::{Deserialize, Serialize};

/// Bytes in the local APIC register page.
pub const LAPIC_PAGE_SIZE: usize = 1024;
/// Bytes in the legacy (pre-XSAVE2) XSAVE area.
pub const XSAVE_LEGACY_SIZE: usize = 4096;
/// Largest XSAVE area a restore accepts (AMX tile data makes it about 11 KiB today).
pub const XSAVE_MAX_SIZE: usize = 64 * 1024;
/// Most MSRs, CPUID leaves or XCRs a restore accepts for one vCPU.
pub const MAX_LIST_ENTRIES: usize = 4096;
/// Pins of the IOAPIC.
pub const IOAPIC_PINS: usize = 24;

/// One saved vCPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID leaves the guest saw.
    pub cpuid: Vec<CpuidLeaf>,
    /// Multiprocessor state (runnable, halted, waiting for INIT/SIPI), as the hypervisor numbers it.
    pub mp_state: u32,
    /// General-purpose registers.
    #[serde(with = "StandardRegistersDef")]
    pub regs: StandardRegisters,
    /// Segment, descriptor-table and control registers.
    #[serde(with = "SpecialRegistersDef")]
    pub sregs: SpecialRegisters,
    /// Bitmap of the external interrupt pending injection (256 bits), kept with the sregs.
    pub interrupt_bitmap: [u64; 4],
    /// x87/SSE state.
    pub fpu: FpuState,
    /// The whole XSAVE area, if the host gave one (it supersedes `fpu`).
    pub xsave: Option<Vec<u8>>,
    /// Extended control registers (XCR0).
    pub xcrs: Vec<Xcr>,
    /// Debug registers.
    pub debug_regs: DebugRegisters,
    /// The local APIC register page (`LAPIC_PAGE_SIZE` bytes).
    pub lapic: Vec<u8>,
    /// Every MSR the host lists that could be read back, including the TSC and TSC deadline.
    pub msrs: Vec<MsrValue>,
    /// Exceptions, interrupts, NMIs and SMIs pending or being injected.
    pub events: VcpuEvents,
    /// The vCPU's TSC frequency in kHz, if the host reports it.
    pub tsc_khz: Option<u32>,
}

/// One CPUID leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct CpuidLeaf {
    pub function: u32,
    pub index: u32,
    pub significant_index: bool,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl From<&CpuidEntry> for CpuidLeaf {
    fn from(e: &CpuidEntry) -> Self {
        Self {
            function: e.function,
            index: e.index,
            significant_index: e.significant_index,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl From<&CpuidLeaf> for CpuidEntry {
    fn from(e: &CpuidLeaf) -> Self {
        Self {
            function: e.function,
            index: e.index,
            significant_index: e.significant_index,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

/// One MSR and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    /// MSR number.
    pub index: u32,
    /// Value.
    pub data: u64,
}

impl From<MsrValue> for MsrEntry {
    fn from(m: MsrValue) -> Self {
        Self {
            index: m.index,
            data: m.data,
        }
    }
}

/// One extended control register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xcr {
    /// XCR number (0 for XCR0).
    pub index: u32,
    /// Value.
    pub value: u64,
}

/// x87 and SSE registers (the FXSAVE image, unpacked).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

/// DR0-DR3, DR6, DR7.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct DebugRegisters {
    pub db: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
    pub flags: u64,
}

/// Events in flight on a vCPU: what the hypervisor would inject at the next entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct VcpuEvents {
    pub exception_injected: u8,
    pub exception_nr: u8,
    pub exception_has_error_code: u8,
    pub exception_pending: u8,
    pub exception_error_code: u32,
    pub exception_has_payload: u8,
    pub exception_payload: u64,
    pub interrupt_injected: u8,
    pub interrupt_nr: u8,
    pub interrupt_soft: u8,
    pub interrupt_shadow: u8,
    pub nmi_injected: u8,
    pub nmi_pending: u8,
    pub nmi_masked: u8,
    pub sipi_vector: u32,
    /// Which of the optional fields are valid, as the hypervisor reported it.
    pub flags: u32,
    pub smi_smm: u8,
    pub smi_pending: u8,
    pub smi_inside_nmi: u8,
    pub smi_latched_init: u8,
    pub triple_fault_pending: u8,
}

/// One saved VM: the in-kernel platform devices and the clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259 PIC.
    pub pic_master: PicState,
    /// The slave 8259 PIC.
    pub pic_slave: PicState,
    /// The IOAPIC.
    pub ioapic: IoapicState,
    /// The 8254 PIT.
    pub pit: PitState,
    /// The paravirtual clock.
    pub clock: ClockState,
}

/// One 8259 PIC.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct PicState {
    pub last_irr: u8,
    pub irr: u8,
    pub imr: u8,
    pub isr: u8,
    pub priority_add: u8,
    pub irq_base: u8,
    pub read_reg_select: u8,
    pub poll: u8,
    pub special_mask: u8,
    pub init_state: u8,
    pub auto_eoi: u8,
    pub rotate_on_auto_eoi: u8,
    pub special_fully_nested_mode: u8,
    pub init4: u8,
    pub elcr: u8,
    pub elcr_mask: u8,
}

/// The IOAPIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct IoapicState {
    pub base_address: u64,
    pub ioregsel: u32,
    pub id: u32,
    pub irr: u32,
    /// One 64-bit redirection entry per pin (`IOAPIC_PINS`).
    pub redirection_table: Vec<u64>,
}

/// The 8254 PIT: three channels and the speaker/HPET-legacy flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    /// Channels 0-2.
    pub channels: [PitChannel; 3],
    /// Hypervisor flags (HPET legacy mode, speaker).
    pub flags: u32,
}

/// One PIT channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct PitChannel {
    pub count: u32,
    pub latched_count: u16,
    pub count_latched: u8,
    pub status_latched: u8,
    pub status: u8,
    pub read_state: u8,
    pub write_state: u8,
    pub write_latch: u8,
    pub rw_mode: u8,
    pub mode: u8,
    pub bcd: u8,
    pub gate: u8,
    /// When the count was loaded, in the hypervisor's clock (nanoseconds).
    pub count_load_time: i64,
}

/// The guest's paravirtual clock (kvmclock) at the moment it was saved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockState {
    /// Guest clock in nanoseconds.
    pub clock_ns: u64,
    /// Whether the host reported the clock as stable across vCPUs.
    pub tsc_stable: bool,
}

/// A problem with a saved state that makes it unusable (from a corrupt or foreign snapshot).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// A field has the wrong length.
    #[error("saved {what} has {actual} entries/bytes; expected {expected}")]
    Length {
        /// Which field.
        what: &'static str,
        /// Its length.
        actual: usize,
        /// What it must be (or at most).
        expected: String,
    },
}

impl VcpuState {
    /// Checks the sizes a restore relies on.
    pub fn validate(&self) -> Result<(), StateError> {
        check_exact("LAPIC page", self.lapic.len(), LAPIC_PAGE_SIZE)?;
        if let Some(x) = &self.xsave {
            if x.len() < XSAVE_LEGACY_SIZE || x.len() > XSAVE_MAX_SIZE || x.len() % 4 != 0 {
                return Err(StateError::Length {
                    what: "XSAVE area",
                    actual: x.len(),
                    expected: format!(
                        "a multiple of 4 from {XSAVE_LEGACY_SIZE} to {XSAVE_MAX_SIZE}"
                    ),
                });
            }
        }
        check_at_most("CPUID list", self.cpuid.len(), MAX_LIST_ENTRIES)?;
        check_at_most("MSR list", self.msrs.len(), MAX_LIST_ENTRIES)?;
        check_at_most("XCR list", self.xcrs.len(), 16)?;
        Ok(())
    }
}

impl VmState {
    /// Checks the sizes a restore relies on.
    pub fn validate(&self) -> Result<(), StateError> {
        check_exact(
            "IOAPIC redirection table",
            self.ioapic.redirection_table.len(),
            IOAPIC_PINS,
        )
    }
}

fn check_exact(what: &'static str, actual: usize, expected: usize) -> Result<(), StateError> {
    if actual != expected {
        return Err(StateError::Length {
            what,
            actual,
            expected: expected.to_string(),
        });
    }
    Ok(())
}

fn check_at_most(what: &'static str, actual: usize, max: usize) -> Result<(), StateError> {
    if actual > max {
        return Err(StateError::Length {
            what,
            actual,
            expected: format!("at most {max}"),
        });
    }
    Ok(())
}

// serde mirrors of the `arch::regs` types (which carry no serde derives of their own).

#[derive(Serialize, Deserialize)]
#[serde(remote = "StandardRegisters")]
struct StandardRegistersDef {
    rax: u64,
    rbx: u64,
    rcx: u64,
    rdx: u64,
    rsi: u64,
    rdi: u64,
    rsp: u64,
    rbp: u64,
    r8: u64,
    r9: u64,
    r10: u64,
    r11: u64,
    r12: u64,
    r13: u64,
    r14: u64,
    r15: u64,
    rip: u64,
    rflags: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(remote = "Segment")]
struct SegmentDef {
    base: u64,
    limit: u32,
    selector: u16,
    type_: u8,
    present: bool,
    dpl: u8,
    db: bool,
    s: bool,
    l: bool,
    g: bool,
    avl: bool,
    unusable: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(remote = "DescriptorTable")]
struct DescriptorTableDef {
    base: u64,
    limit: u16,
}

#[derive(Serialize, Deserialize)]
#[serde(remote = "SpecialRegisters")]
struct SpecialRegistersDef {
    #[serde(with = "SegmentDef")]
    cs: Segment,
    #[serde(with = "SegmentDef")]
    ds: Segment,
    #[serde(with = "SegmentDef")]
    es: Segment,
    #[serde(with = "SegmentDef")]
    fs: Segment,
    #[serde(with = "SegmentDef")]
    gs: Segment,
    #[serde(with = "SegmentDef")]
    ss: Segment,
    #[serde(with = "SegmentDef")]
    tr: Segment,
    #[serde(with = "SegmentDef")]
    ldt: Segment,
    #[serde(with = "DescriptorTableDef")]
    gdt: DescriptorTable,
    #[serde(with = "DescriptorTableDef")]
    idt: DescriptorTable,
    cr0: u64,
    cr2: u64,
    cr3: u64,
    cr4: u64,
    cr8: u64,
    efer: u64,
    apic_base: u64,
}

/// What a snapshot could not save on this host, with the reason (for the manifest's notes).
pub type SkippedState = Vec<String>;

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn sample_vcpu() -> VcpuState {
        VcpuState {
            cpuid: vec![CpuidLeaf {
                function: 1,
                index: 0,
                significant_index: false,
                eax: 1,
                ebx: 2,
                ecx: 3,
                edx: 4,
            }],
            mp_state: 0,
            regs: StandardRegisters {
                rip: 0x1000,
                rflags: 2,
                ..Default::default()
            },
            sregs: SpecialRegisters::default(),
            interrupt_bitmap: [0; 4],
            fpu: FpuState::default(),
            xsave: Some(vec![0; XSAVE_LEGACY_SIZE]),
            xcrs: vec![Xcr { index: 0, value: 3 }],
            debug_regs: DebugRegisters::default(),
            lapic: vec![0; LAPIC_PAGE_SIZE],
            msrs: vec![MsrValue {
                index: 0x10,
                data: 42,
            }],
            events: VcpuEvents::default(),
            tsc_khz: Some(2_000_000),
        }
    }

    #[test]
    fn vcpu_state_survives_a_postcard_round_trip() {
        let s = sample_vcpu();
        let bytes = postcard::to_stdvec(&s).unwrap();
        let back: VcpuState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn validate_rejects_wrong_sizes() {
        let mut s = sample_vcpu();
        assert_eq!(s.validate(), Ok(()));
        s.lapic.pop();
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("LAPIC page has 1023"));
        let mut s = sample_vcpu();
        s.xsave = Some(vec![0; 100]);
        assert!(s.validate().unwrap_err().to_string().contains("XSAVE area"));
        let vm = VmState {
            pic_master: PicState::default(),
            pic_slave: PicState::default(),
            ioapic: IoapicState {
                base_address: 0xfec0_0000,
                ioregsel: 0,
                id: 0,
                irr: 0,
                redirection_table: vec![0; 3],
            },
            pit: PitState::default(),
            clock: ClockState::default(),
        };
        assert!(vm.validate().is_err());
    }
}
