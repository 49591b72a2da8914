//! The runner's pieces for Rust tests: a VM booted from a `VmSpec` or forked from a snapshot
//! (`TestVm::boot`, `TestVm::fork`), commands run and files read and written through its agent,
//! stopped into a snapshot to fork more from. The agent connection is the library's own; a test
//! that drives the VM's agent another way (`skiff ctl exec`, `POST /vm/exec`) first closes it
//! (`disconnect`: the test guest's agent serves one connection at a time), and the next call
//! that needs it connects again. Every VM is a `skiff` child in a process group of its own,
//! killed with everything it started when the `TestVm` is dropped, so a failing test leaves
//! nothing running. Logs (serial, skiff's stdout and stderr, the command line) go to the
//! directory the test gives, which also holds the VM's sockets (keep its path short).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agent_protocol::{ExitStatus, Message};
use thiserror::Error;

use super::launch::{describe, resume, run_setup, serial_tail, spec, vm_args};
use super::suite::VmSpec;
use super::vm_process::{connect_agent, exit_code, Greeting, VmProcess};
use crate::exec::client::{AgentClient, CommandEnd};

/// How long a command may run unless the test says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a restored VM may take until its agent answers.
const FORK_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest file `read_file` returns.
const READ_LIMIT: usize = 16 << 20;
/// How long a VM may take to exit after `snapshot --stop`.
const STOP_PATIENCE: Duration = Duration::from_secs(30);

/// What went wrong with a test VM.
#[derive(Debug, Error)]
pub enum TestVmError {
    /// A log file or the skiff process could not be made.
    #[error("cannot start skiff {}: {source}", .skiff.display())]
    Start {
        skiff: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The agent did not answer (the text says why, with the serial tail).
    #[error("the VM did not come up: {0}")]
    Boot(String),
    /// A `setup` command failed.
    #[error("setup: {0}")]
    Setup(String),
    /// The agent connection failed, or it refused a request.
    #[error("agent: {0}")]
    Agent(String),
    /// The command did not end by itself (timed out, not started, connection lost).
    #[error("{argv:?}: {how}")]
    Command { argv: Vec<String>, how: String },
    /// `skiff ctl snapshot` failed.
    #[error("snapshot {}: {message}", .path.display())]
    Snapshot { path: PathBuf, message: String },
}

/// A command's end and output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    /// The exit code, if the command exited.
    pub fn code(&self) -> Option<i32> {
        match self.status {
            ExitStatus::Code(c) => Some(c),
            _ => None,
        }
    }

    /// Stdout as text (lossy).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// A running VM with an agent connection; killed on drop.
#[derive(Debug)]
pub struct TestVm {
    skiff: PathBuf,
    dir: PathBuf,
    api: PathBuf,
    /// The VM's vsock socket (`--vsock ...,socket=`).
    vsock: PathBuf,
    // Dropped before `proc`: the connection closes first. `None` after `disconnect`.
    client: Option<AgentClient>,
    proc: VmProcess,
}

/// The agent connection in `client`, made again (as at a fork) if `disconnect` closed it.
fn agent<'a>(
    client: &'a mut Option<AgentClient>,
    vsock: &Path,
    proc: &mut VmProcess,
) -> Result<&'a mut AgentClient, TestVmError> {
    if client.is_none() {
        let c = connect_agent(
            vsock,
            Instant::now() + FORK_TIMEOUT,
            proc,
            Greeting::Answered,
        )
        .map_err(|e| TestVmError::Agent(format!("reconnect: {e}")))?;
        *client = Some(c);
    }
    client
        .as_mut()
        .ok_or_else(|| TestVmError::Agent("no agent connection".into()))
}

fn start(skiff: &Path, args: &[OsString], dir: &Path) -> Result<VmProcess, TestVmError> {
    VmProcess::spawn(skiff, args, dir, None).map_err(|source| TestVmError::Start {
        skiff: skiff.to_path_buf(),
        source,
    })
}

impl TestVm {
    /// Boots `vm` (which needs an agent) with `skiff`, logs and sockets in `dir`, waits for its
    /// agent (`vm.boot_timeout`) and runs its `setup` commands.
    pub fn boot(skiff: &Path, vm: &VmSpec, dir: &Path) -> Result<Self, TestVmError> {
        let socket = dir.join("agent.v");
        let api = dir.join("api.sock");
        let mut args = vm_args(vm, &socket, &dir.join("serial.log"));
        args.extend(["--api-socket".into(), api.clone().into()]);
        let mut proc = start(skiff, &args, dir)?;
        let mut client = connect_agent(
            &socket,
            Instant::now() + vm.boot_timeout,
            &mut proc,
            Greeting::Answered,
        )
        .map_err(|e| {
            TestVmError::Boot(format!(
                "{}{}",
                crate::error_chain(&e),
                serial_tail(&dir.join("serial.log"))
            ))
        })?;
        let mut transcript =
            std::fs::File::create(dir.join("agent-transcript.log")).map_err(|source| {
                TestVmError::Start {
                    skiff: skiff.to_path_buf(),
                    source,
                }
            })?;
        run_setup(&mut client, vm, dir, &mut transcript, &mut proc)
            .map_err(|e| TestVmError::Setup(crate::error_chain(&e)))?;
        Ok(Self {
            skiff: skiff.to_path_buf(),
            dir: dir.to_path_buf(),
            api,
            vsock: socket,
            client: Some(client),
            proc,
        })
    }

    /// Restores `snapshot` copy-on-write with `skiff` as a new VM with its own agent socket,
    /// logs and sockets in `dir`, and sends it `Resume` (the wall clock, fresh entropy).
    pub fn fork(skiff: &Path, snapshot: &Path, dir: &Path) -> Result<Self, TestVmError> {
        let socket = dir.join("agent.v");
        let api = dir.join("api.sock");
        let mut vsock = OsString::from("id=vsock0,socket=");
        vsock.push(&socket);
        let mut serial = OsString::from("file=");
        serial.push(dir.join("serial.log"));
        let args: Vec<OsString> = vec![
            "restore".into(),
            snapshot.into(),
            "--vsock".into(),
            vsock,
            "--serial".into(),
            serial,
            "--api-socket".into(),
            api.clone().into(),
        ];
        let mut proc = start(skiff, &args, dir)?;
        // Hello and Resume in one round trip.
        let mut client = connect_agent(
            &socket,
            Instant::now() + FORK_TIMEOUT,
            &mut proc,
            Greeting::Pipelined,
        )
        .map_err(|e| {
            TestVmError::Boot(format!(
                "{}{}",
                crate::error_chain(&e),
                serial_tail(&dir.join("serial.log"))
            ))
        })?;
        resume(&mut client, &mut proc).map_err(|e| TestVmError::Agent(format!("resume: {e:?}")))?;
        Ok(Self {
            skiff: skiff.to_path_buf(),
            dir: dir.to_path_buf(),
            api,
            vsock: socket,
            client: Some(client),
            proc,
        })
    }

    /// Runs `argv` to its end (timeout 60 s).
    pub fn exec(&mut self, argv: &[&str]) -> Result<Output, TestVmError> {
        self.exec_with_timeout(argv, DEFAULT_TIMEOUT)
    }

    /// Runs `argv` with `timeout`; a command that does not exit by itself is an error.
    pub fn exec_with_timeout(
        &mut self,
        argv: &[&str],
        timeout: Duration,
    ) -> Result<Output, TestVmError> {
        let argv: Vec<String> = argv.iter().map(|a| (*a).to_string()).collect();
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let client = agent(&mut self.client, &self.vsock, &mut self.proc)?;
        let proc = &mut self.proc;
        let end = client.run(
            &spec(&argv, Some(timeout)),
            &mut stdout,
            &mut stderr,
            || proc.ended().is_some(),
        );
        match end {
            CommandEnd::Exit(status @ (ExitStatus::Code(_) | ExitStatus::Signal(_))) => {
                Ok(Output {
                    status,
                    stdout,
                    stderr,
                })
            }
            other => Err(TestVmError::Command {
                argv,
                how: describe(&other, &mut self.proc),
            }),
        }
    }

    /// The guest file at `path`, read through the agent.
    pub fn read_file(&mut self, path: &str) -> Result<Vec<u8>, TestVmError> {
        let client = agent(&mut self.client, &self.vsock, &mut self.proc)?;
        let proc = &mut self.proc;
        match client.read_file(path.as_bytes(), READ_LIMIT, || proc.ended().is_some()) {
            Ok(Ok(data)) => Ok(data),
            Ok(Err(refused)) => Err(TestVmError::Agent(format!("read {path}: {refused}"))),
            Err(e) => Err(TestVmError::Agent(format!("read {path}: {e:?}"))),
        }
    }

    /// Writes `data` to the guest file at `path` (replacing it) through the agent.
    pub fn write_file(&mut self, path: &str, data: &[u8]) -> Result<(), TestVmError> {
        let client = agent(&mut self.client, &self.vsock, &mut self.proc)?;
        let proc = &mut self.proc;
        match client.write_file(path.as_bytes(), data, || proc.ended().is_some()) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(refused)) => Err(TestVmError::Agent(format!("write {path}: {refused}"))),
            Err(e) => Err(TestVmError::Agent(format!("write {path}: {e:?}"))),
        }
    }

    /// Closes the library's agent connection, so another client can reach an agent that
    /// serves one connection at a time; the next call that needs the agent connects again.
    pub fn disconnect(&mut self) {
        self.client = None;
    }

    /// The VM's vsock socket, for `skiff ctl exec --vsock` or any hybrid-vsock host program.
    pub fn vsock_socket(&self) -> &Path {
        &self.vsock
    }

    /// The VM's control API socket (`--api-socket`).
    pub fn api_socket(&self) -> &Path {
        &self.api
    }

    /// Quiesces the agent and stops the VM into a snapshot at `path` (to `fork` from).
    pub fn snapshot(mut self, path: &Path) -> Result<(), TestVmError> {
        let fail = |message: String| TestVmError::Snapshot {
            path: path.to_path_buf(),
            message,
        };
        let client = agent(&mut self.client, &self.vsock, &mut self.proc)?;
        let proc = &mut self.proc;
        client
            .request_done(&Message::Quiesce, || proc.ended().is_some())
            .map_err(|e| fail(format!("agent quiesce: {e:?}")))?;
        let out = Command::new(&self.skiff)
            .arg("ctl")
            .arg("--api-socket")
            .arg(&self.api)
            .arg("snapshot")
            .arg(path)
            .arg("--stop")
            .output()
            .map_err(|e| fail(format!("cannot run skiff ctl: {e}")))?;
        if !out.status.success() {
            return Err(fail(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        match self.proc.wait_until(Instant::now() + STOP_PATIENCE) {
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(fail(format!("skiff exited {} after it", exit_code(s)))),
            None => Err(fail("skiff did not stop after it".into())),
        }
    }

    /// The serial console so far.
    pub fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.dir.join("serial.log")).unwrap_or_default())
            .into_owned()
    }

    /// The skiff process's id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// skiff's exit code once it has ended.
    pub fn ended(&mut self) -> Option<i32> {
        self.proc.ended().map(exit_code)
    }
}
