//! What the `skiff restore`, `snapshot-info`, `snapshot-verify`, `snapshot-merge` and `ctl`
//! subcommands do (their arguments are in `cli`). `main.rs` parses the command line and reports
//! outcomes; `skiff run` stays there.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::api::client;
use crate::cli::{CtlAction, CtlArgs, InfoArgs, MergeArgs, RestoreArgs, VerifyArgs, CTL_TIMEOUT};
use crate::runner::{run_vm, RunError, RunOptions, RunOutcome};
use crate::sandbox::{SandboxError, SandboxPaths};
use crate::snapshot::auth::{default_key_path, AuthError, SnapshotKey};
use crate::snapshot::authorize::{authorize, AuthorizeError};
use crate::snapshot::integrity::Problem;
use crate::snapshot::loaded_snapshot::LoadedSnapshot;
use crate::snapshot::merge::MergeError;
use crate::snapshot::restore::{load, memory_mode, restore_vm, RestoreError};

/// Why `restore`, `snapshot-merge` or `snapshot-info` failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The sandbox could not be set up.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// This user's snapshot key is unusable.
    #[error(transparent)]
    Key(#[from] AuthError),
    /// `--verify` found a problem.
    #[error(
        "snapshot {} failed verification: {}{}",
        dir.display(),
        crate::error_chain(first),
        more_problems(*others)
    )]
    Verification {
        /// The snapshot directory.
        dir: PathBuf,
        /// The first problem found.
        first: Box<Problem>,
        /// How many more were found.
        others: usize,
    },
    /// The snapshot could not be loaded or restored.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// The snapshot names host resources it may not open.
    #[error(transparent)]
    Authorize(#[from] AuthorizeError),
    /// The restored VM could not run.
    #[error(transparent)]
    Run(#[from] RunError),
    /// A diff could not be merged.
    #[error(transparent)]
    Merge(#[from] MergeError),
    /// A report could not be encoded as JSON.
    #[error("cannot encode the report as JSON")]
    Encode(#[source] serde_json::Error),
}

/// The tail of a verification failure naming how many other problems there are.
fn more_problems(others: usize) -> String {
    match others {
        0 => String::new(),
        n => format!(" (and {n} more problem(s); skiff snapshot-verify lists them)"),
    }
}

/// This user's snapshot key if it exists (restore and inspection never create it: without one,
/// nothing can be authenticated anyway). A key file that is unusable is an error.
pub(crate) fn existing_key() -> Result<Option<SnapshotKey>, AuthError> {
    match default_key_path() {
        Ok(path) => SnapshotKey::load(&path),
        Err(_) => Ok(None),
    }
}

/// Restores the snapshot and runs the VM to its end; `ready` is called once the VM is built,
/// just before it runs.
pub fn restore(args: RestoreArgs, ready: impl FnOnce()) -> Result<RunOutcome, CommandError> {
    crate::sandbox::init(&args.sandbox)?;
    if args.verify {
        let (problems, _) = crate::snapshot::integrity::verify(&args.dir, args.parent.as_deref());
        let others = problems.len().saturating_sub(1);
        if let Some(first) = problems.into_iter().next() {
            return Err(CommandError::Verification {
                dir: args.dir,
                first: Box::new(first),
                others,
            });
        }
    }
    let key = existing_key()?;
    let snap = load(&args.dir, key.as_ref())?;
    let plan = authorize(&snap, &args.overrides())?;
    let mode = memory_mode(&plan.devices, args.memory_mode)?;
    let vm = restore_vm(&snap, &plan, mode, &args.serial)?;
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
    Ok(run_vm(vm, &opts)?)
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
        eprintln!("skiff: {}", crate::error_chain(p));
    }
    ExitCode::from(crate::exit_code::VMM_ERROR)
}

/// Folds a diff and its parents into a full snapshot in the diff's place; prints a JSON
/// summary.
pub fn snapshot_merge(args: MergeArgs) -> Result<(), CommandError> {
    let key = existing_key()?;
    let report = crate::snapshot::merge::merge(&args.dir, args.parent.as_deref(), key.as_ref())?;
    println!(
        "{}",
        serde_json::to_string(&report).map_err(CommandError::Encode)?
    );
    Ok(())
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

/// Prints what a snapshot holds and every host resource it names.
pub fn snapshot_info(args: InfoArgs) -> Result<(), CommandError> {
    let key = existing_key()?;
    let snap = load(&args.dir, key.as_ref())?;
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
