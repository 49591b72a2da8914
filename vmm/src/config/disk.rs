//! `--disk path=FILE[,readonly=on][,id=NAME][,queues=N][,io=auto|uring|threads]` parsed and
//! validated into a `DiskConfig` (the type lives with the device, `devices::virtio::blk`, so the
//! device takes it as it is; `DiskArg` is its command-line form). A bare `--disk FILE` means
//! `path=FILE`.
//!
//! Only the string is checked here. Opening the file (missing, wrong type, size not a multiple
//! of 512, locked by another skiff) happens when the VM is built, in `VirtioBlk::new`.

use std::path::PathBuf;
use std::str::FromStr;

pub use devices::virtio::blk::disk::{ID_BYTES, MAX_QUEUES};
pub use devices::virtio::blk::{DiskConfig, IoEngineKind};
use thiserror::Error;

/// A malformed `--disk` value.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DiskConfigError {
    /// No path.
    #[error("--disk needs path=FILE")]
    MissingPath,
    /// `path=` with nothing after it.
    #[error("--disk path= is empty")]
    EmptyPath,
    /// A key `--disk` does not have.
    #[error("unknown --disk key {0:?}: expected path, readonly, id, queues or io")]
    UnknownKey(String),
    /// A key given twice.
    #[error("--disk {0}= given twice")]
    Repeated(&'static str),
    /// `readonly=` neither on nor off.
    #[error("--disk readonly={0:?}: expected on or off")]
    Switch(String),
    /// A serial longer than `GET_ID` returns.
    #[error("--disk id={0:?}: expected at most {ID_BYTES} bytes")]
    IdTooLong(String),
    /// A queue count out of range.
    #[error("--disk queues={0:?}: expected a whole number from 1 to {MAX_QUEUES}")]
    Queues(String),
    /// An unknown engine name.
    #[error("--disk io={0:?}: expected auto, uring or threads")]
    Io(String),
}

/// `--disk` as typed on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskArg(pub DiskConfig);

impl FromStr for DiskArg {
    type Err = DiskConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut path = None;
        let mut readonly = None;
        let mut id = None;
        let mut queues = None;
        let mut engine = None;
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or(("path", part));
            match key {
                "path" => set(&mut path, "path", parse_path(value)?)?,
                "readonly" => set(&mut readonly, "readonly", parse_switch(value)?)?,
                "id" => set(&mut id, "id", parse_id(value)?)?,
                "queues" => set(&mut queues, "queues", parse_queues(value)?)?,
                "io" => set(&mut engine, "io", parse_engine(value)?)?,
                _ => return Err(DiskConfigError::UnknownKey(key.to_string())),
            }
        }
        Ok(Self(DiskConfig {
            path: path.ok_or(DiskConfigError::MissingPath)?,
            readonly: readonly.unwrap_or(false),
            id,
            queues: queues.unwrap_or(1),
            engine: engine.unwrap_or_default(),
        }))
    }
}

fn set<T>(slot: &mut Option<T>, key: &'static str, value: T) -> Result<(), DiskConfigError> {
    if slot.is_some() {
        return Err(DiskConfigError::Repeated(key));
    }
    *slot = Some(value);
    Ok(())
}

fn parse_path(value: &str) -> Result<PathBuf, DiskConfigError> {
    if value.is_empty() {
        return Err(DiskConfigError::EmptyPath);
    }
    Ok(PathBuf::from(value))
}

fn parse_switch(value: &str) -> Result<bool, DiskConfigError> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(DiskConfigError::Switch(value.to_string())),
    }
}

fn parse_id(value: &str) -> Result<String, DiskConfigError> {
    if value.len() > ID_BYTES {
        return Err(DiskConfigError::IdTooLong(value.to_string()));
    }
    Ok(value.to_string())
}

fn parse_queues(value: &str) -> Result<u16, DiskConfigError> {
    match value.parse::<u16>() {
        Ok(n) if (1..=MAX_QUEUES).contains(&n) => Ok(n),
        _ => Err(DiskConfigError::Queues(value.to_string())),
    }
}

fn parse_engine(value: &str) -> Result<IoEngineKind, DiskConfigError> {
    match value {
        "auto" => Ok(IoEngineKind::Auto),
        "uring" | "io_uring" => Ok(IoEngineKind::IoUring),
        "threads" => Ok(IoEngineKind::Threads),
        _ => Err(DiskConfigError::Io(value.to_string())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(s: &str) -> Result<DiskConfig, DiskConfigError> {
        s.parse::<DiskArg>().map(|d| d.0)
    }

    #[test]
    fn defaults_and_all_keys() {
        assert_eq!(
            parse("path=/img/a.raw").unwrap(),
            DiskConfig::new("/img/a.raw")
        );
        assert_eq!(parse("/img/b.raw").unwrap(), DiskConfig::new("/img/b.raw"));
        let d = parse("path=/x,readonly=on,id=serial-1,queues=4,io=threads").unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/x".into(),
                readonly: true,
                id: Some("serial-1".into()),
                queues: 4,
                engine: IoEngineKind::Threads,
            }
        );
        assert!(!parse("/x,readonly=off").unwrap().readonly);
        assert_eq!(parse("/x,io=uring").unwrap().engine, IoEngineKind::IoUring);
        assert_eq!(parse("/x,id=").unwrap().id, Some(String::new()));
        assert_eq!(
            parse("/x,id=12345678901234567890")
                .unwrap()
                .id
                .unwrap()
                .len(),
            20
        );
        assert_eq!(parse("/x,queues=64").unwrap().queues, 64);
    }

    #[test]
    fn bad_values() {
        assert_eq!(parse("readonly=on"), Err(DiskConfigError::MissingPath));
        assert_eq!(parse(""), Err(DiskConfigError::MissingPath));
        assert_eq!(parse("path="), Err(DiskConfigError::EmptyPath));
        assert_eq!(
            parse("/x,ro=on"),
            Err(DiskConfigError::UnknownKey("ro".into()))
        );
        assert_eq!(parse("/x,/y"), Err(DiskConfigError::Repeated("path")));
        assert_eq!(parse("/x,id=a,id=b"), Err(DiskConfigError::Repeated("id")));
        assert_eq!(
            parse("/x,readonly=maybe"),
            Err(DiskConfigError::Switch("maybe".into()))
        );
        assert_eq!(
            parse("/x,id=123456789012345678901"),
            Err(DiskConfigError::IdTooLong("123456789012345678901".into()))
        );
        for q in ["0", "65", "-1", "two", ""] {
            assert_eq!(
                parse(&format!("/x,queues={q}")),
                Err(DiskConfigError::Queues(q.into())),
                "queues={q}"
            );
        }
        assert_eq!(parse("/x,io=aio"), Err(DiskConfigError::Io("aio".into())));
    }

    #[test]
    fn messages_name_the_value() {
        assert_eq!(
            parse("/x,queues=99").unwrap_err().to_string(),
            "--disk queues=\"99\": expected a whole number from 1 to 64"
        );
        assert_eq!(
            parse("/x,colour=red").unwrap_err().to_string(),
            "unknown --disk key \"colour\": expected path, readonly, id, queues or io"
        );
    }
}
