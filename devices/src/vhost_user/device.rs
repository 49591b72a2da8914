//! `VhostUserDevice`: a virtio device behind the PCI transport whose queues a backend process
//! serves over vhost-user. The transport still owns feature negotiation, queue set-up, status
//! and MSI-X; this device passes the outcome to the backend.
//!
//! - Construction (VM build): connect and handshake, read the configuration space
//!   (`GET_CONFIG`, cached) or synthesize the type's defaults (virtio-fs: `fs_config`), and
//!   send the memory table once so a backend that cannot map guest memory fails the start, not
//!   the guest's first I/O.
//! - `activate` (driver sets `DRIVER_OK`): `SET_FEATURES` with the driver's features, the memory
//!   table, then every enabled queue: ring addresses translated to this process's mapping, the
//!   queue's ioeventfd as kick fd (the guest's kick goes straight to the backend, no VMM hop),
//!   and a call eventfd forwarded to the queue's MSI-X vector by `CallForwarder`.
//! - `reset`: `GET_VRING_BASE` on each started queue (the backend stops using it), and the
//!   forwarder leaves the event loop.
//!
//! A backend that goes away marks the device `DEVICE_NEEDS_RESET`; later activations fail
//! until skiff is restarted (reconnecting is not implemented yet).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::call_forwarder::CallForwarder;
use super::config::{SharedMemoryRegion, VhostUserConfig, VhostUserKind, QUEUE_MAX_SIZE};
use super::connection::{Connection, RingSetup, VhostUserError};
use super::fs_config::{fs_config_space, FsConfigProblem};
use crate::virtio::device::{
    ActivateContext, ActivateError, ActivatedQueue, EventLoop, GuestMemoryMmap, VirtioDevice,
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

struct Active {
    subscription: LoopSubscription,
    stopped: Arc<AtomicBool>,
    queues: Vec<u16>,
}

/// A virtio device served by a vhost-user backend.
pub struct VhostUserDevice {
    kind: VhostUserKind,
    conn: Connection,
    regions: Vec<SharedMemoryRegion>,
    queues: u16,
    config: Vec<u8>,
    active: Option<Active>,
    /// Watches the backend's socket from the first activation on (`CallForwarder` with no
    /// queues); its flag stops it when the device is dropped.
    watcher: Option<(LoopSubscription, Arc<AtomicBool>)>,
    disconnected: Arc<AtomicBool>,
    /// Between a successful activation and the next reset.
    driver_active: Arc<AtomicBool>,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("kind", &self.kind)
            .field("conn", &self.conn)
            .field("active", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl VhostUserDevice {
    /// Connects to `cfg`'s backend and prepares it to serve guest memory `regions`.
    pub fn new(
        cfg: &VhostUserConfig,
        regions: Vec<SharedMemoryRegion>,
    ) -> Result<Self, VhostUserError> {
        let conn = Connection::open(cfg)?;
        Self::from_connection(cfg, conn, regions)
    }

    /// As `new`, on a connection whose handshake is done.
    pub(super) fn from_connection(
        cfg: &VhostUserConfig,
        mut conn: Connection,
        regions: Vec<SharedMemoryRegion>,
    ) -> Result<Self, VhostUserError> {
        let len = cfg.kind.config_len();
        let config = match (conn.read_config(len)?, cfg.kind) {
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
        Ok(Self {
            kind: cfg.kind,
            conn,
            regions,
            queues: cfg.queues,
            config,
            active: None,
            watcher: None,
            disconnected: Arc::new(AtomicBool::new(false)),
            driver_active: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The features the backend offered at start-up.
    pub fn backend_features(&self) -> u64 {
        self.conn.negotiated().features
    }

    /// Features the backend offers but its own configuration space contradicts, so the guest
    /// must not see them: virtio-blk `SIZE_MAX` with a `size_max` of 0 (qemu-storage-daemon
    /// does this; a driver taking it literally could not send any data).
    fn contradicted_features(&self) -> u64 {
        let mut bad = 0;
        if self.kind == VhostUserKind::Blk {
            let size_max = self.config.get(BLK_SIZE_MAX..BLK_SIZE_MAX + 4);
            if size_max.is_none_or(|b| b.iter().all(|&x| x == 0)) {
                bad |= 1 << VIRTIO_BLK_F_SIZE_MAX;
            }
        }
        bad
    }

    fn host_error(&self, e: VhostUserError) -> ActivateError {
        log::error!("virtio {}: {}", self.kind.name(), error_chain(&e));
        ActivateError::Host {
            device: self.kind.name(),
            source: io::Error::other(e),
        }
    }

    fn start(&mut self, ctx: ActivateContext) -> Result<(), VhostUserError> {
        self.conn.set_features(ctx.acked_features)?;
        self.conn.set_mem_table(&self.regions)?;
        let mut calls = Vec::with_capacity(ctx.queues.len());
        let mut started = Vec::with_capacity(ctx.queues.len());
        for queue in &ctx.queues {
            let ring = ring_setup(queue, &ctx.mem)?;
            let call = EventFd::new(EFD_NONBLOCK).map_err(|source| VhostUserError::Host {
                what: "a call eventfd",
                source,
            })?;
            self.conn.start_ring(&ring, &call, &queue.kick)?;
            started.push(queue.index);
            calls.push((queue.index, call));
        }
        if self.watcher.is_none() {
            let stopped = Arc::new(AtomicBool::new(false));
            let watcher = CallForwarder::new(
                self.kind.name(),
                Vec::new(),
                Some(self.conn.socket_fd()?),
                ctx.signals.clone(),
                self.disconnected.clone(),
                self.driver_active.clone(),
                stopped.clone(),
            );
            self.watcher = Some((subscribe(&ctx.event_loop, watcher)?, stopped));
        }
        let stopped = Arc::new(AtomicBool::new(false));
        let forwarder = CallForwarder::new(
            self.kind.name(),
            calls,
            None,
            ctx.signals,
            self.disconnected.clone(),
            self.driver_active.clone(),
            stopped.clone(),
        );
        let subscription = subscribe(&ctx.event_loop, forwarder)?;
        self.driver_active.store(true, Ordering::Release);
        self.active = Some(Active {
            subscription,
            stopped,
            queues: started,
        });
        Ok(())
    }
}

fn subscribe(
    event_loop: &EventLoop,
    forwarder: CallForwarder,
) -> Result<LoopSubscription, VhostUserError> {
    let subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>> = Arc::new(Mutex::new(forwarder));
    LoopSubscription::add(event_loop, subscriber).map_err(|source| VhostUserError::Host {
        what: "a call forwarder",
        source,
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        line.push_str(": ");
        line.push_str(&s.to_string());
        source = s.source();
    }
    line
}

/// The queue's rings as the backend needs them: each must lie in guest memory, and is given
/// as this process's address of its mapping.
fn ring_setup(queue: &ActivatedQueue, mem: &GuestMemoryMmap) -> Result<RingSetup, VhostUserError> {
    let q = &queue.queue;
    let size = u64::from(q.size());
    let host = |what: &'static str, address: u64, len: u64| {
        let outside = VhostUserError::RingOutsideMemory {
            queue: queue.index,
            what,
            address,
        };
        let len = usize::try_from(len).map_err(|_| outside)?;
        if !mem.check_range(GuestAddress(address), len) {
            return Err(VhostUserError::RingOutsideMemory {
                queue: queue.index,
                what,
                address,
            });
        }
        mem.get_host_address(GuestAddress(address))
            .map(|p| p as u64)
            .map_err(|_| VhostUserError::RingOutsideMemory {
                queue: queue.index,
                what,
                address,
            })
    };
    Ok(RingSetup {
        index: queue.index,
        size: q.size(),
        desc: host("descriptor table", q.desc_table(), 16 * size)?,
        avail: host("available ring", q.avail_ring(), 6 + 2 * size)?,
        used: host("used ring", q.used_ring(), 6 + 8 * size)?,
        base: q.next_avail(),
    })
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.kind.device_type()
    }

    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX_SIZE; usize::from(self.queues)]
    }

    fn device_features(&self) -> u64 {
        let offered = self.conn.negotiated().features & (TRANSPORT_FEATURES | DEVICE_FEATURES);
        offered & !self.contradicted_features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = self.config.get(start..) {
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
            Some(end) if end <= self.config.len() => {}
            _ => return, // Outside the configuration space: ignored.
        }
        if let Err(e) = self.conn.write_config(start, data) {
            log::warn!("virtio {}: {}", self.kind.name(), error_chain(&e));
            return;
        }
        // Bounds checked above.
        if let Some(dst) = self
            .config
            .get_mut(start as usize..start as usize + data.len())
        {
            dst.copy_from_slice(data);
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.reset();
        if self.disconnected.load(Ordering::Acquire) {
            return Err(ActivateError::Host {
                device: self.kind.name(),
                source: io::Error::new(
                    io::ErrorKind::NotConnected,
                    format!("the backend at {} is gone", self.conn.path().display()),
                ),
            });
        }
        if ctx.queues.is_empty() {
            return Err(ActivateError::BadQueues {
                device: self.kind.name(),
                reason: "no queue enabled".into(),
            });
        }
        self.start(ctx).map_err(|e| self.host_error(e))
    }

    fn reset(&mut self) {
        self.driver_active.store(false, Ordering::Release);
        let Some(active) = self.active.take() else {
            return;
        };
        active.stopped.store(true, Ordering::Release);
        active.subscription.remove();
        if self.disconnected.load(Ordering::Acquire) {
            return;
        }
        for queue in active.queues {
            if let Err(e) = self.conn.stop_ring(queue) {
                // A backend that went away is reported once, by the watcher.
                log::debug!("virtio {}: {}", self.kind.name(), error_chain(&e));
                self.disconnected.store(true, Ordering::Release);
                break;
            }
        }
    }

    fn identity(&self) -> Result<crate::virtio::DeviceIdentity, String> {
        // Refused rather than saved wrong: skiff does not see the rings' progress.
        Err(
            "the vhost-user backend holds the queue state (ring positions and requests in \
             flight), which skiff cannot save"
                .into(),
        )
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        if let Some(active) = self.active.take() {
            active.stopped.store(true, Ordering::Release);
        }
        if let Some((_, stopped)) = self.watcher.take() {
            stopped.store(true, Ordering::Release);
        }
    }
}
