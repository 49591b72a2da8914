//! Fuzz target: descriptor chains with indirect tables (empty, misaligned, nested, looping,
//! outside RAM, across the hole between regions), walked as every device walks them and fed to
//! the blk request parser and both net directions.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = devices::virtio::fuzzing::indirect_chains(data);
});
