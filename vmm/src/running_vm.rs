//! A VM whose vCPU threads are running: pause, resume, status, and taking a snapshot.
//!
//! `RunningVm` owns what the runner used to hold loose: the hypervisor VM, guest RAM, the
//! devices with state, and one thread plus `VcpuControl` per vCPU. Pausing kicks every thread
//! out of `KVM_RUN` with the kick signal until all are parked; a snapshot then saves each
//! vCPU's state on its own thread, the VM's and the devices' state here, and hands the memory
//! write to a `SnapshotJob` thread. Not here: the event loop and the HTTP side (`runner.rs`,
//! `api/`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arch::layout::{ACPI_PM_PORT, PCI_CONFIG_IO_PORT, PCI_ECAM_START};
use devices::bus::Bus;
use devices::legacy::debug_exit::DEBUG_EXIT_PORT;
use devices::legacy::i8042::{I8042, I8042_PORT};
use devices::legacy::serial::{Serial, COM1_PORT};
use devices::vm_exit::{GuestEnd, VmExitSignal};
use serde::Serialize;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{Killable, SIGRTMIN};

use crate::builder::BuiltVm;
use crate::hypervisor::Vm;
use crate::memory::GuestRam;
use crate::snapshot::job::{JobMeta, SnapshotJob, SnapshotSummary};
use crate::snapshot::manifest::{
    SnapshotManifest, StateFileEntry, VmDescription, MANIFEST_FORMAT_VERSION,
};
use crate::snapshot::memory_file::PrivateMapping;
use crate::snapshot::writer::{reserve, PendingSnapshot, WriteError};
use crate::snapshot::{state_file, DeviceStates, SnapshotState};
use crate::teardown::Teardown;
use crate::vcpu::{run_vcpu, VcpuContext, VcpuControl};

/// How often a vCPU thread is signalled again until it leaves `KVM_RUN`.
const KICK_INTERVAL: Duration = Duration::from_millis(1);
/// How long a pause may take before it is reported as failed.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long saving one vCPU's state may take.
const SAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a control request failed; `status` is the HTTP status the API answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The request is malformed or names something unusable.
    #[error("{0}")]
    BadRequest(String),
    /// The request conflicts with what the VM is doing.
    #[error("{0}")]
    Conflict(String),
    /// The VM has something this skiff cannot do that for yet.
    #[error("{0}")]
    Unsupported(String),
    /// skiff failed.
    #[error("{0}")]
    Internal(String),
}

impl ControlError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest(_) => 400,
            Self::Conflict(_) => 409,
            Self::Unsupported(_) => 501,
            Self::Internal(_) => 500,
        }
    }
}

/// `GET /vm`.
#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    /// `running` or `paused`.
    pub state: &'static str,
    /// vCPU count.
    pub vcpus: usize,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Whether a snapshot is being written.
    pub snapshot_in_progress: bool,
    /// Whether guest RAM is a copy-on-write mapping of snapshot files (restored with `cow`).
    pub memory_private: bool,
}

struct VcpuThread {
    control: Arc<VcpuControl>,
    handle: JoinHandle<Option<String>>,
}

/// A VM with running (or paused) vCPU threads.
pub struct RunningVm {
    vm: Box<dyn Vm>,
    ram: GuestRam,
    serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: VmExitSignal,
    threads: Vec<VcpuThread>,
    description: VmDescription,
    paused: bool,
    job: Option<SnapshotJob>,
    /// Written by a snapshot thread when it ends; the event loop watches it.
    job_done: EventFd,
}

impl std::fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm")
            .field("vcpus", &self.threads.len())
            .field("paused", &self.paused)
            .finish_non_exhaustive()
    }
}

impl RunningVm {
    /// Starts one thread per vCPU. On failure the VM end is recorded and started threads stop.
    pub fn start(vm: BuiltVm, description: VmDescription) -> Result<Self, (u32, std::io::Error)> {
        let BuiltVm {
            ram,
            vm: hypervisor_vm,
            vcpus,
            pio,
            mmio,
            serial,
            i8042,
            exit,
            // The runner took the event loop and the console input out already.
            events: _,
            console_input: _,
        } = vm;
        let job_done = EventFd::new(EFD_NONBLOCK).map_err(|e| (0, e))?;
        let mut running = Self {
            vm: hypervisor_vm,
            ram,
            serial,
            i8042,
            pio,
            mmio,
            exit,
            threads: Vec::with_capacity(vcpus.len()),
            description,
            paused: false,
            job: None,
            job_done,
        };
        for (index, vcpu) in (0u32..).zip(vcpus) {
            let control = Arc::new(VcpuControl::new(index));
            let ctx = VcpuContext {
                index,
                vcpu,
                pio: running.pio.clone(),
                mmio: running.mmio.clone(),
                exit: running.exit.clone(),
                control: control.clone(),
            };
            match thread::Builder::new()
                .name(format!("skiff-vcpu{index}"))
                .spawn(move || run_vcpu(ctx))
            {
                Ok(handle) => running.threads.push(VcpuThread { control, handle }),
                Err(e) => {
                    running.exit.request(GuestEnd::VmmError);
                    let _ = running.stop();
                    return Err((index, e));
                }
            }
        }
        Ok(running)
    }

    /// The eventfd a snapshot thread writes when it ends.
    pub fn job_done_event(&self) -> &EventFd {
        &self.job_done
    }

    /// Where the VM's end is recorded.
    pub fn exit(&self) -> &VmExitSignal {
        &self.exit
    }

    /// `GET /vm`.
    pub fn status(&self) -> VmStatus {
        VmStatus {
            state: if self.paused { "paused" } else { "running" },
            vcpus: self.threads.len(),
            memory_bytes: self.ram.regions().iter().map(|r| r.size).sum(),
            snapshot_in_progress: self.job.is_some(),
            memory_private: self.ram.is_private(),
        }
    }

    /// Parks every vCPU outside `KVM_RUN`. Returns how long it took.
    pub fn pause(&mut self) -> Result<Duration, ControlError> {
        let started = Instant::now();
        if self.paused {
            return Ok(Duration::ZERO);
        }
        for t in &self.threads {
            t.control.request_pause();
        }
        for t in &self.threads {
            // A signal sent just before the thread enters KVM_RUN is lost, so keep kicking.
            while !t.control.wait_parked(KICK_INTERVAL) {
                if started.elapsed() > PAUSE_TIMEOUT {
                    self.release();
                    return Err(ControlError::Internal(format!(
                        "vCPUs did not pause within {PAUSE_TIMEOUT:?}"
                    )));
                }
                let _ = t.handle.kill(SIGRTMIN());
            }
        }
        self.paused = true;
        Ok(started.elapsed())
    }

    fn release(&mut self) {
        for t in &self.threads {
            t.control.resume();
        }
        self.paused = false;
    }

    /// Lets every vCPU run again.
    pub fn resume(&mut self) -> Result<(), ControlError> {
        if self.job.is_some() {
            return Err(ControlError::Conflict(
                "a snapshot is being written; the VM resumes when it is done".into(),
            ));
        }
        self.release();
        Ok(())
    }

    /// Devices on the buses whose state a snapshot cannot save yet, described for the error
    /// message: everything but the legacy devices and the PCI configuration access (host
    /// bridge), i.e. every virtio PCI function's BAR, and any device added later that nobody
    /// taught snapshots about (refused rather than saved wrong).
    fn unsupported_devices(&self) -> Vec<String> {
        // Serial and i8042 are saved; debug-exit and the ACPI PM block have no state.
        let known_pio = [
            COM1_PORT,
            I8042_PORT,
            DEBUG_EXIT_PORT,
            ACPI_PM_PORT,
            PCI_CONFIG_IO_PORT,
        ];
        let mut list: Vec<String> = self
            .pio
            .ranges()
            .into_iter()
            .filter(|(base, _)| !known_pio.contains(base))
            .map(|(base, len)| format!("a device at I/O ports {base:#x}+{len:#x}"))
            .collect();
        list.extend(
            self.mmio
                .ranges()
                .into_iter()
                .filter(|&(base, _)| base != PCI_ECAM_START)
                .map(|(base, _)| format!("the virtio PCI function with its BAR at {base:#x}")),
        );
        list
    }

    /// Starts a full snapshot into `dir`: checks, pauses, saves the state, and starts the
    /// memory write on its own thread. The VM stays paused until `finish_snapshot`.
    pub fn start_snapshot(&mut self, dir: PathBuf, stop: bool) -> Result<(), ControlError> {
        let requested = Instant::now();
        if self.job.is_some() {
            return Err(ControlError::Conflict(
                "a snapshot is already being written".into(),
            ));
        }
        let blockers = self.unsupported_devices();
        if !blockers.is_empty() {
            return Err(ControlError::Unsupported(format!(
                "snapshot of virtio devices is not supported yet: {}",
                blockers.join(", ")
            )));
        }
        let temp = reserve(&dir).map_err(|e| match e {
            WriteError::NotAbsolute(_) | WriteError::Exists(_) | WriteError::Parent { .. } => {
                ControlError::BadRequest(crate::error_chain(&e))
            }
            e => ControlError::Internal(crate::error_chain(&e)),
        })?;
        let was_running = !self.paused;
        let result = self.pause().and_then(|pause| {
            let state_started = Instant::now();
            let (state, notes) = self.gather_state()?;
            let bytes =
                state_file::encode(&state).map_err(|e| ControlError::Internal(e.to_string()))?;
            Ok((pause, state_started.elapsed(), bytes, notes))
        });
        let (pause, state_time, bytes, notes) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&temp);
                if was_running {
                    self.release();
                }
                return Err(e);
            }
        };
        let pending = PendingSnapshot {
            dir,
            temp: temp.clone(),
            regions: self.ram.regions().to_vec(),
            private: self.private_mappings(),
            state: bytes,
            manifest: self.manifest(notes.clone()),
        };
        let meta = JobMeta {
            requested,
            pause_ms: pause.as_secs_f64() * 1000.0,
            state_ms: state_time.as_secs_f64() * 1000.0,
            stop,
            was_running,
            notes,
        };
        let done = self
            .job_done
            .try_clone()
            .map_err(|e| ControlError::Internal(format!("cannot clone an eventfd: {e}")));
        match done.and_then(|done| {
            SnapshotJob::start(pending, done, meta).map_err(|e| {
                ControlError::Internal(format!("cannot start the snapshot thread: {e}"))
            })
        }) {
            Ok(job) => {
                self.job = Some(job);
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&temp);
                if was_running {
                    self.release();
                }
                Err(e)
            }
        }
    }

    /// If the snapshot write has ended, collects it: resumes the VM if it was running (and is
    /// not to stop), or records the VM's end for `stop`. `None` while it is still writing.
    pub fn finish_snapshot(&mut self) -> Option<Result<SnapshotSummary, ControlError>> {
        let _ = self.job_done.read();
        if !self.job.as_ref()?.is_finished() {
            return None;
        }
        let job = self.job.take()?;
        let (was_running, stop) = (job.meta.was_running, job.meta.stop);
        let result = job.finish().map_err(ControlError::Internal);
        match &result {
            Ok(_) if stop => self.exit.request(GuestEnd::Stopped),
            _ if was_running => self.release(),
            _ => {}
        }
        Some(result)
    }

    /// For RAM mapped copy-on-write, each region's mapping in this process (see
    /// `PendingSnapshot::private`): they stay mapped while `self.ram` lives, and the snapshot
    /// job ends before `stop` drops it.
    fn private_mappings(&self) -> Vec<PrivateMapping> {
        use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
        if !self.ram.is_private() {
            return Vec::new();
        }
        self.ram
            .memory()
            .iter()
            .map(|r| PrivateMapping {
                host_address: r.as_ptr() as usize,
                len: usize::try_from(r.len()).unwrap_or(0),
            })
            .collect()
    }

    fn gather_state(&self) -> Result<(SnapshotState, Vec<String>), ControlError> {
        let mut vcpus = Vec::with_capacity(self.threads.len());
        let mut notes: Vec<String> = Vec::new();
        for (index, t) in self.threads.iter().enumerate() {
            let (state, skipped) = t
                .control
                .run_on_vcpu(SAVE_TIMEOUT, |vcpu| vcpu.save_state())
                .map_err(|e| ControlError::Internal(e.to_string()))?
                .map_err(|e| {
                    ControlError::Internal(format!(
                        "saving vCPU {index}: {}",
                        crate::error_chain(&e)
                    ))
                })?;
            for s in skipped {
                let note = format!("not saved: {s}");
                if !notes.contains(&note) {
                    notes.push(note);
                }
            }
            vcpus.push(state);
        }
        let vm = self.vm.save_state().map_err(|e| {
            ControlError::Internal(format!("saving the VM: {}", crate::error_chain(&e)))
        })?;
        let devices = DeviceStates {
            serial: self
                .serial
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .save(),
            i8042: self
                .i8042
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .save(),
        };
        Ok((SnapshotState { vcpus, vm, devices }, notes))
    }

    fn manifest(&self, notes: Vec<String>) -> SnapshotManifest {
        SnapshotManifest {
            format_version: MANIFEST_FORMAT_VERSION,
            skiff_version: env!("CARGO_PKG_VERSION").into(),
            created_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            vm: self.description.clone(),
            memory: Vec::new(),
            state: StateFileEntry {
                file: String::new(),
                size: 0,
                crc32: 0,
            },
            notes,
        }
    }

    /// Stops every vCPU thread (the VM end must be recorded first), cancels a snapshot being
    /// written, and returns the first abnormal-end description, the cancelled snapshot's
    /// message, and what is left to tear down.
    pub fn stop(mut self) -> (Option<String>, Option<String>, Teardown) {
        let cancelled = self.job.take().map(SnapshotJob::cancel);
        let mut detail = None;
        for t in self.threads.drain(..) {
            // Parked threads wait on their control block, running ones in KVM_RUN: wake the
            // first, kick the second, until the thread returns.
            while !t.handle.is_finished() {
                t.control.wake();
                let _ = t.handle.kill(SIGRTMIN());
                thread::sleep(KICK_INTERVAL);
            }
            match t.handle.join() {
                Ok(d) => detail = detail.or(d),
                Err(_) => detail = detail.or(Some("a vCPU thread panicked".into())),
            }
        }
        (detail, cancelled, Teardown::new(self.vm, self.ram))
    }
}
