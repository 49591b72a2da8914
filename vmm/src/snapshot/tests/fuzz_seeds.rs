//! Seeds for the `snapshot_state` and `snapshot_manifest` fuzz targets, made from the current
//! formats: a state file, whole and as a bare payload (the target frames each input both
//! ways), and a manifest. With `SKIFF_FUZZ_SEEDS_OUT=DIR` set, the tests write them to
//! `DIR/<target>/`; without it, they check the properties the targets assert on every
//! accepted input.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use crate::snapshot::manifest::{self, tests::sample};
use crate::snapshot::state_file::tests::sample_state;
use crate::snapshot::state_file::{decode, encode, HEADER_LEN};

#[test]
fn a_sample_state_file_round_trips_and_makes_the_fuzz_seeds() {
    let file = encode(&sample_state()).unwrap();
    let again = encode(&decode(&file).unwrap()).unwrap();
    assert_eq!(again, file, "a decoded and re-encoded state file differs");
    if let Some(dir) = std::env::var_os("SKIFF_FUZZ_SEEDS_OUT") {
        let dir = Path::new(&dir).join("snapshot_state");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("state-file"), &file).unwrap();
        std::fs::write(dir.join("payload"), &file[HEADER_LEN..]).unwrap();
    }
}

#[test]
fn a_sample_manifest_round_trips_and_makes_a_fuzz_seed() {
    let path = Path::new("manifest.json");
    let text = serde_json::to_vec_pretty(&sample()).unwrap();
    let m = manifest::parse(&text, path).unwrap();
    let again = serde_json::to_vec_pretty(&m).unwrap();
    assert_eq!(manifest::parse(&again, path).unwrap(), m);
    if let Some(dir) = std::env::var_os("SKIFF_FUZZ_SEEDS_OUT") {
        let dir = Path::new(&dir).join("snapshot_manifest");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("sample"), &text).unwrap();
    }
}
