//! `skiff exec --snapshot DIR`: restore a snapshot of a VM whose agent already listens on vsock
//! port 1024, run one command in it, and discard it. No kernel boots and no agent starts, so
//! the command runs as soon as the restored guest answers.
//!
//! Such a snapshot is made once, from a VM that runs the agent as a listener:
//! `skiff run --kernel K --agent --vsock cid=3,socket=S --api-socket A`, then
//! `skiff ctl --api-socket A snapshot DIR --stop`. Each run restores it copy-on-write (the
//! snapshot's files are never written) with a fresh vsock socket in the run's private
//! directory, through the restore override of the snapshot's vsock device, connects to the
//! agent as any hybrid-vsock host program does (`CONNECT 1024`) and then goes on as a cold
//! `skiff exec` does. Whatever else the snapshot names (disks, taps) is opened as `skiff
//! restore` would open it.
//!
//! A directory that is not a snapshot skiff can restore, a snapshot without a vsock device,
//! and one in which nothing listens on port 1024 all end with `EXEC_SNAPSHOT` (207) and one
//! line saying which.

use std::os::unix::net::UnixStream;
use std::path::Path;

use super::session::{AgentLink, Session};
use super::{command_spec, run_session, setup_failed, ExecArgs, Failure, RunDir};
use crate::config::SerialConfig;
use crate::exit_code;
use crate::snapshot::authorize::{authorize, ResourceOverrides};
use crate::snapshot::host_resource::HostResource;
use crate::snapshot::restore::{load, memory_mode, restore_vm, MemoryMode};

/// virtio's `DRIVER_OK` device status bit.
const STATUS_DRIVER_OK: u8 = 4;

/// How long the restored agent may take to answer (it is already listening).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn unusable(line: String) -> Failure {
    Failure(
        exit_code::EXEC_SNAPSHOT,
        format!("{line} (exit code {})", exit_code::EXEC_SNAPSHOT),
    )
}

/// Restores `dir` and runs `args.command` in it; the exit code as `skiff exec` gives it.
pub(super) fn run(args: &ExecArgs, dir: &Path, env: Vec<Vec<u8>>) -> Result<u8, Failure> {
    let key = crate::commands::existing_key().map_err(|e| setup_failed(crate::error_chain(&e)))?;
    let snap = load(dir, key.as_ref()).map_err(|e| {
        unusable(format!(
            "--snapshot {}: not a snapshot skiff can restore: {}",
            dir.display(),
            crate::error_chain(&e)
        ))
    })?;
    let vsock_id = snap
        .resources
        .iter()
        .find_map(|r| match r {
            HostResource::Vsock { id, .. } => Some(id.clone()),
            _ => None,
        })
        .ok_or_else(|| {
            unusable(format!(
                "--snapshot {}: the snapshot has no vsock device, so no agent to reach (make it from `skiff run --agent --vsock ...`)",
                dir.display()
            ))
        })?;
    // A guest that never started its vsock driver cannot answer; say so now rather than after
    // the connect timeout.
    let driver_ok = snap.state.devices.virtio.iter().any(|d| {
        matches!(d.device, crate::virtio_devices::VirtioDeviceState::Vsock(_))
            && d.transport.common.status & STATUS_DRIVER_OK != 0
    });
    if !driver_ok {
        return Err(unusable(format!(
            "--snapshot {}: the guest had not started its vsock driver, so no agent listens",
            dir.display()
        )));
    }

    let run_dir = RunDir::create().map_err(|e| setup_failed(crate::error_chain(&e)))?;
    let serial_log = args
        .serial_log
        .clone()
        .unwrap_or_else(|| run_dir.path.join("serial.log"));
    let vsock_socket = run_dir.path.join("v");
    let overrides = ResourceOverrides {
        vsock: vec![(vsock_id, vsock_socket.clone())],
        ..ResourceOverrides::default()
    };
    let plan = authorize(&snap, &overrides).map_err(|e| {
        unusable(format!(
            "--snapshot {}: {}",
            dir.display(),
            crate::error_chain(&e)
        ))
    })?;
    let mode = memory_mode(&plan.devices, Some(MemoryMode::Cow))
        .or_else(|_| memory_mode(&plan.devices, None))
        .map_err(|e| setup_failed(crate::error_chain(&e)))?;
    // Seccomp filters as for a cold `skiff exec` (and `skiff restore`).
    let sandbox = crate::sandbox::SandboxArgs {
        seccomp: args.seccomp,
        sandbox: false,
        sandbox_allow: Vec::new(),
    };
    crate::sandbox::init(&sandbox).map_err(|e| setup_failed(crate::error_chain(&e)))?;
    let serial = SerialConfig::File(serial_log.clone());
    let vm = restore_vm(&snap, &plan, mode, &serial)
        .map_err(|e| setup_failed(crate::error_chain(&e)))?;
    // The device listens already; connecting here leaves the session thread, whose filter
    // allows no new sockets, only the `CONNECT` line to exchange once the VM runs.
    let stream = UnixStream::connect(&vsock_socket)
        .map_err(|e| setup_failed(format!("cannot connect to {}: {e}", vsock_socket.display())))?;
    let cwd = args
        .cwd
        .as_ref()
        .map(|d| std::os::unix::ffi::OsStrExt::as_bytes(d.as_os_str()).to_vec())
        .unwrap_or_default();
    let session = Session {
        link: AgentLink::Connect(stream, vsock_socket),
        exit: vm.exit.clone(),
        boot_timeout: CONNECT_TIMEOUT,
        serial_log: serial_log.clone(),
        spec: command_spec(args, env, cwd),
        daemons: Vec::new(),
    };
    let opts = crate::runner::RunOptions {
        serial,
        timeout: None,
        api_socket: None,
        description: snap.manifest.vm.clone(),
        // As for a cold `skiff exec`: seccomp filters, no Landlock rules.
        sandbox_paths: crate::sandbox::SandboxPaths::default(),
    };
    run_session(vm, &opts, session, &serial_log, run_dir)
}
