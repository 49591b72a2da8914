//! KVM dirty page logging: `KVM_MEM_LOG_DIRTY_PAGES` on every memory slot and
//! `KVM_GET_DIRTY_LOG` to fetch and clear each slot's bitmap.
//!
//! `KvmVm::map_memory` records every slot in a `SlotTable` shared with this handle, so tracking
//! can be switched by registering each slot again with the same range and the flag set or
//! cleared (KVM allows changing only the flags of an existing slot). The handle works on a
//! duplicate of the VM descriptor, so a snapshot thread can use it while the `KvmVm` stays with
//! its owner. `KVM_GET_DIRTY_LOG` write-protects the pages it reports, so each call returns the
//! pages written since the previous one. Not here: combining the bitmaps with the devices' own
//! (`snapshot::dirty`).

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use kvm_bindings::{
    kvm_dirty_log, kvm_dirty_log__bindgen_ty_1, kvm_userspace_memory_region, KVMIO,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use crate::hypervisor::{DirtyLog, HypervisorError, Result, SlotDirtyPages};
use crate::memory::SlotMemory;

ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);

/// KVM's dirty bitmap granularity: one bit per 4 KiB guest page, whatever backs the slot.
const DIRTY_PAGE: u64 = 4096;

/// One registered memory slot, holding the host memory behind it.
#[derive(Debug, Clone)]
pub(super) struct Slot {
    pub(super) slot: u32,
    pub(super) guest_address: u64,
    pub(super) memory: Arc<dyn SlotMemory>,
}

impl Slot {
    /// The slot's length in bytes.
    pub(super) fn size(&self) -> u64 {
        self.memory.size()
    }

    /// The registration KVM takes for this slot, with `flags`.
    pub(super) fn region(&self, flags: u32) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: self.slot,
            flags,
            guest_phys_addr: self.guest_address,
            memory_size: self.size(),
            userspace_addr: self.memory.as_ptr() as u64,
        }
    }
}

/// The memory slots of one VM, as `map_memory` registered them. Everything that can reach the
/// VM in the kernel (its descriptor, each duplicate, each vCPU) holds this table, so the host
/// memory of every slot stays mapped for as long as the guest can use it.
pub(super) type SlotTable = Arc<Mutex<Vec<Slot>>>;

/// Records `slot` (replacing an entry with the same number).
pub(super) fn record_slot(table: &SlotTable, slot: Slot) {
    let mut slots = table.lock().unwrap_or_else(PoisonError::into_inner);
    slots.retain(|s| s.slot != slot.slot);
    slots.push(slot);
    slots.sort_by_key(|s| s.guest_address);
}

/// Words of a bitmap with one bit per 4 KiB page of `size` bytes.
pub(super) fn bitmap_words(size: u64) -> usize {
    usize::try_from(size.div_ceil(DIRTY_PAGE).div_ceil(64)).unwrap_or(usize::MAX)
}

/// Dirty page logging through a duplicate of a KVM VM descriptor.
#[derive(Debug)]
pub(super) struct KvmDirtyLog {
    vm: File,
    slots: SlotTable,
    tracking: Arc<AtomicBool>,
}

impl KvmDirtyLog {
    pub(super) fn new(vm: &VmFd, slots: SlotTable, tracking: Arc<AtomicBool>) -> Result<Self> {
        // SAFETY: the descriptor belongs to `vm`, which is open for the duration of this call.
        let borrowed = unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) };
        let owned = borrowed
            .try_clone_to_owned()
            .map_err(HypervisorError::DuplicateVm)?;
        Ok(Self {
            vm: File::from(owned),
            slots,
            tracking,
        })
    }

    fn register(&self, s: &Slot, flags: u32) -> Result<()> {
        let region = s.region(flags);
        // SAFETY: `self.vm` is a KVM VM descriptor and the kernel only reads `region`. The slot
        // keeps exactly the range `map_memory` registered, whose memory the slot table holds
        // (and this handle holds the table); only its flags change.
        let rc = unsafe { ioctl_with_ref(&self.vm, KVM_SET_USER_MEMORY_REGION(), &region) };
        if rc < 0 {
            return Err(HypervisorError::DirtyLogging {
                slot: s.slot,
                on: flags & KVM_MEM_LOG_DIRTY_PAGES != 0,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn fetch(&self, s: &Slot) -> Result<Vec<u64>> {
        let mut bitmap = vec![0u64; bitmap_words(s.size())];
        let log = kvm_dirty_log {
            slot: s.slot,
            padding1: 0,
            __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bitmap.as_mut_ptr().cast(),
            },
        };
        // SAFETY: `self.vm` is a KVM VM descriptor; the kernel writes one bit per page of the
        // slot into `bitmap`, which has room for exactly that (rounded up to whole words) and
        // outlives the call.
        let rc = unsafe { ioctl_with_ref(&self.vm, KVM_GET_DIRTY_LOG(), &log) };
        if rc < 0 {
            return Err(HypervisorError::GetDirtyLog {
                slot: s.slot,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(bitmap)
    }
}

impl DirtyLog for KvmDirtyLog {
    fn set_tracking(&self, on: bool) -> Result<()> {
        let slots = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        for (i, s) in slots.iter().enumerate() {
            if let Err(e) = self.register(s, flags) {
                // Put the slots already switched back, so tracking is all or nothing.
                let back = if on { 0 } else { KVM_MEM_LOG_DIRTY_PAGES };
                for done in &slots[..i] {
                    let _ = self.register(done, back);
                }
                return Err(e);
            }
        }
        self.tracking.store(on, Ordering::Release);
        Ok(())
    }

    fn is_tracking(&self) -> bool {
        self.tracking.load(Ordering::Acquire)
    }

    fn take_dirty_pages(&self) -> Result<Vec<SlotDirtyPages>> {
        if !self.is_tracking() {
            return Err(HypervisorError::TrackingOff);
        }
        let slots = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        slots
            .iter()
            .map(|s| {
                Ok(SlotDirtyPages {
                    guest_address: s.guest_address,
                    size: s.size(),
                    bitmap: self.fetch(s)?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::slot_memory::TestMemory;

    #[test]
    fn slot_table_keeps_one_entry_per_slot_in_address_order() {
        let table: SlotTable = Arc::default();
        let memory = TestMemory::new(1 << 20);
        let slot = |n, at| Slot {
            slot: n,
            guest_address: at,
            memory: memory.clone(),
        };
        record_slot(&table, slot(1, 1 << 32));
        record_slot(&table, slot(0, 0));
        record_slot(&table, slot(1, 2 << 32));
        let got: Vec<_> = table
            .lock()
            .unwrap()
            .iter()
            .map(|s| (s.slot, s.guest_address))
            .collect();
        assert_eq!(got, vec![(0, 0), (1, 2 << 32)]);
        assert_eq!(bitmap_words(4096), 1);
        assert_eq!(bitmap_words(64 * 4096), 1);
        assert_eq!(bitmap_words(64 * 4096 + 1), 2);
    }

    /// Needs /dev/kvm: a page written through the slot's mapping by the host is not a vCPU
    /// write, so the log stays clean; the flag toggles and the ioctls succeed.
    #[test]
    fn tracking_toggles_on_a_real_vm() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let table: SlotTable = Arc::default();
        let slot = Slot {
            slot: 0,
            guest_address: 0,
            memory: TestMemory::new(2 << 20),
        };
        let log = KvmDirtyLog::new(&vm, table.clone(), Arc::default()).unwrap();
        log.register(&slot, 0).unwrap();
        record_slot(&table, slot);
        assert!(log.take_dirty_pages().is_err(), "tracking is off");
        log.set_tracking(true).unwrap();
        assert!(log.is_tracking());
        let pages = log.take_dirty_pages().unwrap();
        assert_eq!(pages.len(), 1);
        assert_eq!(pages[0].bitmap.len(), 8);
        assert!(pages[0].bitmap.iter().all(|w| *w == 0));
        log.set_tracking(false).unwrap();
        assert!(!log.is_tracking());
        drop(log);
        drop(vm);
    }
}
