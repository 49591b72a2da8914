//! The initramfs `skiff exec` boots: the embedded guest agent at `/skiff-agent` (run through
//! `rdinit=`), the directories it mounts on and `/dev/console`, then the user's `--initrd`
//! appended unchanged (the kernel unpacks concatenated archives in order, so the user's files
//! may add to or replace skiff's, except that `rdinit=` still names the agent).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use thiserror::Error;

use super::cpio::CpioWriter;

/// The guest agent, built for x86_64-unknown-linux-musl by vmm/build.rs.
pub static AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/skiff-agent"));

/// Where the agent sits in the initramfs; the kernel command line says `rdinit=` this.
pub const AGENT_PATH: &str = "/skiff-agent";

/// Why the initramfs could not be written.
#[derive(Debug, Error)]
pub enum InitramfsError {
    /// This skiff was built without an agent (an empty `SKIFF_AGENT_BIN`).
    #[error("this skiff binary has no guest agent embedded (built with an empty SKIFF_AGENT_BIN)")]
    NoAgent,
    /// Writing the archive failed.
    #[error("cannot write the initramfs {path}")]
    Write {
        /// The file being written.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The user's initrd could not be read.
    #[error("cannot read --initrd {path}")]
    UserInitrd {
        /// The user's file.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Writes skiff's archive, then `user_initrd` if given, to `out_path`.
pub fn write_initramfs(out_path: &Path, user_initrd: Option<&Path>) -> Result<(), InitramfsError> {
    if AGENT.is_empty() {
        return Err(InitramfsError::NoAgent);
    }
    let write_err = |source| InitramfsError::Write {
        path: out_path.display().to_string(),
        source,
    };
    let file = File::create(out_path).map_err(write_err)?;
    let mut out = BufWriter::new(file);
    skiff_archive(&mut out).map_err(write_err)?;
    if let Some(user) = user_initrd {
        let mut input = File::open(user).map_err(|source| InitramfsError::UserInitrd {
            path: user.display().to_string(),
            source,
        })?;
        io::copy(&mut input, &mut out).map_err(|source| InitramfsError::UserInitrd {
            path: user.display().to_string(),
            source,
        })?;
    }
    out.flush().map_err(write_err)
}

fn skiff_archive<W: Write>(out: W) -> io::Result<W> {
    let mut w = CpioWriter::new(out);
    for dir in ["dev", "proc", "sys", "tmp", "run", "root"] {
        w.dir(dir, 0o755)?;
    }
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.file(AGENT_PATH.trim_start_matches('/'), 0o755, AGENT)?;
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_agent_is_a_static_elf() {
        assert!(AGENT.len() > 100_000, "agent is {} bytes", AGENT.len());
        assert!(
            AGENT.len() <= 1 << 20,
            "agent is {} bytes, over 1 MiB",
            AGENT.len()
        );
        assert_eq!(&AGENT[..4], b"\x7fELF");
    }

    #[test]
    fn the_user_initrd_follows_skiffs_archive() {
        let dir = tempfile::tempdir().unwrap();
        let user = dir.path().join("user.cpio");
        std::fs::write(&user, b"USER-ARCHIVE").unwrap();
        let out = dir.path().join("initramfs");
        write_initramfs(&out, Some(&user)).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert!(bytes.starts_with(b"070701"));
        assert!(bytes.ends_with(b"USER-ARCHIVE"));
        assert_eq!((bytes.len() - 12) % 512, 0);
        let missing = write_initramfs(&out, Some(&dir.path().join("nope")));
        assert!(matches!(missing, Err(InitramfsError::UserInitrd { .. })));
    }
}
