//! The frontend's side of the vhost-user protocol, on top of the `vhost` crate's `Frontend`:
//! connecting to the backend's socket, the start-up handshake (owner, virtio features, protocol
//! features, queue count, configuration space), the memory table, and bringing each queue up
//! (`SET_VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE`) and down (`GET_VRING_BASE`), and the dirty
//! log's messages (`SET_LOG_BASE`, `VHOST_F_LOG_ALL`, logged ring addresses).
//!
//! Every reply is untrusted. The `vhost` crate checks message framing (sizes, reply flags,
//! unexpected fds); this module checks what the values mean: the features the device needs,
//! the queue count the backend can serve, the configuration space's size. The socket has send
//! and receive timeouts, so a backend that stops answering fails a request instead of hanging
//! the vCPU thread that drives activation.
//!
//! Not here: what the device does with the answers (`device`) and interrupt forwarding
//! (`call_forwarder`).

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::config::{ConfigError, SharedMemoryRegion, VhostUserConfig};
use super::dirty_log::LogBuffer;
use super::watchdog::Watchdog;

/// How long one request may wait for the backend (sending or answering). The socket's own
/// timeouts and a watchdog (which shuts the socket down) both enforce it.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Protocol features the frontend uses when the backend offers them.
const WANTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::CONFIG
    .union(VhostUserProtocolFeatures::MQ)
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::LOG_SHMFD);

/// `VHOST_F_LOG_ALL`: the backend logs every page it writes in the dirty log.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// `VHOST_VRING_F_LOG`: the ring's used-ring writes are logged.
const VHOST_VRING_F_LOG: u32 = 1;

/// Errors from talking to a vhost-user backend.
#[derive(Debug, Error)]
pub enum VhostUserError {
    /// A saved configuration (from a snapshot) is invalid.
    #[error("saved vhost-user device on socket {socket}")]
    SavedConfig {
        /// The saved socket path.
        socket: PathBuf,
        /// What is wrong, with the value.
        #[source]
        source: ConfigError,
    },
    /// The socket path does not exist.
    #[error("vhost-user socket {0} does not exist (start the backend first)")]
    SocketMissing(PathBuf),
    /// The path exists but is not a Unix socket.
    #[error("vhost-user socket {0} is not a Unix socket")]
    NotASocket(PathBuf),
    /// The path cannot be inspected.
    #[error("cannot inspect vhost-user socket {path}")]
    Inspect {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `connect` failed (refused: nobody listens).
    #[error("cannot connect to vhost-user backend at {path}")]
    Connect {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A protocol step failed (malformed reply, closed connection, timeout, refusal).
    #[error("vhost-user backend {path}: {step} failed")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// The request that failed.
        step: String,
        /// The cause.
        #[source]
        source: vhost::Error,
    },
    /// The backend does not offer a feature the device needs.
    #[error("vhost-user backend {path} offers features {offered:#x}, which lack {missing}")]
    MissingFeatures {
        /// The socket.
        path: PathBuf,
        /// What it offers.
        offered: u64,
        /// What is missing.
        missing: &'static str,
    },
    /// A backend that came back after a loss no longer offers features the guest was offered.
    #[error("vhost-user backend {path} offers features {offered:#x}, which lack {missing:#x} that the device offered the guest")]
    FeaturesLost {
        /// The socket.
        path: PathBuf,
        /// What it offers now.
        offered: u64,
        /// The offered features it lacks.
        missing: u64,
    },
    /// The backend serves fewer queues than configured.
    #[error("vhost-user backend {path} serves at most {offered} queues, {requested} configured")]
    TooManyQueues {
        /// The socket.
        path: PathBuf,
        /// The backend's maximum.
        offered: u64,
        /// `queues=`.
        requested: u16,
    },
    /// The backend refused the memory table.
    #[error("vhost-user backend {path} rejected the guest memory table ({regions} fd-backed regions; the backend must be able to mmap them)")]
    MemTableRejected {
        /// The socket.
        path: PathBuf,
        /// How many regions were sent.
        regions: usize,
        /// The cause.
        #[source]
        source: vhost::Error,
    },
    /// A virtio-fs device with no mount tag: the backend gives none and `tag=` is missing.
    #[error(
        "vhost-user-fs backend {0} gives no mount tag in its configuration space: give tag=TAG"
    )]
    FsTagMissing(PathBuf),
    /// A ring's guest address is outside guest memory.
    #[error("queue {queue}: {what} at guest address {address:#x} is outside guest memory")]
    RingOutsideMemory {
        /// Queue index.
        queue: u16,
        /// "descriptor table", "available ring" or "used ring".
        what: &'static str,
        /// The guest address.
        address: u64,
    },
    /// The backend stopped a ring at a position it cannot have reached.
    #[error("queue {queue}: the backend stopped at available index {base}, which is not within {size} entries after the used index {used}")]
    BadVringBase {
        /// Queue index.
        queue: u16,
        /// The backend's `GET_VRING_BASE` reply.
        base: u32,
        /// The used index in guest memory.
        used: u16,
        /// The queue size.
        size: u16,
    },
    /// A descriptor could not be duplicated or an eventfd created.
    #[error("vhost-user: cannot create {what}")]
    Host {
        /// What.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What the backend agreed to at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// virtio features the backend offers (including `VHOST_USER_F_PROTOCOL_FEATURES`).
    pub features: u64,
    /// Protocol features both sides use.
    pub protocol: VhostUserProtocolFeatures,
}

impl Negotiated {
    /// Whether rings start disabled and need `SET_VRING_ENABLE`.
    pub fn has_protocol_features(&self) -> bool {
        self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }
}

/// One queue as the backend needs it: guest ring addresses translated to this process's.
#[derive(Debug, Clone, Copy)]
pub struct RingSetup {
    /// Queue index.
    pub index: u16,
    /// Size the driver chose.
    pub size: u16,
    /// This process's addresses of the descriptor table, available and used rings.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// The used ring's guest address (the log address of a logged ring).
    pub used_guest: u64,
    /// Where the backend starts reading the available ring.
    pub base: u16,
}

/// A connection to one backend.
pub struct Connection {
    path: PathBuf,
    frontend: Frontend,
    negotiated: Negotiated,
    watchdog: Watchdog,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("path", &self.path)
            .field("negotiated", &self.negotiated)
            .finish_non_exhaustive()
    }
}

/// Connects to `path`, telling apart a missing path, a non-socket and a refused connection.
pub fn connect_socket(path: &Path) -> Result<UnixStream, VhostUserError> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(VhostUserError::SocketMissing(path.to_path_buf()))
        }
        Err(source) => {
            return Err(VhostUserError::Inspect {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(VhostUserError::NotASocket(path.to_path_buf()));
    }
    let connect_err = |source| VhostUserError::Connect {
        path: path.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(path).map_err(connect_err)?;
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(connect_err)?;
    stream
        .set_write_timeout(Some(REPLY_TIMEOUT))
        .map_err(connect_err)?;
    Ok(stream)
}

impl Connection {
    /// Connects to the backend of `cfg` and runs the start-up handshake.
    pub fn open(cfg: &VhostUserConfig) -> Result<Self, VhostUserError> {
        let stream = connect_socket(&cfg.socket)?;
        Self::handshake(&cfg.socket, stream, cfg.queues)
    }

    /// `SET_OWNER`, `GET_FEATURES`, and where offered `GET/SET_PROTOCOL_FEATURES` and
    /// `GET_QUEUE_NUM`, on an open stream.
    pub fn handshake(path: &Path, stream: UnixStream, queues: u16) -> Result<Self, VhostUserError> {
        Self::handshake_with_timeout(path, stream, queues, REPLY_TIMEOUT)
    }

    /// As `handshake`, with each request bounded by `timeout` instead of `REPLY_TIMEOUT`.
    pub fn handshake_with_timeout(
        path: &Path,
        stream: UnixStream,
        queues: u16,
        timeout: Duration,
    ) -> Result<Self, VhostUserError> {
        let watched = stream.try_clone().map_err(|source| VhostUserError::Host {
            what: "a descriptor for the backend socket",
            source,
        })?;
        let watchdog = Watchdog::start(OwnedFd::from(watched), timeout).map_err(|source| {
            VhostUserError::Host {
                what: "the reply watchdog thread",
                source,
            }
        })?;
        let mut conn = Self {
            watchdog,
            path: path.to_path_buf(),
            frontend: Frontend::from_stream(stream, u64::from(queues)),
            negotiated: Negotiated {
                features: 0,
                protocol: VhostUserProtocolFeatures::empty(),
            },
        };
        conn.call("SET_OWNER", |f| f.set_owner())?;
        let features = conn.call("GET_FEATURES", |f| f.get_features())?;
        conn.negotiated.features = features;
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(VhostUserError::MissingFeatures {
                path: conn.path.clone(),
                offered: features,
                missing: "VIRTIO_F_VERSION_1",
            });
        }
        if conn.negotiated.has_protocol_features() {
            let offered = conn.call("GET_PROTOCOL_FEATURES", |f| f.get_protocol_features())?;
            let used = offered & WANTED_PROTOCOL_FEATURES;
            conn.call("SET_PROTOCOL_FEATURES", |f| f.set_protocol_features(used))?;
            conn.negotiated.protocol = used;
            if used.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every later request without a reply of its own gets an acknowledgement,
                // so a refusal (of the memory table, say) is seen at once.
                conn.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if used.contains(VhostUserProtocolFeatures::MQ) {
                let offered = conn.call("GET_QUEUE_NUM", |f| f.get_queue_num())?;
                if offered < u64::from(queues) {
                    return Err(VhostUserError::TooManyQueues {
                        path: conn.path.clone(),
                        offered,
                        requested: queues,
                    });
                }
            }
        }
        Ok(conn)
    }

    /// Runs one request under the watchdog; a failure names the request.
    fn call<T>(
        &mut self,
        step: &str,
        request: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, VhostUserError> {
        self.watchdog.arm();
        let result = request(&mut self.frontend);
        self.watchdog.disarm();
        result.map_err(|source| VhostUserError::Protocol {
            path: self.path.clone(),
            step: step.to_string(),
            source,
        })
    }

    /// What the handshake agreed.
    pub fn negotiated(&self) -> Negotiated {
        self.negotiated
    }

    /// A second descriptor for the connection's socket (to watch it for hang-ups).
    pub fn socket_fd(&self) -> Result<OwnedFd, VhostUserError> {
        let raw = self.frontend.as_raw_fd();
        // SAFETY: `raw` is the frontend's open socket, which lives as long as `self`; the
        // borrowed descriptor is only used to duplicate it.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) };
        borrowed
            .try_clone_to_owned()
            .map_err(|source| VhostUserError::Host {
                what: "a descriptor for the backend socket",
                source,
            })
    }

    /// Whether the backend has closed its end (or the watchdog shut the socket down): a poll
    /// that does not wait.
    pub fn is_hung_up(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.frontend.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd for the frontend's open socket; a zero timeout
        // makes poll return at once.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// `GET_CONFIG` of `len` bytes from offset 0, when the backend offers the CONFIG protocol
    /// feature; `None` otherwise.
    pub fn read_config(&mut self, len: usize) -> Result<Option<Vec<u8>>, VhostUserError> {
        if len == 0
            || !self
                .negotiated
                .protocol
                .contains(VhostUserProtocolFeatures::CONFIG)
        {
            return Ok(None);
        }
        let size = u32::try_from(len).unwrap_or(u32::MAX);
        let buf = vec![0u8; len];
        let (_, payload) = self.call("GET_CONFIG", |f| {
            f.get_config(0, size, VhostUserConfigFlags::empty(), &buf)
        })?;
        // The crate checked the reply's size against the request; keep exactly `len` bytes.
        let mut config = payload;
        config.resize(len, 0);
        Ok(Some(config))
    }

    /// `SET_CONFIG` of `data` at `offset`, when the CONFIG protocol feature is in use.
    pub fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), VhostUserError> {
        if !self
            .negotiated
            .protocol
            .contains(VhostUserProtocolFeatures::CONFIG)
        {
            return Ok(());
        }
        self.call("SET_CONFIG", |f| {
            f.set_config(offset, VhostUserConfigFlags::WRITABLE, data)
        })
    }

    /// `SET_FEATURES`: the driver's features plus `VHOST_USER_F_PROTOCOL_FEATURES` when the
    /// backend offered it (it must stay set, or the backend forgets the protocol features),
    /// and `VHOST_F_LOG_ALL` while the dirty log is on.
    pub fn set_features(&mut self, driver_features: u64, log: bool) -> Result<(), VhostUserError> {
        let protocol = self.negotiated.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let log_all = if log { VHOST_F_LOG_ALL } else { 0 };
        let features = (driver_features & self.negotiated.features) | protocol | log_all;
        self.call("SET_FEATURES", |f| f.set_features(features))
    }

    /// Why this backend cannot keep a dirty log, if it cannot: it must offer both the
    /// `LOG_SHMFD` protocol feature and `VHOST_F_LOG_ALL`.
    pub fn dirty_log_missing(&self) -> Option<&'static str> {
        let shmfd = self
            .negotiated
            .protocol
            .contains(VhostUserProtocolFeatures::LOG_SHMFD);
        let log_all = self.negotiated.features & VHOST_F_LOG_ALL != 0;
        match (shmfd, log_all) {
            (true, true) => None,
            (false, true) => Some("the LOG_SHMFD protocol feature"),
            (true, false) => Some("the VHOST_F_LOG_ALL feature"),
            (false, false) => Some("the LOG_SHMFD protocol feature and VHOST_F_LOG_ALL"),
        }
    }

    /// `SET_LOG_BASE` with `log`'s memfd: the backend logs into it from now on.
    ///
    /// Sent here rather than by the `vhost` crate, whose frontend insists on a 16-byte reply:
    /// the specification's reply is a u64, which libvhost-user backends (qemu-storage-daemon)
    /// send, while the crate's own backends echo the 16-byte request. Both are accepted.
    pub fn set_log_base(&mut self, log: &LogBuffer) -> Result<(), VhostUserError> {
        let region = log.region();
        let mut msg = Vec::with_capacity(12 + 16);
        msg.extend_from_slice(&SET_LOG_BASE.to_le_bytes());
        msg.extend_from_slice(&1u32.to_le_bytes()); // version 1, a request
        msg.extend_from_slice(&16u32.to_le_bytes());
        msg.extend_from_slice(&region.mmap_size.to_le_bytes());
        msg.extend_from_slice(&region.mmap_offset.to_le_bytes());
        let raw = self.frontend.as_raw_fd();
        // SAFETY: `raw` is the frontend's open socket, which outlives this call; the stream is
        // never dropped (`ManuallyDrop`), so the descriptor stays the frontend's.
        let stream = std::mem::ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(raw) });
        self.watchdog.arm();
        let result = exchange_log_base(&stream, &msg, region.mmap_handle);
        self.watchdog.disarm();
        result.map_err(|source| VhostUserError::Protocol {
            path: self.path.clone(),
            step: "SET_LOG_BASE".into(),
            source,
        })
    }

    /// `SET_VRING_ADDR` of one queue, with the used ring logged or not.
    pub fn set_ring_addr(&mut self, ring: &RingSetup, log: bool) -> Result<(), VhostUserError> {
        let addresses = VringConfigData {
            queue_max_size: ring.size,
            queue_size: ring.size,
            flags: if log { VHOST_VRING_F_LOG } else { 0 },
            desc_table_addr: ring.desc,
            used_ring_addr: ring.used,
            avail_ring_addr: ring.avail,
            log_addr: log.then_some(ring.used_guest),
        };
        let q = ring.index;
        self.call(&format!("SET_VRING_ADDR of queue {q}"), |f| {
            f.set_vring_addr(usize::from(q), &addresses)
        })
    }

    /// `SET_MEM_TABLE` with one entry (and one fd) per region.
    pub fn set_mem_table(&mut self, regions: &[SharedMemoryRegion]) -> Result<(), VhostUserError> {
        let table: Vec<VhostUserMemoryRegionInfo> = regions.iter().map(region_info).collect();
        self.watchdog.arm();
        let result = self.frontend.set_mem_table(&table);
        self.watchdog.disarm();
        result
            .map(|_| ())
            .map_err(|source| VhostUserError::MemTableRejected {
                path: self.path.clone(),
                regions: regions.len(),
                source,
            })
    }

    /// Brings one queue up: size, addresses (the used ring logged with `log`), base, call and
    /// kick eventfds, then enables it.
    pub fn start_ring(
        &mut self,
        ring: &RingSetup,
        call: &EventFd,
        kick: &EventFd,
        log: bool,
    ) -> Result<(), VhostUserError> {
        let index = usize::from(ring.index);
        let q = ring.index;
        self.call(&format!("SET_VRING_NUM of queue {q}"), |f| {
            f.set_vring_num(index, ring.size)
        })?;
        self.set_ring_addr(ring, log)?;
        self.call(&format!("SET_VRING_BASE of queue {q}"), |f| {
            f.set_vring_base(index, ring.base)
        })?;
        self.call(&format!("SET_VRING_CALL of queue {q}"), |f| {
            f.set_vring_call(index, call)
        })?;
        self.call(&format!("SET_VRING_KICK of queue {q}"), |f| {
            f.set_vring_kick(index, kick)
        })?;
        if self.negotiated.has_protocol_features() {
            self.call(&format!("SET_VRING_ENABLE of queue {q}"), |f| {
                f.set_vring_enable(index, true)
            })?;
        }
        Ok(())
    }

    /// Points queue `index`'s interrupts at `call` (`SET_VRING_CALL`).
    pub fn set_vring_call(&mut self, index: u16, call: &EventFd) -> Result<(), VhostUserError> {
        self.call(&format!("SET_VRING_CALL of queue {index}"), |f| {
            f.set_vring_call(usize::from(index), call)
        })
    }

    /// Returns once the backend has acted on every request sent so far. With `REPLY_ACK` each
    /// request was acknowledged already; without it `SET_VRING_ENABLE` and friends are one-way,
    /// and a backend that reads kicks on another thread (vhost-user-backend 0.10, for one) drops
    /// a kick that arrives before it has processed the enable. A request with a reply of its own
    /// (`GET_FEATURES`) is the barrier: the backend answers requests in order.
    pub fn wait_until_applied(&mut self) -> Result<(), VhostUserError> {
        if self
            .negotiated
            .protocol
            .contains(VhostUserProtocolFeatures::REPLY_ACK)
        {
            return Ok(());
        }
        self.call("GET_FEATURES (barrier)", |f| f.get_features())
            .map(|_| ())
    }

    /// Stops one queue (`SET_VRING_ENABLE 0`, then `GET_VRING_BASE`, which the backend answers
    /// once it has stopped using the ring). Returns where the backend stopped.
    pub fn stop_ring(&mut self, index: u16) -> Result<u32, VhostUserError> {
        let i = usize::from(index);
        if self.negotiated.has_protocol_features() {
            self.call(&format!("SET_VRING_ENABLE 0 of queue {index}"), |f| {
                f.set_vring_enable(i, false)
            })?;
        }
        self.call(&format!("GET_VRING_BASE of queue {index}"), |f| {
            f.get_vring_base(i)
        })
    }
}

impl Drop for Connection {
    /// Shuts the socket down, so the backend sees the end even while a duplicate of the
    /// descriptor (a hang-up watcher's) is still open.
    fn drop(&mut self) {
        // SAFETY: shutdown on the frontend's open socket; it only changes the socket's state.
        unsafe { libc::shutdown(self.frontend.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// `VHOST_USER_SET_LOG_BASE`.
const SET_LOG_BASE: u32 = 6;

/// Sends `msg` with `fd` attached and reads the backend's reply: a `SET_LOG_BASE` reply of 8
/// or 16 bytes, whose value is not used.
fn exchange_log_base(stream: &UnixStream, msg: &[u8], fd: RawFd) -> vhost::Result<()> {
    use std::io::Read;
    let protocol = vhost::Error::VhostUserProtocol;
    let socket = |e| protocol(vhost::vhost_user::Error::SocketError(e));
    let sent = stream
        .send_with_fds(&[msg], &[fd])
        .map_err(|e| socket(e.into()))?;
    if sent != msg.len() {
        return Err(protocol(vhost::vhost_user::Error::PartialMessage));
    }
    let mut reader = stream;
    let mut hdr = [0u8; 12];
    reader.read_exact(&mut hdr).map_err(socket)?;
    let word = |at: usize| u32::from_le_bytes([hdr[at], hdr[at + 1], hdr[at + 2], hdr[at + 3]]);
    let (code, flags, size) = (word(0), word(4), word(8));
    // A reply (bit 2) of version 1 to this request, with a u64 or the request's 16 bytes.
    if code != SET_LOG_BASE || flags & 0x7 != 0x5 || !(size == 8 || size == 16) {
        return Err(protocol(vhost::vhost_user::Error::InvalidMessage));
    }
    let mut body = [0u8; 16];
    reader
        .read_exact(&mut body[..size as usize])
        .map_err(socket)?;
    Ok(())
}

fn region_info(r: &SharedMemoryRegion) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: r.guest_address,
        memory_size: r.size,
        userspace_addr: r.host_address,
        mmap_offset: r.file_offset,
        mmap_handle: r.fd.as_fd().as_raw_fd(),
    }
}
