//! Keeps one PCI function's memory BAR where its registers say: its range on the MMIO bus, and
//! the function's MMIO ioeventfds (virtqueue notifications) bound at the matching addresses.
//!
//! The guest may move a BAR (write a new address), turn memory decoding off and on, or size the
//! BAR (write all-ones); `PciConfigSpace::bar_decode` says what the registers ask for and
//! `BarMapping::update` makes it so. Moving unbinds every ioeventfd at the old address (KVM
//! matches an unbind by eventfd, address, length and data match, which are kept the same as at
//! the bind), takes the range off the bus, puts it on at the new address and binds the
//! ioeventfds there. Decoding off (or a BAR being sized) leaves the function on no address:
//! accesses to its old range read as all-ones, like any hole.
//!
//! The address is guest input. One the VM cannot give the BAR is refused: a range outside the
//! PCI windows the BAR may use (so never RAM, the ECAM area, the IOAPIC or the local APIC) or
//! over another device's range. A refused BAR stays unmapped until the guest writes another
//! address or toggles decoding; the first refusal of a function is logged as a warning, later
//! ones at debug level (a guest cannot flood the log). Not handled here: which address to pick
//! at build time (`bar_allocator`), I/O BARs.

use std::sync::{Arc, Mutex, Weak};

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

/// The eventfds of one function's BAR, each at its offset in the BAR.
pub type BarIoEvents<'a> = [(u64, &'a EventFd)];

/// One function's memory BAR on the MMIO bus (see the module comment).
pub struct BarMapping {
    bus: Bus,
    /// `(start, size)` of each address range the BAR may occupy.
    windows: Vec<(u64, u64)>,
    ioevents: Arc<dyn IoEventRegistry>,
    device: Weak<Mutex<dyn BusDevice>>,
    size: u64,
    name: &'static str,
    /// Where the range is on the bus now.
    mapped: Option<u64>,
    /// Offsets (in the BAR) of the ioeventfds bound at `mapped`.
    bound: Vec<u64>,
    /// What the last `update` asked for, so a configuration write that changes nothing about
    /// the BAR does nothing (and a refused address is not retried and logged again).
    requested: Option<Option<u64>>,
    warned: bool,
}

impl std::fmt::Debug for BarMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BarMapping")
            .field("device", &self.name)
            .field("mapped", &self.mapped)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl BarMapping {
    /// A BAR of `size` bytes of the function `device` (named `name` in messages), not mapped
    /// yet, that may sit in `windows` (`(start, size)` each) on `bus`.
    pub fn new(
        bus: Bus,
        windows: Vec<(u64, u64)>,
        ioevents: Arc<dyn IoEventRegistry>,
        device: Weak<Mutex<dyn BusDevice>>,
        size: u64,
        name: &'static str,
    ) -> Self {
        Self {
            bus,
            windows,
            ioevents,
            device,
            size,
            name,
            mapped: None,
            bound: Vec::new(),
            requested: None,
            warned: false,
        }
    }

    /// Where the BAR responds now, if anywhere.
    pub fn mapped(&self) -> Option<u64> {
        self.mapped
    }

    /// Makes the BAR follow `decode` after a guest write: like `map`, but a refused address
    /// is logged (a warning the first time) rather than returned, and nothing is done if the
    /// registers ask for what they asked for last time.
    pub fn update(&mut self, decode: BarDecode, ioevents: &BarIoEvents<'_>) {
        let to = match decode {
            BarDecode::Updating => return,
            BarDecode::Off => None,
            BarDecode::At(address) => Some(address),
        };
        if self.requested == Some(to) {
            return;
        }
        let from = self.mapped;
        match self.map(to, ioevents) {
            Ok(()) => log::debug!(
                "virtio {}: BAR moved from {} to {}",
                self.name,
                describe(from),
                describe(to)
            ),
            Err(e @ BarMapError::IoEvent { .. }) => log::warn!(
                "virtio {}: BAR at {}: {} (notifications there take an MMIO exit)",
                self.name,
                describe(to),
                error_chain(&e)
            ),
            Err(e) if !self.warned => {
                self.warned = true;
                log::warn!(
                    "virtio {}: guest placed the BAR at {:#x}: {}; it stays unmapped until the \
                     guest writes another address (further refusals are logged at debug level)",
                    self.name,
                    to.unwrap_or_default(),
                    error_chain(&e)
                );
            }
            Err(e) => log::debug!("virtio {}: {}", self.name, error_chain(&e)),
        }
    }

    /// Maps the BAR at `to` (`None`: nowhere), moving it from where it is, with the ioeventfds
    /// `ioevents` (each at its offset in the BAR; the same list every call) bound there. On a
    /// placement error the BAR is left unmapped; on an `IoEvent` error it is mapped without
    /// the eventfds that failed.
    pub fn map(&mut self, to: Option<u64>, ioevents: &BarIoEvents<'_>) -> Result<(), BarMapError> {
        self.requested = Some(to);
        if to == self.mapped {
            return Ok(());
        }
        self.unmap(ioevents);
        let Some(address) = to else {
            return Ok(());
        };
        let inside = self.windows.iter().any(|&(start, size)| {
            address >= start
                && address
                    .checked_add(self.size)
                    .is_some_and(|end| end <= start.saturating_add(size))
        });
        if !inside {
            return Err(BarMapError::OutsideWindows {
                address,
                size: self.size,
            });
        }
        let device = self.device.upgrade().ok_or(BarMapError::DeviceGone)?;
        self.bus
            .insert(device, address, self.size)
            .map_err(BarMapError::Bus)?;
        self.mapped = Some(address);
        let mut first_error = None;
        for &(offset, event) in ioevents {
            let at = address + offset;
            match self.ioevents.register(event, at) {
                Ok(()) => self.bound.push(offset),
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

    /// Takes the BAR off the bus and unbinds its ioeventfds.
    fn unmap(&mut self, ioevents: &BarIoEvents<'_>) {
        let Some(address) = self.mapped.take() else {
            return;
        };
        for offset in std::mem::take(&mut self.bound) {
            let Some((_, event)) = ioevents.iter().find(|(o, _)| *o == offset) else {
                continue;
            };
            if let Err(e) = self.ioevents.unregister(event, address + offset) {
                log::warn!(
                    "virtio {}: cannot unbind the ioeventfd at {:#x}: {e}",
                    self.name,
                    address + offset
                );
            }
        }
        self.bus.remove(address);
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

    /// Records bound ioeventfds as (fd, address); refuses addresses in `refuse`.
    #[derive(Default)]
    pub(crate) struct Registry {
        pub(crate) bound: Mutex<Vec<(i32, u64)>>,
        pub(crate) refuse: Vec<u64>,
    }

    impl IoEventRegistry for Registry {
        fn register(&self, event: &EventFd, address: u64) -> std::io::Result<()> {
            if self.refuse.contains(&address) {
                return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
            }
            let mut bound = self.bound.lock().unwrap();
            let key = (event.as_raw_fd(), address);
            assert!(!bound.contains(&key), "bound twice: {key:?}");
            bound.push(key);
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
        /// Addresses bound now, sorted.
        pub(crate) fn addresses(&self) -> Vec<u64> {
            let mut a: Vec<u64> = self.bound.lock().unwrap().iter().map(|b| b.1).collect();
            a.sort_unstable();
            a
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::test_registry::Registry;
    use super::*;

    struct Answer(u8);

    impl BusDevice for Answer {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(self.0);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    const WINDOW: (u64, u64) = (0xc000_0000, 0x2000_0000);
    const SIZE: u64 = 0x8000;

    struct Rig {
        bus: Bus,
        registry: Arc<Registry>,
        device: Arc<Mutex<dyn BusDevice>>,
        kicks: Vec<EventFd>,
        bar: BarMapping,
    }

    fn rig(refuse: Vec<u64>) -> Rig {
        let bus = Bus::new();
        let registry = Arc::new(Registry {
            refuse,
            ..Registry::default()
        });
        let device: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Answer(0x42)));
        let bar = BarMapping::new(
            bus.clone(),
            vec![WINDOW],
            registry.clone(),
            Arc::downgrade(&device),
            SIZE,
            "test",
        );
        let kicks = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        Rig {
            bus,
            registry,
            device,
            kicks,
            bar,
        }
    }

    impl Rig {
        fn update(&mut self, decode: BarDecode) {
            let events = [(0x3000, &self.kicks[0]), (0x3004, &self.kicks[1])];
            self.bar.update(decode, &events);
        }
        fn map(&mut self, to: Option<u64>) -> Result<(), BarMapError> {
            let events = [(0x3000, &self.kicks[0]), (0x3004, &self.kicks[1])];
            self.bar.map(to, &events)
        }
        fn answers_at(&self, address: u64) -> bool {
            let mut b = [0u8; 1];
            self.bus.read(address + 8, &mut b) && b == [0x42]
        }
        fn bound_addresses(&self) -> Vec<u64> {
            self.registry.addresses()
        }
    }

    #[test]
    fn moves_range_and_ioeventfds_and_unmaps_while_decoding_is_off() {
        let mut r = rig(vec![]);
        r.map(Some(0xc000_0000)).unwrap();
        assert!(r.answers_at(0xc000_0000));
        assert_eq!(r.bound_addresses(), vec![0xc000_3000, 0xc000_3004]);
        r.update(BarDecode::At(0xd000_8000));
        assert!(!r.answers_at(0xc000_0000), "old range is a hole");
        assert!(r.answers_at(0xd000_8000));
        assert_eq!(r.bar.mapped(), Some(0xd000_8000));
        assert_eq!(r.bound_addresses(), vec![0xd000_b000, 0xd000_b004]);
        r.update(BarDecode::Off);
        assert!(!r.answers_at(0xd000_8000));
        assert!(r.bound_addresses().is_empty());
        assert_eq!(r.bus.ranges(), vec![]);
        // Half-written 64-bit addresses change nothing.
        r.update(BarDecode::Updating);
        assert_eq!(r.bar.mapped(), None);
        r.update(BarDecode::At(0xc000_8000));
        assert!(r.answers_at(0xc000_8000));
        r.update(BarDecode::Updating);
        assert!(r.answers_at(0xc000_8000));
        assert_eq!(r.bound_addresses(), vec![0xc000_b000, 0xc000_b004]);
    }

    #[test]
    fn refuses_addresses_outside_the_windows_or_over_another_device() {
        let mut r = rig(vec![]);
        let other: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Answer(0x77)));
        r.bus.insert(other, 0xc001_0000, 0x1000).unwrap();
        r.update(BarDecode::At(0xc000_0000));
        assert!(r.answers_at(0xc000_0000));
        for bad in [
            0x1000_0000, // RAM
            0xe000_0000, // ECAM, past the window
            0xbfff_c000, // straddles the window's start
            0xdfff_c000, // straddles the window's end
            0xfee0_0000, // local APIC
            0xc001_0000, // the other device
            u64::MAX - 0x7fff,
        ] {
            r.update(BarDecode::At(bad));
            assert_eq!(r.bar.mapped(), None, "{bad:#x} refused");
            assert!(!r.answers_at(0xc000_0000), "old place let go for {bad:#x}");
            assert!(r.bound_addresses().is_empty());
            let mut b = [0u8; 1];
            r.bus.read(0xc001_0000, &mut b);
            assert_eq!(b, [0x77], "the other device is untouched");
        }
        assert!(matches!(
            r.map(Some(0xc001_0000)),
            Err(BarMapError::Bus(BusError::Overlap { .. }))
        ));
        assert!(matches!(
            r.map(Some(0x1000_0000)),
            Err(BarMapError::OutsideWindows { .. })
        ));
        // A valid address maps again.
        r.update(BarDecode::At(0xc002_0000));
        assert!(r.answers_at(0xc002_0000));
        assert_eq!(r.bound_addresses(), vec![0xc002_3000, 0xc002_3004]);
    }

    #[test]
    fn a_refused_ioeventfd_leaves_the_bar_mapped_and_the_rest_bound() {
        let mut r = rig(vec![0xc000_3004]);
        let err = r.map(Some(0xc000_0000)).unwrap_err();
        assert!(
            matches!(
                err,
                BarMapError::IoEvent {
                    address: 0xc000_3004,
                    ..
                }
            ),
            "{err}"
        );
        assert!(r.answers_at(0xc000_0000));
        assert_eq!(r.bound_addresses(), vec![0xc000_3000]);
        // Moving unbinds exactly what was bound (the registry fails on anything else).
        r.map(Some(0xc000_8000)).unwrap();
        assert_eq!(r.bound_addresses(), vec![0xc000_b000, 0xc000_b004]);
    }

    #[test]
    fn a_dropped_device_is_not_mapped() {
        let mut r = rig(vec![]);
        r.device = Arc::new(Mutex::new(Answer(0)));
        assert!(matches!(
            r.map(Some(0xc000_0000)),
            Err(BarMapError::DeviceGone)
        ));
        assert!(r.bus.ranges().is_empty());
    }
}
