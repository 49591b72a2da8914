//! The messages frames carry, and their payload layouts.
//!
//! Fields are little-endian. `bytes` is a u32 length and that many bytes; `list` is a u32 count
//! and that many `bytes`. Payloads by kind:
//!
//! ```text
//! Hello       version u32, features u32
//! Exec        flags u32, timeout_ms u64 (0: none), cwd bytes (empty: agent's), argv list (>= 1),
//!             env list ("KEY=VALUE"; empty: agent's default), stdin bytes (first stdin data)
//! Stdin       raw data                 StdinEof   empty
//! ReadFile    path bytes               WriteFile  flags u32, mode u32, path bytes, data bytes
//! Quiesce     empty                    Resume     unix_time_ns u64, entropy bytes (<= 4096)
//! Shutdown    empty                    Signal     signal i32
//! HelloReply  version u32, features u32, agent bytes (name and version, for logs)
//! Started     pid u32
//! Stdout, Stderr, FileData   raw data
//! Exit        tag u8 (0 code, 1 signal, 2 timed out), value i32 (0 when timed out)
//! Done        empty                    Error      code u32, message bytes (UTF-8 text)
//! ```

use crate::frame::{DecodeError, EncodeError, Header, Kind, HEADER_LEN, MAX_PAYLOAD};

/// The most entropy a `Resume` may carry.
pub const MAX_ENTROPY: usize = 4096;

/// Options of an `Exec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExecFlags(pub u32);

impl ExecFlags {
    /// Run the program on a new pseudo-terminal; its output arrives as `Stdout`.
    pub const PTY: u32 = 1;
    /// More standard input follows in `Stdin` frames until `StdinEof`; without this flag the
    /// program's standard input ends after the `Exec`'s own `stdin` bytes.
    pub const STREAM_STDIN: u32 = 2;
    const KNOWN: u32 = Self::PTY | Self::STREAM_STDIN;

    /// Whether `flag` is set.
    pub fn has(self, flag: u32) -> bool {
        self.0 & flag != 0
    }
}

/// Options of a `WriteFile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteFlags(pub u32);

impl WriteFlags {
    /// Append to the file instead of replacing it (large files are written as one `WriteFile`
    /// and then appends).
    pub const APPEND: u32 = 1;
    const KNOWN: u32 = Self::APPEND;

    /// Whether `flag` is set.
    pub fn has(self, flag: u32) -> bool {
        self.0 & flag != 0
    }
}

/// How an exec ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// The program exited with this code.
    Code(i32),
    /// The program was killed by this signal.
    Signal(i32),
    /// The exec's timeout expired and its process group was killed.
    TimedOut,
}

/// What went wrong with a request, in an `Error` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame could not be decoded; the agent closes the connection after saying so.
    Malformed,
    /// The agent knows the kind but cannot do it here (e.g. a pty without /dev/ptmx).
    Unsupported,
    /// `Stdin`, `StdinEof` or `Signal` named a request that is not a running exec.
    UnknownRequest,
    /// A request id that is already running.
    DuplicateRequest,
    /// The program could not be started (the message names it and the errno).
    Spawn,
    /// A file or system call failed (the message says which).
    Io,
    /// A code this crate does not know, from a newer peer.
    Other(u32),
}

impl ErrorCode {
    fn to_u32(self) -> u32 {
        match self {
            ErrorCode::Malformed => 1,
            ErrorCode::Unsupported => 2,
            ErrorCode::UnknownRequest => 3,
            ErrorCode::DuplicateRequest => 4,
            ErrorCode::Spawn => 5,
            ErrorCode::Io => 6,
            ErrorCode::Other(v) => v,
        }
    }

    fn from_u32(v: u32) -> ErrorCode {
        match v {
            1 => ErrorCode::Malformed,
            2 => ErrorCode::Unsupported,
            3 => ErrorCode::UnknownRequest,
            4 => ErrorCode::DuplicateRequest,
            5 => ErrorCode::Spawn,
            6 => ErrorCode::Io,
            v => ErrorCode::Other(v),
        }
    }
}

/// A list of byte strings (argv, env): either decoded bytes, validated when the payload was
/// decoded, or items to encode.
#[derive(Debug, Clone, Copy)]
pub enum ByteList<'a> {
    /// `count` items, encoded in `raw`, already checked to be well formed.
    Encoded { count: u32, raw: &'a [u8] },
    /// Items given by the sender.
    Items(&'a [&'a [u8]]),
}

impl<'a> ByteList<'a> {
    /// How many items the list has.
    pub fn len(&self) -> usize {
        match self {
            ByteList::Encoded { count, .. } => *count as usize,
            ByteList::Items(items) => items.len(),
        }
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The items in order.
    pub fn iter(&self) -> ByteListIter<'a> {
        match *self {
            ByteList::Encoded { count, raw } => ByteListIter::Encoded {
                left: count,
                cursor: Cursor { data: raw, pos: 0 },
            },
            ByteList::Items(items) => ByteListIter::Items(items.iter()),
        }
    }
}

impl PartialEq for ByteList<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().zip(other.iter()).all(|(a, b)| a == b)
    }
}

impl Eq for ByteList<'_> {}

/// Iterator over a [`ByteList`].
#[derive(Debug)]
pub enum ByteListIter<'a> {
    #[doc(hidden)]
    Encoded { left: u32, cursor: Cursor<'a> },
    #[doc(hidden)]
    Items(core::slice::Iter<'a, &'a [u8]>),
}

impl<'a> Iterator for ByteListIter<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        match self {
            ByteListIter::Encoded { left, cursor } => {
                if *left == 0 {
                    return None;
                }
                *left -= 1;
                cursor.bytes().ok()
            }
            ByteListIter::Items(it) => it.next().copied(),
        }
    }
}

/// One message: a frame's kind and payload, borrowing the payload's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    Hello {
        version: u32,
        features: u32,
    },
    Exec {
        flags: ExecFlags,
        timeout_ms: u64,
        cwd: &'a [u8],
        argv: ByteList<'a>,
        env: ByteList<'a>,
        stdin: &'a [u8],
    },
    Stdin(&'a [u8]),
    StdinEof,
    ReadFile {
        path: &'a [u8],
    },
    WriteFile {
        flags: WriteFlags,
        mode: u32,
        path: &'a [u8],
        data: &'a [u8],
    },
    Quiesce,
    Resume {
        unix_time_ns: u64,
        entropy: &'a [u8],
    },
    Shutdown,
    Signal(i32),
    HelloReply {
        version: u32,
        features: u32,
        agent: &'a [u8],
    },
    Started {
        pid: u32,
    },
    Stdout(&'a [u8]),
    Stderr(&'a [u8]),
    Exit(ExitStatus),
    FileData(&'a [u8]),
    Done,
    Error {
        code: ErrorCode,
        message: &'a [u8],
    },
}

impl<'a> Message<'a> {
    /// The frame kind this message travels in.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello { .. } => Kind::Hello,
            Message::Exec { .. } => Kind::Exec,
            Message::Stdin(_) => Kind::Stdin,
            Message::StdinEof => Kind::StdinEof,
            Message::ReadFile { .. } => Kind::ReadFile,
            Message::WriteFile { .. } => Kind::WriteFile,
            Message::Quiesce => Kind::Quiesce,
            Message::Resume { .. } => Kind::Resume,
            Message::Shutdown => Kind::Shutdown,
            Message::Signal(_) => Kind::Signal,
            Message::HelloReply { .. } => Kind::HelloReply,
            Message::Started { .. } => Kind::Started,
            Message::Stdout(_) => Kind::Stdout,
            Message::Stderr(_) => Kind::Stderr,
            Message::Exit(_) => Kind::Exit,
            Message::FileData(_) => Kind::FileData,
            Message::Done => Kind::Done,
            Message::Error { .. } => Kind::Error,
        }
    }

    /// Decodes the payload of a frame of kind `kind`. Every byte must belong to a field.
    pub fn decode(kind: Kind, payload: &'a [u8]) -> Result<Message<'a>, DecodeError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(DecodeError::PayloadTooLong(
                u32::try_from(payload.len()).unwrap_or(u32::MAX),
            ));
        }
        let mut c = Cursor {
            data: payload,
            pos: 0,
        };
        let msg = match kind {
            Kind::Hello => Message::Hello {
                version: c.u32()?,
                features: c.u32()?,
            },
            Kind::Exec => {
                let flags = c.u32()?;
                if flags & !ExecFlags::KNOWN != 0 {
                    return Err(DecodeError::BadValue("exec flags"));
                }
                let timeout_ms = c.u64()?;
                let cwd = c.bytes()?;
                let argv = c.list()?;
                if argv.is_empty() {
                    return Err(DecodeError::BadValue("exec argv (empty)"));
                }
                let env = c.list()?;
                let stdin = c.bytes()?;
                Message::Exec {
                    flags: ExecFlags(flags),
                    timeout_ms,
                    cwd,
                    argv,
                    env,
                    stdin,
                }
            }
            Kind::Stdin => Message::Stdin(c.rest()),
            Kind::StdinEof => Message::StdinEof,
            Kind::ReadFile => Message::ReadFile { path: c.bytes()? },
            Kind::WriteFile => {
                let flags = c.u32()?;
                if flags & !WriteFlags::KNOWN != 0 {
                    return Err(DecodeError::BadValue("write flags"));
                }
                Message::WriteFile {
                    flags: WriteFlags(flags),
                    mode: c.u32()?,
                    path: c.bytes()?,
                    data: c.bytes()?,
                }
            }
            Kind::Quiesce => Message::Quiesce,
            Kind::Resume => {
                let unix_time_ns = c.u64()?;
                let entropy = c.bytes()?;
                if entropy.len() > MAX_ENTROPY {
                    return Err(DecodeError::BadValue("resume entropy length"));
                }
                Message::Resume {
                    unix_time_ns,
                    entropy,
                }
            }
            Kind::Shutdown => Message::Shutdown,
            Kind::Signal => Message::Signal(c.i32()?),
            Kind::HelloReply => Message::HelloReply {
                version: c.u32()?,
                features: c.u32()?,
                agent: c.bytes()?,
            },
            Kind::Started => Message::Started { pid: c.u32()? },
            Kind::Stdout => Message::Stdout(c.rest()),
            Kind::Stderr => Message::Stderr(c.rest()),
            Kind::Exit => {
                let tag = c.u8()?;
                let value = c.i32()?;
                Message::Exit(match tag {
                    0 => ExitStatus::Code(value),
                    1 => ExitStatus::Signal(value),
                    2 if value == 0 => ExitStatus::TimedOut,
                    _ => return Err(DecodeError::BadValue("exit status")),
                })
            }
            Kind::FileData => Message::FileData(c.rest()),
            Kind::Done => Message::Done,
            Kind::Error => Message::Error {
                code: ErrorCode::from_u32(c.u32()?),
                message: c.bytes()?,
            },
        };
        let left = payload.len() - c.pos;
        if left != 0 {
            return Err(DecodeError::TrailingBytes(left));
        }
        Ok(msg)
    }

    /// The payload's encoded length in bytes.
    pub fn payload_len(&self) -> usize {
        let mut counter = Counter(0);
        self.write_payload(&mut counter);
        counter.0
    }

    /// Encodes the whole frame (header and payload) for request `request` into `out` and
    /// returns its length.
    pub fn encode(&self, request: u32, out: &mut [u8]) -> Result<usize, EncodeError> {
        let header = self.header(request)?;
        let need = HEADER_LEN + header.len as usize;
        if out.len() < need {
            return Err(EncodeError::BufferTooSmall {
                need,
                have: out.len(),
            });
        }
        out[..HEADER_LEN].copy_from_slice(&header.encode());
        let mut sink = SliceSink {
            out: &mut out[HEADER_LEN..need],
            pos: 0,
        };
        self.write_payload(&mut sink);
        Ok(need)
    }

    /// The header for this message as request `request`, checking the payload's size.
    pub fn header(&self, request: u32) -> Result<Header, EncodeError> {
        let len = self.payload_len();
        if len > MAX_PAYLOAD {
            return Err(EncodeError::TooLong(len));
        }
        Ok(Header {
            kind: self.kind(),
            request,
            // MAX_PAYLOAD fits in u32, so the checked length does.
            len: len as u32,
        })
    }

    /// Writes the payload into `sink`.
    pub(crate) fn write_payload<S: Sink>(&self, s: &mut S) {
        match *self {
            Message::Hello { version, features } => {
                s.put(&version.to_le_bytes());
                s.put(&features.to_le_bytes());
            }
            Message::Exec {
                flags,
                timeout_ms,
                cwd,
                argv,
                env,
                stdin,
            } => {
                s.put(&flags.0.to_le_bytes());
                s.put(&timeout_ms.to_le_bytes());
                put_bytes(s, cwd);
                put_list(s, argv);
                put_list(s, env);
                put_bytes(s, stdin);
            }
            Message::Stdin(d) | Message::Stdout(d) | Message::Stderr(d) | Message::FileData(d) => {
                s.put(d)
            }
            Message::StdinEof | Message::Quiesce | Message::Shutdown | Message::Done => {}
            Message::ReadFile { path } => put_bytes(s, path),
            Message::WriteFile {
                flags,
                mode,
                path,
                data,
            } => {
                s.put(&flags.0.to_le_bytes());
                s.put(&mode.to_le_bytes());
                put_bytes(s, path);
                put_bytes(s, data);
            }
            Message::Resume {
                unix_time_ns,
                entropy,
            } => {
                s.put(&unix_time_ns.to_le_bytes());
                put_bytes(s, entropy);
            }
            Message::Signal(sig) => s.put(&sig.to_le_bytes()),
            Message::HelloReply {
                version,
                features,
                agent,
            } => {
                s.put(&version.to_le_bytes());
                s.put(&features.to_le_bytes());
                put_bytes(s, agent);
            }
            Message::Started { pid } => s.put(&pid.to_le_bytes()),
            Message::Exit(status) => {
                let (tag, value) = match status {
                    ExitStatus::Code(c) => (0u8, c),
                    ExitStatus::Signal(sig) => (1, sig),
                    ExitStatus::TimedOut => (2, 0),
                };
                s.put(&[tag]);
                s.put(&value.to_le_bytes());
            }
            Message::Error { code, message } => {
                s.put(&code.to_u32().to_le_bytes());
                put_bytes(s, message);
            }
        }
    }
}

/// Where an encoder writes.
pub(crate) trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

struct Counter(usize);

impl Sink for Counter {
    fn put(&mut self, bytes: &[u8]) {
        self.0 = self.0.saturating_add(bytes.len());
    }
}

/// Writes into a slice already checked to be exactly the payload's length.
struct SliceSink<'b> {
    out: &'b mut [u8],
    pos: usize,
}

impl Sink for SliceSink<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let end = self.pos + bytes.len();
        if let Some(dst) = self.out.get_mut(self.pos..end) {
            dst.copy_from_slice(bytes);
        }
        self.pos = end;
    }
}

#[cfg(feature = "std")]
impl Sink for std::vec::Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

fn put_bytes<S: Sink>(s: &mut S, bytes: &[u8]) {
    // A length over u32::MAX cannot fit under MAX_PAYLOAD; saturating keeps the count honest
    // enough for `payload_len` to reject it.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    s.put(&len.to_le_bytes());
    s.put(bytes);
}

fn put_list<S: Sink>(s: &mut S, list: ByteList<'_>) {
    let count = u32::try_from(list.len()).unwrap_or(u32::MAX);
    s.put(&count.to_le_bytes());
    for item in list.iter() {
        put_bytes(s, item);
    }
}

/// Reads fields from a payload, checking each length against the bytes left.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let left = self.data.len() - self.pos;
        if n > left {
            return Err(DecodeError::Truncated {
                offset: self.pos,
                need: n - left,
            });
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn rest(&mut self) -> &'a [u8] {
        let out = &self.data[self.pos..];
        self.pos = self.data.len();
        out
    }

    /// A list: checks every item is within the payload, so iterating it cannot fail.
    fn list(&mut self) -> Result<ByteList<'a>, DecodeError> {
        let count = self.u32()?;
        let start = self.pos;
        for _ in 0..count {
            // Each item costs at least 4 bytes, so a huge count fails at the first missing item.
            self.bytes()?;
        }
        Ok(ByteList::Encoded {
            count,
            raw: &self.data[start..self.pos],
        })
    }
}

#[cfg(test)]
mod tests;
