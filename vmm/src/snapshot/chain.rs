//! Diff snapshots' parent chains: finding and checking each parent, layering memory files over
//! one another (restore), and `skiff snapshot-merge`, which folds a chain into a full snapshot.
//!
//! A diff's manifest names its parent's directory and the CRC-32 of the parent's manifest
//! bytes. Every parent is read as untrusted input like any snapshot: size-capped, version
//! checked, validated, and its checksum compared, so a parent replaced or changed since the
//! diff was taken is refused, as is a parent whose memory regions differ. Chains are bounded
//! (`MAX_CHAIN`), which also stops a loop. Layering copies each layer's data extents, base
//! first: a diff's holes keep what lies below.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use thiserror::Error;

use super::dir::{DirError, SnapshotDir};
use super::manifest::{self, ManifestError, SnapshotManifest};
use super::memory_file::{copy_sparse, MemoryFileError};

/// Most snapshots a chain may hold, the base included.
pub const MAX_CHAIN: usize = 64;

/// Errors from resolving or merging a chain.
#[derive(Debug, Error)]
pub enum ChainError {
    /// A manifest is unusable.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A parent's manifest cannot be read.
    #[error("parent snapshot {parent} of {child} is missing or unreadable")]
    ParentMissing {
        /// The diff.
        child: PathBuf,
        /// The parent it names.
        parent: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A parent is not the one the diff was taken on.
    #[error(
        "parent snapshot {parent} of {child} has changed since the diff was taken (its manifest \
         CRC-32 is {actual:#010x}, the diff expects {expected:#010x})"
    )]
    ParentChanged {
        /// The diff.
        child: PathBuf,
        /// The parent.
        parent: PathBuf,
        /// What the diff recorded.
        expected: u32,
        /// What the parent's manifest hashes to now.
        actual: u32,
    },
    /// A parent's memory regions differ from the diff's.
    #[error("parent snapshot {parent} of {child} has other memory regions")]
    Layout {
        /// The diff.
        child: PathBuf,
        /// The parent.
        parent: PathBuf,
    },
    /// Too many parents, or a loop.
    #[error("the diff chain of {0} is longer than {MAX_CHAIN} snapshots (or loops)")]
    TooLong(PathBuf),
    /// A parent's directory or memory file is not usable (a symbolic link, not a regular
    /// file).
    #[error(transparent)]
    File(#[from] DirError),
    /// A memory file is missing or has the wrong size.
    #[error("memory file {path} is missing or is not {expected} bytes long")]
    MemoryFile {
        /// The file.
        path: PathBuf,
        /// The region size.
        expected: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Copying a layer failed.
    #[error("cannot copy memory file {path}")]
    Copy {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: MemoryFileError,
    },
    /// A diff's memory file holds other data than when it was written.
    #[error(
        "memory file {path} of a diff holds {actual} bytes of data but {expected} were written: \
         was it copied without keeping its holes (use cp --sparse=auto, rsync -S or tar -S)?"
    )]
    DiffHoles {
        /// The file.
        path: PathBuf,
        /// Per the manifest.
        expected: u64,
        /// Copied now.
        actual: u64,
    },
}

/// One snapshot of a chain.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: SnapshotManifest,
}

/// A parent's manifest, read like any snapshot's (regular file, size-capped, relative to the
/// directory); a missing directory or manifest is `ParentMissing`.
fn read_manifest(child: &Path, dir: &Path) -> Result<(Vec<u8>, SnapshotManifest), ChainError> {
    let missing = |source| ChainError::ParentMissing {
        child: child.to_path_buf(),
        parent: dir.to_path_buf(),
        source,
    };
    let d = SnapshotDir::open(dir).map_err(|e| match e {
        DirError::OpenDir { source, .. } => missing(source),
        e => e.into(),
    })?;
    match manifest::read_in(&d) {
        Ok(read) => Ok(read),
        Err(ManifestError::File(DirError::Io {
            op: "open", source, ..
        })) => Err(missing(source)),
        Err(e) => Err(e.into()),
    }
}

fn same_layout(a: &SnapshotManifest, b: &SnapshotManifest) -> bool {
    a.memory.len() == b.memory.len()
        && a.memory
            .iter()
            .zip(&b.memory)
            .all(|(x, y)| x.guest_address == y.guest_address && x.size == y.size)
}

/// The parents of the snapshot `manifest` at `dir`, base first (empty for a full snapshot).
/// `first_parent` replaces the directory the diff names for its own parent (a moved chain);
/// its checksum is still checked.
pub fn resolve_parents(
    dir: &Path,
    manifest: &SnapshotManifest,
    first_parent: Option<&Path>,
) -> Result<Vec<Layer>, ChainError> {
    let mut layers: Vec<Layer> = Vec::new();
    let (mut child_dir, mut child) = (dir.to_path_buf(), manifest.clone());
    while let Some(parent) = child.parent.clone() {
        if layers.len() + 1 >= MAX_CHAIN {
            return Err(ChainError::TooLong(dir.to_path_buf()));
        }
        let parent_dir = match first_parent {
            Some(p) if layers.is_empty() => p.to_path_buf(),
            _ => parent.dir.clone(),
        };
        let (bytes, m) = read_manifest(&child_dir, &parent_dir)?;
        let actual = crc32fast::hash(&bytes);
        if actual != parent.manifest_crc32 {
            return Err(ChainError::ParentChanged {
                child: child_dir,
                parent: parent_dir,
                expected: parent.manifest_crc32,
                actual,
            });
        }
        if !same_layout(&m, manifest) {
            return Err(ChainError::Layout {
                child: child_dir,
                parent: parent_dir,
            });
        }
        layers.push(Layer {
            dir: parent_dir.clone(),
            manifest: m.clone(),
        });
        (child_dir, child) = (parent_dir, m);
    }
    layers.reverse();
    Ok(layers)
}

/// Copies region `index` of every layer, in order, into `dst` at `dst_offset`: each layer's
/// data extents over the ones below. Returns the bytes copied.
pub fn layer_region(
    layers: &[Layer],
    index: usize,
    dst: &File,
    dst_offset: u64,
    cancel: &AtomicBool,
) -> Result<u64, ChainError> {
    let mut copied = 0;
    for layer in layers {
        let Some(entry) = layer.manifest.memory.get(index) else {
            continue;
        };
        let src =
            SnapshotDir::open(&layer.dir)?.open_regular(&entry.file, u64::MAX, "memory file")?;
        copied += layer_file(
            &src.file,
            &src.path,
            &layer.manifest,
            index,
            dst,
            dst_offset,
            cancel,
        )?;
    }
    Ok(copied)
}

/// Copies the open memory file `src` (at `path`) of region `index` of the snapshot `manifest`
/// into `dst` at `dst_offset`, data extents only; a diff's file must hold the data bytes its
/// manifest recorded. Returns the bytes copied.
pub fn layer_file(
    src: &File,
    path: &Path,
    manifest: &SnapshotManifest,
    index: usize,
    dst: &File,
    dst_offset: u64,
    cancel: &AtomicBool,
) -> Result<u64, ChainError> {
    let Some(entry) = manifest.memory.get(index) else {
        return Ok(0);
    };
    let bad = |source| ChainError::MemoryFile {
        path: path.to_path_buf(),
        expected: entry.size,
        source,
    };
    let len = src.metadata().map_err(bad)?.len();
    if len != entry.size {
        return Err(bad(std::io::Error::from_raw_os_error(libc::EINVAL)));
    }
    let n = copy_sparse(src, 0, dst, dst_offset, entry.size, cancel).map_err(|source| {
        ChainError::Copy {
            path: path.to_path_buf(),
            source,
        }
    })?;
    if let Some(expected) = entry.data_bytes.filter(|_| manifest.parent.is_some()) {
        if n != expected {
            return Err(ChainError::DiffHoles {
                path: path.to_path_buf(),
                expected,
                actual: n,
            });
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::auth::SnapshotKey;
    use crate::snapshot::files::data_bytes;
    use crate::snapshot::manifest::MANIFEST_FILE;
    use crate::snapshot::manifest::{
        ParentRef, DIFF_FORMAT_VERSION, MANIFEST_FORMAT_VERSION, STATE_FILE,
    };
    use crate::snapshot::merge::{merge, MergeError};
    use std::os::unix::fs::FileExt;

    const SIZE: u64 = 8 << 20;

    fn test_key() -> SnapshotKey {
        SnapshotKey::from_bytes([3; crate::snapshot::auth::KEY_BYTES])
    }

    /// Writes a snapshot directory whose memory file holds `pages` (page index, byte), with
    /// `parent` as its parent; returns its manifest's CRC-32.
    fn snapshot(dir: &Path, pages: &[(u64, u8)], parent: Option<(&Path, u32)>) -> u32 {
        std::fs::create_dir(dir).unwrap();
        let mut m = manifest::tests::sample();
        if let Some((p, crc)) = parent {
            m.memory[0].data_bytes = Some(pages.len() as u64 * 4096);
            m.format_version = DIFF_FORMAT_VERSION;
            m.parent = Some(ParentRef {
                dir: p.to_path_buf(),
                manifest_crc32: crc,
            });
        }
        let f = File::create(dir.join("memory-0.bin")).unwrap();
        f.set_len(SIZE).unwrap();
        for &(page, byte) in pages {
            f.write_all_at(&[byte; 4096], page * 4096).unwrap();
        }
        std::fs::write(dir.join(STATE_FILE), b"state").unwrap();
        test_key().seal(&mut m, b"state").unwrap();
        let text = serde_json::to_vec(&m).unwrap();
        std::fs::write(dir.join(MANIFEST_FILE), &text).unwrap();
        crc32fast::hash(&text)
    }

    fn page(path: &Path, page: u64) -> u8 {
        let mut b = [0u8; 1];
        File::open(path)
            .unwrap()
            .read_exact_at(&mut b, page * 4096 + 17)
            .unwrap();
        b[0]
    }

    #[test]
    fn a_chain_of_three_layers_in_order_and_merges_atomically() {
        let root = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            root.path().join("a"),
            root.path().join("b"),
            root.path().join("c"),
        );
        let ca = snapshot(&a, &[(0, 1), (1, 1), (2, 1)], None);
        let cb = snapshot(&b, &[(1, 2), (5, 2)], Some((&a, ca)));
        snapshot(&c, &[(2, 3), (5, 0)], Some((&b, cb)));
        let top = manifest::read(&c).unwrap();
        let parents = resolve_parents(&c, &top, None).unwrap();
        assert_eq!(
            parents.iter().map(|l| l.dir.clone()).collect::<Vec<_>>(),
            vec![a.clone(), b.clone()]
        );
        // Without the key that sealed it, the diff's parent is not read unless named.
        let other = SnapshotKey::from_bytes([4; crate::snapshot::auth::KEY_BYTES]);
        let e = merge(&c, None, Some(&other)).unwrap_err();
        assert!(
            e.to_string()
                .contains("refusing to read its parent snapshot at"),
            "{e}"
        );
        let report = merge(&c, None, Some(&test_key())).unwrap();
        assert_eq!(report.layers, 3);
        let merged = manifest::read(&c).unwrap();
        assert!(merged.parent.is_none());
        assert!(test_key().verify(&merged, b"state").is_authenticated());
        assert_eq!(merged.format_version, MANIFEST_FORMAT_VERSION);
        let mem = c.join("memory-0.bin");
        // Base, overwritten by b, by c; a page c dirtied back to zero stays zero.
        assert_eq!([0, 1, 2, 3, 5].map(|p| page(&mem, p)), [1, 2, 3, 0, 0],);
        assert_eq!(std::fs::read(c.join(STATE_FILE)).unwrap(), b"state");
        let names: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 3, "no temporary directory left: {names:?}");
        assert!(matches!(
            merge(&c, None, Some(&test_key())),
            Err(MergeError::NotADiff(_))
        ));
    }

    #[test]
    fn a_missing_changed_or_different_parent_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        let ca = snapshot(&a, &[(0, 1)], None);
        snapshot(&b, &[(1, 2)], Some((&a, ca)));
        let top = manifest::read(&b).unwrap();
        // Changed: the parent's manifest is rewritten (a new snapshot in the same place).
        let mut m = manifest::read(&a).unwrap();
        m.created_unix_ms += 1;
        std::fs::write(a.join(MANIFEST_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
        let e = resolve_parents(&b, &top, None).unwrap_err();
        assert!(matches!(e, ChainError::ParentChanged { .. }), "{e}");
        assert!(e
            .to_string()
            .contains("has changed since the diff was taken"));
        // Missing.
        std::fs::remove_dir_all(&a).unwrap();
        let e = resolve_parents(&b, &top, None).unwrap_err();
        assert!(e.to_string().contains("is missing or unreadable"), "{e}");
        // A moved parent given explicitly is accepted when it matches.
        let moved = root.path().join("moved");
        snapshot(&moved, &[(0, 1)], None);
        let parents = resolve_parents(&b, &top, Some(&moved)).unwrap();
        assert_eq!(parents[0].dir, moved);
        // Merge failures leave the diff as it was.
        assert!(merge(&b, None, Some(&test_key())).is_err());
        assert_eq!(manifest::read(&b).unwrap(), top);
        // A diff copied without its holes would hide the parent's pages: refused.
        let f = File::options()
            .write(true)
            .open(b.join("memory-0.bin"))
            .unwrap();
        f.write_all_at(&vec![0u8; SIZE as usize], 0).unwrap();
        let dst = tempfile::tempfile().unwrap();
        dst.set_len(SIZE).unwrap();
        let layers = [Layer {
            dir: b.clone(),
            manifest: top,
        }];
        let e = layer_region(&layers, 0, &dst, 0, &AtomicBool::new(false)).unwrap_err();
        assert!(matches!(e, ChainError::DiffHoles { .. }), "{e}");
        assert!(e.to_string().contains("without keeping its holes"), "{e}");
        assert_eq!(data_bytes(&b.join("memory-0.bin")).unwrap(), SIZE);
    }
}
