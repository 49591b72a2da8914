//! One virtio-rng request: a descriptor chain of device-writable buffers, filled with random
//! bytes from the host's `getrandom`, at most `MAX_REQUEST_BYTES` per request.
//!
//! The whole chain is checked before anything is written: a device-readable buffer or one that
//! is not entirely inside guest memory rejects the request, and nothing of it is written.

use std::io;

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::guest_memory::TrackedGuestMemory;

/// Most bytes one request gets (the rest of its buffers is left untouched).
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;
/// Random bytes fetched from the host per `getrandom` call.
const CHUNK: usize = 4096;

/// Why a request was refused or failed.
#[derive(Debug, Error)]
pub enum RequestError {
    /// A buffer the device may only read.
    #[error("virtio-rng buffer at {addr:#x} ({len} bytes) is device-readable; requests must be device-writable")]
    ReadOnlyBuffer {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A buffer not entirely inside guest memory.
    #[error("virtio-rng buffer at {addr:#x} ({len} bytes) lies outside guest memory")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// Writing to guest memory failed.
    #[error("cannot write {len} random bytes at guest address {addr:#x}")]
    Write {
        /// Guest address.
        addr: u64,
        /// Length.
        len: usize,
        /// The cause.
        #[source]
        source: GuestMemoryError,
    },
    /// The host's entropy source failed.
    #[error("getrandom failed")]
    Entropy(#[source] io::Error),
}

/// Fills `buf` from the host's `getrandom` (blocking only until the host's pool is ready).
fn host_random(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: writes at most `rest.len()` bytes into `rest`, which is valid, writable memory.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // 0 <= n <= rest.len().
        done += n as usize;
    }
    Ok(())
}

/// Checks every descriptor of one request and fills its buffers in order; returns the bytes
/// written (what the used ring reports).
pub fn fill_request(
    mem: &TrackedGuestMemory,
    chain: impl Iterator<Item = Descriptor>,
) -> Result<u32, RequestError> {
    // The chain iterator stops after the queue size's worth of descriptors, so this is bounded.
    let descriptors: Vec<Descriptor> = chain.collect();
    for d in &descriptors {
        let (addr, len) = (d.addr().0, d.len());
        if !d.is_write_only() {
            return Err(RequestError::ReadOnlyBuffer { addr, len });
        }
        let inside = usize::try_from(len)
            .is_ok_and(|n| GuestMemoryBackend::check_range(mem, GuestAddress(addr), n));
        if len > 0 && !inside {
            return Err(RequestError::OutsideMemory { addr, len });
        }
    }
    let mut chunk = [0u8; CHUNK];
    let mut written: u32 = 0;
    for d in &descriptors {
        let room = MAX_REQUEST_BYTES - written;
        let mut left = d.len().min(room) as usize;
        let mut addr = d.addr().0;
        while left > 0 {
            let n = left.min(CHUNK);
            host_random(&mut chunk[..n]).map_err(RequestError::Entropy)?;
            mem.write_slice(&chunk[..n], GuestAddress(addr))
                .map_err(|source| RequestError::Write {
                    addr,
                    len: n,
                    source,
                })?;
            // Inside guest memory, checked above, so no overflow.
            addr += n as u64;
            left -= n;
            written += n as u32;
        }
        if written == MAX_REQUEST_BYTES {
            break;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::virtio::test_support::guest_memory;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;

    fn d(addr: u64, len: u32, writable: bool) -> Descriptor {
        let flags = if writable {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        Descriptor::new(addr, len, flags, 0)
    }

    fn read(mem: &TrackedGuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn fills_every_writable_buffer() {
        let mem = guest_memory(1 << 20);
        let n = fill_request(
            &mem,
            [d(0x1000, 64, true), d(0x3000, 5000, true)].into_iter(),
        )
        .unwrap();
        assert_eq!(n, 5064);
        let a = read(&mem, 0x1000, 64);
        let b = read(&mem, 0x3000, 5000);
        assert!(
            a.iter().any(|&x| x != a[0]),
            "64 random bytes are not all equal"
        );
        assert!(
            b[4096..].iter().any(|&x| x != 0),
            "the second chunk was filled too"
        );
        assert_eq!(
            read(&mem, 0x1040, 16),
            vec![0; 16],
            "nothing past the buffer"
        );
    }

    #[test]
    fn large_requests_are_capped() {
        let mem = guest_memory(1 << 20);
        let n = fill_request(
            &mem,
            [d(0x1_0000, 0x8000, true), d(0x2_0000, 0x10000, true)].into_iter(),
        )
        .unwrap();
        assert_eq!(n, MAX_REQUEST_BYTES);
        assert_eq!(
            read(&mem, 0x2_8000, 0x100),
            vec![0; 0x100],
            "past the cap stays untouched"
        );
    }

    #[test]
    fn rejects_device_readable_buffers_without_writing() {
        let mem = guest_memory(1 << 20);
        let err = fill_request(
            &mem,
            [d(0x1000, 16, true), d(0x2000, 16, false)].into_iter(),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                RequestError::ReadOnlyBuffer {
                    addr: 0x2000,
                    len: 16
                }
            ),
            "{err}"
        );
        assert_eq!(read(&mem, 0x1000, 16), vec![0; 16]);
    }

    #[test]
    fn rejects_buffers_outside_guest_memory() {
        let mem = guest_memory(1 << 20);
        for (addr, len) in [
            (1u64 << 20, 1u32),
            ((1 << 20) - 8, 16),
            (u64::MAX - 4, 16),
            (0xdead_0000_0000, 4096),
        ] {
            let err = fill_request(&mem, [d(0x1000, 16, true), d(addr, len, true)].into_iter())
                .unwrap_err();
            assert!(
                matches!(err, RequestError::OutsideMemory { .. }),
                "{addr:#x}: {err}"
            );
        }
        assert_eq!(read(&mem, 0x1000, 16), vec![0; 16]);
        assert_eq!(
            fill_request(&mem, [d(u64::MAX, 0, true)].into_iter()).unwrap(),
            0,
            "empty buffers are fine"
        );
    }
}
