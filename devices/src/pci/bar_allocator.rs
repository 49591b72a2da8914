//! Guest physical addresses for BARs: a bump allocator over the 32-bit PCI window below 4 GiB
//! and one over the 64-bit window above RAM. Each BAR is naturally aligned (to its size, and at
//! least to a page so that no two devices share one). Nothing is ever freed: devices are placed
//! once, when the VM is built.

use thiserror::Error;

/// Smallest alignment of a BAR: one 4 KiB page.
const MIN_BAR_ALIGN: u64 = 0x1000;

/// Which window a BAR comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarWindow {
    /// Below 4 GiB (32-bit or 64-bit BARs).
    Mmio32,
    /// Above RAM (64-bit BARs only).
    Mmio64,
}

/// Errors from allocating a BAR.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BarAllocError {
    /// The size is not a power of two of at least 16 bytes.
    #[error("invalid BAR size {0:#x}: expected a power of two of at least 16 bytes")]
    Size(u64),
    /// The window has no aligned room left.
    #[error("the {window:?} PCI window has no room for a BAR of {size:#x} bytes")]
    Exhausted {
        /// The window.
        window: BarWindow,
        /// Requested size.
        size: u64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Window {
    next: u64,
    end: u64,
}

impl Window {
    fn allocate(&mut self, size: u64) -> Option<u64> {
        let start = self
            .next
            .checked_next_multiple_of(size.max(MIN_BAR_ALIGN))?;
        let end = start.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(start)
    }
}

/// Hands out BAR addresses from the two PCI windows.
#[derive(Debug, Clone)]
pub struct BarAllocator {
    mmio32: Window,
    mmio64: Window,
}

impl BarAllocator {
    /// Allocator over `mmio32` and `mmio64`, each `(start, size)`.
    pub fn new(mmio32: (u64, u64), mmio64: (u64, u64)) -> Self {
        let window = |(start, size): (u64, u64)| Window {
            next: start,
            end: start.saturating_add(size),
        };
        Self {
            mmio32: window(mmio32),
            mmio64: window(mmio64),
        }
    }

    /// The start of a free, naturally aligned range of `size` bytes in `window`.
    pub fn allocate(&mut self, window: BarWindow, size: u64) -> Result<u64, BarAllocError> {
        if size < 16 || !size.is_power_of_two() {
            return Err(BarAllocError::Size(size));
        }
        let w = match window {
            BarWindow::Mmio32 => &mut self.mmio32,
            BarWindow::Mmio64 => &mut self.mmio64,
        };
        w.allocate(size)
            .ok_or(BarAllocError::Exhausted { window, size })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_aligned_disjoint_and_bounded() {
        let mut a = BarAllocator::new((0xc000_0000, 0x10_0000), (0x180_0000_0000, 1 << 34));
        let x = a.allocate(BarWindow::Mmio32, 0x8000).unwrap();
        let y = a.allocate(BarWindow::Mmio32, 0x10).unwrap();
        let z = a.allocate(BarWindow::Mmio32, 0x4_0000).unwrap();
        assert_eq!(x, 0xc000_0000);
        assert_eq!(y, 0xc000_8000);
        assert_eq!(y % 0x1000, 0, "small BARs get a page of their own");
        assert_eq!(z, 0xc004_0000, "aligned to its size");
        assert_eq!(
            a.allocate(BarWindow::Mmio32, 0x10_0000),
            Err(BarAllocError::Exhausted {
                window: BarWindow::Mmio32,
                size: 0x10_0000
            })
        );
        let big = a.allocate(BarWindow::Mmio64, 1 << 33).unwrap();
        assert_eq!(big, 0x180_0000_0000);
        assert_eq!(
            a.allocate(BarWindow::Mmio64, 1 << 33).unwrap(),
            0x182_0000_0000
        );
        assert!(a.allocate(BarWindow::Mmio64, 1 << 33).is_err());
    }

    #[test]
    fn rejects_bad_sizes_and_never_wraps() {
        let mut a = BarAllocator::new((u64::MAX - 0xfff, 0x1000), (0, 0));
        assert_eq!(
            a.allocate(BarWindow::Mmio32, 0x3000),
            Err(BarAllocError::Size(0x3000))
        );
        assert_eq!(
            a.allocate(BarWindow::Mmio32, 8),
            Err(BarAllocError::Size(8))
        );
        assert!(a.allocate(BarWindow::Mmio32, 1 << 63).is_err());
        assert!(a.allocate(BarWindow::Mmio64, 0x1000).is_err());
    }
}
