//! Running a built VM to its end without an event loop: one thread per vCPU runs the shared run
//! loop (`vcpu::run_vcpu`), and the caller's thread waits on a channel for the first of: a vCPU
//! leaving its loop (the guest ended: debug exit, power off, reset, triple fault, an error), a
//! stop from the host (`VmStopper`: Ctrl-C on Windows), or the timeout. It then records why
//! the VM ended (first request wins, as on Linux), kicks every vCPU out of its run until all
//! have left, and joins them.
//!
//! A kick is hypervisor-specific (`VcpuKick`: `WHvCancelRunVirtualProcessor` on WHP). It is
//! repeated every `KICK_INTERVAL` until the vCPU has left, because a kick that lands between
//! the vCPU's check of the end flag and its next run is lost on some hypervisors.
//!
//! Platform-neutral; tested on Linux against fake vCPUs.

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::vm_exit::{GuestEnd, VmExitSignal};

use crate::vcpu::{run_vcpu, VcpuContext, VcpuControl};

/// How often vCPUs that have not left yet are kicked again.
const KICK_INTERVAL: Duration = Duration::from_millis(10);
/// How long the vCPUs get to leave once kicked; past that skiff reports the end without them.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Forces one vCPU out of its current run (the run loop then sees the VM's end).
pub trait VcpuKick: Send + Sync {
    /// Kicks the vCPU; a vCPU that is not running leaves at its next check.
    fn kick(&self) -> std::io::Result<()>;
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEnd {
    /// Why.
    pub end: GuestEnd,
    /// The first vCPU's one-line report, when one ended the VM abnormally.
    pub detail: Option<String>,
    /// vCPUs that did not leave within `LEAVE_TIMEOUT` of the end (their threads are left
    /// behind; the process ends with skiff).
    pub stuck_vcpus: Vec<u32>,
}

enum WaitEvent {
    /// vCPU `index` left its run loop, with its report.
    Left(u32, Option<String>),
    /// The host asked the VM to stop.
    Stop(GuestEnd),
}

/// Sends a vCPU's report when its thread ends, however it ends (a panic included).
struct LeaveReport {
    index: u32,
    detail: Option<String>,
    tx: Sender<WaitEvent>,
}

impl Drop for LeaveReport {
    fn drop(&mut self) {
        let detail = if std::thread::panicking() {
            Some(format!("vCPU {} thread panicked", self.index))
        } else {
            self.detail.take()
        };
        let _ = self.tx.send(WaitEvent::Left(self.index, detail));
    }
}

/// Asks a running VM to stop (from any thread; a Ctrl-C handler on Windows).
#[derive(Debug, Clone)]
pub struct VmStopper(Sender<WaitEvent>);

impl std::fmt::Debug for WaitEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Left(index, _) => write!(f, "Left({index})"),
            Self::Stop(end) => write!(f, "Stop({end:?})"),
        }
    }
}

impl VmStopper {
    /// Ends the VM with `end` (unless it already ended otherwise).
    pub fn stop(&self, end: GuestEnd) {
        let _ = self.0.send(WaitEvent::Stop(end));
    }
}

/// The wait for one VM's end.
#[derive(Debug)]
pub struct VmWait {
    tx: Sender<WaitEvent>,
    rx: Receiver<WaitEvent>,
}

impl Default for VmWait {
    fn default() -> Self {
        let (tx, rx) = channel();
        Self { tx, rx }
    }
}

struct Running {
    index: u32,
    kick: Box<dyn VcpuKick>,
    control: Arc<VcpuControl>,
    thread: Option<JoinHandle<()>>,
    left: bool,
}

impl VmWait {
    /// A stopper for this VM, to hand to whatever may stop it from outside.
    pub fn stopper(&self) -> VmStopper {
        VmStopper(self.tx.clone())
    }

    /// Runs `vcpus` (each with its kick, same order) until the VM ends or `timeout` passes.
    pub fn run(
        self,
        vcpus: Vec<(VcpuContext, Box<dyn VcpuKick>)>,
        exit: &VmExitSignal,
        timeout: Option<Duration>,
    ) -> VmEnd {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut running = Vec::with_capacity(vcpus.len());
        let mut detail = None;
        for (ctx, kick) in vcpus {
            let index = ctx.index;
            let control = ctx.control.clone();
            let tx = self.tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    let mut report = LeaveReport {
                        index,
                        detail: None,
                        tx,
                    };
                    report.detail = run_vcpu(ctx);
                });
            match spawned {
                Ok(thread) => running.push(Running {
                    index,
                    kick,
                    control,
                    thread: Some(thread),
                    left: false,
                }),
                Err(e) => {
                    exit.request(GuestEnd::VmmError);
                    detail = Some(format!("cannot start the thread of vCPU {index}: {e}"));
                    break;
                }
            }
        }
        if detail.is_none() {
            match self.first_event(deadline) {
                WaitEvent::Left(index, report) => {
                    if let Some(r) = running.iter_mut().find(|r| r.index == index) {
                        r.left = true;
                    }
                    if !exit.is_requested() {
                        exit.request(GuestEnd::VmmError);
                    }
                    detail = report;
                }
                WaitEvent::Stop(end) => exit.request(end),
            }
        }
        self.stop_all(&mut running);
        VmEnd {
            end: exit.reason().unwrap_or(GuestEnd::VmmError),
            detail,
            stuck_vcpus: running
                .iter()
                .filter(|r| !r.left)
                .map(|r| r.index)
                .collect(),
        }
    }

    /// The first event, or a timeout stop at `deadline`.
    fn first_event(&self, deadline: Option<Instant>) -> WaitEvent {
        let received = match deadline {
            None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(d) => self
                .rx
                .recv_timeout(d.saturating_duration_since(Instant::now())),
        };
        match received {
            Ok(event) => event,
            // `self` holds a sender, so the channel never disconnects.
            Err(_) => WaitEvent::Stop(GuestEnd::Timeout),
        }
    }

    /// Kicks every vCPU that has not left until it has (or `LEAVE_TIMEOUT` passed) and joins
    /// the threads that left. Reports that come in now are the VM's end seen by the other
    /// vCPUs, not its cause, and are dropped.
    fn stop_all(&self, running: &mut [Running]) {
        let give_up = Instant::now() + LEAVE_TIMEOUT;
        while running.iter().any(|r| !r.left) && Instant::now() < give_up {
            for r in running.iter().filter(|r| !r.left) {
                // A parked vCPU (none on Windows yet) notices the end when woken.
                r.control.wake();
                if let Err(e) = r.kick.kick() {
                    log::warn!("cannot kick vCPU {}: {e}", r.index);
                }
            }
            match self.rx.recv_timeout(KICK_INTERVAL) {
                Ok(WaitEvent::Left(index, _)) => {
                    if let Some(r) = running.iter_mut().find(|r| r.index == index) {
                        r.left = true;
                    }
                }
                Ok(WaitEvent::Stop(_)) | Err(_) => {}
            }
        }
        for r in running.iter_mut().filter(|r| r.left) {
            if let Some(thread) = r.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
#[path = "wait_tests.rs"]
mod tests;
