//! `Partition`: one WHP partition (a VM) set up for skiff: processor count, xAPIC emulation,
//! CPUID results and exits from a `CpuidPlan`, and guest RAM mapped from `SectionRam`'s views
//! (`RamMapping`, unmapped on drop). Deleted on drop.
//!
//! Built for Windows and type-checked in CI, but not run here: wine has no hypervisor
//! (docs/windows.md). vCPUs and the run loop are not built yet.

use std::sync::Arc;

use thiserror::Error;
use windows::Win32::System::Hypervisor::{
    WHvMapGpaRangeFlagExecute, WHvMapGpaRangeFlagRead, WHvMapGpaRangeFlagTrackDirtyPages,
    WHvMapGpaRangeFlagWrite, WHvPartitionPropertyCodeCpuidExitList,
    WHvPartitionPropertyCodeCpuidResultList, WHvPartitionPropertyCodeExtendedVmExits,
    WHvPartitionPropertyCodeLocalApicEmulationMode, WHvPartitionPropertyCodeProcessorCount,
    WHvX64LocalApicEmulationModeXApic, WHV_MAP_GPA_RANGE_FLAGS, WHV_PARTITION_HANDLE,
    WHV_PARTITION_PROPERTY_CODE, WHV_X64_CPUID_RESULT,
};

use super::cpuid::CpuidPlan;
use super::interrupt::InterruptControl;
use super::library::WhpLibrary;
use crate::memory::SectionRam;
use devices::irqchip::{InterruptRequest, InterruptSink};

/// `WHV_EXTENDED_VM_EXITS` bit 0: CPUID exits for the leaves in the exit list.
const EXTENDED_EXIT_CPUID: u64 = 1;

/// A failed partition operation.
#[derive(Debug, Error)]
pub enum PartitionError {
    /// A WHP call failed.
    #[error("{op} failed")]
    Call {
        /// The call.
        op: &'static str,
        /// The HRESULT.
        #[source]
        source: windows::core::Error,
    },
    /// The partition refused the processor count.
    #[error("the partition cannot have {requested} vCPUs")]
    TooManyVcpus {
        /// vCPUs asked for.
        requested: u32,
        /// The HRESULT.
        #[source]
        source: windows::core::Error,
    },
    /// A list is too long for a property.
    #[error("{what} has too many entries ({count})")]
    TooLong {
        /// The list.
        what: &'static str,
        /// Its length.
        count: usize,
    },
}

fn call(op: &'static str, hr: windows::core::HRESULT) -> Result<(), PartitionError> {
    hr.ok()
        .map_err(|source| PartitionError::Call { op, source })
}

/// A WHP partition, deleted on drop.
#[derive(Debug)]
pub struct Partition {
    lib: Arc<WhpLibrary>,
    handle: WHV_PARTITION_HANDLE,
}

// SAFETY: a partition handle may be used from any thread; WHP serializes its own state.
unsafe impl Send for Partition {}
// SAFETY: as above; every method takes `&self` and WHP calls on one partition are thread-safe.
unsafe impl Sync for Partition {}

impl Partition {
    /// Creates and sets up a partition for `processors` vCPUs with `cpuid`.
    pub fn create(
        lib: Arc<WhpLibrary>,
        processors: u32,
        cpuid: &CpuidPlan,
    ) -> Result<Self, PartitionError> {
        let mut handle = WHV_PARTITION_HANDLE::default();
        // SAFETY: `handle` is a valid out-pointer for the call.
        call("WHvCreatePartition", unsafe {
            (lib.create_partition)(&mut handle)
        })?;
        // From here `Drop` deletes the partition on every error path.
        let partition = Self { lib, handle };
        partition
            .set_property(WHvPartitionPropertyCodeProcessorCount, &[processors])
            .map_err(|e| match e {
                PartitionError::Call { source, .. } => PartitionError::TooManyVcpus {
                    requested: processors,
                    source,
                },
                other => other,
            })?;
        partition.set_property(
            WHvPartitionPropertyCodeLocalApicEmulationMode,
            &[WHvX64LocalApicEmulationModeXApic],
        )?;
        partition.set_property(
            WHvPartitionPropertyCodeExtendedVmExits,
            &[EXTENDED_EXIT_CPUID],
        )?;
        partition.set_property(WHvPartitionPropertyCodeCpuidExitList, cpuid.exit_leaves())?;
        let results: Vec<WHV_X64_CPUID_RESULT> = cpuid
            .results()
            .iter()
            .map(|e| WHV_X64_CPUID_RESULT {
                Function: e.function,
                Reserved: [0; 3],
                Eax: e.eax,
                Ebx: e.ebx,
                Ecx: e.ecx,
                Edx: e.edx,
            })
            .collect();
        partition.set_property(WHvPartitionPropertyCodeCpuidResultList, &results)?;
        // SAFETY: the partition handle is live.
        call("WHvSetupPartition", unsafe {
            (partition.lib.setup_partition)(partition.handle)
        })?;
        Ok(partition)
    }

    /// The platform's entry points.
    pub fn lib(&self) -> &WhpLibrary {
        &self.lib
    }

    /// The platform's entry points, shared.
    pub fn lib_arc(&self) -> Arc<WhpLibrary> {
        self.lib.clone()
    }

    /// The partition handle, for the vCPUs and the emulator.
    pub fn handle(&self) -> WHV_PARTITION_HANDLE {
        self.handle
    }

    /// Sets property `code` to the plain-data array `values`; an empty list is left unset
    /// (the property's default is already empty).
    fn set_property<T: Copy>(
        &self,
        code: WHV_PARTITION_PROPERTY_CODE,
        values: &[T],
    ) -> Result<(), PartitionError> {
        if values.is_empty() {
            return Ok(());
        }
        let bytes =
            u32::try_from(std::mem::size_of_val(values)).map_err(|_| PartitionError::TooLong {
                what: "a partition property",
                count: values.len(),
            })?;
        // SAFETY: `values` is `bytes` bytes of plain data, read during the call only.
        call("WHvSetPartitionProperty", unsafe {
            (self.lib.set_partition_property)(self.handle, code, values.as_ptr().cast(), bytes)
        })
    }

    /// Maps every region of `ram` at its guest address, readable, writable and executable,
    /// with dirty-page tracking when `track_dirty` (live snapshots). The mapping keeps `ram`
    /// alive and unmaps on drop.
    pub fn map_ram(
        self: &Arc<Self>,
        ram: Arc<SectionRam>,
        track_dirty: bool,
    ) -> Result<RamMapping, PartitionError> {
        let mut flags = WHvMapGpaRangeFlagRead.0 | WHvMapGpaRangeFlagWrite.0;
        flags |= WHvMapGpaRangeFlagExecute.0;
        if track_dirty {
            flags |= WHvMapGpaRangeFlagTrackDirtyPages.0;
        }
        let mut mapping = RamMapping {
            partition: self.clone(),
            ram: ram.clone(),
            mapped: 0,
        };
        for (region, view) in ram.regions().iter().zip(ram.views()) {
            // SAFETY: the view covers `region.size` bytes and lives in `ram`, which the
            // mapping holds until it unmaps the range.
            call("WHvMapGpaRange", unsafe {
                (self.lib.map_gpa_range)(
                    self.handle,
                    view.host_address() as *const _,
                    region.guest_address,
                    region.size,
                    WHV_MAP_GPA_RANGE_FLAGS(flags),
                )
            })?;
            mapping.mapped += 1;
        }
        Ok(mapping)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        // SAFETY: the handle is live and deleted once; vCPUs and mappings hold an `Arc` to the
        // partition, so none outlives it.
        if let Err(e) = unsafe { (self.lib.delete_partition)(self.handle) }.ok() {
            log::warn!("WHvDeletePartition failed: {e}");
        }
    }
}

impl InterruptSink for Partition {
    /// MSIs and IOAPIC deliveries become `WHvRequestInterrupt`.
    fn deliver(&self, request: InterruptRequest) -> std::io::Result<()> {
        let Some(control) = InterruptControl::from_request(&request) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!("WHP cannot request {:?} interrupts", request.delivery_mode),
            ));
        };
        let control = control.to_whv();
        // SAFETY: `control` is a valid WHV_INTERRUPT_CONTROL of the size passed.
        unsafe {
            (self.lib.request_interrupt)(
                self.handle,
                &control,
                std::mem::size_of_val(&control) as u32,
            )
        }
        .ok()
        .map_err(std::io::Error::from)
    }
}

/// Guest RAM mapped into a partition; unmaps every mapped range on drop.
#[derive(Debug)]
pub struct RamMapping {
    partition: Arc<Partition>,
    ram: Arc<SectionRam>,
    mapped: usize,
}

impl Drop for RamMapping {
    fn drop(&mut self) {
        for region in self.ram.regions().iter().take(self.mapped) {
            // SAFETY: the range was mapped by `map_ram` on this live partition.
            let hr = unsafe {
                (self.partition.lib.unmap_gpa_range)(
                    self.partition.handle,
                    region.guest_address,
                    region.size,
                )
            };
            if let Err(e) = hr.ok() {
                log::warn!(
                    "WHvUnmapGpaRange at {:#x} failed: {e}",
                    region.guest_address
                );
            }
        }
    }
}
