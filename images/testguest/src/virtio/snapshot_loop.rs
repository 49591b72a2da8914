//! The `virtio-loop=N` scenario, for snapshot tests of virtio devices: initialises virtio-blk
//! and virtio-rng once, then runs N rounds on the same queues, one line each, about 100 ms
//! apart, so a test can snapshot between (or during) rounds and restore in a new process: the
//! guest never re-initialises a device, so the restored devices must continue its queues.
//!
//! Round r: one rng request (its bytes must not be one repeated byte, nor equal the previous
//! round's), a write of sector r with the disk pattern (every u64 is its disk offset XOR
//! `PATTERN`), and a read of sector r - 1 (written the round before, perhaps before the
//! snapshot) checked against the pattern. At the end: a flush, and every sector 1..=N read back.
use crate::bootinfo::BootInfo;
use crate::mmio::Region;
use crate::scenario::fail;
use crate::serial;
use crate::tsc::Deadline;
use crate::virtio::blk::{Blk, PATTERN, POISON, SECTOR, S_OK, T_IN, T_OUT};
use crate::virtio::queue::Buf;
use crate::virtio::{dma, Device, F_VERSION_1};

const RNG_TYPE: u16 = 4;
const RNG_QUEUE: u16 = 8;
const RNG_BYTES: u64 = 16;
const ROUND_MS: u64 = 100;
const TIMEOUT_MS: u64 = 10_000;

/// Writes (`T_OUT`) or reads back and checks (`T_IN`) sector `sector` through `buf`.
fn sector_io(blk: &mut Blk, kind: u32, sector: u64, buf: Region) {
    if kind == T_OUT {
        buf.fill_words(|off| (sector * SECTOR + off) ^ PATTERN);
    } else {
        buf.fill_words(|_| POISON);
    }
    let status = blk.one(kind, sector, Some(buf));
    if status != S_OK {
        blk.fail_status(0, status);
    }
    if kind == T_IN {
        for off in (0..SECTOR).step_by(8) {
            let (got, want) = (buf.read::<u64>(off), (sector * SECTOR + off) ^ PATTERN);
            if got != want {
                fail(|w| {
                    w.str("sector ")
                        .dec(sector)
                        .str(" offset ")
                        .dec(off)
                        .str(": read ")
                        .hex(got)
                        .str(", want ")
                        .hex(want);
                });
            }
        }
    }
}

/// The `virtio-loop=N` scenario.
pub fn run(info: &BootInfo, rounds: u64) {
    let mut blk = Blk::open(info);
    blk.need_sectors(rounds + 1);
    let rng = Device::open_another(info, RNG_TYPE, "virtio-rng", F_VERSION_1);
    let mut rq = rng.setup_queue(0, RNG_QUEUE);
    rng.driver_ok();
    let random = dma::alloc(RNG_BYTES).sub(0, RNG_BYTES).expect("rng buffer");
    let data = dma::alloc(SECTOR).sub(0, SECTOR).expect("sector buffer");
    let mut previous = [0u8; RNG_BYTES as usize];
    serial::line()
        .str("testguest: virtio-loop start rounds=")
        .dec(rounds)
        .str("\n");
    for round in 1..=rounds {
        random.zero();
        rq.add(&[Buf::of(&random, true)])
            .expect("rng queue has room");
        rq.kick();
        let Some((_, len)) = rq.wait(Deadline::after_ms(TIMEOUT_MS)) else {
            rng.fail_timeout("random bytes")
        };
        let mut bytes = [0u8; RNG_BYTES as usize];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = random.read::<u8>(i as u64);
        }
        if u64::from(len) != RNG_BYTES || bytes.iter().all(|&b| b == bytes[0]) || bytes == previous
        {
            fail(|w| {
                w.str("round ")
                    .dec(round)
                    .str(": rng returned ")
                    .dec(len.into())
                    .str(" bytes, first ")
                    .hex(bytes[0].into())
                    .str(" (constant or repeated)");
            });
        }
        previous = bytes;
        sector_io(&mut blk, T_OUT, round, data);
        if round > 1 {
            sector_io(&mut blk, T_IN, round - 1, data);
        }
        serial::line()
            .str("testguest: virtio-loop round=")
            .dec(round)
            .str(" ok\n");
        let next = Deadline::after_ms(ROUND_MS);
        while !next.passed() {
            core::hint::spin_loop();
        }
    }
    blk.flush();
    for sector in 1..=rounds {
        sector_io(&mut blk, T_IN, sector, data);
    }
    serial::line()
        .str("testguest: virtio-loop done rounds=")
        .dec(rounds)
        .str("\n");
}
