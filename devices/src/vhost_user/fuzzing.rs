//! The entry point the `fuzz/` crate drives (and a unit test runs): skiff's frontend
//! connection code fed a byte stream as a (malicious) backend's replies.
//!
//! The bytes are put into one end of a socket pair before the first request, the end is shut
//! for writing (so the frontend reads end-of-file once they run out), and the frontend then runs
//! every request it makes of a backend: the start-up handshake, `GET_CONFIG`, the memory table,
//! features, one ring brought up and down, and `SET_CONFIG`. File descriptors a backend could
//! attach cannot come from bytes; the `vhost` crate refuses unexpected ones anyway.
//! Whatever the bytes, this must return, never panic or hang.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::config::SharedMemoryRegion;
use super::connection::{Connection, RingSetup};

/// Queues the fuzzed frontend asks for (so `GET_QUEUE_NUM`'s answer matters).
const QUEUES: u16 = 2;

/// Runs the frontend against `replies`; returns how many of its steps succeeded
/// (0 to 7: the handshake, then six requests; each runs whatever came before).
pub fn frontend_replies(replies: &[u8]) -> usize {
    let Ok((ours, mut theirs)) = UnixStream::pair() else {
        return 0;
    };
    // More than the socket buffer holds is cut (a backend could not send more unread).
    if theirs.set_nonblocking(true).is_err() {
        return 0;
    }
    let mut rest = replies;
    while !rest.is_empty() {
        match theirs.write(rest) {
            Ok(0) | Err(_) => break,
            Ok(n) => rest = &rest[n..],
        }
    }
    if theirs.shutdown(std::net::Shutdown::Write).is_err() {
        return 0;
    }
    let path = Path::new("/fuzz/vhost-user.sock");
    let Ok(mut conn) =
        Connection::handshake_with_timeout(path, ours, QUEUES, Duration::from_secs(5))
    else {
        return 0;
    };
    let Ok(fd) = File::open("/dev/null").map(OwnedFd::from) else {
        return 1;
    };
    let region = SharedMemoryRegion {
        guest_address: 0,
        size: 1 << 20,
        host_address: 0x7f00_0000_0000,
        fd,
        file_offset: 0,
    };
    let (Ok(call), Ok(kick)) = (EventFd::new(0), EventFd::new(0)) else {
        return 1;
    };
    let ring = RingSetup {
        index: 1,
        size: 16,
        desc: 0x7f00_0000_0000,
        avail: 0x7f00_0000_1000,
        used: 0x7f00_0000_2000,
        used_guest: 0x2000,
        base: 0,
    };
    let steps = [
        conn.read_config(60).map(drop),
        conn.set_mem_table(std::slice::from_ref(&region)),
        conn.set_features(u64::MAX, true),
        conn.start_ring(&ring, &call, &kick, true),
        conn.stop_ring(1).map(drop),
        conn.write_config(8, &[1, 2, 3, 4]),
    ];
    drop(theirs);
    1 + steps.iter().filter(|r| r.is_ok()).count()
}
