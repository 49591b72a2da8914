//! `--exit-status-file PATH`: skiff's verdict (`exit_code::ExitStatus`) as one JSON object,
//! written atomically at every end (a temporary file in the same directory, fsynced, renamed
//! over `PATH`, then the directory fsynced), so a reader sees either no file, an older one, or
//! the whole verdict. Also finds the option in a command line clap refused, so even a usage
//! error is recorded.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::exit_code::ExitStatus;

/// The option's name on the command line.
pub const OPTION: &str = "--exit-status-file";

/// Errors writing the status file.
#[derive(Debug, Error)]
pub enum ExitStatusFileError {
    /// The directory the file goes in does not exist.
    #[error("{OPTION} {path}: directory {} does not exist", dir.display())]
    NoDirectory {
        /// The file's path.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
    },
    /// Writing, syncing or renaming failed.
    #[error("cannot write {OPTION} {path}")]
    Write {
        /// The file's path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn directory_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Checks, before the VM starts, that the file can be placed: its directory exists.
pub fn check(path: &Path) -> Result<(), ExitStatusFileError> {
    let dir = directory_of(path);
    if dir.is_dir() {
        Ok(())
    } else {
        Err(ExitStatusFileError::NoDirectory {
            path: path.to_path_buf(),
            dir,
        })
    }
}

/// Writes `status` to `path` atomically.
pub fn write(path: &Path, status: &ExitStatus) -> Result<(), ExitStatusFileError> {
    let err = |source| ExitStatusFileError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut text = serde_json::to_string(status).map_err(|e| err(io::Error::other(e)))?;
    text.push('\n');
    let mut temp = path.as_os_str().to_os_string();
    temp.push(format!(".tmp-{}", std::process::id()));
    let temp = PathBuf::from(temp);
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        File::open(directory_of(path))?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written.map_err(err)
}

/// The `--exit-status-file` value in raw arguments (`--exit-status-file PATH` or
/// `--exit-status-file=PATH`), for a command line clap refused.
pub fn find_in_args(args: &[OsString]) -> Option<PathBuf> {
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == "--" {
            return None;
        }
        if arg == OPTION {
            return iter.next().map(PathBuf::from);
        }
        let text = arg.to_str()?;
        if let Some(value) = text.strip_prefix(OPTION).and_then(|v| v.strip_prefix('=')) {
            return Some(PathBuf::from(value));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::vm_exit::GuestEnd;

    #[test]
    fn written_whole_and_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.json");
        std::fs::write(&path, "old").unwrap();
        let status = ExitStatus::from_end(GuestEnd::Timeout, None, 0, None);
        write(&path, &status).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["reason"], "timeout");
        assert_eq!(v["code"], 124);
        assert!(v["detail"].as_str().unwrap().contains("timeout"));
        // Nothing else is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(check(&path).is_ok());
        let missing = dir.path().join("nope/status.json");
        assert!(check(&missing).is_err());
        assert!(write(&missing, &status).is_err());
    }

    #[test]
    fn found_in_a_refused_command_line() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            find_in_args(&args(&[
                "skiff",
                "run",
                "--bogus",
                "--exit-status-file",
                "/x"
            ])),
            Some(PathBuf::from("/x"))
        );
        assert_eq!(
            find_in_args(&args(&["skiff", "run", "--exit-status-file=/y"])),
            Some(PathBuf::from("/y"))
        );
        assert_eq!(
            find_in_args(&args(&["skiff", "run", "--exit-status-file"])),
            None
        );
        assert_eq!(
            find_in_args(&args(&["skiff", "run", "--", "--exit-status-file", "/z"])),
            None
        );
    }
}
