//! The `skiff` binary: parses the command line (`vmm::cli`), builds and runs the VM or hands the
//! subcommand to its code, and turns the outcome into a documented exit code with a one-line
//! report on stderr.

#[cfg(target_os = "linux")]
mod cli {
    use std::ffi::OsString;
    use std::path::{Path, PathBuf};
    use std::process::ExitCode;

    use clap::Parser;
    use vmm::cli::{Cli, Command};
    use vmm::config::VmConfig;
    use vmm::exit_code::ExitStatus;
    use vmm::exit_status_file;

    pub fn main() -> ExitCode {
        // No option passes skiff a descriptor: everything beyond stdio was inherited by accident.
        if let Err(e) = vmm::sandbox::fds::close_inherited(&[]) {
            let msg = format!("cannot close inherited descriptors: {e}");
            return finish(None, &ExitStatus::error(msg), None);
        }
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
                let mut lines = rendered.lines().filter(|l| !l.trim().is_empty());
                let mut line = lines
                    .next()
                    .unwrap_or("invalid command line")
                    .trim_start_matches("error: ")
                    .to_string();
                // "the following required arguments were not provided:" names them next.
                if line.ends_with(':') {
                    if let Some(next) = lines.next() {
                        line = format!("{line} {}", next.trim());
                    }
                }
                let status_file = exit_status_file::find_in_args(&argv);
                return finish(status_file.as_deref(), &ExitStatus::usage(line), None);
            }
        };
        if matches!(cli.command, Command::Run(_) | Command::Restore(_)) {
            // Before any thread exists (output writers, disk threads), so every thread
            // inherits the mask and only the run loop's signalfd takes SIGINT/SIGTERM/SIGHUP:
            // a stop signal is a clean end with its verdict, never a kill. During start-up
            // `StartupSignalWatch` takes them.
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
                let watch = match watch_startup(status_file.clone()) {
                    Ok(watch) => watch,
                    Err(status) => return finish(status_file.as_deref(), &status, None),
                };
                let api_socket = args.api_socket.clone();
                let agent = args.agent;
                let args_sandbox = args.sandbox.clone();
                let mut cfg = args.into_config();
                // Lives until the VM has ended: it holds the initramfs file.
                let _agent_initrd = if agent {
                    match with_agent(&mut cfg) {
                        Ok(initrd) => Some(initrd),
                        Err(status) => return finish(status_file.as_deref(), &status, None),
                    }
                } else {
                    None
                };
                let sandbox = args_sandbox;
                let (status, teardown) = run(cfg, api_socket, watch, &sandbox);
                finish(status_file.as_deref(), &status, teardown)
            }
            Command::Restore(args) => {
                let status_file = args.exit_status_file.clone();
                if let Some(path) = &status_file {
                    if let Err(e) = exit_status_file::check(path) {
                        return finish(None, &ExitStatus::usage(e.to_string()), None);
                    }
                }
                let watch = match watch_startup(status_file.clone()) {
                    Ok(watch) => watch,
                    Err(status) => return finish(status_file.as_deref(), &status, None),
                };
                let (status, teardown) = match vmm::commands::restore(args, || watch.stop()) {
                    Ok(outcome) => outcome_status(outcome),
                    Err(e) => (ExitStatus::error(vmm::error_chain(&e)), None),
                };
                finish(status_file.as_deref(), &status, teardown)
            }
            Command::Exec(args) => vmm::exec::run(args),
            Command::Test(args) => vmm::test_runner::run(args),
            Command::Ctl(args) => vmm::commands::ctl(args),
            Command::VhostUserBlk(args) => vmm::vhost_user_blk::run(args),
            Command::SnapshotVerify(args) => vmm::commands::snapshot_verify(args),
            Command::SnapshotMerge(args) => match vmm::commands::snapshot_merge(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => finish(None, &ExitStatus::error(vmm::error_chain(&e)), None),
            },
            Command::SnapshotInfo(args) => match vmm::commands::snapshot_info(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => finish(None, &ExitStatus::error(vmm::error_chain(&e)), None),
            },
        }
    }

    /// `--agent`: boots skiff's agent initramfs (the user's `--initrd` appended) with the agent
    /// listening on vsock port 1024.
    fn with_agent(cfg: &mut VmConfig) -> Result<vmm::exec::AgentInitrd, ExitStatus> {
        if cfg.vsock.is_none() {
            return Err(ExitStatus::usage(
                "--agent needs --vsock cid=N,socket=PATH (skiff ctl exec reaches the agent through it)".into(),
            ));
        }
        let initrd = vmm::exec::AgentInitrd::create(cfg.initrd.as_deref())
            .map_err(|e| ExitStatus::error(vmm::error_chain(&e)))?;
        cfg.initrd = Some(initrd.path());
        cfg.cmdline.push(' ');
        cfg.cmdline.push_str(&vmm::exec::agent_listen_cmdline());
        Ok(initrd)
    }

    /// Ends skiff with a `signal` verdict if a stop signal comes while the VM is built.
    fn watch_startup(
        status_file: Option<PathBuf>,
    ) -> Result<vmm::event_loop::StartupSignalWatch, ExitStatus> {
        vmm::event_loop::StartupSignalWatch::start(move |signal| {
            let code = 128u8.saturating_add(u8::try_from(signal).unwrap_or(127));
            let detail = format!("stopped by signal {signal} during start-up (exit code {code})");
            let status = ExitStatus::from_end(
                devices::vm_exit::GuestEnd::HostSignal(signal),
                Some(detail),
                0,
                None,
            );
            let _ = finish(status_file.as_deref(), &status, None);
            std::process::exit(i32::from(status.code));
        })
        .map_err(|e| ExitStatus::error(format!("cannot watch the stop signals: {e}")))
    }

    fn run(
        cfg: VmConfig,
        api_socket: Option<PathBuf>,
        watch: vmm::event_loop::StartupSignalWatch,
        sandbox: &vmm::sandbox::SandboxArgs,
    ) -> (ExitStatus, Option<vmm::teardown::Teardown>) {
        if let Err(e) = vmm::sandbox::init(sandbox) {
            return (ExitStatus::error(vmm::error_chain(&e)), None);
        }
        // Only Landlock (`--sandbox`) reads the list; without it, no look-ups for it.
        let sandbox_paths = if sandbox.sandbox {
            vmm::sandbox::SandboxPaths::for_run(&cfg, api_socket.as_deref(), &sandbox.sandbox_allow)
        } else {
            vmm::sandbox::SandboxPaths::default()
        };
        let vm = match vmm::builder::build_vm(&cfg) {
            Ok(vm) => vm,
            Err(e) => return (ExitStatus::error(vmm::error_chain(&e)), None),
        };
        // From here the run loop's signalfd takes the stop signals.
        watch.stop();
        let opts = vmm::runner::RunOptions {
            serial: cfg.serial.clone(),
            timeout: cfg.timeout,
            api_socket,
            description: vmm::snapshot::manifest::VmDescription::from_config(&cfg),
            sandbox_paths,
        };
        match vmm::runner::run_vm(vm, &opts) {
            Ok(outcome) => outcome_status(outcome),
            Err(e) => (ExitStatus::error(vmm::error_chain(&e)), None),
        }
    }

    fn outcome_status(
        outcome: vmm::runner::RunOutcome,
    ) -> (ExitStatus, Option<vmm::teardown::Teardown>) {
        let status = ExitStatus::from_end(
            outcome.end,
            outcome.detail,
            outcome.output.dropped_bytes,
            outcome.output.line(),
        );
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

    /// Every `skiff ...` example that the help texts, the README and docs/ show parses with the
    /// real command line, so the examples a user copies cannot rot.
    #[cfg(test)]
    mod examples {
        use super::*;
        use vmm::cli::{
            CTL_EXAMPLES, EXEC_EXAMPLES, INFO_EXAMPLES, MERGE_EXAMPLES, RESTORE_EXAMPLES,
            RUN_EXAMPLES, TEST_EXAMPLES, TOP_EXAMPLES, VERIFY_EXAMPLES, VHOST_USER_BLK_EXAMPLES,
        };

        /// Splits one shell line into words: whitespace separates, single quotes group.
        fn words(line: &str) -> Vec<String> {
            let mut out = Vec::new();
            let mut word = String::new();
            let mut quoted = false;
            let mut started = false;
            for c in line.chars() {
                match c {
                    '\'' => {
                        quoted = !quoted;
                        started = true;
                    }
                    c if c.is_whitespace() && !quoted => {
                        if started {
                            out.push(std::mem::take(&mut word));
                            started = false;
                        }
                    }
                    c => {
                        word.push(c);
                        started = true;
                    }
                }
            }
            if started {
                out.push(word);
            }
            out
        }

        /// The `skiff ...` command lines in a text (in Markdown, only inside code blocks):
        /// continuation lines joined, a trailing `&` dropped.
        fn skiff_lines(text: &str, markdown: bool) -> Vec<String> {
            let mut lines = Vec::new();
            let mut pending = String::new();
            let mut in_code = !markdown;
            for line in text.lines() {
                let line = line.trim();
                if markdown && line.starts_with("```") {
                    in_code = !in_code;
                    continue;
                }
                if !in_code || (pending.is_empty() && !line.starts_with("skiff ")) {
                    continue;
                }
                if let Some(head) = line.strip_suffix('\\') {
                    pending.push_str(head);
                    pending.push(' ');
                    continue;
                }
                pending.push_str(line.trim_end_matches('&'));
                let example = std::mem::take(&mut pending);
                // A synopsis (`skiff run ... [--x N] a|b`) is not an example.
                if !example.contains("...") && !example.contains('|') && !example.contains('[') {
                    lines.push(example);
                }
            }
            lines
        }

        fn check(source: &str, text: &str, markdown: bool) -> usize {
            let lines = skiff_lines(text, markdown);
            for line in &lines {
                if let Err(e) = Cli::try_parse_from(words(line)) {
                    panic!("{source}: example does not parse: {line}\n{e}");
                }
            }
            lines.len()
        }

        #[test]
        fn help_examples_parse() {
            let n: usize = [
                TOP_EXAMPLES,
                RUN_EXAMPLES,
                EXEC_EXAMPLES,
                TEST_EXAMPLES,
                RESTORE_EXAMPLES,
                CTL_EXAMPLES,
                MERGE_EXAMPLES,
                VERIFY_EXAMPLES,
                INFO_EXAMPLES,
                VHOST_USER_BLK_EXAMPLES,
            ]
            .iter()
            .map(|text| check("--help", text, false))
            .sum();
            assert!(n >= 20, "only {n} examples found in the help texts");
        }

        #[test]
        fn documentation_examples_parse() {
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let mut docs = vec![root.join("README.md")];
            let mut pages: Vec<_> = std::fs::read_dir(root.join("docs"))
                .expect("docs/ exists")
                .map(|e| e.expect("docs/ entry").path())
                .filter(|p| p.extension().is_some_and(|x| x == "md"))
                .collect();
            pages.sort();
            docs.extend(pages);
            let mut n = 0;
            for doc in &docs {
                let text = std::fs::read_to_string(doc).expect("readable doc");
                n += check(&doc.display().to_string(), &text, true);
            }
            assert!(
                n >= 5,
                "only {n} skiff examples found in README.md and docs/"
            );
        }
    }
}

#[cfg(target_os = "linux")]
fn main() -> std::process::ExitCode {
    cli::main()
}

/// On Windows: `skiff run` on the Windows Hypervisor Platform (`vmm::windows_vm`); where the
/// platform is missing or disabled, one line and exit code 123 (docs/windows.md).
#[cfg(windows)]
fn main() -> std::process::ExitCode {
    vmm::windows_vm::run::main()
}

#[cfg(not(any(target_os = "linux", windows)))]
fn main() -> std::process::ExitCode {
    eprintln!("skiff: this platform has no supported hypervisor backend yet (KVM on Linux only)");
    std::process::ExitCode::from(1)
}
