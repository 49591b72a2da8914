//! `TrackedGuestMemory`, the one name for the guest's memory as the VMM and every device use it:
//! vm-memory's `GuestMemoryMmap` over the VM's RAM mappings, with the atomic dirty bitmap that
//! records device writes (live snapshots read it). Cloning shares the mappings.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestMemoryMmap;

/// The guest's memory as vm-memory maps it, with the atomic dirty bitmap that live snapshots
/// read (one bit per page a device wrote through this view).
pub type TrackedGuestMemory = GuestMemoryMmap<AtomicBitmap>;
