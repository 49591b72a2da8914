//! How a virtio device model signals its driver over the PCI transport: the state the transport
//! shares with the device's event-loop handlers (MSI-X vector per queue and for configuration
//! changes, ISR bits, the `DEVICE_NEEDS_RESET` flag, the configuration generation).
//!
//! Handlers call these from the event-loop thread while a vCPU thread may hold the transport's
//! lock, so nothing here takes that lock: plain atomics, plus the MSI-X state's own mutex (lock
//! order: transport, then MSI-X; never the reverse).

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::NO_VECTOR;
use crate::guest_warnings::GuestWarnings;
use crate::pci::msix::Msix;
use crate::virtio::device::DeviceSignals;

/// ISR status bit 0: a queue was used.
const ISR_QUEUE: u8 = 1 << 0;
/// ISR status bit 1: the configuration changed.
const ISR_CONFIG: u8 = 1 << 1;

/// What a snapshot keeps of the signals.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SignalsState {
    /// MSI-X vector for configuration changes.
    pub config_vector: u16,
    /// MSI-X vector of each queue.
    pub queue_vectors: Vec<u16>,
    /// ISR status bits not yet read by the driver.
    pub isr: u8,
    /// `DEVICE_NEEDS_RESET`.
    pub needs_reset: bool,
    /// The configuration generation counter.
    pub config_generation: u8,
}

/// The transport state device handlers may touch.
#[derive(Debug)]
pub struct VirtioPciSignals {
    msix: Arc<Mutex<Msix>>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    isr: AtomicU8,
    needs_reset: AtomicBool,
    config_generation: AtomicU8,
    /// Rate limit for the warnings the driver causes, for the transport and the device alike.
    warnings: GuestWarnings,
}

impl VirtioPciSignals {
    /// Signals for `queues` queues delivered through `msix`; every vector starts unassigned.
    /// `name` names the device in warning summaries.
    pub fn new(msix: Arc<Mutex<Msix>>, queues: usize, name: &str) -> Self {
        Self {
            warnings: GuestWarnings::new(format!("virtio {name}")),
            msix,
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            isr: AtomicU8::new(0),
            needs_reset: AtomicBool::new(false),
            config_generation: AtomicU8::new(0),
        }
    }

    /// The MSI-X vector for configuration changes.
    pub fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::Acquire)
    }

    /// Sets the configuration vector (already checked against the table size).
    pub fn set_config_vector(&self, vector: u16) {
        self.config_vector.store(vector, Ordering::Release);
    }

    /// The MSI-X vector of `queue` (`NO_VECTOR` for a queue that does not exist).
    pub fn queue_vector(&self, queue: u16) -> u16 {
        self.queue_vectors
            .get(usize::from(queue))
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    /// Sets `queue`'s vector (already checked against the table size).
    pub fn set_queue_vector(&self, queue: u16, vector: u16) {
        if let Some(v) = self.queue_vectors.get(usize::from(queue)) {
            v.store(vector, Ordering::Release);
        }
    }

    /// Whether the device is marked `DEVICE_NEEDS_RESET`.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// The configuration generation counter.
    pub fn config_generation(&self) -> u8 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// Reads and clears the ISR status (the driver's read of the ISR byte).
    pub fn take_isr(&self) -> u8 {
        self.isr.swap(0, Ordering::AcqRel)
    }

    /// Clears what a device reset clears: vectors, ISR, the needs-reset flag.
    pub fn reset(&self) {
        self.config_vector.store(NO_VECTOR, Ordering::Release);
        for v in &self.queue_vectors {
            v.store(NO_VECTOR, Ordering::Release);
        }
        self.isr.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }

    /// The state a snapshot keeps.
    pub fn save(&self) -> SignalsState {
        SignalsState {
            config_vector: self.config_vector(),
            queue_vectors: self
                .queue_vectors
                .iter()
                .map(|v| v.load(Ordering::Acquire))
                .collect(),
            isr: self.isr.load(Ordering::Acquire),
            needs_reset: self.needs_reset(),
            config_generation: self.config_generation(),
        }
    }

    /// Takes back a saved state whose vectors the transport checked (same queue count, each
    /// below the table size or `NO_VECTOR`).
    pub(super) fn restore(&self, state: &SignalsState) {
        self.set_config_vector(state.config_vector);
        for (v, saved) in self.queue_vectors.iter().zip(&state.queue_vectors) {
            v.store(*saved, Ordering::Release);
        }
        self.isr
            .store(state.isr & (ISR_QUEUE | ISR_CONFIG), Ordering::Release);
        self.needs_reset.store(state.needs_reset, Ordering::Release);
        self.config_generation
            .store(state.config_generation, Ordering::Release);
    }

    fn raise(&self, vector: u16) -> std::io::Result<()> {
        if vector == NO_VECTOR {
            return Ok(());
        }
        self.msix
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .trigger(vector)
    }
}

impl DeviceSignals for VirtioPciSignals {
    fn notify_queue(&self, queue: u16) -> std::io::Result<()> {
        self.isr.fetch_or(ISR_QUEUE, Ordering::AcqRel);
        self.raise(self.queue_vector(queue))
    }

    fn notify_config(&self) -> std::io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        self.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
        self.raise(self.config_vector())
    }

    fn queue_irqfd(&self, queue: u16) -> Option<vmm_sys_util::eventfd::EventFd> {
        let vector = self.queue_vector(queue);
        if vector == NO_VECTOR {
            return None;
        }
        self.msix
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .deliverable_irqfd(vector)
    }

    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::Release);
        if let Err(e) = self.notify_config() {
            log::warn!("virtio-pci: cannot signal the configuration change: {e}");
        }
    }

    fn guest_warnings(&self) -> Option<&GuestWarnings> {
        Some(&self.warnings)
    }
}
