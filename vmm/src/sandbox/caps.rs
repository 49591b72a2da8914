//! Drops every capability: the bounding set once per process, the effective, permitted and
//! inheritable sets once per thread.
//!
//! The bounding set belongs to each thread's credentials (`PR_CAPBSET_DROP` changes the calling
//! thread's only) and a new thread copies its creator's. So [`drop_bounding_set_for_process`]
//! runs once, on the main thread in `sandbox::init`, before any thread that confines itself is
//! started: every later thread (and a forked child) starts with an empty bounding set, and a
//! thread's own step ([`drop_all`]) is one `capget` and one `capset` instead of a `prctl` per
//! capability. Dropping the bounding set needs CAP_SETPCAP in the effective set, which the
//! per-thread step removes, so the order is fixed: bounding set first.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

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

/// Set once [`drop_bounding_set_for_process`] has emptied the main thread's bounding set:
/// threads started after it inherit the empty set.
static BOUNDING_SET_DROPPED: AtomicBool = AtomicBool::new(false);

/// Whether the calling thread holds any capability (effective, permitted or inheritable).
pub(super) fn holds_any() -> io::Result<bool> {
    Ok(capget()?
        .iter()
        .any(|d| d.effective != 0 || d.permitted != 0 || d.inheritable != 0))
}

/// Empties the calling thread's bounding set for the whole process: call on the main thread
/// before any thread that confines itself is started (threads started afterwards inherit the
/// empty set, and their [`drop_all`] skips the step). Nothing to do for a thread that holds no
/// capability (it has no CAP_SETPCAP to drop with; no thread's filter allows `execve`).
pub(super) fn drop_bounding_set_for_process() -> io::Result<()> {
    if !holds_any()? {
        return Ok(());
    }
    empty_bounding_set()?;
    BOUNDING_SET_DROPPED.store(true, Ordering::Release);
    Ok(())
}

/// Empties the calling thread's bounding set (needs CAP_SETPCAP).
fn empty_bounding_set() -> io::Result<()> {
    for cap in 0..CAP_NUMBERS {
        // SAFETY: plain integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            // Capability numbers are contiguous: EINVAL means past the kernel's last one.
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Drops every capability of the calling thread (nothing to do when it holds none): the
/// bounding set too unless [`drop_bounding_set_for_process`] ran before this thread was started.
pub(super) fn drop_all() -> io::Result<()> {
    if !holds_any()? {
        return Ok(());
    }
    if !BOUNDING_SET_DROPPED.load(Ordering::Acquire) {
        empty_bounding_set()?;
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

/// Whether the calling thread's bounding set holds any capability.
#[cfg(test)]
fn bounding_set_holds_any() -> bool {
    // SAFETY: plain integer arguments; PR_CAPBSET_READ only reads.
    (0..CAP_NUMBERS).any(|cap| unsafe {
        libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) == 1
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_drops_its_capabilities_and_the_others_keep_theirs() {
        let before = holds_any().unwrap();
        let bounding_before = bounding_set_holds_any();
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
        assert_eq!(bounding_set_holds_any(), bounding_before);
    }

    /// The reason one drop per process is enough: a thread started after its creator emptied
    /// the bounding set starts with an empty one, while the creator's creator keeps its own.
    #[test]
    fn threads_started_after_the_bounding_set_drop_inherit_the_empty_set() {
        if !holds_any().unwrap() {
            // Without capabilities there is no permission to drop: the test means something
            // only as root, which is how the suite runs.
            return;
        }
        let before = bounding_set_holds_any();
        assert!(before, "a thread with capabilities has a bounding set");
        std::thread::spawn(|| {
            empty_bounding_set().unwrap();
            assert!(!bounding_set_holds_any());
            std::thread::spawn(|| {
                assert!(!bounding_set_holds_any(), "inherited at thread start");
                drop_all().unwrap();
                assert!(!holds_any().unwrap());
            })
            .join()
            .unwrap();
        })
        .join()
        .unwrap();
        assert!(bounding_set_holds_any(), "the test's thread keeps its own");
    }
}
