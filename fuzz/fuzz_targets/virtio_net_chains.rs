//! Fuzz target: virtio-net frames. The input is a queue configuration byte (which picks the
//! receive or the transmit queue) and guest memory holding the queue; every offered chain is
//! gathered (`gather_tx`) or filled (`scatter_rx`) as the device would.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = devices::virtio::fuzzing::net_chains(data);
});
