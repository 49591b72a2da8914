//! The agent as PID 1 of skiff's initramfs: mounts the basic file systems, brings up `lo`,
//! mounts the shared root and shares named on the kernel command line, and tells `main`
//! where to find the host.
//!
//! Command-line parameters (all optional):
//! - `skiff.agent=ADDR`: where to connect (default `vsock:2:1024`, the host's port 1024), or
//!   `vsock:PORT` to listen on that port instead.
//! - `skiff.root=TAG`: mount virtiofs `TAG` read-only under a tmpfs overlay and make it `/`.
//! - `skiff.share=TAG:DIR`: mount virtiofs `TAG` writable at `DIR` (repeatable).

use std::ffi::CString;
use std::path::Path;

use crate::transport::Address;

/// What the kernel command line asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    pub agent: Address,
    pub root: Option<String>,
    pub shares: Vec<(String, String)>,
}

impl BootConfig {
    /// Reads the `skiff.*` parameters; anything malformed is reported and skipped.
    pub fn parse(cmdline: &str) -> BootConfig {
        let mut cfg = BootConfig {
            agent: Address::Vsock {
                cid: libc::VMADDR_CID_HOST,
                port: agent_protocol::AGENT_PORT,
            },
            root: None,
            shares: Vec::new(),
        };
        for word in cmdline.split_ascii_whitespace() {
            if let Some(v) = word.strip_prefix("skiff.agent=") {
                match Address::parse(v) {
                    Ok(a) => cfg.agent = a,
                    Err(e) => eprintln!("skiff-agent: skiff.agent: {e}"),
                }
            } else if let Some(v) = word.strip_prefix("skiff.root=") {
                cfg.root = Some(v.to_string());
            } else if let Some(v) = word.strip_prefix("skiff.share=") {
                match v.split_once(':') {
                    Some((tag, dir)) if !tag.is_empty() && dir.starts_with('/') => {
                        cfg.shares.push((tag.to_string(), dir.to_string()))
                    }
                    _ => eprintln!("skiff-agent: skiff.share={v}: expected TAG:/DIR"),
                }
            }
        }
        cfg
    }
}

/// Sets the system up and returns the boot configuration. Failures are reported on the console
/// and set-up goes on: an exec can still say what is missing.
pub fn setup() -> BootConfig {
    for dir in ["/proc", "/sys", "/dev", "/tmp", "/run"] {
        let _ = std::fs::create_dir_all(dir);
    }
    report(mount("proc", "/proc", "proc", 0, ""));
    report(mount("sysfs", "/sys", "sysfs", 0, ""));
    report(mount("devtmpfs", "/dev", "devtmpfs", 0, ""));
    report(mount("tmpfs", "/tmp", "tmpfs", 0, "mode=1777"));
    report(mount("tmpfs", "/run", "tmpfs", 0, "mode=755"));
    let _ = std::fs::create_dir_all("/dev/pts");
    report(mount("devpts", "/dev/pts", "devpts", 0, "ptmxmode=666"));
    report(loopback_up());
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let cfg = BootConfig::parse(&cmdline);
    if let Some(tag) = &cfg.root {
        report(shared_root(tag));
    }
    for (tag, dir) in &cfg.shares {
        let _ = std::fs::create_dir_all(dir);
        report(mount(tag, dir, "virtiofs", 0, ""));
    }
    cfg
}

fn report(r: Result<(), String>) {
    if let Err(e) = r {
        eprintln!("skiff-agent: {e}");
    }
}

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), String> {
    let c = |s: &str| CString::new(s).map_err(|_| format!("mount {target}: NUL in {s:?}"));
    let (src, tgt, fs, dat) = (c(source)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            if fstype.is_empty() {
                std::ptr::null()
            } else {
                fs.as_ptr()
            },
            flags,
            if data.is_empty() {
                std::ptr::null()
            } else {
                dat.as_ptr().cast()
            },
        )
    };
    if rc != 0 {
        return Err(format!(
            "mount {fstype} {source} on {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Mounts virtiofs `tag` read-only, lays a tmpfs overlay over it, moves /proc, /sys, /dev and
/// /run into it, and makes it the root.
fn shared_root(tag: &str) -> Result<(), String> {
    let base = "/run/skiff";
    for d in ["lower", "rw", "root"] {
        std::fs::create_dir_all(format!("{base}/{d}")).map_err(|e| format!("{base}/{d}: {e}"))?;
    }
    mount(
        tag,
        &format!("{base}/lower"),
        "virtiofs",
        libc::MS_RDONLY,
        "",
    )?;
    mount("tmpfs", &format!("{base}/rw"), "tmpfs", 0, "mode=755")?;
    for d in ["upper", "work"] {
        std::fs::create_dir_all(format!("{base}/rw/{d}"))
            .map_err(|e| format!("{base}/rw/{d}: {e}"))?;
    }
    let opts = format!("lowerdir={base}/lower,upperdir={base}/rw/upper,workdir={base}/rw/work");
    mount("overlay", &format!("{base}/root"), "overlay", 0, &opts)?;
    let root = format!("{base}/root");
    for d in ["/proc", "/sys", "/dev", "/tmp"] {
        let target = format!("{root}{d}");
        let _ = std::fs::create_dir_all(&target);
        mount(d, &target, "", libc::MS_MOVE, "")?;
    }
    // /run stays behind in the old root (it holds the overlay's layers); the new root gets a
    // fresh one.
    let _ = std::fs::create_dir_all(format!("{root}/run"));
    mount("tmpfs", &format!("{root}/run"), "tmpfs", 0, "mode=755")?;
    std::env::set_current_dir(&root).map_err(|e| format!("chdir {root}: {e}"))?;
    mount(".", "/", "", libc::MS_MOVE, "")?;
    let dot = CString::new(".").map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(format!(
            "chroot {root}: {}",
            std::io::Error::last_os_error()
        ));
    }
    std::env::set_current_dir(Path::new("/")).map_err(|e| format!("chdir /: {e}"))
}

/// Sets IFF_UP on `lo`.
fn loopback_up() -> Result<(), String> {
    let fail = |what: &str| format!("lo: {what}: {}", std::io::Error::last_os_error());
    // SAFETY: socket has no memory effects.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(fail("socket"));
    }
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `ifr` is a valid ifreq naming "lo"; the ioctls read and write only it.
    let result = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut ifr) < 0 {
            Err(fail("SIOCGIFFLAGS"))
        } else {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &ifr) < 0 {
                Err(fail("SIOCSIFFLAGS"))
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: closes the socket opened above.
    unsafe { libc::close(fd) };
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_parameters() {
        let cfg = BootConfig::parse(
            "console=ttyS0 skiff.agent=vsock:2:2000 skiff.root=root skiff.share=s0:/mnt/a skiff.share=bad",
        );
        assert_eq!(cfg.agent, Address::Vsock { cid: 2, port: 2000 });
        assert_eq!(cfg.root.as_deref(), Some("root"));
        assert_eq!(cfg.shares, vec![("s0".to_string(), "/mnt/a".to_string())]);
        let none = BootConfig::parse("quiet");
        assert_eq!(
            none.agent,
            Address::Vsock {
                cid: 2,
                port: agent_protocol::AGENT_PORT
            }
        );
        assert!(none.root.is_none());
    }
}
