//! Whole-system actions: sync, setting the clock and crediting entropy after a restore, and
//! powering off.

use std::fs::File;
use std::os::fd::AsRawFd;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

/// Flushes every file system.
pub fn sync() {
    // SAFETY: sync has no arguments and no memory effects.
    unsafe { libc::sync() };
}

/// After a restore: sets the wall clock (when `set_clock`) and adds `entropy` to the kernel's
/// pool, credited at 8 bits a byte.
pub fn resume(set_clock: bool, unix_time_ns: u64, entropy: &[u8]) -> Result<(), String> {
    if set_clock {
        let ts = libc::timespec {
            tv_sec: (unix_time_ns / 1_000_000_000) as _,
            tv_nsec: (unix_time_ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: `ts` is a valid timespec.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
            return Err(format!(
                "setting the clock to {unix_time_ns} ns: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    if !entropy.is_empty() {
        add_entropy(entropy)?;
    }
    Ok(())
}

fn add_entropy(entropy: &[u8]) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("crediting {} bytes of entropy: {e}", entropy.len());
    let random = File::options()
        .write(true)
        .open("/dev/urandom")
        .map_err(fail)?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, built as u32s
    // so the buffer is aligned for it.
    let words = entropy.len().div_ceil(4);
    let mut info = vec![0u32; 2 + words];
    let len =
        i32::try_from(entropy.len()).map_err(|_| fail(std::io::ErrorKind::InvalidInput.into()))?;
    info[0] = (len * 8) as u32;
    info[1] = len as u32;
    for (i, chunk) in entropy.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(w);
    }
    // SAFETY: `info` is a rand_pool_info whose buf holds buf_size bytes; the kernel only reads.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } != 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Syncs and powers the machine off. Only PID 1 calls this; if the call fails there is
/// nothing left to do but stop.
pub fn power_off() -> ! {
    sync();
    // SAFETY: reboot with a valid command; on success it does not return.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    eprintln!(
        "skiff-agent: power off failed: {}",
        std::io::Error::last_os_error()
    );
    loop {
        // SAFETY: pause only sleeps.
        unsafe { libc::pause() };
    }
}
