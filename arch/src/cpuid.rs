//! Per-vCPU CPUID: the host-supported leaves adjusted to skiff's topology and device model.
//!
//! This module owns the changes made to the hypervisor's supported CPUID list (KVM's
//! `KVM_GET_SUPPORTED_CPUID`) before it is given to one vCPU: APIC IDs and a flat topology of
//! `cpu_count` single-thread cores in one package, the hypervisor bit, and hiding features the
//! VM does not provide (PMU, energy-bias hints). It does not query the host, and it leaves the
//! hypervisor's paravirtual leaves (0x4000_0000 and up) untouched.

use crate::regs::CpuidEntry;

/// Leaf 1: family/model, APIC ID, feature flags.
pub const LEAF_FEATURES: u32 = 0x1;
/// Leaf 4: Intel deterministic cache parameters.
pub const LEAF_CACHE_PARAMS: u32 = 0x4;
/// Leaf 6: thermal and power management.
pub const LEAF_THERMAL_POWER: u32 = 0x6;
/// Leaf 0xA: Intel architectural performance monitoring.
pub const LEAF_PERFMON: u32 = 0xa;
/// Leaf 0xB: Intel extended topology.
pub const LEAF_EXT_TOPOLOGY: u32 = 0xb;
/// Leaf 0x1F: Intel V2 extended topology.
pub const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
/// Leaf 0x8000_0008: AMD address sizes and core count.
pub const LEAF_AMD_SIZES: u32 = 0x8000_0008;
/// Leaf 0x8000_001D: AMD cache topology.
pub const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
/// Leaf 0x8000_001E: AMD extended APIC ID, core and node IDs.
pub const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;
/// Leaf 0x8000_0022: AMD performance monitoring v2.
pub const LEAF_AMD_PERFMON_V2: u32 = 0x8000_0022;

/// Leaf 1 ECX bit 15: PDCM, the `IA32_PERF_CAPABILITIES` MSR.
const ECX_PDCM: u32 = 1 << 15;
/// Leaf 1 ECX bit 31: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: HTT, leaf 1 EBX[23:16] is valid.
const EDX_HTT: u32 = 1 << 28;
/// Leaf 6 EAX bit 2: ARAT, the APIC timer keeps running in deep C-states.
const EAX_ARAT: u32 = 1 << 2;
/// Leaf 6 ECX bit 3: `IA32_ENERGY_PERF_BIAS`.
const ECX_EPB: u32 = 1 << 3;
/// Topology level types in leaves 0xB and 0x1F, ECX[15:8].
const LEVEL_TYPE_INVALID: u32 = 0;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// The APIC ID of vCPU `cpu_index`. skiff numbers APIC IDs like vCPUs; the MADT, CPUID and the
/// vCPU's local APIC all use this function so they cannot disagree.
pub fn cpu_topology_apic_id(cpu_index: u32) -> u32 {
    cpu_index
}

/// Number of APIC ID bits that select a core within the package: ceil(log2(cpu_count)).
fn core_id_bits(cpu_count: u32) -> u32 {
    if cpu_count <= 1 {
        0
    } else {
        u32::BITS - (cpu_count - 1).leading_zeros()
    }
}

/// Replaces `width` bits at `shift` in `value` with `field` (truncated to `width` bits).
fn with_bits(value: u32, shift: u32, width: u32, field: u32) -> u32 {
    let mask = ((1u64 << width) - 1) as u32;
    (value & !(mask << shift)) | ((field & mask) << shift)
}

/// Adjusts the host-supported CPUID list `entries` for vCPU `cpu_index` of `cpu_count`.
///
/// The topology is one package of `cpu_count` cores with one thread each; the APIC ID of
/// vCPU *n* is `cpu_topology_apic_id(n)`. A `cpu_count` of 0 is treated as 1.
pub fn adjust_cpuid(entries: &mut Vec<CpuidEntry>, cpu_index: u32, cpu_count: u32) {
    let count = cpu_count.max(1);
    let apic_id = cpu_topology_apic_id(cpu_index);
    let core_bits = core_id_bits(count);
    // Eight-bit fields saturate; leaf 0xB carries the full values.
    let count_u8 = count.min(0xff);

    for entry in entries.iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX[31:24] is the initial (x)APIC ID the guest matches against the MADT;
                // the host's value would name a host CPU. EBX[23:16] is the number of
                // addressable logical processors in the package.
                entry.ebx = with_bits(entry.ebx, 24, 8, apic_id);
                entry.ebx = with_bits(entry.ebx, 16, 8, count_u8);
                // HTT says EBX[23:16] is meaningful; a single vCPU has no siblings to count.
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
                // Lets the guest find the paravirtual leaves and pick paravirt clocks and
                // spinlocks. TSC-deadline (bit 24) is kept as the host list reports it.
                entry.ecx |= ECX_HYPERVISOR;
                // PDCM advertises IA32_PERF_CAPABILITIES, part of the PMU the VM does not offer.
                entry.ecx &= !ECX_PDCM;
            }
            LEAF_CACHE_PARAMS if entry.eax & 0x1f != 0 => {
                // EAX[31:26]: addressable core IDs in the package - 1.
                entry.eax = with_bits(entry.eax, 26, 6, (count - 1).min(0x3f));
                // EAX[25:14]: logical processors sharing this cache - 1. With one thread per
                // core, L1 and L2 are private; L3 is shared by the whole package.
                entry.eax = with_bits(entry.eax, 14, 12, shared_cache_threads(entry.eax, count));
            }
            LEAF_THERMAL_POWER => {
                // Keep only ARAT (the emulated APIC timer never stops); the VM has no thermal
                // sensors, turbo or HWP MSRs.
                entry.eax &= EAX_ARAT;
                // The energy/performance bias MSR is a host power-policy knob, not the guest's.
                // APERF/MPERF (ECX bit 0) stays as reported: KVM offers it only when it works.
                entry.ecx &= !ECX_EPB;
            }
            LEAF_PERFMON | LEAF_AMD_PERFMON_V2 => {
                // No vPMU: version 0 tells the guest there are no architectural counters.
                *entry = CpuidEntry {
                    eax: 0,
                    ebx: 0,
                    ecx: 0,
                    edx: 0,
                    ..*entry
                };
            }
            LEAF_AMD_SIZES => {
                // ECX[7:0] NC: cores in the package - 1; ECX[15:12]: APIC ID bits for the core,
                // matching leaf 0xB so AMD and Intel guests see the same topology.
                entry.ecx = with_bits(entry.ecx, 0, 8, count_u8 - 1);
                entry.ecx = with_bits(entry.ecx, 12, 4, core_bits);
            }
            LEAF_AMD_CACHE_TOPOLOGY if entry.eax & 0x1f != 0 => {
                // EAX[25:14]: logical processors sharing this cache - 1, as for leaf 4.
                entry.eax = with_bits(entry.eax, 14, 12, shared_cache_threads(entry.eax, count));
            }
            LEAF_AMD_EXT_APIC_ID => {
                // Extended APIC ID; core (compute unit) ID = vCPU, one thread per core, one
                // node. KVM leaves these zero, which would make every vCPU core 0.
                entry.eax = apic_id;
                entry.ebx = with_bits(0, 0, 8, cpu_index);
                entry.ecx = 0;
            }
            _ => {}
        }
    }

    for leaf in [LEAF_EXT_TOPOLOGY, LEAF_EXT_TOPOLOGY_V2] {
        // The host's subleaves describe host threads and cores; rebuild them for the VM.
        if entries.iter().any(|e| e.function == leaf) {
            entries.retain(|e| e.function != leaf);
            entries.extend(topology_subleaves(leaf, apic_id, count, core_bits));
        }
    }
}

/// Threads sharing a cache - 1, from the cache level in EAX[7:5] of leaf 4 / 0x8000_001D.
fn shared_cache_threads(eax: u32, count: u32) -> u32 {
    let level = (eax >> 5) & 0x7;
    if level >= 3 {
        count - 1
    } else {
        0
    }
}

/// Leaf 0xB / 0x1F subleaves: SMT level (1 thread), core level (`count` cores), end marker.
/// Each reports the x2APIC ID in EDX and its level number in ECX[7:0].
fn topology_subleaves(leaf: u32, apic_id: u32, count: u32, core_bits: u32) -> [CpuidEntry; 3] {
    let level = |index: u32, shift: u32, processors: u32, level_type: u32| CpuidEntry {
        function: leaf,
        index,
        significant_index: true,
        eax: shift,
        ebx: processors,
        ecx: (level_type << 8) | index,
        edx: apic_id,
    };
    [
        level(0, 0, 1, LEVEL_TYPE_SMT),
        level(1, core_bits, count, LEVEL_TYPE_CORE),
        level(2, 0, 0, LEVEL_TYPE_INVALID),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            significant_index: false,
            eax,
            ebx,
            ecx,
            edx,
        }
    }

    /// A host list as KVM might report it on a 16-thread Intel host with hyper-threading.
    fn host_list() -> Vec<CpuidEntry> {
        let topo = |index, eax, ebx, ecx| CpuidEntry {
            significant_index: true,
            ..leaf(LEAF_EXT_TOPOLOGY, index, eax, ebx, ecx, 0x0a)
        };
        vec![
            leaf(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            leaf(
                LEAF_FEATURES,
                0,
                0x000a_06a3,
                0x0a10_0800,
                0x7ffa_b223 | (1 << 24),
                0x1f8b_fbff,
            ),
            // L1d (level 1, shared by 2 threads) and L3 (level 3, shared by 16), 8 cores.
            leaf(LEAF_CACHE_PARAMS, 0, 0x1c00_4121, 0x02c0_003f, 0x3f, 0),
            leaf(LEAF_CACHE_PARAMS, 1, 0x1c03_c163, 0x02c0_003f, 0x3fff, 0x6),
            leaf(LEAF_CACHE_PARAMS, 2, 0, 0, 0, 0),
            leaf(LEAF_THERMAL_POWER, 0, 0x77, 0x2, 0x9, 0),
            leaf(LEAF_PERFMON, 0, 0x0703_0805, 0, 0, 0x603),
            topo(0, 1, 2, 0x100),
            topo(1, 4, 16, 0x201),
            topo(2, 0, 0, 0x2),
            leaf(0x4000_0001, 0, 0x0100_7afb, 0, 0, 0),
            leaf(LEAF_AMD_SIZES, 0, 0x3027, 0, 0x0001_700f, 0),
        ]
    }

    fn find(entries: &[CpuidEntry], function: u32, index: u32) -> CpuidEntry {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn leaf_1_carries_apic_id_count_and_flags() {
        let mut entries = host_list();
        adjust_cpuid(&mut entries, 3, 4);
        let e = find(&entries, LEAF_FEATURES, 0);
        assert_eq!(
            e.ebx, 0x0304_0800,
            "APIC ID 3, 4 logical CPUs, CLFLUSH size kept"
        );
        assert_ne!(e.edx & EDX_HTT, 0);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.ecx & (1 << 24), 0, "TSC-deadline kept");
        assert_eq!(e.ecx & ECX_PDCM, 0);
        assert_eq!(e.eax, 0x000a_06a3);
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut entries = host_list();
        adjust_cpuid(&mut entries, 0, 1);
        let e = find(&entries, LEAF_FEATURES, 0);
        assert_eq!(e.edx & EDX_HTT, 0);
        assert_eq!(e.ebx >> 16, 0x0001);
    }

    #[test]
    fn extended_topology_is_rebuilt() {
        let mut entries = host_list();
        adjust_cpuid(&mut entries, 5, 6);
        let topo: Vec<_> = entries
            .iter()
            .filter(|e| e.function == LEAF_EXT_TOPOLOGY)
            .copied()
            .collect();
        assert_eq!(topo.len(), 3);
        let sub = |i| find(&entries, LEAF_EXT_TOPOLOGY, i);
        assert_eq!(
            (sub(0).eax, sub(0).ebx, sub(0).ecx, sub(0).edx),
            (0, 1, 0x100, 5)
        );
        assert_eq!(
            (sub(1).eax, sub(1).ebx, sub(1).ecx, sub(1).edx),
            (3, 6, 0x201, 5)
        );
        assert_eq!(
            (sub(2).eax, sub(2).ebx, sub(2).ecx, sub(2).edx),
            (0, 0, 0x2, 5)
        );
        assert!(topo.iter().all(|e| e.significant_index));
    }

    #[test]
    fn v2_topology_is_rebuilt_only_when_present() {
        let mut entries = host_list();
        adjust_cpuid(&mut entries, 0, 2);
        assert!(!entries.iter().any(|e| e.function == LEAF_EXT_TOPOLOGY_V2));

        let mut entries = host_list();
        entries.push(leaf(LEAF_EXT_TOPOLOGY_V2, 0, 1, 2, 0x100, 0x0a));
        adjust_cpuid(&mut entries, 1, 2);
        assert_eq!(find(&entries, LEAF_EXT_TOPOLOGY_V2, 1).eax, 1);
        assert_eq!(find(&entries, LEAF_EXT_TOPOLOGY_V2, 1).edx, 1);
        assert_eq!(find(&entries, LEAF_EXT_TOPOLOGY_V2, 2).ecx, 2);
    }

    #[test]
    fn cache_leaves_report_package_cores_and_sharing() {
        let mut entries = host_list();
        adjust_cpuid(&mut entries, 0, 4);
        let l1 = find(&entries, LEAF_CACHE_PARAMS, 0);
        assert_eq!(l1.eax >> 26, 3);
        assert_eq!(
            (l1.eax >> 14) & 0xfff,
            0,
            "L1 is private to a single-thread core"
        );
        assert_eq!(l1.eax & 0x3fff, 0x0121, "type and level kept");
        let l3 = find(&entries, LEAF_CACHE_PARAMS, 1);
        assert_eq!((l3.eax >> 14) & 0xfff, 3, "L3 is shared by all 4 vCPUs");
        assert_eq!(
            find(&entries, LEAF_CACHE_PARAMS, 2).eax,
            0,
            "end marker untouched"
        );
    }

    #[test]
    fn pmu_and_power_features_are_hidden() {
        let mut entries = host_list();
        adjust_cpuid(&mut entries, 0, 2);
        let pmu = find(&entries, LEAF_PERFMON, 0);
        assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
        let power = find(&entries, LEAF_THERMAL_POWER, 0);
        assert_eq!((power.eax, power.ecx), (EAX_ARAT, 0x1));
    }

    #[test]
    fn paravirt_and_unrelated_leaves_are_untouched() {
        let before = host_list();
        let mut entries = before.clone();
        adjust_cpuid(&mut entries, 2, 3);
        assert_eq!(
            find(&entries, 0x4000_0001, 0),
            find(&before, 0x4000_0001, 0)
        );
        assert_eq!(find(&entries, 0, 0), find(&before, 0, 0));
    }

    #[test]
    fn amd_leaves_match_the_topology() {
        let mut entries = host_list();
        entries.push(leaf(LEAF_AMD_EXT_APIC_ID, 0, 0, 0, 0, 0));
        entries.push(leaf(
            LEAF_AMD_CACHE_TOPOLOGY,
            0,
            0x0000_4121,
            0x01c0_003f,
            0x3f,
            0,
        ));
        entries.push(leaf(
            LEAF_AMD_CACHE_TOPOLOGY,
            3,
            0x0003_c163,
            0x03c0_003f,
            0x3fff,
            0x1,
        ));
        adjust_cpuid(&mut entries, 4, 5);
        let sizes = find(&entries, LEAF_AMD_SIZES, 0);
        assert_eq!(
            sizes.ecx, 0x0001_3004,
            "NC = 4, ApicIdSize = 3, PerfTscSize kept"
        );
        assert_eq!(sizes.eax, 0x3027);
        let ext = find(&entries, LEAF_AMD_EXT_APIC_ID, 0);
        assert_eq!((ext.eax, ext.ebx, ext.ecx), (4, 4, 0));
        assert_eq!(
            (find(&entries, LEAF_AMD_CACHE_TOPOLOGY, 0).eax >> 14) & 0xfff,
            0
        );
        assert_eq!(
            (find(&entries, LEAF_AMD_CACHE_TOPOLOGY, 3).eax >> 14) & 0xfff,
            4
        );
    }

    #[test]
    fn core_id_bits_is_ceil_log2() {
        let got: Vec<u32> = [1, 2, 3, 4, 5, 8, 9, 255]
            .iter()
            .map(|&n| core_id_bits(n))
            .collect();
        assert_eq!(got, vec![0, 1, 2, 2, 3, 3, 4, 8]);
    }

    #[test]
    fn apic_id_is_the_cpu_index() {
        assert_eq!(cpu_topology_apic_id(0), 0);
        assert_eq!(cpu_topology_apic_id(17), 17);
    }
}
