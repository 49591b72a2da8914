//! The `skiff restore`, `snapshot-info`, `snapshot-verify`, `snapshot-merge` and `ctl`
//! subcommands: their arguments (clap) and what they do. `main.rs` parses the command line and
//! reports outcomes; `skiff run` stays there.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::api::client;
use crate::config::resource_override::{
    DiskOverride, NetOverride, VhostUserOverride, VsockOverride,
};
use crate::config::{parse_timeout, SerialConfig};
use crate::runner::{run_vm, RunOptions, RunOutcome};
use crate::sandbox::{SandboxArgs, SandboxPaths};
use crate::snapshot::auth::{default_key_path, SnapshotKey};
use crate::snapshot::authorize::{authorize, ResourceOverrides};
use crate::snapshot::restore::{load, memory_mode, restore_vm, LoadedSnapshot, MemoryMode};

/// `skiff restore DIR ...`
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The snapshot directory.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Guest RAM from the memory files: cow (map them copy-on-write; fast, not shareable with
    /// vhost-user backends) or copy (copy into fresh memory). Default: cow, or copy for a
    /// snapshot with vhost-user devices.
    #[arg(long, value_name = "MODE")]
    pub memory_mode: Option<MemoryMode>,
    /// Serve the control API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Serial port (COM1) output: stdio, file=PATH or off.
    #[arg(long, value_name = "MODE", default_value = "stdio")]
    pub serial: SerialConfig,
    /// End the guest after this many seconds (exit code 124).
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// Write how skiff ended (reason, exit code, detail) to this file as JSON, atomically.
    #[arg(long, value_name = "PATH")]
    pub exit_status_file: Option<PathBuf>,
    /// Check the snapshot first, as `skiff snapshot-verify` does (every memory file read and
    /// summed against the manifest), and refuse it on the first problem.
    #[arg(long)]
    pub verify: bool,
    /// Use this disk for the snapshot's disk ID: id=ID,path=PATH (repeatable; ids as
    /// `skiff snapshot-info` shows them).
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<DiskOverride>,
    /// Use this tap for the snapshot's net device ID: id=ID,tap=TAP (repeatable).
    #[arg(long = "net", value_name = "SPEC")]
    pub nets: Vec<NetOverride>,
    /// Use this backend socket for the snapshot's vhost-user device ID: id=ID,socket=PATH
    /// (repeatable).
    #[arg(long = "vhost-user", value_name = "SPEC")]
    pub vhost_user: Vec<VhostUserOverride>,
    /// Listen on this socket for the snapshot's vsock device ID: id=ID,socket=PATH.
    #[arg(long = "vsock", value_name = "SPEC")]
    pub vsock: Vec<VsockOverride>,
    /// A diff snapshot's parent directory (instead of the one the diff names).
    #[arg(long, value_name = "DIR")]
    pub parent: Option<PathBuf>,
}

impl RestoreArgs {
    fn overrides(&self) -> ResourceOverrides {
        ResourceOverrides {
            disks: self
                .disks
                .iter()
                .map(|d| (d.id.clone(), d.path.clone()))
                .collect(),
            nets: self
                .nets
                .iter()
                .map(|n| (n.id.clone(), n.tap.clone()))
                .collect(),
            vhost_user: self
                .vhost_user
                .iter()
                .map(|v| (v.id.clone(), v.socket.clone()))
                .collect(),
            vsock: self
                .vsock
                .iter()
                .map(|v| (v.id.clone(), v.socket.clone()))
                .collect(),
            parent: self.parent.clone(),
        }
    }
}

/// This user's snapshot key if it exists (restore and inspection never create it: without one,
/// nothing can be authenticated anyway). A key file that is unusable is an error.
pub(crate) fn existing_key() -> Result<Option<SnapshotKey>, String> {
    match default_key_path() {
        Ok(path) => SnapshotKey::load(&path).map_err(|e| crate::error_chain(&e)),
        Err(_) => Ok(None),
    }
}

/// Restores the snapshot and runs the VM to its end; `ready` is called once the VM is built,
/// just before it runs. The error is one line.
pub fn restore(args: RestoreArgs, ready: impl FnOnce()) -> Result<RunOutcome, String> {
    crate::sandbox::init(&args.sandbox).map_err(|e| crate::error_chain(&e))?;
    if args.verify {
        let (problems, _) = crate::snapshot::integrity::verify(&args.dir, args.parent.as_deref());
        if let Some(first) = problems.first() {
            let more = match problems.len() - 1 {
                0 => String::new(),
                n => format!(" (and {n} more problem(s); skiff snapshot-verify lists them)"),
            };
            return Err(format!(
                "snapshot {} failed verification: {first}{more}",
                args.dir.display()
            ));
        }
    }
    let key = existing_key()?;
    let snap = load(&args.dir, key.as_ref()).map_err(|e| crate::error_chain(&e))?;
    let plan = authorize(&snap, &args.overrides()).map_err(|e| crate::error_chain(&e))?;
    let mode = memory_mode(&plan.devices, args.memory_mode).map_err(|e| crate::error_chain(&e))?;
    let vm = restore_vm(&snap, &plan, mode, &args.serial).map_err(|e| crate::error_chain(&e))?;
    let sandbox_paths = SandboxPaths::for_restore(
        &args.dir,
        &args.serial,
        args.api_socket.as_deref(),
        &args.sandbox.sandbox_allow,
    );
    ready();
    let opts = RunOptions {
        serial: args.serial,
        timeout: args.timeout,
        api_socket: args.api_socket,
        description: snap.manifest.vm.clone(),
        sandbox_paths,
    };
    run_vm(vm, &opts).map_err(|e| crate::error_chain(&e))
}

/// `skiff snapshot-verify DIR`
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The snapshot directory (a diff's parents are checked too).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

/// Checks a snapshot against its manifest: one `skiff:` line on stderr per problem and exit 1,
/// or one summary line on stdout and exit 0.
pub fn snapshot_verify(args: VerifyArgs) -> ExitCode {
    let (problems, bytes) = crate::snapshot::integrity::verify(&args.dir, None);
    if problems.is_empty() {
        println!(
            "{}: ok ({bytes} bytes of memory data match their checksums)",
            args.dir.display()
        );
        return ExitCode::SUCCESS;
    }
    for p in &problems {
        eprintln!("skiff: {p}");
    }
    ExitCode::from(crate::exit_code::VMM_ERROR)
}

/// `skiff snapshot-merge DIFF [PARENT]`
#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// The diff snapshot to replace with the equivalent full snapshot.
    #[arg(value_name = "DIFF")]
    pub dir: PathBuf,
    /// Its parent, when it no longer sits where the diff says (its checksum must still match).
    #[arg(value_name = "PARENT")]
    pub parent: Option<PathBuf>,
}

/// Folds a diff and its parents into a full snapshot in the diff's place; prints a JSON
/// summary. The error is one line.
pub fn snapshot_merge(args: MergeArgs) -> Result<(), String> {
    let key = existing_key()?;
    let report = crate::snapshot::chain::merge(&args.dir, args.parent.as_deref(), key.as_ref())
        .map_err(|e| crate::error_chain(&e))?;
    println!(
        "{}",
        serde_json::to_string(&report).map_err(|e| e.to_string())?
    );
    Ok(())
}

/// `skiff snapshot-info DIR [--json]`
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// The snapshot directory.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The facts `snapshot-info` shows, as JSON.
fn info_json(snap: &LoadedSnapshot) -> serde_json::Value {
    let m = &snap.manifest;
    let resources: Vec<serde_json::Value> = snap
        .resources
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("opened_on_restore".into(), r.opened_on_restore().into());
            }
            v
        })
        .collect();
    let (authenticated, why) = match &snap.authentication {
        crate::snapshot::auth::Authentication::Authenticated => (true, None),
        crate::snapshot::auth::Authentication::NotAuthenticated(why) => (false, Some(why.clone())),
    };
    serde_json::json!({
        "dir": snap.dir,
        "format_version": m.format_version,
        "skiff_version": m.skiff_version,
        "created_unix_ms": m.created_unix_ms,
        "memory_size": m.vm.memory_size,
        "vcpus": m.vm.cpus,
        "regions": m.memory.iter().map(|r| serde_json::json!({
            "guest_address": r.guest_address,
            "size": r.size,
            "file": r.file,
        })).collect::<Vec<_>>(),
        "parent": m.parent.as_ref().map(|p| &p.dir),
        "authenticated": authenticated,
        "not_authenticated_because": why,
        "resources": resources,
    })
}

/// Prints what a snapshot holds and every host resource it names. The error is one line.
pub fn snapshot_info(args: InfoArgs) -> Result<(), String> {
    let key = existing_key()?;
    let snap = load(&args.dir, key.as_ref()).map_err(|e| crate::error_chain(&e))?;
    if args.json {
        println!("{}", info_json(&snap));
        return Ok(());
    }
    let m = &snap.manifest;
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    println!("snapshot {}", snap.dir.display());
    println!(
        "format version {} ({}), written by skiff {}",
        m.format_version,
        if m.parent.is_some() { "diff" } else { "full" },
        m.skiff_version
    );
    match &snap.authentication {
        crate::snapshot::auth::Authentication::Authenticated => {
            println!("authenticated: yes (written by this user on this host)");
        }
        crate::snapshot::auth::Authentication::NotAuthenticated(why) => {
            println!("authenticated: no ({why})");
        }
    }
    println!(
        "memory: {} bytes ({:.0} MiB)",
        m.vm.memory_size,
        mib(m.vm.memory_size)
    );
    println!("vcpus: {}", m.vm.cpus);
    for (i, r) in m.memory.iter().enumerate() {
        println!(
            "region {i}: guest {:#x}..{:#x} ({:.0} MiB) in {}",
            r.guest_address,
            r.guest_address.saturating_add(r.size),
            mib(r.size),
            r.file
        );
    }
    match &m.parent {
        Some(p) => println!("parent: {}", p.dir.display()),
        None => println!("parent: none"),
    }
    println!("host resources:");
    for r in &snap.resources {
        println!(
            "  {} {:?}: {}{}",
            r.kind(),
            r.id(),
            r.location(),
            if r.opened_on_restore() {
                ""
            } else {
                " (recorded only, not opened on restore)"
            }
        );
    }
    Ok(())
}

/// How long `skiff ctl` waits for an answer unless `--timeout` says otherwise.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(10);

/// `skiff ctl --api-socket PATH [--timeout SECONDS] ACTION`
#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// The running skiff's control socket (every action but `exec`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Give up when the server has not answered within this many seconds (default 10). A
    /// snapshot may take longer, as long as its progress is answered within this time.
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    /// What to do.
    #[command(subcommand)]
    pub action: CtlAction,
}

/// The `ctl` actions.
#[derive(Debug, clap::Subcommand)]
pub enum CtlAction {
    /// Print the VM's state.
    Status,
    /// Pause every vCPU.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// End the VM.
    Shutdown,
    /// Write a snapshot to DIR (which must not exist).
    Snapshot {
        /// The snapshot directory to create.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// End the VM once the snapshot is complete.
        #[arg(long)]
        stop: bool,
        /// Copy memory while the guest runs; pause only for the last dirty pages and the state.
        #[arg(long)]
        live: bool,
        /// Only the pages dirtied since this VM's previous snapshot, which becomes its parent.
        #[arg(long)]
        diff: bool,
    },
    /// Run a command through the guest agent of a VM started with `skiff run --agent`, and exit
    /// with its status (docs/exec.md).
    Exec(crate::exec::ctl::CtlExecArgs),
}

/// Sends the request, prints the JSON answer on stdout, and returns 0; on an error answer or
/// failure prints one line on stderr and returns 1. A snapshot draws a progress bar on stderr
/// while it is written, when stderr is a terminal.
pub fn ctl(args: CtlArgs) -> ExitCode {
    use std::io::IsTerminal;
    let (action, api_socket) = match (args.action, args.api_socket) {
        (CtlAction::Exec(exec), _) => return crate::exec::ctl::run(exec),
        (action, Some(socket)) => (action, socket),
        (_, None) => {
            eprintln!("skiff: ctl needs --api-socket PATH (the running skiff's control socket)");
            return ExitCode::from(crate::exit_code::USAGE);
        }
    };
    let (method, path, body) = match action {
        CtlAction::Status => ("GET", "/vm", None),
        CtlAction::Pause => ("PUT", "/vm/pause", None),
        CtlAction::Resume => ("PUT", "/vm/resume", None),
        CtlAction::Shutdown => ("PUT", "/vm/shutdown", None),
        // Answered above, without the control socket.
        CtlAction::Exec(_) => return ExitCode::from(crate::exit_code::USAGE),
        CtlAction::Snapshot {
            dir,
            stop,
            live,
            diff,
        } => {
            // The server resolves nothing against its own working directory: send an
            // absolute path, resolved against ours.
            let dir = if dir.is_absolute() {
                dir
            } else {
                match std::env::current_dir() {
                    Ok(cwd) => cwd.join(dir),
                    Err(e) => {
                        eprintln!("skiff: cannot resolve {}: {e}", dir.display());
                        return ExitCode::from(1);
                    }
                }
            };
            let body = serde_json::json!({ "dir": dir, "stop": stop, "live": live, "diff": diff })
                .to_string();
            ("PUT", "/vm/snapshot", Some(body))
        }
    };
    let timeout = args.timeout.unwrap_or(CTL_TIMEOUT);
    let answer = match body.as_deref() {
        Some(body) if path == "/vm/snapshot" => crate::api::progress_bar::snapshot_with_progress(
            &api_socket,
            body,
            timeout,
            std::io::stderr().is_terminal(),
        ),
        body => client::request_within(&api_socket, method, path, body, timeout),
    };
    match answer {
        Ok((status, body)) if (200..300).contains(&status) => {
            println!("{body}");
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!("skiff: {}", client::error_line(status, &body));
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("skiff: {}", crate::error_chain(&e));
            ExitCode::from(1)
        }
    }
}
