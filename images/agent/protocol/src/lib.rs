//! The skiff guest agent's wire protocol, shared by skiff (host), `skiff-agent` (Linux guest)
//! and the no_std test guest.
//!
//! A stream carries frames. Each frame is a 16-byte header (magic, version, kind, request id,
//! payload length) and a payload of at most [`MAX_PAYLOAD`] bytes. The payload of each kind is
//! laid out by hand, little-endian, so the crate needs neither `std` nor `alloc`: decoding
//! borrows from the received bytes and checks every length against what is really there.
//! Decoding never panics; any truncated, oversized or malformed input is a [`DecodeError`].
//!
//! This crate owns the byte layout only. Who answers what, and when, is described in
//! `docs/exec.md`; the agent and skiff implement it.
#![cfg_attr(not(feature = "std"), no_std)]

mod frame;
#[cfg(feature = "std")]
mod io;
mod message;

pub use frame::{DecodeError, EncodeError, Header, Kind, HEADER_LEN, MAGIC, MAX_PAYLOAD, VERSION};
#[cfg(feature = "std")]
pub use io::{encode_to_vec, read_frame, write_message, ReadFrameError};
pub use message::{ByteList, ErrorCode, ExecFlags, ExitStatus, Message, WriteFlags};

/// The vsock port the agent connects to on the host (CID 2) when it runs as PID 1.
pub const AGENT_PORT: u32 = 1024;

/// The largest data chunk (stdout, stderr, stdin, file data) a sender should put in one frame.
/// Receivers accept anything up to [`MAX_PAYLOAD`].
pub const DATA_CHUNK: usize = 32 * 1024;
