//! CPUID for a WHP partition, from skiff's per-vCPU tables (`arch::cpuid::adjust_cpuid`).
//!
//! WHP takes one CPUID result list for the whole partition, keyed by leaf alone
//! (`WHvPartitionPropertyCodeCpuidResultList`), and a list of leaves that exit to the VMM
//! instead (`WHvPartitionPropertyCodeCpuidExitList`). skiff's tables differ between vCPUs in the
//! APIC-ID and topology leaves and have subleaves; such leaves become exits answered from the
//! exiting vCPU's own table, and every other leaf goes into the result list. Platform-neutral:
//! the WHP calls that apply the plan live with the partition.

use std::collections::BTreeSet;

use arch::regs::CpuidEntry;

/// Leaves 0xB and 0x1F answer a subleaf past the last level with its level number in ECX.
const TOPOLOGY_LEAVES: [u32; 2] = [
    arch::cpuid::LEAF_EXT_TOPOLOGY,
    arch::cpuid::LEAF_EXT_TOPOLOGY_V2,
];

/// The partition's CPUID set-up, and the answers to CPUID exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuidPlan {
    results: Vec<CpuidEntry>,
    exit_leaves: Vec<u32>,
    per_vcpu: Vec<Vec<CpuidEntry>>,
}

impl CpuidPlan {
    /// Splits the tables (`per_vcpu[n]` is vCPU *n*'s) into partition-wide results and exits.
    pub fn new(per_vcpu: Vec<Vec<CpuidEntry>>) -> Self {
        let leaves: BTreeSet<u32> = per_vcpu.iter().flatten().map(|e| e.function).collect();
        let mut results = Vec::new();
        let mut exit_leaves = Vec::new();
        for leaf in leaves {
            match same_on_every_vcpu(&per_vcpu, leaf) {
                Some(entry) => results.push(entry),
                None => exit_leaves.push(leaf),
            }
        }
        Self {
            results,
            exit_leaves,
            per_vcpu,
        }
    }

    /// The leaves every vCPU sees alike, for the partition's result list (subleaf 0 only).
    pub fn results(&self) -> &[CpuidEntry] {
        &self.results
    }

    /// The leaves that must exit to skiff, for the partition's exit list.
    pub fn exit_leaves(&self) -> &[u32] {
        &self.exit_leaves
    }

    /// vCPU `vcpu`'s own table, as the plan was built from it.
    pub fn table(&self, vcpu: u32) -> Option<&[CpuidEntry]> {
        self.per_vcpu
            .get(usize::try_from(vcpu).ok()?)
            .map(Vec::as_slice)
    }

    /// The answer (EAX, EBX, ECX, EDX) to a CPUID exit of vCPU `vcpu` for `leaf`/`subleaf`, or
    /// `None` when skiff has no such vCPU or leaf (the caller then gives the hypervisor's
    /// default result from the exit context).
    pub fn answer(&self, vcpu: u32, leaf: u32, subleaf: u32) -> Option<[u32; 4]> {
        let table = self.per_vcpu.get(usize::try_from(vcpu).ok()?)?;
        let mut of_leaf = table.iter().filter(|e| e.function == leaf).peekable();
        of_leaf.peek()?;
        match of_leaf.find(|e| !e.significant_index || e.index == subleaf) {
            Some(e) => Some([e.eax, e.ebx, e.ecx, e.edx]),
            // A subleaf past the last: zeros, with the level number for the topology leaves
            // as hardware reports it.
            None if TOPOLOGY_LEAVES.contains(&leaf) => Some([0, 0, subleaf & 0xff, 0]),
            None => Some([0; 4]),
        }
    }
}

/// `leaf`'s one entry when every vCPU has exactly one entry for it, without subleaves, with
/// the same values; otherwise `None` (the leaf must exit).
fn same_on_every_vcpu(per_vcpu: &[Vec<CpuidEntry>], leaf: u32) -> Option<CpuidEntry> {
    let mut common: Option<CpuidEntry> = None;
    for table in per_vcpu {
        let mut of_leaf = table.iter().filter(|e| e.function == leaf);
        let entry = *of_leaf.next()?;
        if of_leaf.next().is_some() || entry.significant_index {
            return None;
        }
        match common {
            Some(c) if c != entry => return None,
            _ => common = Some(entry),
        }
    }
    common
}

#[cfg(test)]
mod tests {
    use super::*;
    use arch::cpuid::{adjust_cpuid, LEAF_EXT_TOPOLOGY, LEAF_FEATURES};

    fn entry(function: u32, index: u32, significant_index: bool, regs: [u32; 4]) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            significant_index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
        }
    }

    fn host() -> Vec<CpuidEntry> {
        vec![
            entry(0, 0, false, [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            entry(
                LEAF_FEATURES,
                0,
                false,
                [0x906ea, 0x0510_0800, 0x7ffa_fbff, 0xbfeb_fbff],
            ),
            entry(7, 0, true, [0, 0x029c_67af, 0, 0]),
            entry(LEAF_EXT_TOPOLOGY, 0, true, [1, 2, 0x100, 5]),
            entry(LEAF_EXT_TOPOLOGY, 1, true, [4, 16, 0x201, 5]),
        ]
    }

    fn plan(cpus: u32) -> CpuidPlan {
        CpuidPlan::new(
            (0..cpus)
                .map(|i| {
                    let mut t = host();
                    adjust_cpuid(&mut t, i, cpus);
                    t
                })
                .collect(),
        )
    }

    #[test]
    fn per_vcpu_leaves_exit_and_common_ones_go_to_the_partition() {
        let p = plan(4);
        // Leaf 1 carries the APIC ID, 0xB the x2APIC ID and levels, 7 has subleaves.
        assert_eq!(p.exit_leaves(), &[LEAF_FEATURES, 7, LEAF_EXT_TOPOLOGY]);
        assert_eq!(p.results().len(), 1);
        assert_eq!(p.results()[0].function, 0);
        assert_eq!(p.results()[0].ebx, 0x756e_6547);
    }

    #[test]
    fn exits_are_answered_from_the_vcpus_own_table() {
        let p = plan(4);
        for vcpu in 0..4 {
            let [_, ebx, ecx, _] = p.answer(vcpu, LEAF_FEATURES, 0).unwrap();
            assert_eq!(ebx >> 24, vcpu, "initial APIC ID of vCPU {vcpu}");
            assert_ne!(ecx & (1 << 31), 0, "hypervisor bit");
            let [_, cores, level, x2apic_id] = p.answer(vcpu, LEAF_EXT_TOPOLOGY, 1).unwrap();
            assert_eq!((cores, level & 0xff, x2apic_id), (4, 1, vcpu));
        }
        // Past the last topology level: zeros with the level number, as hardware answers.
        assert_eq!(p.answer(2, LEAF_EXT_TOPOLOGY, 5), Some([0, 0, 5, 0]));
        // A subleaf that selects nothing else answers like the leaf's only entry.
        assert_eq!(p.answer(1, LEAF_FEATURES, 9), p.answer(1, LEAF_FEATURES, 0));
        assert_eq!(p.answer(0, 0x4000_0100, 0), None);
        assert_eq!(p.answer(4, 0, 0), None);
    }

    #[test]
    fn one_vcpu_still_exits_only_for_subleaves() {
        let p = plan(1);
        assert_eq!(p.exit_leaves(), &[7, LEAF_EXT_TOPOLOGY]);
        let leaf1 = p
            .results()
            .iter()
            .find(|e| e.function == LEAF_FEATURES)
            .unwrap();
        assert_eq!(leaf1.ebx >> 24, 0);
    }

    #[test]
    fn a_leaf_missing_on_one_vcpu_exits() {
        let mut tables = vec![host(), host()];
        tables[1].retain(|e| e.function != 0);
        let p = CpuidPlan::new(tables);
        assert!(p.exit_leaves().contains(&0));
        assert_eq!(p.answer(1, 0, 0), None);
        assert_eq!(p.answer(0, 0, 0).unwrap()[0], 0xd);
    }
}
