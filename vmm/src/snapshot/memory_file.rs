//! Copying guest memory between a region's backing and a file, sparsely.
//!
//! Only the data extents of the source range are copied (found with `lseek(SEEK_DATA)` and
//! `lseek(SEEK_HOLE)`), so pages the guest never touched stay holes in the destination, and time
//! and bytes follow touched memory rather than configured size. Each extent goes through
//! `copy_file_range` (in-kernel, and a reflink on filesystems that share extents), or
//! `sendfile` when the two files sit on different filesystems (a memfd to ext4), or
//! `pread`/`pwrite` as a last resort. A whole region can also be reflinked (`FICLONERANGE`) when
//! source and destination share a filesystem that supports it.
//!
//! Used both ways: snapshot (region backing → memory file) and restore in copy mode (memory file
//! → fresh memfd). Every copy checks a cancel flag between chunks, and a snapshot's copy counts
//! its bytes into the snapshot's progress. A region whose backing is a whole file of its own can
//! also be hard-linked into a snapshot (`hard_link`) when the VM ends with it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;

use super::progress::SnapshotProgress;
use crate::memory::RegionMapping;

/// Bytes copied per system call (and between checks of the cancel flag).
const CHUNK: u64 = 64 << 20;
/// Buffer for the `pread`/`pwrite` fallback.
const BUFFER: usize = 4 << 20;

/// How a region's file was produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    /// Data extents copied, holes left as holes.
    SparseCopy,
    /// The destination shares the source's extents (`FICLONERANGE`).
    Reflink,
    /// Only the pages dirtied since the parent snapshot; holes elsewhere (a diff snapshot).
    DirtyPages,
    /// The memory file is the backing file itself, hard-linked (the VM ended with the snapshot).
    HardLink,
}

impl CopyMethod {
    /// The name used in manifests and API responses.
    pub fn name(self) -> &'static str {
        match self {
            Self::SparseCopy => "sparse-copy",
            Self::Reflink => "reflink",
            Self::DirtyPages => "dirty-pages",
            Self::HardLink => "hard-link",
        }
    }
}

/// Errors from copying memory.
#[derive(Debug, Error)]
pub enum MemoryFileError {
    /// A system call failed.
    #[error("{op} at offset {offset:#x} failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Where.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The copy was cancelled (the VM is ending).
    #[error("cancelled")]
    Cancelled,
}

fn io_err(op: &'static str, offset: u64) -> impl FnOnce(io::Error) -> MemoryFileError {
    move |source| MemoryFileError::Io { op, offset, source }
}

/// Which copy primitive still works for this pair of files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Primitive {
    CopyFileRange,
    Sendfile,
    ReadWrite,
}

/// Copies `[src_offset, src_offset + len)` of `src` to `dst` at `dst_offset`, data extents only.
/// `dst` must already be at least `dst_offset + len` long (holes read as zero). Returns the
/// number of bytes copied.
pub fn copy_sparse(
    src: &File,
    src_offset: u64,
    dst: &File,
    dst_offset: u64,
    len: u64,
    cancel: &AtomicBool,
) -> Result<u64, MemoryFileError> {
    copy_sparse_counted(src, src_offset, dst, dst_offset, len, cancel, None)
}

/// `copy_sparse`, adding each chunk copied to `progress`.
pub fn copy_sparse_counted(
    src: &File,
    src_offset: u64,
    dst: &File,
    dst_offset: u64,
    len: u64,
    cancel: &AtomicBool,
    progress: Option<&SnapshotProgress>,
) -> Result<u64, MemoryFileError> {
    let end = src_offset.checked_add(len).ok_or_else(|| {
        io_err("checking the range", src_offset)(io::Error::from_raw_os_error(libc::EOVERFLOW))
    })?;
    let mut primitive = Primitive::CopyFileRange;
    let mut buffer = Vec::new();
    let mut copied = 0u64;
    let mut pos = src_offset;
    while pos < end {
        let Some(data) = seek(src, pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(src, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        let mut at = data;
        while at < hole {
            if cancel.load(Ordering::Relaxed) {
                return Err(MemoryFileError::Cancelled);
            }
            let n = (hole - at).min(CHUNK);
            let out = dst_offset + (at - src_offset);
            let done = copy_chunk(&mut primitive, &mut buffer, src, at, dst, out, n)?;
            start_writeback(dst, out, done);
            if let Some(p) = progress {
                p.advance(done);
            }
            at += done;
            copied += done;
        }
        pos = hole;
    }
    Ok(copied)
}

/// Starts writing `[offset, offset + len)` of `dst` back to its disk without waiting for it, so
/// the disk works while the next chunk is copied and the final `fsync` only waits for the tail
/// (a full snapshot then takes about as long as the disk needs, not copy time plus disk time).
/// A hint: on a file system without writeback (tmpfs, a memfd) it does nothing, and a real I/O
/// error shows again at the `fsync` that seals the file, where it is reported.
fn start_writeback(dst: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range on a descriptor we hold; it only schedules writeback.
    unsafe { libc::sync_file_range(dst.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
}

/// The bytes of data (not holes) in `[start, start + len)` of `f`, as `SEEK_DATA`/`SEEK_HOLE`
/// see them: what `copy_sparse` would copy.
pub fn data_extent_bytes(f: &File, start: u64, len: u64) -> Result<u64, MemoryFileError> {
    Ok(data_extents(f, start, len)?.iter().map(|(_, n)| n).sum())
}

/// The data extents (not holes) in `[start, start + len)` of `f`, as `(offset, length)` in
/// order, as `SEEK_DATA`/`SEEK_HOLE` see them.
pub fn data_extents(f: &File, start: u64, len: u64) -> Result<Vec<(u64, u64)>, MemoryFileError> {
    let end = start.saturating_add(len);
    let (mut pos, mut out) = (start, Vec::new());
    while pos < end {
        let Some(data) = seek(f, pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(f, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        out.push((data, hole - data));
        pos = hole;
    }
    Ok(out)
}

/// `lseek` to the next data or hole at or after `pos`; `None` when there is no more data.
fn seek(f: &File, pos: u64, whence: i32) -> Result<Option<u64>, MemoryFileError> {
    let off = i64::try_from(pos)
        .map_err(|_| io_err("lseek", pos)(io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
    // SAFETY: lseek on a descriptor we hold; it only moves that descriptor's file position.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        let op = if whence == libc::SEEK_DATA {
            "lseek(SEEK_DATA)"
        } else {
            "lseek(SEEK_HOLE)"
        };
        return Err(io_err(op, pos)(e));
    }
    Ok(u64::try_from(r).ok())
}

/// Whether an error from a copy primitive means "this primitive cannot do it here; try the
/// next", as opposed to a real I/O failure.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | libc::EBADF)
    )
}

/// Copies up to `n` bytes; returns how many it copied (at least one unless `n` is 0).
fn copy_chunk(
    primitive: &mut Primitive,
    buffer: &mut Vec<u8>,
    src: &File,
    src_at: u64,
    dst: &File,
    dst_at: u64,
    n: u64,
) -> Result<u64, MemoryFileError> {
    let len = usize::try_from(n).unwrap_or(usize::MAX);
    loop {
        let result = match *primitive {
            Primitive::CopyFileRange => copy_file_range(src, src_at, dst, dst_at, len),
            Primitive::Sendfile => sendfile(src, src_at, dst, dst_at, len),
            Primitive::ReadWrite => return read_write(buffer, src, src_at, dst, dst_at, len),
        };
        match result {
            // No progress (a source that reads short): let the next primitive try.
            Ok(0) => *primitive = next(*primitive),
            Ok(done) => return Ok(done as u64),
            Err(e) if unsupported(&e) => *primitive = next(*primitive),
            Err(e) => return Err(io_err(name(*primitive), src_at)(e)),
        }
    }
}

fn next(p: Primitive) -> Primitive {
    match p {
        Primitive::CopyFileRange => Primitive::Sendfile,
        _ => Primitive::ReadWrite,
    }
}

fn name(p: Primitive) -> &'static str {
    match p {
        Primitive::CopyFileRange => "copy_file_range",
        Primitive::Sendfile => "sendfile",
        Primitive::ReadWrite => "pread/pwrite",
    }
}

fn to_off(v: u64) -> io::Result<i64> {
    i64::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

fn copy_file_range(
    src: &File,
    src_at: u64,
    dst: &File,
    dst_at: u64,
    len: usize,
) -> io::Result<usize> {
    let mut off_in = to_off(src_at)?;
    let mut off_out = to_off(dst_at)?;
    // SAFETY: both descriptors are open; the offsets are local variables the call updates.
    let r = unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut off_in,
            dst.as_raw_fd(),
            &mut off_out,
            len,
            0,
        )
    };
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

fn sendfile(src: &File, src_at: u64, dst: &File, dst_at: u64, len: usize) -> io::Result<usize> {
    // sendfile writes at the destination's file position: move it first (the destination
    // descriptor is this copy's own).
    // SAFETY: lseek on a descriptor we hold.
    if unsafe { libc::lseek(dst.as_raw_fd(), to_off(dst_at)?, libc::SEEK_SET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut off_in = to_off(src_at)?;
    // Linux caps one sendfile at 0x7ffff000 bytes.
    let len = len.min(0x7fff_f000);
    // SAFETY: both descriptors are open; `off_in` is a local the call updates.
    let r = unsafe { libc::sendfile(dst.as_raw_fd(), src.as_raw_fd(), &mut off_in, len) };
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

fn read_write(
    buffer: &mut Vec<u8>,
    src: &File,
    src_at: u64,
    dst: &File,
    dst_at: u64,
    len: usize,
) -> Result<u64, MemoryFileError> {
    use std::os::unix::fs::FileExt;
    if buffer.is_empty() {
        buffer.resize(BUFFER, 0);
    }
    let n = len.min(buffer.len());
    let got = src
        .read_at(&mut buffer[..n], src_at)
        .map_err(io_err("pread", src_at))?;
    if got == 0 {
        return Err(io_err("pread", src_at)(io::Error::from(
            io::ErrorKind::UnexpectedEof,
        )));
    }
    dst.write_all_at(&buffer[..got], dst_at)
        .map_err(io_err("pwrite", dst_at))?;
    Ok(got as u64)
}

/// Makes `dst[0..len)` share the extents of `src[src_offset..src_offset + len)`. Returns
/// `Ok(false)` when the filesystem cannot (different filesystems, or no reflink support).
pub fn reflink(src: &File, src_offset: u64, dst: &File, len: u64) -> Result<bool, MemoryFileError> {
    let range = libc::file_clone_range {
        src_fd: i64::from(src.as_raw_fd()),
        src_offset,
        src_length: len,
        dest_offset: 0,
    };
    // SAFETY: FICLONERANGE reads `range`, which lives across the call; both descriptors are open.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONERANGE, &range) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if unsupported(&e) || matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EPERM)) {
        return Ok(false);
    }
    Err(io_err("FICLONERANGE", src_offset)(e))
}

/// Makes `dst_path` a hard link to `src` when `[src_offset, src_offset + len)` is the whole of
/// `src` and the filesystem allows it (same filesystem, a named file: a memfd is not). Returns
/// `Ok(false)` when it cannot. The link is made through `/proc/self/fd` (`AT_SYMLINK_FOLLOW`),
/// which needs no privilege, unlike `AT_EMPTY_PATH`. Afterwards both names are one inode:
/// whoever writes the backing writes the snapshot, so only a VM that has ended may be linked.
pub fn hard_link(
    src: &File,
    src_offset: u64,
    len: u64,
    dst_path: &std::path::Path,
) -> Result<bool, MemoryFileError> {
    use std::os::unix::ffi::OsStrExt;
    let meta = src.metadata().map_err(io_err("fstat", src_offset))?;
    if src_offset != 0 || meta.len() != len || !meta.is_file() {
        return Ok(false);
    }
    let from = format!("/proc/self/fd/{}\0", src.as_raw_fd());
    let mut to = dst_path.as_os_str().as_bytes().to_vec();
    to.push(0);
    if to[..to.len() - 1].contains(&0) {
        return Ok(false);
    }
    // SAFETY: both are NUL-terminated byte strings that outlive the call.
    let rc = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr().cast(),
            libc::AT_FDCWD,
            to.as_ptr().cast(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    // EXDEV: another filesystem; ENOENT: no name to link (a memfd, a deleted file); EPERM,
    // EMLINK, EOPNOTSUPP: the filesystem or its policy refuses.
    if matches!(
        e.raw_os_error(),
        Some(libc::EXDEV | libc::ENOENT | libc::EPERM | libc::EMLINK | libc::EOPNOTSUPP)
    ) {
        return Ok(false);
    }
    Err(io_err("linkat", src_offset)(e))
}

/// Bits of a `/proc/self/pagemap` entry.
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;
const PAGEMAP_FILE_OR_SHARED: u64 = 1 << 61;

/// Writes into `dst` (at the same offsets) every page of `mapping`, a private (copy-on-write)
/// mapping of a region, that this process has made its own (anonymous: written after a
/// copy-on-write fault, or swapped out), found through `/proc/self/pagemap`. Those pages the
/// guest wrote since the mapping was made live only here, not in the region's file. Pages
/// still backed by the mapped file are left alone: the caller copied the file already. Returns
/// the bytes written. Nobody should write the mapping meanwhile (the VM is paused), or the
/// writes must be recorded elsewhere (a live snapshot's dirty log).
pub fn overlay_private_pages(
    mapping: &RegionMapping,
    dst: &File,
    cancel: &AtomicBool,
    progress: Option<&SnapshotProgress>,
) -> Result<u64, MemoryFileError> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    const BATCH: usize = 4096;
    let pagemap = File::open("/proc/self/pagemap").map_err(io_err("open /proc/self/pagemap", 0))?;
    let pages = mapping.len() / PAGE;
    let mut entries = vec![0u8; BATCH * 8];
    let mut written = 0u64;
    let mut first = 0;
    while first < pages {
        if cancel.load(Ordering::Relaxed) {
            return Err(MemoryFileError::Cancelled);
        }
        let n = (pages - first).min(BATCH);
        let at = ((mapping.host_address() / PAGE + first) * 8) as u64;
        pagemap
            .read_exact_at(&mut entries[..n * 8], at)
            .map_err(io_err("read /proc/self/pagemap", at))?;
        for i in 0..n {
            let e = u64::from_le_bytes(entries[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
            let own = (e & PAGEMAP_PRESENT != 0 && e & PAGEMAP_FILE_OR_SHARED == 0)
                || e & PAGEMAP_SWAPPED != 0;
            if !own {
                continue;
            }
            let offset = (first + i) * PAGE;
            let r = mapping.pwrite_into(dst, offset, PAGE, offset as u64);
            match r {
                Ok(PAGE) => {}
                Ok(_) => {
                    return Err(io_err("pwrite", offset as u64)(io::Error::from(
                        io::ErrorKind::WriteZero,
                    )))
                }
                Err(e) => return Err(io_err("pwrite", offset as u64)(e)),
            }
            written += PAGE as u64;
            if let Some(p) = progress {
                p.advance(PAGE as u64);
            }
        }
        first += n;
    }
    Ok(written)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A new, empty read-write file at `path` (truncated if it exists).
    pub(crate) fn test_file(path: impl AsRef<std::path::Path>) -> File {
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap()
    }
    use std::os::unix::fs::FileExt;

    fn memfd(len: u64) -> File {
        // SAFETY: the name is a valid C string; the new descriptor is owned by the File.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    fn allocated(f: &File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        f.metadata().unwrap().blocks() * 512
    }

    #[test]
    fn copies_only_data_and_keeps_holes_from_memfd_to_a_file() {
        let src = memfd(64 << 20);
        src.write_all_at(b"head", 0).unwrap();
        src.write_all_at(&[7u8; 8192], 20 << 20).unwrap();
        src.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dst = test_file(dir.path().join("m"));
        // Copy the upper half only, as a region at file offset 16 MiB would.
        dst.set_len(48 << 20).unwrap();
        let n = copy_sparse(&src, 16 << 20, &dst, 0, 48 << 20, &AtomicBool::new(false)).unwrap();
        assert!((8192 + 4..=3 << 20).contains(&n), "copied {n} bytes");
        let mut buf = [0u8; 4];
        dst.read_exact_at(&mut buf, (48 << 20) - 4).unwrap();
        assert_eq!(&buf, b"tail");
        dst.read_exact_at(&mut buf, 4 << 20).unwrap();
        assert_eq!(buf, [7; 4]);
        dst.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0; 4], "the head lies outside the copied range");
        assert!(
            allocated(&dst) < 8 << 20,
            "holes stay holes: {} bytes allocated",
            allocated(&dst)
        );
    }

    #[test]
    fn copies_into_a_memfd_and_honours_cancel() {
        let dir = tempfile::tempdir().unwrap();
        let src = test_file(dir.path().join("s"));
        src.set_len(8 << 20).unwrap();
        src.write_all_at(b"abc", 5 << 20).unwrap();
        let dst = memfd(16 << 20);
        let n = copy_sparse(&src, 0, &dst, 8 << 20, 8 << 20, &AtomicBool::new(false)).unwrap();
        assert!(n >= 3);
        let mut buf = [0u8; 3];
        dst.read_exact_at(&mut buf, (8 << 20) + (5 << 20)).unwrap();
        assert_eq!(&buf, b"abc");
        let e = copy_sparse(&src, 0, &dst, 0, 8 << 20, &AtomicBool::new(true)).unwrap_err();
        assert!(matches!(e, MemoryFileError::Cancelled));
    }

    #[test]
    fn hard_link_takes_only_a_whole_named_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let src = test_file(dir.path().join("ram"));
        src.set_len(1 << 20).unwrap();
        let linked = dir.path().join("memory-0.bin");
        assert!(!hard_link(&src, 4096, (1 << 20) - 4096, &linked).unwrap());
        assert!(!hard_link(&src, 0, 1 << 19, &linked).unwrap());
        assert!(!linked.exists(), "a part of the file is never linked");
        assert!(!hard_link(&memfd(1 << 20), 0, 1 << 20, &linked).unwrap());
        assert!(hard_link(&src, 0, 1 << 20, &linked).unwrap());
        let (a, b) = (src.metadata().unwrap(), linked.metadata().unwrap());
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    }

    #[test]
    fn reflink_between_a_memfd_and_a_file_is_refused_not_failed() {
        let src = memfd(1 << 20);
        let dir = tempfile::tempdir().unwrap();
        let dst = test_file(dir.path().join("r"));
        assert!(!reflink(&src, 0, &dst, 1 << 20).unwrap());
    }

    #[test]
    fn pages_written_in_a_private_mapping_are_overlaid() {
        let dir = tempfile::tempdir().unwrap();
        let src = test_file(dir.path().join("s"));
        src.set_len(1 << 20).unwrap();
        src.write_all_at(b"file", 0).unwrap();
        let len = 1 << 20;
        let private = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(
            len,
            vm_memory::bitmap::AtomicBitmap::new(
                len,
                std::num::NonZeroUsize::MIN.saturating_add(4095),
            ),
        )
        .with_file_offset(vm_memory::FileOffset::new(src.try_clone().unwrap(), 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE)
        .build()
        .unwrap();
        {
            use vm_memory::VolatileMemory as _;
            // The first page is read, not written; two others are written.
            let _: u8 = private.get_ref::<u8>(0).unwrap().load();
            private.get_ref::<u8>(8192).unwrap().store(b'x');
            private.get_ref::<u8>(len - 1).unwrap().store(b'y');
        }
        let mapping = RegionMapping::from(std::sync::Arc::new(private));
        let dst = test_file(dir.path().join("d"));
        dst.set_len(len as u64).unwrap();
        copy_sparse(&src, 0, &dst, 0, len as u64, &AtomicBool::new(false)).unwrap();
        let n = overlay_private_pages(&mapping, &dst, &AtomicBool::new(false), None).unwrap();
        assert_eq!(n, 2 * 4096, "exactly the two written pages");
        let out = std::fs::read(dir.path().join("d")).unwrap();
        assert_eq!(&out[..4], b"file");
        assert_eq!(out[8192], b'x');
        assert_eq!(out[len - 1], b'y');
        let f = std::fs::read(dir.path().join("s")).unwrap();
        assert_eq!(f[8192], 0, "the file itself is unchanged");
    }

    #[test]
    fn primitives_fall_back_in_order() {
        assert_eq!(next(Primitive::CopyFileRange), Primitive::Sendfile);
        assert_eq!(next(Primitive::Sendfile), Primitive::ReadWrite);
        assert!(unsupported(&io::Error::from_raw_os_error(libc::EXDEV)));
        assert!(!unsupported(&io::Error::from_raw_os_error(libc::ENOSPC)));
    }
}
