//! `skiff restore`'s resource overrides: `--disk id=ID,path=PATH`, `--net id=ID,tap=TAP`,
//! `--vhost-user id=ID,socket=PATH` and `--vsock id=ID,socket=PATH`, each naming one host resource of the snapshot (by the id
//! `skiff snapshot-info` shows) and what to use instead. The list is split by the shared
//! `key_values` splitter, and the resource's value is checked by the option's own parser
//! (`disk.rs`, `net.rs`), so paths and tap names are checked the same way as for `run`. Only the
//! resource itself may change: options the guest can see (a disk's read-only flag and queues, a
//! MAC) stay as the snapshot saved them, and their keys are refused.

use std::path::PathBuf;
use std::str::FromStr;

use thiserror::Error;

use super::disk::{DiskArg, DiskConfigError};
use super::key_values::{KeyValueError, KeyValueSpec};
use super::net::{NetConfig, NetConfigError};

/// A malformed override.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum OverrideError {
    /// Not a `key=value` list of the override's keys.
    #[error(transparent)]
    Shape(#[from] KeyValueError),
    /// No `id=`, or an empty one.
    #[error("--{0} on restore needs id=ID (the device id `skiff snapshot-info` shows)")]
    MissingId(&'static str),
    /// The disk part does not parse.
    #[error(transparent)]
    Disk(#[from] DiskConfigError),
    /// The net part does not parse.
    #[error(transparent)]
    Net(#[from] NetConfigError),
    /// No `socket=`, or an empty one.
    #[error("--vhost-user on restore needs socket=PATH")]
    MissingSocket,
    /// No `socket=`, or one a Unix socket address cannot hold.
    #[error("--vsock on restore needs socket=PATH of 1 to {max} bytes (got {0:?})", max = super::vsock::MAX_SOCKET_PATH_LEN)]
    VsockSocket(String),
}

/// Splits an override into its id and the resource's `key=value` (as the option's own parser
/// takes it; empty when not given). Only `id=` and `resource=` are accepted.
fn split_id(
    s: &str,
    option: &'static str,
    spec: &KeyValueSpec,
    resource: &'static str,
) -> Result<(String, String), OverrideError> {
    let mut id = None;
    let mut rest = String::new();
    for (key, value) in spec.split(s)? {
        if key == "id" {
            id = Some(value).filter(|v| !v.is_empty());
        } else {
            rest = format!("{resource}={value}");
        }
    }
    let id = id.ok_or(OverrideError::MissingId(option))?;
    Ok((id.to_string(), rest))
}

/// `--disk id=ID,path=PATH` on restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOverride {
    /// The snapshot's device id.
    pub id: String,
    /// The disk to use instead.
    pub path: PathBuf,
}

impl FromStr for DiskOverride {
    type Err = OverrideError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const SPEC: KeyValueSpec = KeyValueSpec {
            option: "--disk",
            keys: &["id", "path"],
            bare: Some("path"),
        };
        let (id, rest) = split_id(s, "disk", &SPEC, "path")?;
        let disk = rest.parse::<DiskArg>()?.0;
        Ok(Self {
            id,
            path: disk.path,
        })
    }
}

/// `--net id=ID,tap=TAP` on restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetOverride {
    /// The snapshot's device id.
    pub id: String,
    /// The tap to use instead.
    pub tap: String,
}

impl FromStr for NetOverride {
    type Err = OverrideError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const SPEC: KeyValueSpec = KeyValueSpec {
            option: "--net",
            keys: &["id", "tap"],
            bare: Some("tap"),
        };
        let (id, rest) = split_id(s, "net", &SPEC, "tap")?;
        let net = rest.parse::<NetConfig>()?;
        Ok(Self { id, tap: net.tap })
    }
}

/// `--vhost-user id=ID,socket=PATH` on restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserOverride {
    /// The snapshot's device id.
    pub id: String,
    /// The backend socket to use instead.
    pub socket: PathBuf,
}

impl FromStr for VhostUserOverride {
    type Err = OverrideError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const SPEC: KeyValueSpec = KeyValueSpec {
            option: "--vhost-user",
            keys: &["id", "socket"],
            bare: None,
        };
        let (id, rest) = split_id(s, "vhost-user", &SPEC, "socket")?;
        let socket = rest
            .strip_prefix("socket=")
            .filter(|p| !p.is_empty())
            .ok_or(OverrideError::MissingSocket)?;
        Ok(Self {
            id,
            socket: PathBuf::from(socket),
        })
    }
}

/// `--vsock id=ID,socket=PATH` on restore: where the restored vsock device listens (and
/// whose `PATH_P` sockets its guest connections go to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockOverride {
    /// The snapshot's device id.
    pub id: String,
    /// The socket to listen on instead.
    pub socket: PathBuf,
}

impl FromStr for VsockOverride {
    type Err = OverrideError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const SPEC: KeyValueSpec = KeyValueSpec {
            option: "--vsock",
            keys: &["id", "socket"],
            bare: None,
        };
        let (id, rest) = split_id(s, "vsock", &SPEC, "socket")?;
        let socket = rest.strip_prefix("socket=").unwrap_or_default();
        if socket.is_empty()
            || socket.len() > super::vsock::MAX_SOCKET_PATH_LEN
            || socket.contains('\0')
        {
            return Err(OverrideError::VsockSocket(socket.to_string()));
        }
        Ok(Self {
            id,
            socket: PathBuf::from(socket),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn vsock_override_names_the_listening_socket() {
        let v: VsockOverride = "id=vsock0,socket=/run/v.sock".parse().unwrap();
        assert_eq!(
            (v.id.as_str(), v.socket.as_path()),
            ("vsock0", std::path::Path::new("/run/v.sock"))
        );
        assert_eq!(
            "id=vsock0".parse::<VsockOverride>(),
            Err(OverrideError::VsockSocket(String::new()))
        );
        assert_eq!(
            "socket=/x".parse::<VsockOverride>(),
            Err(OverrideError::MissingId("vsock"))
        );
        assert!(matches!(
            "id=vsock0,socket=/x,cid=4".parse::<VsockOverride>(),
            Err(OverrideError::Shape(_))
        ));
    }

    #[test]
    fn parses_each_kind_and_refuses_guest_visible_keys() {
        assert_eq!(
            "id=disk0,path=/x.img".parse::<DiskOverride>().unwrap(),
            DiskOverride {
                id: "disk0".into(),
                path: "/x.img".into()
            }
        );
        assert_eq!(
            "path=/x.img,id=root".parse::<DiskOverride>().unwrap().id,
            "root"
        );
        assert_eq!(
            "id=net0,tap=tap9".parse::<NetOverride>().unwrap(),
            NetOverride {
                id: "net0".into(),
                tap: "tap9".into()
            }
        );
        assert_eq!(
            "id=vhost-user0,socket=/run/b.sock"
                .parse::<VhostUserOverride>()
                .unwrap()
                .socket,
            PathBuf::from("/run/b.sock")
        );
        assert_eq!(
            "path=/x".parse::<DiskOverride>(),
            Err(OverrideError::MissingId("disk"))
        );
        let e = "id=a,id=b,path=/x".parse::<DiskOverride>().unwrap_err();
        assert_eq!(e.to_string(), "--disk id= given twice");
        let e = "id=d,path=/x,readonly=on"
            .parse::<DiskOverride>()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown --disk key \"readonly\": expected id, path"
        );
        let e = "id=n,tap=t,mac=02:00:00:00:00:01"
            .parse::<NetOverride>()
            .unwrap_err();
        assert!(e.to_string().contains("unknown --net key \"mac\""), "{e}");
        assert_eq!(
            "id=,path=/x".parse::<DiskOverride>(),
            Err(OverrideError::MissingId("disk"))
        );
        assert!("id=n,tap=a/b".parse::<NetOverride>().is_err());
        assert!("id=d".parse::<DiskOverride>().is_err());
        assert_eq!(
            "id=v".parse::<VhostUserOverride>(),
            Err(OverrideError::MissingSocket)
        );
    }
}
