//! `virtio-abuse`: a driver that misprograms a virtio-rng and a virtio-blk device on purpose and
//! checks that each one refuses (the request's status byte says IOERR, or the device status gets
//! DEVICE_NEEDS_RESET) instead of hanging, crashing the VM or touching memory outside guest RAM.
//! The device is reset (status 0, read back until 0) before every attempt; the last case shows a
//! reset device works again.
//!
//! Every wait is bounded (`WAIT_MS`): a device that neither answers nor asks for a reset is a
//! FAIL, not a hang. The blk cases never write the disk, except `after-reset`, which writes
//! sector `PROOF_SECTOR` with the `blk::PATTERN` words (every u64 at disk byte offset `o` holds
//! `o ^ PATTERN`), so a host test can check that nothing else on the disk changed. The buffers
//! the bogus writes point at hold `BAIT` bytes, which must never reach the disk.
//!
//! `rig.rs` holds the raw device access the cases share, `report.rs` the result lines,
//! `transport_cases.rs` the cases that misprogram the PCI transport (queue sizes, ring addresses,
//! MSI-X vectors, queue selects, BAR accesses) and `request_cases.rs` those that post bogus
//! requests (chains, buffers, directions, lengths, sectors) and the final reset check.

mod report;
mod request_cases;
mod rig;
mod transport_cases;

use crate::bootinfo::BootInfo;
use crate::serial;
use report::Parts;
use request_cases::{after_reset, data_address, desc_loop, direction, oversized, sector_range};
use rig::Rig;
use transport_cases::{bar_access, msix_vector, queue_select, queue_size, ring_address};

const RNG: u16 = 4;
const BLK: u16 = 2;
/// Queue size the cases program (a power of two every device here offers).
const SIZE: u16 = 8;
/// Rings are allocated for at most this many entries.
const RING_MAX: u16 = 1024;
/// A guest-physical address far above any RAM.
const FAR: u64 = 0xf000_0000_0000;
/// Longest wait for an answer or for DEVICE_NEEDS_RESET.
const WAIT_MS: u64 = 2000;
const NUM_QUEUES: u64 = 0x12;
const COMMON_CFG_END: u64 = 0x38;
const CAP_ID_MSIX: u32 = 0x11;
const CAP_ID_VENDOR: u32 = 0x09;
const REG_COMMAND: u16 = 0x04;
const REG_BAR0: u16 = 0x10;
const CMD_MEMORY: u32 = 1 << 1;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const S_IOERR: u8 = 1;
const S_UNSET: u8 = 0xff;
const SECTOR: u64 = 512;
/// The sector `after-reset` writes; the only one any case may change.
const PROOF_SECTOR: u64 = 1;
/// Fills every buffer a bogus request offers the device.
const BAIT: u64 = 0x7777_7777_7777_7777;

/// The `virtio-abuse` scenario.
pub fn run(info: &BootInfo) {
    // Open both devices first: each open starts a fresh DMA arena.
    let rng_dev = Rig::open(info, RNG, "virtio-rng");
    let blk_dev = Rig::open(info, BLK, "virtio-blk");
    let mut rigs = [
        Rig::new(info, rng_dev, RNG, "rng"),
        Rig::new(info, blk_dev, BLK, "blk"),
    ];
    let mut cases = 0;
    let mut case = |name: &str, parts: Parts| {
        parts.print_ok(name);
        cases += 1;
    };
    case("queue-size", queue_size(&mut rigs));
    case("ring-address", ring_address(&mut rigs));
    case("desc-loop", desc_loop(&mut rigs[1]));
    case("data-address", data_address(&mut rigs[1]));
    case("direction", direction(&mut rigs[1]));
    case("oversized", oversized(&mut rigs[1]));
    case("sector-range", sector_range(&mut rigs[1]));
    case("msix-vector", msix_vector(&mut rigs));
    case("queue-select", queue_select(&mut rigs));
    case("bar-access", bar_access(&mut rigs));
    let [rng, blk] = &mut rigs;
    case("after-reset", after_reset(rng, blk));
    serial::line()
        .str("testguest: virtio-abuse ok cases=")
        .dec(cases)
        .str("\n");
    // Dropping the rigs resets both devices.
}
