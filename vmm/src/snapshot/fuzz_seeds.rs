//! The `snapshot_state` fuzz target's seeds: a state file of the current format, whole and as a
//! bare payload (the target frames each input both ways). With `SKIFF_FUZZ_SEEDS_OUT=DIR` set,
//! the test writes them to `DIR/snapshot_state/`; without it, it checks the property the
//! target asserts on every accepted input.

#![allow(clippy::unwrap_used)]

use super::state_file::tests::sample_state;
use super::state_file::{decode, encode, HEADER_LEN};

#[test]
fn a_sample_state_file_round_trips_and_makes_the_fuzz_seeds() {
    let file = encode(&sample_state()).unwrap();
    let again = encode(&decode(&file).unwrap()).unwrap();
    assert_eq!(again, file, "a decoded and re-encoded state file differs");
    if let Some(dir) = std::env::var_os("SKIFF_FUZZ_SEEDS_OUT") {
        let dir = std::path::Path::new(&dir).join("snapshot_state");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("state-file"), &file).unwrap();
        std::fs::write(dir.join("payload"), &file[HEADER_LEN..]).unwrap();
    }
}
