//! The virtio-vsock packet header (`struct virtio_vsock_hdr`, 44 bytes, little-endian) and the
//! copies between descriptor chains and host buffers. Every chain is untrusted: direction,
//! lengths and guest addresses are checked, and guest memory is touched only through
//! `vm-memory` accessors (which also mark written pages dirty).
//!
//! A transmit chain is all device-readable: the header, then `len` payload bytes, split across
//! descriptors any way the driver likes. A receive chain is all device-writable and gets a
//! header and at most the chain's room less the header in payload.

use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::MAX_PAYLOAD;

/// Size of the header.
pub const HEADER_LEN: usize = 44;

/// `type` of a stream socket (the only type this device offers).
pub const TYPE_STREAM: u16 = 1;

/// Operations.
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// `flags` of `OP_SHUTDOWN`: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `flags` of `OP_SHUTDOWN`: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// One packet header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn u32_at(b: &[u8; HEADER_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; HEADER_LEN], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | u64::from(u32_at(b, at + 4)) << 32
}

impl Header {
    /// Decodes a header.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Self {
        Self {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            kind: u16::from_le_bytes([b[28], b[29]]),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a chain could not be used. It is returned to the driver with length 0.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ChainError {
    /// A descriptor of the wrong direction for its queue.
    #[error("chain {head}: descriptor at {addr:#x} has the wrong direction for this queue")]
    WrongDirection {
        /// Head descriptor index.
        head: u16,
        /// The descriptor's guest address.
        addr: u64,
    },
    /// Fewer bytes than a header.
    #[error("chain {head}: {len} bytes, less than the {HEADER_LEN}-byte header")]
    TooShort {
        /// Head descriptor index.
        head: u16,
        /// Total chain length.
        len: u64,
    },
    /// A header whose `len` is larger than the largest packet or than the chain holds.
    #[error("chain {head}: header says {len} payload bytes, the chain holds {room} (at most {MAX_PAYLOAD})")]
    BadLength {
        /// Head descriptor index.
        head: u16,
        /// The header's `len`.
        len: u32,
        /// Payload bytes the chain holds.
        room: u64,
    },
    /// A buffer outside guest memory.
    #[error("chain {head}: buffer {addr:#x}+{len:#x} is not in guest memory")]
    OutOfMemory {
        /// Head descriptor index.
        head: u16,
        /// The descriptor's guest address.
        addr: u64,
        /// The descriptor's length.
        len: u32,
    },
}

/// Reads a transmit chain: the header, and its payload into `payload` (which holds at least
/// `MAX_PAYLOAD` bytes). Returns the header and the payload length (`header.len`).
pub fn read_tx<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    payload: &mut [u8],
) -> Result<(Header, usize), ChainError> {
    let head = chain.head_index();
    let mut header = [0u8; HEADER_LEN];
    let mut have_header = 0usize;
    let mut parsed: Option<Header> = None;
    let mut want = 0usize;
    let mut got = 0usize;
    let mut total: u64 = 0;
    for desc in chain {
        let addr = desc.addr().0;
        if desc.is_write_only() {
            return Err(ChainError::WrongDirection { head, addr });
        }
        total += u64::from(desc.len());
        let mut at = 0usize;
        let len = desc.len() as usize;
        let oom = ChainError::OutOfMemory {
            head,
            addr,
            len: desc.len(),
        };
        if have_header < HEADER_LEN {
            let n = (HEADER_LEN - have_header).min(len);
            mem.read_slice(
                &mut header[have_header..have_header + n],
                GuestAddress(addr),
            )
            .map_err(|_| oom.clone())?;
            have_header += n;
            at = n;
            if have_header == HEADER_LEN {
                let h = Header::decode(&header);
                want = h.len as usize;
                if want > MAX_PAYLOAD || want > payload.len() {
                    return Err(ChainError::BadLength {
                        head,
                        len: h.len,
                        room: total - HEADER_LEN as u64,
                    });
                }
                parsed = Some(h);
            }
        }
        if parsed.is_some() && got < want && at < len {
            let n = (want - got).min(len - at);
            let from = addr.checked_add(at as u64).ok_or(oom.clone())?;
            mem.read_slice(&mut payload[got..got + n], GuestAddress(from))
                .map_err(|_| oom)?;
            got += n;
        }
    }
    let Some(h) = parsed else {
        return Err(ChainError::TooShort { head, len: total });
    };
    if got < want {
        return Err(ChainError::BadLength {
            head,
            len: h.len,
            room: got as u64,
        });
    }
    Ok((h, want))
}

/// The payload room of a receive chain (its writable bytes less the header), capped at
/// `MAX_PAYLOAD`.
pub fn rx_room<M: GuestMemory>(chain: &DescriptorChain<&M>) -> Result<usize, ChainError> {
    let head = chain.head_index();
    let mut total: u64 = 0;
    for desc in chain.clone() {
        if !desc.is_write_only() {
            return Err(ChainError::WrongDirection {
                head,
                addr: desc.addr().0,
            });
        }
        total += u64::from(desc.len());
    }
    if total < HEADER_LEN as u64 {
        return Err(ChainError::TooShort { head, len: total });
    }
    let room = (total - HEADER_LEN as u64).min(MAX_PAYLOAD as u64);
    Ok(room as usize)
}

/// Writes `header` and `payload` into a receive chain checked with `rx_room`; returns the bytes
/// written (the used length).
pub fn write_rx<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    header: &Header,
    payload: &[u8],
) -> Result<u32, ChainError> {
    let head = chain.head_index();
    let encoded = header.encode();
    let parts: [&[u8]; 2] = [&encoded, payload];
    let mut part = 0usize;
    let mut offset = 0usize;
    let mut written: u32 = 0;
    for desc in chain {
        let addr = desc.addr().0;
        let len = desc.len() as usize;
        let mut at = 0usize;
        while at < len && part < parts.len() {
            let src = &parts[part][offset..];
            let n = src.len().min(len - at);
            let oom = ChainError::OutOfMemory {
                head,
                addr,
                len: desc.len(),
            };
            let to = addr.checked_add(at as u64).ok_or(oom.clone())?;
            mem.write_slice(&src[..n], GuestAddress(to))
                .map_err(|_| oom)?;
            at += n;
            offset += n;
            written += n as u32;
            if offset == parts[part].len() {
                part += 1;
                offset = 0;
            }
        }
        if part + 1 == parts.len() && payload.is_empty() {
            part += 1;
        }
        if part == parts.len() {
            break;
        }
    }
    if part + 1 == parts.len() && payload.is_empty() {
        part += 1;
    }
    if part < parts.len() {
        return Err(ChainError::TooShort {
            head,
            len: u64::from(written),
        });
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 0xdead_beef,
            len: 77,
            kind: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 65536,
            fwd_cnt: 0xffff_fff0,
        };
        let b = h.encode();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(Header::decode(&b), h);
    }
}
