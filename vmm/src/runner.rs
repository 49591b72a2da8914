//! Runs a built VM to its end: one thread per vCPU (`RunningVm`), the event loop on the calling
//! thread, the `--timeout` deadline, the control API when `--api-socket` is given, then stopping
//! and joining every vCPU and reporting how the guest ended.
//!
//! Control requests are parsed by the API subscriber during an event-loop turn and acted on here
//! between turns; a snapshot's memory write runs on its own thread and wakes the loop when done,
//! so the loop keeps answering (status, a refused second snapshot, shutdown) meanwhile. A
//! `POST /vm/exec` is admitted here and run by a worker thread (`api::exec_worker`), which
//! answers it itself.

use std::io;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use devices::vm_exit::GuestEnd;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::api::exec_worker::{ExecWorkers, END_PATIENCE};
use crate::api::server::{ApiServer, ServerError, Token};
use crate::api::Route;
use crate::builder::{BuiltVm, VirtioFunctions};
use crate::config::SerialConfig;
use crate::event_loop::{block_stop_signals, ExitWatcher, SerialInput, StopSignals};
use crate::guest_output::{OutputReport, DRAIN_LIMIT};
use crate::running_vm::RunningVm;
use crate::sandbox::{SandboxError, SandboxPaths};
use crate::snapshot::manifest::VmDescription;
use crate::teardown::Teardown;
use crate::terminal::RawModeGuard;

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
    /// The control socket could not be created.
    #[error(transparent)]
    Api(#[from] ServerError),
    /// The main thread could not be confined.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

/// How the run ended.
#[derive(Debug)]
pub struct RunOutcome {
    /// The recorded end.
    pub end: GuestEnd,
    /// A vCPU's description of an abnormal end, if one gave it.
    pub detail: Option<String>,
    /// Guest output that never reached its sink.
    pub output: OutputReport,
    /// The stopped VM and its memory, for the caller to tear down.
    pub teardown: Teardown,
}

/// How to run a VM besides the VM itself.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Serial port mode (stdin feeds the guest for `stdio` on a terminal).
    pub serial: SerialConfig,
    /// End the guest after this long.
    pub timeout: Option<Duration>,
    /// Serve the control API on this Unix socket.
    pub api_socket: Option<PathBuf>,
    /// The VM's configuration as given, for snapshot manifests.
    pub description: VmDescription,
    /// What `--sandbox` lets the running VM reach.
    pub sandbox_paths: SandboxPaths,
}

fn vcpu_kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_vcpu_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only there to make KVM_RUN return EINTR.
}

/// Drains an eventfd whose only job is to wake the loop (a snapshot write that ended).
#[derive(Debug)]
struct Wakeup(EventFd);

impl MutEventSubscriber for Wakeup {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("cannot watch the snapshot completion event: {e:?}");
        }
    }
}

/// Runs `vm` until it ends (guest exit, error, signal, `timeout` or a control request).
pub fn run_vm(mut vm: BuiltVm, opts: &RunOptions) -> Result<RunOutcome, RunError> {
    let ev_err = RunError::EventLoop;
    block_stop_signals().map_err(ev_err)?;
    register_signal_handler(vcpu_kick_signal(), on_vcpu_kick)
        .map_err(|e| RunError::EventLoop(io::Error::from_raw_os_error(e.errno())))?;

    // The builder made the loop its devices will register their handlers with.
    let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> = match vm.events.take()
    {
        Some(events) => events,
        None => EventManager::new()
            .map_err(|e| RunError::EventLoop(io::Error::other(format!("{e:?}"))))?,
    };
    events.add_subscriber(Arc::new(Mutex::new(ExitWatcher::new(vm.exit.clone()))));
    events.add_subscriber(Arc::new(Mutex::new(
        StopSignals::new(vm.exit.clone()).map_err(ev_err)?,
    )));
    // The socket before the vCPUs: a path that cannot be served fails the start, not the run.
    let api = match &opts.api_socket {
        Some(path) => {
            let server = Arc::new(Mutex::new(ApiServer::bind(path)?));
            events.add_subscriber(server.clone());
            Some(server)
        }
        None => None,
    };

    // Host terminal input goes to the guest only when stdin is a terminal: to the virtio
    // console with `--console`, else to the serial port with `--serial stdio`.
    let console_input = vm.console_input.take();
    let stdin = io::stdin();
    let raw_mode = match (&console_input, &opts.serial) {
        (Some(_), _) | (None, SerialConfig::Stdio) => {
            RawModeGuard::enable(stdin.as_fd()).map_err(ev_err)?
        }
        _ => None,
    };
    let serial_input = raw_mode.as_ref().map(|_| {
        let input = match console_input {
            Some(console) => SerialInput::for_console(console),
            None => SerialInput::new(vm.serial.clone()),
        };
        let input = Arc::new(Mutex::new(input));
        events.add_subscriber(input.clone());
        input
    });

    // The output sinks outlive the devices that write into them: the runner drains and
    // reports them at the end.
    let outputs = std::mem::take(&mut vm.outputs);
    let output_dropped = outputs.dropped_counter();
    let exec_workers = ExecWorkers::new(vsock_socket(&vm.virtio), vm.exit.clone());
    // Devices a restore activated join the loop now (their `init` runs: a restored vsock device
    // announces its transport reset), before the vCPUs: otherwise a guest that polls its rings
    // spins on them unanswered until this thread gets a core, which on a busy host can be a
    // scheduler tick or more.
    if let Err(e) = events.run_with_timeout(0) {
        log::error!("event loop failed: {e:?}");
        vm.exit.request(GuestEnd::VmmError);
    }
    let mut running = RunningVm::start(vm, opts.description.clone())
        .map_err(|(index, source)| RunError::Spawn { index, source })?;
    let exit = running.exit().clone();
    if let Ok(fd) = running.job_done_event().try_clone() {
        events.add_subscriber(Arc::new(Mutex::new(Wakeup(fd))));
    }
    // Set-up is over: from here the main thread only runs the loop (see `sandbox`). A vCPU
    // thread reads the host's KVM facts for a snapshot, so they are read now, while files may
    // still be opened.
    if let Err(e) = crate::hypervisor::kvm::read_host_facts() {
        log::debug!("reading the host's KVM facts early: {e}");
    }
    if let Err(e) = crate::sandbox::confine_main_thread(&opts.sandbox_paths) {
        exit.request(GuestEnd::VmmError);
        let _ = running.stop();
        return Err(e.into());
    }
    // The request whose answer waits for the snapshot write.
    let mut snapshot_token: Option<Token> = None;

    let deadline = opts.timeout.map(|t| Instant::now() + t);
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
            let mut input = input.lock().unwrap_or_else(PoisonError::into_inner);
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
        if let Some(api) = &api {
            let mut api = api.lock().unwrap_or_else(PoisonError::into_inner);
            let control = Control {
                snapshot_token: &mut snapshot_token,
                output_dropped: &output_dropped,
                exec_workers: &exec_workers,
            };
            serve_requests(&mut api, &mut running, control);
        }
    }

    // The loop first: a vCPU thread waiting for it (a device activating through
    // `call_blocking`) is released with an error instead of blocking the stop forever.
    drop(events);
    let (detail, cancelled, teardown) = running.stop();
    if let (Some(api), Some(token), Some(msg)) = (&api, snapshot_token, cancelled) {
        let mut api = api.lock().unwrap_or_else(PoisonError::into_inner);
        api.respond(token, 500, &crate::api::http::error_body(&msg));
    }
    drop(api);
    // The exec workers saw the end and answer 503; give them a moment to write it.
    let left = exec_workers.wait_idle(END_PATIENCE);
    if left > 0 {
        log::warn!("control socket: {left} exec request(s) still running at exit");
    }
    drop(raw_mode);
    // The counts of the guest-caused warnings that were not shown, one line per device and kind.
    devices::guest_warnings::summarize_all();
    // Bounded: a sink nobody drains costs at most DRAIN_LIMIT, and what is left is counted.
    let output = outputs.finish(DRAIN_LIMIT);
    Ok(RunOutcome {
        end: exit.reason().unwrap_or(GuestEnd::VmmError),
        detail,
        output,
        teardown,
    })
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| crate::api::http::error_body(&e.to_string()))
}

/// The VM's vsock socket (`--vsock ...,socket=PATH`, or a restore's), if it has a vsock
/// device: where `POST /vm/exec` reaches the agent.
fn vsock_socket(virtio: &VirtioFunctions) -> Option<PathBuf> {
    virtio.iter().find_map(|f| {
        let f = f.lock().unwrap_or_else(PoisonError::into_inner);
        f.device()
            .as_any()
            .downcast_ref::<devices::virtio::vsock::VirtioVsock>()
            .map(|v| v.socket().to_path_buf())
    })
}

/// What `serve_requests` keeps between turns besides the server and the VM.
struct Control<'a> {
    /// The request whose answer waits for the snapshot write.
    snapshot_token: &'a mut Option<Token>,
    output_dropped: &'a AtomicU64,
    exec_workers: &'a ExecWorkers,
}

/// Acts on the queued control requests and on a finished snapshot write.
fn serve_requests(api: &mut ApiServer, vm: &mut RunningVm, control: Control<'_>) {
    use crate::api::http::error_body;
    let Control {
        snapshot_token,
        output_dropped,
        exec_workers,
    } = control;
    for (token, route) in api.take_requests() {
        let answer = match route {
            Route::Status => {
                let mut status = vm.status();
                status.guest_output_dropped_bytes = output_dropped.load(Ordering::Relaxed);
                Ok(json(&status))
            }
            Route::SnapshotProgress => Ok(json(&vm.snapshot_progress())),
            Route::Pause => vm.pause().map(|d| {
                json(&serde_json::json!({
                    "state": "paused",
                    "pause_ms": d.as_secs_f64() * 1000.0,
                }))
            }),
            Route::Resume => vm
                .resume()
                .map(|()| json(&serde_json::json!({ "state": "running" }))),
            Route::Shutdown => {
                vm.exit().request(GuestEnd::Stopped);
                Ok(json(&serde_json::json!({ "state": "stopping" })))
            }
            Route::Snapshot(req) => match vm.start_snapshot(req) {
                Ok(()) => {
                    *snapshot_token = Some(token);
                    continue;
                }
                Err(e) => Err(e),
            },
            Route::Exec(req) => {
                match exec_workers.admit(vm.is_paused()) {
                    Ok(slot) => {
                        if let Some(client) = api.take_connection(token) {
                            exec_workers.spawn(slot, client, req);
                        }
                    }
                    Err((status, msg)) => api.respond(token, status, &error_body(&msg)),
                }
                continue;
            }
        };
        match answer {
            Ok(body) => api.respond(token, 200, &body),
            Err(e) => api.respond(token, e.status(), &error_body(&e.to_string())),
        }
    }
    if let Some(done) = vm.finish_snapshot() {
        let Some(token) = snapshot_token.take() else {
            return;
        };
        match done {
            Ok(summary) => {
                log::info!(
                    "snapshot {} written: {} bytes in {:.1} ms",
                    summary.dir.display(),
                    summary.bytes_written,
                    summary.time_ms
                );
                api.respond(token, 200, &json(&summary));
            }
            Err(e) => api.respond(token, e.status(), &error_body(&e.to_string())),
        }
    }
}
