//! `skiff test`: runs a suite of tests that each need a VM, described in a TOML file
//! (`suite.rs`), on this host's capabilities (`host_probe.rs`, `requirements.rs`), a slice of it
//! at a time (`partition.rs`), cold or forked from a snapshot of a set-up VM (`fork.rs`,
//! `run.rs`; VMs are started through `launch.rs` and `vm_process.rs` and ended through
//! `reaper.rs`), under a suite watchdog (`watchdog.rs`), with per-case artifacts
//! (`artifacts.rs`) and human, jsonl and JUnit output (`report.rs`). `test_vm.rs` offers the
//! same pieces to Rust tests. This module owns the command line, the order of the steps and
//! the exit codes.

pub mod artifacts;
pub mod fork;
pub mod host_probe;
pub mod launch;
pub mod partition;
pub mod reaper;
pub mod report;
pub mod requirements;
pub mod run;
pub mod suite;
pub mod test_vm;
pub mod vm_process;
pub mod watchdog;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use host_probe::HostCapabilities;
use launch::RunContext;
use partition::Partition;
use report::Format;
use requirements::{Atom, Requirement};
use run::{Mode, Work};
use suite::{AgentKind, SuiteError};
use watchdog::Watchdog;

/// Exit codes of `skiff test`.
pub mod exit {
    /// Every case passed or was skipped.
    pub const PASSED: u8 = 0;
    /// A case failed.
    pub const FAILED: u8 = 1;
    /// The suite file cannot be read or is not TOML (or a value has the wrong type).
    pub const MALFORMED: u8 = 3;
    /// The suite file has an unknown key.
    pub const UNKNOWN_KEY: u8 = 4;
    /// A kernel, initrd or disk the suite names does not exist.
    pub const MISSING_FILE: u8 = 5;
    /// A `requires` expression does not parse.
    pub const BAD_REQUIREMENT: u8 = 6;
    /// `--filter` (and `--partition`) left no case.
    pub const NO_CASES: u8 = 7;
    /// The artifact directory (or the JUnit file) cannot be written.
    pub const ARTIFACTS: u8 = 8;
    /// The suite is inconsistent otherwise (unknown VM, bad pattern, ...).
    pub const INVALID: u8 = 9;
    /// The suite watchdog fired: the run was cut short.
    pub const WATCHDOG: u8 = 10;
    /// A fork snapshot did not fit: its file system is full.
    pub const NO_SPACE: u8 = 11;
}

/// `skiff test` options.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// The suite file.
    #[arg(value_name = "FILE", default_value = "skiff-test.toml")]
    pub file: PathBuf,
    /// Run only cases whose name matches this regular expression.
    #[arg(long, value_name = "RE")]
    pub filter: Option<regex::Regex>,
    /// List the cases (and why any would be skipped) instead of running them.
    #[arg(long)]
    pub list: bool,
    /// Run up to N cases at once.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: u16,
    /// Write a JUnit XML report here.
    #[arg(long, value_name = "PATH")]
    pub junit: Option<PathBuf>,
    /// Output on stdout: one line per case (human) or one JSON event per line (jsonl).
    #[arg(long, value_enum, default_value = "human")]
    pub format: Format,
    /// Per-case artifacts (logs, snapshots) go here.
    #[arg(long, value_name = "DIR", default_value = "skiff-test-artifacts")]
    pub artifacts: PathBuf,
    /// Fail, instead of skipping, cases that need this capability when the host lacks it
    /// (repeatable).
    #[arg(long = "require", value_name = "CAP")]
    pub require: Vec<String>,
    /// Run slice K of N (1-based) of the suite.
    #[arg(long, value_name = "K/N")]
    pub partition: Option<Partition>,
    /// Stop a failing case's VM into a snapshot and print the command that restores it.
    #[arg(long)]
    pub snapshot_on_failure: bool,
    /// Kill the run's VMs and stop when the whole suite takes longer than this (overrides the
    /// suite's `watchdog` key).
    #[arg(long, value_name = "SECONDS", value_parser = watchdog_seconds)]
    pub watchdog: Option<Duration>,
}

/// A `--watchdog` value that is not a positive number of seconds.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a positive number of seconds")]
pub struct WatchdogSecondsError(String);

fn watchdog_seconds(s: &str) -> Result<Duration, WatchdogSecondsError> {
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0 && *v < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| WatchdogSecondsError(s.to_string()))
}

fn suite_exit(e: &SuiteError) -> u8 {
    match e {
        SuiteError::Read { .. } | SuiteError::Malformed { .. } => exit::MALFORMED,
        SuiteError::UnknownKey { .. } => exit::UNKNOWN_KEY,
        SuiteError::MissingFile { .. } => exit::MISSING_FILE,
        SuiteError::Requirement { .. } => exit::BAD_REQUIREMENT,
        SuiteError::Invalid { .. } => exit::INVALID,
    }
}

fn mentions(r: &Requirement, cap: &str) -> bool {
    match r {
        Requirement::Atom(Atom::Cap(c)) => c == cap,
        Requirement::Atom(_) => false,
        Requirement::Not(x) => mentions(x, cap),
        Requirement::And(a, b) | Requirement::Or(a, b) => mentions(a, cap) || mentions(b, cap),
    }
}

/// Decides whether a case runs: `Err(mode)` is a skip or, under `--require`, a failure.
fn gate(
    requirements: &[Requirement],
    host: &HostCapabilities,
    required: &[String],
) -> Result<(), Mode> {
    for r in requirements {
        if let Err(why) = r.check(host) {
            if let Some(cap) = required.iter().find(|c| mentions(r, c)) {
                return Err(Mode::Fail(format!("{why}, and --require {cap} was given")));
            }
            return Err(Mode::Skip(why.to_string()));
        }
    }
    Ok(())
}

/// Runs `skiff test` and returns its exit code.
pub fn run(args: TestArgs) -> ExitCode {
    let started = Instant::now();
    let suite = match suite::load(&args.file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("skiff: {}", crate::error_chain(&e));
            return ExitCode::from(suite_exit(&e));
        }
    };
    let host = HostCapabilities::probe();
    let selected: Vec<(usize, &suite::CaseSpec)> = suite
        .cases
        .iter()
        .enumerate()
        .filter(|(_, c)| args.filter.as_ref().is_none_or(|f| f.is_match(&c.name)))
        .enumerate()
        .filter(|(i, _)| args.partition.is_none_or(|p| p.contains(*i)))
        .map(|(_, c)| c)
        .collect();
    if selected.is_empty() {
        eprintln!(
            "skiff: no case of {} matches{}{}",
            args.file.display(),
            args.filter
                .as_ref()
                .map(|f| format!(" --filter {:?}", f.as_str()))
                .unwrap_or_default(),
            args.partition
                .map(|p| format!(" in --partition {}/{}", p.index, p.count))
                .unwrap_or_default()
        );
        return ExitCode::from(exit::NO_CASES);
    }
    let vms: std::collections::BTreeMap<String, Arc<suite::VmSpec>> = suite
        .vms
        .iter()
        .map(|(k, v)| (k.clone(), Arc::new(v.clone())))
        .collect();
    let kvm = Requirement::Atom(Atom::Cap("kvm".into()));
    let linux = Requirement::Atom(Atom::Cap("linux-userspace".into()));
    let mut work: Vec<Work> = Vec::new();
    for (position, case) in selected {
        let Some(vm) = vms.get(&case.vm).cloned() else {
            continue;
        };
        let mut reqs: Vec<Requirement> = Vec::new();
        if vm.agent == AgentKind::Linux {
            reqs.push(linux.clone());
        }
        reqs.extend(vm.requires.iter().cloned());
        reqs.extend(case.requires.iter().cloned());
        let mode = if kvm.check(&host).is_err() {
            // The project's rule: KVM tests fail, never skip.
            Mode::Fail("this host has no usable /dev/kvm".into())
        } else {
            match gate(&reqs, &host, &args.require) {
                Err(m) => m,
                Ok(()) => Mode::Cold,
            }
        };
        work.push(Work {
            position,
            case: case.clone(),
            vm,
            mode,
        });
    }
    if args.list {
        for w in &work {
            let how = match &w.mode {
                Mode::Skip(why) => format!("skip: {why}"),
                Mode::Fail(why) => format!("fail: {why}"),
                _ if w.vm.fork => "fork".into(),
                _ => "cold".into(),
            };
            println!("{}\t{}\t{how}", w.case.name, w.vm.name);
        }
        return ExitCode::from(exit::PASSED);
    }
    let artifacts = match artifacts::Artifacts::create(&args.artifacts) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("skiff: {}", crate::error_chain(&e));
            return ExitCode::from(exit::ARTIFACTS);
        }
    };
    let runtime = match runtime_dir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skiff: cannot create a socket directory: {e}");
            return ExitCode::from(exit::ARTIFACTS);
        }
    };
    let skiff = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("skiff"));
    let watchdog = Arc::new(Watchdog::new(args.watchdog.or(suite.watchdog)));
    let ctx = RunContext {
        skiff,
        artifacts,
        runtime: runtime.path().to_path_buf(),
        snapshot_on_failure: args.snapshot_on_failure,
        watchdog: Arc::clone(&watchdog),
        reaper: reaper::Reaper::start(),
        disk_full: std::sync::atomic::AtomicBool::new(false),
    };
    // Fires at the limit, or returns when `finish` is called below.
    let watcher = std::thread::Builder::new()
        .name("suite-watchdog".into())
        .spawn(move || watchdog.watch());
    let code = run_work(&args, &ctx, work, &host, started);
    ctx.watchdog.finish();
    if let Ok(w) = watcher {
        let _ = w.join();
    }
    ExitCode::from(code)
}

/// Prepares the fork bases and runs `work`; the exit code.
fn run_work(
    args: &TestArgs,
    ctx: &RunContext,
    mut work: Vec<Work>,
    host: &HostCapabilities,
    started: Instant,
) -> u8 {
    if args.format == Format::Jsonl {
        println!(
            "{}",
            serde_json::json!({"event": "start", "suite": args.file, "cases": work.len(), "host": host.summary()})
        );
    }
    // Fork bases, one per fork VM with a case to run.
    let mut bases: std::collections::BTreeMap<
        String,
        Result<Arc<fork::ForkBase>, fork::BaseFailure>,
    > = std::collections::BTreeMap::new();
    for (index, w) in work.iter_mut().enumerate() {
        if !matches!(w.mode, Mode::Cold)
            || !w.vm.fork
            || !matches!(w.case.run, suite::CaseRun::Argv(_))
        {
            continue;
        }
        let base = bases.entry(w.vm.name.clone()).or_insert_with(|| {
            let base = fork::prepare(ctx, &w.vm, index).map(Arc::new);
            if let Err(f) = &base {
                if f.no_space {
                    ctx.report_disk_full(&f.reason);
                }
            }
            base
        });
        w.mode = match base {
            Ok(b) => Mode::Fork(b.clone()),
            Err(_) if ctx.watchdog.expired() => {
                Mode::NotRun(format!("not run: {}", ctx.watchdog.reason()))
            }
            Err(f) => Mode::Fail(format!(
                "setup of vm {:?} failed, case not run: {}",
                w.vm.name, f.reason
            )),
        };
    }
    let out = Mutex::new(std::io::stdout());
    let report = |r: &report::CaseResult| {
        let line = report::case_line(r, args.format);
        let mut o = out.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = std::io::Write::write_all(&mut *o, format!("{line}\n").as_bytes());
    };
    let results = run::run_all(ctx, work, usize::from(args.jobs), &report);
    let elapsed = started.elapsed();
    println!("{}", report::summary_line(&results, elapsed, args.format));
    if let Some(path) = &args.junit {
        let name = args
            .file
            .file_stem()
            .map_or("skiff-test".into(), |s| s.to_string_lossy().into_owned());
        if let Err(e) = report::write_junit(path, &name, &results, elapsed) {
            eprintln!("skiff: cannot write --junit {}: {e}", path.display());
            return exit::ARTIFACTS;
        }
    }
    if ctx.watchdog.expired() {
        eprintln!(
            "skiff: {}: its VMs were killed, {} case(s) not run",
            ctx.watchdog.reason(),
            report::totals(&results).not_run
        );
        exit::WATCHDOG
    } else if ctx.disk_full.load(std::sync::atomic::Ordering::SeqCst) {
        exit::NO_SPACE
    } else if results.iter().any(report::CaseResult::fails_suite) {
        exit::FAILED
    } else {
        exit::PASSED
    }
}

/// An owner-only directory for sockets, removed when dropped.
struct RuntimeDir(PathBuf);

impl RuntimeDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn runtime_dir() -> std::io::Result<RuntimeDir> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    for n in 0..1000u32 {
        let dir = base.join(format!("skiff-test-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(RuntimeDir(dir)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists))
}
