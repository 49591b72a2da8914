//! Runs a built VM to its end: one thread per vCPU, the event loop on the calling thread, the
//! `--timeout` deadline, then stopping and joining every vCPU and reporting how the guest ended.

use std::io;
use std::os::fd::AsFd;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use devices::vm_exit::GuestEnd;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use std::sync::{Arc, Mutex};
use thiserror::Error;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::builder::BuiltVm;
use crate::config::SerialConfig;
use crate::event_loop::{block_stop_signals, ExitWatcher, SerialInput, StopSignals};
use crate::teardown::Teardown;
use crate::terminal::RawModeGuard;
use crate::vcpu::{run_vcpu, VcpuContext};

/// How often a stopping vCPU thread is signalled again until it leaves `KVM_RUN`.
const KICK_INTERVAL: Duration = Duration::from_millis(1);
/// Retry period for serial input waiting on a full UART FIFO.
const INPUT_RETRY_MS: i32 = 10;

/// Errors from running the VM.
#[derive(Debug, Error)]
pub enum RunError {
    /// Setting up the event loop failed.
    #[error("cannot set up the event loop")]
    EventLoop(#[source] io::Error),
    /// Spawning a vCPU thread failed.
    #[error("cannot start the thread for vCPU {index}")]
    Spawn {
        /// vCPU index.
        index: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// How the run ended.
#[derive(Debug)]
pub struct RunOutcome {
    /// The recorded end.
    pub end: GuestEnd,
    /// A vCPU's description of an abnormal end, if one gave it.
    pub detail: Option<String>,
    /// The stopped VM and its memory, for the caller to tear down.
    pub teardown: Teardown,
}

fn vcpu_kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_vcpu_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only there to make KVM_RUN return EINTR.
}

/// Runs `vm` until it ends (guest exit, error, signal or `timeout`).
pub fn run_vm(
    vm: BuiltVm,
    serial_cfg: &SerialConfig,
    timeout: Option<Duration>,
) -> Result<RunOutcome, RunError> {
    let ev_err = RunError::EventLoop;
    block_stop_signals().map_err(ev_err)?;
    register_signal_handler(vcpu_kick_signal(), on_vcpu_kick)
        .map_err(|e| RunError::EventLoop(io::Error::from_raw_os_error(e.errno())))?;

    let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| RunError::EventLoop(io::Error::other(format!("{e:?}"))))?;
    events.add_subscriber(Arc::new(Mutex::new(ExitWatcher::new(vm.exit.clone()))));
    events.add_subscriber(Arc::new(Mutex::new(
        StopSignals::new(vm.exit.clone()).map_err(ev_err)?,
    )));

    // Host terminal input goes to the guest only when stdin is a terminal.
    let stdin = io::stdin();
    let raw_mode = match serial_cfg {
        SerialConfig::Stdio => RawModeGuard::enable(stdin.as_fd()).map_err(ev_err)?,
        _ => None,
    };
    let serial_input = raw_mode.as_ref().map(|_| {
        let input = Arc::new(Mutex::new(SerialInput::new(vm.serial.clone())));
        events.add_subscriber(input.clone());
        input
    });

    let BuiltVm {
        ram,
        vm: hypervisor_vm,
        vcpus,
        pio,
        mmio,
        exit,
        serial: _serial,
    } = vm;

    let mut threads: Vec<JoinHandle<Option<String>>> = Vec::with_capacity(vcpus.len());
    for (index, vcpu) in (0u32..).zip(vcpus) {
        let ctx = VcpuContext {
            index,
            vcpu,
            pio: pio.clone(),
            mmio: mmio.clone(),
            exit: exit.clone(),
        };
        let spawned = thread::Builder::new()
            .name(format!("skiff-vcpu{index}"))
            .spawn(move || run_vcpu(ctx));
        match spawned {
            Ok(handle) => threads.push(handle),
            Err(source) => {
                exit.request(GuestEnd::VmmError);
                stop_vcpus(&mut threads);
                return Err(RunError::Spawn { index, source });
            }
        }
    }

    let deadline = timeout.map(|t| Instant::now() + t);
    while !exit.is_requested() {
        let mut wait_ms = -1;
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                exit.request(GuestEnd::Timeout);
                break;
            }
            wait_ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
        }
        if let Some(input) = &serial_input {
            let mut input = input
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            input.flush_pending();
            if input.has_pending() {
                wait_ms = if wait_ms < 0 {
                    INPUT_RETRY_MS
                } else {
                    wait_ms.min(INPUT_RETRY_MS)
                };
            }
        }
        if let Err(e) = events.run_with_timeout(wait_ms) {
            log::error!("event loop failed: {e:?}");
            exit.request(GuestEnd::VmmError);
        }
    }

    let detail = stop_vcpus(&mut threads);
    drop(raw_mode);
    Ok(RunOutcome {
        end: exit.reason().unwrap_or(GuestEnd::VmmError),
        detail,
        teardown: Teardown::new(hypervisor_vm, ram),
    })
}

/// Kicks every vCPU thread out of `KVM_RUN` until it returns, joins them all, and returns the
/// first abnormal-end description any of them gave.
fn stop_vcpus(threads: &mut Vec<JoinHandle<Option<String>>>) -> Option<String> {
    let mut detail = None;
    for handle in threads.drain(..) {
        // A signal sent just before the thread enters KVM_RUN is lost, so keep kicking.
        while !handle.is_finished() {
            let _ = handle.kill(vcpu_kick_signal());
            thread::sleep(KICK_INTERVAL);
        }
        match handle.join() {
            Ok(d) => detail = detail.or(d),
            Err(_) => detail = detail.or(Some("a vCPU thread panicked".into())),
        }
    }
    detail
}
