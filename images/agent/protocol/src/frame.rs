//! The frame header: layout, the kinds of frame, and the errors of encoding and decoding.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "SKAG"
//!      4     1  version (1)
//!      5     1  kind
//!      6     2  reserved, zero
//!      8     4  request id (little-endian)
//!     12     4  payload length (little-endian, at most MAX_PAYLOAD)
//! ```

use core::fmt;

/// Size of a frame header in bytes.
pub const HEADER_LEN: usize = 16;
/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"SKAG";
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// The largest payload a frame may carry (1 MiB). A larger length is rejected from the header
/// alone, before anything is read or allocated for it.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// What a frame carries. Requests go from the host to the agent (`0x01..`), replies and
/// streamed output from the agent to the host (`0x81..`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Host: opens the conversation; the agent answers `HelloReply`.
    Hello = 0x01,
    /// Host: runs a program; the agent answers `Started`, then streams, then `Exit` (or `Error`).
    Exec = 0x02,
    /// Host: bytes for a running exec's standard input.
    Stdin = 0x03,
    /// Host: closes a running exec's standard input.
    StdinEof = 0x04,
    /// Host: reads a file; the agent answers `FileData` frames and then `Done`.
    ReadFile = 0x05,
    /// Host: writes (or appends to) a file; the agent answers `Done`.
    WriteFile = 0x06,
    /// Host: stops every running exec, syncs file systems; the agent answers `Done`.
    Quiesce = 0x07,
    /// Host: after a restore, sets the wall clock and credits fresh entropy; `Done`.
    Resume = 0x08,
    /// Host: powers the guest off (or ends the agent when it is not PID 1); `Done` first.
    Shutdown = 0x09,
    /// Host: sends a signal to a running exec's process group; `Done`.
    Signal = 0x0a,
    /// Agent: answer to `Hello`.
    HelloReply = 0x81,
    /// Agent: the exec's process started with this pid.
    Started = 0x82,
    /// Agent: a chunk of an exec's standard output (or of its terminal, with a pty).
    Stdout = 0x83,
    /// Agent: a chunk of an exec's standard error.
    Stderr = 0x84,
    /// Agent: the exec ended; its last frame.
    Exit = 0x85,
    /// Agent: a chunk of a file being read.
    FileData = 0x86,
    /// Agent: the request succeeded.
    Done = 0x87,
    /// Agent: the request failed; its last frame.
    Error = 0x88,
}

impl Kind {
    /// The kind for a header byte, if it names one.
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            0x01 => Kind::Hello,
            0x02 => Kind::Exec,
            0x03 => Kind::Stdin,
            0x04 => Kind::StdinEof,
            0x05 => Kind::ReadFile,
            0x06 => Kind::WriteFile,
            0x07 => Kind::Quiesce,
            0x08 => Kind::Resume,
            0x09 => Kind::Shutdown,
            0x0a => Kind::Signal,
            0x81 => Kind::HelloReply,
            0x82 => Kind::Started,
            0x83 => Kind::Stdout,
            0x84 => Kind::Stderr,
            0x85 => Kind::Exit,
            0x86 => Kind::FileData,
            0x87 => Kind::Done,
            0x88 => Kind::Error,
            _ => return None,
        })
    }
}

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the payload holds.
    pub kind: Kind,
    /// Chosen by the host per request; every agent frame about that request carries it.
    pub request: u32,
    /// Payload length, at most [`MAX_PAYLOAD`].
    pub len: u32,
}

impl Header {
    /// Parses and validates a header.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Header, DecodeError> {
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        if bytes[4] != VERSION {
            return Err(DecodeError::UnsupportedVersion(bytes[4]));
        }
        let kind = Kind::from_u8(bytes[5]).ok_or(DecodeError::UnknownKind(bytes[5]))?;
        if bytes[6] != 0 || bytes[7] != 0 {
            return Err(DecodeError::ReservedBits);
        }
        let request = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        let len = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
        if len as usize > MAX_PAYLOAD {
            return Err(DecodeError::PayloadTooLong(len));
        }
        Ok(Header { kind, request, len })
    }

    /// The header's 16 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = self.kind as u8;
        out[8..12].copy_from_slice(&self.request.to_le_bytes());
        out[12..16].copy_from_slice(&self.len.to_le_bytes());
        out
    }
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The first four bytes are not "SKAG".
    BadMagic([u8; 4]),
    /// A version this crate does not speak.
    UnsupportedVersion(u8),
    /// A kind byte that names no frame.
    UnknownKind(u8),
    /// The reserved header bytes are not zero.
    ReservedBits,
    /// The header's payload length is over [`MAX_PAYLOAD`].
    PayloadTooLong(u32),
    /// The payload ends inside a field (`need` more bytes at `offset`).
    Truncated { offset: usize, need: usize },
    /// The payload has bytes after its last field.
    TrailingBytes(usize),
    /// A field holds a value its kind does not allow (named by the string).
    BadValue(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::BadMagic(m) => write!(
                f,
                "bad frame magic {:02x} {:02x} {:02x} {:02x}",
                m[0], m[1], m[2], m[3]
            ),
            DecodeError::UnsupportedVersion(v) => write!(f, "unsupported protocol version {v}"),
            DecodeError::UnknownKind(k) => write!(f, "unknown frame kind {k:#04x}"),
            DecodeError::ReservedBits => write!(f, "reserved header bytes are not zero"),
            DecodeError::PayloadTooLong(n) => {
                write!(f, "payload length {n} is over the limit of {MAX_PAYLOAD}")
            }
            DecodeError::Truncated { offset, need } => {
                write!(
                    f,
                    "payload truncated: {need} bytes missing at offset {offset}"
                )
            }
            DecodeError::TrailingBytes(n) => write!(f, "{n} bytes after the payload's last field"),
            DecodeError::BadValue(what) => write!(f, "invalid {what}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for DecodeError {}

/// Why a message could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// The encoded payload would be this many bytes, over [`MAX_PAYLOAD`].
    TooLong(usize),
    /// The output buffer holds `have` bytes; the frame needs `need`.
    BufferTooSmall { need: usize, have: usize },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::TooLong(n) => {
                write!(f, "payload of {n} bytes is over the limit of {MAX_PAYLOAD}")
            }
            EncodeError::BufferTooSmall { need, have } => {
                write!(f, "frame needs {need} bytes, buffer has {have}")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for EncodeError {}
