//! Fuzz target: virtio-console's queue handler over a fuzzed receive and transmit queue, with
//! host input waiting and a writer that takes or refuses the guest's output.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = devices::virtio::fuzzing::console_queues(data);
});
