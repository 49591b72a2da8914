//! Fuzz target: a snapshot's `manifest.json` (untrusted: snapshots come from elsewhere). What
//! `manifest::parse` accepts must validate and survive being written and read again; what it
//! refuses must be explained on one line.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::manifest;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("/snapshots/fuzz/manifest.json");
    match manifest::parse(data, path) {
        Ok(m) => {
            assert!(
                m.validate().is_ok(),
                "an accepted manifest fails validation"
            );
            let text = serde_json::to_vec_pretty(&m).expect("an accepted manifest serializes");
            let again = manifest::parse(&text, path).expect("a written manifest parses");
            assert_eq!(again, m, "the manifest changed in a write and a read");
        }
        Err(e) => {
            let line = devices::error_chain(&e);
            assert!(!line.contains('\n'), "a multi-line error: {line:?}");
        }
    }
});
