//! Raw mode for the host terminal while its input feeds the guest's serial port: no line
//! buffering, no echo, no CR/NL translation. Ctrl-C still stops skiff (ISIG stays on). The
//! original settings come back when the guard drops.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Restores the terminal's settings on drop.
#[derive(Debug)]
pub struct RawModeGuard {
    fd: i32,
    saved: libc::termios,
}

impl RawModeGuard {
    /// Puts `fd` in raw mode if it is a terminal; `Ok(None)` if it is not.
    pub fn enable(fd: BorrowedFd<'_>) -> io::Result<Option<Self>> {
        let fd = fd.as_raw_fd();
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: an all-zero termios is a valid value for tcgetattr to overwrite.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid, writable termios and `fd` is open.
        if unsafe { libc::tcgetattr(fd, &mut saved) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::IEXTEN);
        raw.c_iflag &= !(libc::ICRNL | libc::IXON | libc::INLCR | libc::IGNCR);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: `raw` is a valid termios derived from the current settings.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(Self { fd, saved }))
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        // SAFETY: restores settings read from the same descriptor, which is still open (stdin).
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}
