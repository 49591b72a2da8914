//! virtio-net (device type 1) and the `virtio-net` scenario: sends one broadcast Ethernet frame of
//! ethertype 0x88b5 (IEEE local experimental) with payload "skiff-testguest-ping", then waits up
//! to `WAIT_MS` for a frame of that ethertype whose payload starts "skiff-host-pong" (sent by a
//! responder on the host side of the tap). Other frames are ignored and their buffers reposted.
//!
//! With VERSION_1 every buffer starts with the 12-byte virtio_net_hdr (num_buffers included);
//! no offloads are negotiated, so the transmit header is all zero and receive buffers of
//! `BUF_LEN` bytes hold any frame. `NetPort` (open, send, receive) is shared with `io_loop`.
use crate::bootinfo::BootInfo;
use crate::mmio::Region;
use crate::scenario::fail;
use crate::serial;
use crate::tsc::Deadline;
use crate::virtio::queue::{Buf, Queue};
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

/// virtio-net with its receive buffers posted and one transmit frame buffer.
pub struct NetPort {
    dev: Device,
    rx: Queue,
    tx: Queue,
    mac: [u8; 6],
    rx_mem: Region,
    /// Which receive buffer each descriptor chain head is.
    buffer_of: [u8; QUEUE_MAX as usize],
    frame: Region,
    /// Frames received that the caller did not want.
    pub ignored: u64,
}

impl NetPort {
    /// Opens virtio-net (with `Device::open`, or `open_another` when `another`), posts
    /// `RX_BUFFERS` receive buffers and starts the device.
    pub fn open(info: &BootInfo, another: bool) -> NetPort {
        let features = F_VERSION_1 | F_MAC;
        let dev = if another {
            Device::open_another(info, DEVICE_TYPE, "virtio-net", features)
        } else {
            Device::open(info, DEVICE_TYPE, "virtio-net", features)
        };
        let rx = dev.setup_queue(RX_QUEUE, QUEUE_MAX);
        let tx = dev.setup_queue(TX_QUEUE, QUEUE_MAX);
        let mut mac = FALLBACK_MAC;
        if dev.features & F_MAC != 0 {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = dev.cfg_u8(i as u64);
            }
        }
        let mut port = NetPort {
            dev,
            rx,
            tx,
            mac,
            rx_mem: dma::alloc(BUF_LEN * RX_BUFFERS as u64),
            buffer_of: [0; QUEUE_MAX as usize],
            frame: dma::alloc(HDR_LEN + MIN_FRAME),
            ignored: 0,
        };
        for i in 0..RX_BUFFERS {
            port.post(i);
        }
        port.dev.driver_ok();
        port.rx.kick();
        port
    }

    fn rx_buffer(&self, i: usize) -> Region {
        self.rx_mem
            .sub(i as u64 * BUF_LEN, BUF_LEN)
            .expect("rx buffer")
    }

    /// Gives receive buffer `i` to the device (without a kick).
    fn post(&mut self, i: usize) {
        let head = self
            .rx
            .add(&[Buf::of(&self.rx_buffer(i), true)])
            .expect("rx queue has room");
        self.buffer_of[usize::from(head)] = i as u8;
    }

    /// Sends a broadcast frame of `ETHERTYPE` carrying `payload` (zero-padded to the minimum
    /// frame) and waits until the device has taken it.
    pub fn send(&mut self, payload: &[u8]) {
        let frame = self.frame;
        frame.zero();
        let put = |off: u64, bytes: &[u8]| {
            for (i, &b) in bytes.iter().enumerate() {
                frame.write::<u8>(HDR_LEN + off + i as u64, b);
            }
        };
        put(0, &[0xff; 6]);
        put(6, &self.mac);
        put(12, &ETHERTYPE.to_be_bytes());
        put(
            ETH_HDR,
            &payload[..payload.len().min((MIN_FRAME - ETH_HDR) as usize)],
        );
        self.tx
            .add(&[Buf::of(&frame, false)])
            .expect("tx queue has room");
        self.tx.kick();
        if self.tx.wait(Deadline::after_ms(TX_TIMEOUT_MS)).is_none() {
            self.dev.fail_timeout("the transmitted frame");
        }
    }

    /// Waits until `deadline` for a frame of `ETHERTYPE` whose payload starts with `prefix`;
    /// returns its length (without the virtio header). Other frames are counted in `ignored`
    /// and their buffers reposted.
    pub fn receive(&mut self, prefix: &[u8], deadline: Deadline) -> Option<u64> {
        loop {
            let (head, len) = self.rx.wait(deadline)?;
            let i = usize::from(self.buffer_of[usize::from(head)]);
            let buf = self.rx_buffer(i);
            let len = u64::from(len).min(BUF_LEN);
            let byte = |off: u64| buf.read::<u8>(HDR_LEN + off);
            let wanted = len >= HDR_LEN + ETH_HDR + prefix.len() as u64
                && u16::from_be_bytes([byte(12), byte(13)]) == ETHERTYPE
                && prefix
                    .iter()
                    .enumerate()
                    .all(|(k, &b)| byte(ETH_HDR + k as u64) == b);
            self.post(i);
            self.rx.kick();
            if wanted {
                return Some(len - HDR_LEN);
            }
            self.ignored += 1;
        }
    }
}

/// The `virtio-net` scenario.
pub fn run(info: &BootInfo) {
    let mut port = NetPort::open(info, false);
    port.send(PING);
    let Some(len) = port.receive(PONG, Deadline::after_ms(WAIT_MS)) else {
        fail(|w| {
            w.str("no pong frame within ")
                .dec(WAIT_MS / 1000)
                .str(" s (")
                .dec(port.ignored)
                .str(" other frames received)");
        })
    };
    serial::line()
        .str("testguest: virtio-net ok rx=")
        .dec(len)
        .str("\n");
}
