//! The control socket as an event-loop subscriber.
//!
//! The listening socket is created owner-only (bound under a temporary name, set to 0600, then
//! renamed into place) and refused when the path exists and is not a stale socket. The
//! subscriber accepts connections, reads each until one whole request has arrived, and queues
//! it as a `Route` with a token; invalid requests are answered at once. The runner takes the
//! queue after each event-loop turn, acts on the VM, and answers through `respond`, which writes
//! the response and closes the connection. A snapshot's answer comes later, when its write ends;
//! the connection waits meanwhile. A `POST /vm/exec`'s connection is taken out of the server
//! (`take_connection`) and answered by the worker that runs the command.
//!
//! Nothing a client does can stall the event loop or lock others out: sockets are non-blocking
//! (an answer the peer does not take is dropped), a request must be complete within
//! `REQUEST_TIMEOUT` of its connection (a one-second timer closes late ones with 408), and when
//! all `MAX_CONNECTIONS` slots are taken the connection that has been sending its request the
//! longest is closed to make room; only when every slot holds a request being worked on is a new
//! one answered 503. At drop the socket is removed only if the path still holds the socket this
//! server created (same device and inode): another skiff may have taken the path since.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use thiserror::Error;
use vmm_sys_util::timerfd::TimerFd;

use super::http::{error_body, parse_request, response, Parsed, MAX_BODY_BYTES, MAX_HEADER_BYTES};
use super::{route, Route};

/// Most connections open at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a connection may take to send its whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often connections are checked against `REQUEST_TIMEOUT`.
const EXPIRY_TICK: Duration = Duration::from_secs(1);

/// Errors from creating the control socket.
#[derive(Debug, Error)]
pub enum ServerError {
    /// Something that is not a socket sits at the path.
    #[error("--api-socket {0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Another process serves the socket.
    #[error("--api-socket {0} is in use by another process")]
    InUse(PathBuf),
    /// A socket operation failed.
    #[error("cannot {op} --api-socket {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Identifies a connection waiting for its answer.
pub type Token = u64;

struct Connection {
    stream: UnixStream,
    buf: Vec<u8>,
    accepted: Instant,
}

/// The control socket's subscriber.
pub struct ApiServer {
    path: PathBuf,
    /// Device and inode of the socket this server created at `path`.
    identity: (u64, u64),
    listener: UnixListener,
    /// Ticks while connections are still sending their request.
    expiry: TimerFd,
    next: Token,
    /// Connections still sending their request, by descriptor.
    reading: HashMap<i32, (Token, Connection)>,
    /// Connections whose request is queued or being worked on.
    waiting: HashMap<Token, Connection>,
    queued: Vec<(Token, Route)>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("path", &self.path)
            .field("connections", &(self.reading.len() + self.waiting.len()))
            .finish()
    }
}

impl ApiServer {
    /// Creates the socket at `path`, owner-only.
    pub fn bind(path: &Path) -> Result<Self, ServerError> {
        let io = |op| {
            move |source| ServerError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ServerError::NotASocket(path.to_path_buf()));
            }
            match UnixStream::connect(path) {
                Ok(_) => return Err(ServerError::InUse(path.to_path_buf())),
                // Nobody listens: a socket left by a process that died. Replace it.
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(io("remove the stale"))?;
                }
                Err(e) => return Err(io("probe")(e)),
            }
        }
        let mut temp = path.as_os_str().to_os_string();
        temp.push(format!(".tmp-{}", std::process::id()));
        let temp = PathBuf::from(temp);
        let _ = std::fs::remove_file(&temp);
        let listener = UnixListener::bind(&temp).map_err(io("bind"))?;
        let placed = std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&temp, path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&temp);
            return Err(io("create")(e));
        }
        let meta = std::fs::symlink_metadata(path).map_err(io("inspect"))?;
        listener.set_nonblocking(true).map_err(io("configure"))?;
        let expiry = TimerFd::new()
            .map_err(|e| io("create the request timer for")(std::io::Error::from(e)))?;
        Ok(Self {
            path: path.to_path_buf(),
            identity: (meta.dev(), meta.ino()),
            listener,
            expiry,
            next: 1,
            reading: HashMap::new(),
            waiting: HashMap::new(),
            queued: Vec::new(),
        })
    }

    /// Takes the requests that arrived since the last call.
    pub fn take_requests(&mut self) -> Vec<(Token, Route)> {
        std::mem::take(&mut self.queued)
    }

    /// Takes request `token`'s connection out of the server, for an answer written elsewhere
    /// (`POST /vm/exec`'s worker). The socket is left blocking.
    pub fn take_connection(&mut self, token: Token) -> Option<UnixStream> {
        let conn = self.waiting.remove(&token)?;
        let _ = conn.stream.set_nonblocking(false);
        Some(conn.stream)
    }

    /// Answers request `token` and closes its connection.
    pub fn respond(&mut self, token: Token, status: u16, json: &str) {
        if let Some(conn) = self.waiting.remove(&token) {
            answer(conn.stream, status, json);
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.reading.len() + self.waiting.len() >= MAX_CONNECTIONS
                        && !self.close_oldest_reading(ops)
                    {
                        refuse(stream, 503, "too many control requests in progress");
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if let Err(e) = ops.add(Events::new(&stream, EventSet::IN)) {
                        log::warn!("control socket: cannot watch a connection: {e:?}");
                        continue;
                    }
                    let token = self.next;
                    self.next += 1;
                    self.reading.insert(
                        stream.as_raw_fd(),
                        (
                            token,
                            Connection {
                                stream,
                                buf: Vec::new(),
                                accepted: Instant::now(),
                            },
                        ),
                    );
                    self.arm_expiry();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("control socket: accept failed: {e}");
                    break;
                }
            }
        }
    }

    /// Makes room: closes (with 408) the connection that has been sending its request the
    /// longest. False when every connection holds a request being worked on.
    fn close_oldest_reading(&mut self, ops: &mut EventOps) -> bool {
        let Some(fd) = self
            .reading
            .iter()
            .min_by_key(|(_, (token, _))| *token)
            .map(|(fd, _)| *fd)
        else {
            return false;
        };
        self.close_reading(
            fd,
            ops,
            "closed to make room for another control connection",
        );
        true
    }

    fn close_reading(&mut self, fd: i32, ops: &mut EventOps, why: &str) {
        let _ = ops.remove(Events::empty_raw(fd));
        if let Some((_, conn)) = self.reading.remove(&fd) {
            refuse(conn.stream, 408, why);
        }
    }

    /// Starts the expiry tick unless it runs already (never moves an armed timer, so an
    /// expiry already counted is never lost).
    fn arm_expiry(&mut self) {
        if self.expiry.is_armed().unwrap_or(false) {
            return;
        }
        if let Err(e) = self.expiry.reset(EXPIRY_TICK, Some(EXPIRY_TICK)) {
            log::warn!("control socket: cannot arm the request timer: {e}");
        }
    }

    /// Closes the connections whose request did not arrive in time; stops the tick when no
    /// connection is left sending.
    fn expire(&mut self, ops: &mut EventOps) {
        let _ = self.expiry.wait();
        let late: Vec<i32> = self
            .reading
            .iter()
            .filter(|(_, (_, c))| c.accepted.elapsed() >= REQUEST_TIMEOUT)
            .map(|(fd, _)| *fd)
            .collect();
        let why = format!("no complete request within {} s", REQUEST_TIMEOUT.as_secs());
        for fd in late {
            self.close_reading(fd, ops, &why);
        }
        if self.reading.is_empty() {
            let _ = self.expiry.clear();
        }
    }

    fn read(&mut self, fd: i32, ops: &mut EventOps) {
        let Some((_, conn)) = self.reading.get_mut(&fd) else {
            let _ = ops.remove(Events::empty_raw(fd));
            return;
        };
        let mut chunk = [0u8; 4096];
        let mut closed = false;
        loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    closed = true;
                    break;
                }
            }
            if conn.buf.len() > MAX_HEADER_BYTES + MAX_BODY_BYTES {
                break;
            }
        }
        let parsed = parse_request(&conn.buf);
        if matches!(parsed, Parsed::Incomplete) && !closed {
            return;
        }
        let _ = ops.remove(Events::empty_raw(fd));
        let Some((token, conn)) = self.reading.remove(&fd) else {
            return;
        };
        match parsed {
            Parsed::Complete(req) => match route(&req) {
                Ok(r) => {
                    self.waiting.insert(token, conn);
                    self.queued.push((token, r));
                }
                Err((status, msg)) => answer(conn.stream, status, &error_body(&msg)),
            },
            Parsed::Invalid(status, msg) => answer(conn.stream, status, &error_body(&msg)),
            // The peer closed before sending a whole request: nobody to answer.
            Parsed::Incomplete => {}
        }
    }
}

/// Writes the response and closes the connection. The socket stays non-blocking: an answer
/// the peer's buffer cannot take at once (it never reads) is dropped, the loop never waits.
fn answer(mut stream: UnixStream, status: u16, json: &str) {
    let _ = stream.set_nonblocking(true);
    let _ = stream.write_all(&response(status, json));
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Answers a connection turned away with `status` and `why`. What the client sent so far is
/// read first, as far as it has arrived: a socket closed with unread input resets the
/// connection, and the client may then see the reset before the answer.
fn refuse(mut stream: UnixStream, status: u16, why: &str) {
    let _ = stream.set_nonblocking(true);
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        match stream.read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    answer(stream, status, &error_body(why));
}

impl MutEventSubscriber for ApiServer {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.listener.as_raw_fd() {
            self.accept(ops);
        } else if events.fd() == self.expiry.as_raw_fd() {
            self.expire(ops);
        } else {
            self.read(events.fd(), ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            log::error!("cannot watch the control socket: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(&self.expiry, EventSet::IN)) {
            log::error!("cannot watch the control socket's request timer: {e:?}");
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        for (_, conn) in self.waiting.drain() {
            answer(conn.stream, 503, &error_body("the VM has ended"));
        }
        // Only our own socket: the path may belong to another skiff by now.
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_is_owner_only_and_existing_paths_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let server = ApiServer::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = ApiServer::bind(&path).unwrap_err();
        assert!(matches!(e, ServerError::InUse(_)), "{e}");
        drop(server);
        assert!(!path.exists(), "the socket is removed on drop");
        let stale = UnixListener::bind(&path).unwrap();
        drop(stale);
        // A socket nobody listens on any more is replaced.
        ApiServer::bind(&path).unwrap();
        // A path another server took over since is left alone at drop.
        let first = ApiServer::bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let second = ApiServer::bind(&path).unwrap();
        drop(first);
        assert!(path.exists(), "the other server's socket was removed");
        drop(second);
        assert!(!path.exists());
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            ApiServer::bind(&file),
            Err(ServerError::NotASocket(_))
        ));
    }
}
