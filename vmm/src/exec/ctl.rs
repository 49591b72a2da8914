//! `skiff ctl exec`: runs one command through the agent of a VM started with `skiff run
//! --agent`. It connects to the VM's vsock socket as any hybrid-vsock host program does
//! (`CONNECT 1024`, `OK <port>`), then speaks the agent protocol on that connection, so several
//! can run at once and output streams without skiff buffering it. Exit codes are `skiff exec`'s.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use super::client::{AgentClient, CommandEnd, CommandSpec, Interrupt};
use super::session::SessionEnd;
use crate::config::parse_timeout;

/// `skiff ctl exec` options.
#[derive(Debug, clap::Args)]
pub struct CtlExecArgs {
    /// The VM's vsock socket (the `socket=` of its `--vsock`).
    #[arg(long, value_name = "PATH")]
    pub vsock: PathBuf,
    /// The command's time limit in seconds (exit code 124).
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    /// The command's working directory in the guest.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<PathBuf>,
    /// Set an environment variable for the command (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// The command and its arguments.
    #[arg(required = true, last = true, value_name = "CMD")]
    pub command: Vec<std::ffi::OsString>,
}

/// Runs the command and returns skiff's exit code (printing one line for its own failures).
pub fn run(args: CtlExecArgs) -> ExitCode {
    let end = run_inner(&args);
    let (code, line) = end.report(None);
    if let Some(line) = line {
        eprintln!("skiff: {line}");
    }
    ExitCode::from(code)
}

fn run_inner(args: &CtlExecArgs) -> SessionEnd {
    if let Some(bad) = args
        .env
        .iter()
        .find(|e| e.split_once('=').is_none_or(|(k, _)| k.is_empty()))
    {
        return SessionEnd::Internal(format!("--env {bad}: expected KEY=VALUE"));
    }
    let stream = match connect_agent(&args.vsock) {
        Ok(s) => s,
        Err(end) => return end,
    };
    let mut client = match AgentClient::new(stream) {
        Ok(c) => c,
        Err(e) => return SessionEnd::Internal(format!("agent connection: {e}")),
    };
    let spec = CommandSpec {
        argv: args.command.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env: args.env.iter().map(|e| e.as_bytes().to_vec()).collect(),
        cwd: args
            .cwd
            .as_ref()
            .map(|c| c.as_os_str().as_bytes().to_vec())
            .unwrap_or_default(),
        timeout: args.timeout,
        forward_stdin: !std::io::IsTerminal::is_terminal(&std::io::stdin()),
        stdin: Vec::new(),
    };
    let never = || false;
    if let Err(i) = client.hello(never) {
        return interrupted(i);
    }
    match client.run(
        &spec,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
        never,
    ) {
        CommandEnd::Exit(status) => SessionEnd::Command(status),
        CommandEnd::NotStarted(m) => SessionEnd::NotStarted(m),
        CommandEnd::Interrupted(i) => interrupted(i),
    }
}

fn interrupted(i: Interrupt) -> SessionEnd {
    match i {
        Interrupt::Stopped => SessionEnd::Lost("stopped".into()),
        Interrupt::Lost(m) => SessionEnd::Lost(m),
        Interrupt::Garbage(m) => SessionEnd::Garbage(m),
    }
}

/// Connects to the agent's port behind the vsock socket `vsock` through the device's
/// `CONNECT` handshake.
fn connect_agent(vsock: &Path) -> Result<UnixStream, SessionEnd> {
    Ok(super::vsock_connect::connect_agent(vsock)?)
}
