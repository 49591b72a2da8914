//! Engine tests on a temporary file with heap buffers standing in for guest memory, run
//! against both back-ends; and an engine-only throughput benchmark (ignored by default).

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// The engines under test: io_uring as it runs on a regular file (writes inline), io_uring with
/// every write through the ring (as on a block device), and the worker pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Uring,
    UringRingWrites,
    Threads,
}

const KINDS: [Kind; 3] = [Kind::Uring, Kind::UringRingWrites, Kind::Threads];

fn temp_file(len: u64) -> (tempfile::NamedTempFile, Arc<File>) {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(len).unwrap();
    let file = Arc::new(f.reopen().unwrap());
    (f, file)
}

fn engine(kind: Kind, file: &Arc<File>) -> IoEngine {
    if kind == Kind::Threads || probe_uring().is_err() {
        // Without io_uring on the host the pool still gets tested.
        return IoEngine::start(IoEngineKind::Threads, file.clone()).unwrap();
    }
    let mut ring = UringEngine::new(file.clone()).unwrap();
    if kind == Kind::UringRingWrites {
        ring.set_inline_writes(false);
    }
    IoEngine::Uring(Box::new(ring))
}

fn iov(bufs: &mut [&mut [u8]]) -> IoVecs {
    IoVecs::new(
        bufs.iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect(),
    )
}

/// Waits until `n` completions arrived (or 10 s passed).
fn wait_for(e: &mut IoEngine, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    e.commit();
    e.reap(&mut out);
    while out.len() < n && Instant::now() < deadline {
        let mut pfd = libc::pollfd {
            fd: e.completion_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        e.reap(&mut out);
    }
    out
}

#[test]
fn iovecs_advance_across_entries() {
    let mut a = [0u8; 4];
    let mut b = [0u8; 0];
    let mut c = [0u8; 8];
    let mut v = iov(&mut [&mut a, &mut b, &mut c]);
    assert_eq!(v.remaining_len(), 12);
    v.advance(3);
    assert_eq!(v.remaining_len(), 9);
    v.advance(1);
    // The empty entry is skipped with the first one.
    assert_eq!(v.batch().1, 1);
    v.advance(5);
    assert_eq!(v.remaining_len(), 3);
    v.advance(3);
    assert!(v.is_empty());
}

#[test]
fn write_then_read_back() {
    for kind in KINDS {
        let (_f, file) = temp_file(1 << 20);
        let mut e = engine(kind, &file);
        let mut src1: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut src2 = vec![0xa5u8; 8192];
        let op = IoOp::Write {
            offset: 65536,
            iov: iov(&mut [&mut src1, &mut src2]),
        };
        e.submit(7, op);
        assert_eq!(
            wait_for(&mut e, 1),
            vec![Completion {
                tag: 7,
                result: Ok(())
            }]
        );
        let mut dst = vec![0u8; 12288];
        e.submit(
            8,
            IoOp::Read {
                offset: 65536,
                iov: iov(&mut [&mut dst]),
            },
        );
        e.submit(9, IoOp::Flush);
        let mut done = wait_for(&mut e, 2);
        done.sort_by_key(|c| c.tag);
        assert_eq!(done.len(), 2, "{}", e.name());
        assert!(done.iter().all(|c| c.result.is_ok()));
        assert_eq!(&dst[..4096], &src1[..]);
        assert_eq!(&dst[4096..], &src2[..]);
        assert_eq!(e.in_flight(), 0);
    }
}

#[test]
fn writes_to_a_regular_file_run_in_the_calling_thread() {
    if probe_uring().is_err() {
        return;
    }
    let (_f, file) = temp_file(1 << 20);
    let mut e = engine(Kind::Uring, &file);
    let mut src = vec![0x3cu8; 8192];
    e.submit(
        1,
        IoOp::Write {
            offset: 4096,
            iov: iov(&mut [&mut src]),
        },
    );
    // Done before any commit or reap, and still counted until reaped.
    let mut on_disk = vec![0u8; 8192];
    let mut reader = file.as_ref();
    reader.seek(SeekFrom::Start(4096)).unwrap();
    reader.read_exact(&mut on_disk).unwrap();
    assert_eq!(on_disk, src);
    assert_eq!(e.in_flight(), 1);
    let mut out = Vec::new();
    e.reap_inline(&mut out);
    assert_eq!(
        out,
        vec![Completion {
            tag: 1,
            result: Ok(())
        }]
    );
    assert_eq!(e.in_flight(), 0);
    // `reap` and `drain` hand back an inline write's completion too.
    let takes: [fn(&mut IoEngine, &mut Vec<Completion>); 2] = [IoEngine::reap, IoEngine::drain];
    for (tag, take) in (2..).zip(takes) {
        e.submit(
            tag,
            IoOp::Write {
                offset: 0,
                iov: iov(&mut [&mut src]),
            },
        );
        let mut out = Vec::new();
        take(&mut e, &mut out);
        assert_eq!(out.len(), 1);
    }
    assert_eq!(e.in_flight(), 0);
}

#[test]
fn read_past_end_of_file_fails() {
    for kind in KINDS {
        let (_f, file) = temp_file(4096);
        let mut e = engine(kind, &file);
        let mut dst = vec![0u8; 8192];
        e.submit(
            1,
            IoOp::Read {
                offset: 0,
                iov: iov(&mut [&mut dst]),
            },
        );
        let done = wait_for(&mut e, 1);
        assert_eq!(
            done,
            vec![Completion {
                tag: 1,
                result: Err(libc::EIO)
            }]
        );
    }
}

#[test]
fn punch_and_zero_ranges() {
    for kind in KINDS {
        let (f, file) = temp_file(0);
        (&*file).write_all(&vec![0xffu8; 1 << 20]).unwrap();
        file.sync_all().unwrap();
        let mut e = engine(kind, &file);
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        e.submit(
            1,
            IoOp::Fallocate {
                offset: 0,
                len: 256 << 10,
                mode: punch,
                unsupported: Unsupported::Fail,
            },
        );
        e.submit(
            2,
            IoOp::Fallocate {
                offset: 512 << 10,
                len: 4096,
                mode: zero,
                unsupported: Unsupported::Fail,
            },
        );
        let done = wait_for(&mut e, 2);
        assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
        let mut data = Vec::new();
        let mut r = f.reopen().unwrap();
        r.seek(SeekFrom::Start(0)).unwrap();
        r.read_to_end(&mut data).unwrap();
        assert_eq!(data.len(), 1 << 20, "KEEP_SIZE keeps the length");
        assert!(data[..256 << 10].iter().all(|&b| b == 0));
        assert!(data[256 << 10..512 << 10].iter().all(|&b| b == 0xff));
        assert!(data[512 << 10..(512 << 10) + 4096].iter().all(|&b| b == 0));
        assert!(data[(512 << 10) + 4096..].iter().all(|&b| b == 0xff));
        // The punched range no longer takes space (1 MiB written, 256 KiB freed).
        let blocks = f.as_file().metadata().unwrap().blocks() * 512;
        assert!(
            blocks <= (1 << 20) - (256 << 10),
            "{blocks} bytes allocated"
        );
    }
}

#[test]
fn unsupported_fallocate_follows_its_fallback() {
    let mut p = PendingOp::new(
        1,
        IoOp::Fallocate {
            offset: 0,
            len: 512,
            mode: 1,
            unsupported: Unsupported::TryMode(2),
        },
    );
    assert!(matches!(
        p.advance(-i64::from(libc::EOPNOTSUPP)),
        Next::Again
    ));
    assert!(matches!(p.op, IoOp::Fallocate { mode: 2, .. }));
    assert!(matches!(
        p.advance(-i64::from(libc::EOPNOTSUPP)),
        Next::Done(Err(libc::EOPNOTSUPP))
    ));
    let mut p = PendingOp::new(
        1,
        IoOp::Fallocate {
            offset: 0,
            len: 512,
            mode: 1,
            unsupported: Unsupported::Succeed,
        },
    );
    assert!(matches!(
        p.advance(-i64::from(libc::EOPNOTSUPP)),
        Next::Done(Ok(()))
    ));
    let mut p = PendingOp::new(1, IoOp::Flush);
    for _ in 1..MAX_STALLS {
        assert!(matches!(p.advance(-i64::from(libc::EINTR)), Next::Again));
    }
    assert!(matches!(
        p.advance(-i64::from(libc::EINTR)),
        Next::Done(Err(libc::EIO))
    ));
}

#[test]
fn more_operations_than_slots_all_complete() {
    for kind in KINDS {
        let (_f, file) = temp_file(1 << 20);
        let mut e = engine(kind, &file);
        let n = MAX_IN_FLIGHT + 44;
        let mut bufs = vec![vec![0u8; 512]; n];
        for (i, b) in bufs.iter_mut().enumerate() {
            e.submit(
                i as u64,
                IoOp::Read {
                    offset: (i as u64 % 2048) * 512,
                    iov: iov(&mut [b]),
                },
            );
        }
        assert_eq!(e.in_flight(), n);
        let done = wait_for(&mut e, n);
        assert_eq!(done.len(), n, "{}", e.name());
        assert!(done.iter().all(|c| c.result.is_ok()));
        assert_eq!(e.in_flight(), 0);
    }
}

#[test]
fn drain_waits_for_everything() {
    for kind in KINDS {
        let (_f, file) = temp_file(4 << 20);
        let mut e = engine(kind, &file);
        let mut bufs = vec![vec![0u8; 64 << 10]; 32];
        for (i, b) in bufs.iter_mut().enumerate() {
            e.submit(
                i as u64,
                IoOp::Write {
                    offset: i as u64 * (64 << 10),
                    iov: iov(&mut [b]),
                },
            );
        }
        e.commit();
        let mut out = Vec::new();
        e.drain(&mut out);
        assert_eq!(out.len(), 32);
        assert_eq!(e.in_flight(), 0);
    }
}

#[test]
fn wait_some_blocks_until_a_completion_and_returns_at_once_when_idle() {
    for kind in KINDS {
        let (_f, file) = temp_file(4 << 20);
        let mut e = engine(kind, &file);
        let mut out = Vec::new();
        e.wait_some(&mut out);
        assert!(out.is_empty(), "{}: nothing in flight", e.name());
        let mut bufs = vec![vec![0x5au8; 64 << 10]; MAX_IN_FLIGHT + 8];
        for (i, b) in bufs.iter_mut().enumerate() {
            e.submit(
                i as u64,
                IoOp::Write {
                    offset: i as u64 * (64 << 10) % (4 << 20),
                    iov: iov(&mut [b]),
                },
            );
        }
        // Not committed: `wait_some` submits what is queued itself.
        let deadline = Instant::now() + Duration::from_secs(10);
        while e.in_flight() > 0 && Instant::now() < deadline {
            let before = out.len();
            e.wait_some(&mut out);
            assert!(
                out.len() > before,
                "{}: returned without a completion",
                e.name()
            );
        }
        assert_eq!(out.len(), MAX_IN_FLIGHT + 8, "{}", e.name());
        assert!(out.iter().all(|c| c.result.is_ok()));
    }
}

/// Engine-only throughput: 512 KiB requests, 8 in flight, on a 256 MiB file in the page cache.
/// `cargo test -p devices --release -- --ignored engine_throughput --nocapture`
#[test]
#[ignore]
fn engine_throughput() {
    const REQ: usize = 512 << 10;
    const DEPTH: usize = 8;
    const FILE: u64 = 256 << 20;
    const ROUNDS: u64 = 4;
    let (_f, file) = temp_file(FILE);
    for kind in KINDS {
        for write in [true, false] {
            let mut e = engine(kind, &file);
            let mut bufs = vec![vec![0x5au8; REQ]; DEPTH];
            let total = FILE * ROUNDS;
            let start = Instant::now();
            let mut next = 0u64;
            let mut submitted = 0usize;
            let mut out = Vec::new();
            let mut free: Vec<usize> = (0..DEPTH).collect();
            while next < total || e.in_flight() > 0 {
                while next < total {
                    let Some(i) = free.pop() else { break };
                    let offset = next % FILE;
                    let v = iov(&mut [&mut bufs[i]]);
                    let op = if write {
                        IoOp::Write { offset, iov: v }
                    } else {
                        IoOp::Read { offset, iov: v }
                    };
                    e.submit(i as u64, op);
                    submitted += 1;
                    next += REQ as u64;
                }
                e.commit();
                out.clear();
                e.reap(&mut out);
                if out.is_empty() {
                    let mut pfd = libc::pollfd {
                        fd: e.completion_fd().as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one pollfd on the stack.
                    unsafe { libc::poll(&mut pfd, 1, 100) };
                }
                for c in &out {
                    assert!(c.result.is_ok());
                    free.push(c.tag as usize);
                }
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "engine {:>8} {:>5}: {:7.0} MiB/s ({submitted} x 512 KiB, depth {DEPTH})",
                e.name(),
                if write { "write" } else { "read" },
                total as f64 / secs / f64::from(1 << 20)
            );
        }
    }
}
