//! `VirtioVsock`: the transport-facing side of virtio-vsock. Owns the configuration space (the
//! guest CID), the feature set (VERSION_1 only: stream sockets), the connection table that
//! outlives an activation, and activation itself.
//!
//! The connection table survives a quiesce (a snapshot of a VM that then keeps running: its
//! connections carry on). A driver reset closes every connection. A device built for a
//! restored VM (`Persist::restore`, in `persist.rs`) has none of the old connections, so on activation it
//! sends `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, and the guest drops its sockets and re-reads its
//! CID, as Linux expects after a migration. The listener is created anew either way.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};

use thiserror::Error;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;

use super::host::{HostSide, HostSideError};
use super::muxer::{Muxer, VsockCounters};
use super::queue_handler::VsockQueueHandler;
use super::{DEVICE_TYPE_VSOCK, MAX_GUEST_CID, MIN_GUEST_CID, QUEUE_SIZE};
use crate::virtio::device::{
    ActivateContext, ActivateError, EventLoop, QueueProgress, VirtioDevice,
};
use crate::virtio::queue_ops::queue_slots;
use crate::virtio::subscription::ActiveHandler;

const NAME: &str = "vsock";

/// Errors creating a virtio-vsock device.
#[derive(Debug, Error)]
pub enum VsockError {
    /// A CID the guest may not have.
    #[error("vsock cid {0}: out of range (expected {MIN_GUEST_CID} to {MAX_GUEST_CID})")]
    Cid(u64),
    /// The host socket could not be set up.
    #[error(transparent)]
    Host(#[from] HostSideError),
}

/// A virtio-vsock device.
pub struct VirtioVsock {
    cid: u64,
    path: PathBuf,
    muxer: Arc<Mutex<Muxer>>,
    /// Send a transport reset on the next activation.
    reset_event_pending: bool,
    active: Option<(ActiveHandler<VsockQueueHandler>, EventLoop)>,
}

impl std::fmt::Debug for VirtioVsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioVsock")
            .field("cid", &self.cid)
            .field("path", &self.path)
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl VirtioVsock {
    /// A device for guest CID `cid` listening on `path` (a stale socket there is replaced).
    pub fn new(cid: u64, path: &Path) -> Result<Self, VsockError> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&cid) {
            return Err(VsockError::Cid(cid));
        }
        let host = HostSide::listen(path)?;
        Ok(Self {
            cid,
            path: path.to_path_buf(),
            muxer: Arc::new(Mutex::new(Muxer::new(cid, host))),
            reset_event_pending: false,
            active: None,
        })
    }

    /// For a restored VM: the driver hears a transport reset when the device is activated
    /// again (its connections did not survive).
    pub(super) fn announce_transport_reset(&mut self) {
        self.reset_event_pending = true;
    }

    /// The host port the next host-initiated connection gets.
    pub fn next_host_port(&self) -> u32 {
        self.muxer().next_host_port()
    }

    /// Continues host port numbering at `port` (see `Muxer::continue_host_ports`).
    pub(super) fn continue_host_ports(&mut self, port: u32) {
        self.muxer().continue_host_ports(port);
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The listening socket's path.
    pub fn socket(&self) -> &Path {
        &self.path
    }

    fn muxer(&self) -> std::sync::MutexGuard<'_, Muxer> {
        self.muxer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the device has done so far.
    pub fn counters(&self) -> VsockCounters {
        self.muxer().counters
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.muxer().connection_count()
    }
}

impl VirtioDevice for VirtioVsock {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_VSOCK
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn device_features(&self) -> u64 {
        1u64 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.cid.to_le_bytes();
        data.fill(0);
        let Some(src) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) else {
            return;
        };
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // guest_cid is read-only.
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
        let mut slots = queue_slots(NAME, queues, &self.queue_max_sizes())?.into_iter();
        let (Some(rx), Some(tx), Some(event)) = (slots.next(), slots.next(), slots.next()) else {
            return Err(ActivateError::BadQueues {
                device: NAME,
                reason: "expected receive, transmit and event queues".into(),
            });
        };
        let stopped = Arc::new(AtomicBool::new(false));
        let handler = VsockQueueHandler::new(
            mem,
            [rx, tx, event],
            self.muxer.clone(),
            signals,
            stopped.clone(),
            self.reset_event_pending,
        );
        let active = ActiveHandler::start(&event_loop, stopped, handler).map_err(|source| {
            ActivateError::Host {
                device: NAME,
                source,
            }
        })?;
        self.reset_event_pending = false;
        self.active = Some((active, event_loop));
        log::info!(
            "virtio-vsock: driver ready, guest CID {}, socket {}",
            self.cid,
            self.path.display()
        );
        Ok(())
    }

    fn reset(&mut self) {
        if let Some((active, event_loop)) = self.active.take() {
            // After this no handler run touches guest memory.
            active.stop();
            let mut muxer = self.muxer();
            muxer.clear();
            let closed = muxer.take_closed();
            // The loop unregisters the handler's fds when it removes it; close the streams
            // after that (messages run in order), so no fd number is reused while the loop
            // still has it on file for this handler.
            let _ = event_loop.fire(move |_| drop(closed));
        }
    }

    fn quiesce(&mut self) -> Option<Vec<QueueProgress>> {
        // Packets are handled within one handler run: nothing is in flight between runs. The
        // connections stay in the table for the activation that follows.
        let (active, _) = self.active.take()?;
        Some(active.stop_with(|h| h.progress()))
    }
}
