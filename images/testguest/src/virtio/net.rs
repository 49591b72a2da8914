//! virtio-net (device type 1) and the `virtio-net` scenario: sends one broadcast Ethernet frame of
//! ethertype 0x88b5 (IEEE local experimental) with payload "skiff-testguest-ping", then waits up
//! to `WAIT_MS` for a frame of that ethertype whose payload starts "skiff-host-pong" (sent by a
//! responder on the host side of the tap). Other frames are ignored and their buffers reposted.
//!
//! With VERSION_1 every buffer starts with the 12-byte virtio_net_hdr (num_buffers included);
//! no offloads are negotiated, so the transmit header is all zero and receive buffers of
//! `BUF_LEN` bytes hold any frame.
use crate::bootinfo::BootInfo;
use crate::scenario::fail;
use crate::serial;
use crate::tsc::Deadline;
use crate::virtio::queue::Buf;
use crate::virtio::{dma, Device, F_VERSION_1};

const DEVICE_TYPE: u16 = 1;
const F_MAC: u64 = 1 << 5;
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const QUEUE_MAX: u16 = 64;
const HDR_LEN: u64 = 12;
const BUF_LEN: u64 = 2048;
const RX_BUFFERS: usize = 16;
/// Shortest Ethernet frame without FCS; shorter ones are zero-padded.
const MIN_FRAME: u64 = 60;
const ETH_HDR: u64 = 14;
pub const ETHERTYPE: u16 = 0x88b5;
pub const PING: &[u8] = b"skiff-testguest-ping";
pub const PONG: &[u8] = b"skiff-host-pong";
/// MAC used when the device does not offer one (locally administered).
const FALLBACK_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const TX_TIMEOUT_MS: u64 = 2000;
const WAIT_MS: u64 = 5000;

/// The `virtio-net` scenario.
pub fn run(info: &BootInfo) {
    let dev = Device::open(info, DEVICE_TYPE, "virtio-net", F_VERSION_1 | F_MAC);
    let mut rx = dev.setup_queue(RX_QUEUE, QUEUE_MAX);
    let mut tx = dev.setup_queue(TX_QUEUE, QUEUE_MAX);
    let mut mac = FALLBACK_MAC;
    if dev.features & F_MAC != 0 {
        for (i, b) in mac.iter_mut().enumerate() {
            *b = dev.cfg_u8(i as u64);
        }
    }

    // Receive buffers, each one descriptor; `buffer_of[head]` says which buffer a chain is.
    let rx_mem = dma::alloc(BUF_LEN * RX_BUFFERS as u64);
    let mut buffer_of = [0u8; QUEUE_MAX as usize];
    let rx_buffer = |i: usize| rx_mem.sub(i as u64 * BUF_LEN, BUF_LEN).expect("rx buffer");
    for i in 0..RX_BUFFERS {
        let head = rx
            .add(&[Buf::of(&rx_buffer(i), true)])
            .expect("rx queue has room");
        buffer_of[usize::from(head)] = i as u8;
    }
    dev.driver_ok();
    rx.kick();

    // The ping: zero header, broadcast destination, our MAC, ethertype, payload, zero padding.
    let frame = dma::alloc(HDR_LEN + MIN_FRAME);
    let put = |off: u64, bytes: &[u8]| {
        for (i, &b) in bytes.iter().enumerate() {
            frame.write::<u8>(HDR_LEN + off + i as u64, b);
        }
    };
    put(0, &[0xff; 6]);
    put(6, &mac);
    put(12, &ETHERTYPE.to_be_bytes());
    put(ETH_HDR, PING);
    let tx_buf = frame.sub(0, HDR_LEN + MIN_FRAME).expect("tx frame");
    tx.add(&[Buf::of(&tx_buf, false)])
        .expect("tx queue has room");
    tx.kick();
    if tx.wait(Deadline::after_ms(TX_TIMEOUT_MS)).is_none() {
        dev.fail_timeout("the transmitted frame");
    }

    let deadline = Deadline::after_ms(WAIT_MS);
    let mut ignored = 0u64;
    loop {
        let Some((head, len)) = rx.wait(deadline) else {
            fail(|w| {
                w.str("no pong frame within ")
                    .dec(WAIT_MS / 1000)
                    .str(" s (")
                    .dec(ignored)
                    .str(" other frames received)");
            })
        };
        let i = usize::from(buffer_of[usize::from(head)]);
        let buf = rx_buffer(i);
        let len = u64::from(len).min(BUF_LEN);
        let byte = |off: u64| buf.read::<u8>(HDR_LEN + off);
        let is_pong = len >= HDR_LEN + ETH_HDR + PONG.len() as u64
            && u16::from_be_bytes([byte(12), byte(13)]) == ETHERTYPE
            && PONG
                .iter()
                .enumerate()
                .all(|(k, &b)| byte(ETH_HDR + k as u64) == b);
        if is_pong {
            serial::line()
                .str("testguest: virtio-net ok rx=")
                .dec(len - HDR_LEN)
                .str("\n");
            return;
        }
        ignored += 1;
        let head = rx.add(&[Buf::of(&buf, true)]).expect("rx queue has room");
        buffer_of[usize::from(head)] = i as u8;
        rx.kick();
    }
}
