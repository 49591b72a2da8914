//! The `VirtioDevice` trait every device model implements, and what a device gets when the
//! driver activates it: guest memory, its queues with their kick eventfds, a way to signal the
//! driver, and the event loop to register its queue handlers with. Also the device's side of
//! snapshots that the transport drives: `quiesce`, which finishes what is in flight and hands
//! back each queue's position (`QueueProgress`). What the device itself is in a snapshot is
//! its `Persist` state, next to it.

use std::any::Any;
use std::sync::{Arc, Mutex};

use event_manager::{MutEventSubscriber, RemoteEndpoint};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::guest_memory::TrackedGuestMemory;

/// A handle to the VMM's event loop (`event-manager`), for registering queue handlers from any
/// thread. `call_blocking` runs a closure on the loop's thread.
pub type EventLoop = RemoteEndpoint<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// How a device talks back to the driver, through its transport.
pub trait DeviceSignals: Send + Sync + std::fmt::Debug {
    /// Raises the used-buffer notification for queue `queue` (its MSI-X vector).
    fn notify_queue(&self, queue: u16) -> std::io::Result<()>;
    /// Raises the configuration-change notification.
    fn notify_config(&self) -> std::io::Result<()>;
    /// Marks the device broken (virtio `DEVICE_NEEDS_RESET`) and notifies the driver. A device
    /// calls this when the guest handed it something it cannot process safely (a malformed
    /// descriptor chain, an address outside guest memory) and it stops using its queues.
    fn set_needs_reset(&self);
    /// The eventfd that raises `queue`'s interrupt in the hypervisor directly, while its MSI-X
    /// vector is deliverable; `None` when it is not (or the transport has no such thing), and
    /// interrupts then go through `notify_queue`. A device model in another process (vhost-user)
    /// is handed this one so its interrupts skip the VMM's event loop; the transport calls
    /// `VirtioDevice::interrupt_delivery_changed` when the answer may have changed.
    fn queue_irqfd(&self, _queue: u16) -> Option<vmm_sys_util::eventfd::EventFd> {
        None
    }
    /// The device's rate limit for warnings the guest causes (`guest_warn!`); `None` shows
    /// every warning.
    fn guest_warnings(&self) -> Option<&crate::guest_warnings::GuestWarnings> {
        None
    }
}

/// Where a queue stood when its device was quiesced: the next available-ring entry the device
/// takes and the next used-ring entry it writes (virtio-queue's `next_avail` and `next_used`).
/// Everything else about a queue (size, ring addresses) is the transport's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueProgress {
    /// Queue index.
    pub index: u16,
    /// Next available-ring entry.
    pub next_avail: u16,
    /// Next used-ring entry.
    pub next_used: u16,
}

impl QueueProgress {
    /// The position of `queue` now.
    pub fn of(queue: &ActivatedQueue) -> Self {
        use virtio_queue::QueueT;
        Self {
            index: queue.index,
            next_avail: queue.queue.next_avail(),
            next_used: queue.queue.next_used(),
        }
    }
}

/// One queue the driver enabled.
#[derive(Debug)]
pub struct ActivatedQueue {
    /// Queue index.
    pub index: u16,
    /// The queue, with the addresses and size the driver programmed.
    pub queue: virtio_queue::Queue,
    /// Written by KVM (ioeventfd) when the driver kicks this queue.
    pub kick: EventFd,
}

/// Everything a device gets on activation (the driver set `DRIVER_OK`).
pub struct ActivateContext {
    /// Guest memory.
    pub mem: TrackedGuestMemory,
    /// The features the driver accepted (a subset of `device_features`).
    pub acked_features: u64,
    /// The enabled queues, in index order.
    pub queues: Vec<ActivatedQueue>,
    /// Notifications and failure reporting.
    pub signals: Arc<dyn DeviceSignals>,
    /// The event loop to register queue handlers with.
    pub event_loop: EventLoop,
}

impl std::fmt::Debug for ActivateContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivateContext")
            .field("acked_features", &self.acked_features)
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

/// Why a device could not be activated.
#[derive(Debug, Error)]
pub enum ActivateError {
    /// The driver enabled a queue set the device cannot work with.
    #[error("virtio {device}: {reason}")]
    BadQueues {
        /// Device name.
        device: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A host resource failed (eventfd, thread, file).
    #[error("virtio {device}: cannot activate")]
    Host {
        /// Device name.
        device: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A virtio device model behind the PCI transport. What a snapshot keeps of the device itself
/// is its `crate::persist::Persist` implementation, next to it (`persist.rs`); the VMM finds
/// it through `as_any`.
pub trait VirtioDevice: Send + AsAny {
    /// virtio device type (1 = net, 2 = blk, 3 = console, 4 = rng, ...).
    fn device_type(&self) -> u32;
    /// A short name for messages ("blk", "net", ...).
    fn name(&self) -> &'static str;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features the device offers (must include `VIRTIO_F_VERSION_1`, bit 32).
    fn device_features(&self) -> u64;
    /// Reads the device-specific configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space at `offset` (ignore read-only fields).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts processing the queues. Called once per driver initialisation.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops processing (the driver reset the device) and drops the queues, so a later
    /// `activate` starts afresh. Must deregister the device's event-loop handlers.
    fn reset(&mut self);
    /// For a snapshot of the paused VM: finishes every request in flight (used entries
    /// written, the driver notified as it asked), stops and deregisters the handlers like
    /// `reset` but returning nothing unfinished, and gives each queue's position. `None` when
    /// the device is not active. A later `activate` with queues at these positions continues.
    fn quiesce(&mut self) -> Option<Vec<QueueProgress>> {
        None
    }
    /// Why this device writes guest memory in a way the VMM's dirty tracking does not see
    /// (another process writes it), if it does: such writes cannot be in a live snapshot's
    /// passes or a diff's dirty pages.
    fn untracked_writes(&self) -> Option<String> {
        None
    }
    /// For a device with `untracked_writes`: its own log of the guest pages it writes, if it
    /// can keep one (a live snapshot then follows its writes); `Err` says why it cannot.
    fn dirty_log(&self) -> Result<Arc<dyn DeviceDirtyLog>, DirtyLogError> {
        Err(DirtyLogError::NotKept)
    }
    /// The guest masked, unmasked, enabled or disabled MSI-X vectors: a device that handed
    /// `DeviceSignals::queue_irqfd` eventfds to another process asks again. Called on a vCPU
    /// thread with the transport's lock held.
    fn interrupt_delivery_changed(&mut self) {}
}

/// The device as `Any`, so that the VMM can reach its concrete type (its `Persist`
/// implementation) behind `dyn VirtioDevice`. Every `'static` type has it.
pub trait AsAny {
    /// `self` as `Any`.
    fn as_any(&self) -> &dyn Any;
}

impl<T: Any> AsAny for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Why a device has no dirty log of its own, or why its log could not be started.
#[derive(Debug, Error)]
pub enum DirtyLogError {
    /// The device keeps no log of the pages it writes.
    #[error("it keeps no dirty log")]
    NotKept,
    /// The device's backend lacks a feature a log needs.
    #[error("its {backend} keeps no dirty log (it lacks {missing})")]
    BackendLacks {
        /// What the backend is.
        backend: &'static str,
        /// The missing feature(s).
        missing: &'static str,
    },
    /// Starting the log failed.
    #[error("virtio {device}")]
    Start {
        /// The device's name.
        device: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A device's own record of the guest pages it writes (a vhost-user backend's dirty log),
/// driven by a live snapshot from its own thread.
pub trait DeviceDirtyLog: Send + Sync {
    /// Starts logging every page the device writes in guest memory `[0, ram_end)`.
    fn start(&self, ram_end: u64) -> Result<(), DirtyLogError>;
    /// Calls `page` with the guest-physical address of each page logged since the last call
    /// (all below `ram_end`), and clears them.
    fn take(&self, page: &mut dyn FnMut(u64));
    /// Stops logging (also after a failed `start`); what was logged can still be taken.
    fn stop(&self);
}
