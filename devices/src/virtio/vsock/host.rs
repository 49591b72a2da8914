//! The host side of the hybrid vsock convention, on Unix sockets:
//! - skiff listens on `PATH`; a host program connects, writes `CONNECT P\n`, and (once the
//!   guest accepts) reads `OK <hostport>\n`;
//! - a guest connection to port P becomes a non-blocking connect to `PATH_P`.
//!
//! Nothing here blocks: the listener and every stream are non-blocking, the `CONNECT` line is
//! peeked and only the line itself consumed (bytes behind it belong to the guest), and a
//! connect to a listener whose backlog is full counts as refused. Dropping the host side
//! removes the socket file if it is still the one it bound (a VM that fails to build); one a
//! previous skiff left behind, with nobody accepting on it, is replaced.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::MAX_HANDSHAKES;

/// Longest `CONNECT` line skiff reads ("CONNECT 4294967295\n" is 19 bytes).
const MAX_LINE: usize = 32;

/// Longest path a Unix socket address holds (`sun_path` less the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Errors setting up the host side.
#[derive(Debug, Error)]
pub enum HostSideError {
    /// The path is too long for a Unix socket (with room for `_PORT`).
    #[error("vsock socket {path}: too long for a Unix socket ({len} bytes, at most {max} leaving room for _PORT)")]
    PathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Something other than a stale socket is at the path.
    #[error("vsock socket {0}: already exists (and is not a stale socket skiff may replace)")]
    Exists(PathBuf),
    /// The listener could not be created.
    #[error("vsock socket {path}: cannot listen")]
    Listen {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A host program that connected to `PATH` and has not finished its `CONNECT` line.
#[derive(Debug)]
pub struct Handshake {
    pub stream: UnixStream,
}

/// What a readable handshake stream gave.
#[derive(Debug)]
pub enum HandshakeStep {
    /// Not a whole line yet.
    Wait,
    /// `CONNECT port`: the stream, ready for the guest connection.
    Connect(u32, UnixStream),
    /// A bad line, end of file or an error: the stream was dropped.
    Closed,
}

/// The listener and the handshakes in progress.
#[derive(Debug)]
pub struct HostSide {
    path: PathBuf,
    listener: UnixListener,
    /// Device and inode of the socket file we created (removed on drop only if still ours).
    identity: (u64, u64),
    handshakes: HashMap<RawFd, Handshake>,
}

/// The length limit a `PATH` must meet: the longest `PATH_P` must fit a Unix socket address.
pub fn check_path(path: &Path) -> Result<(), HostSideError> {
    let len = path.as_os_str().len();
    let max = MAX_SOCKET_PATH - 1 - "4294967295".len();
    if len == 0 || len > max {
        return Err(HostSideError::PathTooLong {
            path: path.to_path_buf(),
            len,
            max,
        });
    }
    Ok(())
}

/// `PATH_P`: where a guest connection to port `port` goes.
pub fn port_path(path: &Path, port: u32) -> PathBuf {
    let mut s: OsString = path.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Removes a socket file at `path` that nobody listens on any more (a previous skiff that
/// died); anything else there is refused.
fn remove_stale(path: &Path) -> Result<(), HostSideError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(HostSideError::Exists(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            let _ = std::fs::remove_file(path);
            Ok(())
        }
        _ => Err(HostSideError::Exists(path.to_path_buf())),
    }
}

impl HostSide {
    /// Listens on `path` (replacing a stale socket left there).
    pub fn listen(path: &Path) -> Result<Self, HostSideError> {
        check_path(path)?;
        remove_stale(path)?;
        let listen_err = |source| HostSideError::Listen {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let meta = std::fs::symlink_metadata(path).map_err(listen_err)?;
        Ok(Self {
            path: path.to_path_buf(),
            listener,
            identity: (meta.dev(), meta.ino()),
            handshakes: HashMap::new(),
        })
    }

    /// The `PATH` given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listening socket.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Accepts pending host connections (beyond `MAX_HANDSHAKES` in progress they are closed
    /// at once); returns the new handshake fds to watch.
    pub fn accept(&mut self) -> Vec<RawFd> {
        let mut new = Vec::new();
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.handshakes.len() >= MAX_HANDSHAKES
                        || stream.set_nonblocking(true).is_err()
                    {
                        log::warn!(
                            "vsock {}: too many CONNECT handshakes in progress; closing a new one",
                            self.path.display()
                        );
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    self.handshakes.insert(fd, Handshake { stream });
                    new.push(fd);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // ECONNABORTED and resource limits: try again on the next readiness.
                    log::warn!("vsock {}: accept: {e}", self.path.display());
                    break;
                }
            }
        }
        new
    }

    /// Whether `fd` is a handshake in progress.
    pub fn is_handshake(&self, fd: RawFd) -> bool {
        self.handshakes.contains_key(&fd)
    }

    /// The handshake streams (for epoll registration).
    pub fn handshake_streams(&self) -> impl Iterator<Item = &UnixStream> {
        self.handshakes.values().map(|h| &h.stream)
    }

    /// Reads handshake `fd`'s `CONNECT` line if it is complete. On `Connect` or `Closed` the
    /// handshake is removed; the caller stops watching `fd` first.
    pub fn advance(&mut self, fd: RawFd) -> HandshakeStep {
        let Some(h) = self.handshakes.get_mut(&fd) else {
            return HandshakeStep::Closed;
        };
        let mut peek = [0u8; MAX_LINE];
        // SAFETY: `recv` writes at most `peek.len()` bytes into `peek`; `fd` is the open
        // stream owned by `h`.
        let n = unsafe {
            libc::recv(
                h.stream.as_raw_fd(),
                peek.as_mut_ptr().cast(),
                peek.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        let n = match usize::try_from(n) {
            Ok(n) => n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    return HandshakeStep::Wait;
                }
                self.handshakes.remove(&fd);
                return HandshakeStep::Closed;
            }
        };
        let Some(end) = peek[..n].iter().position(|&b| b == b'\n') else {
            if n == 0 || n == MAX_LINE {
                // End of file before a line, or a line too long to be a CONNECT.
                self.handshakes.remove(&fd);
                return HandshakeStep::Closed;
            }
            return HandshakeStep::Wait;
        };
        let Some(mut h) = self.handshakes.remove(&fd) else {
            return HandshakeStep::Closed;
        };
        // Consume exactly the line; what follows it is for the guest.
        let mut line = vec![0u8; end + 1];
        if h.stream.read_exact(&mut line).is_err() {
            return HandshakeStep::Closed;
        }
        match parse_connect(&line[..end]) {
            Some(port) => HandshakeStep::Connect(port, h.stream),
            None => {
                log::debug!(
                    "vsock {}: bad handshake line {:?}",
                    self.path.display(),
                    String::from_utf8_lossy(&line[..end])
                );
                HandshakeStep::Closed
            }
        }
    }
}

impl Drop for HostSide {
    fn drop(&mut self) {
        // Remove the socket file only if it is still the one we bound (a restored VM may have
        // taken the path over).
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.identity {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// `CONNECT <port>` (decimal, optional trailing `\r`).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.strip_prefix(b"CONNECT ")?;
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Connects to the Unix socket at `path` without blocking: a listener whose backlog is full
/// refuses (`WouldBlock`) rather than making the event loop wait.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un and `len` is within its size.
    let rc = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // EINPROGRESS does not happen for Unix sockets; EAGAIN is a full backlog.
        return Err(e);
    }
    Ok(UnixStream::from(owned))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Write;

    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 4294967296"[..],
            b"CONNECT ",
            b"CONNECT -1",
            b"connect 5",
            b"CONNECT 5 6",
            b"",
        ] {
            assert_eq!(
                parse_connect(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn paths() {
        assert_eq!(
            port_path(Path::new("/tmp/v.sock"), 52),
            PathBuf::from("/tmp/v.sock_52")
        );
        let long = PathBuf::from(format!("/{}", "a".repeat(100)));
        assert!(matches!(
            check_path(&long),
            Err(HostSideError::PathTooLong { .. })
        ));
    }

    #[test]
    fn handshake_keeps_bytes_after_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let mut host = HostSide::listen(&path).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 1234\nhello").unwrap();
        let fds = host.accept();
        assert_eq!(fds.len(), 1);
        match host.advance(fds[0]) {
            HandshakeStep::Connect(1234, mut stream) => {
                let mut rest = [0u8; 5];
                stream.read_exact(&mut rest).unwrap();
                assert_eq!(&rest, b"hello");
            }
            other => panic!("{other:?}"),
        }
        assert!(!host.is_handshake(fds[0]));
    }

    #[test]
    fn stale_socket_is_replaced_and_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "std leaves the socket file behind");
        let host = HostSide::listen(&path).unwrap();
        assert!(HostSide::listen(&path).is_err(), "in use");
        drop(host);
        assert!(!path.exists());
        std::fs::write(&path, b"x").unwrap();
        assert!(matches!(
            HostSide::listen(&path),
            Err(HostSideError::Exists(_))
        ));
    }

    #[test]
    fn connect_refused_and_ok() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        assert!(connect_nonblocking(&path).is_err());
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        connect_nonblocking(&path).unwrap();
    }
}
