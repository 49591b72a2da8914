//! A snapshot write running on its own thread, so the event loop keeps serving the control API
//! (status, a refused second snapshot, shutdown) while memory is copied. For a full or diff
//! snapshot the VM stays paused for the whole write: memory must hold still. A live snapshot
//! runs two jobs: the precopy passes while the guest runs (`live.rs`), then, after the short
//! pause, the write of the state, manifest and rename while the guest runs again.
//!
//! The thread signals an eventfd when it is done; the event loop then collects the report with
//! `finish`. Meanwhile the job's `SnapshotProgress` (in its meta, shared by a live snapshot's two
//! jobs) tells how much memory is written. Ending the VM mid-write cancels the job, which removes the temporary directory.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Instant;

use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

use super::live::{LiveError, PassStats, Precopy, PrecopyReport};
use super::progress::{ProgressReading, SnapshotProgress};
use super::writer::{write, PendingSnapshot, WriteError, WriteReport};

/// Why a snapshot job produced no snapshot.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Writing the snapshot failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// A live snapshot's passes failed.
    #[error(transparent)]
    Precopy(#[from] LiveError),
    /// The job's thread panicked.
    #[error("the snapshot thread panicked")]
    Panicked,
    /// The job was collected before.
    #[error("the snapshot was already collected")]
    AlreadyCollected,
    /// A live snapshot's passes ended and `finish` was asked for the written snapshot.
    #[error("the live snapshot ended before its final pass")]
    NoFinalPass,
}

/// What a job's thread produced.
#[derive(Debug)]
pub enum JobOutput {
    /// A complete snapshot directory.
    Written(WriteReport),
    /// A live snapshot's passes while the guest ran; the final pass and the write follow.
    Precopied(Box<(Precopy, PrecopyReport)>),
}

/// A job's result.
type JobResult = Result<JobOutput, JobError>;

/// A running snapshot write.
#[derive(Debug)]
pub struct SnapshotJob {
    handle: Option<JoinHandle<JobResult>>,
    cancel: Arc<AtomicBool>,
    /// Set by the thread just before it signals `done` (its handle may still be running then).
    ended: Arc<AtomicBool>,
    /// Timings and options from before the write started.
    pub meta: JobMeta,
}

/// What the caller measured and decided before the write started.
#[derive(Debug, Clone)]
pub struct JobMeta {
    /// When the request arrived.
    pub requested: Instant,
    /// Time to pause the vCPUs, in ms (0 when the VM was paused already).
    pub pause_ms: f64,
    /// Time to gather and encode the state, in ms.
    pub state_ms: f64,
    /// Whether the VM should end once the snapshot is complete.
    pub stop: bool,
    /// Whether the VM was running before (and should run again after).
    pub was_running: bool,
    /// State the host could not give.
    pub notes: Vec<String>,
    /// `full` or `diff`.
    pub kind: &'static str,
    /// A diff's parent directory.
    pub parent: Option<PathBuf>,
    /// How long the VM was held paused for this snapshot, in ms (0 if it was paused already).
    pub blackout_ms: f64,
    /// For a live snapshot: its passes and timings.
    pub live: Option<LiveSummary>,
    /// The snapshot directory.
    pub dir: PathBuf,
    /// For a live snapshot until its final pass: the manifest to write.
    pub manifest: Option<super::manifest::SnapshotManifest>,
    /// The memory written so far, counted by the job's thread.
    pub progress: Arc<SnapshotProgress>,
}

/// `GET /vm/snapshot/progress`.
#[derive(Debug, Clone, Serialize)]
pub struct ProgressStatus {
    /// Whether a snapshot is being written (the counters are absent otherwise).
    pub in_progress: bool,
    /// The counters.
    #[serde(flatten)]
    pub counters: Option<ProgressReading>,
    /// Since the request arrived, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub elapsed_ms: Option<f64>,
}

/// A live snapshot's passes, in the API response.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LiveSummary {
    /// Every pass made while the guest ran (the first copies all memory, or a diff's pages).
    pub passes: Vec<PassStats>,
    /// Time spent in those passes, in ms.
    pub precopy_ms: f64,
    /// The pass made while the VM was paused.
    pub final_pass: Option<PassStats>,
}

/// One region in the API response.
#[derive(Debug, Clone, Serialize)]
pub struct RegionSummary {
    /// Region start.
    pub guest_address: u64,
    /// Region size.
    pub size: u64,
    /// File in the snapshot directory.
    pub file: String,
    /// `sparse-copy`, `reflink` or `dirty-pages`.
    pub method: &'static str,
    /// Bytes of data copied.
    pub copied_bytes: u64,
}

/// The machine-readable summary of a completed snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotSummary {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Bytes written (copied memory, state, manifest).
    pub bytes_written: u64,
    /// From request to completion, in ms.
    pub time_ms: f64,
    /// Time to pause the vCPUs, in ms.
    pub pause_ms: f64,
    /// Time to gather the vCPU, VM and device state, in ms.
    pub state_ms: f64,
    /// Time to write and sync the files, in ms.
    pub write_ms: f64,
    /// Per region.
    pub regions: Vec<RegionSummary>,
    /// Whether the VM ends now (`stop`).
    pub stopped: bool,
    /// State left out because the host could not give it.
    pub notes: Vec<String>,
    /// `full` or `diff`.
    pub kind: &'static str,
    /// A diff's parent directory.
    pub parent: Option<PathBuf>,
    /// How long the VM was held paused for this snapshot, in ms: for a live snapshot the final
    /// pass and the state; otherwise the whole write (0 if the VM was paused already).
    pub blackout_ms: f64,
    /// A live snapshot's passes, or `null`.
    pub live: Option<LiveSummary>,
}

impl SnapshotJob {
    /// Starts writing `pending` on a new thread; `done` is written when the thread ends.
    pub fn start(pending: PendingSnapshot, done: EventFd, meta: JobMeta) -> io::Result<Self> {
        let progress = meta.progress.clone();
        Self::spawn(
            move |flag| {
                write(pending, flag, &progress)
                    .map(JobOutput::Written)
                    .map_err(JobError::from)
            },
            done,
            meta,
        )
    }

    /// Starts a live snapshot's passes on a new thread; `done` is written when they end.
    pub fn start_precopy(precopy: Precopy, done: EventFd, meta: JobMeta) -> io::Result<Self> {
        let temp = precopy.temp.clone();
        Self::spawn(
            move |flag| match super::live::precopy(&precopy, flag) {
                Ok(report) => Ok(JobOutput::Precopied(Box::new((precopy, report)))),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&temp);
                    Err(JobError::from(e))
                }
            },
            done,
            meta,
        )
    }

    fn spawn(
        work: impl FnOnce(&AtomicBool) -> JobResult + Send + 'static,
        done: EventFd,
        meta: JobMeta,
    ) -> io::Result<Self> {
        let cancel = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(AtomicBool::new(false));
        let (flag, end) = (cancel.clone(), ended.clone());
        let handle = thread::Builder::new()
            .name("skiff-snapshot".into())
            .spawn(move || {
                crate::sandbox::confine_thread_or_exit(crate::sandbox::ThreadKind::SnapshotWriter);
                let r = work(&flag);
                end.store(true, Ordering::Release);
                let _ = done.write(1);
                r
            })?;
        Ok(Self {
            handle: Some(handle),
            cancel,
            ended,
            meta,
        })
    }

    /// How far the write has got.
    pub fn progress(&self) -> ProgressStatus {
        ProgressStatus {
            in_progress: true,
            counters: Some(self.meta.progress.read()),
            elapsed_ms: Some(self.meta.requested.elapsed().as_secs_f64() * 1000.0),
        }
    }

    /// Whether the write has ended (successfully or not); `finish` then returns at once.
    pub fn is_finished(&self) -> bool {
        self.ended.load(Ordering::Acquire)
            || self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the thread and returns what it produced (and the job's meta), or its error.
    pub fn join(mut self) -> (JobMeta, JobResult) {
        let r = match self.handle.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(JobError::Panicked),
            None => Err(JobError::AlreadyCollected),
        };
        (self.meta.clone(), r)
    }

    /// Waits for the write and returns its summary or its error.
    pub fn finish(self) -> Result<SnapshotSummary, JobError> {
        let (meta, r) = self.join();
        match r? {
            JobOutput::Written(report) => Ok(summary(&meta, &report)),
            JobOutput::Precopied(p) => {
                let _ = std::fs::remove_dir_all(&p.0.temp);
                Err(JobError::NoFinalPass)
            }
        }
    }

    /// Cancels the write and waits for the thread (which removes the temporary directory).
    pub fn cancel(self) -> String {
        self.cancel.store(true, Ordering::Relaxed);
        match self.finish() {
            Ok(s) => format!(
                "the VM ended while the snapshot was written; it completed: {}",
                s.dir.display()
            ),
            Err(e) => format!(
                "the VM ended while the snapshot was written: {}",
                crate::error_chain(&e)
            ),
        }
    }
}

/// The API response for a written snapshot.
pub fn summary(m: &JobMeta, report: &WriteReport) -> SnapshotSummary {
    SnapshotSummary {
        dir: report.dir.clone(),
        bytes_written: report.bytes_written,
        time_ms: m.requested.elapsed().as_secs_f64() * 1000.0,
        pause_ms: m.pause_ms,
        state_ms: m.state_ms,
        write_ms: report.write_ms,
        regions: report
            .regions
            .iter()
            .map(|r| RegionSummary {
                guest_address: r.guest_address,
                size: r.size,
                file: r.file.clone(),
                method: r.method.name(),
                copied_bytes: r.copied_bytes,
            })
            .collect(),
        stopped: m.stop,
        notes: m.notes.clone(),
        kind: m.kind,
        parent: m.parent.clone(),
        blackout_ms: m.blackout_ms,
        live: m.live.clone(),
    }
}
