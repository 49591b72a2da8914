//! One virtio-blk request: parsed from a descriptor chain (`parse`), then checked against the
//! disk and turned into what the device does (`prepare`).
//!
//! Everything here is guest-controlled and untrusted. `parse` checks the chain's shape: it ends
//! (no loop, no cut), every buffer lies in guest memory, device-readable buffers come before
//! device-writable ones, a 16-byte header can be read, and the last byte is a device-writable
//! status byte. When the status byte itself is unusable the chain cannot be answered and the
//! caller must mark the device broken. `prepare` checks the request's meaning: directions for
//! its type, sector range and alignment, length bounds, read-only refusal, discard segments.
//! The layout of the bytes across descriptors is free (virtio 1.x has no framing rules).

use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

// Generic over the guest memory type so skiff's vhost-user-blk backend (memory without a
// dirty bitmap) parses requests with this same code.

use super::disk::{DiskImage, ID_BYTES, SECTOR_SIZE};
use super::engine::{IoOp, IoVecs, Unsupported};

/// Bytes in the request header (type, reserved, sector).
pub const HEADER_LEN: usize = 16;
/// Bytes in one discard / write-zeroes segment.
pub const RANGE_LEN: usize = 16;
/// Largest data transfer one request may ask for.
pub const MAX_IO_BYTES: u64 = 128 << 20;
/// Most descriptors a chain may have (the device offers `seg_max` far below this).
pub const MAX_DESCRIPTORS: usize = 1024;
/// Most segments in one discard or write-zeroes request (`max_discard_seg`).
pub const MAX_RANGES: u32 = 8;
/// Most sectors in one discard or write-zeroes segment (`max_discard_sectors`): 2 GiB.
pub const MAX_RANGE_SECTORS: u32 = 1 << 22;

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// A guest buffer: `len` bytes at `addr`, known to lie in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// The request type from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// `VIRTIO_BLK_T_IN`: read from the disk.
    In,
    /// `VIRTIO_BLK_T_OUT`: write to the disk.
    Out,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes,
    /// Anything else (answered `VIRTIO_BLK_S_UNSUPP`).
    Unsupported(u32),
}

impl RequestKind {
    fn from_type(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }
}

/// A well-formed chain, split into header fields and data buffers.
#[derive(Debug)]
pub struct Request {
    /// Head descriptor index (for the used ring).
    pub head: u16,
    /// Request type.
    pub kind: RequestKind,
    /// Start sector from the header.
    pub sector: u64,
    /// Device-readable bytes after the header.
    pub readable: Vec<Segment>,
    /// Device-writable bytes before the status byte.
    pub writable: Vec<Segment>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// What is wrong with a chain.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    /// The head index does not name a descriptor.
    #[error("no descriptor at the head index")]
    Empty,
    /// Iteration stopped on a descriptor that still has `NEXT` set.
    #[error("chain cut short (a loop, too long, or a descriptor outside its table or memory)")]
    Truncated,
    /// The last descriptor is device-readable or empty.
    #[error("the last descriptor is not a device-writable status byte")]
    NoStatus,
    /// A buffer outside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// Device-readable after device-writable.
    #[error("a device-readable buffer follows a device-writable one")]
    Order,
    /// More descriptors than the device accepts.
    #[error("more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    /// Fewer than 16 device-readable bytes.
    #[error("the header needs {HEADER_LEN} device-readable bytes, the chain has {0}")]
    ShortHeader(u64),
}

/// A chain that cannot be served, and whether its status byte can carry the failure.
#[derive(Debug)]
pub struct BadChain {
    /// Head descriptor index.
    pub head: u16,
    /// The status byte's address, when it is usable.
    pub status: Option<GuestAddress>,
    /// What is wrong.
    pub error: RequestError,
}

/// Parses the chain starting at `chain`'s head.
pub fn parse<M: GuestMemoryBackend>(
    chain: DescriptorChain<&M>,
    mem: &M,
) -> Result<Request, BadChain> {
    let head = chain.head_index();
    let fail = |status, error| BadChain {
        head,
        status,
        error,
    };
    let mut descs: Vec<(Segment, bool)> = Vec::new();
    let mut too_many = false;
    let mut last = None;
    for d in chain {
        if descs.len() < MAX_DESCRIPTORS {
            let seg = Segment {
                addr: d.addr(),
                len: d.len(),
            };
            descs.push((seg, d.is_write_only()));
        } else {
            too_many = true;
        }
        last = Some(d);
    }
    let last = last.ok_or_else(|| fail(None, RequestError::Empty))?;
    if last.has_next() {
        return Err(fail(None, RequestError::Truncated));
    }
    if !last.is_write_only() || last.len() == 0 {
        return Err(fail(None, RequestError::NoStatus));
    }
    let status = match last.addr().0.checked_add(u64::from(last.len()) - 1) {
        Some(a) if mem.check_range(GuestAddress(a), 1) => GuestAddress(a),
        _ => {
            let e = RequestError::OutsideMemory {
                addr: last.addr().0,
                len: last.len(),
            };
            return Err(fail(None, e));
        }
    };
    // From here on the status byte can report the failure.
    let fail = |error| fail(Some(status), error);
    if too_many {
        return Err(fail(RequestError::TooManyDescriptors));
    }
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    for (seg, write) in descs {
        if !mem.check_range(seg.addr, seg.len as usize) {
            return Err(fail(RequestError::OutsideMemory {
                addr: seg.addr.0,
                len: seg.len,
            }));
        }
        match write {
            true => writable.push(seg),
            false if writable.is_empty() => readable.push(seg),
            false => return Err(fail(RequestError::Order)),
        }
    }
    // The status byte is the last writable byte; whatever precedes it in that buffer is data.
    if let Some(s) = writable.last_mut() {
        s.len -= 1;
        if s.len == 0 {
            writable.pop();
        }
    }
    let mut header = [0u8; HEADER_LEN];
    let readable_len = total_len(&readable);
    if readable_len < HEADER_LEN as u64 || !gather(mem, &readable, 0, &mut header) {
        return Err(fail(RequestError::ShortHeader(readable_len)));
    }
    let readable = skip_front(&readable, HEADER_LEN as u64);
    let [t0, t1, t2, t3, _, _, _, _, s @ ..] = header;
    Ok(Request {
        head,
        kind: RequestKind::from_type(u32::from_le_bytes([t0, t1, t2, t3])),
        sector: u64::from_le_bytes(s),
        readable,
        writable,
        status,
    })
}

/// What the device does with a request.
#[derive(Debug)]
pub enum Action {
    /// Nothing to run: complete now.
    Complete {
        /// Status byte.
        status: u8,
        /// Bytes written into the chain's device-writable buffers, status included.
        used_len: u32,
    },
    /// Run `ops`; the request succeeds when all of them do.
    Io {
        /// File operations.
        ops: Vec<IoOp>,
        /// Used length on success.
        used_len: u32,
        /// Guest buffers the operations write (to mark dirty on completion).
        dirty: Vec<Segment>,
    },
}

const fn done(status: u8) -> Action {
    Action::Complete {
        status,
        used_len: 1,
    }
}

/// Checks `req` against `disk` and says what to do. `GET_ID` writes its answer here.
pub fn prepare<M: GuestMemoryBackend>(req: &Request, mem: &M, disk: &DiskImage) -> Action {
    let refuse_write = disk.readonly();
    match req.kind {
        RequestKind::In if req.readable.is_empty() => rw(req, &req.writable, true, mem, disk),
        RequestKind::Out if req.writable.is_empty() && !refuse_write => {
            rw(req, &req.readable, false, mem, disk)
        }
        RequestKind::Flush if req.readable.is_empty() && req.writable.is_empty() => {
            if refuse_write {
                // Nothing can have been written: no need to touch the file.
                done(S_OK)
            } else {
                Action::Io {
                    ops: vec![IoOp::Flush],
                    used_len: 1,
                    dirty: Vec::new(),
                }
            }
        }
        RequestKind::GetId if req.readable.is_empty() => get_id(req, mem, disk),
        RequestKind::Discard | RequestKind::WriteZeroes
            if req.writable.is_empty() && !refuse_write =>
        {
            ranges(req, mem, disk)
        }
        RequestKind::Unsupported(_) => done(S_UNSUPP),
        // Wrong directions for the type, or a write to a read-only disk.
        _ => done(S_IOERR),
    }
}

fn rw<M: GuestMemoryBackend>(
    req: &Request,
    segs: &[Segment],
    read: bool,
    mem: &M,
    disk: &DiskImage,
) -> Action {
    let len = total_len(segs);
    if !len.is_multiple_of(SECTOR_SIZE)
        || len > MAX_IO_BYTES
        || !in_range(req.sector, len / SECTOR_SIZE, disk)
    {
        return done(S_IOERR);
    }
    if len == 0 {
        return done(S_OK);
    }
    let Some(iov) = iovecs(mem, segs) else {
        return done(S_IOERR);
    };
    // In range, so `sector * 512` is at most the disk size.
    let offset = req.sector * SECTOR_SIZE;
    // `len` is at most MAX_IO_BYTES, far below u32::MAX.
    let data = len as u32;
    if read {
        Action::Io {
            ops: vec![IoOp::Read { offset, iov }],
            used_len: data + 1,
            dirty: segs.to_vec(),
        }
    } else {
        Action::Io {
            ops: vec![IoOp::Write { offset, iov }],
            used_len: 1,
            dirty: Vec::new(),
        }
    }
}

fn get_id<M: GuestMemoryBackend>(req: &Request, mem: &M, disk: &DiskImage) -> Action {
    let mut written = 0usize;
    for seg in &req.writable {
        let take = (seg.len as usize).min(ID_BYTES - written);
        if take == 0 {
            break;
        }
        // Through vm-memory, so the dirty bitmap records the write.
        if mem
            .write_slice(&disk.id()[written..written + take], seg.addr)
            .is_err()
        {
            return done(S_IOERR);
        }
        written += take;
    }
    Action::Complete {
        status: S_OK,
        // At most ID_BYTES + 1.
        used_len: written as u32 + 1,
    }
}

fn ranges<M: GuestMemoryBackend>(req: &Request, mem: &M, disk: &DiskImage) -> Action {
    let len = total_len(&req.readable);
    let count = len / RANGE_LEN as u64;
    if !len.is_multiple_of(RANGE_LEN as u64) || count == 0 || count > u64::from(MAX_RANGES) {
        return done(S_IOERR);
    }
    let discard = req.kind == RequestKind::Discard;
    let mut ops = Vec::new();
    for i in 0..count {
        let mut raw = [0u8; RANGE_LEN];
        if !gather(mem, &req.readable, i * RANGE_LEN as u64, &mut raw) {
            return done(S_IOERR);
        }
        let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = raw;
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let sectors = u32::from_le_bytes([n0, n1, n2, n3]);
        let flags = u32::from_le_bytes([f0, f1, f2, f3]);
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && unmap) {
            return done(S_UNSUPP);
        }
        if sectors > MAX_RANGE_SECTORS || !in_range(sector, u64::from(sectors), disk) {
            return done(S_IOERR);
        }
        if sectors == 0 {
            continue;
        }
        let (mode, unsupported) = match (discard, unmap) {
            // A discard is a hint: a file system without hole punching just ignores it.
            (true, _) => (PUNCH_HOLE, Unsupported::Succeed),
            (false, true) => (PUNCH_HOLE, Unsupported::TryMode(ZERO_RANGE)),
            (false, false) => (ZERO_RANGE, Unsupported::TryMode(PUNCH_HOLE)),
        };
        ops.push(IoOp::Fallocate {
            offset: sector * SECTOR_SIZE,
            len: u64::from(sectors) * SECTOR_SIZE,
            mode,
            unsupported,
        });
    }
    if ops.is_empty() {
        return done(S_OK);
    }
    Action::Io {
        ops,
        used_len: 1,
        dirty: Vec::new(),
    }
}

/// Whether `count` sectors from `sector` lie on the disk (no overflow).
fn in_range(sector: u64, count: u64, disk: &DiskImage) -> bool {
    sector
        .checked_add(count)
        .is_some_and(|end| end <= disk.sectors())
}

fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// The segments with the first `n` bytes removed.
fn skip_front(segs: &[Segment], mut n: u64) -> Vec<Segment> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        let len = u64::from(s.len);
        if n >= len {
            n -= len;
            continue;
        }
        // `n < len <= u32::MAX`, and the range was checked to lie in guest memory.
        out.push(Segment {
            addr: GuestAddress(s.addr.0 + n),
            len: s.len - n as u32,
        });
        n = 0;
    }
    out
}

/// Reads `buf.len()` bytes starting `skip` bytes into `segs`. False when they run out.
fn gather<M: GuestMemoryBackend>(mem: &M, segs: &[Segment], skip: u64, buf: &mut [u8]) -> bool {
    let mut filled = 0;
    for s in skip_front(segs, skip) {
        if filled == buf.len() {
            break;
        }
        let take = (s.len as usize).min(buf.len() - filled);
        if mem
            .read_slice(&mut buf[filled..filled + take], s.addr)
            .is_err()
        {
            return false;
        }
        filled += take;
    }
    filled == buf.len()
}

/// Host iovecs for guest segments (a segment spanning two memory regions gives two).
fn iovecs<M: GuestMemoryBackend>(mem: &M, segs: &[Segment]) -> Option<IoVecs> {
    let mut v = Vec::with_capacity(segs.len());
    for s in segs {
        for slice in mem.get_slices(s.addr, s.len as usize) {
            let slice = slice.ok()?;
            v.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Some(IoVecs::new(v))
}
