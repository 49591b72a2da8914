//! `manifest.json`: what a snapshot directory holds and how to read it back.
//!
//! The manifest names the format version, the skiff that wrote it, the VM's configuration as it
//! was given (kernel path, command line, CPUs, memory), one entry per memory region (guest
//! address, size, file, page size, how it was written) and the state file's size and checksum.
//! It is untrusted input on restore: `parse` caps its size, checks the version first, and
//! `validate` checks every value restore relies on (file names are plain names inside the
//! directory, sizes are page multiples, the CPU count is in range, the regions are exactly
//! the arch layout's for `memory_size`). A diff snapshot (format version 2) also names its
//! parent directory and the CRC-32 of the parent's manifest. `resources` lists the host
//! resources the snapshot names (`resources.rs`) and `authentication` holds its MAC
//! (`auth.rs`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::dir::{is_plain_name, DirError, SnapshotDir};
use super::host_resource::HostResource;
use crate::config::{VmConfig, MAX_VCPUS};
use crate::memory::backing::BackingKind;

/// The manifest's file name inside a snapshot directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The state file's name inside a snapshot directory.
pub const STATE_FILE: &str = "state.bin";
/// The version of the snapshot directory layout of a full snapshot.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;
/// The version of a diff snapshot's layout: version 1 plus `parent`, whose memory files hold
/// only the pages dirtied since the parent. Older readers refuse it rather than restore holes
/// as zero pages.
pub const DIFF_FORMAT_VERSION: u32 = 2;
/// Largest manifest `read` reads (a real one is a few KiB).
pub const MAX_MANIFEST_BYTES: usize = 1 << 20;
/// Most host resources a manifest may list.
pub const MAX_RESOURCES: usize = 256;
/// Most memory regions a manifest may list.
pub const MAX_REGIONS: usize = 64;

/// A snapshot directory's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    /// `MANIFEST_FORMAT_VERSION` of the writer.
    pub format_version: u32,
    /// The writing skiff's version.
    pub skiff_version: String,
    /// When the snapshot was taken, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The VM's configuration as it was given when it first booted.
    pub vm: VmDescription,
    /// One entry per memory region, in guest address order.
    pub memory: Vec<MemoryRegionEntry>,
    /// The state file.
    pub state: StateFileEntry,
    /// State the host could not give and that was left out (e.g. nested virtualization state).
    pub notes: Vec<String>,
    /// For a diff snapshot: the snapshot its memory files are layered over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    /// Every host resource the snapshot names (`resources::list` of the state and `vm`).
    #[serde(default)]
    pub resources: Vec<HostResource>,
    /// HMAC-SHA256 (hex) of the rest of the manifest and the state file under the writing
    /// user's key (`auth.rs`); absent when the writer had no key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<String>,
}

/// The parent of a diff snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// The parent's directory (absolute, as it was when the diff was taken).
    pub dir: PathBuf,
    /// CRC-32 of the parent's `manifest.json` bytes: a parent replaced or changed since is
    /// refused.
    pub manifest_crc32: u32,
}

/// The VM configuration a snapshot came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    /// Kernel image path.
    pub kernel: PathBuf,
    /// Initrd path.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPU count.
    pub cpus: u32,
    /// Guest RAM size in bytes.
    pub memory_size: u64,
    /// The original backing: `memfd`, `hugetlb-memfd` or `file`.
    pub memory_backing: String,
    /// The original memory file, for `file`.
    pub memory_file: Option<PathBuf>,
}

impl VmDescription {
    /// The description of a VM built from `cfg`.
    pub fn from_config(cfg: &VmConfig) -> Self {
        let (backing, file) = match &cfg.memory.backing {
            BackingKind::Memfd => ("memfd", None),
            BackingKind::HugetlbMemfd => ("hugetlb-memfd", None),
            BackingKind::File(p) => ("file", Some(p.clone())),
        };
        Self {
            kernel: cfg.kernel.clone(),
            initrd: cfg.initrd.clone(),
            cmdline: cfg.cmdline.clone(),
            cpus: cfg.cpus,
            memory_size: cfg.memory.size,
            memory_backing: backing.into(),
            memory_file: file,
        }
    }
}

/// One memory region and the file holding its contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionEntry {
    /// Guest physical address.
    pub guest_address: u64,
    /// Size in bytes (also the file's length).
    pub size: u64,
    /// File name inside the snapshot directory.
    pub file: String,
    /// The backing's page size when saved.
    pub page_size: u64,
    /// How the file was written: `sparse-copy`, `reflink` or `dirty-pages`.
    pub method: String,
    /// For a diff: the bytes of data (not holes) its file holds, so a copy that filled the
    /// holes with zeros (which would hide the parent's pages) is caught on restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_bytes: Option<u64>,
    /// The file's checksum (`integrity`): `xxh3-64:` and 16 hex digits. Absent in snapshots
    /// written before checksums existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// The state file's size and checksum (the file carries both in its header too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFileEntry {
    /// File name inside the snapshot directory.
    pub file: String,
    /// Its length in bytes.
    pub size: u64,
    /// CRC-32 of its payload.
    pub crc32: u32,
}

/// Why a manifest cannot be used.
#[derive(Debug, Error)]
pub enum ManifestError {
    /// The manifest file is missing, unreadable, not a regular file or too large.
    #[error(transparent)]
    File(#[from] DirError),
    /// Not JSON of the expected shape.
    #[error("{path} is not a valid snapshot manifest: {reason}")]
    Parse {
        /// The path.
        path: PathBuf,
        /// serde_json's description.
        reason: String,
    },
    /// Another format version.
    #[error("snapshot format version {found} is not supported (this skiff reads versions {MANIFEST_FORMAT_VERSION} and {DIFF_FORMAT_VERSION})")]
    Version {
        /// The manifest's version.
        found: u64,
    },
    /// A value restore cannot use.
    #[error("snapshot manifest is invalid: {0}")]
    Invalid(String),
}

/// Reads and checks `dir/manifest.json`.
pub fn read(dir: &Path) -> Result<SnapshotManifest, ManifestError> {
    Ok(read_in(&SnapshotDir::open(dir)?)?.1)
}

/// Reads (size-capped, a regular file only) and checks the manifest of an open snapshot
/// directory; returns its bytes too.
pub fn read_in(dir: &SnapshotDir) -> Result<(Vec<u8>, SnapshotManifest), ManifestError> {
    let text = dir.read_capped(MANIFEST_FILE, MAX_MANIFEST_BYTES as u64, "manifest")?;
    let manifest = parse(&text, &dir.path().join(MANIFEST_FILE))?;
    Ok((text, manifest))
}

/// Parses manifest bytes (`path` only names them in errors).
pub fn parse(text: &[u8], path: &Path) -> Result<SnapshotManifest, ManifestError> {
    let parse_err = |e: serde_json::Error| ManifestError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    // The version first, so that a manifest of another version says so rather than failing on
    // a field it renamed.
    let value: serde_json::Value = serde_json::from_slice(text).map_err(parse_err)?;
    let version = value
        .get("format_version")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| ManifestError::Parse {
            path: path.to_path_buf(),
            reason: "no numeric format_version".into(),
        })?;
    if version != u64::from(MANIFEST_FORMAT_VERSION) && version != u64::from(DIFF_FORMAT_VERSION) {
        return Err(ManifestError::Version { found: version });
    }
    let manifest: SnapshotManifest = serde_json::from_value(value).map_err(parse_err)?;
    manifest.validate()?;
    Ok(manifest)
}

impl SnapshotManifest {
    /// Checks the values restore relies on.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let invalid = |m: String| Err(ManifestError::Invalid(m));
        let diff = self.format_version == DIFF_FORMAT_VERSION;
        match &self.parent {
            None if diff => return invalid("a diff snapshot (version 2) names no parent".into()),
            Some(_) if !diff => {
                return invalid("a full snapshot (version 1) names a parent".into());
            }
            Some(p) if !p.dir.is_absolute() => {
                return invalid(format!(
                    "parent directory {} is not an absolute path",
                    p.dir.display()
                ));
            }
            _ => {}
        }
        if self.vm.cpus == 0 || self.vm.cpus > MAX_VCPUS {
            return invalid(format!("cpus {} is outside 1..={MAX_VCPUS}", self.vm.cpus));
        }
        if self.memory.is_empty() || self.memory.len() > MAX_REGIONS {
            return invalid(format!(
                "{} memory regions (expected 1 to {MAX_REGIONS})",
                self.memory.len()
            ));
        }
        if !is_plain_name(&self.state.file) {
            return invalid(format!(
                "state file name {:?} is not a plain file name",
                self.state.file
            ));
        }
        let mut total: u64 = 0;
        for (i, r) in self.memory.iter().enumerate() {
            if !is_plain_name(&r.file) || r.file == self.state.file || r.file == MANIFEST_FILE {
                return invalid(format!(
                    "memory region {i}: file name {:?} is not usable",
                    r.file
                ));
            }
            if self.memory[..i].iter().any(|o| o.file == r.file) {
                return invalid(format!(
                    "memory region {i}: file {:?} is listed twice",
                    r.file
                ));
            }
            if !r.page_size.is_power_of_two() || r.page_size < 4096 {
                return invalid(format!(
                    "memory region {i}: page size {:#x} is not a power of two of at least 4 KiB",
                    r.page_size
                ));
            }
            if r.size == 0 || r.size % r.page_size != 0 || r.guest_address % r.page_size != 0 {
                return invalid(format!(
                    "memory region {i} at {:#x}, size {:#x}: not a non-empty multiple of its page size {:#x}",
                    r.guest_address, r.size, r.page_size
                ));
            }
            if r.guest_address.checked_add(r.size).is_none() {
                return invalid(format!(
                    "memory region {i} at {:#x} wraps the address space",
                    r.guest_address
                ));
            }
            total = total.saturating_add(r.size);
        }
        if total != self.vm.memory_size {
            return invalid(format!(
                "memory regions add up to {total:#x} bytes but the VM has {:#x}",
                self.vm.memory_size
            ));
        }
        self.check_layout()?;
        if self.resources.len() > MAX_RESOURCES {
            return invalid(format!(
                "{} host resources listed (at most {MAX_RESOURCES})",
                self.resources.len()
            ));
        }
        Ok(())
    }

    /// The regions must be exactly those the arch layout gives a VM of `memory_size` (what
    /// `run` builds): a region elsewhere, say in the MMIO hole, is refused.
    fn check_layout(&self) -> Result<(), ManifestError> {
        let size = self.vm.memory_size;
        let expected = arch::layout::ram_ranges(size)
            .map_err(|e| ManifestError::Invalid(format!("memory_size {size:#x}: {e}")))?;
        let describe = |ranges: &mut dyn Iterator<Item = (u64, u64)>| {
            ranges
                .map(|(a, n)| format!("{a:#x}+{n:#x}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let same = expected.len() == self.memory.len()
            && expected
                .iter()
                .zip(&self.memory)
                .all(|(e, r)| e.start == r.guest_address && e.size == r.size);
        if !same {
            return Err(ManifestError::Invalid(format!(
                "memory regions [{}] are not the layout of a {size:#x}-byte VM [{}]",
                describe(&mut self.memory.iter().map(|r| (r.guest_address, r.size))),
                describe(&mut expected.iter().map(|r| (r.start, r.size))),
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> SnapshotManifest {
        SnapshotManifest {
            format_version: MANIFEST_FORMAT_VERSION,
            skiff_version: "0.1.0".into(),
            created_unix_ms: 1,
            vm: VmDescription {
                kernel: "/k".into(),
                initrd: None,
                cmdline: "hello".into(),
                cpus: 2,
                memory_size: 8 << 20,
                memory_backing: "memfd".into(),
                memory_file: None,
            },
            memory: vec![MemoryRegionEntry {
                guest_address: 0,
                size: 8 << 20,
                file: "memory-0.bin".into(),
                page_size: 4096,
                method: "sparse-copy".into(),
                data_bytes: None,
                checksum: None,
            }],
            state: StateFileEntry {
                file: STATE_FILE.into(),
                size: 100,
                crc32: 5,
            },
            notes: vec![],
            parent: None,
            resources: vec![],
            authentication: None,
        }
    }

    fn parse_value(v: &serde_json::Value) -> Result<SnapshotManifest, ManifestError> {
        parse(&serde_json::to_vec(v).unwrap(), Path::new("m.json"))
    }

    #[test]
    fn round_trip_and_version_check() {
        let m = sample();
        let text = serde_json::to_vec_pretty(&m).unwrap();
        assert_eq!(parse(&text, Path::new("m.json")).unwrap(), m);
        let mut v = serde_json::to_value(&m).unwrap();
        v["format_version"] = 99.into();
        // Also drop a field: the version error must still win.
        v.as_object_mut().unwrap().remove("memory");
        let e = parse_value(&v).unwrap_err();
        assert!(matches!(e, ManifestError::Version { found: 99 }), "{e}");
        assert!(parse(b"{not json", Path::new("m.json")).is_err());
    }

    #[test]
    fn rejects_values_restore_cannot_use() {
        type Damage = Box<dyn Fn(&mut SnapshotManifest)>;
        let cases: Vec<(&str, Damage)> = vec![
            ("cpus 0", Box::new(|m| m.vm.cpus = 0)),
            (
                "not a plain file name",
                Box::new(|m| m.state.file = "../x".into()),
            ),
            (
                "not usable",
                Box::new(|m| m.memory[0].file = "/etc/passwd".into()),
            ),
            (
                "multiple of its page size",
                Box::new(|m| m.memory[0].size = 4097),
            ),
            ("add up to", Box::new(|m| m.vm.memory_size = 1 << 30)),
            (
                "not the layout of a 0x800000-byte VM [0x0+0x800000]",
                Box::new(|m| m.memory[0].guest_address = 0xe000_0000),
            ),
            (
                "not the layout",
                Box::new(|m| {
                    m.memory[0].size = 4 << 20;
                    m.memory.push(MemoryRegionEntry {
                        guest_address: 4 << 20,
                        file: "memory-1.bin".into(),
                        ..m.memory[0].clone()
                    });
                }),
            ),
            (
                "exceeds the maximum",
                Box::new(|m| {
                    m.vm.memory_size = 1 << 41;
                    m.memory[0].size = 1 << 41;
                }),
            ),
            ("power of two", Box::new(|m| m.memory[0].page_size = 3000)),
            ("0 memory regions", Box::new(|m| m.memory.clear())),
            (
                "names no parent",
                Box::new(|m| m.format_version = DIFF_FORMAT_VERSION),
            ),
            (
                "names a parent",
                Box::new(|m| {
                    m.parent = Some(ParentRef {
                        dir: "/p".into(),
                        manifest_crc32: 1,
                    })
                }),
            ),
            (
                "not an absolute path",
                Box::new(|m| {
                    m.format_version = DIFF_FORMAT_VERSION;
                    m.parent = Some(ParentRef {
                        dir: "p".into(),
                        manifest_crc32: 1,
                    })
                }),
            ),
        ];
        for (needle, damage) in cases {
            let mut m = sample();
            damage(&mut m);
            let e = parse_value(&serde_json::to_value(&m).unwrap()).unwrap_err();
            assert!(e.to_string().contains(needle), "{needle}: {e}");
        }
    }
}
