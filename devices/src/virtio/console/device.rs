//! `VirtioConsole`: the transport-facing side of virtio-console. Owns the (all-zero, read-only)
//! configuration space, the feature set (VERSION_1 and indirect descriptors only: no size,
//! no multiport, no emergency write), the input handle and the output writer that survive
//! resets, and activation of the queue handler.

use std::io::{self, Write};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use thiserror::Error;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

use super::input::ConsoleInput;
use super::queue_handler::{ConsoleCounters, ConsoleQueueHandler, SharedOutput};
use super::QUEUE_SIZE;
use crate::virtio::device::{ActivateContext, ActivateError, QueueProgress, VirtioDevice};
use crate::virtio::queue_ops::rx_tx_slots;
use crate::virtio::subscription::ActiveHandler;

/// virtio device type of a console.
const DEVICE_TYPE_CONSOLE: u32 = 3;
const NAME: &str = "console";

/// Errors creating a virtio console.
#[derive(Debug, Error)]
pub enum ConsoleError {
    /// The input wake-up eventfd could not be created.
    #[error("virtio console: cannot create the input eventfd")]
    EventFd(#[source] io::Error),
}

/// A single-port virtio console.
pub struct VirtioConsole {
    input: ConsoleInput,
    output: SharedOutput,
    active: Option<ActiveHandler<ConsoleQueueHandler>>,
}

impl std::fmt::Debug for VirtioConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioConsole")
            .field("input_pending", &self.input.pending())
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl VirtioConsole {
    /// A console writing guest output to `output` (for example `std::io::stdout()`; it is
    /// flushed after each chain, and a write that blocks stalls the event loop).
    pub fn new(output: Box<dyn Write + Send>) -> Result<Self, ConsoleError> {
        Ok(Self {
            input: ConsoleInput::new().map_err(ConsoleError::EventFd)?,
            output: Arc::new(Mutex::new(output)),
            active: None,
        })
    }

    /// The handle that feeds host input to the guest.
    pub fn input(&self) -> ConsoleInput {
        self.input.clone()
    }

    /// Byte counters of the current activation (`None` while the driver has not started it).
    pub fn counters(&self) -> Option<ConsoleCounters> {
        let active = self.active.as_ref()?;
        Some(active.handler().counters())
    }
}

impl VirtioDevice for VirtioConsole {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_CONSOLE
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // `struct virtio_console_config` (cols, rows, max_nr_ports, emerg_wr): without
        // F_SIZE or F_MULTIPORT every field reads as zero, and so does anything past it.
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // emerg_wr is only writable with VIRTIO_CONSOLE_F_EMERG_WRITE, which is not offered.
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            self.reset();
        }
        let ActivateContext {
            mem,
            queues,
            signals,
            event_loop,
            ..
        } = ctx;
        let (rx, tx) = rx_tx_slots(NAME, queues, &self.queue_max_sizes())?;
        let stopped = Arc::new(AtomicBool::new(false));
        let handler = ConsoleQueueHandler::new(
            mem,
            rx,
            tx,
            self.input.clone(),
            self.output.clone(),
            signals,
            stopped.clone(),
        );
        let active = ActiveHandler::start(&event_loop, stopped, handler).map_err(|source| {
            ActivateError::Host {
                device: NAME,
                source,
            }
        })?;
        self.active = Some(active);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(active) = self.active.take() {
            // After this no handler run touches guest memory.
            active.stop();
        }
    }

    fn quiesce(&mut self) -> Option<Vec<QueueProgress>> {
        // Requests are handled within one handler run: nothing is in flight between runs.
        // Input not yet delivered stays in the input buffer for the next activation.
        Some(self.active.take()?.stop_with(|h| h.progress()))
    }
}
