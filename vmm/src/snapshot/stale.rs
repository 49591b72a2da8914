//! Removing what killed snapshot writers left behind: `NAME.tmp-PID` (a snapshot being
//! written, `writer`) and `NAME.merge-PID` (a merge being built, `chain`) directories whose
//! process no longer exists. A writer cleans up after any error, but not after SIGKILL or a
//! crash; the next snapshot into the same parent directory does it then.
//!
//! A directory is removed only when all of these hold: its name ends in `.tmp-PID` or
//! `.merge-PID` with a decimal PID; no process with that PID exists (`kill(PID, 0)` says
//! `ESRCH`); it is a real directory (not a symbolic link) owned by this user; and it holds
//! nothing but what a snapshot writer puts there (`manifest.json`, `state.bin`,
//! `memory-N.bin`, all regular files). Anything else is left alone and logged.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The suffixes of snapshot writers' temporary directories, each followed by a PID.
const SUFFIXES: [&str; 2] = [".tmp-", ".merge-"];

/// The PID in a temporary directory's name, if it is one.
fn temp_pid(name: &str) -> Option<i32> {
    SUFFIXES.iter().find_map(|suffix| {
        let (_, pid) = name.rsplit_once(suffix)?;
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        pid.parse().ok().filter(|&p: &i32| p > 0)
    })
}

/// Whether a process with this PID exists (in this PID namespace).
fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Whether `name` is a file a snapshot writer creates in its temporary directory.
fn writer_file(name: &str) -> bool {
    name == super::manifest::MANIFEST_FILE
        || name == super::manifest::STATE_FILE
        || name
            .strip_prefix("memory-")
            .and_then(|r| r.strip_suffix(".bin"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `dir` looks like a snapshot writer's temporary directory owned by this user.
fn is_writer_temp(dir: &Path) -> bool {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return false;
    };
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if !meta.file_type().is_dir() || meta.uid() != uid {
        return false;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.into_iter().all(|e| {
        e.ok().is_some_and(|e| {
            e.file_type().is_ok_and(|t| t.is_file())
                && e.file_name().to_str().is_some_and(writer_file)
        })
    })
}

/// Removes the stale temporary directories in `parent` (see the module comment) and returns
/// the ones removed. Failures are logged, never returned: cleaning up is a courtesy, not a
/// reason for a snapshot to fail.
pub fn remove_stale_temporaries(parent: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temp_pid) else {
            continue;
        };
        if alive(pid) {
            continue;
        }
        let path = entry.path();
        if !is_writer_temp(&path) {
            log::info!(
                "leaving {}: its writer (PID {pid}) is gone but it is not a snapshot writer's temporary directory",
                path.display()
            );
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                log::info!(
                    "removed {}, left by snapshot writer PID {pid}, which no longer runs",
                    path.display()
                );
                removed.push(path);
            }
            Err(e) => log::warn!("cannot remove stale {}: {e}", path.display()),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PID no process has: above the kernel's maximum.
    const DEAD: i32 = 1 << 30;

    #[test]
    fn names_and_liveness() {
        assert_eq!(temp_pid("snap.tmp-123"), Some(123));
        assert_eq!(temp_pid("a.b.merge-9"), Some(9));
        assert_eq!(temp_pid("snap.tmp-"), None);
        assert_eq!(temp_pid("snap.tmp-12x"), None);
        assert_eq!(temp_pid("snap"), None);
        assert!(alive(std::process::id() as i32));
        assert!(!alive(DEAD));
        assert!(writer_file("memory-12.bin") && writer_file("state.bin"));
        assert!(!writer_file("memory-.bin") && !writer_file("notes.txt"));
    }

    #[test]
    fn removes_only_dead_writers_snapshot_temporaries() {
        let root = tempfile::tempdir().unwrap();
        let p = root.path();
        let mk = |name: &str, files: &[&str]| {
            let d = p.join(name);
            std::fs::create_dir(&d).unwrap();
            for f in files {
                std::fs::write(d.join(f), b"x").unwrap();
            }
            d
        };
        let stale = mk(&format!("a.tmp-{DEAD}"), &["memory-0.bin", "state.bin"]);
        let stale_merge = mk(&format!("b.merge-{DEAD}"), &["manifest.json"]);
        let empty = mk(&format!("c.tmp-{DEAD}"), &[]);
        let mine = mk(&format!("d.tmp-{}", std::process::id()), &["memory-0.bin"]);
        let foreign = mk(&format!("e.tmp-{DEAD}"), &["memory-0.bin", "thesis.tex"]);
        let file = p.join(format!("f.tmp-{DEAD}"));
        std::fs::write(&file, b"a plain file").unwrap();
        let link = p.join(format!("g.tmp-{DEAD}"));
        std::os::unix::fs::symlink(&mine, &link).unwrap();
        let mut removed = remove_stale_temporaries(p);
        removed.sort();
        assert_eq!(removed, vec![stale, stale_merge, empty]);
        assert!(mine.exists(), "a live writer's directory stays");
        assert!(foreign.join("thesis.tex").exists(), "unknown contents stay");
        assert!(file.exists() && link.exists() && mine.join("memory-0.bin").exists());
    }
}
