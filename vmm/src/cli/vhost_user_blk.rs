//! `skiff vhost-user-blk`: its arguments.

use std::path::PathBuf;

use crate::sandbox::SeccompMode;

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
