//! `--vhost-user type=blk|fs|net|vsock|rng|generic,socket=PATH[,queues=N][,tag=TAG]
//! [,reconnect=SECONDS][,virtio-id=N]` parsed and validated into a `VhostUserConfig` (the type
//! lives with the device, `devices::vhost_user`). `type=generic` needs `virtio-id=` (the virtio
//! device type number); `tag=` is for `type=fs` only, which needs at least two queues (the
//! high-priority queue and a request queue).
//!
//! Only the string is checked here. Whether the socket exists, is a socket and answers is
//! checked when the VM is built, in `VhostUserDevice::new`.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub use devices::vhost_user::config::{FS_TAG_BYTES, MAX_QUEUES};
pub use devices::vhost_user::{VhostUserConfig, VhostUserKind};
use thiserror::Error;

use super::key_values::{KeyValueError, KeyValueSpec};

/// A malformed `--vhost-user` value.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VhostUserConfigError {
    /// No `type=`.
    #[error("--vhost-user needs type=blk|fs|net|vsock|rng|generic")]
    MissingType,
    /// No `socket=`.
    #[error("--vhost-user needs socket=PATH")]
    MissingSocket,
    /// `socket=` with nothing after it.
    #[error("--vhost-user socket= is empty")]
    EmptySocket,
    /// An unknown device type.
    #[error("--vhost-user type={0:?}: expected blk, fs, net, vsock, rng or generic")]
    Type(String),
    /// An unknown or repeated key, or a piece that is not `key=value`.
    #[error(transparent)]
    KeyValues(#[from] KeyValueError),
    /// A queue count out of range.
    #[error("--vhost-user queues={0:?}: expected a whole number from 1 to {MAX_QUEUES}")]
    Queues(String),
    /// A tag that is empty or too long.
    #[error("--vhost-user tag={0:?}: expected 1 to {FS_TAG_BYTES} bytes")]
    Tag(String),
    /// virtio-fs with fewer than two queues.
    #[error("--vhost-user type=fs queues={0}: expected at least 2 (the high-priority queue and a request queue)")]
    FsQueues(u16),
    /// `tag=` on a device that is not virtio-fs.
    #[error("--vhost-user tag= applies to type=fs only")]
    TagNotFs,
    /// A reconnect interval that is not a positive number of seconds.
    #[error("--vhost-user reconnect={0:?}: expected a positive number of seconds")]
    Reconnect(String),
    /// `type=generic` without a usable `virtio-id=`, or `virtio-id=` on another type.
    #[error(
        "--vhost-user: type=generic needs virtio-id=N (1 to 63), and only it takes virtio-id="
    )]
    VirtioId,
}

const VHOST_USER_KEYS: KeyValueSpec = KeyValueSpec {
    option: "--vhost-user",
    keys: &["type", "socket", "queues", "tag", "reconnect", "virtio-id"],
    bare: None,
};

/// `--vhost-user` as typed on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserArg(pub VhostUserConfig);

impl FromStr for VhostUserArg {
    type Err = VhostUserConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut kind = None;
        let mut socket = None;
        let mut queues = None;
        let mut tag = None;
        let mut reconnect = None;
        let mut virtio_id = None;
        for (key, value) in VHOST_USER_KEYS.split(s)? {
            match key {
                "type" => kind = Some(value.to_string()),
                "socket" if value.is_empty() => return Err(VhostUserConfigError::EmptySocket),
                "socket" => socket = Some(PathBuf::from(value)),
                "queues" => queues = Some(parse_queues(value)?),
                "tag" => tag = Some(parse_tag(value)?),
                "reconnect" => reconnect = Some(parse_reconnect(value)?),
                _ => {
                    virtio_id = Some(
                        value
                            .parse::<u32>()
                            .ok()
                            .filter(|n| (1..64).contains(n))
                            .ok_or(VhostUserConfigError::VirtioId)?,
                    )
                }
            }
        }
        let kind = match (
            kind.ok_or(VhostUserConfigError::MissingType)?.as_str(),
            virtio_id,
        ) {
            ("blk", None) => VhostUserKind::Blk,
            ("fs", None) => VhostUserKind::Fs,
            ("net", None) => VhostUserKind::Net,
            ("vsock", None) => VhostUserKind::Vsock,
            ("rng", None) => VhostUserKind::Rng,
            ("generic", Some(id)) => VhostUserKind::Generic(id),
            ("blk" | "fs" | "net" | "vsock" | "rng" | "generic", _) => {
                return Err(VhostUserConfigError::VirtioId)
            }
            (other, _) => return Err(VhostUserConfigError::Type(other.to_string())),
        };
        if tag.is_some() && kind != VhostUserKind::Fs {
            return Err(VhostUserConfigError::TagNotFs);
        }
        let mut cfg =
            VhostUserConfig::new(kind, socket.ok_or(VhostUserConfigError::MissingSocket)?);
        if let Some(queues) = queues {
            if kind == VhostUserKind::Fs && queues < 2 {
                return Err(VhostUserConfigError::FsQueues(queues));
            }
            cfg.queues = queues;
        }
        cfg.tag = tag;
        cfg.reconnect = reconnect;
        Ok(Self(cfg))
    }
}

fn parse_queues(value: &str) -> Result<u16, VhostUserConfigError> {
    match value.parse::<u16>() {
        Ok(n) if (1..=MAX_QUEUES).contains(&n) => Ok(n),
        _ => Err(VhostUserConfigError::Queues(value.to_string())),
    }
}

fn parse_tag(value: &str) -> Result<String, VhostUserConfigError> {
    if value.is_empty() || value.len() > FS_TAG_BYTES {
        return Err(VhostUserConfigError::Tag(value.to_string()));
    }
    Ok(value.to_string())
}

fn parse_reconnect(value: &str) -> Result<Duration, VhostUserConfigError> {
    let err = || VhostUserConfigError::Reconnect(value.to_string());
    let secs: f64 = value.parse().map_err(|_| err())?;
    if !(secs > 0.0 && secs.is_finite() && secs < 1e6) {
        return Err(err());
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(s: &str) -> Result<VhostUserConfig, VhostUserConfigError> {
        s.parse::<VhostUserArg>().map(|a| a.0)
    }

    #[test]
    fn full_and_default_forms() {
        let c = parse("type=blk,socket=/run/b.sock").unwrap();
        assert_eq!(c.kind, VhostUserKind::Blk);
        assert_eq!(c.socket, PathBuf::from("/run/b.sock"));
        assert_eq!(c.queues, 1);
        assert_eq!(c.tag, None);
        let c = parse("type=fs,socket=/s,tag=shared,queues=3,reconnect=2.5").unwrap();
        assert_eq!(c.kind, VhostUserKind::Fs);
        assert_eq!(c.queues, 3);
        assert_eq!(c.tag.as_deref(), Some("shared"));
        assert_eq!(c.reconnect, Some(Duration::from_millis(2500)));
        assert_eq!(parse("type=vsock,socket=/s").unwrap().queues, 3);
        assert_eq!(parse("type=net,socket=/s").unwrap().queues, 2);
        assert_eq!(
            parse("type=generic,virtio-id=42,socket=/s").unwrap().kind,
            VhostUserKind::Generic(42)
        );
    }

    #[test]
    fn bad_values_are_refused_with_their_reason() {
        use VhostUserConfigError as E;
        assert_eq!(parse("socket=/s"), Err(E::MissingType));
        assert_eq!(parse("type=blk"), Err(E::MissingSocket));
        assert_eq!(parse("type=blk,socket="), Err(E::EmptySocket));
        assert_eq!(parse("type=gpu,socket=/s"), Err(E::Type("gpu".into())));
        assert!(matches!(
            parse("type=blk,socket=/s,color=red"),
            Err(E::KeyValues(KeyValueError::UnknownKey { .. }))
        ));
        assert_eq!(
            parse("type=blk,type=fs,socket=/s").unwrap_err().to_string(),
            "--vhost-user type= given twice"
        );
        assert_eq!(
            parse("type=blk,socket=/s,virtio-id=3,virtio_id=4")
                .unwrap_err()
                .to_string(),
            "--vhost-user virtio-id= given twice"
        );
        assert_eq!(
            parse("blk,socket=/s").unwrap_err().to_string(),
            "--vhost-user: \"blk\" is not key=value"
        );
        assert_eq!(
            parse("type=blk,socket=/s,queues=0"),
            Err(E::Queues("0".into()))
        );
        assert_eq!(
            parse("type=blk,socket=/s,queues=65"),
            Err(E::Queues("65".into()))
        );
        assert_eq!(parse("type=blk,socket=/s,tag=x"), Err(E::TagNotFs));
        assert_eq!(parse("type=fs,socket=/s,tag="), Err(E::Tag(String::new())));
        assert_eq!(parse("type=fs,socket=/s,queues=1"), Err(E::FsQueues(1)));
        assert!(matches!(
            parse(&format!("type=fs,socket=/s,tag={}", "t".repeat(37))),
            Err(E::Tag(_))
        ));
        assert_eq!(
            parse("type=blk,socket=/s,reconnect=0"),
            Err(E::Reconnect("0".into()))
        );
        assert_eq!(
            parse("type=blk,socket=/s,reconnect=x"),
            Err(E::Reconnect("x".into()))
        );
        assert_eq!(parse("type=generic,socket=/s"), Err(E::VirtioId));
        assert_eq!(parse("type=blk,socket=/s,virtio-id=2"), Err(E::VirtioId));
        assert_eq!(
            parse("type=generic,socket=/s,virtio-id=0"),
            Err(E::VirtioId)
        );
    }
}
