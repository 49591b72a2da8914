//! The virtio PCI common configuration structure (`virtio_pci_common_cfg`) and the state machine
//! behind it: device status, feature negotiation, queue set-up and reset.
//!
//! Reads build the structure as bytes and copy out what was asked, so any width and alignment
//! inside it is answered. Writes overlay the bytes and then apply every field they touched, in
//! offset order. Every guest value is checked: a queue size that is zero, above the maximum or
//! not a power of two, a misaligned ring or one outside guest RAM, and an MSI-X vector out of
//! range never reach a `Queue`; the first two mark the device `DEVICE_NEEDS_RESET`, a bad
//! vector reads back as `NO_VECTOR` (the spec's way of refusing it). What the transport must do
//! after a status write (activate or reset the device model) is returned as a `StatusAction`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::signals::{SignalsState, VirtioPciSignals};
use super::NO_VECTOR;
use crate::guest_memory::TrackedGuestMemory;
use crate::virtio::device::DeviceSignals;

/// One queue as the driver programmed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSetupState {
    /// Queue size (a power of two up to the device's maximum).
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available (driver) ring address.
    pub driver: u64,
    /// Used (device) ring address.
    pub device: u64,
    /// `queue_enable` was written.
    pub enabled: bool,
}

/// The common configuration's registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommonConfigState {
    /// `device_feature_select`.
    pub device_feature_select: u32,
    /// `driver_feature_select`.
    pub driver_feature_select: u32,
    /// The features the driver wrote (accepted ones once `FEATURES_OK` is set).
    pub driver_features: u64,
    /// Device status (without `DEVICE_NEEDS_RESET`, which the signals hold).
    pub status: u8,
    /// `queue_select`.
    pub queue_select: u16,
    /// Every queue, in index order.
    pub queues: Vec<QueueSetupState>,
}

/// Why a queue set-up, or a saved common configuration (untrusted), is refused.
#[derive(Debug, Error)]
pub enum CommonConfigError {
    /// `virtio-queue` refused the set-up (size, alignment, address overflow).
    #[error(
        "queue {index}: invalid set-up (desc {desc:#x}, driver {driver:#x}, device {device:#x}, size {size})"
    )]
    QueueSetUp {
        /// Queue index.
        index: u16,
        /// Descriptor table address.
        desc: u64,
        /// Driver (available) ring address.
        driver: u64,
        /// Device (used) ring address.
        device: u64,
        /// Queue size.
        size: u16,
        /// What `virtio-queue` refused.
        #[source]
        source: virtio_queue::Error,
    },
    /// The rings do not lie inside guest memory.
    #[error(
        "queue {index}: rings (desc {desc:#x}, driver {driver:#x}, device {device:#x}, size {size}) lie outside guest memory"
    )]
    RingsOutsideMemory {
        /// Queue index.
        index: u16,
        /// Descriptor table address.
        desc: u64,
        /// Driver (available) ring address.
        driver: u64,
        /// Device (used) ring address.
        device: u64,
        /// Queue size.
        size: u16,
    },
    /// The saved queue or vector count is not the device's.
    #[error("{queues} queues and {vectors} queue vectors, the device has {expected} queues")]
    QueueCount {
        /// Saved queues.
        queues: usize,
        /// Saved queue vectors.
        vectors: usize,
        /// The device's queues.
        expected: usize,
    },
    /// The saved status has bits no driver can set.
    #[error("device status {status:#04x} has unknown bits")]
    UnknownStatus {
        /// The saved status.
        status: u8,
    },
    /// The saved status skips feature negotiation.
    #[error("device status {status:#04x} has DRIVER_OK without FEATURES_OK")]
    DriverOkWithoutFeaturesOk {
        /// The saved status.
        status: u8,
    },
    /// The saved accepted features are not a valid choice from the offered ones.
    #[error(
        "accepted features {accepted:#x} are not a subset of the device's {offered:#x} with VERSION_1"
    )]
    Features {
        /// The saved accepted features.
        accepted: u64,
        /// The features the device offers.
        offered: u64,
    },
    /// A saved MSI-X vector is outside the table.
    #[error("MSI-X vector {vector} is beyond the device's {count} vectors")]
    Vector {
        /// The saved vector.
        vector: u16,
        /// The device's vector count.
        count: u16,
    },
    /// A saved queue size is not one the driver could have written.
    #[error("queue {index}: size {size} is not a power of two in 1..={max}")]
    QueueSize {
        /// Queue index.
        index: u16,
        /// The saved size.
        size: u16,
        /// The queue's maximum size.
        max: u16,
    },
}

/// Size of the common configuration structure (virtio 1.0 fields, through `queue_device`).
pub const COMMON_CONFIG_SIZE: u64 = 0x38;

const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC_LO: u64 = 0x20;
const QUEUE_DESC_HI: u64 = 0x24;
const QUEUE_DRIVER_LO: u64 = 0x28;
const QUEUE_DRIVER_HI: u64 = 0x2c;
const QUEUE_DEVICE_LO: u64 = 0x30;
const QUEUE_DEVICE_HI: u64 = 0x34;

/// The writable fields, `(offset, width)`, in offset order.
const WRITABLE_FIELDS: [(u64, usize); 15] = [
    (DEVICE_FEATURE_SELECT, 4),
    (DRIVER_FEATURE_SELECT, 4),
    (DRIVER_FEATURE, 4),
    (CONFIG_MSIX_VECTOR, 2),
    (DEVICE_STATUS, 1),
    (QUEUE_SELECT, 2),
    (QUEUE_SIZE, 2),
    (QUEUE_MSIX_VECTOR, 2),
    (QUEUE_ENABLE, 2),
    (QUEUE_DESC_LO, 4),
    (QUEUE_DESC_HI, 4),
    (QUEUE_DRIVER_LO, 4),
    (QUEUE_DRIVER_HI, 4),
    (QUEUE_DEVICE_LO, 4),
    (QUEUE_DEVICE_HI, 4),
];

const STATUS_DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
const STATUS_FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
const STATUS_NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;
const STATUS_FAILED: u8 = VIRTIO_CONFIG_S_FAILED as u8;
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;

/// What the transport must do after a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusAction {
    /// Nothing.
    None,
    /// The driver set `DRIVER_OK`: activate the device model.
    Activate,
    /// The driver wrote 0 to the status: reset the device model.
    Reset,
}

/// One queue as the driver programs it.
#[derive(Debug, Clone, Copy)]
struct QueueSetup {
    max_size: u16,
    size: u16,
    desc: u64,
    driver: u64,
    device: u64,
    enabled: bool,
}

impl QueueSetup {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            desc: 0,
            driver: 0,
            device: 0,
            enabled: false,
        }
    }
}

/// The common configuration state of one virtio PCI function.
#[derive(Debug)]
pub struct CommonConfig {
    device_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: Vec<QueueSetup>,
    vector_count: u16,
    mem: TrackedGuestMemory,
    signals: Arc<VirtioPciSignals>,
}

impl CommonConfig {
    /// State for a device offering `device_features` with queues of `queue_max_sizes` (each a
    /// power of two), `vector_count` MSI-X vectors, interrupts and shared status in `signals`.
    pub fn new(
        device_features: u64,
        queue_max_sizes: &[u16],
        vector_count: u16,
        mem: TrackedGuestMemory,
        signals: Arc<VirtioPciSignals>,
    ) -> Self {
        Self {
            device_features,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues: queue_max_sizes
                .iter()
                .map(|&m| QueueSetup::new(m))
                .collect(),
            vector_count,
            mem,
            signals,
        }
    }

    /// The device status as the driver reads it.
    pub fn status(&self) -> u8 {
        if self.signals.needs_reset() {
            self.status | STATUS_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.driver_features
    }

    /// Builds a `Queue` for every enabled queue, in index order, with the event-index feature
    /// as negotiated. `None` (and the device marked broken) if one no longer checks out.
    pub fn enabled_queues(&self) -> Option<Vec<(u16, Queue)>> {
        let event_idx = self.driver_features
            & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
            != 0;
        let mut out = Vec::new();
        for (index, q) in (0u16..).zip(&self.queues) {
            if !q.enabled {
                continue;
            }
            let mut queue = self.build_queue(index, q)?;
            queue.set_event_idx(event_idx);
            out.push((index, queue));
        }
        Some(out)
    }

    fn build_queue(&self, index: u16, q: &QueueSetup) -> Option<Queue> {
        match self.try_build_queue(index, q) {
            Ok(queue) => Some(queue),
            Err(e) => {
                self.broken(format_args!("{}", crate::error_chain(&e)));
                None
            }
        }
    }

    fn try_build_queue(&self, index: u16, q: &QueueSetup) -> Result<Queue, CommonConfigError> {
        let built = Queue::new(q.max_size).and_then(|mut queue| {
            queue.try_set_size(q.size)?;
            queue.try_set_desc_table_address(GuestAddress(q.desc))?;
            queue.try_set_avail_ring_address(GuestAddress(q.driver))?;
            queue.try_set_used_ring_address(GuestAddress(q.device))?;
            queue.set_ready(true);
            Ok(queue)
        });
        match built {
            Ok(queue) if queue.is_valid(&self.mem) => Ok(queue),
            Ok(_) => Err(CommonConfigError::RingsOutsideMemory {
                index,
                desc: q.desc,
                driver: q.driver,
                device: q.device,
                size: q.size,
            }),
            Err(source) => Err(CommonConfigError::QueueSetUp {
                index,
                desc: q.desc,
                driver: q.driver,
                device: q.device,
                size: q.size,
                source,
            }),
        }
    }

    fn broken(&self, what: std::fmt::Arguments<'_>) {
        crate::guest_warn!(
            self.signals.guest_warnings(),
            "bad queue set-up",
            "virtio-pci: {what}; device needs reset"
        );
        DeviceSignals::set_needs_reset(&*self.signals);
    }

    fn selected(&self) -> Option<&QueueSetup> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The structure's bytes as the driver sees them now.
    fn snapshot(&self) -> [u8; COMMON_CONFIG_SIZE as usize] {
        let mut b = [0u8; COMMON_CONFIG_SIZE as usize];
        let mut put = |offset: u64, bytes: &[u8]| {
            let at = offset as usize;
            b[at..at + bytes.len()].copy_from_slice(bytes);
        };
        let feature_word = |features: u64, select: u32| match select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        put(
            DEVICE_FEATURE_SELECT,
            &self.device_feature_select.to_le_bytes(),
        );
        put(
            DEVICE_FEATURE,
            &feature_word(self.device_features, self.device_feature_select).to_le_bytes(),
        );
        put(
            DRIVER_FEATURE_SELECT,
            &self.driver_feature_select.to_le_bytes(),
        );
        put(
            DRIVER_FEATURE,
            &feature_word(self.driver_features, self.driver_feature_select).to_le_bytes(),
        );
        put(
            CONFIG_MSIX_VECTOR,
            &self.signals.config_vector().to_le_bytes(),
        );
        // At most MAX_QUEUES, checked when the transport is built.
        put(NUM_QUEUES, &(self.queues.len() as u16).to_le_bytes());
        put(DEVICE_STATUS, &[self.status()]);
        put(CONFIG_GENERATION, &[self.signals.config_generation()]);
        put(QUEUE_SELECT, &self.queue_select.to_le_bytes());
        // NO_VECTOR for a queue that does not exist.
        put(
            QUEUE_MSIX_VECTOR,
            &self.signals.queue_vector(self.queue_select).to_le_bytes(),
        );
        if let Some(q) = self.selected() {
            put(QUEUE_SIZE, &q.size.to_le_bytes());
            put(QUEUE_ENABLE, &u16::from(q.enabled).to_le_bytes());
            // Each queue notifies at its own address: notify_off = queue index.
            put(QUEUE_NOTIFY_OFF, &self.queue_select.to_le_bytes());
            put(QUEUE_DESC_LO, &q.desc.to_le_bytes());
            put(QUEUE_DRIVER_LO, &q.driver.to_le_bytes());
            put(QUEUE_DEVICE_LO, &q.device.to_le_bytes());
        }
        b
    }

    /// Reads `data.len()` bytes at `offset`; bytes past the structure read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let snapshot = self.snapshot();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|at| snapshot.get(usize::try_from(at).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Writes `data` at `offset` and applies every writable field it touched.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> StatusAction {
        let Some(end) = offset.checked_add(data.len() as u64) else {
            return StatusAction::None;
        };
        let mut bytes = self.snapshot();
        for (i, value) in data.iter().enumerate() {
            if let Some(b) = usize::try_from(offset + i as u64)
                .ok()
                .and_then(|at| bytes.get_mut(at))
            {
                *b = *value;
            }
        }
        let mut action = StatusAction::None;
        for (field, width) in WRITABLE_FIELDS {
            if field >= end || field + width as u64 <= offset {
                continue;
            }
            let at = field as usize;
            let mut v = [0u8; 4];
            v[..width].copy_from_slice(&bytes[at..at + width]);
            let value = u32::from_le_bytes(v);
            let a = self.write_field(field, value);
            if a != StatusAction::None {
                action = a;
            }
        }
        action
    }

    fn write_field(&mut self, field: u64, value: u32) -> StatusAction {
        match field {
            DEVICE_FEATURE_SELECT => self.device_feature_select = value,
            DRIVER_FEATURE_SELECT => self.driver_feature_select = value,
            DRIVER_FEATURE => self.write_driver_features(value),
            CONFIG_MSIX_VECTOR => {
                let v = self.checked_vector(value as u16);
                self.signals.set_config_vector(v);
            }
            DEVICE_STATUS => return self.write_status(value as u8),
            QUEUE_SELECT => self.queue_select = value as u16,
            QUEUE_MSIX_VECTOR => {
                if self.selected().is_some() {
                    let v = self.checked_vector(value as u16);
                    self.signals.set_queue_vector(self.queue_select, v);
                }
            }
            _ => self.write_queue_field(field, value),
        }
        StatusAction::None
    }

    fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.vector_count {
            vector
        } else {
            NO_VECTOR
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK) != 0 {
            return; // Features are fixed once FEATURES_OK is set.
        }
        let value = u64::from(value);
        match self.driver_feature_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
            _ => {}
        }
    }

    /// Queue fields can change only while the queue is disabled and before `DRIVER_OK`.
    fn write_queue_field(&mut self, field: u64, value: u32) {
        let live = self.status & STATUS_DRIVER_OK != 0;
        let index = self.queue_select;
        let Some(q) = self.queues.get_mut(usize::from(index)) else {
            return;
        };
        if live || q.enabled {
            return;
        }
        let set_lo = |v: &mut u64| *v = (*v & !0xffff_ffff) | u64::from(value);
        let set_hi = |v: &mut u64| *v = (*v & 0xffff_ffff) | (u64::from(value) << 32);
        match field {
            QUEUE_SIZE => {
                let size = value as u16;
                if size == 0 || size > q.max_size || !size.is_power_of_two() {
                    let max = q.max_size;
                    self.broken(format_args!(
                        "queue {index}: size {size} is not a power of two in 1..={max}"
                    ));
                } else {
                    q.size = size;
                }
            }
            // Writing 0 is not allowed for the driver; it is ignored.
            QUEUE_ENABLE if value & 1 == 1 => {
                let setup = *q;
                if self.build_queue(index, &setup).is_some() {
                    if let Some(q) = self.queues.get_mut(usize::from(index)) {
                        q.enabled = true;
                    }
                }
            }
            QUEUE_DESC_LO => set_lo(&mut q.desc),
            QUEUE_DESC_HI => set_hi(&mut q.desc),
            QUEUE_DRIVER_LO => set_lo(&mut q.driver),
            QUEUE_DRIVER_HI => set_hi(&mut q.driver),
            QUEUE_DEVICE_LO => set_lo(&mut q.device),
            QUEUE_DEVICE_HI => set_hi(&mut q.device),
            _ => {}
        }
    }

    fn write_status(&mut self, value: u8) -> StatusAction {
        if value == 0 {
            self.reset();
            return StatusAction::Reset;
        }
        let old = self.status;
        if old & !value & !STATUS_NEEDS_RESET != 0 {
            crate::guest_warn!(
                self.signals.guest_warnings(),
                "status bits cleared",
                "virtio-pci: driver tried to clear status bits ({old:#04x} -> {value:#04x}); ignored"
            );
            return StatusAction::None;
        }
        let mut new = value & !STATUS_NEEDS_RESET;
        let added = new & !old;
        if added & STATUS_FEATURES_OK != 0 && !self.features_acceptable() {
            crate::guest_warn!(
                self.signals.guest_warnings(),
                "FEATURES_OK refused",
                "virtio-pci: driver features {:#x} are not a subset of {:#x} with VERSION_1; FEATURES_OK refused",
                self.driver_features, self.device_features
            );
            new &= !STATUS_FEATURES_OK;
        }
        let mut action = StatusAction::None;
        if added & STATUS_DRIVER_OK != 0 {
            if new & STATUS_FEATURES_OK == 0 || new & STATUS_FAILED != 0 {
                new &= !STATUS_DRIVER_OK;
            } else {
                action = StatusAction::Activate;
            }
        }
        self.status = new;
        action
    }

    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.device_features == 0 && self.driver_features & VERSION_1 != 0
    }

    /// The registers a snapshot keeps.
    pub fn save(&self) -> CommonConfigState {
        CommonConfigState {
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            status: self.status,
            queue_select: self.queue_select,
            queues: self
                .queues
                .iter()
                .map(|q| QueueSetupState {
                    size: q.size,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                    enabled: q.enabled,
                })
                .collect(),
        }
    }

    /// Takes back saved registers and signals (an untrusted snapshot): only a state this
    /// transport could have reached is accepted: the same queue count, sizes that are powers of
    /// two up to each maximum, enabled queues whose rings lie in guest memory, known status bits
    /// in a valid order, accepted features the device offers, vectors inside the MSI-X table.
    /// `Err` says which value is wrong; nothing is changed then.
    pub fn restore(
        &mut self,
        state: &CommonConfigState,
        signals: &SignalsState,
    ) -> Result<(), CommonConfigError> {
        if state.queues.len() != self.queues.len()
            || signals.queue_vectors.len() != self.queues.len()
        {
            return Err(CommonConfigError::QueueCount {
                queues: state.queues.len(),
                vectors: signals.queue_vectors.len(),
                expected: self.queues.len(),
            });
        }
        const KNOWN: u8 = 1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED;
        if state.status & !KNOWN != 0 {
            return Err(CommonConfigError::UnknownStatus {
                status: state.status,
            });
        }
        if state.status & STATUS_DRIVER_OK != 0 && state.status & STATUS_FEATURES_OK == 0 {
            return Err(CommonConfigError::DriverOkWithoutFeaturesOk {
                status: state.status,
            });
        }
        let accepted = state.driver_features & !self.device_features == 0
            && state.driver_features & VERSION_1 != 0;
        if state.status & STATUS_FEATURES_OK != 0 && !accepted {
            return Err(CommonConfigError::Features {
                accepted: state.driver_features,
                offered: self.device_features,
            });
        }
        let vector_ok = |v: u16| v == NO_VECTOR || v < self.vector_count;
        if let Some(v) = std::iter::once(&signals.config_vector)
            .chain(&signals.queue_vectors)
            .find(|&&v| !vector_ok(v))
        {
            return Err(CommonConfigError::Vector {
                vector: *v,
                count: self.vector_count,
            });
        }
        let mut queues = self.queues.clone();
        for (index, (q, saved)) in (0u16..).zip(queues.iter_mut().zip(&state.queues)) {
            if saved.size == 0 || saved.size > q.max_size || !saved.size.is_power_of_two() {
                return Err(CommonConfigError::QueueSize {
                    index,
                    size: saved.size,
                    max: q.max_size,
                });
            }
            q.size = saved.size;
            q.desc = saved.desc;
            q.driver = saved.driver;
            q.device = saved.device;
            q.enabled = saved.enabled;
            if q.enabled {
                self.try_build_queue(index, q)?;
            }
        }
        self.device_feature_select = state.device_feature_select;
        self.driver_feature_select = state.driver_feature_select;
        self.driver_features = state.driver_features;
        self.status = state.status;
        self.queue_select = state.queue_select;
        self.queues = queues;
        self.signals.restore(signals);
        Ok(())
    }

    /// Back to the state after power-on: status, features, selectors, queues and vectors.
    pub fn reset(&mut self) {
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueSetup::new(q.max_size);
        }
        self.signals.reset();
    }
}
