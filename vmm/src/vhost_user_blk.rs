//! The `skiff vhost-user-blk` subcommand: its arguments and running skiff's own vhost-user-blk
//! backend (`devices::vhost_user::blk_backend`) until it is killed. A start-up failure (disk
//! missing or locked, socket path unusable) is one line on stderr and exit code 1.

use std::path::PathBuf;
use std::process::ExitCode;

use devices::vhost_user::blk_backend::{serve, BlkBackendConfig};

use crate::sandbox::{SandboxArgs, SeccompMode};

/// `skiff vhost-user-blk --socket PATH --disk FILE [--readonly] [--once]`
#[derive(Debug, clap::Args)]
pub struct VhostUserBlkArgs {
    /// The Unix socket to listen on (created; an existing socket file is replaced).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// The raw disk image to serve (a multiple of 512 bytes; locked while served).
    #[arg(long, value_name = "FILE")]
    pub disk: PathBuf,
    /// Serve the disk read-only.
    #[arg(long)]
    pub readonly: bool,
    /// Exit when the first frontend disconnects (default: wait for the next one).
    #[arg(long)]
    pub once: bool,
    /// The backend's seccomp filter (installed once its disk and socket are open): on (a
    /// forbidden system call ends it with exit code 159), log, off.
    #[arg(long, value_name = "MODE", default_value = "on")]
    pub seccomp: SeccompMode,
}

/// Serves the disk; returns the process exit code.
pub fn run(args: VhostUserBlkArgs) -> ExitCode {
    let sandbox = SandboxArgs {
        seccomp: args.seccomp,
        ..SandboxArgs::default()
    };
    if let Err(e) = crate::sandbox::init(&sandbox) {
        eprintln!("skiff: {}", crate::error_chain(&e));
        return ExitCode::from(crate::exit_code::VMM_ERROR);
    }
    let cfg = BlkBackendConfig {
        socket: args.socket,
        disk: args.disk,
        readonly: args.readonly,
        once: args.once,
    };
    match serve(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skiff: {}", crate::error_chain(&e));
            ExitCode::from(crate::exit_code::VMM_ERROR)
        }
    }
}
