//! `SectionRam`: guest RAM on Windows. The RAM ranges around the MMIO hole become
//! `ShareableRegion`s of one section at consecutive file offsets, are validated as on Linux
//! (plus Windows' view-offset rule), and each is mapped as its own view at its `file_offset`.
//! The hypervisor registers each view (`WHvMapGpaRange`); this module does not.

use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use super::region::ShareableRegion;
use super::section::{allocation_granularity, Section, SectionBacking, SectionError};
use super::slot_memory::SlotMemory;
use super::validate::{validate_regions, validate_view_offsets, RegionError};
use super::view::{SectionView, ViewError};

/// Why guest RAM could not be built.
#[derive(Debug, Error)]
pub enum SectionRamError {
    /// The size does not fit the x86_64 layout.
    #[error("invalid guest memory size")]
    Layout(#[source] arch::layout::LayoutError),
    /// The section could not be created.
    #[error(transparent)]
    Section(#[from] SectionError),
    /// The region list is invalid.
    #[error(transparent)]
    Region(#[from] RegionError),
    /// A region's view could not be mapped.
    #[error("cannot map memory region at {guest_address:#x}")]
    Map {
        /// Region start.
        guest_address: u64,
        /// The cause.
        #[source]
        source: ViewError,
    },
}

/// Guest RAM: the regions and this process's view of each (same order).
#[derive(Debug)]
pub struct SectionRam {
    regions: Vec<ShareableRegion>,
    views: Vec<SectionView>,
    created: Option<PathBuf>,
}

impl SectionRam {
    /// Creates a `size`-byte section over `backing`, lays RAM out around the MMIO hole,
    /// validates the regions against `max_slots` and maps them. On failure a memory file skiff
    /// created is removed.
    pub fn create(
        backing: &SectionBacking,
        size: u64,
        max_slots: usize,
    ) -> Result<Self, SectionRamError> {
        let ranges = arch::layout::ram_ranges(size).map_err(SectionRamError::Layout)?;
        let section = Section::create(backing, size)?;
        let file = Arc::new(section.mappable);
        let mut file_offset = 0;
        let regions = ranges
            .iter()
            .map(|r| {
                let region = ShareableRegion {
                    guest_address: r.start,
                    size: r.size,
                    file: file.clone(),
                    file_offset,
                };
                file_offset += r.size;
                region
            })
            .collect();
        drop(file);
        match Self::from_regions(regions, max_slots) {
            Ok(ram) => Ok(Self {
                created: section.created,
                ..ram
            }),
            Err(e) => {
                if let Some(p) = section.created {
                    let _ = std::fs::remove_file(p);
                }
                Err(e)
            }
        }
    }

    /// Validates `regions` (4 KiB pages, `max_slots` slots, views at multiples of the
    /// allocation granularity) and maps each at its `file_offset`.
    pub fn from_regions(
        regions: Vec<ShareableRegion>,
        max_slots: usize,
    ) -> Result<Self, SectionRamError> {
        validate_regions(&regions, arch::layout::PAGE_SIZE, max_slots)?;
        validate_view_offsets(&regions, allocation_granularity())?;
        let views = regions
            .iter()
            .map(|r| {
                SectionView::map(&r.file, r.file_offset, r.size).map_err(|source| {
                    SectionRamError::Map {
                        guest_address: r.guest_address,
                        source,
                    }
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            regions,
            views,
            created: None,
        })
    }

    /// The regions, in layout order.
    pub fn regions(&self) -> &[ShareableRegion] {
        &self.regions
    }

    /// This process's views, one per region, in the same order.
    pub fn views(&self) -> &[SectionView] {
        &self.views
    }

    /// Each region's view as the memory of a hypervisor slot (`Vm::map_memory`), in region
    /// order; each holds `self`, so the views stay mapped while a slot uses them.
    pub fn slot_memory(self: &Arc<Self>) -> Vec<Arc<dyn SlotMemory>> {
        self.views
            .iter()
            .map(|view| {
                Arc::new(SectionSlot {
                    host_address: view.host_address(),
                    size: view.len() as u64,
                    _ram: self.clone(),
                }) as Arc<dyn SlotMemory>
            })
            .collect()
    }

    /// Whether skiff created the memory file (it did not exist before).
    pub fn created_file(&self) -> bool {
        self.created.is_some()
    }

    /// The view holding guest physical `address` and the offset of `address` in it.
    pub fn view_at(&self, address: u64) -> Option<(&SectionView, usize)> {
        self.regions
            .iter()
            .zip(&self.views)
            .find(|(r, _)| r.contains(address))
            .and_then(|(r, v)| Some((v, usize::try_from(address - r.guest_address).ok()?)))
    }
}

/// One view of a `SectionRam` as a slot's memory: its address and size, and the RAM that owns
/// the view.
#[derive(Debug)]
struct SectionSlot {
    host_address: u64,
    size: u64,
    _ram: Arc<SectionRam>,
}

// SAFETY: the view at `host_address` is `size` bytes mapped readable and writable
// (`SectionView::map`), owned by `_ram`, which this value holds; a view never moves or changes
// size while it is mapped.
unsafe impl SlotMemory for SectionSlot {
    fn as_ptr(&self) -> *mut u8 {
        self.host_address as *mut u8
    }

    fn size(&self) -> u64 {
        self.size
    }
}
