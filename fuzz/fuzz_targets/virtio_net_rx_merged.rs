//! Fuzz target: virtio-net's receive path with mergeable receive buffers. The input is a queue
//! configuration byte (which also picks the frames the host side offers) and guest memory
//! holding the receive queue; the device's handler fills chains as it would from a tap.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = devices::virtio::fuzzing::net_rx_merged(data);
});
