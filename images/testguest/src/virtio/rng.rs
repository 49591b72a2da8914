//! virtio-rng (device type 4, one request queue) and the `virtio-rng` scenario: two requests of
//! `CHUNK` bytes each (re-requested until full, since a device may return fewer bytes), then
//! checks that neither chunk is one repeated byte and that the two chunks differ.
use crate::bootinfo::BootInfo;
use crate::scenario::fail;
use crate::serial;
use crate::tsc::Deadline;
use crate::virtio::queue::Buf;
use crate::virtio::{dma, Device, F_VERSION_1};

const DEVICE_TYPE: u16 = 4;
const QUEUE_MAX: u16 = 8;
const CHUNK: u64 = 64;
const CHUNKS: u64 = 2;
/// Requests per chunk before giving up on a device that keeps returning 0 bytes.
const MAX_REQUESTS: u32 = 64;
const TIMEOUT_MS: u64 = 5000;

/// The `virtio-rng` scenario.
pub fn run(info: &BootInfo) {
    let dev = Device::open(info, DEVICE_TYPE, "virtio-rng", F_VERSION_1);
    let mut q = dev.setup_queue(0, QUEUE_MAX);
    dev.driver_ok();
    let mem = dma::alloc(CHUNK * CHUNKS);
    for chunk in 0..CHUNKS {
        let mut filled = 0;
        let mut requests = 0;
        while filled < CHUNK {
            if requests == MAX_REQUESTS {
                fail(|w| {
                    w.str("only ")
                        .dec(filled)
                        .str(" of ")
                        .dec(CHUNK)
                        .str(" bytes after ")
                        .dec(MAX_REQUESTS.into())
                        .str(" requests");
                });
            }
            requests += 1;
            let want = mem
                .sub(chunk * CHUNK + filled, CHUNK - filled)
                .expect("chunk");
            q.add(&[Buf::of(&want, true)]).expect("queue has room");
            q.kick();
            let Some((_, len)) = q.wait(Deadline::after_ms(TIMEOUT_MS)) else {
                dev.fail_timeout("random bytes")
            };
            filled += u64::from(len).min(CHUNK - filled);
        }
    }
    let byte = |chunk: u64, i: u64| mem.read::<u8>(chunk * CHUNK + i);
    for chunk in 0..CHUNKS {
        if (1..CHUNK).all(|i| byte(chunk, i) == byte(chunk, 0)) {
            fail(|w| {
                w.str("request ")
                    .dec(chunk + 1)
                    .str(" returned one repeated byte ")
                    .hex(byte(chunk, 0).into());
            });
        }
    }
    if (0..CHUNK).all(|i| byte(0, i) == byte(1, i)) {
        fail(|w| {
            w.str("both requests returned the same bytes");
        });
    }
    serial::line()
        .str("testguest: virtio-rng ok bytes=")
        .dec(CHUNK * CHUNKS)
        .str("\n");
}
