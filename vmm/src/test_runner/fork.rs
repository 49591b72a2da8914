//! Snapshot-forked starts: a `fork = true` VM boots once, runs its `setup` commands through
//! the agent, quiesces the agent and is stopped into a snapshot (`skiff ctl snapshot --stop`)
//! in the artifact directory. Each case then restores that snapshot copy-on-write in a new
//! process with its own vsock socket (`--vsock id=vsock0,socket=`) and, for every writable disk,
//! its own copy (`--disk id=diskN,path=`), reflinked where the file system can. Read-only disks
//! are shared. A snapshot that does not fit on its file system is told apart, so `skiff test`
//! can say so in one line and exit with a code of its own.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agent_protocol::Message;
use thiserror::Error;

use super::launch::{run_setup, says_no_space, serial_tail, vm_args, LaunchError, RunContext};
use super::suite::VmSpec;
use super::vm_process::{connect_agent, exit_code};

/// Why a fork's `skiff restore` arguments could not be made.
#[derive(Debug, Error)]
pub enum ForkError {
    /// A writable disk could not be copied for the fork.
    #[error("copying disk {} for this fork", .path.display())]
    CopyDisk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How long the stopped VM may take to exit after its snapshot.
const STOP_PATIENCE: Duration = Duration::from_secs(30);

/// A booted, set-up VM, stopped into a snapshot.
#[derive(Debug)]
pub struct ForkBase {
    /// The snapshot directory.
    pub snapshot: PathBuf,
    /// The writable disks each fork gets a copy of: (snapshot device id, original).
    pub writable_disks: Vec<(String, PathBuf)>,
}

/// Why a fork base could not be made: the reason its cases fail.
#[derive(Debug, Clone)]
pub struct BaseFailure {
    pub reason: String,
    /// The snapshot did not fit: its file system is full (or over quota).
    pub no_space: bool,
}

impl From<String> for BaseFailure {
    fn from(reason: String) -> Self {
        Self {
            reason,
            no_space: false,
        }
    }
}

impl From<LaunchError> for BaseFailure {
    fn from(e: LaunchError) -> Self {
        crate::error_chain(&e).into()
    }
}

/// Boots `vm`, runs its setup and snapshots it; the error is the reason its cases fail.
pub fn prepare(ctx: &RunContext, vm: &VmSpec, index: usize) -> Result<ForkBase, BaseFailure> {
    prepare_base(ctx, vm, index).map_err(|f| BaseFailure {
        no_space: f.no_space || says_no_space(&f.reason),
        reason: f.reason,
    })
}

fn prepare_base(ctx: &RunContext, vm: &VmSpec, index: usize) -> Result<ForkBase, BaseFailure> {
    let mut writable_disks = Vec::new();
    for (n, disk) in vm.disks.iter().enumerate() {
        if disk.readonly {
            continue;
        }
        let meta = std::fs::metadata(&disk.path)
            .map_err(|e| format!("disk {}: {e}", disk.path.display()))?;
        if !meta.is_file() || meta.file_type().is_block_device() {
            return Err(format!(
                "vm {:?}: writable disk {} is not a regular file, so a fork cannot get its own copy (make it readonly = true, or fork = false)",
                vm.name,
                disk.path.display()
            ).into());
        }
        writable_disks.push((format!("disk{n}"), disk.path.clone()));
    }
    let dir = ctx
        .artifacts
        .vm_dir(&vm.name)
        .map_err(|e| format!("vm {:?}: artifact directory: {e}", vm.name))?;
    let socket = ctx.runtime.join(format!("vm{index}.v"));
    let api = ctx.runtime.join(format!("vm{index}.api"));
    let mut args = vm_args(vm, &socket, &dir.join("serial.log"));
    args.push("--api-socket".into());
    args.push(api.clone().into());
    let mut base = ctx.spawn(&args, &dir)?;
    let fail = |why: String| format!("{why}{}", serial_tail(&dir.join("serial.log")));
    let mut client =
        connect_agent(&socket, Instant::now() + vm.boot_timeout, &mut base).map_err(|e| {
            fail(format!(
                "vm {:?} did not come up: {}",
                vm.name,
                crate::error_chain(&e)
            ))
        })?;
    let mut transcript = std::fs::File::create(dir.join("setup-transcript.log"))
        .map_err(|e| format!("vm {:?}: artifact directory: {e}", vm.name))?;
    run_setup(&mut client, vm, &dir, &mut transcript, &mut base)
        .map_err(|e| fail(format!("vm {:?}: {}", vm.name, crate::error_chain(&e))))?;
    client
        .request_done(&Message::Quiesce, || false)
        .map_err(|e| fail(format!("vm {:?}: agent quiesce: {e:?}", vm.name)))?;
    drop(client);
    let snapshot = dir.join("snapshot");
    let out = Command::new(&ctx.skiff)
        .arg("ctl")
        .arg("--api-socket")
        .arg(&api)
        .arg("snapshot")
        .arg(&snapshot)
        .arg("--stop")
        .output()
        .map_err(|e| format!("cannot run skiff ctl: {e}"))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if says_no_space(&why) {
            return Err(BaseFailure {
                reason: format!(
                    "vm {:?}: its snapshot does not fit in {}: the file system is full ({why})",
                    vm.name,
                    snapshot.display()
                ),
                no_space: true,
            });
        }
        return Err(format!("vm {:?}: snapshot failed: {why}", vm.name).into());
    }
    match base.wait_until(Instant::now() + STOP_PATIENCE) {
        Some(s) if s.success() => {}
        Some(s) => {
            return Err(format!(
                "vm {:?}: skiff exited {} after its snapshot",
                vm.name,
                exit_code(s)
            )
            .into())
        }
        None => {
            return Err(format!("vm {:?}: skiff did not stop after its snapshot", vm.name).into())
        }
    }
    Ok(ForkBase {
        snapshot,
        writable_disks,
    })
}

/// `skiff restore` arguments for one fork: its own vsock socket and serial log, and a copy of
/// each writable disk in `dir`.
pub fn restore_args(
    base: &ForkBase,
    socket: &Path,
    serial: &Path,
    dir: &Path,
) -> Result<Vec<OsString>, ForkError> {
    let mut args: Vec<OsString> = vec!["restore".into(), base.snapshot.clone().into()];
    let mut vsock = OsString::from("id=vsock0,socket=");
    vsock.push(socket);
    args.extend(["--vsock".into(), vsock]);
    let mut serial_arg = OsString::from("file=");
    serial_arg.push(serial);
    args.extend(["--serial".into(), serial_arg]);
    for (id, original) in &base.writable_disks {
        let copy = dir.join(format!("{id}.img"));
        copy_disk(original, &copy).map_err(|source| ForkError::CopyDisk {
            path: original.clone(),
            source,
        })?;
        let mut spec = OsString::from(format!("id={id},path="));
        spec.push(&copy);
        args.extend(["--disk".into(), spec]);
    }
    Ok(args)
}

/// Copies `from` to `to`: a reflink (`FICLONE`) where the file system shares extents, else a
/// plain copy.
fn copy_disk(from: &Path, to: &Path) -> std::io::Result<()> {
    /// `_IOW(0x94, 9, int)`.
    const FICLONE: libc::c_ulong = 0x4004_9409;
    let src = std::fs::File::open(from)?;
    let dst = std::fs::File::create(to)?;
    // SAFETY: FICLONE reads the source descriptor number and changes only `dst`'s extents;
    // both descriptors are open for the duration of the call.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        return Ok(());
    }
    drop(dst);
    std::fs::copy(from, to).map(|_| ())
}
