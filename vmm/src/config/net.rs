//! `--net tap=NAME[,mac=MAC]` parsed and validated into a `NetConfig`: the tap interface a
//! virtio-net device uses and the guest's MAC address. A bare `--net NAME` means `tap=NAME`.
//!
//! Only the strings are checked here; opening (or creating) the tap happens when the VM is
//! built (`devices::virtio::net::Tap`).

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use super::key_values::{KeyValueError, KeyValueSpec};

/// Longest interface name Linux accepts (`IFNAMSIZ` 16, less the NUL).
pub const MAX_TAP_NAME_LEN: usize = 15;

/// A malformed `--net` value.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NetConfigError {
    /// No tap name.
    #[error("--net needs tap=NAME")]
    MissingTap,
    /// A name Linux would refuse for an interface.
    #[error("--net tap={0:?}: expected an interface name of 1 to {MAX_TAP_NAME_LEN} bytes without '/', '%', ':' or whitespace")]
    TapName(String),
    /// A MAC that does not parse.
    #[error("--net mac={0:?}: expected six hex bytes separated by ':', like 52:54:00:12:34:56")]
    Mac(String),
    /// A multicast or all-zero MAC, which no network card may have.
    #[error(
        "--net mac={0}: not a unicast address (the first byte must be even, and not all zero)"
    )]
    NotUnicast(String),
    /// An unknown or repeated key.
    #[error(transparent)]
    KeyValues(#[from] KeyValueError),
}

/// One virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Host tap interface (created if missing).
    pub tap: String,
    /// Guest MAC address; random and locally administered when not given.
    pub mac: Option<[u8; 6]>,
}

/// A MAC address as typed: six `:`-separated hex bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = NetConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || NetConfigError::Mac(s.to_string());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or_else(err)?;
            if part.is_empty() || part.len() > 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        if mac[0] & 0x01 != 0 || mac == [0; 6] {
            return Err(NetConfigError::NotUnicast(s.to_string()));
        }
        Ok(Self(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

fn check_tap_name(name: &str) -> Result<(), NetConfigError> {
    let bad_byte = |b: u8| b == b'/' || b == b'%' || b == b':' || b == 0 || b.is_ascii_whitespace();
    if name.is_empty()
        || name.len() > MAX_TAP_NAME_LEN
        || name == "."
        || name == ".."
        || name.bytes().any(bad_byte)
    {
        return Err(NetConfigError::TapName(name.to_string()));
    }
    Ok(())
}

const NET_KEYS: KeyValueSpec = KeyValueSpec {
    option: "--net",
    keys: &["tap", "mac"],
    bare: Some("tap"),
};

impl FromStr for NetConfig {
    type Err = NetConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tap = None;
        let mut mac = None;
        for (key, value) in NET_KEYS.split(s)? {
            match key {
                "tap" => {
                    check_tap_name(value)?;
                    tap = Some(value.to_string());
                }
                _ => mac = Some(value.parse::<MacAddr>()?.0),
            }
        }
        Ok(Self {
            tap: tap.ok_or(NetConfigError::MissingTap)?,
            mac,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn tap_and_mac() {
        let n: NetConfig = "tap=tap0,mac=52:54:00:ab:CD:0f".parse().unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, Some([0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]));
        let n: NetConfig = "skiff-net1".parse().unwrap();
        assert_eq!(
            n,
            NetConfig {
                tap: "skiff-net1".into(),
                mac: None
            }
        );
        assert_eq!(
            MacAddr(n.mac.unwrap_or([2, 0, 0, 0, 0, 1])).to_string(),
            "02:00:00:00:00:01"
        );
    }

    #[test]
    fn bad_macs() {
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5g",
            "525400123456",
            "52:54:00:12:34:",
            "52:54:00:12:34:100",
            "52-54-00-12-34-56",
        ] {
            let got = format!("tap=t,mac={bad}").parse::<NetConfig>();
            assert_eq!(got, Err(NetConfigError::Mac(bad.to_string())), "{bad:?}");
        }
        for multicast in [
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
        ] {
            assert_eq!(
                format!("tap=t,mac={multicast}").parse::<NetConfig>(),
                Err(NetConfigError::NotUnicast(multicast.to_string()))
            );
        }
    }

    #[test]
    fn bad_tap_names() {
        assert_eq!(
            "mac=02:00:00:00:00:01".parse::<NetConfig>(),
            Err(NetConfigError::MissingTap)
        );
        assert_eq!("".parse::<NetConfig>(), Err(NetConfigError::MissingTap));
        assert_eq!(
            "tap=".parse::<NetConfig>(),
            Err(NetConfigError::TapName(String::new()))
        );
        let sixteen = "a234567890123456";
        assert_eq!(
            format!("tap={sixteen}").parse::<NetConfig>(),
            Err(NetConfigError::TapName(sixteen.into()))
        );
        assert!(
            format!("tap={}", &sixteen[..15])
                .parse::<NetConfig>()
                .is_ok(),
            "15 bytes fit"
        );
        for bad in ["a/b", "tap%d", "a b", "..", "eth0:1"] {
            assert_eq!(
                format!("tap={bad}").parse::<NetConfig>(),
                Err(NetConfigError::TapName(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn unknown_and_repeated_keys() {
        assert_eq!(
            "tap=a,queues=2"
                .parse::<NetConfig>()
                .unwrap_err()
                .to_string(),
            "unknown --net key \"queues\": expected tap, mac"
        );
        assert_eq!(
            "tap=a,tap=b".parse::<NetConfig>().unwrap_err().to_string(),
            "--net tap= given twice"
        );
        assert_eq!(
            "a,mac=02:00:00:00:00:01,mac=02:00:00:00:00:02"
                .parse::<NetConfig>()
                .unwrap_err()
                .to_string(),
            "--net mac= given twice"
        );
        assert_eq!(
            "tap=a,mac=01:00:5e:00:00:01".parse::<NetConfig>().unwrap_err().to_string(),
            "--net mac=01:00:5e:00:00:01: not a unicast address (the first byte must be even, and not all zero)"
        );
    }
}
