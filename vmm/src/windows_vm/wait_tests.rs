use super::*;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Condvar, Mutex};

use arch::regs::{CpuidEntry, MsrEntry, SpecialRegisters, StandardRegisters};
use devices::bus::Bus;
use devices::legacy::debug_exit::{DebugExit, DEBUG_EXIT_PORT, DEBUG_EXIT_PORT_LEN};

use crate::hypervisor::state::{SkippedState, VcpuState};
use crate::hypervisor::{HypervisorError, Result as HvResult, Vcpu, VcpuExit, VcpuSnapshot};

/// What a fake vCPU does in `run`.
#[derive(Clone, Copy)]
enum Script {
    /// Runs "guest code" until kicked, then returns `Interrupted`.
    SpinUntilKicked,
    /// After `n` runs, writes `code` to the debug-exit port.
    DebugExitAfter { n: u32, code: u8 },
    /// Fails its first run.
    Fail,
    /// Ignores kicks (a hypervisor that never hands the vCPU back).
    Stuck,
}

/// A kick flag a fake vCPU's run waits on.
#[derive(Default)]
struct KickLatch {
    kicked: Mutex<bool>,
    changed: Condvar,
    kicks: AtomicU32,
}

impl KickLatch {
    fn wait(&self, timeout: Duration) -> bool {
        let g = self.kicked.lock().unwrap();
        let (mut g, _) = self
            .changed
            .wait_timeout_while(g, timeout, |k| !*k)
            .unwrap();
        std::mem::replace(&mut *g, false)
    }
}

struct Kick(Arc<KickLatch>);

impl VcpuKick for Kick {
    fn kick(&self) -> std::io::Result<()> {
        self.0.kicks.fetch_add(1, Ordering::SeqCst);
        *self.0.kicked.lock().unwrap() = true;
        self.0.changed.notify_all();
        Ok(())
    }
}

struct FakeVcpu {
    script: Script,
    runs: u32,
    latch: Arc<KickLatch>,
    data: [u8; 1],
    release: Arc<AtomicBool>,
    /// Set once the `Stuck` vCPU is in its run (true from the start when there is none), so
    /// the debug exit comes after it.
    stuck_running: Arc<AtomicBool>,
}

impl VcpuSnapshot for FakeVcpu {
    fn save_state(&self) -> HvResult<(VcpuState, SkippedState)> {
        Err(HypervisorError::NotSupported("state of a fake vCPU"))
    }
    fn restore_state(&self, _: &VcpuState) -> HvResult<()> {
        Err(HypervisorError::NotSupported("state of a fake vCPU"))
    }
}

impl Vcpu for FakeVcpu {
    fn run(&mut self) -> HvResult<VcpuExit<'_>> {
        self.runs += 1;
        match self.script {
            Script::SpinUntilKicked => {
                while !self.latch.wait(Duration::from_secs(10)) {}
                Ok(VcpuExit::Interrupted)
            }
            Script::DebugExitAfter { n, code }
                if self.runs >= n && self.stuck_running.load(Ordering::SeqCst) =>
            {
                self.data = [code];
                Ok(VcpuExit::IoOut {
                    port: DEBUG_EXIT_PORT as u16,
                    data: &self.data,
                })
            }
            Script::DebugExitAfter { .. } => Ok(VcpuExit::Interrupted),
            Script::Fail => Err(HypervisorError::NotSupported("running this fake vCPU")),
            Script::Stuck => {
                self.stuck_running.store(true, Ordering::SeqCst);
                while !self.release.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(VcpuExit::Interrupted)
            }
        }
    }
    fn regs(&self) -> HvResult<StandardRegisters> {
        Ok(StandardRegisters {
            rip: 0xfff0,
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

struct Vm {
    exit: VmExitSignal,
    vcpus: Vec<(VcpuContext, Box<dyn VcpuKick>)>,
    latches: Vec<Arc<KickLatch>>,
    release: Arc<AtomicBool>,
}

/// A VM with the debug-exit port on its port bus and one fake vCPU per script.
fn vm(scripts: &[Script]) -> Vm {
    let exit = VmExitSignal::new().unwrap();
    let pio = Arc::new(Bus::new());
    pio.insert(
        Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
        DEBUG_EXIT_PORT,
        DEBUG_EXIT_PORT_LEN,
    )
    .unwrap();
    let mmio = Arc::new(Bus::new());
    let release = Arc::new(AtomicBool::new(false));
    let has_stuck = scripts.iter().any(|s| matches!(s, Script::Stuck));
    let stuck_running = Arc::new(AtomicBool::new(!has_stuck));
    let mut latches = Vec::new();
    let vcpus = scripts
        .iter()
        .enumerate()
        .map(|(i, &script)| {
            let index = i as u32;
            let latch = Arc::new(KickLatch::default());
            latches.push(latch.clone());
            let ctx = VcpuContext {
                index,
                vcpu: Box::new(FakeVcpu {
                    script,
                    runs: 0,
                    latch: latch.clone(),
                    data: [0],
                    release: release.clone(),
                    stuck_running: stuck_running.clone(),
                }),
                pio: pio.clone(),
                mmio: mmio.clone(),
                exit: exit.clone(),
                control: Arc::new(VcpuControl::new(index)),
            };
            (ctx, Box::new(Kick(latch)) as Box<dyn VcpuKick>)
        })
        .collect();
    Vm {
        exit,
        vcpus,
        latches,
        release,
    }
}

#[test]
fn a_debug_exit_on_one_vcpu_ends_the_vm_and_kicks_the_others_out() {
    let vm = vm(&[
        Script::SpinUntilKicked,
        Script::DebugExitAfter { n: 3, code: 7 },
        Script::SpinUntilKicked,
    ]);
    let end = VmWait::default().run(vm.vcpus, &vm.exit, Some(Duration::from_secs(30)));
    assert_eq!(
        end,
        VmEnd {
            end: GuestEnd::DebugExit(7),
            detail: None,
            stuck_vcpus: vec![]
        }
    );
    assert!(vm.latches[0].kicks.load(Ordering::SeqCst) >= 1);
    assert!(vm.latches[2].kicks.load(Ordering::SeqCst) >= 1);
}

#[test]
fn the_timeout_ends_a_vm_whose_vcpus_never_leave_on_their_own() {
    let vm = vm(&[Script::SpinUntilKicked, Script::SpinUntilKicked]);
    let started = Instant::now();
    let end = VmWait::default().run(vm.vcpus, &vm.exit, Some(Duration::from_millis(100)));
    assert_eq!(end.end, GuestEnd::Timeout);
    assert!(end.stuck_vcpus.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_stop_from_the_host_ends_the_vm_with_its_reason() {
    let vm = vm(&[Script::SpinUntilKicked]);
    let wait = VmWait::default();
    let stopper = wait.stopper();
    let stopping = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        stopper.stop(GuestEnd::HostSignal(2));
    });
    let end = wait.run(vm.vcpus, &vm.exit, None);
    stopping.join().unwrap();
    assert_eq!(end.end, GuestEnd::HostSignal(2));
    assert_eq!(vm.exit.reason(), Some(GuestEnd::HostSignal(2)));
}

#[test]
fn a_failing_vcpu_ends_the_vm_with_its_report() {
    let vm = vm(&[Script::SpinUntilKicked, Script::Fail]);
    let end = VmWait::default().run(vm.vcpus, &vm.exit, None);
    assert_eq!(end.end, GuestEnd::VmmError);
    let detail = end.detail.unwrap();
    assert!(
        detail.starts_with("vCPU 1: ") && detail.contains("running this fake vCPU"),
        "{detail}"
    );
}

#[test]
fn a_vcpu_that_ignores_kicks_is_reported_not_waited_for_forever() {
    let vm = vm(&[Script::DebugExitAfter { n: 1, code: 0 }, Script::Stuck]);
    let release = vm.release.clone();
    let end = VmWait::default().run(vm.vcpus, &vm.exit, None);
    release.store(true, Ordering::SeqCst);
    assert_eq!(end.end, GuestEnd::DebugExit(0));
    assert_eq!(end.stuck_vcpus, vec![1]);
}
