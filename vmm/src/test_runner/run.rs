//! Running cases: up to `--jobs` at once (cases with `exclusive = true` afterwards, one at a
//! time), each attempted up to `1 + retries` times in a fresh VM, booted cold or restored from
//! its VM's fork snapshot. A case passes on the expected exit code and, when given, output
//! matching its pattern (the command's stdout for agent cases, the serial log for scenarios).
//! Timeouts: the agent kills the command's process group at the case timeout; the VM's process
//! group is killed after a grace period if no answer comes. A scenario VM has `boot_timeout` to
//! print its `ready` line (by default any line), then the case timeout. When the suite watchdog
//! fires, the cases it stopped fail with its reason and the ones not started are not run.
//! A finished case's VM goes to the reaper, so its exit is not on the next case's path.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use agent_protocol::ExitStatus;
use thiserror::Error;

use super::fork::{restore_args, ForkBase, ForkError};
use super::launch::{
    describe, resume, run_setup, says_no_space, serial_tail, spec, vm_args, LaunchError, RunContext,
};
use super::report::{CaseResult, Verdict};
use super::suite::{AgentKind, CaseRun, CaseSpec, VmSpec};
use super::vm_process::{connect_agent, exit_code, VmProcess};
use crate::exec::client::{CommandEnd, Interrupt};

/// How long past a case's timeout the agent may take to report it before the VM is killed.
const GRACE: Duration = Duration::from_secs(5);
/// How often a scenario VM's serial log and exit are looked at.
const SCENARIO_TICK: Duration = Duration::from_millis(2);

/// How a case is to be run.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Not run: this reason.
    Skip(String),
    /// Not run, failed: this reason (an unmet `--require`, a failed fork setup).
    Fail(String),
    /// Not run because the run was cut short: this reason (the suite watchdog).
    NotRun(String),
    /// A fresh boot.
    Cold,
    /// A restore of this snapshot.
    Fork(Arc<ForkBase>),
}

/// One case to run.
#[derive(Debug, Clone)]
pub struct Work {
    /// Position in the suite (file order), for socket names and ordering.
    pub position: usize,
    pub case: CaseSpec,
    pub vm: Arc<VmSpec>,
    pub mode: Mode,
}

/// Why an attempt failed, and the restore command when its VM was snapshotted.
struct Failure {
    reason: String,
    restore_command: Option<String>,
}

impl From<String> for Failure {
    fn from(reason: String) -> Self {
        Self {
            reason,
            restore_command: None,
        }
    }
}

/// A case's output that fails its `output` pattern, or cannot be read.
#[derive(Debug, Error)]
enum OutputError {
    /// The output file could not be read.
    #[error("reading {}", .path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The output does not match the case's pattern.
    #[error("output does not match /{pattern}/ (see {})", .path.display())]
    Mismatch {
        pattern: String,
        path: std::path::PathBuf,
    },
}

impl From<OutputError> for Failure {
    fn from(e: OutputError) -> Self {
        crate::error_chain(&e).into()
    }
}

impl From<LaunchError> for Failure {
    fn from(e: LaunchError) -> Self {
        crate::error_chain(&e).into()
    }
}

impl From<ForkError> for Failure {
    fn from(e: ForkError) -> Self {
        crate::error_chain(&e).into()
    }
}

fn matches_output(case: &CaseSpec, file: &Path) -> Result<(), OutputError> {
    let Some(pattern) = &case.output else {
        return Ok(());
    };
    let text = std::fs::read(file).map_err(|source| OutputError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    if pattern.is_match(&String::from_utf8_lossy(&text)) {
        Ok(())
    } else {
        Err(OutputError::Mismatch {
            pattern: pattern.as_str().to_string(),
            path: file.to_path_buf(),
        })
    }
}

/// Watches a growing serial log for a line matching a VM's `ready` pattern (any line without
/// one); reads only what is new at each look.
struct ReadyWatch<'a> {
    pattern: Option<&'a regex::Regex>,
    file: Option<std::fs::File>,
    /// Bytes after the last newline seen (the start of the next line), at most 4 KiB kept.
    partial: Vec<u8>,
}

impl ReadyWatch<'_> {
    /// Whether a ready line has appeared since the last look.
    fn seen(&mut self, log: &Path) -> bool {
        if self.file.is_none() {
            self.file = std::fs::File::open(log).ok();
        }
        let Some(file) = self.file.as_mut() else {
            return false;
        };
        let mut chunk = Vec::new();
        if file.read_to_end(&mut chunk).is_err() {
            return false;
        }
        self.partial.extend_from_slice(&chunk);
        let mut ready = false;
        while let Some(at) = self.partial.iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&self.partial[..at]).into_owned();
            self.partial.drain(..=at);
            ready |= match self.pattern {
                Some(p) => p.is_match(&line),
                None => !line.trim().is_empty(),
            };
        }
        if self.partial.len() > 4096 {
            let excess = self.partial.len() - 4096;
            self.partial.drain(..excess);
        }
        ready
    }
}

/// A test-guest scenario, booted cold with the scenario on the command line: `boot_timeout`
/// until its ready line, then the case timeout.
fn attempt_scenario(ctx: &RunContext, w: &Work, scenario: &str, dir: &Path) -> Result<(), Failure> {
    let mut vm = (*w.vm).clone();
    vm.cmdline = format!("{} {scenario}", vm.cmdline).trim().to_string();
    let serial = dir.join("serial.log");
    let args = vm_args(&vm, Path::new(""), &serial);
    let mut proc = ctx.spawn(&args, dir)?;
    let mut watch = ReadyWatch {
        pattern: vm.ready.as_ref(),
        file: None,
        partial: Vec::new(),
    };
    let mut booted = false;
    let mut deadline = Instant::now() + vm.boot_timeout;
    let status = loop {
        if let Some(status) = proc.ended() {
            break status;
        }
        if !booted && watch.seen(&serial) {
            booted = true;
            deadline = Instant::now() + w.case.timeout;
        }
        if Instant::now() >= deadline {
            proc.kill();
            let why = if booted {
                format!(
                    "timed out after {:.1} s (the VM's process group was killed)",
                    w.case.timeout.as_secs_f64()
                )
            } else {
                format!(
                    "did not boot within {:.1} s ({}; the VM's process group was killed)",
                    vm.boot_timeout.as_secs_f64(),
                    vm.ready.as_ref().map_or_else(
                        || "no serial line".to_string(),
                        |p| format!("no serial line matched /{}/", p.as_str())
                    )
                )
            };
            return Err(format!("{why}{}", serial_tail(&serial)).into());
        }
        std::thread::sleep(SCENARIO_TICK);
    };
    let code = exit_code(status);
    if code != w.case.exit_code {
        return Err(format!(
            "skiff exit {code}, expected {}{}",
            w.case.exit_code,
            serial_tail(&serial)
        )
        .into());
    }
    matches_output(&w.case, &serial).map_err(Failure::from)
}

/// An argv through the agent, in a cold-booted or forked VM.
fn attempt_agent(
    ctx: &RunContext,
    w: &Work,
    argv: &[String],
    dir: &Path,
    attempt: u32,
) -> Result<(), Failure> {
    let socket = ctx.runtime.join(format!("c{}-{attempt}.v", w.position));
    let api = ctx.runtime.join(format!("c{}-{attempt}.api", w.position));
    let serial = dir.join("serial.log");
    let mut args = match &w.mode {
        Mode::Fork(base) => restore_args(base, &socket, &serial, dir)?,
        _ => vm_args(&w.vm, &socket, &serial),
    };
    if ctx.snapshot_on_failure {
        args.extend(["--api-socket".into(), api.clone().into()]);
    }
    let mut proc = ctx.spawn(&args, dir)?;
    let outcome = drive_agent(ctx, w, argv, dir, (&socket, &api), &mut proc);
    // The VM's exit is paid off this case's path.
    ctx.reaper.discard(proc);
    outcome
}

/// The agent case's steps in the VM `proc`, from the connection to the verdict.
fn drive_agent(
    ctx: &RunContext,
    w: &Work,
    argv: &[String],
    dir: &Path,
    (socket, api): (&Path, &Path),
    proc: &mut VmProcess,
) -> Result<(), Failure> {
    let serial = dir.join("serial.log");
    let mut transcript = std::fs::File::create(dir.join("agent-transcript.log"))
        .map_err(|e| format!("artifact: {e}"))?;
    let boot_fail = |why: String| format!("{why}{}", serial_tail(&serial));
    let mut client = connect_agent(socket, Instant::now() + w.vm.boot_timeout, proc)
        .map_err(|e| boot_fail(crate::error_chain(&e)))?;
    let _ = writeln!(transcript, "-> Hello, <- HelloReply");
    if let Mode::Fork(_) = w.mode {
        let _ = writeln!(transcript, "-> Resume");
        resume(&mut client, proc).map_err(|e| format!("agent resume: {e:?}"))?;
    } else {
        run_setup(&mut client, &w.vm, dir, &mut transcript, proc).map_err(|e| {
            Failure::from(format!(
                "setup of vm {:?} failed: {}",
                w.vm.name,
                crate::error_chain(&e)
            ))
        })?;
    }
    let stdout_path = dir.join("stdout.log");
    let mut stdout = std::fs::File::create(&stdout_path).map_err(|e| format!("artifact: {e}"))?;
    let mut stderr =
        std::fs::File::create(dir.join("stderr.log")).map_err(|e| format!("artifact: {e}"))?;
    let _ = writeln!(transcript, "-> Exec {argv:?} timeout {:?}", w.case.timeout);
    let give_up = Instant::now() + w.case.timeout + GRACE;
    let end = client.run(
        &spec(argv, Some(w.case.timeout)),
        &mut stdout,
        &mut stderr,
        || proc.ended().is_some() || Instant::now() >= give_up,
    );
    let what = describe(&end, proc);
    let _ = writeln!(transcript, "<- {what}");
    let verdict = match &end {
        CommandEnd::Exit(ExitStatus::Code(c)) if *c == w.case.exit_code => {
            matches_output(&w.case, &stdout_path).map_err(|e| crate::error_chain(&e))
        }
        CommandEnd::Exit(ExitStatus::Code(c)) => {
            Err(format!("exit {c}, expected {}", w.case.exit_code))
        }
        CommandEnd::Exit(ExitStatus::TimedOut) => Err(format!(
            "timed out after {:.1} s (the agent killed its process group)",
            w.case.timeout.as_secs_f64()
        )),
        CommandEnd::Interrupted(Interrupt::Stopped) if proc.ended().is_none() => Err(format!(
            "timed out after {:.1} s and the agent did not answer within {} s more (the VM was killed)",
            w.case.timeout.as_secs_f64(),
            GRACE.as_secs()
        )),
        CommandEnd::Exit(_) | CommandEnd::NotStarted(_) => Err(what),
        CommandEnd::Interrupted(_) => Err(format!("{what}{}", serial_tail(&serial))),
    };
    let Err(reason) = verdict else { return Ok(()) };
    if w.vm.agent == AgentKind::Linux && proc.ended().is_none() {
        if let Ok(mut log) = std::fs::File::create(dir.join("kernel.log")) {
            let mut sink = std::io::sink();
            let dmesg = vec!["dmesg".to_string()];
            let _ = client.run(
                &spec(&dmesg, Some(Duration::from_secs(10))),
                &mut log,
                &mut sink,
                || proc.ended().is_some(),
            );
        }
    }
    drop(client);
    let restore_command = if ctx.snapshot_on_failure && proc.ended().is_none() {
        snapshot_failed_vm(ctx, api, dir, proc)
    } else {
        None
    };
    Err(Failure {
        reason,
        restore_command,
    })
}

/// Stops a failed case's VM into `DIR/failure-snapshot`; the command that restores it.
fn snapshot_failed_vm(
    ctx: &RunContext,
    api: &Path,
    dir: &Path,
    proc: &mut VmProcess,
) -> Option<String> {
    let snapshot = dir.join("failure-snapshot");
    let out = Command::new(&ctx.skiff)
        .arg("ctl")
        .arg("--api-socket")
        .arg(api)
        .arg("snapshot")
        .arg(&snapshot)
        .arg("--stop")
        .output()
        .ok()?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if says_no_space(&why) {
            ctx.report_disk_full(&format!(
                "the failure snapshot {} does not fit: the file system is full ({why})",
                snapshot.display()
            ));
        }
        let _ = std::fs::write(dir.join("failure-snapshot.err"), &out.stderr);
        return None;
    }
    proc.wait_until(Instant::now() + Duration::from_secs(30));
    Some(format!(
        "skiff restore {} --vsock id=vsock0,socket=/tmp/failed.vsock",
        snapshot.display()
    ))
}

/// Runs one case to its verdict, with its retries.
fn run_case(ctx: &RunContext, w: &Work) -> CaseResult {
    let started = Instant::now();
    let mut result = CaseResult {
        name: w.case.name.clone(),
        vm: w.vm.name.clone(),
        verdict: Verdict::Pass,
        attempts: 0,
        earlier_failures: Vec::new(),
        duration: Duration::ZERO,
        unstable: w.case.unstable.clone(),
        forked: matches!(w.mode, Mode::Fork(_)),
        artifacts: None,
        restore_command: None,
    };
    match &w.mode {
        Mode::Skip(why) => {
            result.verdict = Verdict::Skip(why.clone());
            return result;
        }
        Mode::Fail(why) => {
            result.verdict = Verdict::Fail(why.clone());
            return result;
        }
        Mode::NotRun(why) => {
            result.verdict = Verdict::NotRun(why.clone());
            return result;
        }
        Mode::Cold | Mode::Fork(_) => {}
    }
    for attempt in 1..=w.case.retries.saturating_add(1) {
        if ctx.watchdog.expired() {
            if attempt == 1 {
                result.verdict = Verdict::NotRun(format!("not run: {}", ctx.watchdog.reason()));
            }
            break;
        }
        result.attempts = attempt;
        let outcome = match ctx.artifacts.case_dir(&w.case.name, attempt) {
            Err(e) => {
                let why = format!("artifact directory: {e}");
                if says_no_space(&why) {
                    ctx.report_disk_full(&format!(
                        "the artifact directory {} is full ({e})",
                        ctx.artifacts.root().display()
                    ));
                }
                Err(Failure::from(why))
            }
            Ok(dir) => {
                result.artifacts = Some(dir.clone());
                let outcome = match &w.case.run {
                    CaseRun::Scenario(s) => attempt_scenario(ctx, w, s, &dir),
                    CaseRun::Argv(argv) => attempt_agent(ctx, w, argv, &dir, attempt),
                };
                let _ = std::fs::write(
                    dir.join("result.txt"),
                    match &outcome {
                        Ok(()) => "pass\n".to_string(),
                        Err(f) => format!("fail: {}\n", f.reason),
                    },
                );
                outcome
            }
        };
        match outcome {
            Ok(()) => {
                if let Verdict::Fail(previous) =
                    std::mem::replace(&mut result.verdict, Verdict::Pass)
                {
                    result.earlier_failures.push(previous);
                }
                result.restore_command = None;
                break;
            }
            Err(f) => {
                let reason = if ctx.watchdog.expired() {
                    format!(
                        "stopped: {}, its VM was killed ({})",
                        ctx.watchdog.reason(),
                        f.reason
                    )
                } else {
                    f.reason
                };
                if let Verdict::Fail(previous) =
                    std::mem::replace(&mut result.verdict, Verdict::Fail(reason))
                {
                    result.earlier_failures.push(previous);
                }
                result.restore_command = f.restore_command;
            }
        }
    }
    result.duration = started.elapsed();
    result
}

/// Runs `work` with up to `jobs` cases at once (exclusive ones afterwards, alone), calling
/// `report` as each finishes; the results in suite order, once every VM is reaped.
pub fn run_all(
    ctx: &RunContext,
    work: Vec<Work>,
    jobs: usize,
    report: &(dyn Fn(&CaseResult) + Sync),
) -> Vec<CaseResult> {
    let (exclusive, shared): (Vec<Work>, Vec<Work>) =
        work.into_iter().partition(|w| w.case.exclusive);
    let queue = Mutex::new(shared.into_iter().collect::<VecDeque<Work>>());
    let results = Mutex::new(Vec::new());
    let record = |w: &Work, r: CaseResult| {
        report(&r);
        results
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((w.position, r));
    };
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                let next = queue
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pop_front();
                let Some(w) = next else { break };
                let r = run_case(ctx, &w);
                record(&w, r);
            });
        }
    });
    for w in &exclusive {
        let r = run_case(ctx, w);
        record(w, r);
    }
    ctx.reaper.finish();
    let mut results = results.into_inner().unwrap_or_else(PoisonError::into_inner);
    results.sort_by_key(|(p, _)| *p);
    results.into_iter().map(|(_, r)| r).collect()
}
