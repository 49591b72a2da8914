//! Drops every capability of the calling thread: the bounding set first (that needs
//! CAP_SETPCAP, which the second step removes), then the effective, permitted and inheritable
//! sets. Capabilities are per thread, so each thread drops its own when it is confined; a thread
//! started later inherits empty sets, and one `capget` tells there is nothing to do.

use std::io;

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn capget() -> io::Result<[CapData; 2]> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and two data words, as version 3 requires; the kernel writes `data` only.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(data)
}

/// Above every capability number a kernel defines (40 in 6.x; the sets are 64 bits wide).
const CAP_NUMBERS: u32 = 64;

/// Whether the calling thread holds any capability (effective or permitted).
pub(super) fn holds_any() -> io::Result<bool> {
    Ok(capget()?
        .iter()
        .any(|d| d.effective != 0 || d.permitted != 0 || d.inheritable != 0))
}

/// Drops every capability of the calling thread (nothing to do when it holds none).
pub(super) fn drop_all() -> io::Result<()> {
    if !holds_any()? {
        return Ok(());
    }
    for cap in 0..CAP_NUMBERS {
        // SAFETY: plain integer arguments. EINVAL for a number the kernel does not know is
        // fine: that capability cannot be held.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
    }
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: header and two zeroed data words, as version 3 requires; the kernel only reads.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_drops_its_capabilities_and_the_others_keep_theirs() {
        let before = holds_any().unwrap();
        std::thread::spawn(|| {
            drop_all().unwrap();
            assert!(!holds_any().unwrap());
            // Dropping twice is a no-op.
            drop_all().unwrap();
        })
        .join()
        .unwrap();
        // Per-thread: the test's own thread is as it was.
        assert_eq!(holds_any().unwrap(), before);
    }
}
