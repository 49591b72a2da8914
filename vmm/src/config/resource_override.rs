//! `skiff restore`'s resource overrides: `--disk id=ID,path=PATH`, `--net id=ID,tap=TAP` and
//! `--vhost-user id=ID,socket=PATH`, each naming one host resource of the snapshot (by the id
//! `skiff snapshot-info` shows) and what to use instead. The value after `id=` is parsed by
//! the option's own parser (`disk.rs`, `net.rs`), so paths and tap names are checked the same
//! way as for `run`. Only the resource itself may change: options the guest can see (a disk's
//! read-only flag and queues, a MAC) stay as the snapshot saved them.

use std::path::PathBuf;
use std::str::FromStr;

use thiserror::Error;

use super::disk::{DiskArg, DiskConfigError};
use super::net::{NetConfig, NetConfigError};

/// A malformed override.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum OverrideError {
    /// No `id=`.
    #[error("--{0} on restore needs id=ID (the device id `skiff snapshot-info` shows)")]
    MissingId(&'static str),
    /// `id=` given twice or empty.
    #[error("--{0} id= is empty or given twice")]
    BadId(&'static str),
    /// A key other than the resource itself.
    #[error("--{option} on restore takes only id= and {allowed}= (the rest is the snapshot's), not {key:?}")]
    OnlyResource {
        /// The option.
        option: &'static str,
        /// The key that names the resource.
        allowed: &'static str,
        /// The key given.
        key: String,
    },
    /// The disk part does not parse.
    #[error(transparent)]
    Disk(#[from] DiskConfigError),
    /// The net part does not parse.
    #[error(transparent)]
    Net(#[from] NetConfigError),
    /// No `socket=`, or an empty one.
    #[error("--vhost-user on restore needs socket=PATH")]
    MissingSocket,
}

/// Splits `id=` off `s`; returns the id and the other parts, checking that each names `allowed`.
fn split_id(
    s: &str,
    option: &'static str,
    allowed: &'static str,
) -> Result<(String, String), OverrideError> {
    let mut id = None;
    let mut rest = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some(("id", value)) => {
                if id.is_some() || value.is_empty() {
                    return Err(OverrideError::BadId(option));
                }
                id = Some(value.to_string());
            }
            Some((key, _)) if key != allowed => {
                return Err(OverrideError::OnlyResource {
                    option,
                    allowed,
                    key: key.to_string(),
                })
            }
            _ => rest.push(part),
        }
    }
    Ok((id.ok_or(OverrideError::MissingId(option))?, rest.join(",")))
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
        let (id, rest) = split_id(s, "disk", "path")?;
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
        let (id, rest) = split_id(s, "net", "tap")?;
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
        let (id, rest) = split_id(s, "vhost-user", "socket")?;
        let socket = rest
            .strip_prefix("socket=")
            .filter(|p| !p.is_empty() && !p.contains(','))
            .ok_or(OverrideError::MissingSocket)?;
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
        assert_eq!(
            "id=a,id=b,path=/x".parse::<DiskOverride>(),
            Err(OverrideError::BadId("disk"))
        );
        let e = "id=d,path=/x,readonly=on"
            .parse::<DiskOverride>()
            .unwrap_err();
        assert!(e.to_string().contains("takes only id= and path="), "{e}");
        let e = "id=n,tap=t,mac=02:00:00:00:00:01"
            .parse::<NetOverride>()
            .unwrap_err();
        assert!(e.to_string().contains("not \"mac\""), "{e}");
        assert!("id=n,tap=a/b".parse::<NetOverride>().is_err());
        assert!("id=d".parse::<DiskOverride>().is_err());
        assert_eq!(
            "id=v".parse::<VhostUserOverride>(),
            Err(OverrideError::MissingSocket)
        );
    }
}
