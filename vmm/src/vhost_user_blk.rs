//! The `skiff vhost-user-blk` subcommand (its arguments are in `cli`): runs skiff's own
//! vhost-user-blk backend (`devices::vhost_user::blk_backend`) until it is killed. A start-up failure (disk
//! missing or locked, socket path unusable) is one line on stderr and exit code 1.

use std::process::ExitCode;

use devices::vhost_user::blk_backend::{serve, BlkBackendConfig};

use crate::cli::VhostUserBlkArgs;
use crate::sandbox::SandboxArgs;

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
