//! virtio-console (device type 3) and the `virtio-console` scenario: writes
//! `testguest: virtio-console hello\n` to port 0's transmit queue (transmitq0, queue 1) and waits
//! for the device to consume it. No MULTIPORT, so only port 0 exists. Its receive queue
//! (receiveq0, queue 0) is enabled too, as Linux does, but given no buffers: nothing is read.
use crate::bootinfo::BootInfo;
use crate::serial;
use crate::tsc::Deadline;
use crate::virtio::queue::Buf;
use crate::virtio::{dma, Device, F_VERSION_1};

const DEVICE_TYPE: u16 = 3;
const RECEIVEQ0: u16 = 0;
const TRANSMITQ0: u16 = 1;
const QUEUE_MAX: u16 = 8;
pub const HELLO: &[u8] = b"testguest: virtio-console hello\n";
const TIMEOUT_MS: u64 = 5000;

/// The `virtio-console` scenario.
pub fn run(info: &BootInfo) {
    let dev = Device::open(info, DEVICE_TYPE, "virtio-console", F_VERSION_1);
    let _rx = dev.setup_queue(RECEIVEQ0, QUEUE_MAX);
    let mut tx = dev.setup_queue(TRANSMITQ0, QUEUE_MAX);
    dev.driver_ok();
    let mem = dma::alloc(HELLO.len() as u64);
    for (i, &b) in HELLO.iter().enumerate() {
        mem.write::<u8>(i as u64, b);
    }
    let msg = mem.sub(0, HELLO.len() as u64).expect("message");
    tx.add(&[Buf::of(&msg, false)]).expect("queue has room");
    tx.kick();
    if tx.wait(Deadline::after_ms(TIMEOUT_MS)).is_none() {
        dev.fail_timeout("the console write");
    }
    serial::line()
        .str("testguest: virtio-console ok bytes=")
        .dec(HELLO.len() as u64)
        .str("\n");
}
