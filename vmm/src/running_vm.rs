//! A VM whose vCPU threads are running: pause, resume, status, and taking a snapshot.
//!
//! `RunningVm` owns the running VM's parts in one place: the hypervisor VM, guest RAM, the
//! devices with state, and one thread plus `VcpuControl` per vCPU. Pausing kicks every thread
//! out of `KVM_RUN` with the kick signal until all are parked; a snapshot then saves each
//! vCPU's state on its own thread, the VM's and the devices' state here, and hands the memory
//! write to a `SnapshotJob` thread (full, diff and live snapshots: `running_vm/snapshot.rs`).
//! Not here: the event loop and the HTTP side (`runner.rs`, `api/`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arch::layout::{ACPI_PM_PORT, PCI_CONFIG_IO_PORT, PCI_ECAM_START};
use devices::bus::Bus;
use devices::legacy::debug_exit::DEBUG_EXIT_PORT;
use devices::legacy::i8042::{I8042, I8042_PORT};
use devices::legacy::serial::{Serial, COM1_PORT};
use devices::persist::Persist;
use devices::virtio::DeviceDirtyLog;
use devices::vm_exit::{GuestEnd, VmExitSignal};
use serde::Serialize;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{Killable, SIGRTMIN};

use crate::builder::{BuiltVm, VirtioFunctions};
use crate::hypervisor::Vm;
use crate::memory::GuestRam;
use crate::snapshot::job::SnapshotJob;
use crate::snapshot::manifest::{
    SnapshotManifest, StateFileEntry, VmDescription, MANIFEST_FORMAT_VERSION,
};
use crate::snapshot::{DeviceStates, SnapshotState};
use crate::teardown::Teardown;
use crate::vcpu::{run_vcpu, VcpuContext, VcpuControl};
use crate::virtio_devices::{VirtioDeviceState, VirtioFunctionState};

mod snapshot;

pub use snapshot::DiffBase;

/// How often a vCPU thread is signalled again until it leaves `KVM_RUN`.
const KICK_INTERVAL: Duration = Duration::from_millis(1);
/// How often `stop` looks whether a kicked vCPU thread has returned.
const STOP_POLL: Duration = Duration::from_micros(50);
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
    /// The snapshot a `diff` snapshot would be layered over, if any.
    pub diff_parent: Option<PathBuf>,
    /// Guest output bytes (serial, console) dropped because their host sink was slow or
    /// failing (the runner fills it in).
    pub guest_output_dropped_bytes: u64,
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
    /// The virtio PCI functions, in bus order.
    virtio: VirtioFunctions,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: VmExitSignal,
    threads: Vec<VcpuThread>,
    description: VmDescription,
    paused: bool,
    job: Option<SnapshotJob>,
    /// Written by a snapshot thread when it ends; the event loop watches it.
    job_done: EventFd,
    /// What a diff snapshot is taken against: set by every successful snapshot, once dirty
    /// tracking is on (see `snapshot.rs`).
    diff_base: Option<DiffBase>,
    /// The devices' own dirty logs a live snapshot switched on (vhost-user backends), until
    /// it ends.
    device_logs: Vec<Arc<dyn DeviceDirtyLog>>,
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
            virtio,
            // The runner took the output sinks out already, to report them.
            outputs: _,
        } = vm;
        let job_done = EventFd::new(EFD_NONBLOCK).map_err(|e| (0, e))?;
        let mut running = Self {
            vm: hypervisor_vm,
            ram,
            serial,
            i8042,
            virtio,
            pio,
            mmio,
            exit,
            threads: Vec::with_capacity(vcpus.len()),
            description,
            paused: false,
            job: None,
            job_done,
            diff_base: None,
            device_logs: Vec::new(),
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
                .spawn(move || {
                    crate::sandbox::confine_thread_or_exit(crate::sandbox::ThreadKind::Vcpu);
                    run_vcpu(ctx)
                }) {
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
            diff_parent: self.diff_base.as_ref().map(|b| b.parent.dir.clone()),
            guest_output_dropped_bytes: 0,
        }
    }

    /// Whether the vCPUs are paused (`PUT /vm/pause`).
    pub fn is_paused(&self) -> bool {
        self.paused
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

    /// Lets the vCPUs run again, after the virtio devices a snapshot quiesced continue.
    pub(crate) fn release(&mut self) {
        for f in &self.virtio {
            f.lock().unwrap_or_else(PoisonError::into_inner).resume();
        }
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

    /// Devices on the buses whose state a snapshot cannot save, described for the error
    /// message: virtio functions whose device says why, and any device added later that
    /// nobody taught snapshots about (refused rather than saved wrong).
    pub(crate) fn unsupported_devices(&self) -> Vec<String> {
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
        let mut bars = vec![PCI_ECAM_START];
        for f in &self.virtio {
            let f = f.lock().unwrap_or_else(PoisonError::into_inner);
            let bar = f.mapped_bar();
            bars.extend(bar);
            if VirtioDeviceState::save(f.device()).is_none() {
                let at = bar.map_or_else(|| "unmapped".into(), |b| format!("at {b:#x}"));
                list.push(format!(
                    "virtio {} (BAR {at}): its state cannot be saved",
                    f.name()
                ));
            }
        }
        list.extend(
            self.mmio
                .ranges()
                .into_iter()
                .filter(|(base, _)| !bars.contains(base))
                .map(|(base, len)| format!("a device at MMIO {base:#x}+{len:#x}")),
        );
        list
    }

    /// Devices that write guest memory behind the dirty log (vhost-user backends), described
    /// for messages: a live snapshot cannot follow their writes, and a diff counts every page
    /// with data.
    pub(crate) fn untracked_writers(&self) -> Vec<String> {
        self.virtio
            .iter()
            .filter_map(|f| {
                let f = f.lock().unwrap_or_else(PoisonError::into_inner);
                let why = f.untracked_writes()?;
                let at = f
                    .mapped_bar()
                    .map_or_else(|| "unmapped".into(), |b| format!("at {b:#x}"));
                Some(format!("virtio {} (BAR {at}): {why}", f.name()))
            })
            .collect()
    }

    /// For a live snapshot: the dirty logs of the devices that write guest memory behind the
    /// dirty log (vhost-user backends), or, described for messages, the devices that cannot
    /// keep one.
    pub(crate) fn device_dirty_logs(&self) -> Result<Vec<Arc<dyn DeviceDirtyLog>>, Vec<String>> {
        let mut logs = Vec::new();
        let mut missing = Vec::new();
        for f in &self.virtio {
            let f = f.lock().unwrap_or_else(PoisonError::into_inner);
            if f.untracked_writes().is_none() {
                continue;
            }
            match f.dirty_log() {
                Ok(log) => logs.push(log),
                Err(why) => {
                    let at = f
                        .mapped_bar()
                        .map_or_else(|| "unmapped".into(), |b| format!("at {b:#x}"));
                    missing.push(format!(
                        "virtio {} (BAR {at}): {}",
                        f.name(),
                        crate::error_chain(&why)
                    ));
                }
            }
        }
        if missing.is_empty() {
            Ok(logs)
        } else {
            Err(missing)
        }
    }

    /// For a snapshot of the paused VM: every virtio device finishes what it has in flight
    /// (block I/O completes into the used ring, the driver is notified) and stops touching
    /// guest memory until `release`. Call before the dirty log is read and before any state
    /// is gathered, so that the memory and the saved queue positions agree.
    pub(crate) fn quiesce_devices(&self) {
        for f in &self.virtio {
            f.lock().unwrap_or_else(PoisonError::into_inner).quiesce();
        }
    }

    pub(crate) fn gather_state(&self) -> Result<(SnapshotState, Vec<String>), ControlError> {
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
            virtio: self
                .virtio
                .iter()
                .map(|f| {
                    let f = f.lock().unwrap_or_else(PoisonError::into_inner);
                    let device = VirtioDeviceState::save(f.device()).ok_or_else(|| {
                        ControlError::Unsupported(format!(
                            "virtio {}: its state cannot be saved",
                            f.name()
                        ))
                    })?;
                    Ok(VirtioFunctionState {
                        device,
                        transport: f.save(),
                    })
                })
                .collect::<Result<_, ControlError>>()?,
        };
        Ok((SnapshotState { vcpus, vm, devices }, notes))
    }

    pub(crate) fn manifest(&self, notes: Vec<String>) -> SnapshotManifest {
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
            parent: None,
            resources: Vec::new(),
            authentication: None,
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
            // A kicked thread returns within microseconds: look often, kick again rarely.
            let mut since_kick = KICK_INTERVAL;
            while !t.handle.is_finished() {
                if since_kick >= KICK_INTERVAL {
                    t.control.wake();
                    let _ = t.handle.kill(SIGRTMIN());
                    since_kick = Duration::ZERO;
                }
                thread::sleep(STOP_POLL);
                since_kick += STOP_POLL;
            }
            match t.handle.join() {
                Ok(d) => detail = detail.or(d),
                Err(_) => detail = detail.or(Some("a vCPU thread panicked".into())),
            }
        }
        (detail, cancelled, Teardown::new(self.vm, self.ram))
    }
}
