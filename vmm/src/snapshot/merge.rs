//! `skiff snapshot-merge`: replaces a diff snapshot with the equivalent full snapshot, its whole
//! parent chain folded together (`chain` finds and layers the parents), built beside it and
//! exchanged with it in one rename.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use serde::Serialize;
use thiserror::Error;

use super::auth::{Authentication, SnapshotKey};
use super::chain::{layer_region, resolve_parents, ChainError, Layer};
use super::dir::{DirError, SnapshotDir};
use super::files::{create_file, fsync_dir, write_file, FileError};
use super::host_resource::HostResource;
use super::integrity;
use super::manifest::{
    self, ManifestError, SnapshotManifest, MANIFEST_FILE, MANIFEST_FORMAT_VERSION,
};
use super::memory_file::CopyMethod;
use super::state_file::MAX_STATE_FILE_BYTES;

/// Errors from `snapshot-merge`.
#[derive(Debug, Error)]
pub enum MergeError {
    /// The diff's chain is unusable.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The diff's directory or a file in it is not usable.
    #[error(transparent)]
    Dir(#[from] DirError),
    /// The diff's manifest is unusable.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// `snapshot-merge` was given a full snapshot.
    #[error("{0} is a full snapshot already: there is nothing to merge")]
    NotADiff(PathBuf),
    /// The diff is not authenticated and its parent was not named by the user.
    #[error(
        "snapshot {dir} is not authenticated for this user ({why}); refusing to read its parent \
         snapshot at {parent} (name it again: skiff snapshot-merge {dir} PARENT)"
    )]
    NotAuthenticated {
        /// The diff.
        dir: PathBuf,
        /// Why it is not authenticated.
        why: String,
        /// The parent it names.
        parent: PathBuf,
    },
    /// Writing the merged snapshot failed.
    #[error(transparent)]
    File(#[from] FileError),
}

/// What `snapshot-merge` did.
#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    /// The directory, now a full snapshot.
    pub dir: PathBuf,
    /// Snapshots folded together, the diff included.
    pub layers: usize,
    /// Memory bytes copied.
    pub bytes_written: u64,
    /// Time taken, in ms.
    pub time_ms: f64,
}

/// Replaces the diff snapshot at `dir` with the equivalent full snapshot (its whole chain
/// folded together), atomically: the result is built in `DIR.merge-<pid>`, fsynced, and
/// exchanged with `DIR` in one rename. The parents are left unchanged; other diffs taken on top
/// of `dir` will no longer match it.
///
/// The parent directory is a host resource the diff names: it is read only when the diff is
/// authenticated under `key` (then the result is authenticated too) or when the user names it
/// (`first_parent`; the result is then unauthenticated, like the diff).
pub fn merge(
    dir: &Path,
    first_parent: Option<&Path>,
    key: Option<&SnapshotKey>,
) -> Result<MergeReport, MergeError> {
    let started = Instant::now();
    let opened = SnapshotDir::open(dir)?;
    let (_, top) = manifest::read_in(&opened)?;
    let Some(parent) = &top.parent else {
        return Err(MergeError::NotADiff(dir.to_path_buf()));
    };
    let state = opened.read_capped(&top.state.file, MAX_STATE_FILE_BYTES, "state file")?;
    let authentication = match key {
        Some(k) => k.verify(&top, &state),
        None => Authentication::NotAuthenticated("this user has no snapshot key".into()),
    };
    let sealing_key = match (&authentication, first_parent) {
        (Authentication::Authenticated, _) => key,
        (Authentication::NotAuthenticated(_), Some(_)) => None,
        (Authentication::NotAuthenticated(why), None) => {
            return Err(MergeError::NotAuthenticated {
                dir: dir.to_path_buf(),
                why: why.clone(),
                parent: parent.dir.clone(),
            })
        }
    };
    let mut layers = resolve_parents(dir, &top, first_parent)?;
    layers.push(Layer {
        dir: dir.to_path_buf(),
        manifest: top.clone(),
    });
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".merge-{}", std::process::id()));
    let temp = dir.with_file_name(name);
    std::fs::create_dir(&temp).map_err(|source| FileError {
        op: "create",
        path: temp.clone(),
        source,
    })?;
    let result = build_merged(&temp, &top, &state, &layers, sealing_key);
    let bytes = match result {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&temp);
            return Err(e);
        }
    };
    exchange(&temp, dir)?;
    if let Some(parent) = dir.parent() {
        fsync_dir(parent)?;
    }
    // `temp` now holds the old diff.
    let _ = std::fs::remove_dir_all(&temp);
    Ok(MergeReport {
        dir: dir.to_path_buf(),
        layers: layers.len(),
        bytes_written: bytes,
        time_ms: started.elapsed().as_secs_f64() * 1000.0,
    })
}

fn build_merged(
    temp: &Path,
    top: &SnapshotManifest,
    state: &[u8],
    layers: &[Layer],
    key: Option<&SnapshotKey>,
) -> Result<u64, MergeError> {
    let never = AtomicBool::new(false);
    let mut merged = top.clone();
    merged.format_version = MANIFEST_FORMAT_VERSION;
    merged.parent = None;
    merged.authentication = None;
    merged
        .resources
        .retain(|r| !matches!(r, HostResource::Parent { .. }));
    let mut bytes = 0;
    for (i, entry) in merged.memory.iter_mut().enumerate() {
        let path = temp.join(&entry.file);
        let dst = create_file(&path)?;
        dst.set_len(entry.size).map_err(|source| FileError {
            op: "size",
            path: path.clone(),
            source,
        })?;
        bytes += layer_region(layers, i, &dst, 0, &never)?;
        entry.checksum = Some(integrity::seal(&path, entry.size, &never)?);
        entry.method = CopyMethod::SparseCopy.name().into();
        entry.data_bytes = None;
    }
    write_file(&temp.join(&top.state.file), state)?;
    if let Some(key) = key {
        key.seal(&mut merged, state).map_err(|e| FileError {
            op: "authenticate",
            path: temp.join(MANIFEST_FILE),
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    let text = serde_json::to_vec_pretty(&merged).map_err(|e| FileError {
        op: "encode",
        path: temp.join(MANIFEST_FILE),
        source: std::io::Error::other(e),
    })?;
    write_file(&temp.join(MANIFEST_FILE), &text)?;
    fsync_dir(temp)?;
    Ok(bytes)
}

/// Swaps two directories in one rename (`RENAME_EXCHANGE`).
fn exchange(a: &Path, b: &Path) -> Result<(), MergeError> {
    let err = |source| FileError {
        op: "exchange the merged snapshot with",
        path: b.to_path_buf(),
        source,
    };
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| err(std::io::Error::from_raw_os_error(libc::EINVAL)))
    };
    let (ca, cb) = (c(a)?, c(b)?);
    // SAFETY: both are NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()).into());
    }
    Ok(())
}
