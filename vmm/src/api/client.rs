//! The `skiff ctl` side of the control API: one request over the Unix socket, the status and
//! JSON body back, within a time limit. Used by the CLI and by nothing else in the VMM.
//!
//! A server that turns the connection away (503) may close it before reading the request; the
//! kernel then resets the connection, but the answer already sent is still read and shown.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use thiserror::Error;

/// Errors from talking to a running skiff.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The socket cannot be reached.
    #[error("cannot connect to --api-socket {path}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Sending or receiving failed.
    #[error("control request to {path} failed")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No answer came in time.
    #[error("no answer from --api-socket {path} within {} s", after.as_secs_f64())]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// The time limit.
        after: Duration,
    },
    /// The answer is not HTTP.
    #[error("malformed answer from {path}")]
    NotHttp {
        /// The socket path.
        path: PathBuf,
        /// What the parser refused.
        #[source]
        source: httparse::Error,
    },
    /// The answer ended before its headers did.
    #[error("malformed answer from {path}: incomplete ({len} bytes)")]
    Incomplete {
        /// The socket path.
        path: PathBuf,
        /// The bytes received.
        len: usize,
    },
    /// The answer has no status code.
    #[error("malformed answer from {path}: no status code")]
    NoStatus {
        /// The socket path.
        path: PathBuf,
    },
    /// The thread waiting for the answer panicked.
    #[error("no answer from {path}: the request thread panicked")]
    RequestPanicked {
        /// The socket path.
        path: PathBuf,
    },
}

/// Sends `method path` with an optional JSON body and returns the status and the body, or
/// `ClientError::Timeout` when the whole exchange (connecting included: a server whose backlog
/// is full keeps `connect` waiting) takes longer than `timeout`.
pub fn request_within(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), ClientError> {
    let (tx, rx) = mpsc::channel();
    let (sock, method, path, body) = (
        socket.to_path_buf(),
        method.to_string(),
        path.to_string(),
        body.map(str::to_string),
    );
    let io = |source| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    // The exchange runs on its own thread; one still blocked when the time is up is left
    // behind (`skiff ctl` exits right after).
    thread::Builder::new()
        .name("skiff-ctl-request".into())
        .spawn(move || {
            let _ = tx.send(request(&sock, &method, &path, body.as_deref()));
        })
        .map_err(io)?;
    rx.recv_timeout(timeout).unwrap_or_else(|_| {
        Err(ClientError::Timeout {
            path: socket.to_path_buf(),
            after: timeout,
        })
    })
}

/// Sends `method path` with an optional JSON body; returns the status and the body. Waits as
/// long as the server takes (see `request_within`).
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), ClientError> {
    let io = |source| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // A server that turned us away may have closed already: its answer is still there to read.
    let sent = stream.write_all(req.as_bytes());
    let mut answer = Vec::new();
    // On an error (a reset after the answer) the bytes read so far are kept in `answer`.
    let received = stream.read_to_end(&mut answer);
    if let Ok(parsed) = parse_response(&answer, socket) {
        return Ok(parsed);
    }
    sent.map_err(io)?;
    received.map_err(io)?;
    parse_response(&answer, socket)
}

/// The status and body of the answer `bytes` that came from `socket`.
fn parse_response(bytes: &[u8], socket: &Path) -> Result<(u16, String), ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => {
            let status = resp.code.ok_or_else(|| ClientError::NoStatus {
                path: socket.to_path_buf(),
            })?;
            let body = String::from_utf8_lossy(&bytes[n..]).trim_end().to_string();
            Ok((status, body))
        }
        Ok(httparse::Status::Partial) => Err(ClientError::Incomplete {
            path: socket.to_path_buf(),
            len: bytes.len(),
        }),
        Err(source) => Err(ClientError::NotHttp {
            path: socket.to_path_buf(),
            source,
        }),
    }
}

/// The one-line error a failed request's JSON body carries, or the body itself.
pub fn error_line(status: u16, body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .map_or_else(
            || format!("HTTP {status}: {body}"),
            |e| format!("{e} (HTTP {status})"),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_server_s_responses() {
        let r = crate::api::http::response(200, r#"{"state":"paused"}"#);
        let socket = Path::new("/run/skiff.sock");
        assert_eq!(
            parse_response(&r, socket).unwrap(),
            (200, r#"{"state":"paused"}"#.into())
        );
        let e = parse_response(b"HTTP/1.1 20", socket).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("malformed answer from /run/skiff.sock"),
            "{e}"
        );
        assert_eq!(
            error_line(409, r#"{"error":"a snapshot is already being written"}"#),
            "a snapshot is already being written (HTTP 409)"
        );
        assert_eq!(error_line(500, "boom"), "HTTP 500: boom");
    }
}
