//! `VirtioBlk`: the virtio-blk device as the PCI transport sees it: feature bits, the
//! configuration space, and activation and reset (which start and stop the queue handler, its
//! I/O engine and the disk's thread). Request handling is in `queue_handler` and `request`, file
//! I/O in `engine`.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use event_manager::MutEventSubscriber;
use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;

use super::disk::{DiskConfig, DiskError, DiskImage, IoEngineKind, SECTOR_SIZE};
use super::disk_thread::DiskThread;
use super::engine::{self, EngineError, IoEngine};
use super::queue_handler::BlkQueueHandler;
use super::request::{MAX_RANGES, MAX_RANGE_SECTORS};
use crate::virtio::device::{ActivateContext, ActivateError, QueueProgress, VirtioDevice};

/// virtio device type of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Largest queue the device offers.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// `seg_max`: data buffers per request, so that a request fits a ring without indirect
/// descriptors (header and status take two).
pub const SEG_MAX: u32 = QUEUE_MAX_SIZE as u32 - 2;
/// Sectors that discard and write-zeroes ranges are aligned to (`discard_sector_alignment`):
/// one 4 KiB file-system block.
pub const DISCARD_ALIGNMENT_SECTORS: u32 = 8;

/// Size of the configuration space (`struct virtio_blk_config` up to `write_zeroes_may_unmap`
/// and its padding).
pub const CONFIG_SPACE_LEN: usize = 60;

// Offsets in `struct virtio_blk_config`.
const CFG_CAPACITY: usize = 0;
const CFG_SEG_MAX: usize = 12;
const CFG_BLK_SIZE: usize = 20;
const CFG_NUM_QUEUES: usize = 34;
const CFG_MAX_DISCARD_SECTORS: usize = 36;
const CFG_MAX_DISCARD_SEG: usize = 40;
const CFG_DISCARD_ALIGNMENT: usize = 44;
const CFG_MAX_WRITE_ZEROES_SECTORS: usize = 48;
const CFG_MAX_WRITE_ZEROES_SEG: usize = 52;
const CFG_WRITE_ZEROES_MAY_UNMAP: usize = 56;

/// Why a virtio-blk device could not be created.
#[derive(Debug, Error)]
pub enum BlkError {
    /// The disk could not be opened (its message names the path).
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// `io=uring` was asked for and the host cannot provide it.
    #[error("disk {path}: cannot use io_uring")]
    Engine {
        /// The disk path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: EngineError,
    },
}

/// The handler the disk's thread runs while the device is active.
#[derive(Debug)]
struct Active {
    handler: Arc<Mutex<BlkQueueHandler>>,
    thread: DiskThread,
    stopped: Arc<AtomicBool>,
}

/// A virtio-blk device on a raw disk file or block device.
#[derive(Debug)]
pub struct VirtioBlk {
    disk: Arc<DiskImage>,
    /// `id=` as configured (for snapshots).
    id: Option<String>,
    /// `io=` as configured (for snapshots).
    configured_engine: IoEngineKind,
    /// The engine in use (never `Auto`).
    engine: IoEngineKind,
    num_queues: u16,
    features: u64,
    config: [u8; CONFIG_SPACE_LEN],
    active: Option<Active>,
}

fn bit(b: u32) -> u64 {
    1u64 << b
}

impl VirtioBlk {
    /// Opens and locks the disk and picks the I/O engine (io_uring when the host has it).
    pub fn new(cfg: &DiskConfig) -> Result<Self, BlkError> {
        let disk = DiskImage::open(cfg)?;
        let engine = match cfg.engine {
            IoEngineKind::Threads => IoEngineKind::Threads,
            IoEngineKind::IoUring => {
                engine::probe_uring().map_err(|source| BlkError::Engine {
                    path: cfg.path.clone(),
                    source,
                })?;
                IoEngineKind::IoUring
            }
            IoEngineKind::Auto => match engine::probe_uring() {
                Ok(()) => IoEngineKind::IoUring,
                Err(e) => {
                    log::info!("disk {}: {e}; using worker threads", cfg.path.display());
                    IoEngineKind::Threads
                }
            },
        };
        let mut features = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_MQ);
        if disk.readonly() {
            features |= bit(VIRTIO_BLK_F_RO);
        } else {
            features |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let config = config_space(disk.sectors(), cfg.queues, !disk.readonly());
        Ok(Self {
            disk: Arc::new(disk),
            id: cfg.id.clone(),
            configured_engine: cfg.engine,
            engine,
            num_queues: cfg.queues,
            features,
            config,
            active: None,
        })
    }

    /// The opened disk (shared with skiff's vhost-user-blk backend, which serves it with this
    /// device's features and configuration space).
    pub(crate) fn disk(&self) -> &Arc<DiskImage> {
        &self.disk
    }

    /// `id=` as configured.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// Request queues.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// `io=` as configured (`Auto` unless the user chose).
    pub fn configured_engine(&self) -> IoEngineKind {
        self.configured_engine
    }

    /// The I/O engine chosen in `new` (never `Auto`).
    pub(crate) fn engine_kind(&self) -> IoEngineKind {
        self.engine
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.sectors()
    }

    /// Whether the disk refuses writes.
    pub fn readonly(&self) -> bool {
        self.disk.readonly()
    }

    /// The I/O engine in use: "io_uring" or "threads".
    pub fn engine_name(&self) -> &'static str {
        match self.engine {
            IoEngineKind::Threads => "threads",
            IoEngineKind::IoUring | IoEngineKind::Auto => "io_uring",
        }
    }

    /// The disk thread's name: `disk-` and the disk's `id=` or file name, cut to the 15 bytes
    /// Linux keeps.
    fn thread_name(&self) -> String {
        let label = match &self.id {
            Some(id) => id.clone(),
            None => self
                .disk
                .path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let mut name = format!("disk-{label}");
        while name.len() > 15 {
            name.pop();
        }
        name
    }

    /// Whether the queue handler gave up (it raised `NEEDS_RESET`); `None` when not active.
    pub fn is_broken(&self) -> Option<bool> {
        let a = self.active.as_ref()?;
        Some(
            a.handler
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_broken(),
        )
    }
}

fn config_space(sectors: u64, queues: u16, discard: bool) -> [u8; CONFIG_SPACE_LEN] {
    fn put(c: &mut [u8], at: usize, v: &[u8]) {
        c[at..at + v.len()].copy_from_slice(v);
    }
    let mut c = [0u8; CONFIG_SPACE_LEN];
    put(&mut c, CFG_CAPACITY, &sectors.to_le_bytes());
    put(&mut c, CFG_SEG_MAX, &SEG_MAX.to_le_bytes());
    // Sector size fixed by the spec; `blk_size` tells the driver the logical block size.
    put(&mut c, CFG_BLK_SIZE, &(SECTOR_SIZE as u32).to_le_bytes());
    put(&mut c, CFG_NUM_QUEUES, &queues.to_le_bytes());
    if discard {
        let ranges = MAX_RANGES.to_le_bytes();
        let sectors = MAX_RANGE_SECTORS.to_le_bytes();
        put(&mut c, CFG_MAX_DISCARD_SECTORS, &sectors);
        put(&mut c, CFG_MAX_DISCARD_SEG, &ranges);
        put(
            &mut c,
            CFG_DISCARD_ALIGNMENT,
            &DISCARD_ALIGNMENT_SECTORS.to_le_bytes(),
        );
        put(&mut c, CFG_MAX_WRITE_ZEROES_SECTORS, &sectors);
        put(&mut c, CFG_MAX_WRITE_ZEROES_SEG, &ranges);
        // Write-zeroes with UNMAP punches holes.
        c[CFG_WRITE_ZEROES_MAY_UNMAP] = 1;
    }
    c
}

fn host_error(source: io::Error) -> ActivateError {
    ActivateError::Host {
        device: "blk",
        source,
    }
}

impl VirtioDevice for VirtioBlk {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn name(&self) -> &'static str {
        "blk"
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX_SIZE; usize::from(self.num_queues)]
    }

    fn device_features(&self) -> u64 {
        self.features
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

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field is read-only (VIRTIO_BLK_F_CONFIG_WCE is not offered).
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.reset();
        let bad = |reason: String| ActivateError::BadQueues {
            device: "blk",
            reason,
        };
        if ctx.queues.is_empty() {
            return Err(bad("no queue enabled".into()));
        }
        if let Some(q) = ctx.queues.iter().find(|q| q.index >= self.num_queues) {
            return Err(bad(format!(
                "queue {} enabled, the device has {}",
                q.index, self.num_queues
            )));
        }
        let mut queues = ctx.queues;
        let event_idx = ctx.acked_features & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        for q in &mut queues {
            q.queue.set_event_idx(event_idx);
        }
        let engine = IoEngine::start(self.engine, self.disk.file().clone())
            .map_err(|e| host_error(io::Error::other(e)))?;
        let stopped = Arc::new(AtomicBool::new(false));
        let handler = Arc::new(Mutex::new(BlkQueueHandler::new(
            ctx.mem,
            queues,
            self.disk.clone(),
            engine,
            ctx.signals,
            stopped.clone(),
        )));
        let subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>> = handler.clone();
        let thread = DiskThread::start(self.thread_name(), subscriber).map_err(host_error)?;
        self.active = Some(Active {
            handler,
            thread,
            stopped,
        });
        Ok(())
    }

    fn reset(&mut self) {
        let Some(active) = self.active.take() else {
            return;
        };
        active.stopped.store(true, Ordering::Release);
        // Waits for a handler run in progress, then for the engine's in-flight operations:
        // after this no guest memory is touched.
        active
            .handler
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stop();
        active.thread.stop();
    }

    fn quiesce(&mut self) -> Option<Vec<QueueProgress>> {
        let active = self.active.take()?;
        let progress = active
            .handler
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .quiesce();
        active.thread.stop();
        Some(progress)
    }
}

impl Drop for VirtioBlk {
    fn drop(&mut self) {
        self.reset();
    }
}
