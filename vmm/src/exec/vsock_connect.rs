//! The host side of the hybrid-vsock handshake to the guest agent's port: connect to the VM's
//! vsock socket, write `CONNECT 1024`, read `OK <port>`. `skiff ctl exec` and `skiff exec
//! --snapshot` reach the agent this way (a cold `skiff exec` listens instead: its guest calls).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use thiserror::Error;

/// How long the vsock device may take to answer `CONNECT`.
const CONNECT_PATIENCE: Duration = Duration::from_secs(10);

/// Why the agent's port could not be reached.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// Nothing accepts connections on the vsock socket.
    #[error("cannot connect to {path}")]
    Connect {
        /// The VM's vsock socket.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The vsock socket failed mid-handshake.
    #[error("{path}: the CONNECT handshake failed")]
    Io {
        /// The VM's vsock socket.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The device answered nothing: no agent listens on the port.
    #[error(
        "no agent listens on vsock port {port} behind {path} (was the VM started with --agent?)"
    )]
    NoListener {
        /// The agent's port.
        port: u32,
        /// The VM's vsock socket.
        path: String,
    },
    /// The device answered something other than `OK <port>`.
    #[error("{path} answered CONNECT with {answer:?}")]
    Garbage {
        /// The VM's vsock socket.
        path: String,
        /// What it answered.
        answer: String,
    },
}

/// Connects to the vsock socket `vsock` and performs the handshake.
pub fn connect_agent(vsock: &Path) -> Result<UnixStream, ConnectError> {
    let stream = UnixStream::connect(vsock).map_err(|source| ConnectError::Connect {
        path: vsock.display().to_string(),
        source,
    })?;
    handshake(stream, vsock)
}

/// The device's `CONNECT 1024` handshake on `stream`, already connected to the vsock socket
/// `vsock` (`skiff exec --snapshot` connects before its session thread, whose filter allows no
/// new sockets).
pub fn handshake(mut stream: UnixStream, vsock: &Path) -> Result<UnixStream, ConnectError> {
    let path = || vsock.display().to_string();
    let port = agent_protocol::AGENT_PORT;
    stream
        .set_read_timeout(Some(CONNECT_PATIENCE))
        .and_then(|()| stream.write_all(format!("CONNECT {port}\n").as_bytes()))
        .map_err(|source| ConnectError::Io {
            path: path(),
            source,
        })?;
    // The answer is one short line; read it byte by byte so nothing after it is consumed.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 32 {
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => line.push(byte[0]),
            _ => return Err(ConnectError::NoListener { port, path: path() }),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(ConnectError::Garbage {
            path: path(),
            answer: String::from_utf8_lossy(&line).into_owned(),
        });
    }
    Ok(stream)
}
