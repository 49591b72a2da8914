//! Guest RAM as a vhost-user backend must see it: each `ShareableRegion` with its own
//! descriptor, `file_offset`, guest address, size, and where this process mapped it (the
//! "user address" the protocol translates ring addresses with).
//!
//! Only shared (`MAP_SHARED`) RAM can be handed out: memory restored copy-on-write from a
//! snapshot keeps the guest's writes in this process, where no backend would see them.

use std::os::fd::AsFd;

use devices::vhost_user::SharedMemoryRegion;
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::GuestRam;

/// Why guest RAM cannot be shared with a backend.
#[derive(Debug, Error)]
pub enum ShareError {
    /// The regions are mapped copy-on-write.
    #[error("guest memory is mapped copy-on-write (restored with --memory-mode cow); vhost-user devices need shared memory")]
    Private,
    /// A region's descriptor could not be duplicated.
    #[error("cannot duplicate the descriptor of the memory region at {guest_address:#x}")]
    Dup {
        /// Region start.
        guest_address: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A region is not in the `vm-memory` view (cannot happen for RAM built by `GuestRam`).
    #[error("memory region at {0:#x} is not mapped")]
    NotMapped(u64),
}

/// One `SharedMemoryRegion` per region of `ram`, in guest address order.
pub fn shared_regions(ram: &GuestRam) -> Result<Vec<SharedMemoryRegion>, ShareError> {
    if ram.is_private() {
        return Err(ShareError::Private);
    }
    ram.regions()
        .iter()
        .map(|r| {
            let host = ram
                .memory()
                .get_host_address(GuestAddress(r.guest_address))
                .map_err(|_| ShareError::NotMapped(r.guest_address))?;
            let fd = r
                .file
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| ShareError::Dup {
                    guest_address: r.guest_address,
                    source,
                })?;
            Ok(SharedMemoryRegion {
                guest_address: r.guest_address,
                size: r.size,
                host_address: host as u64,
                fd,
                file_offset: r.file_offset,
            })
        })
        .collect()
}
