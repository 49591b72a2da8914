//! Fuzz target: a snapshot's `state.bin` decoder. Each input is decoded as it is (the header
//! checks), and again as the payload of a state file with a correct header and checksum, so
//! the fuzzer reaches the postcard decoding and `validate`. An accepted state must encode to a
//! file that decodes to the same encoding; a refusal must be one line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::state_file::{decode, encode, HEADER_LEN, STATE_FORMAT_VERSION, STATE_MAGIC};

fn check(bytes: &[u8]) {
    match decode(bytes) {
        Ok(state) => {
            let file = encode(&state).expect("an accepted state encodes");
            let again = decode(&file).expect("an encoded state decodes");
            assert_eq!(
                encode(&again).ok(),
                Some(file),
                "the state changed in a round trip"
            );
        }
        Err(e) => {
            let line = devices::error_chain(&e);
            assert!(!line.contains('\n'), "a multi-line error: {line:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut framed = Vec::with_capacity(HEADER_LEN + data.len());
    framed.extend_from_slice(&STATE_MAGIC);
    framed.extend_from_slice(&STATE_FORMAT_VERSION.to_le_bytes());
    framed.extend_from_slice(&(data.len() as u64).to_le_bytes());
    framed.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    framed.extend_from_slice(data);
    check(&framed);
});
