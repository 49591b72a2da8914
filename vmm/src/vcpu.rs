//! The vCPU thread: `KVM_RUN`, dispatch each port or MMIO exit to its bus, repeat until the VM
//! ends. Handlers are short and never block; anything that ends the guest is recorded in the
//! shared `VmExitSignal`, which also stops every other vCPU.
//!
//! Each thread also shares a `VcpuControl` with the runner: a pause request parks the thread
//! outside `KVM_RUN` (the runner kicks it out with a signal), and while it is parked the runner
//! can hand it work that must run on the vCPU (saving or restoring its state). A VM end
//! requested while parked wakes the thread, which then returns.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use devices::bus::Bus;
use devices::vm_exit::{GuestEnd, VmExitSignal};

use crate::hypervisor::{Vcpu, VcpuExit};

/// Everything one vCPU thread owns or shares.
pub struct VcpuContext {
    /// vCPU number (also its APIC ID).
    pub index: u32,
    /// The hypervisor vCPU.
    pub vcpu: Box<dyn Vcpu>,
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where the guest's end is recorded.
    pub exit: VmExitSignal,
    /// Pause requests and work from the runner.
    pub control: Arc<VcpuControl>,
}

impl std::fmt::Debug for VcpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuContext")
            .field("index", &self.index)
            .finish()
    }
}

/// Runs the vCPU until the VM ends. Returns a one-line description when this vCPU ended the VM
/// abnormally (triple fault, internal error, hypervisor failure), for the final report.
pub fn run_vcpu(mut ctx: VcpuContext) -> Option<String> {
    let index = ctx.index;
    let control = ctx.control.clone();
    let _finish = FinishOnDrop(&control);
    while !ctx.exit.is_requested() {
        if ctx.control.pause_requested() {
            ctx.control.park(&mut *ctx.vcpu, &ctx.exit);
            continue;
        }
        let end = match ctx.vcpu.run() {
            Ok(VcpuExit::IoIn { port, data }) => {
                ctx.pio.read(u64::from(port), data);
                continue;
            }
            Ok(VcpuExit::IoOut { port, data }) => {
                ctx.pio.write(u64::from(port), data);
                continue;
            }
            Ok(VcpuExit::MmioRead { address, data }) => {
                ctx.mmio.read(address, data);
                continue;
            }
            Ok(VcpuExit::MmioWrite { address, data }) => {
                ctx.mmio.write(address, data);
                continue;
            }
            Ok(VcpuExit::Interrupted) => continue,
            Ok(VcpuExit::SystemReset) => (GuestEnd::Reset, None),
            Ok(VcpuExit::SystemPowerOff) => (GuestEnd::PowerOff, None),
            Ok(VcpuExit::Shutdown) => (
                GuestEnd::TripleFault { vcpu: index },
                Some(format!("vCPU {index} triple-faulted{}", at_rip(&*ctx.vcpu))),
            ),
            Ok(VcpuExit::InternalError) => {
                let (suberror, text) = ctx.vcpu.internal_error_info();
                (
                    GuestEnd::InternalError {
                        vcpu: index,
                        suberror,
                    },
                    Some(format!(
                        "vCPU {index}: KVM internal error: {text}{}",
                        at_rip(&*ctx.vcpu)
                    )),
                )
            }
            Ok(VcpuExit::FailEntry { reason }) => (
                GuestEnd::InternalError {
                    vcpu: index,
                    suberror: 0,
                },
                Some(format!(
                    "vCPU {index}: VM entry failed (hardware reason {reason:#x})"
                )),
            ),
            Ok(VcpuExit::Halt) => (
                GuestEnd::VmmError,
                Some(format!("vCPU {index} halted with no irqchip to wake it")),
            ),
            Ok(VcpuExit::Unhandled(what)) => (
                GuestEnd::VmmError,
                Some(format!("vCPU {index}: unhandled exit {what}")),
            ),
            Err(e) => (
                GuestEnd::VmmError,
                Some(format!("vCPU {index}: {}", crate::error_chain(&e))),
            ),
        };
        ctx.exit.request(end.0);
        return end.1;
    }
    None
}

fn at_rip(vcpu: &dyn Vcpu) -> String {
    vcpu.regs()
        .map(|r| format!(" at rip {:#x}", r.rip))
        .unwrap_or_default()
}

/// Work handed to a parked vCPU thread.
type VcpuWork = Box<dyn FnOnce(&mut dyn Vcpu) + Send>;

/// Errors from asking a vCPU thread to do something.
#[derive(Debug, thiserror::Error)]
pub enum VcpuControlError {
    /// The vCPU is not parked.
    #[error("vCPU {0} is not paused")]
    NotPaused(u32),
    /// The vCPU thread ended (the VM is ending) before it did the work.
    #[error("vCPU {0} stopped before it could do the requested work")]
    Gone(u32),
    /// The vCPU thread did not answer in time.
    #[error("vCPU {index} did not answer within {waited:?}")]
    Timeout {
        /// The vCPU.
        index: u32,
        /// How long the caller waited.
        waited: Duration,
    },
}

#[derive(Default)]
struct ControlState {
    /// The thread is parked and will take work.
    parked: bool,
    /// The thread has returned (or is about to).
    finished: bool,
    work: Option<VcpuWork>,
}

/// What the runner and one vCPU thread share: a pause flag and a mailbox for work that must run
/// on the vCPU while it is parked.
pub struct VcpuControl {
    index: u32,
    pause: AtomicBool,
    state: Mutex<ControlState>,
    changed: Condvar,
}

impl std::fmt::Debug for VcpuControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuControl")
            .field("index", &self.index)
            .field("pause", &self.pause.load(Ordering::Relaxed))
            .finish()
    }
}

/// How long a parked thread sleeps before it looks at the VM-end flag again, in case the
/// wake-up that should have told it was missed.
const PARK_RECHECK: Duration = Duration::from_millis(50);

impl VcpuControl {
    /// The control block for vCPU `index`, initially not paused.
    pub fn new(index: u32) -> Self {
        Self {
            index,
            pause: AtomicBool::new(false),
            state: Mutex::new(ControlState::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a pause is requested (checked by the vCPU thread before each `KVM_RUN`).
    pub fn pause_requested(&self) -> bool {
        self.pause.load(Ordering::Acquire)
    }

    /// Asks the thread to park. The caller must also kick it out of `KVM_RUN`.
    pub fn request_pause(&self) {
        self.pause.store(true, Ordering::Release);
    }

    /// Whether the thread is parked (or has finished, which is as good for the caller).
    pub fn is_parked(&self) -> bool {
        let s = self.lock();
        s.parked || s.finished
    }

    /// Waits up to `timeout` for the thread to park or finish; returns whether it did.
    pub fn wait_parked(&self, timeout: Duration) -> bool {
        let s = self.lock();
        let (s, _) = self
            .changed
            .wait_timeout_while(s, timeout, |s| !s.parked && !s.finished)
            .unwrap_or_else(PoisonError::into_inner);
        s.parked || s.finished
    }

    /// Releases a parked thread back into `KVM_RUN`.
    pub fn resume(&self) {
        self.pause.store(false, Ordering::Release);
        let _s = self.lock();
        self.changed.notify_all();
    }

    /// Wakes a parked thread so it notices that the VM is ending.
    pub fn wake(&self) {
        let _s = self.lock();
        self.changed.notify_all();
    }

    /// Runs `f` on the parked vCPU thread and returns its result, waiting at most `timeout`.
    pub fn run_on_vcpu<R: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&mut dyn Vcpu) -> R + Send + 'static,
    ) -> Result<R, VcpuControlError> {
        let (tx, rx) = sync_channel(1);
        {
            let mut s = self.lock();
            if s.finished {
                return Err(VcpuControlError::Gone(self.index));
            }
            if !s.parked {
                return Err(VcpuControlError::NotPaused(self.index));
            }
            s.work = Some(Box::new(move |vcpu: &mut dyn Vcpu| {
                let _ = tx.send(f(vcpu));
            }));
            self.changed.notify_all();
        }
        match rx.recv_timeout(timeout) {
            Ok(r) => Ok(r),
            // The thread dropped the work unrun: it is leaving.
            Err(RecvTimeoutError::Disconnected) => Err(VcpuControlError::Gone(self.index)),
            Err(RecvTimeoutError::Timeout) => {
                self.lock().work = None;
                Err(VcpuControlError::Timeout {
                    index: self.index,
                    waited: timeout,
                })
            }
        }
    }

    /// On the vCPU thread: stays parked, running handed-in work, until resumed or the VM ends.
    fn park(&self, vcpu: &mut dyn Vcpu, exit: &VmExitSignal) {
        let mut s = self.lock();
        s.parked = true;
        self.changed.notify_all();
        loop {
            if exit.is_requested() {
                break;
            }
            if let Some(work) = s.work.take() {
                drop(s);
                work(vcpu);
                s = self.lock();
                continue;
            }
            if !self.pause_requested() {
                break;
            }
            s = self
                .changed
                .wait_timeout(s, PARK_RECHECK)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        s.parked = false;
        // Work that arrived too late is dropped, which tells its sender the thread left.
        s.work = None;
        self.changed.notify_all();
    }

    /// On the vCPU thread, as it returns: nothing more will be parked or run.
    fn finish(&self) {
        let mut s = self.lock();
        s.finished = true;
        s.parked = false;
        s.work = None;
        self.changed.notify_all();
    }
}

/// Marks the control block finished when the vCPU thread leaves `run_vcpu`, however it leaves.
struct FinishOnDrop<'a>(&'a VcpuControl);

impl Drop for FinishOnDrop<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use arch::regs::{CpuidEntry, MsrEntry, SpecialRegisters, StandardRegisters};

    use crate::hypervisor::state::{SkippedState, VcpuState};
    use crate::hypervisor::{Result as HvResult, VcpuSnapshot};

    /// A vCPU that is always interrupted at once, so the loop spins through pause checks.
    struct IdleVcpu;

    impl VcpuSnapshot for IdleVcpu {
        fn save_state(&self) -> HvResult<(VcpuState, SkippedState)> {
            // These tests never save state; an error makes any accidental use visible.
            Err(crate::hypervisor::HypervisorError::MissingCapability(
                "state save in the idle test vCPU",
            ))
        }
        fn restore_state(&self, _: &VcpuState) -> HvResult<()> {
            Ok(())
        }
    }

    impl Vcpu for IdleVcpu {
        fn run(&mut self) -> HvResult<VcpuExit<'_>> {
            std::thread::sleep(Duration::from_micros(200));
            Ok(VcpuExit::Interrupted)
        }
        fn regs(&self) -> HvResult<StandardRegisters> {
            Ok(StandardRegisters {
                rip: 0x1234,
                ..Default::default()
            })
        }
        fn set_regs(&self, _: &StandardRegisters) -> HvResult<()> {
            Ok(())
        }
        fn sregs(&self) -> HvResult<SpecialRegisters> {
            Ok(SpecialRegisters::default())
        }
        fn set_sregs(&self, _: &SpecialRegisters) -> HvResult<()> {
            Ok(())
        }
        fn set_cpuid(&self, _: &[CpuidEntry]) -> HvResult<()> {
            Ok(())
        }
        fn set_msrs(&self, _: &[MsrEntry]) -> HvResult<()> {
            Ok(())
        }
        fn reset_fpu(&self) -> HvResult<()> {
            Ok(())
        }
        fn internal_error_info(&mut self) -> (u32, String) {
            (0, String::new())
        }
        fn setup_lapic_lint(&self) -> HvResult<()> {
            Ok(())
        }
    }

    fn start() -> (
        Arc<VcpuControl>,
        VmExitSignal,
        std::thread::JoinHandle<Option<String>>,
    ) {
        let control = Arc::new(VcpuControl::new(0));
        let exit = VmExitSignal::new().unwrap();
        let ctx = VcpuContext {
            index: 0,
            vcpu: Box::new(IdleVcpu),
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
            exit: exit.clone(),
            control: control.clone(),
        };
        (control, exit, std::thread::spawn(move || run_vcpu(ctx)))
    }

    const WAIT: Duration = Duration::from_secs(5);

    #[test]
    fn pause_runs_work_on_the_vcpu_thread_and_resume_releases_it() {
        let (control, exit, thread) = start();
        let err = control.run_on_vcpu(WAIT, |v| v.regs().unwrap().rip);
        assert!(
            matches!(err, Err(VcpuControlError::NotPaused(0))),
            "{err:?}"
        );
        control.request_pause();
        assert!(control.wait_parked(WAIT));
        let caller = std::thread::current().id();
        let (rip, on_other_thread) = control
            .run_on_vcpu(WAIT, move |v| {
                (v.regs().unwrap().rip, std::thread::current().id() != caller)
            })
            .unwrap();
        assert_eq!(rip, 0x1234);
        assert!(on_other_thread, "work must run on the vCPU thread");
        control.resume();
        let deadline = std::time::Instant::now() + WAIT;
        while control.is_parked() {
            assert!(
                std::time::Instant::now() < deadline,
                "vCPU never left the park"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        exit.request(GuestEnd::PowerOff);
        assert_eq!(thread.join().unwrap(), None);
        assert!(matches!(
            control.run_on_vcpu(WAIT, |_| ()),
            Err(VcpuControlError::Gone(0))
        ));
    }

    #[test]
    fn vm_end_while_paused_ends_the_thread() {
        let (control, exit, thread) = start();
        control.request_pause();
        assert!(control.wait_parked(WAIT));
        exit.request(GuestEnd::Stopped);
        control.wake();
        assert_eq!(thread.join().unwrap(), None);
        assert!(control.is_parked(), "a finished thread counts as parked");
    }
}
