//! The `skiff ctl` side of the control API: one request over the Unix socket, the status and
//! JSON body back. Used by the CLI and by nothing else in the VMM.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

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
    /// The answer is not HTTP.
    #[error("malformed answer from {path}: {reason}")]
    Malformed {
        /// The socket path.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

/// Sends `method path` with an optional JSON body; returns the status and the body.
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
    stream.write_all(req.as_bytes()).map_err(io)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(io)?;
    parse_response(&answer).map_err(|reason| ClientError::Malformed {
        path: socket.to_path_buf(),
        reason,
    })
}

fn parse_response(bytes: &[u8]) -> Result<(u16, String), String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => {
            let status = resp.code.ok_or("no status code")?;
            let body = String::from_utf8_lossy(&bytes[n..]).trim_end().to_string();
            Ok((status, body))
        }
        Ok(httparse::Status::Partial) => Err(format!("incomplete ({} bytes)", bytes.len())),
        Err(e) => Err(e.to_string()),
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
        assert_eq!(
            parse_response(&r),
            Ok((200, r#"{"state":"paused"}"#.into()))
        );
        assert!(parse_response(b"HTTP/1.1 20").is_err());
        assert_eq!(
            error_line(409, r#"{"error":"a snapshot is already being written"}"#),
            "a snapshot is already being written (HTTP 409)"
        );
        assert_eq!(error_line(500, "boom"), "HTTP 500: boom");
    }
}
