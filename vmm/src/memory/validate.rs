//! Checks a list of `ShareableRegion`s before anything maps them: sizes and offsets aligned to
//! the backing's page size, no overflow, no overlap, backing files long enough, and no more
//! regions than the hypervisor has memory slots. On Windows, `validate_view_offsets` adds the
//! rule that a section view starts at a multiple of the allocation granularity.

use thiserror::Error;

use super::region::ShareableRegion;

/// A region list that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RegionError {
    /// A region of size zero.
    #[error("memory region at {guest_address:#x} has size zero")]
    ZeroSize {
        /// Region start.
        guest_address: u64,
    },
    /// Address, size or offset not aligned to the page size.
    #[error("memory region at {guest_address:#x}: {what} {value:#x} is not a multiple of the page size {page_size:#x}")]
    Unaligned {
        /// Region start.
        guest_address: u64,
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
        /// The page size it must be a multiple of.
        page_size: u64,
    },
    /// `guest_address + size` or `file_offset + size` overflows.
    #[error("memory region at {guest_address:#x} with size {size:#x} and file offset {file_offset:#x} overflows")]
    Overflow {
        /// Region start.
        guest_address: u64,
        /// Region size.
        size: u64,
        /// Region file offset.
        file_offset: u64,
    },
    /// Two regions overlap in guest physical space.
    #[error("memory regions at {first:#x} and {second:#x} overlap")]
    Overlap {
        /// Lower region start.
        first: u64,
        /// Higher region start.
        second: u64,
    },
    /// The backing file ends before the region does.
    #[error("memory region at {guest_address:#x} needs its file to hold {needed:#x} bytes but it has {actual:#x}")]
    FileTooShort {
        /// Region start.
        guest_address: u64,
        /// `file_offset + size`.
        needed: u64,
        /// The file's length.
        actual: u64,
    },
    /// The backing file could not be inspected.
    #[error(
        "cannot read the size of the file behind memory region at {guest_address:#x}: {errno}"
    )]
    Stat {
        /// Region start.
        guest_address: u64,
        /// The OS error text.
        errno: String,
    },
    /// A file offset Windows cannot map a section view from.
    #[error("memory region at {guest_address:#x}: file offset {file_offset:#x} is not a multiple of {granularity:#x}, the allocation granularity Windows requires of a section view's offset")]
    ViewOffsetUnaligned {
        /// Region start.
        guest_address: u64,
        /// The region's file offset.
        file_offset: u64,
        /// The host's allocation granularity (64 KiB on every Windows so far).
        granularity: u64,
    },
    /// More regions than memory slots.
    #[error("{count} memory regions exceed the host's {max} memory slots")]
    TooManySlots {
        /// Regions requested.
        count: usize,
        /// Slots available.
        max: usize,
    },
}

/// Validates `regions` for a backing with `page_size` pages and a hypervisor with `max_slots`
/// memory slots.
pub fn validate_regions(
    regions: &[ShareableRegion],
    page_size: u64,
    max_slots: usize,
) -> Result<(), RegionError> {
    if regions.len() > max_slots {
        return Err(RegionError::TooManySlots {
            count: regions.len(),
            max: max_slots,
        });
    }
    for r in regions {
        validate_one(r, page_size)?;
    }
    let mut sorted: Vec<&ShareableRegion> = regions.iter().collect();
    sorted.sort_by_key(|r| r.guest_address);
    for pair in sorted.windows(2) {
        // Both ends were checked for overflow above.
        if pair[0].guest_address + pair[0].size > pair[1].guest_address {
            return Err(RegionError::Overlap {
                first: pair[0].guest_address,
                second: pair[1].guest_address,
            });
        }
    }
    Ok(())
}

/// Checks Windows' rule for section views (`MapViewOfFile`): each region's `file_offset` is a
/// multiple of the allocation `granularity`. Call after `validate_regions`.
pub fn validate_view_offsets(
    regions: &[ShareableRegion],
    granularity: u64,
) -> Result<(), RegionError> {
    match regions
        .iter()
        .find(|r| granularity == 0 || r.file_offset % granularity != 0)
    {
        Some(r) => Err(RegionError::ViewOffsetUnaligned {
            guest_address: r.guest_address,
            file_offset: r.file_offset,
            granularity,
        }),
        None => Ok(()),
    }
}

fn validate_one(r: &ShareableRegion, page_size: u64) -> Result<(), RegionError> {
    let guest_address = r.guest_address;
    if r.size == 0 {
        return Err(RegionError::ZeroSize { guest_address });
    }
    for (what, value) in [
        ("guest address", r.guest_address),
        ("size", r.size),
        ("file offset", r.file_offset),
    ] {
        if value % page_size != 0 {
            return Err(RegionError::Unaligned {
                guest_address,
                what,
                value,
                page_size,
            });
        }
    }
    let (Some(_), Some(needed)) = (r.guest_end(), r.file_end()) else {
        return Err(RegionError::Overflow {
            guest_address,
            size: r.size,
            file_offset: r.file_offset,
        });
    };
    let actual = r.file.byte_len().map_err(|e| RegionError::Stat {
        guest_address,
        errno: e.to_string(),
    })?;
    if actual < needed {
        return Err(RegionError::FileTooShort {
            guest_address,
            needed,
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
#[cfg(unix)]
mod tests {
    use super::*;
    use crate::memory::region::Mappable;
    use std::sync::Arc;

    fn file_of(len: u64) -> Arc<Mappable> {
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        Arc::new(Mappable::new(f.into()))
    }

    fn region(
        file: &Arc<Mappable>,
        guest_address: u64,
        size: u64,
        file_offset: u64,
    ) -> ShareableRegion {
        ShareableRegion {
            guest_address,
            size,
            file: file.clone(),
            file_offset,
        }
    }

    const P: u64 = 4096;

    #[test]
    fn accepts_a_valid_split_layout() {
        let f = file_of(8 * P);
        let rs = [region(&f, 0, 4 * P, 0), region(&f, 1 << 32, 4 * P, 4 * P)];
        assert_eq!(validate_regions(&rs, P, 32), Ok(()));
    }

    #[test]
    fn rejects_zero_size() {
        let f = file_of(P);
        assert_eq!(
            validate_regions(&[region(&f, 0, 0, 0)], P, 32),
            Err(RegionError::ZeroSize { guest_address: 0 })
        );
    }

    #[test]
    fn rejects_unaligned_values() {
        let f = file_of(4 * P);
        let e = validate_regions(&[region(&f, 0, P + 1, 0)], P, 32).unwrap_err();
        assert!(
            matches!(e, RegionError::Unaligned { what: "size", .. }),
            "{e}"
        );
        let e = validate_regions(&[region(&f, 0x800, P, 0)], P, 32).unwrap_err();
        assert!(
            matches!(
                e,
                RegionError::Unaligned {
                    what: "guest address",
                    ..
                }
            ),
            "{e}"
        );
        let e = validate_regions(&[region(&f, 0, P, 12)], P, 32).unwrap_err();
        assert!(
            matches!(
                e,
                RegionError::Unaligned {
                    what: "file offset",
                    ..
                }
            ),
            "{e}"
        );
        // Huge page alignment is checked against the backing's page size.
        let e = validate_regions(&[region(&f, 0, 4 * P, 0)], 2 << 20, 32).unwrap_err();
        assert!(matches!(e, RegionError::Unaligned { .. }), "{e}");
    }

    #[test]
    fn rejects_overlap() {
        let f = file_of(8 * P);
        let rs = [region(&f, 2 * P, 4 * P, 0), region(&f, 0, 3 * P, 4 * P)];
        assert_eq!(
            validate_regions(&rs, P, 32),
            Err(RegionError::Overlap {
                first: 0,
                second: 2 * P
            })
        );
    }

    #[test]
    fn rejects_short_file() {
        let f = file_of(4 * P);
        assert_eq!(
            validate_regions(&[region(&f, 0, 4 * P, P)], P, 32),
            Err(RegionError::FileTooShort {
                guest_address: 0,
                needed: 5 * P,
                actual: 4 * P
            })
        );
    }

    #[test]
    fn rejects_offset_overflow() {
        let f = file_of(P);
        let e = validate_regions(&[region(&f, 0, P, u64::MAX - P + 1)], P, 32).unwrap_err();
        assert!(matches!(e, RegionError::Overflow { .. }), "{e}");
        let e = validate_regions(&[region(&f, u64::MAX - P + 1, P, 0)], P, 32).unwrap_err();
        assert!(matches!(e, RegionError::Overflow { .. }), "{e}");
    }

    #[test]
    fn rejects_view_offsets_off_the_allocation_granularity() {
        let f = file_of(32 * P);
        let g = 16 * P;
        let ok = [region(&f, 0, P, 0), region(&f, P, P, g)];
        assert_eq!(validate_view_offsets(&ok, g), Ok(()));
        let bad = [region(&f, 0, P, 0), region(&f, P, P, 4 * P)];
        let e = validate_view_offsets(&bad, g).unwrap_err();
        assert_eq!(
            e,
            RegionError::ViewOffsetUnaligned {
                guest_address: P,
                file_offset: 4 * P,
                granularity: g
            }
        );
        assert!(e.to_string().contains("allocation granularity"), "{e}");
    }

    #[test]
    fn rejects_more_regions_than_slots() {
        let f = file_of(2 * P);
        let rs = [region(&f, 0, P, 0), region(&f, P, P, P)];
        assert_eq!(
            validate_regions(&rs, P, 1),
            Err(RegionError::TooManySlots { count: 2, max: 1 })
        );
    }
}
