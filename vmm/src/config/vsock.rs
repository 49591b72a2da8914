//! `--vsock cid=N,socket=PATH` parsed and validated into a `VsockConfig`: the guest's CID and
//! the host Unix socket of the in-process virtio-vsock device.
//!
//! Only the strings are checked here (the CID range, the path length a Unix socket address
//! allows for `PATH_<port>`); listening on the socket happens when the VM is built
//! (`devices::virtio::vsock`).

use std::path::PathBuf;
use std::str::FromStr;

use devices::virtio::vsock::{MAX_GUEST_CID, MIN_GUEST_CID};
use thiserror::Error;

use super::key_values::{KeyValueError, KeyValueSpec};

/// Longest `socket=` path: `PATH_4294967295` must fit a Unix socket address (107 bytes).
pub const MAX_SOCKET_PATH_LEN: usize = 107 - 11;

/// A malformed `--vsock` value.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VsockConfigError {
    /// No `cid=`.
    #[error("--vsock needs cid=N (a guest CID from {MIN_GUEST_CID})")]
    MissingCid,
    /// No `socket=`.
    #[error("--vsock needs socket=PATH (the host Unix socket)")]
    MissingSocket,
    /// A CID that does not parse or is reserved.
    #[error("--vsock cid={0:?}: expected a number from {MIN_GUEST_CID} to {MAX_GUEST_CID} (0-2 are reserved)")]
    Cid(String),
    /// A path a Unix socket address cannot hold.
    #[error("--vsock socket={0:?}: expected a path of 1 to {MAX_SOCKET_PATH_LEN} bytes (PATH_<port> must fit a Unix socket address)")]
    Socket(String),
    /// An unknown or repeated key.
    #[error(transparent)]
    KeyValues(#[from] KeyValueError),
}

const VSOCK_KEYS: KeyValueSpec = KeyValueSpec {
    option: "--vsock",
    keys: &["cid", "socket"],
    bare: None,
};

/// The virtio-vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID.
    pub cid: u64,
    /// Where skiff listens for host programs (`CONNECT P`); guest connections to port P go to
    /// `PATH_P`.
    pub socket: PathBuf,
}

impl FromStr for VsockConfig {
    type Err = VsockConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut cid = None;
        let mut socket = None;
        for (key, value) in VSOCK_KEYS.split(s)? {
            match key {
                "cid" => {
                    let n = value
                        .parse::<u64>()
                        .ok()
                        .filter(|n| (MIN_GUEST_CID..=MAX_GUEST_CID).contains(n))
                        .ok_or_else(|| VsockConfigError::Cid(value.to_string()))?;
                    cid = Some(n);
                }
                // "socket", the only other key.
                _ => {
                    let path = PathBuf::from(value);
                    check_socket_path(&path)?;
                    socket = Some(path);
                }
            }
        }
        Ok(Self {
            cid: cid.ok_or(VsockConfigError::MissingCid)?,
            socket: socket.ok_or(VsockConfigError::MissingSocket)?,
        })
    }
}

/// Checks that `PATH_<port>` of a socket path fits a Unix socket address.
pub fn check_socket_path(path: &std::path::Path) -> Result<(), VsockConfigError> {
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    if bytes.is_empty() || bytes.len() > MAX_SOCKET_PATH_LEN || bytes.contains(&0) {
        return Err(VsockConfigError::Socket(
            path.to_string_lossy().into_owned(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn cid_and_socket() {
        let v: VsockConfig = "cid=3,socket=/tmp/v.sock".parse().unwrap();
        assert_eq!(v.cid, 3);
        assert_eq!(v.socket, PathBuf::from("/tmp/v.sock"));
        let v: VsockConfig = "socket=/x,cid=4294967294".parse().unwrap();
        assert_eq!(v.cid, 4_294_967_294);
    }

    #[test]
    fn bad_values() {
        for cid in ["0", "1", "2", "-1", "x", "", "4294967295", "99999999999"] {
            assert_eq!(
                format!("cid={cid},socket=/x").parse::<VsockConfig>(),
                Err(VsockConfigError::Cid(cid.to_string())),
                "{cid:?}"
            );
        }
        let long = format!("/{}", "a".repeat(MAX_SOCKET_PATH_LEN));
        assert_eq!(
            format!("cid=3,socket={long}").parse::<VsockConfig>(),
            Err(VsockConfigError::Socket(long))
        );
        assert_eq!(
            "cid=3,socket=".parse::<VsockConfig>(),
            Err(VsockConfigError::Socket(String::new()))
        );
        assert_eq!(
            "cid=3".parse::<VsockConfig>(),
            Err(VsockConfigError::MissingSocket)
        );
        assert_eq!(
            "socket=/x".parse::<VsockConfig>(),
            Err(VsockConfigError::MissingCid)
        );
        assert!(matches!(
            "cid=3,cid=4,socket=/x".parse::<VsockConfig>(),
            Err(VsockConfigError::KeyValues(KeyValueError::Repeated {
                key: "cid",
                ..
            }))
        ));
        assert!(matches!(
            "cid=3,socket=/x,port=5".parse::<VsockConfig>(),
            Err(VsockConfigError::KeyValues(
                KeyValueError::UnknownKey { .. }
            ))
        ));
        assert_eq!(
            "cid=2,socket=/x"
                .parse::<VsockConfig>()
                .unwrap_err()
                .to_string(),
            "--vsock cid=\"2\": expected a number from 3 to 4294967294 (0-2 are reserved)"
        );
    }
}
