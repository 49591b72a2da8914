//! The host side of virtio-net: a Linux tap interface opened through `/dev/net/tun` with
//! virtio-net headers on every frame (`IFF_VNET_HDR`), non-blocking, and which receive offloads
//! it can hand the guest (probed with `TUNSETOFFLOAD`).
//!
//! Deliberately not here: addresses, routes and bridges. Configuring the host network is the
//! caller's job; skiff only brings up a tap it created itself, so that it is usable at once.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::raw::{c_int, c_uint, c_ulong};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_iow_nr;

use super::VNET_HDR_LEN;

/// Longest interface name Linux accepts (IFNAMSIZ - 1 for the NUL).
pub const MAX_TAP_NAME_LEN: usize = libc::IFNAMSIZ - 1;

const TUNTAP: c_uint = 0x54; // 'T'
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, c_int);

/// `TUNSETOFFLOAD` flags: what the reader of the tap (the guest) can take.
/// The tap may hand us frames whose checksum is still to be completed.
pub const TUN_F_CSUM: u32 = 0x01;
/// ... TCPv4 segmentation-offload (large) frames.
pub const TUN_F_TSO4: u32 = 0x02;
/// ... TCPv6 segmentation-offload frames.
pub const TUN_F_TSO6: u32 = 0x04;
/// ... TSO frames with ECN (CWR) set.
pub const TUN_F_TSO_ECN: u32 = 0x08;
/// ... UDP fragmentation-offload frames.
pub const TUN_F_UFO: u32 = 0x10;

/// Errors opening or configuring a tap.
#[derive(Debug, Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("tap name {0:?}: expected 1 to {MAX_TAP_NAME_LEN} bytes without '/', '%', whitespace or NUL")]
    BadName(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("tap {name}: cannot open /dev/net/tun")]
    OpenTun {
        /// Tap name.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `TUNSETIFF` refused for lack of privilege.
    #[error("tap {name}: not allowed to create or attach it (needs CAP_NET_ADMIN, or a tap created for this user with `ip tuntap add {name} mode tap vnet_hdr user $USER`)")]
    NotPermitted {
        /// Tap name.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `TUNSETIFF` failed otherwise (in use, a tun rather than a tap, ...).
    #[error("tap {name}: cannot attach (TUNSETIFF; busy, or an existing interface that is not a vnet_hdr tap?)")]
    Attach {
        /// Tap name.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A tap ioctl after attaching failed.
    #[error("tap {name}: {what} failed")]
    Ioctl {
        /// Tap name.
        name: String,
        /// Which call.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// An open tap interface (or, in tests, a datagram socket standing in for one).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    /// `TUN_F_*` flags `TUNSETOFFLOAD` accepted when probed; 0 for a socket stand-in.
    offloads: u32,
    /// Whether `file` is a real tap (ioctls apply).
    is_tap: bool,
}

/// Checks an interface name the way the kernel's `dev_valid_name` does (templates with `%`
/// are refused too: skiff needs to know the name it asked for).
pub fn validate_tap_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TAP_NAME_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b'%' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(TapError::BadName(name.to_string()))
    }
}

fn ifreq_for(name: &str, flags: c_int) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name array and a union of integers and pointers);
    // all-zero is a valid value for it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // Truncation cannot happen: the flags used here fit in 16 bits.
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    req
}

/// Whether an interface `name` exists in the calling thread's network namespace.
fn interface_exists(name: &str) -> bool {
    let Ok(cname) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
    unsafe { libc::if_nametoindex(cname.as_ptr()) != 0 }
}

impl Tap {
    /// Opens tap `name`, creating it if it does not exist (and then bringing it up; an
    /// existing tap is used as its owner configured it), with
    /// virtio-net v1 headers (`VNET_HDR_LEN` bytes) in front of every frame. Probes which
    /// receive offloads the tap supports and leaves them all off until [`Self::set_offloads`].
    pub fn open(name: &str) -> Result<Self, TapError> {
        validate_tap_name(name)?;
        let existed = interface_exists(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun {
                name: name.to_string(),
                source,
            })?;
        let mut req = ifreq_for(name, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
        // SAFETY: `file` is an open tun fd and `req` a valid, writable ifreq the kernel
        // reads the name and flags from (and may write the name back to).
        let rc = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) };
        if rc < 0 {
            let source = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match source.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => TapError::NotPermitted { name, source },
                _ => TapError::Attach { name, source },
            });
        }
        let mut tap = Self {
            file,
            name: name.to_string(),
            offloads: 0,
            is_tap: true,
        };
        let hdr_len = VNET_HDR_LEN as c_int;
        // SAFETY: `tap.file` is an attached tap; the kernel reads one int from `hdr_len`.
        let rc = unsafe { ioctl_with_ref(&tap.file, TUNSETVNETHDRSZ(), &hdr_len) };
        if rc < 0 {
            return Err(tap.ioctl_error("TUNSETVNETHDRSZ"));
        }
        tap.offloads = tap.probe_offloads();
        tap.set_offloads(0)?;
        if !existed {
            tap.bring_up()?;
        }
        Ok(tap)
    }

    /// A stand-in for a tap in tests: a non-blocking datagram socket, so that reads and
    /// writes keep frame boundaries as a tap's do. No offloads.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn from_socket(fd: OwnedFd) -> Self {
        Self {
            file: File::from(fd),
            name: "socket".to_string(),
            offloads: 0,
            is_tap: false,
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `TUN_F_*` receive offloads this tap accepted when probed.
    pub fn supported_offloads(&self) -> u32 {
        self.offloads
    }

    fn ioctl_error(&self, what: &'static str) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        }
    }

    fn try_offloads(&self, flags: u32) -> bool {
        // SAFETY: `self.file` is an attached tap; TUNSETOFFLOAD takes its flags by value.
        unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD(), c_ulong::from(flags)) >= 0 }
    }

    fn probe_offloads(&self) -> u32 {
        if !self.try_offloads(TUN_F_CSUM) {
            return 0;
        }
        // Segmentation offloads all need checksum offload; probe each on top of it.
        let mut accepted = TUN_F_CSUM;
        for flag in [TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO] {
            if self.try_offloads(TUN_F_CSUM | flag) {
                accepted |= flag;
            }
        }
        if accepted & (TUN_F_TSO4 | TUN_F_TSO6) != 0 && self.try_offloads(accepted | TUN_F_TSO_ECN)
        {
            accepted |= TUN_F_TSO_ECN;
        }
        accepted
    }

    /// Tells the tap which receive offloads the guest accepted (`TUN_F_*`); the kernel then
    /// completes checksums and segments frames the guest cannot take. No-op for a stand-in.
    pub fn set_offloads(&self, flags: u32) -> Result<(), TapError> {
        if !self.is_tap {
            return Ok(());
        }
        if self.try_offloads(flags) {
            Ok(())
        } else {
            Err(self.ioctl_error("TUNSETOFFLOAD"))
        }
    }

    fn bring_up(&self) -> Result<(), TapError> {
        // SAFETY: plain socket creation; the result is checked below.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(self.ioctl_error("socket for SIOCSIFFLAGS"));
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = ifreq_for(&self.name, 0);
        // SAFETY: `sock` is an open socket and `req` a valid, writable ifreq for the result.
        if unsafe { ioctl_with_mut_ref(&sock, libc::SIOCGIFFLAGS, &mut req) } < 0 {
            return Err(self.ioctl_error("SIOCGIFFLAGS"));
        }
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags } | libc::IFF_UP as libc::c_short;
        req.ifr_ifru.ifru_flags = flags;
        // SAFETY: as above; the kernel reads the name and flags.
        if unsafe { ioctl_with_ref(&sock, libc::SIOCSIFFLAGS, &req) } < 0 {
            return Err(self.ioctl_error("SIOCSIFFLAGS (bring the new tap up)"));
        }
        Ok(())
    }

    /// Reads one frame (virtio-net header first). `WouldBlock` when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (virtio-net header first).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_checked_like_the_kernel_does() {
        assert!(validate_tap_name("tap0").is_ok());
        assert!(validate_tap_name("a23456789012345").is_ok(), "15 bytes fit");
        for bad in [
            "",
            "a234567890123456",
            ".",
            "..",
            "a/b",
            "tap%d",
            "a b",
            "a:1",
        ] {
            assert!(
                matches!(validate_tap_name(bad), Err(TapError::BadName(_))),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn bad_name_is_refused_before_touching_the_host() {
        let err = Tap::open("no/slash").map(|_| ()).map_err(|e| e.to_string());
        assert_eq!(
            err,
            Err(format!(
                "tap name \"no/slash\": expected 1 to {MAX_TAP_NAME_LEN} bytes without '/', '%', whitespace or NUL"
            ))
        );
    }
}
