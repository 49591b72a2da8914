//! Round trips of every message, and decoding of truncated, oversized and random input.

use super::*;
use crate::frame::MAGIC;

fn samples() -> [Message<'static>; 18] {
    static ARGV: [&[u8]; 3] = [b"/bin/sh", b"-c", b"echo hi"];
    static ENV: [&[u8]; 1] = [b"PATH=/bin"];
    [
        Message::Hello {
            version: 1,
            features: 0,
        },
        Message::Exec {
            flags: ExecFlags(ExecFlags::STREAM_STDIN),
            timeout_ms: 5000,
            cwd: b"/tmp",
            argv: ByteList::Items(&ARGV),
            env: ByteList::Items(&ENV),
            stdin: b"input",
        },
        Message::Stdin(b"more"),
        Message::StdinEof,
        Message::ReadFile { path: b"/etc/os" },
        Message::WriteFile {
            flags: WriteFlags(WriteFlags::APPEND),
            mode: 0o644,
            path: b"/tmp/x",
            data: b"data",
        },
        Message::Quiesce,
        Message::Resume {
            unix_time_ns: 1_700_000_000_000_000_000,
            entropy: &[7; 64],
        },
        Message::Shutdown,
        Message::Signal(15),
        Message::HelloReply {
            version: 1,
            features: 3,
            agent: b"skiff-agent 0.1.0",
        },
        Message::Started { pid: 42 },
        Message::Stdout(b"out"),
        Message::Stderr(b""),
        Message::Exit(ExitStatus::Signal(9)),
        Message::FileData(&[0, 1, 2]),
        Message::Done,
        Message::Error {
            code: ErrorCode::Spawn,
            message: b"no such file",
        },
    ]
}

fn encode(msg: &Message<'_>, request: u32) -> ([u8; 512], usize) {
    let mut buf = [0u8; 512];
    let n = msg.encode(request, &mut buf).expect("sample fits");
    (buf, n)
}

fn decode_frame(bytes: &[u8]) -> Result<(Header, Message<'_>), DecodeError> {
    let head: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(DecodeError::Truncated {
            offset: 0,
            need: HEADER_LEN,
        })?;
    let header = Header::decode(head)?;
    let end = HEADER_LEN + header.len as usize;
    let payload = bytes.get(HEADER_LEN..end).ok_or(DecodeError::Truncated {
        offset: HEADER_LEN,
        need: end.saturating_sub(bytes.len()),
    })?;
    Ok((header, Message::decode(header.kind, payload)?))
}

#[test]
fn every_message_round_trips() {
    for (i, msg) in samples().iter().enumerate() {
        let (buf, n) = encode(msg, i as u32 + 7);
        assert_eq!(n, HEADER_LEN + msg.payload_len());
        let (header, back) = decode_frame(&buf[..n]).expect("decodes");
        assert_eq!(header.request, i as u32 + 7);
        assert_eq!(header.kind, msg.kind());
        assert_eq!(&back, msg, "sample {i}");
    }
}

#[test]
fn exec_lists_iterate_after_decoding() {
    let (buf, n) = encode(&samples()[1], 1);
    let (_, msg) = decode_frame(&buf[..n]).expect("decodes");
    let Message::Exec { argv, env, .. } = msg else {
        panic!("not an exec: {msg:?}");
    };
    let args: [&[u8]; 3] = [b"/bin/sh", b"-c", b"echo hi"];
    assert!(argv.iter().eq(args.iter().copied()));
    assert_eq!(env.iter().next(), Some(&b"PATH=/bin"[..]));
}

#[test]
fn every_truncation_is_an_error() {
    for msg in samples() {
        let (buf, n) = encode(&msg, 1);
        // Payload truncated but header claiming the full length: the decoder sees a short
        // payload for a kind with fixed fields, or a frame whose length does not match.
        for cut in 0..n {
            assert!(decode_frame(&buf[..cut]).is_err(), "{msg:?} cut at {cut}");
        }
    }
}

#[test]
fn payloads_with_fields_reject_trailing_and_missing_bytes() {
    let (buf, n) = encode(&samples()[0], 1);
    let payload = &buf[HEADER_LEN..n];
    assert_eq!(
        Message::decode(Kind::Hello, &payload[..7]),
        Err(DecodeError::Truncated { offset: 4, need: 1 })
    );
    let mut longer = [0u8; 9];
    longer[..8].copy_from_slice(payload);
    assert_eq!(
        Message::decode(Kind::Hello, &longer),
        Err(DecodeError::TrailingBytes(1))
    );
    assert_eq!(
        Message::decode(Kind::Done, b"x"),
        Err(DecodeError::TrailingBytes(1))
    );
}

#[test]
fn header_rejects_bad_fields() {
    let good = Header {
        kind: Kind::Exec,
        request: 3,
        len: 10,
    }
    .encode();
    assert!(Header::decode(&good).is_ok());
    let mut h = good;
    h[0] = b'X';
    assert!(matches!(Header::decode(&h), Err(DecodeError::BadMagic(_))));
    let mut h = good;
    h[4] = 2;
    assert_eq!(Header::decode(&h), Err(DecodeError::UnsupportedVersion(2)));
    let mut h = good;
    h[5] = 0x7f;
    assert_eq!(Header::decode(&h), Err(DecodeError::UnknownKind(0x7f)));
    let mut h = good;
    h[7] = 1;
    assert_eq!(Header::decode(&h), Err(DecodeError::ReservedBits));
    let mut h = good;
    h[12..16].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
    assert_eq!(
        Header::decode(&h),
        Err(DecodeError::PayloadTooLong(MAX_PAYLOAD as u32 + 1))
    );
}

#[test]
fn bad_values_are_rejected() {
    // Exec with an empty argv.
    let none: [&[u8]; 0] = [];
    let exec = Message::Exec {
        flags: ExecFlags(0),
        timeout_ms: 0,
        cwd: b"",
        argv: ByteList::Items(&none),
        env: ByteList::Items(&none),
        stdin: b"",
    };
    let (buf, n) = encode(&exec, 1);
    assert_eq!(
        decode_frame(&buf[..n]).map(|_| ()),
        Err(DecodeError::BadValue("exec argv (empty)"))
    );
    // Unknown exec flags.
    let mut buf2 = buf;
    buf2[HEADER_LEN] = 0x80;
    assert_eq!(
        decode_frame(&buf2[..n]).map(|_| ()),
        Err(DecodeError::BadValue("exec flags"))
    );
    // Exit with an unknown tag.
    let payload = [9u8, 0, 0, 0, 0];
    assert!(Message::decode(Kind::Exit, &payload).is_err());
    // A list count far beyond the payload fails fast.
    let mut p = [0u8; 4 + 8 + 4 + 4];
    p[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        Message::decode(Kind::Exec, &p),
        Err(DecodeError::Truncated { .. })
    ));
    // Too much entropy.
    let big = [0u8; MAX_ENTROPY + 1];
    let resume = Message::Resume {
        unix_time_ns: 0,
        entropy: &big,
    };
    let mut out = [0u8; MAX_ENTROPY + 64];
    let n = resume.encode(1, &mut out).expect("encodes");
    assert_eq!(
        decode_frame(&out[..n]).map(|_| ()),
        Err(DecodeError::BadValue("resume entropy length"))
    );
}

#[test]
fn encode_checks_the_buffer() {
    let mut small = [0u8; 10];
    assert_eq!(
        Message::Started { pid: 1 }.encode(1, &mut small),
        Err(EncodeError::BufferTooSmall { need: 20, have: 10 })
    );
}

/// xorshift64*: deterministic pseudo-random bytes without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut buf = [0u8; 256];
    let kinds: [u8; 18] = [
        1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88,
    ];
    for round in 0..200_000u32 {
        let len = (rng.next() % buf.len() as u64) as usize;
        for b in buf[..len].iter_mut() {
            *b = rng.next() as u8;
        }
        // Half the rounds get a valid header prefix so the payload decoders are exercised.
        if round % 2 == 0 && len >= HEADER_LEN {
            buf[..4].copy_from_slice(&MAGIC);
            buf[4] = crate::frame::VERSION;
            buf[5] = kinds[(rng.next() % kinds.len() as u64) as usize];
            buf[6] = 0;
            buf[7] = 0;
            let plen = (len - HEADER_LEN) as u32;
            buf[12..16].copy_from_slice(&plen.to_le_bytes());
        }
        if let Ok((_, msg)) = decode_frame(&buf[..len]) {
            // Whatever decodes re-encodes to the same bytes.
            let mut out = [0u8; 512];
            let n = msg.encode(
                u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]),
                &mut out,
            );
            assert_eq!(n.map(|n| &out[..n]), Ok(&buf[..len]), "{msg:?}");
            if let Message::Exec { argv, env, .. } = msg {
                assert_eq!(argv.iter().count(), argv.len());
                assert_eq!(env.iter().count(), env.len());
            }
        }
    }
}

#[test]
fn mutated_valid_frames_never_panic() {
    let mut rng = Rng(12345);
    for msg in samples() {
        let (orig, n) = encode(&msg, 1);
        for _ in 0..5_000 {
            let mut buf = orig;
            for _ in 0..1 + rng.next() % 4 {
                let at = (rng.next() % n as u64) as usize;
                buf[at] = rng.next() as u8;
            }
            let _ = decode_frame(&buf[..n]);
        }
    }
}
