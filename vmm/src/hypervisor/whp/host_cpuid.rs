//! The CPUID leaves a WHP guest starts from: what the `cpuid` instruction reports to skiff, every
//! basic and extended leaf up to the maxima leaves 0 and 0x8000_0000 give, with the subleaves of
//! the leaves that have them. On a WHP host skiff itself runs in Hyper-V's root partition, so
//! these are already the hypervisor's view of the processor, the counterpart of KVM's supported
//! list. `arch::cpuid::adjust_cpuid` then shapes them per vCPU, as on KVM.
//!
//! Platform-neutral: `host_cpuid_with` takes the read as a function, so the enumeration is
//! unit-tested on Linux against a fake processor.

use arch::regs::CpuidEntry;

/// Never more subleaves per leaf than this (a bound against a nonsense count).
const MAX_SUBLEAVES: u32 = 64;
/// Never more leaves per range than this.
const MAX_LEAVES: u32 = 0x100;

/// How a leaf's subleaves are enumerated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subleaves {
    /// One entry, subleaf not significant.
    None,
    /// Until a subleaf whose EAX[4:0] (cache type) is 0, which is left out unless it is
    /// subleaf 0: leaves 4 and 0x8000_001D.
    UntilNoCache,
    /// Until a subleaf whose ECX[15:8] (level type) is 0, left out likewise: leaves 0xB and
    /// 0x1F.
    UntilNoLevel,
    /// Subleaves 0 to EAX of subleaf 0: leaves 7, 0x14, 0x17, 0x18, 0x1D, 0x20, 0x23.
    CountInEax,
    /// Every subleaf up to the bound with a non-zero answer, and 0 and 1 always: leaves 0xD,
    /// 0xF, 0x10, 0x12.
    NonZero,
}

fn subleaves(leaf: u32) -> Subleaves {
    match leaf {
        0x4 | 0x8000_001d => Subleaves::UntilNoCache,
        0xb | 0x1f => Subleaves::UntilNoLevel,
        0x7 | 0x14 | 0x17 | 0x18 | 0x1d | 0x20 | 0x23 => Subleaves::CountInEax,
        0xd | 0xf | 0x10 | 0x12 => Subleaves::NonZero,
        _ => Subleaves::None,
    }
}

/// The host's leaves as read by `cpuid(leaf, subleaf) -> [eax, ebx, ecx, edx]`.
pub fn host_cpuid_with(cpuid: impl Fn(u32, u32) -> [u32; 4]) -> Vec<CpuidEntry> {
    let mut entries = Vec::new();
    for base in [0u32, 0x8000_0000] {
        let max = cpuid(base, 0)[0];
        if max < base {
            continue;
        }
        let last = max.min(base + MAX_LEAVES - 1);
        for leaf in base..=last {
            push_leaf(&mut entries, leaf, &cpuid);
        }
    }
    entries
}

fn push_leaf(entries: &mut Vec<CpuidEntry>, leaf: u32, cpuid: &impl Fn(u32, u32) -> [u32; 4]) {
    let entry = |index: u32, significant_index: bool, [eax, ebx, ecx, edx]: [u32; 4]| CpuidEntry {
        function: leaf,
        index,
        significant_index,
        eax,
        ebx,
        ecx,
        edx,
    };
    let kind = subleaves(leaf);
    if kind == Subleaves::None {
        entries.push(entry(0, false, cpuid(leaf, 0)));
        return;
    }
    let count = match kind {
        Subleaves::CountInEax => cpuid(leaf, 0)[0].saturating_add(1).min(MAX_SUBLEAVES),
        _ => MAX_SUBLEAVES,
    };
    for index in 0..count {
        let regs = cpuid(leaf, index);
        let last = match kind {
            Subleaves::UntilNoCache => regs[0] & 0x1f == 0,
            Subleaves::UntilNoLevel => (regs[2] >> 8) & 0xff == 0,
            _ => false,
        };
        if last && index > 0 {
            break;
        }
        if kind == Subleaves::NonZero && index > 1 && regs == [0; 4] {
            continue;
        }
        entries.push(entry(index, true, regs));
        if last {
            break;
        }
    }
}

/// The host's leaves, read with the `cpuid` instruction.
pub fn host_cpuid() -> Vec<CpuidEntry> {
    host_cpuid_with(|leaf, subleaf| {
        let r = std::arch::x86_64::__cpuid_count(leaf, subleaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Basic leaves up to 0xD, extended up to 0x8000_0001; two cache levels, two topology
    /// levels, leaf 7 with one extra subleaf, leaf 0xD with subleaves 0, 1 and 2 set.
    fn fake(leaf: u32, subleaf: u32) -> [u32; 4] {
        match (leaf, subleaf) {
            (0, _) => [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69],
            (4, 0) => [0x121, 0, 0, 0],
            (4, 1) => [0x143, 0, 0, 0],
            (4, _) => [0; 4],
            (7, 0) => [1, 0xaa, 0, 0],
            (7, 1) => [0xbb, 0, 0, 0],
            (7, _) => [0xdead; 4],
            (0xb, 0) => [1, 1, 0x100, 0],
            (0xb, 1) => [4, 4, 0x201, 0],
            (0xb, n) => [0, 0, n, 0],
            (0xd, 0..=2) => [0x240 + subleaf, 0, 0, 0],
            (0xd, _) => [0; 4],
            (0x8000_0000, _) => [0x8000_0001, 0, 0, 0],
            (0x8000_0001, _) => [0, 0, 0x121, 0x2c10_0800],
            (l, _) => [l, 0, 0, 0],
        }
    }

    fn of(entries: &[CpuidEntry], leaf: u32) -> Vec<(u32, bool, u32)> {
        entries
            .iter()
            .filter(|e| e.function == leaf)
            .map(|e| (e.index, e.significant_index, e.eax))
            .collect()
    }

    #[test]
    fn every_leaf_up_to_both_maxima_is_read() {
        let e = host_cpuid_with(fake);
        let leaves: std::collections::BTreeSet<u32> = e.iter().map(|e| e.function).collect();
        let expected: std::collections::BTreeSet<u32> =
            (0..=0xd).chain([0x8000_0000, 0x8000_0001]).collect();
        assert_eq!(leaves, expected);
        assert_eq!(of(&e, 2), [(0, false, 2)]);
        assert_eq!(of(&e, 0x8000_0001)[0], (0, false, 0));
    }

    #[test]
    fn subleaves_stop_where_each_leaf_says() {
        let e = host_cpuid_with(fake);
        // Cache leaf: two caches; the null one that ends the list is not kept (a missing
        // subleaf answers zeros anyway).
        assert_eq!(of(&e, 4), [(0, true, 0x121), (1, true, 0x143)]);
        // Leaf 7: subleaf 0 says one more follows.
        assert_eq!(of(&e, 7), [(0, true, 1), (1, true, 0xbb)]);
        // Topology: two levels, without the invalid one that ends them.
        assert_eq!(of(&e, 0xb), [(0, true, 1), (1, true, 4)]);
        // XSAVE: the subleaves that answer.
        assert_eq!(
            of(&e, 0xd),
            [(0, true, 0x240), (1, true, 0x241), (2, true, 0x242)]
        );
    }

    #[test]
    fn nonsense_maxima_are_bounded() {
        let e = host_cpuid_with(|leaf, _| match leaf {
            0 => [u32::MAX, 0, 0, 0],
            7 => [u32::MAX, 0, 0, 0],
            0x8000_0000 => [0, 0, 0, 0],
            _ => [1, 0, 0, 0],
        });
        let leaves: std::collections::BTreeSet<u32> = e.iter().map(|e| e.function).collect();
        assert_eq!(leaves.len(), MAX_LEAVES as usize);
        assert_eq!(of(&e, 7).len(), MAX_SUBLEAVES as usize);
        // An extended maximum below 0x8000_0000 means no extended leaves.
        assert!(e.iter().all(|e| e.function < 0x8000_0000));
    }

    #[test]
    fn this_processor_reports_a_vendor_and_leaf_1() {
        let e = host_cpuid();
        let leaf0 = e.iter().find(|e| e.function == 0).unwrap();
        assert!(leaf0.eax >= 1);
        assert_ne!([leaf0.ebx, leaf0.edx, leaf0.ecx], [0; 3]);
        assert!(e.iter().any(|e| e.function == 1));
    }
}
