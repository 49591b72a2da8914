//! Running cases: up to `--jobs` at once (cases with `exclusive = true` afterwards, one at a
//! time), each attempted up to `1 + retries` times in a fresh VM, booted cold or restored from
//! its VM's fork snapshot. A case passes on the expected exit code and, when given, output
//! matching its pattern (the command's stdout for agent cases, the serial log for scenarios).
//! Timeouts: the agent kills the command's process group at the case timeout; the VM's process
//! group is killed after a grace period if no answer comes, and scenario VMs at the timeout.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_protocol::{ExitStatus, Message};

use super::artifacts::Artifacts;
use super::fork::{restore_args, ForkBase};
use super::report::{CaseResult, Verdict};
use super::suite::{AgentKind, CaseRun, CaseSpec, VmSpec};
use super::vm_process::{connect_agent, exit_code, VmProcess};
use crate::exec::client::{AgentClient, CommandEnd, CommandSpec, Interrupt};

/// How long past a case's timeout the agent may take to report it before the VM is killed.
const GRACE: Duration = Duration::from_secs(5);
/// Serial lines quoted in a boot failure.
const SERIAL_TAIL_LINES: usize = 3;

/// What every case of a run shares.
#[derive(Debug)]
pub struct RunContext {
    /// The skiff binary to start VMs with.
    pub skiff: PathBuf,
    pub artifacts: Artifacts,
    /// An owner-only directory for vsock and API sockets (short paths).
    pub runtime: PathBuf,
    /// Stop a failing agent case's VM into a snapshot.
    pub snapshot_on_failure: bool,
}

/// How a case is to be run.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Not run: this reason.
    Skip(String),
    /// Not run, failed: this reason (an unmet `--require`, a failed fork setup).
    Fail(String),
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

/// `; serial: A | B | C` with the log's last lines, or nothing.
pub fn serial_tail(log: &Path) -> String {
    let Ok(bytes) = std::fs::read(log) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = &lines[lines.len().saturating_sub(SERIAL_TAIL_LINES)..];
    format!("; serial: {}", tail.join(" | "))
}

/// `skiff run` arguments for `vm` with its agent on `socket` (no agent: none) and the serial
/// console in `serial`.
pub fn vm_args(vm: &VmSpec, socket: &Path, serial: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["run".into(), "--kernel".into(), vm.kernel.clone().into()];
    if let Some(initrd) = &vm.initrd {
        args.extend(["--initrd".into(), initrd.clone().into()]);
    }
    if let Some(cpus) = vm.cpus {
        args.extend(["--cpus".into(), cpus.to_string().into()]);
    }
    if let Some(memory) = &vm.memory {
        args.extend(["--memory".into(), memory.into()]);
    }
    for disk in &vm.disks {
        let mut spec = OsString::from("path=");
        spec.push(&disk.path);
        if disk.readonly {
            spec.push(",readonly=on");
        }
        args.extend(["--disk".into(), spec]);
    }
    for net in &vm.net {
        args.extend(["--net".into(), net.into()]);
    }
    let mut serial_arg = OsString::from("file=");
    serial_arg.push(serial);
    args.extend(["--serial".into(), serial_arg]);
    let mut cmdline = vm.cmdline.clone();
    if vm.agent != AgentKind::None {
        let mut vsock = OsString::from("cid=3,socket=");
        vsock.push(socket);
        args.extend(["--vsock".into(), vsock]);
    }
    match vm.agent {
        AgentKind::Testguest => cmdline = format!("{cmdline} agent-listen").trim().to_string(),
        AgentKind::Linux => args.push("--agent".into()),
        AgentKind::None => {}
    }
    if !cmdline.is_empty() {
        args.extend(["--cmdline".into(), cmdline.into()]);
    }
    args
}

fn spec(argv: &[String], timeout: Option<Duration>) -> CommandSpec {
    CommandSpec {
        argv: argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env: Vec::new(),
        cwd: Vec::new(),
        timeout,
        forward_stdin: false,
    }
}

fn describe(end: &CommandEnd, vm: &mut VmProcess) -> String {
    match end {
        CommandEnd::Exit(ExitStatus::Code(c)) => format!("exit {c}"),
        CommandEnd::Exit(ExitStatus::Signal(s)) => format!("killed by signal {s}"),
        CommandEnd::Exit(ExitStatus::TimedOut) => "timed out".into(),
        CommandEnd::NotStarted(m) => format!("not started: {m}"),
        CommandEnd::Interrupted(i) => {
            // A lost connection is usually the VM ending: give it a moment to say how.
            let ended = vm.wait_until(Instant::now() + Duration::from_millis(500));
            let how = match i {
                Interrupt::Stopped => "no answer".to_string(),
                Interrupt::Lost(m) => format!("agent lost: {m}"),
                Interrupt::Garbage(m) => format!("agent protocol broken: {m}"),
            };
            match ended {
                Some(s) => format!("{how}; the VM ended (skiff exit {})", exit_code(s)),
                None => how,
            }
        }
    }
}

/// Runs the VM's setup commands, each of which must exit 0.
pub fn run_setup(
    client: &mut AgentClient,
    vm: &VmSpec,
    dir: &Path,
    transcript: &mut std::fs::File,
    proc: &mut VmProcess,
) -> Result<(), String> {
    for (n, argv) in vm.setup.iter().enumerate() {
        let mut out = std::fs::File::create(dir.join(format!("setup-{n}.stdout")))
            .map_err(|e| format!("artifact: {e}"))?;
        let mut err = std::fs::File::create(dir.join(format!("setup-{n}.stderr")))
            .map_err(|e| format!("artifact: {e}"))?;
        let _ = writeln!(transcript, "-> Exec {argv:?} (setup)");
        let end = client.run(
            &spec(argv, Some(vm.boot_timeout)),
            &mut out,
            &mut err,
            || proc.ended().is_some(),
        );
        let what = describe(&end, proc);
        let _ = writeln!(transcript, "<- {what}");
        if end != CommandEnd::Exit(ExitStatus::Code(0)) {
            return Err(format!("setup command {argv:?} failed: {what}"));
        }
    }
    Ok(())
}

fn entropy() -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0u8; 32];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)) {
        Ok(()) => buf,
        Err(_) => Vec::new(),
    }
}

fn matches_output(case: &CaseSpec, file: &Path) -> Result<(), String> {
    let Some(pattern) = &case.output else {
        return Ok(());
    };
    let text = std::fs::read(file).map_err(|e| format!("reading {}: {e}", file.display()))?;
    if pattern.is_match(&String::from_utf8_lossy(&text)) {
        Ok(())
    } else {
        Err(format!(
            "output does not match /{}/ (see {})",
            pattern.as_str(),
            file.display()
        ))
    }
}

/// A test-guest scenario, booted cold with the scenario on the command line.
fn attempt_scenario(ctx: &RunContext, w: &Work, scenario: &str, dir: &Path) -> Result<(), Failure> {
    let mut vm = (*w.vm).clone();
    vm.cmdline = format!("{} {scenario}", vm.cmdline).trim().to_string();
    let serial = dir.join("serial.log");
    let args = vm_args(&vm, Path::new(""), &serial);
    let mut proc =
        VmProcess::spawn(&ctx.skiff, &args, dir).map_err(|e| format!("cannot start skiff: {e}"))?;
    let Some(status) = proc.wait_until(Instant::now() + w.case.timeout) else {
        proc.kill();
        return Err(format!(
            "timed out after {:.1} s (the VM's process group was killed){}",
            w.case.timeout.as_secs_f64(),
            serial_tail(&serial)
        )
        .into());
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
    let mut proc =
        VmProcess::spawn(&ctx.skiff, &args, dir).map_err(|e| format!("cannot start skiff: {e}"))?;
    let mut transcript = std::fs::File::create(dir.join("agent-transcript.log"))
        .map_err(|e| format!("artifact: {e}"))?;
    let boot_fail = |why: String| format!("{why}{}", serial_tail(&serial));
    let mut client =
        connect_agent(&socket, Instant::now() + w.vm.boot_timeout, &mut proc).map_err(boot_fail)?;
    let _ = writeln!(transcript, "-> Hello, <- HelloReply");
    if let Mode::Fork(_) = w.mode {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let seed = entropy();
        let _ = writeln!(transcript, "-> Resume");
        client
            .request_done(
                &Message::Resume {
                    unix_time_ns: now,
                    entropy: &seed,
                },
                || proc.ended().is_some(),
            )
            .map_err(|e| format!("agent resume: {e:?}"))?;
    } else {
        run_setup(&mut client, &w.vm, dir, &mut transcript, &mut proc)
            .map_err(|e| Failure::from(format!("setup of vm {:?} failed: {e}", w.vm.name)))?;
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
    let what = describe(&end, &mut proc);
    let _ = writeln!(transcript, "<- {what}");
    let verdict = match &end {
        CommandEnd::Exit(ExitStatus::Code(c)) if *c == w.case.exit_code => {
            matches_output(&w.case, &stdout_path)
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
        snapshot_failed_vm(ctx, &api, dir, &mut proc)
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
        Mode::Cold | Mode::Fork(_) => {}
    }
    for attempt in 1..=w.case.retries.saturating_add(1) {
        result.attempts = attempt;
        let outcome = match ctx.artifacts.case_dir(&w.case.name, attempt) {
            Err(e) => Err(Failure::from(format!("artifact directory: {e}"))),
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
                if let Verdict::Fail(previous) =
                    std::mem::replace(&mut result.verdict, Verdict::Fail(f.reason))
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
/// `report` as each finishes; the results in suite order.
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
    let mut results = results.into_inner().unwrap_or_else(PoisonError::into_inner);
    results.sort_by_key(|(p, _)| *p);
    results.into_iter().map(|(_, r)| r).collect()
}
