//! virtio-console (device type 3) and the `virtio-console` scenario: writes
//! `testguest: virtio-console hello\n` to port 0's transmit queue (transmitq0, queue 1) and waits
//! for the device to consume it. No MULTIPORT, so only port 0 exists. Its receive queue
//! (receiveq0, queue 0) is enabled too, as Linux does, but given no buffers: nothing is read.
//! `ConsolePort` (both directions, for `io_loop` and the `agent-console` scenario) gives the
//! receive queue one buffer.
use crate::bootinfo::BootInfo;
use crate::mmio::Region;
use crate::serial;
use crate::tsc::Deadline;
use crate::virtio::queue::{Buf, Queue};
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

/// Bytes one console write or read carries at most.
const PORT_BUF: u64 = 64;

/// virtio-console port 0 with one receive buffer posted and one transmit buffer.
pub struct ConsolePort {
    dev: Device,
    rx: Queue,
    tx: Queue,
    inbuf: Region,
    outbuf: Region,
    /// Bytes the device put in `inbuf` and how many of them `read` has handed out.
    in_len: u64,
    in_taken: u64,
}

impl ConsolePort {
    /// Opens virtio-console with `Device::open_another` (keeping the DMA arena), posts the
    /// receive buffer and starts the device.
    pub fn open_another(info: &BootInfo) -> ConsolePort {
        let dev = Device::open_another(info, DEVICE_TYPE, "virtio-console", F_VERSION_1);
        let rx = dev.setup_queue(RECEIVEQ0, QUEUE_MAX);
        let tx = dev.setup_queue(TRANSMITQ0, QUEUE_MAX);
        let mut port = ConsolePort {
            dev,
            rx,
            tx,
            inbuf: dma::alloc(PORT_BUF),
            outbuf: dma::alloc(PORT_BUF),
            in_len: 0,
            in_taken: 0,
        };
        port.rx
            .add(&[Buf::of(&port.inbuf, true)])
            .expect("rx queue has room");
        port.dev.driver_ok();
        port.rx.kick();
        port
    }

    /// Writes `bytes` (at most `PORT_BUF`) and waits until the device has taken them.
    pub fn write(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(PORT_BUF as usize);
        for (i, &b) in bytes[..n].iter().enumerate() {
            self.outbuf.write::<u8>(i as u64, b);
        }
        let msg = self.outbuf.sub(0, n as u64).expect("message");
        self.tx
            .add(&[Buf::of(&msg, false)])
            .expect("tx queue has room");
        self.tx.kick();
        if self.tx.wait(Deadline::after_ms(TIMEOUT_MS)).is_none() {
            self.dev.fail_timeout("the console write");
        }
    }

    /// Waits until `deadline` for host input; returns the first byte of what arrived and posts
    /// the buffer again.
    pub fn read_byte(&mut self, deadline: Deadline) -> Option<u8> {
        let (_, len) = self.rx.wait(deadline)?;
        let first = (len > 0).then(|| self.inbuf.read::<u8>(0));
        self.rx
            .add(&[Buf::of(&self.inbuf, true)])
            .expect("rx queue has room");
        self.rx.kick();
        first
    }

    /// Writes all of `bytes`, `PORT_BUF` at a time.
    pub fn write_all(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(PORT_BUF as usize) {
            self.write(chunk);
        }
    }

    /// Host input as a byte stream: copies what arrived (waiting until `deadline` for some)
    /// into `out` and keeps the rest of the buffer for the next call; `None` on timeout. The
    /// buffer is posted again once all of it was read.
    pub fn read(&mut self, out: &mut [u8], deadline: Deadline) -> Option<usize> {
        if self.in_taken == self.in_len {
            let (_, len) = self.rx.wait(deadline)?;
            self.in_len = u64::from(len).min(self.inbuf.len());
            self.in_taken = 0;
        }
        let n = ((self.in_len - self.in_taken) as usize).min(out.len());
        for (i, b) in out[..n].iter_mut().enumerate() {
            *b = self.inbuf.read::<u8>(self.in_taken + i as u64);
        }
        self.in_taken += n as u64;
        if self.in_taken == self.in_len {
            self.in_len = 0;
            self.in_taken = 0;
            self.rx
                .add(&[Buf::of(&self.inbuf, true)])
                .expect("rx queue has room");
            self.rx.kick();
        }
        Some(n)
    }
}
