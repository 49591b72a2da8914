//! The artifact directory: one directory per case attempt (`CASE/attempt-N/`) holding the
//! serial log, skiff's stderr, the command's stdout and stderr and the agent transcript, and
//! one per forked VM (`vm-NAME/`) holding its boot logs and its snapshot. Names are made safe
//! for a file system; the root is checked to be writable before anything runs.

use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The artifact root cannot be used.
#[derive(Debug, Error)]
#[error("artifact directory {}: {source}", .path.display())]
pub struct ArtifactError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The root of a run's artifacts.
#[derive(Debug, Clone)]
pub struct Artifacts {
    root: PathBuf,
}

/// A name usable as one path component.
fn component(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_string()
}

impl Artifacts {
    /// Creates `root` and checks that files can be written in it.
    pub fn create(root: &Path) -> Result<Self, ArtifactError> {
        let err = |source| ArtifactError {
            path: root.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(root).map_err(err)?;
        let probe = root.join(format!(".skiff-test-probe-{}", std::process::id()));
        std::fs::File::create(&probe)
            .and_then(|mut f| f.write_all(b"x"))
            .map_err(err)?;
        let _ = std::fs::remove_file(&probe);
        let root = std::fs::canonicalize(root).map_err(err)?;
        Ok(Self { root })
    }

    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A fresh directory for attempt `attempt` (1-based) of case `name`.
    pub fn case_dir(&self, name: &str, attempt: u32) -> std::io::Result<PathBuf> {
        let dir = self
            .root
            .join(component(name))
            .join(format!("attempt-{attempt}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// A fresh directory for forked VM `name`.
    pub fn vm_dir(&self, name: &str) -> std::io::Result<PathBuf> {
        let dir = self.root.join(format!("vm-{}", component(name)));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn names_stay_inside_the_root() {
        assert_eq!(component("../etc/passwd"), "_etc_passwd");
        assert_eq!(component("a b/c"), "a_b_c");
        let dir = tempfile::tempdir().unwrap();
        let a = Artifacts::create(&dir.path().join("x")).unwrap();
        let case = a.case_dir("../up", 2).unwrap();
        assert!(case.starts_with(a.root()));
        assert!(case.ends_with("attempt-2"));
    }
}
