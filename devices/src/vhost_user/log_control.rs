//! Switching a vhost-user backend's dirty log on and off for a live snapshot, and taking the
//! pages it logged: `BackendDirtyLog` is the device's `DeviceDirtyLog`.
//!
//! On: a `LogBuffer` covering guest RAM, `SET_LOG_BASE` with it, then (if the driver's rings
//! run) `SET_FEATURES` with `VHOST_F_LOG_ALL` and each ring's `SET_VRING_ADDR` with the used
//! ring logged. Rings brought up meanwhile (activation, reconnect) are logged too, since the
//! session holds the buffer. Off: the same messages without the log. The buffer stays readable
//! after `stop` until the next `start`, so a last `take` still sees the final writes.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use thiserror::Error;

use super::connection::VhostUserError;
use super::dirty_log::LogBuffer;
use super::session::{ring_setup, Shared};
use crate::error_chain;
use crate::virtio::device::{DeviceDirtyLog, DirtyLogError};

/// Why a backend's dirty log could not be switched on.
#[derive(Debug, Error)]
pub enum LogStartError {
    /// The shared log buffer could not be created.
    #[error("cannot create the dirty log")]
    Buffer(#[source] std::io::Error),
    /// No backend is connected.
    #[error("the backend at {} is disconnected", .0.display())]
    Disconnected(PathBuf),
    /// The backend refused the log.
    #[error(transparent)]
    Backend(#[from] VhostUserError),
}

/// A vhost-user device's dirty log, driven by a live snapshot.
pub(super) struct BackendDirtyLog {
    shared: Arc<Shared>,
    /// The buffer of the last `start`, readable after `stop`.
    buffer: Mutex<Option<Arc<LogBuffer>>>,
}

impl BackendDirtyLog {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            buffer: Mutex::new(None),
        }
    }

    /// Creates the log buffer, hands it to the backend and logs the running rings.
    fn try_start(&self, ram_end: u64) -> Result<(), LogStartError> {
        let buffer = LogBuffer::new(ram_end)
            .map(Arc::new)
            .map_err(LogStartError::Buffer)?;
        {
            let mut session = self.shared.lock();
            let conn = session
                .conn
                .as_mut()
                .filter(|_| !self.shared.is_disconnected())
                .ok_or_else(|| LogStartError::Disconnected(self.shared.path.clone()))?;
            conn.set_log_base(&buffer)?;
            session.log = Some(buffer.clone());
        }
        *self.buffer.lock().unwrap_or_else(PoisonError::into_inner) = Some(buffer);
        Ok(self.switch_rings(true)?)
    }

    /// Sends the features and ring addresses of the driver's running rings, logged or not.
    fn switch_rings(&self, log: bool) -> Result<(), VhostUserError> {
        let mut guard = self.shared.lock();
        let session = &mut *guard;
        let (Some(conn), Some(active)) = (session.conn.as_mut(), session.active.as_ref()) else {
            return Ok(());
        };
        if !active.started || self.shared.is_disconnected() {
            return Ok(());
        }
        conn.set_features(active.acked_features, log)?;
        for ring in &active.rings {
            let setup = ring_setup(ring.index, &ring.queue, &active.mem)?;
            conn.set_ring_addr(&setup, log)?;
        }
        Ok(())
    }
}

impl DeviceDirtyLog for BackendDirtyLog {
    fn start(&self, ram_end: u64) -> Result<(), DirtyLogError> {
        self.try_start(ram_end).map_err(|e| DirtyLogError::Start {
            device: self.shared.name,
            source: Box::new(e),
        })
    }

    fn take(&self, page: &mut dyn FnMut(u64)) {
        let buffer = self
            .buffer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(buffer) = buffer {
            buffer.take(page);
        }
    }

    fn stop(&self) {
        if self.shared.lock().log.take().is_none() {
            return;
        }
        if let Err(e) = self.switch_rings(false) {
            log::warn!(
                "virtio {}: switching the dirty log off: {}",
                self.shared.name,
                error_chain(&e)
            );
        }
    }
}
