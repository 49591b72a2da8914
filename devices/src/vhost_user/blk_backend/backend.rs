//! `BlkBackend`: the `VhostUserBackend` the daemon drives for one frontend connection. Its
//! features and configuration space are the in-process `VirtioBlk`'s (plus
//! `VHOST_USER_F_PROTOCOL_FEATURES`, and the dirty log: `LOG_SHMFD` and `VHOST_F_LOG_ALL`, the
//! log being each memory region's bitmap); a kicked queue is served by `queue::serve_queue` on the
//! daemon's worker thread.
//!
//! Everything the frontend sends (config offsets and sizes, memory tables, ring addresses) is
//! untrusted: the daemon and `vm-memory` check the memory and rings, this file bounds the
//! configuration accesses, and a request that cannot be served is answered or logged, never a
//! panic.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserVirtioFeatures;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::queue::serve_queue;
use super::BackendMemory;
use crate::virtio::blk::device::QUEUE_MAX_SIZE;
use crate::virtio::blk::disk::DiskImage;
use crate::virtio::blk::engine::{EngineError, IoEngine};
use crate::virtio::blk::VirtioBlk;
use crate::virtio::VirtioDevice;

/// Largest configuration read answered (the protocol's own limit is 256 bytes).
const MAX_CONFIG_READ: u32 = 256;

/// One connection's backend.
pub(super) struct BlkBackend {
    disk: Arc<DiskImage>,
    features: u64,
    config: Vec<u8>,
    queues: usize,
    engine: Mutex<IoEngine>,
    mem: RwLock<Option<BackendMemory>>,
    event_idx: AtomicBool,
}

impl std::fmt::Debug for BlkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkBackend")
            .field("features", &format_args!("{:#x}", self.features))
            .finish_non_exhaustive()
    }
}

impl BlkBackend {
    /// A backend serving `blk`'s disk with its features and configuration space.
    pub(super) fn new(blk: &VirtioBlk) -> Result<Self, EngineError> {
        let mut config = vec![0u8; crate::virtio::blk::device::CONFIG_SPACE_LEN];
        blk.read_config(0, &mut config);
        Ok(Self {
            disk: blk.disk().clone(),
            features: blk.device_features()
                | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
                | VhostUserVirtioFeatures::LOG_ALL.bits(),
            config,
            queues: blk.queue_max_sizes().len(),
            engine: Mutex::new(IoEngine::start(
                blk.engine_kind(),
                blk.disk().file().clone(),
            )?),
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
        })
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = VringRwLock<BackendMemory>;

    fn num_queues(&self) -> usize {
        self.queues
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_MAX_SIZE)
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one the daemon cannot stop its worker thread when the connection ends, and
        // dropping it (to serve the next frontend) would wait forever.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                log::error!("vhost-user-blk: cannot create the worker's exit event: {e}");
                None
            }
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let size = size.min(MAX_CONFIG_READ) as usize;
        let start = offset as usize;
        let mut out = vec![0u8; size];
        if let Some(src) = self.config.get(start..) {
            let n = src.len().min(size);
            out[..n].copy_from_slice(&src[..n]);
        }
        out
    }

    fn update_memory(&self, mem: BackendMemory) -> std::io::Result<()> {
        *self.mem.write().unwrap_or_else(PoisonError::into_inner) = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            log::warn!("vhost-user-blk: event for unknown queue {device_event}");
            return Ok(());
        };
        let mem = match &*self.mem.read().unwrap_or_else(PoisonError::into_inner) {
            Some(mem) => mem.memory(),
            None => {
                log::warn!("vhost-user-blk: queue {device_event} kicked before the memory table");
                return Ok(());
            }
        };
        let mut engine = self.engine.lock().unwrap_or_else(PoisonError::into_inner);
        let event_idx = self.event_idx.load(Ordering::Acquire);
        if let Err(e) = serve_queue(vring, &mem, &self.disk, &mut engine, event_idx) {
            // The ring itself is unusable; the frontend's driver has to reset the device.
            log::warn!("vhost-user-blk: queue {device_event}: {e}");
        }
        Ok(())
    }
}
