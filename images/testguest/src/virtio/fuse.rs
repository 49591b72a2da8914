//! The FUSE messages the `virtio-fs` scenario sends, as byte layouts (Linux uapi
//! `include/uapi/linux/fuse.h`, protocol 7.31): opcodes, the in and out headers, and the offsets
//! and sizes of the argument and reply structures used. All fields are little-endian and
//! naturally aligned.
//!
//! Only facts live here; building requests and checking replies is `fs.rs`'s job.

/// The protocol version the guest speaks (virtiofsd needs at least 7.31).
pub const KERNEL_VERSION: u32 = 7;
pub const KERNEL_MINOR: u32 = 31;

// Opcodes.
pub const LOOKUP: u32 = 1;
pub const FORGET: u32 = 2;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const RELEASE: u32 = 18;
pub const INIT: u32 = 26;

/// The request's node for the root directory.
pub const ROOT_ID: u64 = 1;

/// `fuse_in_header`: len u32, opcode u32, unique u64, nodeid u64, uid u32, gid u32, pid u32,
/// total_extlen u16, padding u16.
pub const IN_HEADER: u64 = 40;
pub const IN_LEN: u64 = 0;
pub const IN_OPCODE: u64 = 4;
pub const IN_UNIQUE: u64 = 8;
pub const IN_NODEID: u64 = 16;
pub const IN_UID: u64 = 24;
pub const IN_GID: u64 = 28;
pub const IN_PID: u64 = 32;
/// total_extlen and padding, as one u32.
pub const IN_EXT: u64 = 36;

/// `fuse_out_header`: len u32, error i32 (0 or a negative errno), unique u64.
pub const OUT_HEADER: u64 = 16;
pub const OUT_LEN: u64 = 0;
pub const OUT_ERROR: u64 = 4;
pub const OUT_UNIQUE: u64 = 8;

/// `fuse_init_in` up to 7.35: major, minor, max_readahead, flags (u32 each).
pub const INIT_IN: u64 = 16;
pub const INIT_IN_MAJOR: u64 = 0;
pub const INIT_IN_MINOR: u64 = 4;
pub const INIT_IN_MAX_READAHEAD: u64 = 8;
pub const INIT_IN_FLAGS: u64 = 12;
/// `fuse_init_out` for a client of minor 23 or later: major, minor, max_readahead, flags,
/// max_background u16, congestion_threshold u16, max_write, time_gran, max_pages u16,
/// map_alignment u16, flags2, unused[7].
pub const INIT_OUT: u64 = 64;
/// The reply size for clients before 7.23 (`FUSE_COMPAT_22_INIT_OUT_SIZE`).
pub const INIT_OUT_COMPAT_22: u64 = 24;
pub const INIT_OUT_MAJOR: u64 = 0;
pub const INIT_OUT_MINOR: u64 = 4;

/// `fuse_entry_out`: nodeid u64, generation u64, entry_valid u64, attr_valid u64,
/// entry_valid_nsec u32, attr_valid_nsec u32, then `fuse_attr` (88 bytes) at 40.
pub const ENTRY_OUT: u64 = 128;
pub const ENTRY_OUT_NODEID: u64 = 0;
const ENTRY_OUT_ATTR: u64 = 40;
/// `fuse_attr`: ino, size, blocks, atime, mtime, ctime (u64), atimensec, mtimensec, ctimensec,
/// mode, nlink, uid, gid, rdev, blksize, flags (u32).
pub const ENTRY_OUT_SIZE: u64 = ENTRY_OUT_ATTR + 8;
pub const ENTRY_OUT_MODE: u64 = ENTRY_OUT_ATTR + 60;
/// `S_IFMT` and `S_IFREG` of `fuse_attr.mode`.
pub const S_IFMT: u32 = 0o170_000;
pub const S_IFREG: u32 = 0o100_000;

/// `fuse_open_in`: flags u32 (O_RDONLY = 0), open_flags u32.
pub const OPEN_IN: u64 = 8;
/// `fuse_open_out`: fh u64, open_flags u32, backing_id i32.
pub const OPEN_OUT: u64 = 16;
pub const OPEN_OUT_FH: u64 = 0;

/// `fuse_read_in`: fh u64, offset u64, size u32, read_flags u32, lock_owner u64, flags u32,
/// padding u32. The reply is the data itself.
pub const READ_IN: u64 = 40;
pub const READ_IN_FH: u64 = 0;
pub const READ_IN_OFFSET: u64 = 8;
pub const READ_IN_SIZE: u64 = 16;

/// `fuse_release_in`: fh u64, flags u32, release_flags u32, lock_owner u64. No reply body.
pub const RELEASE_IN: u64 = 24;
pub const RELEASE_IN_FH: u64 = 0;

/// `fuse_forget_in`: nlookup u64. FORGET has no reply at all.
pub const FORGET_IN: u64 = 8;
