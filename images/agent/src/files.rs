//! `ReadFile` and `WriteFile`: a file's bytes to and from the host.
//!
//! A read streams `FileData` chunks on a thread of its own, so a large file does not hold up
//! the connection's other requests. A write replaces the file atomically (a temporary file in
//! the same directory, fsync, rename) or appends to it.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agent_protocol::{ErrorCode, Message, WriteFlags, DATA_CHUNK};

use crate::session::Writer;

/// Streams the file at `path` as `FileData` frames and then `Done` (or an `Error`).
pub fn read_file(out: Arc<Writer>, req: u32, path: &[u8]) {
    let path = PathBuf::from(OsStr::from_bytes(path));
    let out2 = Arc::clone(&out);
    let spawned = std::thread::Builder::new()
        .name(format!("read-{req}"))
        .spawn(move || {
            let mut file = match File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    return out.error(req, ErrorCode::Io, &format!("{}: {e}", path.display()))
                }
            };
            let mut buf = vec![0u8; DATA_CHUNK];
            loop {
                match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if out.send(req, &Message::FileData(&buf[..n])).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        return out.error(req, ErrorCode::Io, &format!("{}: {e}", path.display()))
                    }
                }
            }
            let _ = out.send(req, &Message::Done);
        });
    if spawned.is_err() {
        out2.error(req, ErrorCode::Io, "could not start a thread for the read");
    }
}

/// Writes `data` to `path`: replaces the file (created with `mode`) or appends to it.
pub fn write_file(path: &[u8], flags: WriteFlags, mode: u32, data: &[u8]) -> Result<(), String> {
    let path = Path::new(OsStr::from_bytes(path));
    let fail = |e: std::io::Error| format!("{}: {e}", path.display());
    if flags.has(WriteFlags::APPEND) {
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(mode & 0o7777)
            .open(path)
            .map_err(fail)?;
        return f.write_all(data).map_err(fail);
    }
    let name = path
        .file_name()
        .ok_or_else(|| format!("{}: not a file name", path.display()))?;
    let mut tmp_name = OsStr::new(".").to_os_string();
    tmp_name.push(name);
    tmp_name.push(format!(".skiff-agent-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode & 0o7777)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(fail)
}
