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

use super::key_values::{KeyValueError, KeyValueSpec};

/// A malformed `--disk` value.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DiskConfigError {
    /// No path.
    #[error("--disk needs path=FILE")]
    MissingPath,
    /// `path=` with nothing after it.
    #[error("--disk path= is empty")]
    EmptyPath,
    /// An unknown or repeated key.
    #[error(transparent)]
    KeyValues(#[from] KeyValueError),
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

const DISK_KEYS: KeyValueSpec = KeyValueSpec {
    option: "--disk",
    keys: &["path", "readonly", "id", "queues", "io"],
    bare: Some("path"),
};

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
        for (key, value) in DISK_KEYS.split(s)? {
            match key {
                "path" => path = Some(parse_path(value)?),
                "readonly" => readonly = Some(parse_switch(value)?),
                "id" => id = Some(parse_id(value)?),
                "queues" => queues = Some(parse_queues(value)?),
                _ => engine = Some(parse_engine(value)?),
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
            parse("/x,ro=on").unwrap_err().to_string(),
            "unknown --disk key \"ro\": expected path, readonly, id, queues, io"
        );
        assert_eq!(
            parse("/x,/y").unwrap_err().to_string(),
            "--disk path= given twice"
        );
        assert_eq!(
            parse("/x,id=a,id=b").unwrap_err().to_string(),
            "--disk id= given twice"
        );
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
            "unknown --disk key \"colour\": expected path, readonly, id, queues, io"
        );
    }
}
