//! The neutral register types (`arch::regs`) as WHP register lists: names (the
//! `WHV_REGISTER_NAME` codes) and values, segment attributes packed as
//! `WHV_X64_SEGMENT_REGISTER` holds them, and back. Platform-neutral and unit-tested on Linux;
//! a Windows test checks the codes against the `windows` crate.

use arch::regs::{DescriptorTable, Segment, SpecialRegisters, StandardRegisters};

/// The WHP registers skiff reads and writes, with their `WHV_REGISTER_NAME` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
#[repr(i32)]
pub enum WhpRegister {
    Rax = 0x00,
    Rcx = 0x01,
    Rdx = 0x02,
    Rbx = 0x03,
    Rsp = 0x04,
    Rbp = 0x05,
    Rsi = 0x06,
    Rdi = 0x07,
    R8 = 0x08,
    R9 = 0x09,
    R10 = 0x0a,
    R11 = 0x0b,
    R12 = 0x0c,
    R13 = 0x0d,
    R14 = 0x0e,
    R15 = 0x0f,
    Rip = 0x10,
    Rflags = 0x11,
    Es = 0x12,
    Cs = 0x13,
    Ss = 0x14,
    Ds = 0x15,
    Fs = 0x16,
    Gs = 0x17,
    Ldtr = 0x18,
    Tr = 0x19,
    Idtr = 0x1a,
    Gdtr = 0x1b,
    Cr0 = 0x1c,
    Cr2 = 0x1d,
    Cr3 = 0x1e,
    Cr4 = 0x1f,
    Cr8 = 0x20,
    Tsc = 0x2000,
    Efer = 0x2001,
    KernelGsBase = 0x2002,
    ApicBase = 0x2003,
    Pat = 0x2004,
    SysenterCs = 0x2005,
    SysenterEip = 0x2006,
    SysenterEsp = 0x2007,
    Star = 0x2008,
    Lstar = 0x2009,
    Cstar = 0x200a,
    Sfmask = 0x200b,
    MtrrDefType = 0x200e,
    TscAux = 0x207b,
}

/// The WHP register that holds MSR `index`, or `None` when WHP does not expose it as a
/// register (`IA32_MISC_ENABLE`, for one: the hypervisor owns it).
pub fn msr_register(index: u32) -> Option<WhpRegister> {
    use WhpRegister as R;
    Some(match index {
        0x10 => R::Tsc,
        0x1b => R::ApicBase,
        0x174 => R::SysenterCs,
        0x175 => R::SysenterEsp,
        0x176 => R::SysenterEip,
        0x277 => R::Pat,
        0x2ff => R::MtrrDefType,
        0xc000_0080 => R::Efer,
        0xc000_0081 => R::Star,
        0xc000_0082 => R::Lstar,
        0xc000_0083 => R::Cstar,
        0xc000_0084 => R::Sfmask,
        0xc000_0102 => R::KernelGsBase,
        0xc000_0103 => R::TscAux,
        _ => return None,
    })
}

/// A segment as WHP holds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WhpSegment {
    /// Base.
    pub base: u64,
    /// Limit.
    pub limit: u32,
    /// Selector.
    pub selector: u16,
    /// Type (3:0), S (4), DPL (6:5), P (7), AVL (12), L (13), D/B (14), G (15).
    pub attributes: u16,
}

/// One register value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhpValue {
    /// A 64-bit register.
    U64(u64),
    /// A segment register.
    Segment(WhpSegment),
    /// GDTR or IDTR.
    Table(DescriptorTable),
}

/// The general-purpose registers in WHP order.
pub const STANDARD: [WhpRegister; 18] = [
    WhpRegister::Rax,
    WhpRegister::Rbx,
    WhpRegister::Rcx,
    WhpRegister::Rdx,
    WhpRegister::Rsi,
    WhpRegister::Rdi,
    WhpRegister::Rsp,
    WhpRegister::Rbp,
    WhpRegister::R8,
    WhpRegister::R9,
    WhpRegister::R10,
    WhpRegister::R11,
    WhpRegister::R12,
    WhpRegister::R13,
    WhpRegister::R14,
    WhpRegister::R15,
    WhpRegister::Rip,
    WhpRegister::Rflags,
];

/// `regs` as values for `STANDARD`, in the same order.
pub fn standard_values(regs: &StandardRegisters) -> [u64; 18] {
    let r = regs;
    [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags,
    ]
}

/// The registers from values read for `STANDARD`, in the same order.
pub fn standard_from_values(v: [u64; 18]) -> StandardRegisters {
    let [rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags] =
        v;
    StandardRegisters {
        rax,
        rbx,
        rcx,
        rdx,
        rsi,
        rdi,
        rsp,
        rbp,
        r8,
        r9,
        r10,
        r11,
        r12,
        r13,
        r14,
        r15,
        rip,
        rflags,
    }
}

/// Packs a segment's attributes. WHP has no "unusable" bit: an unusable segment is written as
/// not present, which is what the CPU checks.
pub fn segment_to_whp(s: &Segment) -> WhpSegment {
    let present = s.present && !s.unusable;
    let attributes = u16::from(s.type_ & 0xf)
        | (u16::from(s.s) << 4)
        | (u16::from(s.dpl & 0x3) << 5)
        | (u16::from(present) << 7)
        | (u16::from(s.avl) << 12)
        | (u16::from(s.l) << 13)
        | (u16::from(s.db) << 14)
        | (u16::from(s.g) << 15);
    WhpSegment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        attributes,
    }
}

/// Unpacks a segment; a segment that is not present is reported unusable.
pub fn segment_from_whp(w: &WhpSegment) -> Segment {
    let a = w.attributes;
    let bit = |n: u32| a & (1 << n) != 0;
    Segment {
        base: w.base,
        limit: w.limit,
        selector: w.selector,
        type_: (a & 0xf) as u8,
        s: bit(4),
        dpl: ((a >> 5) & 0x3) as u8,
        present: bit(7),
        avl: bit(12),
        l: bit(13),
        db: bit(14),
        g: bit(15),
        unusable: !bit(7),
    }
}

/// `sregs` as a WHP register list.
pub fn special_to_whp(sregs: &SpecialRegisters) -> Vec<(WhpRegister, WhpValue)> {
    use WhpRegister as R;
    let seg = |s: &Segment| WhpValue::Segment(segment_to_whp(s));
    vec![
        (R::Cs, seg(&sregs.cs)),
        (R::Ds, seg(&sregs.ds)),
        (R::Es, seg(&sregs.es)),
        (R::Fs, seg(&sregs.fs)),
        (R::Gs, seg(&sregs.gs)),
        (R::Ss, seg(&sregs.ss)),
        (R::Tr, seg(&sregs.tr)),
        (R::Ldtr, seg(&sregs.ldt)),
        (R::Gdtr, WhpValue::Table(sregs.gdt)),
        (R::Idtr, WhpValue::Table(sregs.idt)),
        (R::Cr0, WhpValue::U64(sregs.cr0)),
        (R::Cr2, WhpValue::U64(sregs.cr2)),
        (R::Cr3, WhpValue::U64(sregs.cr3)),
        (R::Cr4, WhpValue::U64(sregs.cr4)),
        (R::Cr8, WhpValue::U64(sregs.cr8)),
        (R::Efer, WhpValue::U64(sregs.efer)),
        (R::ApicBase, WhpValue::U64(sregs.apic_base)),
    ]
}

/// The special registers from a list read back for the names `special_to_whp` gives, or
/// `None` if a register is missing or has the wrong kind of value.
pub fn special_from_whp(values: &[(WhpRegister, WhpValue)]) -> Option<SpecialRegisters> {
    use WhpRegister as R;
    let get = |name: WhpRegister| values.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    let seg = |name| match get(name)? {
        WhpValue::Segment(s) => Some(segment_from_whp(&s)),
        _ => None,
    };
    let table = |name| match get(name)? {
        WhpValue::Table(t) => Some(t),
        _ => None,
    };
    let u64_of = |name| match get(name)? {
        WhpValue::U64(v) => Some(v),
        _ => None,
    };
    Some(SpecialRegisters {
        cs: seg(R::Cs)?,
        ds: seg(R::Ds)?,
        es: seg(R::Es)?,
        fs: seg(R::Fs)?,
        gs: seg(R::Gs)?,
        ss: seg(R::Ss)?,
        tr: seg(R::Tr)?,
        ldt: seg(R::Ldtr)?,
        gdt: table(R::Gdtr)?,
        idt: table(R::Idtr)?,
        cr0: u64_of(R::Cr0)?,
        cr2: u64_of(R::Cr2)?,
        cr3: u64_of(R::Cr3)?,
        cr4: u64_of(R::Cr4)?,
        cr8: u64_of(R::Cr8)?,
        efer: u64_of(R::Efer)?,
        apic_base: u64_of(R::ApicBase)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code64() -> Segment {
        Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x10,
            type_: 0xb,
            present: true,
            dpl: 0,
            db: false,
            s: true,
            l: true,
            g: true,
            avl: false,
            unusable: false,
        }
    }

    #[test]
    fn a_64_bit_code_segment_packs_as_the_whp_headers_lay_it_out() {
        let w = segment_to_whp(&code64());
        // Type 0xb, S, P, L, G: 0xa09b, the access rights a 64-bit kernel CS has.
        assert_eq!(w.attributes, 0xa09b);
        assert_eq!((w.base, w.limit, w.selector), (0, 0xffff_ffff, 0x10));
        assert_eq!(segment_from_whp(&w), code64());
    }

    #[test]
    fn every_attribute_bit_round_trips() {
        let s = Segment {
            type_: 0x3,
            dpl: 3,
            db: true,
            avl: true,
            l: false,
            ..code64()
        };
        let w = segment_to_whp(&s);
        assert_eq!(w.attributes, 0xd0f3);
        assert_eq!(segment_from_whp(&w), s);
    }

    #[test]
    fn an_unusable_segment_is_written_not_present_and_read_back_unusable() {
        let s = Segment {
            unusable: true,
            ..code64()
        };
        let w = segment_to_whp(&s);
        assert_eq!(w.attributes & 0x80, 0);
        let back = segment_from_whp(&w);
        assert!(back.unusable && !back.present);
    }

    #[test]
    fn standard_registers_round_trip_in_order() {
        let regs = StandardRegisters {
            rax: 1,
            rbx: 2,
            rcx: 3,
            rdx: 4,
            rsi: 5,
            rdi: 6,
            rsp: 7,
            rbp: 8,
            r8: 9,
            r15: 16,
            rip: 0x10_0000,
            rflags: 2,
            ..Default::default()
        };
        let values = standard_values(&regs);
        assert_eq!(
            values[STANDARD
                .iter()
                .position(|r| *r == WhpRegister::Rip)
                .unwrap()],
            0x10_0000
        );
        assert_eq!(
            values[STANDARD
                .iter()
                .position(|r| *r == WhpRegister::Rsp)
                .unwrap()],
            7
        );
        assert_eq!(standard_from_values(values), regs);
    }

    #[test]
    fn special_registers_round_trip_and_a_missing_one_is_refused() {
        let sregs = SpecialRegisters {
            cs: code64(),
            ss: Segment {
                type_: 0x3,
                l: false,
                ..code64()
            },
            gdt: DescriptorTable {
                base: 0x500,
                limit: 0x1f,
            },
            cr0: 0x8000_0011,
            cr3: 0x9000,
            cr4: 0x20,
            efer: 0x500,
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        let list = special_to_whp(&sregs);
        assert_eq!(list.len(), 17);
        let back = special_from_whp(&list).unwrap();
        // Default (all-zero) segments come back unusable: they are not present.
        assert_eq!(back.cs, sregs.cs);
        assert_eq!(back.ss, sregs.ss);
        assert!(back.ds.unusable);
        assert_eq!(
            (back.gdt, back.cr0, back.cr3),
            (sregs.gdt, sregs.cr0, sregs.cr3)
        );
        assert_eq!((back.efer, back.apic_base), (sregs.efer, sregs.apic_base));
        let without_efer: Vec<_> = list
            .iter()
            .copied()
            .filter(|(n, _)| *n != WhpRegister::Efer)
            .collect();
        assert_eq!(special_from_whp(&without_efer), None);
    }

    #[test]
    fn the_boot_msrs_have_registers_except_misc_enable() {
        for msr in arch::msr::boot_msrs() {
            let register = msr_register(msr.index);
            if msr.index == arch::msr::MSR_IA32_MISC_ENABLE {
                assert_eq!(register, None);
            } else {
                assert!(register.is_some(), "MSR {:#x}", msr.index);
            }
        }
        assert_eq!(msr_register(0x175), Some(WhpRegister::SysenterEsp));
        assert_eq!(msr_register(0x176), Some(WhpRegister::SysenterEip));
        assert_eq!(msr_register(0xc000_0084), Some(WhpRegister::Sfmask));
        assert_eq!(msr_register(0x3a), None);
    }

    #[cfg(windows)]
    #[test]
    fn the_codes_match_the_windows_headers() {
        use windows::Win32::System::Hypervisor as h;
        for (ours, theirs) in [
            (WhpRegister::Rax, h::WHvX64RegisterRax),
            (WhpRegister::R15, h::WHvX64RegisterR15),
            (WhpRegister::Rip, h::WHvX64RegisterRip),
            (WhpRegister::Rflags, h::WHvX64RegisterRflags),
            (WhpRegister::Es, h::WHvX64RegisterEs),
            (WhpRegister::Gs, h::WHvX64RegisterGs),
            (WhpRegister::Ldtr, h::WHvX64RegisterLdtr),
            (WhpRegister::Tr, h::WHvX64RegisterTr),
            (WhpRegister::Idtr, h::WHvX64RegisterIdtr),
            (WhpRegister::Gdtr, h::WHvX64RegisterGdtr),
            (WhpRegister::Cr0, h::WHvX64RegisterCr0),
            (WhpRegister::Cr8, h::WHvX64RegisterCr8),
            (WhpRegister::Efer, h::WHvX64RegisterEfer),
            (WhpRegister::ApicBase, h::WHvX64RegisterApicBase),
            (WhpRegister::Tsc, h::WHvX64RegisterTsc),
            (WhpRegister::KernelGsBase, h::WHvX64RegisterKernelGsBase),
            (WhpRegister::Pat, h::WHvX64RegisterPat),
            (WhpRegister::SysenterCs, h::WHvX64RegisterSysenterCs),
            (WhpRegister::SysenterEip, h::WHvX64RegisterSysenterEip),
            (WhpRegister::SysenterEsp, h::WHvX64RegisterSysenterEsp),
            (WhpRegister::Star, h::WHvX64RegisterStar),
            (WhpRegister::Lstar, h::WHvX64RegisterLstar),
            (WhpRegister::Cstar, h::WHvX64RegisterCstar),
            (WhpRegister::Sfmask, h::WHvX64RegisterSfmask),
            (WhpRegister::MtrrDefType, h::WHvX64RegisterMsrMtrrDefType),
            (WhpRegister::TscAux, h::WHvX64RegisterTscAux),
        ] {
            assert_eq!(ours as i32, theirs.0, "{ours:?}");
        }
    }
}
