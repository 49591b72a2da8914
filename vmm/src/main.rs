//! The `skiff` command line: parses arguments into a `VmConfig`, builds and runs the VM, and
//! turns the outcome into a documented exit code with a one-line report on stderr.

#[cfg(target_os = "linux")]
mod cli {
    use std::path::PathBuf;
    use std::process::ExitCode;
    use std::time::Duration;

    use clap::{Parser, Subcommand};
    use vmm::config::{
        parse_cpus, parse_timeout, MemoryArg, SerialConfig, VmConfig, DEFAULT_CMDLINE,
        DEFAULT_MEMORY,
    };
    use vmm::exit_code;
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
            }
        }
    }

    fn fail(code: u8, message: &str) -> ExitCode {
        eprintln!("skiff: {message}");
        ExitCode::from(code)
    }

    pub fn main() -> ExitCode {
        env_logger_init();
        let cli = match Cli::try_parse() {
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
                    .trim_start_matches("error: ");
                return fail(exit_code::USAGE, line);
            }
        };
        match cli.command {
            Command::Run(args) => run(args.into_config()),
        }
    }

    fn run(cfg: VmConfig) -> ExitCode {
        let vm = match vmm::builder::build_vm(&cfg) {
            Ok(vm) => vm,
            Err(e) => return fail(exit_code::VMM_ERROR, &vmm::error_chain(&e)),
        };
        let outcome = match vmm::runner::run_vm(vm, &cfg.serial, cfg.timeout) {
            Ok(o) => o,
            Err(e) => return fail(exit_code::VMM_ERROR, &vmm::error_chain(&e)),
        };
        let (code, line) = exit_code::report(outcome.end);
        if let Some(line) = outcome.detail.or(line) {
            eprintln!("skiff: {line}");
        }
        let _ = std::io::Write::flush(&mut std::io::stdout());
        outcome.teardown.detach();
        ExitCode::from(code)
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
