//! Taking snapshots of a `RunningVm`: full and diff snapshots of a paused VM, and live ones.
//!
//! Dirty tracking (KVM's dirty log plus the devices' `vm-memory` bitmap) starts with a VM's
//! first snapshot, whatever its kind, and stays on for the VM's life: from then on every
//! successful snapshot becomes the `DiffBase` a later `diff` is layered over, and the pages
//! written since it are gathered into `DiffBase::pending`. A snapshot that fails keeps the base
//! and its pending pages (a paused one), or drops the base (a live one, whose passes consumed
//! the dirty log): the next diff then asks for a full snapshot first. A VM restored from a
//! snapshot has no base until its own first snapshot.
//!
//! Virtio devices are quiesced right after the pause (`RunningVm::quiesce_devices`: block
//! requests in flight complete into the used ring first), so guest memory and the saved queue
//! positions agree; they continue when the VM is released. A vhost-user device's backend
//! stops its rings there too (`GET_VRING_BASE`); it writes guest memory behind the dirty log,
//! so its diffs count every page with data in the backing as written. A live snapshot switches
//! each such backend's own dirty log on for its passes (`device_logs`; refused when a backend
//! cannot keep one) and off after the final pass or a failure.
//!
//! Full and diff: pause, gather the state, write on a `SnapshotJob` thread, resume when it
//! ends. A full snapshot with `stop` skips dirty tracking (the VM ends) and lets the writer
//! hard-link a `file=` backing: after the pause nothing writes guest memory again (the vCPUs
//! stay parked until they exit, and the quiesced devices, vhost-user backends included, have
//! stopped their rings). Live: switch tracking on, run the passes on a job thread while the
//! guest runs; when they end, pause, copy the last dirty pages and gather the state here (the
//! blackout), resume, then write the state, manifest and rename on a second job thread.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use devices::vm_exit::GuestEnd;

use super::{ControlError, RunningVm};
use crate::memory::RegionMapping;
use crate::snapshot::dirty::{
    gather, mark_backed_pages, reset_device_bitmaps, DirtyError, PageBitmap,
};
use crate::snapshot::job::{
    JobMeta, JobOutput, LiveSummary, ProgressStatus, SnapshotJob, SnapshotSummary,
};
use crate::snapshot::live::{copy_dirty, FirstPass, Limits, Precopy, PrecopyReport};
use crate::snapshot::manifest::{ParentRef, SnapshotManifest, DIFF_FORMAT_VERSION};
use crate::snapshot::state_file;
use crate::snapshot::writer::{reserve, MemorySource, PendingSnapshot, WriteError};
use crate::snapshot::SnapshotRequest;

/// The snapshot a diff is layered over, and the pages written since.
#[derive(Debug, Clone)]
pub struct DiffBase {
    /// The last successful snapshot of this VM.
    pub parent: ParentRef,
    /// Per region, the pages gathered from the dirty log since then.
    pub pending: Vec<PageBitmap>,
}

fn internal(e: impl std::fmt::Display) -> ControlError {
    ControlError::Internal(e.to_string())
}

/// What a started snapshot still needs when its job ends.
struct Started {
    requested: Instant,
    pause_ms: f64,
    state_ms: f64,
    was_running: bool,
    notes: Vec<String>,
}

impl RunningVm {
    /// Starts a snapshot: checks, then a paused full or diff snapshot (the VM stays paused until
    /// `finish_snapshot`), or a live one (the VM keeps running).
    pub fn start_snapshot(&mut self, req: SnapshotRequest) -> Result<(), ControlError> {
        let requested = Instant::now();
        if self.job.is_some() {
            return Err(ControlError::Conflict(
                "a snapshot is already being written".into(),
            ));
        }
        let blockers = self.unsupported_devices();
        if !blockers.is_empty() {
            return Err(ControlError::Unsupported(format!(
                "cannot snapshot this VM: {}",
                blockers.join("; ")
            )));
        }
        if req.live {
            if let Err(missing) = self.device_dirty_logs() {
                return Err(ControlError::Unsupported(format!(
                    "cannot take a live snapshot of this VM: {}; take a paused snapshot \
                     (without --live)",
                    missing.join("; ")
                )));
            }
        }
        if req.diff && self.diff_base.is_none() {
            return Err(ControlError::Conflict(
                "no earlier snapshot of this VM to diff against: take a full snapshot first \
                 (dirty tracking starts with the VM's first snapshot)"
                    .into(),
            ));
        }
        let temp = reserve(&req.dir).map_err(|e| match e {
            WriteError::NotAbsolute(_) | WriteError::Exists(_) | WriteError::Parent { .. } => {
                ControlError::BadRequest(crate::error_chain(&e))
            }
            e => ControlError::Internal(crate::error_chain(&e)),
        })?;
        let result = if req.live {
            self.start_live(&req, temp.clone(), requested)
        } else {
            self.start_paused(&req, temp.clone(), requested)
        };
        if result.is_err() {
            self.stop_device_logs();
            let _ = std::fs::remove_dir_all(&temp);
        }
        result
    }

    /// Switches dirty tracking on if it is off (everything counts as saved from now), or
    /// gathers what was written since the last gather into the diff base. `Err` says why
    /// tracking is unavailable.
    fn track_dirty(&mut self) -> Result<(), DirtyError> {
        let log = self.vm.dirty_log().map_err(DirtyError::Hypervisor)?;
        let memory = self.ram.memory();
        if !log.is_tracking() {
            log.set_tracking(true).map_err(DirtyError::Hypervisor)?;
            reset_device_bitmaps(memory);
            return Ok(());
        }
        let sets = gather(&*log, memory)?;
        if let Some(base) = &mut self.diff_base {
            for (mine, new) in base.pending.iter_mut().zip(&sets) {
                mine.merge(new);
            }
        }
        Ok(())
    }

    fn start_paused(
        &mut self,
        req: &SnapshotRequest,
        temp: PathBuf,
        requested: Instant,
    ) -> Result<(), ControlError> {
        let was_running = !self.paused;
        let pause = self.pause()?;
        let resume_on_error = |vm: &mut Self| {
            if was_running {
                vm.release();
            }
        };
        // Before the dirty log is read: what the devices finish now is in this snapshot.
        self.quiesce_devices();
        let mut notes = Vec::new();
        // A VM that ends with this snapshot needs no tracking (and no base for diffs).
        let tracked = if req.stop && !req.diff {
            Ok(())
        } else {
            self.track_dirty()
        };
        if let Err(e) = tracked {
            if req.diff {
                resume_on_error(self);
                return Err(ControlError::Internal(crate::error_chain(&e)));
            }
            notes.push(format!(
                "diff snapshots unavailable: {}",
                crate::error_chain(&e)
            ));
        }
        if req.diff {
            // What another process wrote is not in the dirty log: every page with data in the
            // backing counts as written.
            let untracked = self.untracked_writers();
            if let (false, Some(base)) = (untracked.is_empty(), self.diff_base.as_mut()) {
                for (pending, region) in base.pending.iter_mut().zip(self.ram.regions()) {
                    mark_backed_pages(pending, region);
                }
                notes.push(format!(
                    "every page with data is in this diff: {}",
                    untracked.join("; ")
                ));
            }
        }
        let state_started = Instant::now();
        let state = self.gather_state().and_then(|(state, more)| {
            notes.extend(more);
            state_file::encode(&state).map_err(internal)
        });
        let state = match state {
            Ok(s) => s,
            Err(e) => {
                resume_on_error(self);
                return Err(e);
            }
        };
        let started = Started {
            requested,
            pause_ms: pause.as_secs_f64() * 1000.0,
            state_ms: state_started.elapsed().as_secs_f64() * 1000.0,
            was_running,
            notes,
        };
        let memory = match (&self.diff_base, req.diff) {
            (Some(base), true) => MemorySource::Pages {
                mappings: RegionMapping::of_each(self.ram.memory()),
                pages: base.pending.clone(),
            },
            _ => MemorySource::Full {
                private: self.private_mappings(),
                link: req.stop,
            },
        };
        let (manifest, meta) = self.describe(req, started, false);
        let pending = PendingSnapshot {
            dir: req.dir.clone(),
            temp,
            regions: self.ram.regions().to_vec(),
            memory,
            state,
            manifest,
        };
        let job = self
            .job_done
            .try_clone()
            .and_then(|done| SnapshotJob::start(pending, done, meta));
        match job {
            Ok(job) => {
                self.job = Some(job);
                Ok(())
            }
            Err(e) => {
                resume_on_error(self);
                Err(internal(format!("cannot start the snapshot thread: {e}")))
            }
        }
    }

    fn start_live(
        &mut self,
        req: &SnapshotRequest,
        temp: PathBuf,
        requested: Instant,
    ) -> Result<(), ControlError> {
        let log = self
            .vm
            .dirty_log()
            .map_err(|e| internal(crate::error_chain(&e)))?;
        self.track_dirty().map_err(|e| {
            internal(format!(
                "live snapshots need the dirty page log: {}",
                crate::error_chain(&e)
            ))
        })?;
        // The devices that write guest memory themselves log it too (checked above).
        let devices = self.device_dirty_logs().map_err(|missing| {
            ControlError::Unsupported(format!(
                "cannot take a live snapshot of this VM: {}",
                missing.join("; ")
            ))
        })?;
        let ram_end = self
            .ram
            .regions()
            .iter()
            .map(|r| r.guest_address.saturating_add(r.size))
            .max()
            .unwrap_or(0);
        for log in &devices {
            self.device_logs.push(log.clone());
            log.start(ram_end).map_err(|e| {
                internal(format!(
                    "cannot switch a device's dirty log on: {}",
                    crate::error_chain(&e)
                ))
            })?;
        }
        let first = match (&self.diff_base, req.diff) {
            (Some(base), true) => FirstPass::Pages(base.pending.clone()),
            _ => FirstPass::Full,
        };
        let started = Started {
            requested,
            pause_ms: 0.0,
            state_ms: 0.0,
            // The VM keeps running; the final pass decides about resuming.
            was_running: false,
            notes: Vec::new(),
        };
        let (_, mut meta) = self.describe(req, started, true);
        meta.live = Some(LiveSummary::default());
        let precopy = Precopy {
            temp,
            regions: self.ram.regions().to_vec(),
            mappings: RegionMapping::of_each(self.ram.memory()),
            private: self.ram.is_private(),
            first,
            log,
            memory: self.ram.memory().clone(),
            devices,
            limits: Limits::default(),
            progress: meta.progress.clone(),
        };
        let done = self.job_done.try_clone().map_err(internal)?;
        let job = SnapshotJob::start_precopy(precopy, done, meta)
            .map_err(|e| internal(format!("cannot start the snapshot thread: {e}")))?;
        // The passes consume the dirty log: the diff base is only good again once this
        // snapshot succeeds (and becomes the base).
        self.job = Some(job);
        Ok(())
    }

    /// The manifest (without memory and state entries) and the job's meta for a request.
    fn describe(
        &self,
        req: &SnapshotRequest,
        s: Started,
        live: bool,
    ) -> (SnapshotManifest, JobMeta) {
        let mut manifest = self.manifest(s.notes.clone());
        let parent = self
            .diff_base
            .as_ref()
            .filter(|_| req.diff)
            .map(|b| b.parent.clone());
        if let Some(p) = &parent {
            manifest.format_version = DIFF_FORMAT_VERSION;
            manifest.parent = Some(p.clone());
        }
        let meta = JobMeta {
            requested: s.requested,
            pause_ms: s.pause_ms,
            state_ms: s.state_ms,
            stop: req.stop,
            was_running: s.was_running,
            notes: s.notes,
            kind: if req.diff { "diff" } else { "full" },
            parent: parent.map(|p| p.dir),
            blackout_ms: 0.0,
            live: live.then(LiveSummary::default),
            dir: req.dir.clone(),
            manifest: Some(manifest.clone()),
            progress: Default::default(),
        };
        (manifest, meta)
    }

    /// If the snapshot job has ended, collects it: a live snapshot's passes lead to its final
    /// pass and write (`None`: still in progress); a written snapshot resumes the VM if it was
    /// running (and is not to stop), or records the VM's end for `stop`. `None` while a job
    /// runs.
    pub fn finish_snapshot(&mut self) -> Option<Result<SnapshotSummary, ControlError>> {
        let _ = self.job_done.read();
        if !self.job.as_ref()?.is_finished() {
            return None;
        }
        let job = self.job.take()?;
        let (mut meta, result) = job.join();
        let live = meta.live.is_some();
        let result = match result {
            Ok(JobOutput::Precopied(p)) => {
                let (precopy, report) = *p;
                return self.finish_live(meta, precopy, report);
            }
            Ok(JobOutput::Written(report)) => {
                if meta.was_running && !live {
                    meta.blackout_ms = meta.requested.elapsed().as_secs_f64() * 1000.0;
                }
                let summary = crate::snapshot::job::summary(&meta, &report);
                self.diff_base = Some(DiffBase {
                    parent: ParentRef {
                        dir: report.dir,
                        manifest_crc32: report.manifest_crc32,
                    },
                    pending: self
                        .ram
                        .regions()
                        .iter()
                        .map(|r| PageBitmap::clean(r.size))
                        .collect(),
                });
                Ok(summary)
            }
            Err(e) => {
                if live {
                    self.diff_base = None;
                    self.stop_device_logs();
                }
                Err(ControlError::Internal(crate::error_chain(&e)))
            }
        };
        match &result {
            Ok(_) if meta.stop => self.exit.request(GuestEnd::Stopped),
            _ if meta.was_running => self.release(),
            _ => {}
        }
        Some(result)
    }

    /// A live snapshot's blackout: pause, copy the last dirty pages, gather the state, resume;
    /// then the write on a new job.
    fn finish_live(
        &mut self,
        mut meta: JobMeta,
        precopy: Precopy,
        mut report: PrecopyReport,
    ) -> Option<Result<SnapshotSummary, ControlError>> {
        let paused_at = Instant::now();
        let was_running = !self.paused;
        let fail = |vm: &mut Self, e: ControlError| {
            vm.stop_device_logs();
            let _ = std::fs::remove_dir_all(&precopy.temp);
            vm.diff_base = None;
            if was_running {
                vm.release();
            }
            Some(Err(e))
        };
        let pause = match self.pause() {
            Ok(p) => p,
            Err(e) => return fail(self, e),
        };
        // Before the last pass: what the devices finish now is in this snapshot.
        self.quiesce_devices();
        let last = match copy_dirty(&precopy, &mut report, &AtomicBool::new(false)) {
            Ok(s) => s,
            Err(e) => return fail(self, internal(crate::error_chain(&e))),
        };
        // The backends' last writes are in: their logs go off before the devices continue.
        self.stop_device_logs();
        let state_started = Instant::now();
        let state = self.gather_state().and_then(|(state, notes)| {
            meta.notes.extend(notes);
            state_file::encode(&state).map_err(internal)
        });
        let state = match state {
            Ok(s) => s,
            Err(e) => return fail(self, e),
        };
        meta.state_ms = state_started.elapsed().as_secs_f64() * 1000.0;
        meta.pause_ms = pause.as_secs_f64() * 1000.0;
        // With `stop` the VM stays paused until the snapshot is complete, then ends.
        if was_running && !meta.stop {
            self.release();
        }
        meta.blackout_ms = paused_at.elapsed().as_secs_f64() * 1000.0;
        meta.was_running = false;
        meta.live = Some(LiveSummary {
            passes: report.passes.clone(),
            precopy_ms: report.ms,
            final_pass: Some(last),
        });
        let mut manifest = meta
            .manifest
            .take()
            .unwrap_or_else(|| self.manifest(Vec::new()));
        manifest.notes = meta.notes.clone();
        let pending = PendingSnapshot {
            dir: meta.dir.clone(),
            temp: precopy.temp.clone(),
            regions: precopy.regions.clone(),
            memory: MemorySource::Written(report.regions),
            state,
            manifest,
        };
        let job = self
            .job_done
            .try_clone()
            .and_then(|done| SnapshotJob::start(pending, done, meta));
        match job {
            Ok(job) => {
                self.job = Some(job);
                None
            }
            Err(e) => fail(
                self,
                internal(format!("cannot start the snapshot thread: {e}")),
            ),
        }
    }

    /// Switches off the devices' dirty logs a live snapshot switched on (when it ends, or
    /// fails).
    fn stop_device_logs(&mut self) {
        for log in self.device_logs.drain(..) {
            log.stop();
        }
    }

    /// `GET /vm/snapshot/progress`: the running snapshot's counters, if one runs.
    pub fn snapshot_progress(&self) -> ProgressStatus {
        self.job.as_ref().map_or(
            ProgressStatus {
                in_progress: false,
                counters: None,
                elapsed_ms: None,
            },
            SnapshotJob::progress,
        )
    }

    /// For RAM mapped copy-on-write, each region's mapping in this process (see
    /// `MemorySource::Full`).
    fn private_mappings(&self) -> Vec<RegionMapping> {
        if self.ram.is_private() {
            RegionMapping::of_each(self.ram.memory())
        } else {
            Vec::new()
        }
    }
}
