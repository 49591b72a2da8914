//! The `skiff` command line: parses arguments into a `VmConfig`, builds and runs the VM, and
//! turns the outcome into a documented exit code with a one-line report on stderr.

#[cfg(target_os = "linux")]
mod cli {
    use std::ffi::OsString;
    use std::path::{Path, PathBuf};
    use std::process::ExitCode;
    use std::time::Duration;

    use clap::{Parser, Subcommand};
    use vmm::config::{
        parse_cpus, parse_timeout, DiskArg, MemoryArg, NetConfig, RngConfig, SerialConfig,
        VhostUserArg, VmConfig, DEFAULT_CMDLINE, DEFAULT_MEMORY,
    };
    use vmm::exit_code::ExitStatus;
    use vmm::exit_status_file;
    use vmm::memory::backing::BackingKind;
    use vmm::memory::MemoryConfig;

    /// skiff: a small, fast KVM virtual machine monitor.
    #[derive(Debug, Parser)]
    #[command(name = "skiff", version, about)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Debug, Subcommand)]
    enum Command {
        /// Boot a kernel and run the VM until the guest ends.
        Run(RunArgs),
        /// Restore a VM from a snapshot directory and run it until the guest ends.
        Restore(vmm::commands::RestoreArgs),
        /// Send a control request to a running skiff (its --api-socket) and print the answer.
        Ctl(vmm::commands::CtlArgs),
        /// Fold a diff snapshot and its parents into a full snapshot, in the diff's place.
        SnapshotMerge(vmm::commands::MergeArgs),
        /// Serve a raw disk file as a vhost-user-blk backend on a Unix socket.
        VhostUserBlk(vmm::vhost_user_blk::VhostUserBlkArgs),
    }

    #[derive(Debug, clap::Args)]
    struct RunArgs {
        /// Kernel image: an ELF vmlinux (booted through PVH when it has the PVH note) or a bzImage.
        #[arg(long, value_name = "PATH")]
        kernel: PathBuf,
        /// Initial ramdisk.
        #[arg(long, value_name = "PATH")]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[arg(long, value_name = "STRING", default_value = DEFAULT_CMDLINE)]
        cmdline: String,
        /// Number of vCPUs.
        #[arg(long, value_name = "N", default_value = "1", value_parser = parse_cpus)]
        cpus: u32,
        /// Guest RAM: size=SIZE[,file=PATH][,hugepages=on][,prealloc=on] (default 256M, sealed memfd).
        #[arg(long, value_name = "SPEC")]
        memory: Option<MemoryArg>,
        /// Serial port (COM1) output: stdio, file=PATH or off.
        #[arg(long, value_name = "MODE", default_value = "stdio")]
        serial: SerialConfig,
        /// End the guest after this many seconds (exit code 124).
        #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
        timeout: Option<Duration>,
        /// Serve the control API (HTTP + JSON) on this Unix socket, created owner-only.
        #[arg(long, value_name = "PATH")]
        api_socket: Option<PathBuf>,
        /// virtio-blk on a raw file or block device:
        /// path=FILE[,readonly=on][,id=NAME][,queues=N][,io=auto|uring|threads] (repeatable).
        #[arg(long = "disk", value_name = "SPEC")]
        disks: Vec<DiskArg>,
        /// virtio-net on a host tap: tap=NAME[,mac=MAC] (the tap is created if missing; repeatable).
        #[arg(long = "net", value_name = "SPEC")]
        nets: Vec<NetConfig>,
        /// Add a virtio console (hvc0; put console=hvc0 in --cmdline to make it the kernel's).
        /// Its output goes to stdout, and stdin feeds it instead of the serial port (which
        /// still prints).
        #[arg(long)]
        console: bool,
        /// Add a virtio-rng device fed from the host's getrandom (repeatable).
        #[arg(long, action = clap::ArgAction::Count)]
        rng: u8,
        /// A virtio device served by a vhost-user backend process:
        /// type=blk|fs|net|vsock|rng|generic,socket=PATH[,queues=N][,tag=TAG][,reconnect=SECONDS]
        /// (repeatable).
        #[arg(long = "vhost-user", value_name = "SPEC")]
        vhost_user: Vec<VhostUserArg>,
        /// Write how skiff ended (reason, exit code, detail) to this file as JSON, atomically.
        #[arg(long, value_name = "PATH")]
        exit_status_file: Option<PathBuf>,
    }

    impl RunArgs {
        fn into_config(self) -> VmConfig {
            VmConfig {
                kernel: self.kernel,
                initrd: self.initrd,
                cmdline: self.cmdline,
                cpus: self.cpus,
                memory: self.memory.map(|m| m.0).unwrap_or(MemoryConfig {
                    size: DEFAULT_MEMORY,
                    backing: BackingKind::Memfd,
                    prealloc: false,
                }),
                serial: self.serial,
                timeout: self.timeout,
                disks: self.disks.into_iter().map(|d| d.0).collect(),
                nets: self.nets,
                console: self.console,
                rngs: RngConfig::repeated(self.rng),
                vhost_user: self.vhost_user.into_iter().map(|v| v.0).collect(),
            }
        }
    }

    pub fn main() -> ExitCode {
        env_logger_init();
        let argv: Vec<OsString> = std::env::args_os().collect();
        let cli = match Cli::try_parse_from(&argv) {
            Ok(cli) => cli,
            Err(e) if !e.use_stderr() => {
                // --help and --version go to stdout and succeed.
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                let rendered = e.render().to_string();
                let line = rendered
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("invalid command line")
                    .trim_start_matches("error: ")
                    .to_string();
                let status_file = exit_status_file::find_in_args(&argv);
                return finish(status_file.as_deref(), &ExitStatus::usage(line), None);
            }
        };
        if matches!(cli.command, Command::Run(_) | Command::Restore(_)) {
            // Before any thread exists (output writers, disk threads), so every thread
            // inherits the mask and only the run loop's signalfd takes SIGINT/SIGTERM/SIGHUP:
            // a stop signal is a clean end with its verdict, never a kill. One that arrives
            // during start-up waits until the loop runs.
            if let Err(e) = vmm::event_loop::block_stop_signals() {
                let msg = format!("cannot block the stop signals: {e}");
                return finish(None, &ExitStatus::error(msg), None);
            }
        }
        match cli.command {
            Command::Run(args) => {
                let status_file = args.exit_status_file.clone();
                if let Some(path) = &status_file {
                    if let Err(e) = exit_status_file::check(path) {
                        return finish(None, &ExitStatus::usage(e.to_string()), None);
                    }
                }
                let api_socket = args.api_socket.clone();
                let (status, teardown) = run(args.into_config(), api_socket);
                finish(status_file.as_deref(), &status, teardown)
            }
            Command::Restore(args) => {
                let status_file = args.exit_status_file.clone();
                if let Some(path) = &status_file {
                    if let Err(e) = exit_status_file::check(path) {
                        return finish(None, &ExitStatus::usage(e.to_string()), None);
                    }
                }
                let (status, teardown) = match vmm::commands::restore(args) {
                    Ok(outcome) => outcome_status(outcome),
                    Err(e) => (ExitStatus::error(e), None),
                };
                finish(status_file.as_deref(), &status, teardown)
            }
            Command::Ctl(args) => vmm::commands::ctl(args),
            Command::VhostUserBlk(args) => vmm::vhost_user_blk::run(args),
            Command::SnapshotMerge(args) => match vmm::commands::snapshot_merge(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => finish(None, &ExitStatus::error(e), None),
            },
        }
    }

    fn run(
        cfg: VmConfig,
        api_socket: Option<PathBuf>,
    ) -> (ExitStatus, Option<vmm::teardown::Teardown>) {
        let vm = match vmm::builder::build_vm(&cfg) {
            Ok(vm) => vm,
            Err(e) => return (ExitStatus::error(vmm::error_chain(&e)), None),
        };
        let opts = vmm::runner::RunOptions {
            serial: cfg.serial.clone(),
            timeout: cfg.timeout,
            api_socket,
            description: vmm::snapshot::manifest::VmDescription::from_config(&cfg),
        };
        match vmm::runner::run_vm(vm, &opts) {
            Ok(outcome) => outcome_status(outcome),
            Err(e) => (ExitStatus::error(vmm::error_chain(&e)), None),
        }
    }

    fn outcome_status(
        outcome: vmm::runner::RunOutcome,
    ) -> (ExitStatus, Option<vmm::teardown::Teardown>) {
        let status = ExitStatus::from_end(outcome.end, outcome.detail, &outcome.output);
        (status, Some(outcome.teardown))
    }

    /// Ends skiff with `status`: writes `--exit-status-file` (if given), then prints the
    /// verdict line (always the last line skiff writes), then leaves the VM's teardown to a
    /// detached process and returns the exit code.
    fn finish(
        status_file: Option<&Path>,
        status: &ExitStatus,
        teardown: Option<vmm::teardown::Teardown>,
    ) -> ExitCode {
        if let Some(path) = status_file {
            if let Err(e) = exit_status_file::write(path, status) {
                eprintln!("skiff: warn: {}", vmm::error_chain(&e));
            }
        }
        if let Some(line) = status.stderr_line() {
            eprintln!("skiff: {line}");
        }
        let _ = std::io::Write::flush(&mut std::io::stdout());
        if let Some(teardown) = teardown {
            teardown.detach();
        }
        ExitCode::from(status.code)
    }

    fn env_logger_init() {
        let level = match std::env::var("SKIFF_LOG").as_deref() {
            Ok("trace") => log::LevelFilter::Trace,
            Ok("debug") => log::LevelFilter::Debug,
            Ok("info") => log::LevelFilter::Info,
            Ok("error") => log::LevelFilter::Error,
            _ => log::LevelFilter::Warn,
        };
        log::set_max_level(level);
        let _ = log::set_logger(&StderrLogger);
    }

    struct StderrLogger;

    impl log::Log for StderrLogger {
        fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
            metadata.level() <= log::max_level()
        }
        fn log(&self, record: &log::Record<'_>) {
            // virtio-queue logs a guest's bad ring addresses as errors on its own; skiff
            // reports those itself, rate-limited (`devices::guest_warnings`). Shown only at
            // SKIFF_LOG=debug and above.
            if record.target().starts_with("virtio_queue")
                && log::max_level() < log::LevelFilter::Debug
            {
                return;
            }
            if self.enabled(record.metadata()) {
                eprintln!(
                    "skiff: {}: {}",
                    record.level().as_str().to_lowercase(),
                    record.args()
                );
            }
        }
        fn flush(&self) {}
    }
}

#[cfg(target_os = "linux")]
fn main() -> std::process::ExitCode {
    cli::main()
}

#[cfg(not(target_os = "linux"))]
fn main() -> std::process::ExitCode {
    eprintln!("skiff: this platform has no supported hypervisor backend yet (KVM on Linux only)");
    std::process::ExitCode::from(1)
}
