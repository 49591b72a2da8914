//! Where the agent talks to the host: vsock or a Unix socket, as a listener or an outgoing
//! connection, with every connection handed out as a plain `File` over the socket.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

/// A socket address the agent can listen on or connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `unix:PATH`
    Unix(PathBuf),
    /// `vsock:PORT` to listen (any CID), `vsock:CID:PORT` to connect.
    Vsock { cid: u32, port: u32 },
}

impl Address {
    /// Parses `unix:PATH`, `vsock:PORT` or `vsock:CID:PORT`.
    pub fn parse(s: &str) -> Result<Address, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("{s}: empty socket path"));
            }
            return Ok(Address::Unix(path.into()));
        }
        if let Some(rest) = s.strip_prefix("vsock:") {
            let num = |v: &str| {
                v.parse::<u32>()
                    .map_err(|_| format!("{s}: {v} is not a number"))
            };
            return Ok(match rest.split_once(':') {
                Some((cid, port)) => Address::Vsock {
                    cid: num(cid)?,
                    port: num(port)?,
                },
                None => Address::Vsock {
                    cid: libc::VMADDR_CID_ANY,
                    port: num(rest)?,
                },
            });
        }
        Err(format!(
            "{s}: expected unix:PATH, vsock:PORT or vsock:CID:PORT"
        ))
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn vsock_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket has no memory effects.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Connects to `addr`.
pub fn connect(addr: &Address) -> std::io::Result<File> {
    match addr {
        Address::Unix(path) => Ok(File::from(OwnedFd::from(UnixStream::connect(path)?))),
        Address::Vsock { cid, port } => {
            let fd = vsock_socket()?;
            let sa = vsock_addr(*cid, *port);
            // SAFETY: `sa` is a sockaddr_vm of the size passed.
            let rc = unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    (&sa as *const libc::sockaddr_vm).cast(),
                    std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(File::from(fd))
        }
    }
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    Unix(UnixListener),
    Vsock(OwnedFd),
}

impl Listener {
    /// Listens on `addr` (a stale Unix socket file is replaced).
    pub fn bind(addr: &Address) -> std::io::Result<Listener> {
        match addr {
            Address::Unix(path) => {
                let _ = std::fs::remove_file(path);
                Ok(Listener::Unix(UnixListener::bind(path)?))
            }
            Address::Vsock { cid, port } => {
                let fd = vsock_socket()?;
                let sa = vsock_addr(*cid, *port);
                // SAFETY: `sa` is a sockaddr_vm of the size passed; listen has no memory effects.
                let rc = unsafe {
                    let rc = libc::bind(
                        fd.as_raw_fd(),
                        (&sa as *const libc::sockaddr_vm).cast(),
                        std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                    );
                    if rc == 0 {
                        libc::listen(fd.as_raw_fd(), 16)
                    } else {
                        rc
                    }
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(Listener::Vsock(fd))
            }
        }
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> std::io::Result<File> {
        match self {
            Listener::Unix(l) => Ok(File::from(OwnedFd::from(l.accept()?.0))),
            Listener::Vsock(fd) => loop {
                // SAFETY: accept4 with null address pointers only returns a new fd.
                let c = unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                if c >= 0 {
                    // SAFETY: a new fd nobody else owns.
                    return Ok(File::from(unsafe { OwnedFd::from_raw_fd(c) }));
                }
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            Address::parse("vsock:2:1024"),
            Ok(Address::Vsock { cid: 2, port: 1024 })
        );
        assert_eq!(
            Address::parse("vsock:1024"),
            Ok(Address::Vsock {
                cid: libc::VMADDR_CID_ANY,
                port: 1024
            })
        );
        assert_eq!(Address::parse("unix:/x"), Ok(Address::Unix("/x".into())));
        assert!(Address::parse("vsock:x").is_err());
        assert!(Address::parse("tcp:1").is_err());
        assert!(Address::parse("unix:").is_err());
    }
}
