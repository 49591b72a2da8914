//! `VirtioPciDevice`: one virtio device model behind a modern (virtio 1.x, non-transitional) PCI
//! function: its configuration space with the virtio capabilities and MSI-X, and its one memory
//! BAR holding every structure the driver uses.
//!
//! BAR 0 layout (32 KiB, 32-bit, non-prefetchable):
//!
//! | offset   | structure                                                          |
//! |----------|--------------------------------------------------------------------|
//! | `0x0000` | common configuration (`COMMON_CONFIG_SIZE` bytes)                  |
//! | `0x1000` | ISR status (1 byte, read clears)                                   |
//! | `0x2000` | device-specific configuration (up to 4 KiB, the device model's)   |
//! | `0x3000` | notifications: queue *n* at `0x3000 + 4 n` (`notify_off_multiplier` 4) |
//! | `0x4000` | MSI-X vector table                                                 |
//! | `0x6000` | MSI-X pending bit array                                            |
//!
//! Each queue's notification address is its own, so the VMM binds one KVM ioeventfd per queue
//! with no data match; a notification that reaches this code instead (no ioeventfd) is passed to
//! the same eventfd. The BAR follows the guest: once the VMM hands the function its
//! `BarMapping`, every configuration write that moves BAR 0 or toggles memory decoding moves
//! the range on the MMIO bus and the ioeventfds with it (`bar_mapping`). The transport owns status, features, queue set-up and interrupts; the device
//! model gets its enabled queues on `DRIVER_OK` and is reset when the driver writes status 0.
//!
//! Locking: vCPU threads call in here with this device locked; `VirtioDevice::activate` and
//! `reset` run under that lock, so a device's event-loop handlers must never take it (they use
//! `DeviceSignals`, which does not).

use std::sync::{Arc, Mutex, PoisonError};

use thiserror::Error;
use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_F_VERSION_1};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::activation::ActivationError;
use super::common_config::{CommonConfig, StatusAction, COMMON_CONFIG_SIZE};
use super::signals::VirtioPciSignals;
use super::state::{StateError, VirtioPciState};
use crate::bus::BusDevice;
use crate::guest_memory::TrackedGuestMemory;
use crate::pci::bar_mapping::{BarMapError, BarMapping};
use crate::pci::config_space::{
    BarDecode, BarKind, ConfigSpaceError, PciConfigSpace, PciIds, COMMAND, COMMAND_MEMORY,
};
use crate::pci::msix::{MsiRouteUpdater, Msix, MsixError, MSIX_CAPABILITY_ID, MSIX_ENTRY_SIZE};
use crate::pci::PciDevice;
use crate::virtio::device::{
    ActivateContext, ActivatedQueue, DeviceDirtyLog, DeviceSignals, DirtyLogError, EventLoop,
    QueueProgress, VirtioDevice,
};

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern virtio PCI device IDs are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Size of BAR 0.
pub const VIRTIO_PCI_BAR_SIZE: u64 = 0x8000;
/// Most queues one device may have.
pub const MAX_QUEUES: usize = 256;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Offset of the notification area in BAR 0.
pub const NOTIFY_OFFSET: u64 = 0x3000;

const COMMON_OFFSET: u64 = 0x0000;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_CONFIG_OFFSET: u64 = 0x2000;
const DEVICE_CONFIG_SIZE: u64 = 0x1000;
const NOTIFY_SIZE: u64 = MAX_QUEUES as u64 * NOTIFY_OFF_MULTIPLIER as u64;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_TABLE_AREA: u64 = 0x2000;
const MSIX_PBA_OFFSET: u64 = 0x6000;
const MSIX_PBA_AREA: u64 = 0x1000;
/// Most MSI-X vectors the table area holds.
const MAX_VECTORS: usize = (MSIX_TABLE_AREA / MSIX_ENTRY_SIZE) as usize;

/// Vendor-specific capability ID, used by every virtio capability.
const VENDOR_CAPABILITY_ID: u8 = 0x09;
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
/// Offsets inside the PCI configuration access capability (`virtio_pci_cfg_cap`).
const PCI_CFG_BAR: usize = 4;
const PCI_CFG_OFFSET: usize = 8;
const PCI_CFG_LENGTH: usize = 12;
const PCI_CFG_DATA: usize = 16;

const _: () = assert!(NOTIFY_OFFSET + NOTIFY_SIZE <= MSIX_TABLE_OFFSET);
const _: () = assert!(MAX_VECTORS > MAX_QUEUES);
const _: () = assert!(MSIX_PBA_OFFSET + MSIX_PBA_AREA <= VIRTIO_PCI_BAR_SIZE);

/// Errors from building a virtio PCI function.
#[derive(Debug, Error)]
pub enum TransportError {
    /// The device model has no queues or too many.
    #[error("virtio {device}: {count} queues (expected 1 to {MAX_QUEUES})")]
    QueueCount {
        /// Device name.
        device: &'static str,
        /// Its queue count.
        count: usize,
    },
    /// A queue's maximum size is not a power of two in 1..=32768.
    #[error(
        "virtio {device}: queue {queue} maximum size {size} is not a power of two in 1..=32768"
    )]
    QueueMaxSize {
        /// Device name.
        device: &'static str,
        /// Queue index.
        queue: usize,
        /// Its maximum size.
        size: u16,
    },
    /// The device model does not offer `VIRTIO_F_VERSION_1`.
    #[error("virtio {device}: features {features:#x} lack VIRTIO_F_VERSION_1")]
    NotVersion1 {
        /// Device name.
        device: &'static str,
        /// Its features.
        features: u64,
    },
    /// More MSI-X vectors than the BAR's table area holds.
    #[error("virtio {device}: {count} MSI-X vectors (at most {MAX_VECTORS})")]
    VectorCount {
        /// Device name.
        device: &'static str,
        /// Requested vectors.
        count: usize,
    },
    /// MSI-X set-up failed.
    #[error("virtio {device}: MSI-X")]
    Msix {
        /// Device name.
        device: &'static str,
        /// The cause.
        #[source]
        source: MsixError,
    },
    /// The configuration space could not be laid out.
    #[error("virtio {device}: PCI configuration space")]
    ConfigSpace {
        /// Device name.
        device: &'static str,
        /// The cause.
        #[source]
        source: ConfigSpaceError,
    },
    /// A queue's notification eventfd could not be created.
    #[error("virtio {device}: cannot create the notification eventfd of queue {queue}")]
    EventFd {
        /// Device name.
        device: &'static str,
        /// Queue index.
        queue: usize,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// MSI-X vectors a virtio PCI function needs for `device`: one per queue and one for
/// configuration changes.
pub fn msix_vector_count(device: &dyn VirtioDevice) -> usize {
    device.queue_max_sizes().len() + 1
}

/// What a virtio PCI function needs from the VMM.
pub struct VirtioPciResources {
    /// Guest memory.
    pub mem: TrackedGuestMemory,
    /// The event loop device handlers register with.
    pub event_loop: EventLoop,
    /// Where BAR 0 starts out (aligned to `VIRTIO_PCI_BAR_SIZE`, below 4 GiB).
    pub bar_address: u64,
    /// One irqfd per MSI-X vector (`msix_vector_count`).
    pub msix_irqs: Vec<EventFd>,
    /// Keeps the hypervisor's MSI routes in step with the vector table.
    pub msi_routes: Arc<dyn MsiRouteUpdater>,
}

impl std::fmt::Debug for VirtioPciResources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciResources")
            .field("bar_address", &format_args!("{:#x}", self.bar_address))
            .field("msix_irqs", &self.msix_irqs.len())
            .finish_non_exhaustive()
    }
}

/// One virtio device on PCI.
pub struct VirtioPciDevice {
    config: PciConfigSpace,
    common: CommonConfig,
    device: Box<dyn VirtioDevice>,
    name: &'static str,
    signals: Arc<VirtioPciSignals>,
    msix: Arc<Mutex<Msix>>,
    msix_cap: usize,
    pci_cfg_cap: usize,
    kicks: Vec<EventFd>,
    mem: TrackedGuestMemory,
    event_loop: EventLoop,
    /// BAR 0 on the MMIO bus, once the VMM attached the function (`set_bar_mapping`).
    bar: Option<BarMapping>,
    /// `activate` was called since the last reset (so `reset` must be).
    activation_attempted: bool,
    /// Set by `quiesce` for a device that was running: its queues' positions, until `resume`
    /// activates it again there.
    quiesced: Option<Vec<QueueProgress>>,
}

impl std::fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("device", &self.name)
            .field("bar", &self.bar)
            .field("status", &self.common.status())
            .finish_non_exhaustive()
    }
}

/// PCI class, subclass for a virtio device type.
fn class_of(device_type: u32) -> (u8, u8) {
    match device_type {
        1 => (0x02, 0x00), // network controller, Ethernet
        2 => (0x01, 0x00), // mass storage, SCSI (as other hypervisors present virtio-blk)
        3 => (0x07, 0x80), // communication controller, other
        _ => (0xff, 0x00), // unclassified
    }
}

fn vendor_capability(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    // virtio_pci_cap after the ID and link bytes: cap_len, cfg_type, bar, id, padding[2],
    // offset, length, then type-specific fields. Offsets and lengths fit u32 (BAR is 32 KiB).
    let mut body = vec![(16 + extra.len()) as u8, cfg_type, 0, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body.extend_from_slice(extra);
    body
}

/// Queue `queue`'s notification offset in BAR 0.
fn notify_offset(queue: usize) -> u64 {
    NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)
}

impl VirtioPciDevice {
    /// Puts `device` behind a virtio PCI function using `res`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        res: VirtioPciResources,
    ) -> Result<Self, TransportError> {
        let name = device.name();
        let max_sizes = device.queue_max_sizes();
        if max_sizes.is_empty() || max_sizes.len() > MAX_QUEUES {
            return Err(TransportError::QueueCount {
                device: name,
                count: max_sizes.len(),
            });
        }
        if let Some((queue, &size)) = max_sizes
            .iter()
            .enumerate()
            .find(|(_, &s)| s == 0 || s > 32768 || !s.is_power_of_two())
        {
            return Err(TransportError::QueueMaxSize {
                device: name,
                queue,
                size,
            });
        }
        let features = device.device_features();
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(TransportError::NotVersion1 {
                device: name,
                features,
            });
        }
        let count = res.msix_irqs.len();
        if count > MAX_VECTORS {
            return Err(TransportError::VectorCount {
                device: name,
                count,
            });
        }
        let msix =
            Msix::new(res.msix_irqs, res.msi_routes).map_err(|source| TransportError::Msix {
                device: name,
                source,
            })?;
        let vector_count = msix.vector_count();
        let kicks = (0..max_sizes.len())
            .map(|queue| {
                EventFd::new(EFD_NONBLOCK).map_err(|source| TransportError::EventFd {
                    device: name,
                    queue,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let space_err = |source| TransportError::ConfigSpace {
            device: name,
            source,
        };
        let (class, subclass) = class_of(device.device_type());
        let mut config = PciConfigSpace::new(PciIds {
            vendor: VIRTIO_PCI_VENDOR_ID,
            // Device types are small numbers; an unknown large one still gets a valid ID.
            device: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(device.device_type() as u16),
            revision: 1,
            class,
            subclass,
            prog_if: 0,
            subsystem_vendor: VIRTIO_PCI_VENDOR_ID,
            subsystem: 0x1100,
        });
        config
            .add_bar(0, BarKind::Memory32, VIRTIO_PCI_BAR_SIZE, res.bar_address)
            .map_err(space_err)?;
        // Placed and enabled, as firmware leaves a device it assigned.
        config.set_u16(COMMAND, COMMAND_MEMORY);
        let msix_body =
            msix.capability_body(0, MSIX_TABLE_OFFSET as u32, 0, MSIX_PBA_OFFSET as u32);
        let msix_cap = config
            .add_capability(MSIX_CAPABILITY_ID, &msix_body, &Msix::capability_writable())
            .map_err(space_err)?;
        let notify_len = max_sizes.len() as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
        for body in [
            vendor_capability(CAP_COMMON_CFG, COMMON_OFFSET, COMMON_CONFIG_SIZE, &[]),
            vendor_capability(
                CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                notify_len,
                &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
            ),
            vendor_capability(CAP_ISR_CFG, ISR_OFFSET, 1, &[]),
            vendor_capability(
                CAP_DEVICE_CFG,
                DEVICE_CONFIG_OFFSET,
                DEVICE_CONFIG_SIZE,
                &[],
            ),
        ] {
            config
                .add_capability(VENDOR_CAPABILITY_ID, &body, &[])
                .map_err(space_err)?;
        }
        // The PCI configuration access capability: bar, offset, length and data are the
        // driver's to write.
        let mut writable = vec![0u8; 18];
        writable[PCI_CFG_BAR - 2] = 0xff;
        writable[PCI_CFG_OFFSET - 2..].fill(0xff);
        let pci_cfg_cap = config
            .add_capability(
                VENDOR_CAPABILITY_ID,
                &vendor_capability(CAP_PCI_CFG, 0, 0, &[0; 4]),
                &writable,
            )
            .map_err(space_err)?;

        let msix = Arc::new(Mutex::new(msix));
        let signals = Arc::new(VirtioPciSignals::new(msix.clone(), max_sizes.len(), name));
        let common = CommonConfig::new(
            features,
            &max_sizes,
            vector_count,
            res.mem.clone(),
            signals.clone(),
        );
        Ok(Self {
            config,
            common,
            device,
            name,
            signals,
            msix,
            msix_cap,
            pci_cfg_cap,
            kicks,
            mem: res.mem,
            event_loop: res.event_loop,
            bar: None,
            activation_attempted: false,
            quiesced: None,
        })
    }

    /// The device model's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Where BAR 0 responds on the MMIO bus now, if anywhere (decoding off, a refused
    /// address, or not attached yet: nowhere).
    pub fn mapped_bar(&self) -> Option<u64> {
        self.bar.as_ref().and_then(BarMapping::mapped)
    }

    /// Number of queues.
    pub fn queue_count(&self) -> usize {
        self.kicks.len()
    }

    /// Queue `queue`'s notification offset in BAR 0 and the eventfd bound there, if it exists.
    pub fn queue_notify(&self, queue: usize) -> Option<(u64, &EventFd)> {
        let kick = self.kicks.get(queue)?;
        Some((notify_offset(queue), kick))
    }

    /// Every queue's notification eventfd at its offset in BAR 0 (to bind as ioeventfds).
    pub fn notify_events(&self) -> Vec<(u64, &EventFd)> {
        (0..self.kicks.len())
            .filter_map(|q| self.queue_notify(q))
            .collect()
    }

    /// Gives the function its BAR 0 on the MMIO bus (unmapped until `map_bar`).
    pub fn set_bar_mapping(&mut self, bar: BarMapping) {
        self.bar = Some(bar);
    }

    /// Maps BAR 0 where the configuration space says (the build-time address, or a restored
    /// one), with the queue notification ioeventfds; does nothing before `set_bar_mapping`.
    pub fn map_bar(&mut self) -> Result<(), BarMapError> {
        let to = match self.config.bar_decode(0) {
            Some(BarDecode::At(address)) => Some(address),
            _ => None,
        };
        match &self.bar {
            Some(bar) => bar.map(to),
            None => Ok(()),
        }
    }

    /// After a configuration write: BAR 0 follows its register and the memory-enable bit.
    fn follow_bar(&mut self) {
        let Some(decode) = self.config.bar_decode(0) else {
            return;
        };
        if let Some(bar) = &self.bar {
            bar.update(decode);
        }
    }

    /// The transport state the device model's handlers signal through.
    pub fn signals(&self) -> &Arc<VirtioPciSignals> {
        &self.signals
    }

    fn apply(&mut self, action: StatusAction) {
        match action {
            StatusAction::None => {}
            StatusAction::Activate => self.activate(),
            StatusAction::Reset => {
                if self.activation_attempted {
                    self.device.reset();
                    self.activation_attempted = false;
                }
            }
        }
    }

    fn activate(&mut self) {
        if let Err(e) = self.activate_at(None) {
            crate::guest_warn!(
                self.signals.guest_warnings(),
                "activation refused",
                "virtio {}: activation failed: {}",
                self.name,
                crate::error_chain(&e)
            );
            self.signals.set_needs_reset();
        }
    }

    /// Activates the device model on the enabled queues; with `progress` (a snapshot's resume
    /// or restore) each queue continues at its saved position and is kicked once, so chains
    /// the driver made available before the snapshot are taken. `Err` says why not.
    fn activate_at(&mut self, progress: Option<&[QueueProgress]>) -> Result<(), ActivationError> {
        use virtio_queue::QueueT;
        let device = self.name;
        let Some(enabled) = self.common.enabled_queues() else {
            return Err(ActivationError::QueueRefused { device }); // Marked broken already.
        };
        if let Some(progress) = progress {
            for (i, p) in progress.iter().enumerate() {
                let known = enabled.iter().any(|(index, _)| *index == p.index);
                if !known || progress[..i].iter().any(|o| o.index == p.index) {
                    return Err(ActivationError::Progress {
                        device,
                        queue: p.index,
                    });
                }
            }
        }
        let mut queues = Vec::with_capacity(enabled.len());
        for (index, mut queue) in enabled {
            let kick = self.kicks[usize::from(index)]
                .try_clone()
                .map_err(|source| ActivationError::ShareEventFd {
                    device,
                    queue: index,
                    source,
                })?;
            if let Some(p) = progress.and_then(|p| p.iter().find(|p| p.index == index)) {
                queue.set_next_avail(p.next_avail);
                queue.set_next_used(p.next_used);
            }
            queues.push(ActivatedQueue { index, queue, kick });
        }
        let kicks: Vec<u16> = queues.iter().map(|q| q.index).collect();
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            acked_features: self.common.acked_features(),
            queues,
            signals: self.signals.clone(),
            event_loop: self.event_loop.clone(),
        };
        self.activation_attempted = true;
        self.device.activate(ctx)?;
        if progress.is_some() {
            for index in kicks {
                if let Err(e) = self.kicks[usize::from(index)].write(1) {
                    log::warn!("virtio {}: cannot kick queue {index}: {e}", self.name);
                }
            }
        }
        Ok(())
    }

    /// Why guest memory writes of this function's device escape dirty tracking, if they do
    /// (`VirtioDevice::untracked_writes`).
    pub fn untracked_writes(&self) -> Option<String> {
        self.device.untracked_writes()
    }

    /// The device's own dirty log (`VirtioDevice::dirty_log`), or why it has none.
    pub fn dirty_log(&self) -> Result<Arc<dyn DeviceDirtyLog>, DirtyLogError> {
        self.device.dirty_log()
    }

    /// For a snapshot of the paused VM (no vCPU runs): finishes what the device has in flight
    /// and stops its handlers (`VirtioDevice::quiesce`), keeping the queues' positions for
    /// `save` and `resume`. Nothing touches guest memory until `resume`.
    pub fn quiesce(&mut self) {
        if self.quiesced.is_none() && self.activation_attempted {
            let progress = self.device.quiesce();
            // A device that gave up (`DEVICE_NEEDS_RESET`) stays stopped until the driver
            // resets it, after a resume as after a restore.
            if !self.signals.needs_reset() {
                self.quiesced = progress;
            }
        }
    }

    /// After a snapshot: a quiesced device continues where it stopped.
    pub fn resume(&mut self) {
        if let Some(progress) = self.quiesced.take() {
            if let Err(e) = self.activate_at(Some(&progress)) {
                log::warn!(
                    "virtio {}: cannot resume after the snapshot: {}",
                    self.name,
                    crate::error_chain(&e)
                );
                self.signals.set_needs_reset();
            }
        }
    }

    /// The function's transport state (call `quiesce` first when the driver may have
    /// activated it). The device's own state is its `Persist::save` (through `device`).
    pub fn save(&self) -> VirtioPciState {
        VirtioPciState {
            config: self.config.save(),
            msix: self.lock_msix().save(),
            common: self.common.save(),
            signals: self.signals.save(),
            progress: self.quiesced.clone().unwrap_or_default(),
        }
    }

    /// The device model behind the function (for its `Persist::save`).
    pub fn device(&self) -> &dyn VirtioDevice {
        &*self.device
    }

    /// Puts a saved state (untrusted) into this freshly built function, whose device was
    /// restored from the state saved beside it: configuration space, MSI-X (routes pushed), common configuration and
    /// signals; a device the driver had running is activated at the saved queue positions,
    /// without the driver doing anything. Refused values leave an error. BAR 0 keeps its saved
    /// address in the configuration space; `map_bar` then puts it there (after every function
    /// is restored, so that two BARs the guest swapped do not collide).
    pub fn restore(&mut self, state: &VirtioPciState) -> Result<(), StateError> {
        let device = self.name;
        let mut config = self.config.clone();
        config
            .restore(&state.config)
            .map_err(|source| StateError::ConfigSpace { device, source })?;
        self.lock_msix()
            .restore(&state.msix)
            .map_err(|source| StateError::Msix { device, source })?;
        self.common
            .restore(&state.common, &state.signals)
            .map_err(|source| StateError::CommonConfig {
                device,
                source: Box::new(source),
            })?;
        self.config = config;
        let control = self.config.read_u16(self.msix_cap + 2);
        self.lock_msix().set_control(control);
        let driver_ok = self.common.status() & VIRTIO_CONFIG_S_DRIVER_OK as u8 != 0;
        if !driver_ok && !state.progress.is_empty() {
            return Err(StateError::ProgressWithoutDriverOk { device });
        }
        if driver_ok {
            self.activation_attempted = true;
            if !state.progress.is_empty() {
                self.activate_at(Some(&state.progress))
                    .map_err(|source| StateError::Activate {
                        device,
                        source: Box::new(source),
                    })?;
            }
        }
        Ok(())
    }

    /// The BAR access at `offset` of `len` bytes that the PCI configuration access capability
    /// currently selects, if it is a valid one (BAR 0, 1/2/4 bytes, aligned, inside the BAR).
    fn pci_cfg_target(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap;
        let mut bar = [0u8; 1];
        self.config.read(cap + PCI_CFG_BAR, &mut bar);
        let offset = u64::from(self.config.read_u32(cap + PCI_CFG_OFFSET));
        let len = self.config.read_u32(cap + PCI_CFG_LENGTH) as usize;
        let ok = bar[0] == 0
            && matches!(len, 1 | 2 | 4)
            && offset.is_multiple_of(len as u64)
            && offset + len as u64 <= VIRTIO_PCI_BAR_SIZE;
        ok.then_some((offset, len))
    }

    /// Whether a configuration access at `offset` of `len` bytes is exactly on the PCI
    /// configuration access capability's data window start.
    fn is_pci_cfg_data(&self, offset: usize, len: usize) -> bool {
        offset == self.pci_cfg_cap + PCI_CFG_DATA && len <= 4
    }

    fn read_bar(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len() as u64;
        let Some(end) = offset.checked_add(len) else {
            return;
        };
        let within = |start: u64, size: u64| offset >= start && end <= start + size;
        if within(COMMON_OFFSET, COMMON_CONFIG_SIZE) {
            self.common.read(offset - COMMON_OFFSET, data);
        } else if offset == ISR_OFFSET && len >= 1 {
            data[0] = self.signals.take_isr();
        } else if within(DEVICE_CONFIG_OFFSET, DEVICE_CONFIG_SIZE) {
            self.device.read_config(offset - DEVICE_CONFIG_OFFSET, data);
        } else if within(MSIX_TABLE_OFFSET, MSIX_TABLE_AREA) {
            self.lock_msix()
                .read_table(offset - MSIX_TABLE_OFFSET, data);
        } else if within(MSIX_PBA_OFFSET, MSIX_PBA_AREA) {
            self.lock_msix().read_pba(offset - MSIX_PBA_OFFSET, data);
        }
        // Notifications, the rest of the ISR page and unused areas read as zero.
    }

    fn write_bar(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        let Some(end) = offset.checked_add(len) else {
            return;
        };
        let within = |start: u64, size: u64| offset >= start && end <= start + size;
        if within(COMMON_OFFSET, COMMON_CONFIG_SIZE) {
            let action = self.common.write(offset - COMMON_OFFSET, data);
            self.apply(action);
        } else if within(DEVICE_CONFIG_OFFSET, DEVICE_CONFIG_SIZE) {
            self.device
                .write_config(offset - DEVICE_CONFIG_OFFSET, data);
        } else if within(NOTIFY_OFFSET, NOTIFY_SIZE) {
            let rel = offset - NOTIFY_OFFSET;
            let queue = (rel / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
            if rel.is_multiple_of(u64::from(NOTIFY_OFF_MULTIPLIER)) {
                if let Some(kick) = self.kicks.get(queue) {
                    log::trace!(
                        "virtio {}: queue {queue} notified through an MMIO exit",
                        self.name
                    );
                    if let Err(e) = kick.write(1) {
                        log::warn!("virtio {}: cannot signal queue {queue}: {e}", self.name);
                    }
                }
            }
        } else if within(MSIX_TABLE_OFFSET, MSIX_TABLE_AREA) {
            let changed = self
                .lock_msix()
                .write_table(offset - MSIX_TABLE_OFFSET, data);
            if changed {
                self.device.interrupt_delivery_changed();
            }
        }
        // The ISR, the PBA and unused areas are read-only.
    }

    fn lock_msix(&self) -> std::sync::MutexGuard<'_, Msix> {
        self.msix.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl BusDevice for VirtioPciDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.read_bar(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.write_bar(offset, data);
    }
}

impl PciDevice for VirtioPciDevice {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        let offset = usize::from(offset);
        if self.is_pci_cfg_data(offset, data.len()) {
            if let Some((bar_offset, len)) = self.pci_cfg_target() {
                if len <= data.len() {
                    let mut bytes = [0u8; 4];
                    self.read_bar(bar_offset, &mut bytes[..len]);
                    data.fill(0);
                    data[..len].copy_from_slice(&bytes[..len]);
                    return;
                }
            }
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        let offset = usize::from(offset);
        if self.is_pci_cfg_data(offset, data.len()) {
            if let Some((bar_offset, len)) = self.pci_cfg_target() {
                if len <= data.len() {
                    self.write_bar(bar_offset, &data[..len]);
                }
            }
            return;
        }
        self.config.write(offset, data);
        // MSI-X message control is the upper half of the capability's first dword.
        let control = self.msix_cap + 2;
        if offset < control + 2 && offset + data.len() > control {
            let value = self.config.read_u16(control);
            let changed = self.lock_msix().set_control(value);
            if changed {
                self.device.interrupt_delivery_changed();
            }
        }
        self.follow_bar();
    }
}
