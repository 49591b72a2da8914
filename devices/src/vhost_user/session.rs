//! What a vhost-user device shares with its hang-up watcher and its reconnect thread: the live
//! connection (if any) and what the driver set up, so that a new connection can be brought to
//! the state the guest expects.
//!
//! - `Shared`: immutable facts (name, socket, queues, the guest memory regions, the features
//!   offered to the guest), lock-free flags the event loop reads and writes, and the `Session`
//!   behind a mutex.
//! - `Session`: the connection, its generation (bumped per connection, so a stale hang-up report
//!   is ignored), the watcher of its socket, and the driver's active rings.
//! - `bring_up`: sends a connection the driver's features, the memory table and every ring; on
//!   a replay each ring's base is the used index the guest's memory shows, and each kick eventfd
//!   is written once afterwards so a request made while disconnected is looked at; it returns
//!   only once the backend has applied every request (a barrier when there is no `REPLY_ACK`).
//!
//! Lock order: a vCPU holds the transport's lock, then `Shared::session`, then
//! `Shared::config`; the reconnect thread takes `Shared::session`, then `Shared::config`. The
//! event loop never takes them (the watcher uses the flags).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::config::SharedMemoryRegion;
use super::connection::{Connection, RingSetup, VhostUserError};
use super::dirty_log::LogBuffer;
use crate::guest_memory::TrackedGuestMemory;
use crate::virtio::device::{DeviceSignals, EventLoop};
use crate::virtio::subscription::LoopSubscription;

/// The state a device, its watcher and its reconnect thread share.
pub(super) struct Shared {
    /// Device name for messages.
    pub name: &'static str,
    /// The backend's socket.
    pub path: PathBuf,
    /// Queues the device has (`queues=`).
    pub queues: u16,
    /// Guest memory as the backend maps it.
    pub regions: Vec<SharedMemoryRegion>,
    /// The virtio features offered to the guest; a new backend must offer them all.
    pub offered: u64,
    /// The configuration space came from the backend (`GET_CONFIG`): a new backend's is read
    /// again, and the driver's writes go to the backend.
    pub config_from_backend: bool,
    /// The device's configuration space as the driver reads it (the backend's, cached, or the
    /// one skiff built). A lock of its own, so a vCPU reading it never waits for a backend
    /// (`session` is held across requests); taken after `session` where both are.
    pub config: Mutex<Vec<u8>>,
    /// `reconnect=`: retry this often after a loss (none: the device fails instead).
    pub reconnect: Option<Duration>,
    /// The event loop (for the call forwarder and the hang-up watcher).
    pub event_loop: EventLoop,
    /// Set when the backend is gone, cleared by a successful reconnect.
    pub disconnected: AtomicBool,
    /// Between a successful (or pending) activation and the next reset.
    pub driver_active: AtomicBool,
    /// The transport's signals, known from the first activation on.
    pub signals: OnceLock<Arc<dyn DeviceSignals>>,
    /// The mutable part.
    pub session: Mutex<Session>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("disconnected", &self.disconnected)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The session, locked.
    pub fn lock(&self) -> MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the backend is gone.
    pub fn is_disconnected(&self) -> bool {
        self.disconnected.load(Ordering::Acquire)
    }

    /// The configuration space, locked.
    pub fn config(&self) -> MutexGuard<'_, Vec<u8>> {
        self.config.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Raises the configuration-change interrupt if the driver is using the device.
    pub fn notify_config_change(&self) {
        if self.driver_active.load(Ordering::Acquire) {
            if let Some(signals) = self.signals.get() {
                if let Err(e) = signals.notify_config() {
                    log::warn!(
                        "virtio {}: cannot signal the configuration change: {e}",
                        self.name
                    );
                }
            }
        }
    }

    /// Marks the device `DEVICE_NEEDS_RESET` if the driver is using it.
    pub fn fail_device(&self) {
        if self.driver_active.load(Ordering::Acquire) {
            if let Some(signals) = self.signals.get() {
                signals.set_needs_reset();
            }
        }
    }
}

/// A registered event-loop handler and the flag that stops it.
#[derive(Debug)]
pub(super) struct Handler {
    pub subscription: LoopSubscription,
    pub stopped: Arc<AtomicBool>,
}

impl Handler {
    /// Stops the handler and detaches it from the loop.
    pub fn stop(self) {
        self.stopped.store(true, Ordering::Release);
        self.subscription.remove();
    }
}

/// One queue the driver enabled, with what a new connection needs to serve it again.
#[derive(Debug)]
pub(super) struct Ring {
    /// The queue as the driver programmed it (addresses, size).
    pub queue: Queue,
    /// Queue index.
    pub index: u16,
    /// The eventfd the backend writes when it used buffers (a duplicate of the forwarder's).
    pub call: EventFd,
    /// The irqfd of the queue's MSI-X vector while that vector is deliverable: the backend is
    /// given this one instead of `call`, so its interrupts reach the guest without a trip
    /// through skiff's event loop. `None` while the vector is masked (or MSI-X is off): the
    /// backend then writes `call`, and the forwarder keeps what the mask holds back pending.
    pub direct: Option<EventFd>,
    /// The queue's KVM ioeventfd (the guest's kicks).
    pub kick: EventFd,
}

impl Ring {
    /// The eventfd the backend is to write: the vector's irqfd when deliverable, else `call`.
    pub fn call_target(&self) -> &EventFd {
        self.direct.as_ref().unwrap_or(&self.call)
    }

    /// Where the backend's interrupts go, for messages.
    pub fn interrupt_path(&self) -> &'static str {
        match self.direct {
            Some(_) => "straight to the MSI-X vector's irqfd",
            None => "through skiff's call forwarder",
        }
    }
}

/// What the driver set up, from activation to reset.
#[derive(Debug)]
pub(super) struct ActiveRings {
    /// The call forwarder.
    pub forwarder: Handler,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Guest memory (to translate ring addresses and read used indexes).
    pub mem: TrackedGuestMemory,
    /// The enabled queues.
    pub rings: Vec<Ring>,
    /// The backend serves these rings (false while disconnected, until a replay).
    pub started: bool,
    /// The device was marked `DEVICE_NEEDS_RESET` while disconnected: a reconnect does not
    /// bring these rings back (the driver must reset the device first).
    pub abandoned: bool,
}

/// The mutable part of `Shared`.
#[derive(Debug, Default)]
pub(super) struct Session {
    /// The connection; `None` once a lost one is dropped, until a reconnect.
    pub conn: Option<Connection>,
    /// Bumped for every connection.
    pub generation: u64,
    /// Watches `conn`'s socket for a hang-up.
    pub watcher: Option<Handler>,
    /// The driver's rings, while it uses the device.
    pub active: Option<ActiveRings>,
    /// The dirty log, while a live snapshot has it on (the backend was sent `SET_LOG_BASE`;
    /// rings brought up meanwhile are logged).
    pub log: Option<Arc<LogBuffer>>,
}

/// Where a ring starts when it is brought up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Base {
    /// The queue's own `next_avail` (a fresh activation).
    Driver,
    /// The used index in guest memory (a replay after a reconnect: requests the backend had
    /// not completed are offered again).
    GuestUsedIndex,
}

/// Sends `conn` the driver's features, the memory table and every ring of `active`; with
/// `log`, the features include `VHOST_F_LOG_ALL` and the rings are logged (the log base was
/// sent already).
pub(super) fn bring_up(
    conn: &mut Connection,
    regions: &[SharedMemoryRegion],
    active: &ActiveRings,
    base: Base,
    log: bool,
) -> Result<(), VhostUserError> {
    conn.set_features(active.acked_features, log)?;
    conn.set_mem_table(regions)?;
    for ring in &active.rings {
        let mut setup = ring_setup(ring.index, &ring.queue, &active.mem)?;
        if base == Base::GuestUsedIndex {
            setup.base = guest_used_index(ring.index, &ring.queue, &active.mem)?;
        }
        conn.start_ring(&setup, ring.call_target(), &ring.kick, log)?;
    }
    // The guest may kick as soon as this returns: the backend must have enabled every ring.
    conn.wait_until_applied()
}

/// Follows the guest's MSI-X masking: each ring whose vector became deliverable gets its irqfd
/// as the backend's call eventfd, each whose vector stopped being so gets the forwarder's
/// eventfd back (`SET_VRING_CALL`, then a barrier, so the backend writes the new one once this
/// returns). Without a connection (`conn` is `None`) only the rings are updated; a replay sends
/// them. An interrupt the backend raised through the forwarder just before an unmask is
/// delivered by the forwarder, and one raised through the irqfd just before a mask arrives like
/// an interrupt raised just before the mask: nothing is lost.
pub(super) fn retarget_calls(
    mut conn: Option<&mut Connection>,
    active: &mut ActiveRings,
    signals: &dyn DeviceSignals,
) -> Result<(), VhostUserError> {
    let mut sent = false;
    for ring in &mut active.rings {
        let direct = signals.queue_irqfd(ring.index);
        if direct.is_some() == ring.direct.is_some() {
            continue;
        }
        ring.direct = direct;
        log::debug!(
            "vhost-user queue {}: interrupts {}",
            ring.index,
            ring.interrupt_path()
        );
        if let Some(conn) = conn.as_deref_mut() {
            conn.set_vring_call(ring.index, ring.call_target())?;
            sent = true;
        }
    }
    match conn {
        Some(conn) if sent => conn.wait_until_applied(),
        _ => Ok(()),
    }
}

/// Writes every ring's kick eventfd once, so the backend looks at its available ring even if
/// the guest's last kick went to the backend that died.
pub(super) fn kick_all(name: &str, active: &ActiveRings) {
    for ring in &active.rings {
        if let Err(e) = ring.kick.write(1) {
            log::warn!("virtio {name}: cannot kick queue {}: {e}", ring.index);
        }
    }
}

/// The used ring's index as the guest's memory holds it.
pub(super) fn guest_used_index(
    index: u16,
    queue: &Queue,
    mem: &TrackedGuestMemory,
) -> Result<u16, VhostUserError> {
    queue
        .used_idx(mem, Ordering::Acquire)
        .map(|i| i.0)
        .map_err(|_| VhostUserError::RingOutsideMemory {
            queue: index,
            what: "used ring",
            address: queue.used_ring(),
        })
}

/// The queue's rings as the backend needs them: each must lie in guest memory, and is given
/// as this process's address of its mapping.
pub(super) fn ring_setup(
    index: u16,
    q: &Queue,
    mem: &TrackedGuestMemory,
) -> Result<RingSetup, VhostUserError> {
    let size = u64::from(q.size());
    let host = |what: &'static str, address: u64, len: u64| {
        let outside = || VhostUserError::RingOutsideMemory {
            queue: index,
            what,
            address,
        };
        let len = usize::try_from(len).map_err(|_| outside())?;
        if !mem.check_range(GuestAddress(address), len) {
            return Err(outside());
        }
        mem.get_host_address(GuestAddress(address))
            .map(|p| p as u64)
            .map_err(|_| outside())
    };
    Ok(RingSetup {
        index,
        size: q.size(),
        desc: host("descriptor table", q.desc_table(), 16 * size)?,
        avail: host("available ring", q.avail_ring(), 6 + 2 * size)?,
        used: host("used ring", q.used_ring(), 6 + 8 * size)?,
        used_guest: q.used_ring(),
        base: q.next_avail(),
    })
}
