//! Fuzz target: virtio-blk requests. The input is a queue configuration byte and guest memory
//! holding a split queue's rings, descriptors, indirect tables and buffers; every offered chain
//! goes through `request::parse` and `request::prepare` (see `devices::virtio::fuzzing`).
//! A panic (an accepted request outside guest memory or the disk) or a hang is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = devices::virtio::fuzzing::blk_requests(data);
});
