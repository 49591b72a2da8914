//! What both boot paths (Linux's `boot`, through linux-loader, and Windows' `windows_vm::boot`)
//! share: the boot protocol chosen for a kernel, the boot vCPU's state it implies, and where
//! the initrd goes.

use arch::layout::PAGE_SIZE;
use arch::regs::{SpecialRegisters, StandardRegisters};

/// The boot protocol chosen for the loaded kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH: 32-bit protected mode, paging off.
    Pvh,
    /// Linux 64-bit boot protocol: long mode with identity page tables.
    Linux64,
}

/// The boot vCPU's initial state.
#[derive(Debug, Clone, Copy)]
pub struct BootCpuState {
    /// Protocol the registers follow.
    pub protocol: BootProtocol,
    /// General-purpose registers (entry point, boot structure pointer).
    pub regs: StandardRegisters,
}

impl BootCpuState {
    /// Applies the protocol's segment and control registers on top of the vCPU's reset state.
    pub fn apply_sregs(&self, sregs: &mut SpecialRegisters) {
        match self.protocol {
            BootProtocol::Pvh => arch::pvh::pvh_boot_sregs(sregs),
            BootProtocol::Linux64 => arch::linux_boot::long_mode_boot_sregs(sregs),
        }
    }
}

/// Picks the initrd's address: the highest page-aligned `a` with `a + size <= high`, `a >= low`.
pub fn place_initrd(size: u64, low: u64, high: u64) -> Option<u64> {
    let start = high.checked_sub(size)? & !(PAGE_SIZE - 1);
    let low = low.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1);
    (start >= low).then_some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initrd_placement_is_the_highest_aligned_fit() {
        assert_eq!(place_initrd(0x1800, 0x10_0000, 0x20_0000), Some(0x1f_e000));
        assert_eq!(place_initrd(0x1000, 0x10_0000, 0x20_0000), Some(0x1f_f000));
        assert_eq!(
            place_initrd(0x10_0000, 0x10_0000, 0x20_0000),
            Some(0x10_0000)
        );
        assert_eq!(place_initrd(0x10_0001, 0x10_0000, 0x20_0000), None);
        assert_eq!(place_initrd(u64::MAX, 0, 0x20_0000), None);
        assert_eq!(place_initrd(0x1000, 0x10_0001, 0x10_1000), None);
    }
}
