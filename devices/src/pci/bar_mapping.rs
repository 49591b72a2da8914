//! Keeps the VM's PCI memory BARs where their registers say: each function's range on the MMIO
//! bus, and its MMIO ioeventfds (virtqueue notifications) bound at the matching addresses.
//!
//! The guest may move a BAR (write a new address), turn memory decoding off and on, or size the
//! BAR (write all-ones); `PciConfigSpace::bar_decode` says what the registers ask for and
//! `BarMapping::update` makes it so. Moving takes the range off the bus, puts it on at the new
//! address, and moves the ioeventfds: each is unbound at the old address (KVM matches an unbind
//! by eventfd, address, length and data match, all kept the same as at the bind) and bound at
//! the new one. Decoding off (or a BAR being sized) leaves the function on no address: accesses
//! to its old range read as all-ones, like any hole. Its ioeventfds stay bound there until the
//! BAR goes elsewhere or another BAR takes the range (binding costs a KVM SRCU grace period, and
//! OSes turn decoding off and on around every BAR they size); meanwhile a write to a
//! notification address only makes the device look at that queue.
//!
//! The address is guest input. One the VM cannot give the BAR is refused: a range outside the
//! PCI windows the BAR may use (so never RAM, the ECAM area, the IOAPIC or the local APIC) or
//! over another device's range. A refused BAR stays unmapped until the guest writes another
//! address or the range it asked for becomes free (an OS reassigning BARs moves them one at a
//! time, so one may briefly ask for a place another still holds); the first refusal of a
//! function is logged as a warning, later ones at debug level. Not handled here: which address
//! to pick at build time (`bar_allocator`), I/O BARs.
//!
//! Locking: `BarSpace` is one mutex for the whole VM, taken by a function's configuration write
//! while that function is locked, and never held while locking a device: the order is device,
//! then BAR space, then bus.

use std::sync::{Arc, Mutex, PoisonError, Weak};

use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use super::config_space::BarDecode;
use crate::bus::{Bus, BusDevice, BusError};
use crate::error_chain;

/// Binds eventfds to guest MMIO writes in the hypervisor (KVM ioeventfds: no data match, any
/// access width).
pub trait IoEventRegistry: Send + Sync {
    /// Makes guest writes at `address` signal `event` without an exit.
    fn register(&self, event: &EventFd, address: u64) -> std::io::Result<()>;
    /// Undoes `register(event, address)`.
    fn unregister(&self, event: &EventFd, address: u64) -> std::io::Result<()>;
}

/// Why a BAR could not be mapped where asked.
#[derive(Debug, Error)]
pub enum BarMapError {
    /// The range is not inside a PCI window this BAR may use.
    #[error("BAR range {address:#x}+{size:#x} lies outside the PCI MMIO windows")]
    OutsideWindows {
        /// Requested address.
        address: u64,
        /// BAR size.
        size: u64,
    },
    /// The range is taken (another device's BAR or a platform device) or wraps.
    #[error("BAR range cannot go on the MMIO bus")]
    Bus(#[source] BusError),
    /// The function no longer exists (the VM is being torn down).
    #[error("the PCI function is gone")]
    DeviceGone,
    /// A notification eventfd could not be shared with the BAR space.
    #[error("cannot share a notification eventfd")]
    EventFd(#[source] std::io::Error),
    /// The hypervisor refused to bind a notification eventfd; guest writes there reach the
    /// device through an MMIO exit instead.
    #[error("cannot bind an ioeventfd at {address:#x}")]
    IoEvent {
        /// The notification address.
        address: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// One function's BAR in the space.
struct Slot {
    name: &'static str,
    device: Weak<Mutex<dyn BusDevice>>,
    size: u64,
    /// `(start, size)` of each address range the BAR may occupy.
    windows: Vec<(u64, u64)>,
    /// Notification eventfds, each at its offset in the BAR.
    events: Vec<(u64, EventFd)>,
    /// Where the registers ask the BAR to be.
    want: Option<u64>,
    /// Where the range is on the bus.
    mapped: Option<u64>,
    /// Where the ioeventfds are bound (`mapped`, or where the BAR was before decoding went
    /// off), and the offsets of those bound.
    bound_at: Option<u64>,
    bound: Vec<u64>,
    /// What the last `update` asked for, so a configuration write that changes nothing about
    /// the BAR does nothing (and a refused address is not logged again).
    requested: Option<Option<u64>>,
    /// Rate limit for the warnings the guest's BAR placements cause.
    warnings: crate::guest_warnings::GuestWarnings,
}

impl Slot {
    fn overlaps(&self, at: u64, start: u64, size: u64) -> bool {
        at < start.saturating_add(size) && start < at.saturating_add(self.size)
    }
}

struct Space {
    bus: Bus,
    ioevents: Arc<dyn IoEventRegistry>,
    slots: Vec<Slot>,
}

/// The BARs of every PCI function of one VM on its MMIO bus (see the module comment).
#[derive(Clone)]
pub struct BarSpace {
    space: Arc<Mutex<Space>>,
}

impl std::fmt::Debug for BarSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BarSpace").finish_non_exhaustive()
    }
}

/// One function's BAR: its handle into the `BarSpace`.
pub struct BarMapping {
    space: Arc<Mutex<Space>>,
    index: usize,
}

impl std::fmt::Debug for BarMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BarMapping")
            .field("index", &self.index)
            .field("mapped", &self.mapped())
            .finish_non_exhaustive()
    }
}

impl BarSpace {
    /// BARs on `bus`, whose ioeventfds `ioevents` binds.
    pub fn new(bus: Bus, ioevents: Arc<dyn IoEventRegistry>) -> Self {
        Self {
            space: Arc::new(Mutex::new(Space {
                bus,
                ioevents,
                slots: Vec::new(),
            })),
        }
    }

    /// Adds a BAR of `size` bytes of the function `device` (named `name` in messages), not
    /// mapped yet, that may sit in `windows` (`(start, size)` each), with the notification
    /// eventfds `events` at their offsets in the BAR.
    pub fn add(
        &self,
        name: &'static str,
        device: Weak<Mutex<dyn BusDevice>>,
        size: u64,
        windows: Vec<(u64, u64)>,
        events: &[(u64, &EventFd)],
    ) -> Result<BarMapping, BarMapError> {
        let events = events
            .iter()
            .map(|(offset, e)| Ok((*offset, e.try_clone().map_err(BarMapError::EventFd)?)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut space = lock(&self.space);
        space.slots.push(Slot {
            name,
            device,
            size,
            windows,
            events,
            want: None,
            mapped: None,
            bound_at: None,
            bound: Vec::new(),
            requested: None,
            warnings: crate::guest_warnings::GuestWarnings::new(format!("virtio {name} BAR")),
        });
        Ok(BarMapping {
            space: self.space.clone(),
            index: space.slots.len() - 1,
        })
    }
}

fn lock(space: &Mutex<Space>) -> std::sync::MutexGuard<'_, Space> {
    space.lock().unwrap_or_else(PoisonError::into_inner)
}

impl BarMapping {
    /// Where the BAR responds now, if anywhere.
    pub fn mapped(&self) -> Option<u64> {
        lock(&self.space).slots[self.index].mapped
    }

    /// Makes the BAR follow `decode` after a guest write: like `map`, but a refused address
    /// is logged (a warning the first time) rather than returned, and nothing is done if the
    /// registers ask for what they asked for last time.
    pub fn update(&self, decode: BarDecode) {
        let to = match decode {
            BarDecode::Updating => return,
            BarDecode::Off => None,
            BarDecode::At(address) => Some(address),
        };
        let mut space = lock(&self.space);
        let slot = &mut space.slots[self.index];
        if slot.requested == Some(to) {
            return;
        }
        slot.requested = Some(to);
        let (name, from) = (slot.name, slot.mapped);
        let result = space.place(self.index, to);
        let slot = &mut space.slots[self.index];
        match result {
            Ok(()) => log::debug!(
                "virtio {name}: BAR moved from {} to {}",
                describe(from),
                describe(to)
            ),
            Err(e @ BarMapError::IoEvent { .. }) => crate::guest_warn!(
                Some(&slot.warnings),
                "notifications unbound",
                "virtio {name}: BAR at {}: {} (notifications there take an MMIO exit)",
                describe(to),
                error_chain(&e)
            ),
            Err(e) => crate::guest_warn!(
                Some(&slot.warnings),
                "placement refused",
                "virtio {name}: guest placed the BAR at {:#x}: {}; it stays unmapped until \
                 the guest writes another address or that range is free",
                to.unwrap_or_default(),
                error_chain(&e)
            ),
        }
    }

    /// Maps the BAR at `to` (`None`: nowhere), moving it from where it is, with its ioeventfds
    /// bound there. On a placement error the BAR is left unmapped (and mapped later if the
    /// range becomes free); on an `IoEvent` error it is mapped without the eventfds that
    /// failed.
    pub fn map(&self, to: Option<u64>) -> Result<(), BarMapError> {
        let mut space = lock(&self.space);
        space.slots[self.index].requested = Some(to);
        space.place(self.index, to)
    }
}

impl Space {
    /// Slot `index` wants to be at `to`: moves it, then lets BARs waiting for a range in.
    fn place(&mut self, index: usize, to: Option<u64>) -> Result<(), BarMapError> {
        let slot = &mut self.slots[index];
        slot.want = to;
        if slot.mapped == to {
            return Ok(());
        }
        if let Some(at) = slot.mapped.take() {
            self.bus.remove(at);
        }
        let result = match to {
            Some(address) => self.map_at(index, address),
            None => Ok(()),
        };
        for other in 0..self.slots.len() {
            let waiting = &self.slots[other];
            if let (Some(address), None) = (waiting.want, waiting.mapped) {
                if other != index && self.map_at(other, address).is_ok() {
                    log::debug!(
                        "virtio {}: BAR mapped at {address:#x}, now free",
                        self.slots[other].name
                    );
                }
            }
        }
        result
    }

    /// Puts slot `index` (unmapped) on the bus at `address` and binds its ioeventfds there.
    fn map_at(&mut self, index: usize, address: u64) -> Result<(), BarMapError> {
        let slot = &self.slots[index];
        let size = slot.size;
        let inside = slot.windows.iter().any(|&(start, len)| {
            address >= start
                && address
                    .checked_add(size)
                    .is_some_and(|end| end <= start.saturating_add(len))
        });
        if !inside {
            return Err(BarMapError::OutsideWindows { address, size });
        }
        self.bus
            .check_free(address, size)
            .map_err(BarMapError::Bus)?;
        let device = slot.device.upgrade().ok_or(BarMapError::DeviceGone)?;
        // Ioeventfds left bound where this BAR no longer goes, or where others' BARs were
        // before their decoding went off, must not catch writes meant for this one.
        for other in 0..self.slots.len() {
            let o = &self.slots[other];
            let stale = match o.bound_at {
                Some(at) if other == index => at != address,
                Some(at) => o.mapped.is_none() && o.overlaps(at, address, size),
                None => false,
            };
            if stale {
                self.unbind(other);
            }
        }
        self.bus
            .insert(device, address, size)
            .map_err(BarMapError::Bus)?;
        self.slots[index].mapped = Some(address);
        if self.slots[index].bound_at == Some(address) {
            return Ok(());
        }
        let slot = &mut self.slots[index];
        slot.bound_at = Some(address);
        let mut first_error = None;
        for (offset, event) in &slot.events {
            let at = address + offset;
            match self.ioevents.register(event, at) {
                Ok(()) => slot.bound.push(*offset),
                Err(source) => {
                    first_error.get_or_insert(BarMapError::IoEvent {
                        address: at,
                        source,
                    });
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Unbinds slot `index`'s ioeventfds.
    fn unbind(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        let Some(base) = slot.bound_at.take() else {
            return;
        };
        for offset in std::mem::take(&mut slot.bound) {
            let Some((_, event)) = slot.events.iter().find(|(o, _)| *o == offset) else {
                continue;
            };
            if let Err(e) = self.ioevents.unregister(event, base + offset) {
                log::warn!(
                    "virtio {}: cannot unbind the ioeventfd at {:#x}: {e}",
                    slot.name,
                    base + offset
                );
            }
        }
    }
}

fn describe(at: Option<u64>) -> String {
    at.map_or_else(|| "nowhere".into(), |a| format!("{a:#x}"))
}

/// A fake hypervisor for tests of BAR moves.
#[cfg(test)]
pub(crate) mod test_registry {
    #![allow(clippy::unwrap_used)]

    use std::os::fd::AsRawFd;
    use std::sync::Mutex;

    use vmm_sys_util::eventfd::EventFd;

    use super::IoEventRegistry;

    /// Records bound ioeventfds as (fd, address); refuses addresses in `refuse` and, as KVM
    /// does, a second binding at one address.
    #[derive(Default)]
    pub(crate) struct Registry {
        pub(crate) bound: Mutex<Vec<(i32, u64)>>,
        pub(crate) refuse: Vec<u64>,
        /// Successful binds so far.
        pub(crate) binds: std::sync::atomic::AtomicUsize,
    }

    impl IoEventRegistry for Registry {
        fn register(&self, event: &EventFd, address: u64) -> std::io::Result<()> {
            if self.refuse.contains(&address) {
                return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
            }
            let mut bound = self.bound.lock().unwrap();
            if bound.iter().any(|b| b.1 == address) {
                // KVM refuses a second no-data-match ioeventfd at one address.
                return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
            }
            bound.push((event.as_raw_fd(), address));
            self.binds
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
        fn unregister(&self, event: &EventFd, address: u64) -> std::io::Result<()> {
            let mut bound = self.bound.lock().unwrap();
            let key = (event.as_raw_fd(), address);
            let at = bound.iter().position(|b| *b == key).ok_or_else(|| {
                std::io::Error::from_raw_os_error(libc::ENOENT) // as KVM answers
            })?;
            bound.remove(at);
            Ok(())
        }
    }

    impl Registry {
        /// Successful binds so far.
        pub(crate) fn binds(&self) -> usize {
            self.binds.load(std::sync::atomic::Ordering::Relaxed)
        }

        /// Addresses bound now, sorted.
        pub(crate) fn addresses(&self) -> Vec<u64> {
            let mut a: Vec<u64> = self.bound.lock().unwrap().iter().map(|b| b.1).collect();
            a.sort_unstable();
            a
        }
    }
}

#[cfg(test)]
mod tests;
