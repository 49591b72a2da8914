//! `skiff restore`, `snapshot-verify`, `snapshot-merge` and `snapshot-info`: their arguments.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::resource_override::{
    DiskOverride, NetOverride, VhostUserOverride, VsockOverride,
};
use crate::config::{parse_timeout, SerialConfig};
use crate::sandbox::SandboxArgs;
use crate::snapshot::authorize::ResourceOverrides;
use crate::snapshot::restore::MemoryMode;

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
    /// The host resources to use instead of those the snapshot names.
    pub fn overrides(&self) -> ResourceOverrides {
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

/// `skiff snapshot-verify DIR`
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The snapshot directory (a diff's parents are checked too).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
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
