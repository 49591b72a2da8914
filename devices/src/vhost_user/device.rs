//! `VhostUserDevice`: a virtio device behind the PCI transport whose queues a backend process
//! serves over vhost-user. The transport still owns feature negotiation, queue set-up, status
//! and MSI-X; this device passes the outcome to the backend.
//!
//! - Construction (VM build): connect and handshake, read the configuration space
//!   (`GET_CONFIG`, cached) or synthesize the type's defaults (virtio-fs: `fs_config`), send
//!   the memory table once so a backend that cannot map guest memory fails the start, not the
//!   guest's first I/O, and start watching the socket for a hang-up.
//! - `activate` (driver sets `DRIVER_OK`): `SET_FEATURES` with the driver's features, the memory
//!   table, then every enabled queue: ring addresses translated to this process's mapping, the
//!   queue's ioeventfd as kick fd (the guest's kick goes straight to the backend, no VMM hop),
//!   and as call fd the irqfd of the queue's MSI-X vector (the backend interrupts the guest
//!   without a VMM hop either) while that vector is deliverable, else an eventfd that
//!   `CallForwarder` forwards through the transport's MSI-X masking. `interrupt_delivery_changed`
//!   switches between the two when the guest masks or unmasks the vector.
//! - `reset`: `GET_VRING_BASE` on each started queue (the backend stops using it), and the
//!   forwarder leaves the event loop.
//! - Snapshots: `quiesce` stops every ring the same way and keeps where each restarts
//!   (`quiesce` module); the transport's resume, or a restore, activates the device again at
//!   those positions. The saved state (`persist.rs`) is the `--vhost-user` configuration, from
//!   which a restore connects again. The backend writes guest memory behind the VMM's dirty tracking
//!   (`untracked_writes`), so a diff counts every page with data; a live snapshot uses the
//!   backend's own dirty log (`dirty_log`, `log_control`) and is refused when the backend
//!   lacks `LOG_SHMFD` or `VHOST_F_LOG_ALL`.
//!
//! A backend that goes away marks the device `DEVICE_NEEDS_RESET` (later activations fail),
//! or, with `reconnect=`, wakes the reconnect thread (`reconnect`), which brings a new
//! connection to the driver's state; an activation while disconnected is kept and started by
//! that replay.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use event_manager::MutEventSubscriber;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::call_forwarder::CallForwarder;
use super::config::{SharedMemoryRegion, VhostUserConfig, VhostUserKind, QUEUE_MAX_SIZE};
use super::connection::{Connection, Negotiated, VhostUserError};
use super::fs_config::{fs_config_space, FsConfigProblem};
use super::log_control::BackendDirtyLog;
use super::quiesce::stop_rings;
use super::reconnect::{watch, Reconnector};
use super::session::{bring_up, retarget_calls, ActiveRings, Base, Handler, Ring, Session, Shared};
use crate::error_chain;
use crate::virtio::device::{
    ActivateContext, ActivateError, DeviceDirtyLog, DirtyLogError, EventLoop, QueueProgress,
    VirtioDevice,
};
use crate::virtio::subscription::LoopSubscription;

/// Device-independent feature bits the transport can carry to a backend: indirect descriptors,
/// event index, version 1. Not: packed rings, platform IOMMU, notification data, and the
/// vhost-user-only `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30), which is never the guest's.
const TRANSPORT_FEATURES: u64 =
    (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_F_VERSION_1);
/// Device-specific feature bits (0 to 23) pass through.
const DEVICE_FEATURES: u64 = (1 << 24) - 1;
/// virtio-blk: the `size_max` field is valid.
const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
/// Offset of `size_max` in the virtio-blk configuration space.
const BLK_SIZE_MAX: usize = 8;

/// A virtio device served by a vhost-user backend.
pub struct VhostUserDevice {
    kind: VhostUserKind,
    /// The configuration it was built from (its saved state in a snapshot).
    cfg: VhostUserConfig,
    shared: Arc<Shared>,
    /// With `reconnect=`: the thread that brings the backend back.
    reconnector: Option<Reconnector>,
    /// What the backend lacks to keep a dirty log, if anything.
    log_missing: Option<&'static str>,
    /// The backend's dirty log, for live snapshots.
    dirty_log: Arc<BackendDirtyLog>,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("kind", &self.kind)
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

impl VhostUserDevice {
    /// Connects to `cfg`'s backend and prepares it to serve guest memory `regions`; the
    /// backend's socket is watched on `event_loop`.
    pub fn new(
        cfg: &VhostUserConfig,
        regions: Vec<SharedMemoryRegion>,
        event_loop: EventLoop,
    ) -> Result<Self, VhostUserError> {
        let conn = Connection::open(cfg)?;
        Self::from_connection(cfg, conn, regions, event_loop)
    }

    /// The device's configuration (`--vhost-user`).
    pub fn config(&self) -> &VhostUserConfig {
        &self.cfg
    }

    /// As `new`, on a connection whose handshake is done.
    pub(super) fn from_connection(
        cfg: &VhostUserConfig,
        mut conn: Connection,
        regions: Vec<SharedMemoryRegion>,
        event_loop: EventLoop,
    ) -> Result<Self, VhostUserError> {
        let len = cfg.kind.config_len();
        let backend_config = conn.read_config(len)?;
        let config_from_backend = backend_config.is_some();
        let config = match (backend_config, cfg.kind) {
            (backend, VhostUserKind::Fs) => {
                fs_config_space(cfg, backend).map_err(|FsConfigProblem::NoTag| {
                    VhostUserError::FsTagMissing(cfg.socket.clone())
                })?
            }
            (Some(config), _) => config,
            // Other types without a backend configuration read as zeros.
            (None, _) => vec![0; len],
        };
        conn.set_mem_table(&regions)?;
        let offered = guest_features(cfg.kind, conn.negotiated(), &config);
        let log_missing = conn.dirty_log_missing();
        let socket = conn.socket_fd()?;
        let shared = Arc::new(Shared {
            name: cfg.kind.name(),
            path: cfg.socket.clone(),
            queues: cfg.queues,
            regions,
            offered,
            config_from_backend,
            config: Mutex::new(config),
            reconnect: cfg.reconnect,
            event_loop,
            disconnected: AtomicBool::new(false),
            driver_active: AtomicBool::new(false),
            signals: OnceLock::new(),
            session: Mutex::new(Session {
                conn: Some(conn),
                ..Session::default()
            }),
        });
        let reconnector = match cfg.reconnect {
            Some(every) => Some(Reconnector::start(shared.clone(), every).map_err(|source| {
                VhostUserError::Host {
                    what: "the reconnect thread",
                    source,
                }
            })?),
            None => None,
        };
        let watcher = watch(
            &shared,
            socket,
            0,
            reconnector.as_ref().map(Reconnector::waker),
        )?;
        shared.lock().watcher = Some(watcher);
        let dirty_log = Arc::new(BackendDirtyLog::new(shared.clone()));
        Ok(Self {
            kind: cfg.kind,
            cfg: cfg.clone(),
            shared,
            reconnector,
            log_missing,
            dirty_log,
        })
    }

    fn host_error(&self, e: VhostUserError) -> ActivateError {
        log::error!("virtio {}: {}", self.kind.name(), error_chain(&e));
        ActivateError::Host {
            device: self.kind.name(),
            source: io::Error::other(e),
        }
    }

    /// Call eventfds, the forwarder and what a replay needs, for `ctx`'s queues.
    fn prepare(&self, ctx: ActivateContext) -> Result<ActiveRings, VhostUserError> {
        let mut calls = Vec::with_capacity(ctx.queues.len());
        let mut rings = Vec::with_capacity(ctx.queues.len());
        let host = |what| move |source| VhostUserError::Host { what, source };
        for queue in ctx.queues {
            let call = EventFd::new(EFD_NONBLOCK).map_err(host("a call eventfd"))?;
            let ring = Ring {
                call: call.try_clone().map_err(host("a call eventfd"))?,
                direct: ctx.signals.queue_irqfd(queue.index),
                index: queue.index,
                queue: queue.queue,
                kick: queue.kick,
            };
            log::debug!(
                "virtio {}: queue {}: interrupts {}",
                self.kind.name(),
                ring.index,
                ring.interrupt_path()
            );
            rings.push(ring);
            calls.push((queue.index, call));
        }
        let stopped = Arc::new(AtomicBool::new(false));
        let forwarder = CallForwarder::new(self.kind.name(), calls, ctx.signals, stopped.clone());
        let subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>> = Arc::new(Mutex::new(forwarder));
        let subscription =
            LoopSubscription::add(&ctx.event_loop, subscriber).map_err(host("a call forwarder"))?;
        Ok(ActiveRings {
            forwarder: Handler {
                subscription,
                stopped,
            },
            acked_features: ctx.acked_features,
            mem: ctx.mem,
            rings,
            started: false,
            abandoned: false,
        })
    }

    fn gone(&self) -> ActivateError {
        ActivateError::Host {
            device: self.kind.name(),
            source: io::Error::new(
                io::ErrorKind::NotConnected,
                format!("the backend at {} is gone", self.shared.path.display()),
            ),
        }
    }
}

/// The features the guest is offered: the backend's, as far as the transport carries them,
/// less those its own configuration space contradicts: virtio-blk `SIZE_MAX` with a `size_max`
/// of 0 (qemu-storage-daemon does this; a driver taking it literally could not send any data).
fn guest_features(kind: VhostUserKind, negotiated: Negotiated, config: &[u8]) -> u64 {
    let mut bad = 0;
    if kind == VhostUserKind::Blk {
        let size_max = config.get(BLK_SIZE_MAX..BLK_SIZE_MAX + 4);
        if size_max.is_none_or(|b| b.iter().all(|&x| x == 0)) {
            bad |= 1 << VIRTIO_BLK_F_SIZE_MAX;
        }
    }
    negotiated.features & (TRANSPORT_FEATURES | DEVICE_FEATURES) & !bad
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.kind.device_type()
    }

    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX_SIZE; usize::from(self.shared.queues)]
    }

    fn device_features(&self) -> u64 {
        self.shared.offered
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = self.shared.config().get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Ok(start) = u32::try_from(offset) else {
            return;
        };
        let end = usize::try_from(offset)
            .ok()
            .and_then(|s| s.checked_add(data.len()));
        match end {
            Some(end) if end <= self.shared.config().len() => {}
            _ => return, // Outside the configuration space: ignored.
        }
        if !self.shared.config_from_backend {
            // Nothing in a configuration space skiff built is the driver's to change (the
            // virtio-fs tag and queue count are read-only): ignored, as a device would.
            return;
        }
        let mut session = self.shared.lock();
        match session.conn.as_mut() {
            Some(conn) if !self.shared.is_disconnected() => {
                if let Err(e) = conn.write_config(start, data) {
                    log::warn!("virtio {}: {}", self.kind.name(), error_chain(&e));
                    return;
                }
            }
            // The cached copy still changes; a new backend's configuration replaces it.
            _ => log::debug!(
                "virtio {}: configuration write while disconnected",
                self.kind.name()
            ),
        }
        // Bounds checked above.
        if let Some(dst) = self
            .shared
            .config()
            .get_mut(start as usize..start as usize + data.len())
        {
            dst.copy_from_slice(data);
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.reset();
        if ctx.queues.is_empty() {
            return Err(ActivateError::BadQueues {
                device: self.kind.name(),
                reason: "no queue enabled".into(),
            });
        }
        let shared = self.shared.clone();
        let _ = shared.signals.set(ctx.signals.clone());
        let reconnect = shared.reconnect.is_some();
        let mut guard = shared.lock();
        let session = &mut *guard;
        let live = !shared.is_disconnected() && session.conn.is_some();
        if !live && !reconnect {
            return Err(self.gone());
        }
        let mut active = self.prepare(ctx).map_err(|e| self.host_error(e))?;
        if let Some(conn) = session.conn.as_mut().filter(|_| live) {
            let logged = session.log.is_some();
            match bring_up(conn, &shared.regions, &active, Base::Driver, logged) {
                Ok(()) => active.started = true,
                // The backend died under us: the reconnect thread (woken by the watcher)
                // starts these rings when it is back.
                Err(e) if reconnect && conn.is_hung_up() => {
                    log::debug!("virtio {}: {}", self.kind.name(), error_chain(&e));
                }
                Err(e) => {
                    active.forwarder.stop();
                    return Err(self.host_error(e));
                }
            }
        }
        session.active = Some(active);
        shared.driver_active.store(true, Ordering::Release);
        Ok(())
    }

    fn reset(&mut self) {
        self.shared.driver_active.store(false, Ordering::Release);
        let mut session = self.shared.lock();
        let Some(active) = session.active.take() else {
            return;
        };
        active.forwarder.stop();
        if !active.started || self.shared.is_disconnected() {
            return;
        }
        let Some(conn) = session.conn.as_mut() else {
            return;
        };
        for ring in &active.rings {
            if let Err(e) = conn.stop_ring(ring.index) {
                // A backend that went away is reported once, by the hang-up watcher.
                log::debug!("virtio {}: {}", self.kind.name(), error_chain(&e));
                break;
            }
        }
    }

    fn interrupt_delivery_changed(&mut self) {
        let shared = self.shared.clone();
        let Some(signals) = shared.signals.get() else {
            return;
        };
        let mut guard = shared.lock();
        let session = &mut *guard;
        let Some(active) = session.active.as_mut() else {
            return;
        };
        let live = active.started && !shared.is_disconnected();
        let conn = session.conn.as_mut().filter(|_| live);
        if let Err(e) = retarget_calls(conn, active, signals.as_ref()) {
            // A backend that went away is reported once, by the hang-up watcher; the replay
            // after a reconnect sends the call eventfds the rings now name.
            log::debug!("virtio {}: {}", self.kind.name(), error_chain(&e));
        }
    }

    fn quiesce(&mut self) -> Option<Vec<QueueProgress>> {
        let shared = self.shared.clone();
        let mut session = shared.lock();
        let active = session.active.take()?;
        if active.abandoned {
            // Marked DEVICE_NEEDS_RESET already: it stays stopped until the driver resets it.
            active.forwarder.stop();
            return None;
        }
        let live = active.started && !shared.is_disconnected();
        let conn = session.conn.as_mut().filter(|_| live);
        let stopped = stop_rings(self.kind.name(), conn, &active);
        active.forwarder.stop();
        // A used-buffer notification the backend sent just before it stopped may have been
        // drained by the forwarder as it stopped: notify each queue once (a spurious
        // notification is harmless to a driver, a lost one is not).
        if let Some(signals) = shared.signals.get() {
            for ring in &active.rings {
                if let Err(e) = signals.notify_queue(ring.index) {
                    log::warn!(
                        "virtio {}: cannot notify queue {}: {e}",
                        self.kind.name(),
                        ring.index
                    );
                }
            }
        }
        match stopped {
            Ok(progress) => Some(progress),
            Err(e) => {
                log::error!(
                    "virtio {}: stopping the rings for a snapshot: {}; the device needs a reset",
                    self.kind.name(),
                    error_chain(&e)
                );
                drop(session);
                shared.fail_device();
                None
            }
        }
    }

    fn untracked_writes(&self) -> Option<String> {
        Some(match self.log_missing {
            Some(missing) => format!(
                "its vhost-user backend writes guest memory outside skiff's dirty log (no dirty \
                 log support: it lacks {missing})"
            ),
            None => "its vhost-user backend writes guest memory outside skiff's dirty log \
                     (its own dirty log is kept only during a live snapshot)"
                .into(),
        })
    }

    fn dirty_log(&self) -> Result<Arc<dyn DeviceDirtyLog>, DirtyLogError> {
        match self.log_missing {
            Some(missing) => Err(DirtyLogError::BackendLacks {
                backend: "vhost-user backend",
                missing,
            }),
            None => Ok(self.dirty_log.clone()),
        }
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        // Ends the reconnect thread (it may finish an attempt first).
        self.reconnector.take();
        let mut session = self.shared.lock();
        if let Some(active) = session.active.take() {
            active.forwarder.stop();
        }
        if let Some(watcher) = session.watcher.take() {
            watcher.stop();
        }
        session.conn = None;
    }
}
