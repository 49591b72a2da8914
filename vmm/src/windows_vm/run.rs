//! skiff.exe's command: parse the command line, build the VM (`build`), run it to its end
//! (`wait`), and turn the end into the same exit codes and one-line verdicts as on Linux
//! (`exit_code`). Ctrl-C and Ctrl-Break stop the VM as SIGINT does on Linux (exit code 130);
//! closing the console, logging off or shutting down as SIGHUP (129). With `--serial stdio` and
//! a console on stdin, the console goes to raw input (no line editing, no echo; Ctrl-C still
//! stops skiff) and what is typed reaches COM1, as a terminal does on Linux.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::{Mutex, PoisonError};

use clap::Parser;
use devices::vm_exit::GuestEnd;
use windows::core::BOOL;
use windows::Win32::Foundation::HANDLE;
use windows::Win32::System::Console::{
    GetConsoleMode, GetStdHandle, SetConsoleCtrlHandler, SetConsoleMode, CONSOLE_MODE,
    CTRL_BREAK_EVENT, CTRL_C_EVENT, ENABLE_ECHO_INPUT, ENABLE_LINE_INPUT,
    ENABLE_VIRTUAL_TERMINAL_INPUT, STD_INPUT_HANDLE,
};

use super::args::{WindowsCli, WindowsCommand, WindowsVmConfig};
use super::build::{build_vm, load_guest_ram, remove_created_file, WindowsBuildError};
use super::serial_input::feed_serial;
use super::wait::{VmStopper, VmWait};
use crate::config::SerialConfig;
use crate::exit_code::{ExitReason, ExitStatus, HYPERVISOR_UNAVAILABLE};

/// SIGINT's number, for the verdict of a Ctrl-C or Ctrl-Break.
const SIGINT: i32 = 2;
/// SIGHUP's number, for the verdict of a closed console, a log-off or a shutdown.
const SIGHUP: i32 = 1;

/// Where the console control handler sends its stop while a VM runs.
static CONSOLE_STOP: Mutex<Option<VmStopper>> = Mutex::new(None);

/// skiff.exe's `main`.
pub fn main() -> ExitCode {
    log::set_max_level(match std::env::var("SKIFF_LOG").as_deref() {
        Ok("trace") => log::LevelFilter::Trace,
        Ok("debug") => log::LevelFilter::Debug,
        Ok("info") => log::LevelFilter::Info,
        Ok("error") => log::LevelFilter::Error,
        _ => log::LevelFilter::Warn,
    });
    let _ = log::set_logger(&StderrLogger);
    let argv: Vec<OsString> = std::env::args_os().collect();
    let cli = match WindowsCli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return finish(&ExitStatus::usage(usage_line(&e))),
    };
    let WindowsCommand::Run(args) = cli.command;
    finish(&run(&args.into_config()))
}

/// clap's error as one line, as on Linux.
fn usage_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let mut lines = rendered.lines().filter(|l| !l.trim().is_empty());
    let mut line = lines
        .next()
        .unwrap_or("invalid command line")
        .trim_start_matches("error: ")
        .to_string();
    if line.ends_with(':') {
        if let Some(next) = lines.next() {
            line = format!("{line} {}", next.trim());
        }
    }
    line
}

/// Builds and runs the VM `cfg` describes; its verdict.
pub fn run(cfg: &WindowsVmConfig) -> ExitStatus {
    let guest = match load_guest_ram(cfg) {
        Ok(guest) => guest,
        Err(e) => return build_error(&e),
    };
    let created = guest.ram.created_file();
    let vm = match build_vm(cfg, &guest) {
        Ok(vm) => vm,
        Err(e) => {
            drop(guest);
            remove_created_file(cfg, created);
            return build_error(&e);
        }
    };
    drop(guest);
    let wait = VmWait::default();
    *CONSOLE_STOP.lock().unwrap_or_else(PoisonError::into_inner) = Some(wait.stopper());
    // SAFETY: `on_console_ctrl` is a valid handler for the process's lifetime.
    if let Err(e) = unsafe { SetConsoleCtrlHandler(Some(on_console_ctrl), true) } {
        log::warn!("cannot handle Ctrl-C: {e}");
    }
    let exit = vm.exit.clone();
    let raw_console = if cfg.serial == SerialConfig::Stdio && std::io::stdin().is_terminal() {
        let raw = ConsoleRawMode::enable();
        let (serial, exit) = (vm.serial.clone(), exit.clone());
        let started = std::thread::Builder::new()
            .name("serial-input".into())
            .spawn(move || feed_serial(std::io::stdin(), &serial, &exit));
        if let Err(e) = started {
            log::warn!("cannot start the serial input thread: {e}");
        }
        raw
    } else {
        None
    };
    let mut vm = vm;
    let vcpus = std::mem::take(&mut vm.vcpus);
    let end = wait.run(vcpus, &exit, cfg.timeout);
    CONSOLE_STOP
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    drop(raw_console);
    if !end.stuck_vcpus.is_empty() {
        log::warn!(
            "vCPUs {:?} did not leave their run; skiff ends without them",
            end.stuck_vcpus
        );
        // The partition cannot go while a vCPU may still run in it.
        std::mem::forget(vm);
    } else {
        drop(vm.into_ram());
    }
    ExitStatus::from_end(end.end, end.detail, 0, None)
}

fn build_error(e: &WindowsBuildError) -> ExitStatus {
    let mut status = ExitStatus::error(crate::error_chain(e));
    if matches!(e, WindowsBuildError::Unavailable(_)) {
        status.code = HYPERVISOR_UNAVAILABLE;
        status.reason = ExitReason::Error;
    }
    status
}

/// The console's Ctrl-C, Ctrl-Break, close, log-off and shutdown events stop the VM.
unsafe extern "system" fn on_console_ctrl(event: u32) -> BOOL {
    let signal = if event == CTRL_C_EVENT || event == CTRL_BREAK_EVENT {
        SIGINT
    } else {
        SIGHUP
    };
    match CONSOLE_STOP
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
    {
        Some(stopper) => {
            stopper.stop(GuestEnd::HostSignal(signal));
            BOOL::from(true)
        }
        None => BOOL::from(false),
    }
}

/// The console's input mode while a VM reads it: no line editing or echo, VT input sequences
/// (arrow keys as the guest's terminal expects them); Ctrl-C stays a stop. Restored on drop.
struct ConsoleRawMode {
    handle: HANDLE,
    saved: CONSOLE_MODE,
}

impl ConsoleRawMode {
    fn enable() -> Option<Self> {
        // SAFETY: GetStdHandle only returns this process's standard input handle.
        let handle = unsafe { GetStdHandle(STD_INPUT_HANDLE) }.ok()?;
        let mut saved = CONSOLE_MODE(0);
        // SAFETY: `handle` is the console input handle and `saved` is writable.
        unsafe { GetConsoleMode(handle, &mut saved) }.ok()?;
        let raw =
            (saved & !(ENABLE_LINE_INPUT | ENABLE_ECHO_INPUT)) | ENABLE_VIRTUAL_TERMINAL_INPUT;
        // SAFETY: as above; only the mode bits of this console change.
        if let Err(e) = unsafe { SetConsoleMode(handle, raw) } {
            log::warn!("cannot put the console in raw input mode: {e}");
            return None;
        }
        Some(Self { handle, saved })
    }
}

impl Drop for ConsoleRawMode {
    fn drop(&mut self) {
        // SAFETY: the handle is still this process's console input; the mode is the one read.
        if let Err(e) = unsafe { SetConsoleMode(self.handle, self.saved) } {
            log::warn!("cannot restore the console's input mode: {e}");
        }
    }
}

/// Log records as `skiff: LEVEL: message` lines on stderr (`SKIFF_LOG` sets the level).
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let level = record.level().as_str().to_lowercase();
            eprintln!("skiff: {level}: {}", record.args());
        }
    }

    fn flush(&self) {}
}

/// Prints the verdict line (if any) and returns the exit code.
fn finish(status: &ExitStatus) -> ExitCode {
    if let Some(line) = status.stderr_line() {
        eprintln!("skiff: {line}");
    }
    let _ = std::io::Write::flush(&mut std::io::stdout());
    ExitCode::from(status.code)
}
