//! `--sandbox`: confines file-system access with Landlock to the paths the VM was given.
//!
//! `init` (before the VM is built) creates a ruleset that handles every file-system access
//! right the kernel knows and allows nothing yet; threads started while the VM is built (disk
//! threads, vhost-user watchdogs) confine themselves with it, since they open no paths.
//! `add_paths` (once the VM is built, so a memory or serial file skiff created exists) allows
//! the VM's own files, its API socket's directory and the `--sandbox-allow` directories, and the
//! main thread then confines itself; every thread started after inherits that and adds the same
//! ruleset again. Landlock confines a thread and its future children only, hence one call per
//! thread (kernels with Landlock ABI 8 could do all threads at once; this one has 7).
//!
//! Unix sockets are not file-system accesses to Landlock below ABI 9: connecting to a vhost-user
//! socket is not confined. Descriptors opened before confinement (disks, `/dev/kvm`, taps)
//! keep working.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use landlock::{
    Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreated,
    RulesetCreatedAttr, RulesetStatus, ABI,
};
use thiserror::Error;

/// The newest Landlock ABI skiff asks rights of (the crate maps it down to the kernel's).
const NEWEST_ABI: ABI = ABI::V7;

/// Errors from `--sandbox`.
#[derive(Debug, Error)]
pub enum LandlockError {
    /// The kernel has no Landlock.
    #[error("--sandbox needs Landlock, which this kernel does not offer ({0}); run without --sandbox or enable the landlock LSM (lsm= on the host's kernel command line)")]
    Unsupported(String),
    /// A path to allow could not be opened.
    #[error("--sandbox: cannot allow {path}")]
    Path {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: landlock::PathFdError,
    },
    /// The crate refused a step.
    #[error("--sandbox: {0}")]
    Ruleset(#[from] landlock::RulesetError),
    /// Duplicating the ruleset for a thread failed.
    #[error("--sandbox: cannot duplicate the ruleset")]
    Clone(#[source] std::io::Error),
    /// The kernel did not enforce the ruleset.
    #[error("--sandbox: the kernel did not enforce the Landlock ruleset")]
    NotEnforced,
}

/// The paths a sandboxed VM may use after it is built.
#[derive(Debug, Clone, Default)]
pub struct SandboxPaths {
    /// Files it may read (kernel, initrd, read-only disks).
    pub read_files: Vec<PathBuf>,
    /// Files it may read and write (disks, memory file, serial file).
    pub write_files: Vec<PathBuf>,
    /// Directories it may read (a snapshot it was restored from).
    pub read_dirs: Vec<PathBuf>,
    /// Directories it may read and write, with everything under them (`--sandbox-allow`).
    pub write_dirs: Vec<PathBuf>,
    /// Directories where it may remove its API socket at exit.
    pub socket_dirs: Vec<PathBuf>,
}

static RULESET: Mutex<Option<RulesetCreated>> = Mutex::new(None);

/// The kernel's Landlock ABI version, or why there is none.
fn probe_abi() -> Result<i64, LandlockError> {
    // SAFETY: LANDLOCK_CREATE_RULESET_VERSION with a null attribute only returns the version.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    if rc < 1 {
        return Err(LandlockError::Unsupported(unsupported_reason(
            &std::io::Error::last_os_error(),
        )));
    }
    Ok(rc)
}

/// Why a failed ABI probe means no Landlock, in words.
fn unsupported_reason(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel was built without it".into(),
        Some(libc::EOPNOTSUPP) => "it is built in but not enabled at boot".into(),
        _ => format!("landlock_create_ruleset: {e}"),
    }
}

fn handled() -> BitFlags<AccessFs> {
    AccessFs::from_all(NEWEST_ABI)
}

/// Creates the ruleset, allowing nothing yet. Fails when the kernel has no Landlock.
pub(super) fn init() -> Result<(), LandlockError> {
    probe_abi()?;
    let ruleset = Ruleset::default().handle_access(handled())?.create()?;
    *RULESET.lock().unwrap_or_else(PoisonError::into_inner) = Some(ruleset);
    Ok(())
}

fn allow(
    ruleset: RulesetCreated,
    path: &Path,
    access: BitFlags<AccessFs>,
) -> Result<RulesetCreated, LandlockError> {
    let fd = PathFd::new(path).map_err(|source| LandlockError::Path {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(ruleset.add_rule(PathBeneath::new(fd, access & handled()))?)
}

/// Adds the VM's paths to the ruleset (nothing without `--sandbox`).
pub(super) fn add_paths(paths: &SandboxPaths) -> Result<(), LandlockError> {
    let mut slot = RULESET.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(mut ruleset) = slot.take() else {
        return Ok(());
    };
    let read_file = BitFlags::from(AccessFs::ReadFile);
    let write_file = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate;
    let read_dir = AccessFs::ReadFile | AccessFs::ReadDir;
    let rules = paths
        .read_files
        .iter()
        .map(|p| (p.as_path(), read_file))
        .chain(paths.write_files.iter().map(|p| (p.as_path(), write_file)))
        .chain(paths.read_dirs.iter().map(|p| (p.as_path(), read_dir)))
        .chain(paths.write_dirs.iter().map(|p| (p.as_path(), handled())))
        .chain(
            paths
                .socket_dirs
                .iter()
                .map(|p| (p.as_path(), AccessFs::RemoveFile | AccessFs::MakeSock)),
        )
        // Teardown: the descriptor list and /dev/null for the detached process's stdio.
        .chain([
            (Path::new("/proc/self/fd"), read_dir),
            (Path::new("/dev/null"), read_file | AccessFs::WriteFile),
        ]);
    for (path, access) in rules {
        ruleset = allow(ruleset, path, access)?;
    }
    *slot = Some(ruleset);
    Ok(())
}

/// Confines the calling thread with the ruleset (nothing without `--sandbox`).
pub(super) fn restrict_thread() -> Result<(), LandlockError> {
    let copy = {
        let slot = RULESET.lock().unwrap_or_else(PoisonError::into_inner);
        match slot.as_ref() {
            Some(ruleset) => ruleset.try_clone().map_err(LandlockError::Clone)?,
            None => return Ok(()),
        }
    };
    let status = copy.restrict_self()?;
    match status.ruleset {
        RulesetStatus::FullyEnforced | RulesetStatus::PartiallyEnforced => Ok(()),
        RulesetStatus::NotEnforced => Err(LandlockError::NotEnforced),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_missing_landlock_line_says_what_to_do() {
        let e = LandlockError::Unsupported(unsupported_reason(&std::io::Error::from_raw_os_error(
            libc::EOPNOTSUPP,
        )));
        let line = e.to_string();
        assert!(line.starts_with("--sandbox needs Landlock, which this kernel does not offer (it is built in but not enabled at boot)"), "{line}");
        let e = unsupported_reason(&std::io::Error::from_raw_os_error(libc::ENOSYS));
        assert_eq!(e, "the kernel was built without it");
    }
}
