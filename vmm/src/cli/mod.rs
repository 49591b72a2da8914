//! The `skiff` command line: every subcommand's arguments (clap structs whose doc comments are
//! the `--help` text) and the examples `--help` shows. Parsing ends here: each subcommand's
//! arguments become typed configuration (`config`) or go to the code that runs it (`commands`,
//! `exec`, `test_runner`, `vhost_user_blk`); `main.rs` parses and dispatches.
//!
//! - `run`: `skiff run`.
//! - `snapshot`: `skiff restore`, `snapshot-verify`, `snapshot-merge`, `snapshot-info`.
//! - `ctl`: `skiff ctl` and its actions.
//! - `vhost_user_blk`: `skiff vhost-user-blk`.
//!
//! `skiff exec` and `skiff test` keep their arguments with their code (`exec`, `test_runner`).

// The argument structs' doc comments are the `--help` text, written for a terminal: option
// syntax such as `[,id=NAME]` is not a rustdoc link.
#![allow(rustdoc::broken_intra_doc_links)]

mod ctl;
mod run;
mod snapshot;
mod vhost_user_blk;

use clap::{Parser, Subcommand};

pub use ctl::{CtlAction, CtlArgs, CTL_TIMEOUT};
pub use run::RunArgs;
pub use snapshot::{InfoArgs, MergeArgs, RestoreArgs, VerifyArgs};
pub use vhost_user_blk::VhostUserBlkArgs;

/// skiff: a small, fast KVM virtual machine monitor.
#[derive(Debug, Parser)]
#[command(name = "skiff", version, about, after_help = TOP_EXAMPLES)]
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a kernel and run the VM until the guest ends.
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// Boot a kernel with skiff's guest agent, run CMD in the guest, and exit with its
    /// status (docs/exec.md).
    #[command(after_help = EXEC_EXAMPLES)]
    Exec(crate::exec::ExecArgs),
    /// Run a suite of tests in VMs, described in a TOML file (docs/test-runner.md).
    #[command(after_help = TEST_EXAMPLES)]
    Test(crate::test_runner::TestArgs),
    /// Restore a VM from a snapshot directory and run it until the guest ends.
    #[command(after_help = RESTORE_EXAMPLES)]
    Restore(RestoreArgs),
    /// Send a control request to a running skiff (its --api-socket) and print the answer.
    #[command(after_help = CTL_EXAMPLES)]
    Ctl(CtlArgs),
    /// Fold a diff snapshot and its parents into a full snapshot, in the diff's place.
    #[command(after_help = MERGE_EXAMPLES)]
    SnapshotMerge(MergeArgs),
    /// Check a snapshot's files against its manifest (sizes, state CRC, memory checksums).
    #[command(after_help = VERIFY_EXAMPLES)]
    SnapshotVerify(VerifyArgs),
    /// Show what a snapshot holds and every host resource it names.
    #[command(after_help = INFO_EXAMPLES)]
    SnapshotInfo(InfoArgs),
    /// Serve a raw disk file as a vhost-user-blk backend on a Unix socket.
    #[command(after_help = VHOST_USER_BLK_EXAMPLES)]
    VhostUserBlk(VhostUserBlkArgs),
}

/// Examples in `--help`.
pub const TOP_EXAMPLES: &str = "Examples:
  skiff run --kernel vmlinux --cpus 2 --memory size=1G --disk path=disk.img
  skiff run --kernel bzImage --initrd initrd.cpio --cmdline 'console=ttyS0 quiet' --timeout 60
  skiff run --kernel vmlinux --api-socket /tmp/vm.sock &
  skiff ctl --api-socket /tmp/vm.sock snapshot /var/tmp/snap1 --stop
  skiff restore /var/tmp/snap1

Documentation: README.md and docs/ in the source tree.";

/// Examples in `--help`.
pub const RUN_EXAMPLES: &str = "Examples:
  skiff run --kernel vmlinux
  skiff run --kernel vmlinux --cpus 4 --memory size=4G,file=/var/tmp/ram.img --serial file=console.log
  skiff run --kernel bzImage --initrd initrd.cpio --disk path=root.img,id=root --net tap=tap0
  skiff run --kernel vmlinux --vhost-user type=fs,socket=/tmp/vfs.sock,tag=share
  skiff run --kernel vmlinux --api-socket /tmp/vm.sock --timeout 30

Exit code: the guest's debug-exit byte, 0 on poweroff, 1 when skiff fails, 2 for a bad command
line, 120 reset, 121 triple fault, 122 KVM internal error, 124 timeout, 128+N signal N.";

/// Examples in `--help`.
pub const EXEC_EXAMPLES: &str = "Examples:
  skiff exec --kernel bzImage --rootfs host -- ./run-tests.sh
  skiff exec --kernel vmlinux --share /srv/out:/out --timeout 60 -- sh -c 'make check > /out/log'
  skiff exec --snapshot /var/tmp/agent-snap --env K=V -- sh -c 'echo $K'

Exit code: the command's own; 124 when --timeout expires; 200-207 when skiff could not run it
(docs/exec.md).";

/// Examples in `--help`.
pub const TEST_EXAMPLES: &str = "Examples:
  skiff test suite.toml
  skiff test suite.toml --filter smoke --jobs 4 --junit junit.xml
  skiff test ci.toml --watchdog 1800 --partition 1/2 --snapshot-on-failure";

/// Examples in `--help`.
pub const VERIFY_EXAMPLES: &str = "Examples:
  skiff snapshot-verify /var/tmp/snap1";

/// Examples in `--help`.
pub const INFO_EXAMPLES: &str = "Examples:
  skiff snapshot-info /var/tmp/snap1
  skiff snapshot-info /var/tmp/snap1 --json";

/// Examples in `--help`.
pub const RESTORE_EXAMPLES: &str = "Examples:
  skiff restore /var/tmp/snap1
  skiff restore /var/tmp/snap1 --memory-mode copy --api-socket /tmp/vm2.sock
  skiff restore /var/tmp/snap1 --serial file=console.log --timeout 10";

/// Examples in `--help`.
pub const CTL_EXAMPLES: &str = "Examples:
  skiff ctl --api-socket /tmp/vm.sock status
  skiff ctl --api-socket /tmp/vm.sock pause
  skiff ctl --api-socket /tmp/vm.sock snapshot /var/tmp/snap1 --live
  skiff ctl --api-socket /tmp/vm.sock snapshot /var/tmp/snap2 --diff
  skiff ctl --api-socket /tmp/vm.sock shutdown
  skiff ctl exec --vsock /tmp/vm.vsock -- uname -a";

/// Examples in `--help`.
pub const MERGE_EXAMPLES: &str = "Examples:
  skiff snapshot-merge /var/tmp/snap2
  skiff snapshot-merge /var/tmp/snap2 /mnt/moved/snap1";

/// Examples in `--help`.
pub const VHOST_USER_BLK_EXAMPLES: &str = "Examples:
  skiff vhost-user-blk --socket /tmp/blk.sock --disk disk.img
  skiff vhost-user-blk --socket /tmp/blk.sock --disk disk.img --readonly --once
  skiff run --kernel vmlinux --vhost-user type=blk,socket=/tmp/blk.sock";
