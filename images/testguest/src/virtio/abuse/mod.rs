//! `virtio-abuse`: a driver that misprograms a virtio-rng, a virtio-blk, a virtio-net and a
//! virtio-console device on purpose and checks that each one refuses (the request's status byte says IOERR, or the device status gets
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
//! requests (chains, buffers, directions, lengths, sectors) and the final reset check,
//! `ring_cases.rs` those that corrupt the rings around valid requests (indirect tables, the
//! available index, overlapping rings, buffers in the MMIO hole, the event index, writes after
//! DRIVER_OK, a reset with I/O in flight) and `pci_cases.rs` those that misprogram PCI itself
//! (MSI-X table and PBA, capability list, ROM BAR, 64-bit BAR halves).
//!
//! net and console are driven through their transmit queue (1), whose chains the device takes
//! as soon as it is kicked; net frames go to the tap, console output (newlines only) to stdout.

mod pci_cases;
mod report;
mod request_cases;
mod rig;
mod ring_cases;
mod transport_cases;

use crate::bootinfo::BootInfo;
use crate::serial;
use pci_cases::{config_space, msix_table};
use report::Parts;
use request_cases::{after_reset, data_address, desc_loop, direction, oversized, sector_range};
use rig::Rig;
use ring_cases::{
    avail_far_ahead, driver_ok_writes, indirect, mmio_hole, reset_in_flight, smp_kicks,
    used_event, used_overlap,
};
use transport_cases::{bar_access, msix_vector, queue_select, queue_size, ring_address};

const NET: u16 = 1;
const BLK: u16 = 2;
const CONSOLE: u16 = 3;
const RNG: u16 = 4;
/// `VIRTIO_RING_F_INDIRECT_DESC`, negotiated by every rig.
const F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX`, negotiated for the `used-event` case.
const F_EVENT_IDX: u64 = 1 << 29;
const DESC_F_INDIRECT: u16 = 4;
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
    // Open every device first: each open starts a fresh DMA arena.
    let rng_dev = Rig::open(info, RNG, "virtio-rng");
    let blk_dev = Rig::open(info, BLK, "virtio-blk");
    let net_dev = Rig::open(info, NET, "virtio-net");
    let console_dev = Rig::open(info, CONSOLE, "virtio-console");
    let mut rigs = [
        Rig::new(info, rng_dev, RNG, "rng"),
        Rig::new(info, blk_dev, BLK, "blk"),
        Rig::new(info, net_dev, NET, "net"),
        Rig::new(info, console_dev, CONSOLE, "console"),
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
    case("indirect", indirect(&mut rigs));
    case("avail-far-ahead", avail_far_ahead(&mut rigs));
    case("used-overlap", used_overlap(&mut rigs));
    case("mmio-hole", mmio_hole(&mut rigs[1]));
    case("used-event", used_event(&mut rigs[1]));
    case("driver-ok-writes", driver_ok_writes(&mut rigs));
    case("reset-in-flight", reset_in_flight(&mut rigs[1]));
    case("smp-kicks", smp_kicks(info, &mut rigs[1]));
    case("msix-table", msix_table(info, &mut rigs));
    case("config-space", config_space(info, &mut rigs));
    let [rng, blk, ..] = &mut rigs;
    case("after-reset", after_reset(rng, blk));
    serial::line()
        .str("testguest: virtio-abuse ok cases=")
        .dec(cases)
        .str("\n");
    // Dropping the rigs resets the devices.
}
