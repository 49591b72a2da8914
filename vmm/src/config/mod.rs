//! The VM configuration: command-line strings parsed into typed structs and validated once.
//!
//! `--memory size=SIZE[,file=PATH][,hugepages=on][,prealloc=on][,shared-with-snapshot=on]` becomes a `MemoryConfig`,
//! `--serial stdio|file=PATH|off` a `SerialConfig`, `--net tap=NAME[,mac=MAC]` a `NetConfig`
//! (module `net`), `--disk path=FILE[,...]` a `DiskConfig` (module `disk`), `--vhost-user
//! type=...,socket=PATH[,...]` a `VhostUserConfig` (module `vhost_user`), `--vsock
//! cid=N,socket=PATH` a `VsockConfig` (module `vsock`). Nothing downstream re-parses these
//! strings.
//!
//! On Windows only the neutral parsers build (sizes, `--serial`, `--cpus`, `--timeout`,
//! `key=value` lists); `windows_vm::args` builds its options from them. The memory backings,
//! the virtio options and `VmConfig` are Linux's.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use thiserror::Error;

#[cfg(target_os = "linux")]
use crate::memory::backing::BackingKind;
#[cfg(target_os = "linux")]
use crate::memory::MemoryConfig;

#[cfg(target_os = "linux")]
pub mod disk;
pub mod key_values;
#[cfg(target_os = "linux")]
pub mod net;
#[cfg(target_os = "linux")]
pub mod resource_override;
#[cfg(target_os = "linux")]
pub mod vhost_user;
#[cfg(target_os = "linux")]
pub mod vsock;

#[cfg(target_os = "linux")]
pub use disk::{DiskArg, DiskConfig};
pub use key_values::{KeyValueError, KeyValueSpec};
#[cfg(target_os = "linux")]
pub use net::NetConfig;
#[cfg(target_os = "linux")]
pub use vhost_user::{VhostUserArg, VhostUserConfig};
#[cfg(target_os = "linux")]
pub use vsock::VsockConfig;

/// Most vCPUs skiff creates: APIC IDs and ACPI processor UIDs are 8-bit in the xAPIC MADT
/// entries skiff writes.
pub const MAX_VCPUS: u32 = 254;

/// Default RAM when `--memory` is not given.
pub const DEFAULT_MEMORY: u64 = 256 << 20;

/// Default kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// A malformed or invalid option value.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size string that does not parse.
    #[error("invalid size {0:?}: expected a number with an optional K, M, G or T suffix")]
    Size(String),
    /// A `key=value` list with an unknown or repeated key.
    #[error(transparent)]
    KeyValues(#[from] KeyValueError),
    /// A guest RAM size that is not a whole number of pages.
    #[error("--memory size={0:#x} is not a multiple of the page size {SMALL_PAGE:#x}")]
    MemoryAlignment(u64),
    /// A guest RAM size the memory map cannot hold.
    #[error("--memory: {0}")]
    MemorySize(#[source] arch::layout::LayoutError),
    /// An `on`/`off` value that is neither.
    #[error("invalid value {value:?} for {key}: expected on or off")]
    Switch {
        /// The key.
        key: &'static str,
        /// The value.
        value: String,
    },
    /// `--memory` without `size=`.
    #[error("--memory needs size=SIZE")]
    MissingSize,
    /// A `--serial` value that is not a known mode.
    #[error("invalid --serial {0:?}: expected stdio, file=PATH or off")]
    Serial(String),
    /// `--cpus` out of range.
    #[error("--cpus {0} is out of range: expected 1 to {MAX_VCPUS}")]
    Cpus(u32),
    /// `--cpus` not a number.
    #[error("invalid --cpus {0:?}: expected a whole number from 1 to {MAX_VCPUS}")]
    CpusNotNumber(String),
    /// Two options that cannot be combined.
    #[error("{0}")]
    Conflict(&'static str),
    /// An empty path.
    #[error("empty path for {0}")]
    EmptyPath(&'static str),
    /// `--timeout` not a positive number of seconds.
    #[error("invalid --timeout {0:?}: expected a positive number of seconds")]
    Timeout(String),
}

/// Parses `4096`, `512K`, `256M`, `5G`, `1T` (binary multiples; `B`/`iB` suffixes accepted).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::Size(s.to_string());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| err())?;
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

#[cfg(target_os = "linux")]
fn parse_switch(key: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(ConfigError::Switch {
            key,
            value: value.to_string(),
        }),
    }
}

/// The smallest page any backing has; larger ones (huge pages) are checked when the backing
/// is opened.
pub(crate) const SMALL_PAGE: u64 = 4096;

#[cfg(target_os = "linux")]
const MEMORY_KEYS: KeyValueSpec = KeyValueSpec {
    option: "--memory",
    keys: &[
        "size",
        "file",
        "hugepages",
        "prealloc",
        "shared-with-snapshot",
    ],
    bare: Some("size"),
};

/// `--memory` as typed on the command line.
#[cfg(target_os = "linux")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryArg(pub MemoryConfig);

#[cfg(target_os = "linux")]
impl FromStr for MemoryArg {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut size = None;
        let mut file = None;
        let mut hugepages = false;
        let mut prealloc = false;
        let mut shared_with_snapshot = false;
        for (key, value) in MEMORY_KEYS.split(s)? {
            match key {
                "size" => size = Some(parse_size(value)?),
                "file" if value.is_empty() => return Err(ConfigError::EmptyPath("--memory file=")),
                "file" => file = Some(PathBuf::from(value)),
                "hugepages" => hugepages = parse_switch("hugepages", value)?,
                "prealloc" => prealloc = parse_switch("prealloc", value)?,
                _ => {
                    shared_with_snapshot = parse_switch("shared-with-snapshot", value)?;
                }
            }
        }
        let size = size.ok_or(ConfigError::MissingSize)?;
        // The same check building the VM makes, here so a size the memory map cannot hold is
        // a bad command line.
        arch::layout::ram_ranges(size).map_err(ConfigError::MemorySize)?;
        if size % SMALL_PAGE != 0 {
            return Err(ConfigError::MemoryAlignment(size));
        }
        let backing = match (file, hugepages) {
            (Some(_), true) => {
                return Err(ConfigError::Conflict(
                    "--memory: hugepages=on applies to the built-in memfd; for huge pages with file= put the file on a hugetlbfs mount",
                ))
            }
            (Some(path), false) => BackingKind::File(path),
            (None, true) => BackingKind::HugetlbMemfd,
            (None, false) => BackingKind::Memfd,
        };
        if shared_with_snapshot && !matches!(backing, BackingKind::File(_)) {
            return Err(ConfigError::Conflict(
                "--memory: shared-with-snapshot=on applies to a file= backing only",
            ));
        }
        Ok(Self(MemoryConfig {
            size,
            backing,
            prealloc,
            shared_with_snapshot,
        }))
    }
}

/// Where the 16550 serial port's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialConfig {
    /// skiff's stdout; stdin feeds the guest when it is a terminal.
    Stdio,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded (the UART still exists).
    Off,
}

impl FromStr for SerialConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "off" | "none" => Ok(Self::Off),
            _ => match s.strip_prefix("file=") {
                Some("") => Err(ConfigError::EmptyPath("--serial file=")),
                Some(path) => Ok(Self::File(PathBuf::from(path))),
                None => Err(ConfigError::Serial(s.to_string())),
            },
        }
    }
}

/// Parses `--timeout SECONDS` (fractions allowed).
pub fn parse_timeout(s: &str) -> Result<Duration, ConfigError> {
    let secs: f64 = s.parse().map_err(|_| ConfigError::Timeout(s.to_string()))?;
    if !(secs > 0.0 && secs.is_finite() && secs < 1e9) {
        return Err(ConfigError::Timeout(s.to_string()));
    }
    // A positive value below a nanosecond rounds to no time at all.
    let timeout = Duration::from_secs_f64(secs);
    if timeout.is_zero() {
        return Err(ConfigError::Timeout(s.to_string()));
    }
    Ok(timeout)
}

/// Checks `--cpus`.
pub fn parse_cpus(s: &str) -> Result<u32, ConfigError> {
    let n: u32 = s
        .parse()
        .map_err(|_| ConfigError::CpusNotNumber(s.to_string()))?;
    if n == 0 || n > MAX_VCPUS {
        return Err(ConfigError::Cpus(n));
    }
    Ok(n)
}

/// Everything needed to build and run one VM.
#[cfg(target_os = "linux")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Kernel image (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPU count.
    pub cpus: u32,
    /// Guest RAM.
    pub memory: MemoryConfig,
    /// Serial port output.
    pub serial: SerialConfig,
    /// Ends the VM after this long.
    pub timeout: Option<Duration>,
    /// virtio-blk disks (`--disk`), in command-line order.
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices (`--net`), in command-line order.
    pub nets: Vec<NetConfig>,
    /// A virtio console (`--console`). Host stdin then feeds it instead of the serial port;
    /// the serial port still prints.
    pub console: bool,
    /// virtio-rng devices (`--rng`, repeatable).
    pub rngs: Vec<RngConfig>,
    /// Devices served by vhost-user backends (`--vhost-user`), in command-line order.
    pub vhost_user: Vec<VhostUserConfig>,
    /// The in-process virtio-vsock device (`--vsock`).
    pub vsock: Option<VsockConfig>,
}

/// One virtio-rng device (`--rng`): entropy from the host's `getrandom`. No options yet.
#[cfg(target_os = "linux")]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RngConfig;

#[cfg(target_os = "linux")]
impl RngConfig {
    /// The devices `--rng` given `count` times asks for.
    pub fn repeated(count: u8) -> Vec<Self> {
        vec![Self; usize::from(count)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("5G"), Ok(5 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(
            parse_size("99999999999T").is_err(),
            "overflow must be rejected"
        );
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn memory_option() {
        let m: MemoryArg = "size=1G,prealloc=on".parse().unwrap();
        assert_eq!(m.0.size, 1 << 30);
        assert!(m.0.prealloc);
        assert_eq!(m.0.backing, BackingKind::Memfd);
        let m: MemoryArg = "512M".parse().unwrap();
        assert_eq!(m.0.size, 512 << 20);
        let m: MemoryArg = "size=64M,file=/tmp/x,shared-with-snapshot=on"
            .parse()
            .unwrap();
        assert!(m.0.shared_with_snapshot);
        assert!("size=64M,shared-with-snapshot=on"
            .parse::<MemoryArg>()
            .is_err());
        let m: MemoryArg = "size=64M,file=/tmp/x".parse().unwrap();
        assert!(!m.0.shared_with_snapshot);
        assert_eq!(m.0.backing, BackingKind::File("/tmp/x".into()));
        let m: MemoryArg = "size=64M,hugepages=on".parse().unwrap();
        assert_eq!(m.0.backing, BackingKind::HugetlbMemfd);
        assert_eq!(
            "file=/x".parse::<MemoryArg>(),
            Err(ConfigError::MissingSize)
        );
        assert!(matches!(
            "size=1G,color=red".parse::<MemoryArg>(),
            Err(ConfigError::KeyValues(KeyValueError::UnknownKey { .. }))
        ));
        assert_eq!(
            "size=1G,size=2G"
                .parse::<MemoryArg>()
                .unwrap_err()
                .to_string(),
            "--memory size= given twice"
        );
        assert_eq!(
            "size=10000001"
                .parse::<MemoryArg>()
                .unwrap_err()
                .to_string(),
            "--memory size=0x989681 is not a multiple of the page size 0x1000"
        );
        assert_eq!(
            "size=1M".parse::<MemoryArg>().unwrap_err().to_string(),
            "--memory: guest memory size 0x100000 is below the minimum of 0x200000 bytes"
        );
        assert!(matches!(
            "size=1G,prealloc=maybe".parse::<MemoryArg>(),
            Err(ConfigError::Switch { .. })
        ));
        assert!(matches!(
            "size=1G,file=/x,hugepages=on".parse::<MemoryArg>(),
            Err(ConfigError::Conflict(_))
        ));
        assert!(matches!(
            "size=1G,file=".parse::<MemoryArg>(),
            Err(ConfigError::EmptyPath(_))
        ));
    }

    #[test]
    fn serial_option() {
        assert_eq!("stdio".parse(), Ok(SerialConfig::Stdio));
        assert_eq!("off".parse(), Ok(SerialConfig::Off));
        assert_eq!(
            "file=/tmp/s".parse(),
            Ok(SerialConfig::File("/tmp/s".into()))
        );
        assert!("file=".parse::<SerialConfig>().is_err());
        assert!("tcp:1234".parse::<SerialConfig>().is_err());
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn rng_flag_counts_devices() {
        assert_eq!(RngConfig::repeated(0), vec![]);
        assert_eq!(RngConfig::repeated(3), vec![RngConfig; 3]);
    }

    #[test]
    fn cpus_and_timeout() {
        assert_eq!(parse_cpus("2"), Ok(2));
        assert_eq!(parse_cpus("0"), Err(ConfigError::Cpus(0)));
        assert_eq!(parse_cpus("100000"), Err(ConfigError::Cpus(100000)));
        assert_eq!(
            parse_cpus("two"),
            Err(ConfigError::CpusNotNumber("two".into()))
        );
        assert_eq!(parse_timeout("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("-3").is_err());
        assert!(parse_timeout("inf").is_err());
        // Positive, but below a nanosecond: no time at all (found by the option_parsers fuzzer).
        assert!(parse_timeout("0.0000000001").is_err());
        assert_eq!(parse_timeout("0.000000001"), Ok(Duration::from_nanos(1)));
    }
}
