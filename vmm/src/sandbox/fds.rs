//! Closes the descriptors skiff inherited beyond stdin, stdout and stderr, at start, before
//! anything is opened. No option hands skiff a descriptor today; one that does (a `--net fd=N`,
//! say) must name it in `keep`.

use std::os::fd::RawFd;

/// Closes every descriptor from 3 up except those in `keep`.
pub fn close_inherited(keep: &[RawFd]) -> std::io::Result<()> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .filter(|&fd| fd > 2)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from = 3u32;
    for fd in keep.into_iter().chain([u32::MAX]) {
        if fd > from {
            close_range(from, fd - 1)?;
        }
        from = fd.saturating_add(1);
    }
    Ok(())
}

fn close_range(first: u32, last: u32) -> std::io::Result<()> {
    // SAFETY: closes descriptors only; nothing in this process holds them yet (called at start).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn is_open(fd: RawFd) -> bool {
        // SAFETY: F_GETFD only queries the descriptor's flags.
        unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
    }

    #[test]
    fn closes_all_but_the_kept_ones_in_a_child() {
        let a = std::fs::File::open("/dev/null").unwrap();
        let b = std::fs::File::open("/dev/null").unwrap();
        let (a, b) = (a.as_raw_fd(), b.as_raw_fd());
        // In a forked child, so the test harness's own descriptors are left alone.
        // SAFETY: the child only makes system calls and `_exit`s.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let ok = close_inherited(&[b]).is_ok() && !is_open(a) && is_open(b) && is_open(2);
            // SAFETY: leaves the child without running the parent's destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        assert!(is_open(a) && is_open(b));
    }
}
