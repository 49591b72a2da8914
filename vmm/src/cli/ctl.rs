//! `skiff ctl`: its arguments and actions.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::parse_timeout;

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
