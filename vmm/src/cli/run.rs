//! `skiff run`: its arguments, and the `VmConfig` they describe.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::{
    parse_cpus, parse_timeout, DiskArg, MemoryArg, NetConfig, RngConfig, SerialConfig,
    VhostUserArg, VmConfig, VsockConfig, DEFAULT_CMDLINE, DEFAULT_MEMORY,
};
use crate::memory::backing::BackingKind;
use crate::memory::MemoryConfig;

/// `skiff run --kernel PATH ...`
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Kernel image: an ELF vmlinux (booted through PVH when it has the PVH note) or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_cpus)]
    pub cpus: u32,
    /// Guest RAM: size=SIZE[,file=PATH][,hugepages=on][,prealloc=on][,shared-with-snapshot=on]
    /// (default 256M, sealed memfd).
    #[arg(long, value_name = "SPEC")]
    pub memory: Option<MemoryArg>,
    /// Serial port (COM1) output: stdio, file=PATH or off.
    #[arg(long, value_name = "MODE", default_value = "stdio")]
    pub serial: SerialConfig,
    /// End the guest after this many seconds (exit code 124).
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    /// Serve the control API (HTTP + JSON) on this Unix socket, created owner-only.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// virtio-blk on a raw file or block device:
    /// path=FILE[,readonly=on][,id=NAME][,queues=N][,io=auto|uring|threads] (repeatable).
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<DiskArg>,
    /// virtio-net on a host tap: tap=NAME[,mac=MAC] (the tap is created if missing; repeatable).
    #[arg(long = "net", value_name = "SPEC")]
    pub nets: Vec<NetConfig>,
    /// Add a virtio console (hvc0; put console=hvc0 in --cmdline to make it the kernel's).
    /// Its output goes to stdout, and stdin feeds it instead of the serial port (which
    /// still prints).
    #[arg(long)]
    pub console: bool,
    /// Add a virtio-rng device fed from the host's getrandom (repeatable).
    #[arg(long, action = clap::ArgAction::Count)]
    pub rng: u8,
    /// A virtio device served by a vhost-user backend process:
    /// type=blk|fs|net|vsock|rng|generic,socket=PATH[,queues=N][,tag=TAG][,reconnect=SECONDS]
    /// (repeatable).
    #[arg(long = "vhost-user", value_name = "SPEC")]
    pub vhost_user: Vec<VhostUserArg>,
    /// Boot with skiff's guest agent as PID 1 (its initramfs before any --initrd), listening
    /// on vsock port 1024 for `skiff ctl exec`; needs --vsock (docs/exec.md).
    #[arg(long)]
    pub agent: bool,
    /// Write how skiff ended (reason, exit code, detail) to this file as JSON, atomically.
    #[arg(long, value_name = "PATH")]
    pub exit_status_file: Option<PathBuf>,
    /// virtio-vsock in process: cid=N,socket=PATH. Host programs connect to PATH and write
    /// "CONNECT PORT\n"; guest connections to port P go to the Unix socket PATH_P.
    #[arg(long, value_name = "SPEC")]
    pub vsock: Option<VsockConfig>,
    #[command(flatten)]
    pub sandbox: crate::sandbox::SandboxArgs,
}

impl RunArgs {
    /// The VM configuration these arguments describe (defaults filled in).
    pub fn into_config(self) -> VmConfig {
        VmConfig {
            kernel: self.kernel,
            initrd: self.initrd,
            cmdline: self.cmdline,
            cpus: self.cpus,
            memory: self.memory.map(|m| m.0).unwrap_or(MemoryConfig {
                size: DEFAULT_MEMORY,
                backing: BackingKind::Memfd,
                prealloc: false,
                shared_with_snapshot: false,
            }),
            serial: self.serial,
            timeout: self.timeout,
            disks: self.disks.into_iter().map(|d| d.0).collect(),
            nets: self.nets,
            console: self.console,
            rngs: RngConfig::repeated(self.rng),
            vhost_user: self.vhost_user.into_iter().map(|v| v.0).collect(),
            vsock: self.vsock,
        }
    }
}
