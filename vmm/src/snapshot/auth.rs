//! Snapshot authentication: an HMAC-SHA256 under a per-user key says "this user's skiff wrote
//! this snapshot on this host", which is what lets restore open the host resources the snapshot
//! names without asking (see `authorize`).
//!
//! The key is 32 random bytes in `$XDG_STATE_HOME/skiff/snapshot.key` (default
//! `~/.local/state/skiff/snapshot.key`), mode 0600, created on first use: written to a
//! temporary file in the same directory, fsynced, then `link`ed into place, so two skiffs
//! racing to create it agree on one key. A key file that is not a regular file of 32 bytes
//! owned by the user with no group or other permissions is refused.
//!
//! The MAC is the manifest's `authentication` field (hex). It covers a fixed label, the
//! manifest as skiff re-encodes it from its parsed fields with `authentication` left out
//! (compact JSON, so whitespace and fields this skiff does not read do not matter: what is
//! authenticated is exactly what restore uses), and every byte of `state.bin`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

use super::manifest::SnapshotManifest;

/// The key's length in bytes.
pub const KEY_BYTES: usize = 32;
/// The key file's name inside the state directory.
pub const KEY_FILE: &str = "snapshot.key";
/// What the MAC input starts with (domain separation and a version).
const LABEL: &[u8] = b"skiff snapshot authentication v1\0";

type HmacSha256 = Hmac<Sha256>;

/// Why the key cannot be used or created.
#[derive(Debug, Error)]
pub enum AuthError {
    /// Neither `$XDG_STATE_HOME` nor `$HOME` is set to an absolute path.
    #[error("cannot find the snapshot key: neither XDG_STATE_HOME nor HOME is an absolute path")]
    NoStateDir,
    /// Reading, creating or checking the key file failed.
    #[error("cannot {op} snapshot key {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The key file or its directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file is not one skiff would have written.
    #[error("snapshot key {path} {problem}; remove it to have a new one made")]
    BadKeyFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The manifest could not be encoded.
    #[error("cannot encode the manifest to authenticate it: {0}")]
    Encode(String),
}

/// Whether a snapshot was authenticated, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    /// Its MAC matches this user's key.
    Authenticated,
    /// Not authenticated for this user: the reason, for messages.
    NotAuthenticated(String),
}

impl Authentication {
    /// Whether the snapshot is authenticated.
    pub fn is_authenticated(&self) -> bool {
        matches!(self, Self::Authenticated)
    }
}

/// A user's snapshot key.
pub struct SnapshotKey([u8; KEY_BYTES]);

impl std::fmt::Debug for SnapshotKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnapshotKey(..)")
    }
}

/// The default key path: `$XDG_STATE_HOME/skiff/snapshot.key`, or
/// `$HOME/.local/state/skiff/snapshot.key`.
pub fn default_key_path() -> Result<PathBuf, AuthError> {
    let absolute = |v: Option<std::ffi::OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(state) = absolute(std::env::var_os("XDG_STATE_HOME")) {
        return Ok(state.join("skiff").join(KEY_FILE));
    }
    let home = absolute(std::env::var_os("HOME")).ok_or(AuthError::NoStateDir)?;
    Ok(home.join(".local/state/skiff").join(KEY_FILE))
}

fn random_bytes() -> Result<[u8; KEY_BYTES], std::io::Error> {
    let mut key = [0u8; KEY_BYTES];
    let mut filled = 0;
    while filled < KEY_BYTES {
        // SAFETY: the pointer and length describe the unfilled tail of `key`, which outlives
        // the call.
        let n =
            unsafe { libc::getrandom(key[filled..].as_mut_ptr().cast(), KEY_BYTES - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += usize::try_from(n).unwrap_or(0);
    }
    Ok(key)
}

impl SnapshotKey {
    /// A key with these bytes (tests, and a key read from its file).
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        Self(bytes)
    }

    /// The key at `path`, or `None` when there is no such file.
    pub fn load(path: &Path) -> Result<Option<Self>, AuthError> {
        let io = |op| {
            let path = path.to_path_buf();
            move |source| AuthError::Io { op, path, source }
        };
        let bad = |problem: String| AuthError::BadKeyFile {
            path: path.to_path_buf(),
            problem,
        };
        let file = match File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(bad("is a symbolic link".into()))
            }
            Err(e) => return Err(io("open")(e)),
        };
        let meta = file.metadata().map_err(io("fstat"))?;
        if !meta.file_type().is_file() {
            return Err(bad("is not a regular file".into()));
        }
        // SAFETY: geteuid has no memory effects and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(bad(format!(
                "is owned by uid {}, not you ({me})",
                meta.uid()
            )));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(bad(format!(
                "has mode {:04o}; it must be readable by you only (0600)",
                meta.mode() & 0o7777
            )));
        }
        if meta.len() != KEY_BYTES as u64 {
            return Err(bad(format!("is {} bytes, not {KEY_BYTES}", meta.len())));
        }
        let mut key = [0u8; KEY_BYTES];
        (&file).read_exact(&mut key).map_err(io("read"))?;
        Ok(Some(Self(key)))
    }

    /// The key at `path`, created (with its directory, mode 0700) when missing.
    pub fn load_or_create(path: &Path) -> Result<Self, AuthError> {
        if let Some(key) = Self::load(path)? {
            return Ok(key);
        }
        let io = |op, p: &Path| {
            let path = p.to_path_buf();
            move |source| AuthError::Io { op, path, source }
        };
        let dir = path.parent().unwrap_or(Path::new("/"));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("create the directory of", path))?;
        let key = random_bytes().map_err(io("generate", path))?;
        // A name no other creator (process or thread) uses: the pid and random bytes.
        let nonce = random_bytes().map_err(io("generate", path))?;
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(
            ".tmp-{}-{}",
            std::process::id(),
            nonce[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ));
        let temp = path.with_file_name(name);
        let written = (|| {
            let mut f = File::options()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)?;
            f.write_all(&key)?;
            f.sync_all()?;
            // Fails with EEXIST when another skiff made the key first: then that one counts.
            std::fs::hard_link(&temp, path)
        })();
        let _ = std::fs::remove_file(&temp);
        match written {
            Ok(()) => {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io("fsync the directory of", path))?;
                Ok(Self(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::load(path)?
                .ok_or_else(|| io("create", path)(std::io::Error::from_raw_os_error(libc::ENOENT))),
            Err(e) => Err(io("create", path)(e)),
        }
    }

    fn mac(&self, manifest: &SnapshotManifest, state: &[u8]) -> Result<HmacSha256, AuthError> {
        let mut unsealed = manifest.clone();
        unsealed.authentication = None;
        let text = serde_json::to_vec(&unsealed).map_err(|e| AuthError::Encode(e.to_string()))?;
        let mut mac =
            HmacSha256::new_from_slice(&self.0).map_err(|e| AuthError::Encode(e.to_string()))?;
        mac.update(LABEL);
        mac.update(&(text.len() as u64).to_le_bytes());
        mac.update(&text);
        mac.update(state);
        Ok(mac)
    }

    /// Sets `manifest.authentication` to the MAC of `manifest` and the state file's bytes.
    pub fn seal(&self, manifest: &mut SnapshotManifest, state: &[u8]) -> Result<(), AuthError> {
        let tag = self.mac(manifest, state)?.finalize().into_bytes();
        manifest.authentication = Some(tag.iter().map(|b| format!("{b:02x}")).collect());
        Ok(())
    }

    /// Whether `manifest.authentication` is the MAC of `manifest` and `state` under this key
    /// (compared in constant time).
    pub fn verify(&self, manifest: &SnapshotManifest, state: &[u8]) -> Authentication {
        let Some(hex) = &manifest.authentication else {
            return Authentication::NotAuthenticated("it carries no MAC".into());
        };
        let Some(tag) = decode_hex(hex) else {
            return Authentication::NotAuthenticated("its MAC is not 64 hex digits".into());
        };
        match self.mac(manifest, state).map(|mac| mac.verify_slice(&tag)) {
            Ok(Ok(())) => Authentication::Authenticated,
            Ok(Err(_)) => Authentication::NotAuthenticated(
                "its MAC does not match this user's key: it was changed, or made by another user or host".into(),
            ),
            Err(e) => Authentication::NotAuthenticated(e.to_string()),
        }
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 2 * KEY_BYTES || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_key_is_made_once_0600_and_reused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state/skiff").join(KEY_FILE);
        assert!(SnapshotKey::load(&path).unwrap().is_none());
        let a = SnapshotKey::load_or_create(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(meta.len(), KEY_BYTES as u64);
        let dir_mode = std::fs::metadata(path.parent().unwrap()).unwrap().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let b = SnapshotKey::load_or_create(&path).unwrap();
        assert_eq!(a.0, b.0);
        assert_ne!(a.0, [0; KEY_BYTES]);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [KEY_FILE], "no temporary file left");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = SnapshotKey::load(&path).unwrap_err();
        assert!(e.to_string().contains("has mode 0644"), "{e}");
    }

    #[test]
    fn racing_creators_agree_on_one_key() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(KEY_FILE);
        let keys: Vec<[u8; KEY_BYTES]> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| SnapshotKey::load_or_create(&path).unwrap().0))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]));
    }

    #[test]
    fn the_mac_covers_manifest_fields_and_every_state_byte() {
        let key = SnapshotKey::from_bytes([7; KEY_BYTES]);
        let other = SnapshotKey::from_bytes([8; KEY_BYTES]);
        let mut m = crate::snapshot::manifest::tests::sample();
        let state = b"state bytes".to_vec();
        assert!(!key.verify(&m, &state).is_authenticated());
        key.seal(&mut m, &state).unwrap();
        assert_eq!(key.verify(&m, &state), Authentication::Authenticated);
        // Re-encoded differently (pretty): still the same fields.
        let pretty = serde_json::to_vec_pretty(&m).unwrap();
        let reparsed: SnapshotManifest = serde_json::from_slice(&pretty).unwrap();
        assert!(key.verify(&reparsed, &state).is_authenticated());
        assert!(!other.verify(&m, &state).is_authenticated());
        let mut changed = state.clone();
        changed[3] ^= 1;
        assert!(!key.verify(&m, &changed).is_authenticated());
        let mut edited = m.clone();
        edited.vm.cmdline.push('x');
        assert!(!key.verify(&edited, &state).is_authenticated());
        let mut garbled = m.clone();
        garbled.authentication = Some("zz".repeat(32));
        assert!(!key.verify(&garbled, &state).is_authenticated());
    }
}
