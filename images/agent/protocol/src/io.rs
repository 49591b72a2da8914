//! Reading and writing frames on `std::io` streams (skiff and the Linux agent).

use std::io::{self, Read, Write};

use crate::frame::{DecodeError, EncodeError, Header, HEADER_LEN};
use crate::message::Message;

/// Why a frame could not be read.
#[derive(Debug)]
pub enum ReadFrameError {
    /// The stream failed.
    Io(io::Error),
    /// The stream ended inside a frame (after `got` bytes of it).
    Truncated { got: usize },
    /// The bytes are not a valid frame header.
    Decode(DecodeError),
}

impl std::fmt::Display for ReadFrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadFrameError::Io(_) => write!(f, "reading a frame failed"),
            ReadFrameError::Truncated { got } => {
                write!(f, "the stream ended inside a frame, after {got} bytes")
            }
            ReadFrameError::Decode(_) => write!(f, "invalid frame"),
        }
    }
}

impl std::error::Error for ReadFrameError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ReadFrameError::Io(e) => Some(e),
            ReadFrameError::Decode(e) => Some(e),
            ReadFrameError::Truncated { .. } => None,
        }
    }
}

/// Reads one frame: returns its header with the payload in `payload` (resized to fit), or
/// `None` when the stream ends cleanly between frames. The payload is not decoded; call
/// [`Message::decode`] on it. `payload` never grows past the header's checked length.
pub fn read_frame<R: Read>(
    r: &mut R,
    payload: &mut Vec<u8>,
) -> Result<Option<Header>, ReadFrameError> {
    let mut head = [0u8; HEADER_LEN];
    let got = read_full(r, &mut head).map_err(ReadFrameError::Io)?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(ReadFrameError::Truncated { got });
    }
    let header = Header::decode(&head).map_err(ReadFrameError::Decode)?;
    payload.clear();
    payload.resize(header.len as usize, 0);
    let got = read_full(r, payload).map_err(ReadFrameError::Io)?;
    if got < payload.len() {
        return Err(ReadFrameError::Truncated {
            got: HEADER_LEN + got,
        });
    }
    Ok(Some(header))
}

/// Reads until `buf` is full or the stream ends; returns how many bytes arrived.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Encodes `msg` for request `request` into a new buffer.
pub fn encode_to_vec(msg: &Message<'_>, request: u32) -> Result<Vec<u8>, EncodeError> {
    let header = msg.header(request)?;
    let mut out = Vec::with_capacity(HEADER_LEN + header.len as usize);
    out.extend_from_slice(&header.encode());
    msg.write_payload(&mut out);
    Ok(out)
}

/// Encodes `msg` and writes the frame with one `write_all`.
pub fn write_message<W: Write>(w: &mut W, msg: &Message<'_>, request: u32) -> io::Result<()> {
    let frame =
        encode_to_vec(msg, request).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    w.write_all(&frame)
}
