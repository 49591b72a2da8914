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
use core::arch::asm;
use core::hint::spin_loop;
use core::sync::atomic::{fence, Ordering};

use super::{
    dma, Device, CONFIG_GENERATION, DEVICE_FEATURE, DEVICE_FEATURE_SELECT, DEVICE_STATUS,
    F_VERSION_1, MODERN_ID_BASE, MSIX_CONFIG, NO_VECTOR, QUEUE_DESC, QUEUE_DEVICE, QUEUE_DRIVER,
    QUEUE_ENABLE, QUEUE_MSIX_VECTOR, QUEUE_NOTIFY_OFF, QUEUE_SELECT, QUEUE_SIZE,
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_NEEDS_RESET, VENDOR,
};
use crate::bootinfo::BootInfo;
use crate::mmio::Region;
use crate::pci::Pci;
use crate::scenario::fail;
use crate::serial;
use crate::tsc::Deadline;
use crate::virtio::blk::PATTERN;

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

/// One descriptor: address, length, flags, next.
type Desc = (u64, u32, u16, u16);

/// A blk request case: name, type, data buffers (address, length, flags), how many are used.
type BlkCase = (&'static str, u32, [(u64, u32, u16); 2], usize);

/// What a device did with a posted chain.
#[derive(Clone, Copy)]
enum Outcome {
    /// Returned it in the used ring with this length.
    Used(u32),
    /// Set DEVICE_NEEDS_RESET without returning it.
    NeedsReset,
    /// Neither, within `WAIT_MS`.
    Timeout,
}

/// One `key=value[:number]` item of a result line.
#[derive(Clone, Copy)]
struct Part {
    key: &'static str,
    val: &'static str,
    num: Option<u64>,
}

/// The items of one result line.
struct Parts {
    items: [Part; 24],
    len: usize,
}

impl Parts {
    fn new() -> Parts {
        let empty = Part {
            key: "",
            val: "",
            num: None,
        };
        Parts {
            items: [empty; 24],
            len: 0,
        }
    }

    fn add(&mut self, key: &'static str, val: &'static str, num: Option<u64>) {
        if self.len < self.items.len() {
            self.items[self.len] = Part { key, val, num };
            self.len += 1;
        }
    }

    /// Prints `testguest: virtio-abuse <case> ok (<parts>)`.
    fn print_ok(&self, case: &str) {
        let mut w = serial::line();
        w.str("testguest: virtio-abuse ").str(case).str(" ok (");
        for (i, p) in self.items[..self.len].iter().enumerate() {
            if i > 0 {
                w.str(" ");
            }
            w.str(p.key).str("=").str(p.val);
            match (p.val.is_empty(), p.num) {
                (_, None) => {}
                (true, Some(n)) => {
                    w.hex(n);
                }
                (false, Some(n)) => {
                    w.str(":").hex(n);
                }
            }
        }
        w.str(")\n");
    }
}

/// Fails the scenario with `case: <device> <what> <detail> <number>`.
fn fail_case(case: &str, dev: &str, what: &str, detail: &str, num: u64) -> ! {
    fail(|w| {
        w.str(case)
            .str(": ")
            .str(dev)
            .str(" ")
            .str(what)
            .str(": ")
            .str(detail)
            .str(" ")
            .hex(num);
    })
}

/// Memory for virtio-blk requests: header and status byte, and data buffers.
struct BlkMem {
    /// Header at 0 (16 bytes), status byte at 16.
    hdr: Region,
    /// Three pages of `BAIT` (bogus requests) or proof data.
    data: Region,
    capacity: u64,
}

/// One device with raw access to its registers and a split queue 0 the cases corrupt at will.
struct Rig {
    dev: Device,
    name: &'static str,
    wanted: u64,
    /// Queue 0's maximum size.
    max: u16,
    num_queues: u16,
    desc: Region,
    avail: Region,
    used: Region,
    notify: Region,
    avail_idx: u16,
    used_idx: u16,
    /// BAR holding the common configuration, and its size.
    bar: u64,
    bar_size: u64,
    /// MSI-X table size (0 without MSI-X).
    msix_table: u16,
    /// End of the RAM range holding the rings.
    ram_end: u64,
    blk: Option<BlkMem>,
}

impl Rig {
    /// Opens the device (reset, features negotiated, no queue yet). Allocates nothing: opening
    /// the next device starts a fresh DMA arena.
    fn open(info: &BootInfo, device_type: u16, name: &'static str) -> Device {
        Device::open(info, device_type, name, F_VERSION_1)
    }

    /// Finds the PCI details and allocates rings and buffers for `dev`.
    fn new(info: &BootInfo, dev: Device, device_type: u16, name: &'static str) -> Rig {
        let c = dev.common;
        c.write::<u16>(QUEUE_SELECT, 0);
        let max = c.read::<u16>(QUEUE_SIZE);
        if max < SIZE {
            fail_case("setup", name, "queue 0", "is smaller than 8:", max.into());
        }
        let num_queues = c.read::<u16>(NUM_QUEUES);
        let notify_off =
            u64::from(c.read::<u16>(QUEUE_NOTIFY_OFF)) * u64::from(dev.notify_multiplier);
        let Some(notify) = dev.notify.sub(notify_off, 2) else {
            fail_case(
                "setup",
                name,
                "queue 0",
                "notify offset outside the region",
                notify_off,
            )
        };
        let (bar, bar_size, msix_table) = pci_details(info, device_type, dev.common.base());
        let n = u64::from(max.min(RING_MAX));
        let desc = dma::alloc(16 * n);
        let avail = dma::alloc(6 + 2 * n);
        let used = dma::alloc(6 + 8 * n);
        let ram_end = info
            .ram()
            .iter()
            .find(|r| r.start <= desc.base() && desc.base() < r.end)
            .map_or(0, |r| r.end);
        let blk = (device_type == BLK).then(|| BlkMem {
            hdr: dma::alloc(64),
            data: dma::alloc(3 * 4096),
            capacity: dev.cfg_u64(0),
        });
        Rig {
            dev,
            name,
            wanted: F_VERSION_1,
            max,
            num_queues,
            desc,
            avail,
            used,
            notify,
            avail_idx: 0,
            used_idx: 0,
            bar,
            bar_size,
            msix_table,
            ram_end,
            blk,
        }
    }

    fn status(&self) -> u8 {
        self.dev.common.read::<u8>(DEVICE_STATUS)
    }

    fn needs_reset(&self) -> bool {
        self.status() & STATUS_NEEDS_RESET != 0
    }

    /// Resets the device (waiting for status 0), negotiates features again and clears the rings.
    fn restart(&mut self) {
        self.dev.reset();
        if self.status() != 0 {
            fail_case(
                "reset",
                self.name,
                "status",
                "not 0 after reset:",
                self.status().into(),
            );
        }
        self.dev.set_status(STATUS_ACKNOWLEDGE);
        self.dev.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.dev.negotiate(self.wanted);
        self.dev.common.write::<u16>(MSIX_CONFIG, NO_VECTOR);
        self.desc.zero();
        self.avail.zero();
        self.used.zero();
        self.avail_idx = 0;
        self.used_idx = 0;
    }

    fn rings(&self) -> (u64, u64, u64) {
        (self.desc.base(), self.avail.base(), self.used.base())
    }

    /// Programs queue 0 (size `size` unless `None`) with these ring addresses and enables it.
    fn program(&self, size: Option<u16>, (desc, avail, used): (u64, u64, u64)) {
        let c = self.dev.common;
        c.write::<u16>(QUEUE_SELECT, 0);
        if let Some(size) = size {
            c.write::<u16>(QUEUE_SIZE, size);
        }
        c.write::<u16>(QUEUE_MSIX_VECTOR, NO_VECTOR);
        for (reg, addr) in [
            (QUEUE_DESC, desc),
            (QUEUE_DRIVER, avail),
            (QUEUE_DEVICE, used),
        ] {
            c.write::<u32>(reg, addr as u32);
            c.write::<u32>(reg + 4, (addr >> 32) as u32);
        }
        c.write::<u16>(QUEUE_ENABLE, 1);
    }

    fn driver_ok(&self) {
        self.dev.driver_ok();
    }

    /// Reset, a valid queue 0 of `SIZE` entries, DRIVER_OK; fails if the device is unhappy.
    fn start(&mut self, case: &str) {
        self.restart();
        self.program(Some(SIZE), self.rings());
        self.driver_ok();
        let status = self.status();
        if status & STATUS_DRIVER_OK == 0 || status & STATUS_NEEDS_RESET != 0 {
            fail_case(
                case,
                self.name,
                "valid set-up",
                "gave status",
                status.into(),
            );
        }
    }

    /// Writes `descs` as descriptors 0.. (the chain's shape is the caller's), offers descriptor
    /// 0 and notifies the device.
    fn post(&mut self, descs: &[Desc]) {
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = 16 * i as u64;
            self.desc.write::<u64>(d, addr);
            self.desc.write::<u32>(d + 8, len);
            self.desc.write::<u16>(d + 12, flags);
            self.desc.write::<u16>(d + 14, next);
        }
        let slot = u64::from(self.avail_idx % SIZE);
        self.avail.write::<u16>(4 + 2 * slot, 0);
        fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.avail.write::<u16>(2, self.avail_idx);
        fence(Ordering::SeqCst);
        self.notify.write::<u16>(0, 0);
    }

    /// Polls the used ring (and, every few thousand polls, the device status) for `WAIT_MS`.
    fn wait(&mut self) -> Outcome {
        let deadline = Deadline::after_ms(WAIT_MS);
        let mut polls = 0u32;
        loop {
            if self.used.read::<u16>(2) != self.used_idx {
                fence(Ordering::Acquire);
                let slot = u64::from(self.used_idx % SIZE);
                self.used_idx = self.used_idx.wrapping_add(1);
                return Outcome::Used(self.used.read::<u32>(8 + 8 * slot));
            }
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(4096) && self.needs_reset() {
                return Outcome::NeedsReset;
            }
            if deadline.passed() {
                return match self.needs_reset() {
                    true => Outcome::NeedsReset,
                    false => Outcome::Timeout,
                };
            }
            spin_loop();
        }
    }

    /// A request the device should serve: rng 64 bytes, blk a one-sector read of sector 0.
    fn post_valid(&mut self) {
        let chain: [Desc; 3];
        let n = match &self.blk {
            None => {
                let buf = self.desc.base() + 2048;
                chain = [(buf, 64, DESC_F_WRITE, 0), (0, 0, 0, 0), (0, 0, 0, 0)];
                1
            }
            Some(m) => {
                m.hdr.write::<u32>(0, T_IN);
                m.hdr.write::<u32>(4, 0);
                m.hdr.write::<u64>(8, 0);
                m.hdr.write::<u8>(16, S_UNSET);
                chain = [
                    (m.hdr.base(), 16, DESC_F_NEXT, 1),
                    (m.data.base(), 512, DESC_F_WRITE | DESC_F_NEXT, 2),
                    (m.hdr.base() + 16, 1, DESC_F_WRITE, 0),
                ];
                3
            }
        };
        self.post(&chain[..n]);
    }

    fn mem(&self) -> &BlkMem {
        self.blk.as_ref().expect("a blk rig")
    }

    /// Fills the data buffers with `BAIT`.
    fn bait(&self) {
        self.mem().data.fill_words(|_| BAIT);
    }

    /// Starts the device and posts header (type `kind`, `sector`), `data`, status byte.
    fn blk_request(
        &mut self,
        case: &str,
        kind: u32,
        sector: u64,
        data: &[(u64, u32, u16)],
    ) -> Outcome {
        self.start(case);
        self.bait();
        let m = self.mem();
        let (hdr, status) = (m.hdr.base(), m.hdr.base() + 16);
        m.hdr.write::<u32>(0, kind);
        m.hdr.write::<u32>(4, 0);
        m.hdr.write::<u64>(8, sector);
        m.hdr.write::<u8>(16, S_UNSET);
        let mut chain = [(0u64, 0u32, 0u16, 0u16); 6];
        chain[0] = (hdr, 16, DESC_F_NEXT, 1);
        let mut n = 1;
        for &(addr, len, flags) in data.iter().take(4) {
            chain[n] = (addr, len, flags | DESC_F_NEXT, n as u16 + 1);
            n += 1;
        }
        chain[n] = (status, 1, DESC_F_WRITE, 0);
        self.post(&chain[..=n]);
        self.wait()
    }

    /// The blk status byte, or what else happened.
    fn refused(&mut self, case: &str, what: &str, outcome: Outcome) -> &'static str {
        match outcome {
            Outcome::Used(_) => match self.mem().hdr.read::<u8>(16) {
                S_IOERR => "ioerr",
                s => fail_case(case, self.name, what, "completed with status", s.into()),
            },
            Outcome::NeedsReset => "needs-reset",
            Outcome::Timeout => fail_case(
                case,
                self.name,
                what,
                "no answer and no NEEDS_RESET, status",
                self.status().into(),
            ),
        }
    }

    /// Posts a hand-made chain on a freshly started blk device; IOERR or NEEDS_RESET expected.
    fn bad_chain(&mut self, case: &str, what: &str, chain: &[Desc]) -> &'static str {
        self.start(case);
        self.bait();
        let m = self.mem();
        m.hdr.write::<u32>(0, T_IN);
        m.hdr.write::<u64>(8, 0);
        m.hdr.write::<u8>(16, S_UNSET);
        self.post(chain);
        let outcome = self.wait();
        self.refused(case, what, outcome)
    }
}

/// BAR address and size of the BAR holding the common configuration at `common`, and the MSI-X
/// table size, of the first device `1af4:(1040 + device_type)`.
fn pci_details(info: &BootInfo, device_type: u16, common: u64) -> (u64, u64, u16) {
    let pci = Pci::new(info);
    let Some(f) = pci.find(VENDOR, MODERN_ID_BASE + device_type) else {
        fail_case(
            "setup",
            "virtio",
            "device",
            "vanished from PCI, type",
            device_type.into(),
        )
    };
    let mut msix_table = 0;
    let mut bar_index = None;
    for (at, dword) in pci.capabilities(f.dev) {
        if dword & 0xff == CAP_ID_MSIX {
            msix_table = ((dword >> 16) & 0x7ff) as u16 + 1;
        }
        if dword & 0xff == CAP_ID_VENDOR && dword >> 24 == 1 && bar_index.is_none() {
            bar_index = Some((pci.read(f.dev, at + 4) & 0xff) as usize);
        }
    }
    let bars = pci.enable(&f);
    let index = bar_index.unwrap_or(0).min(5);
    let base = bars[index];
    // Size the BAR with memory decoding off, then put everything back.
    let reg = REG_BAR0 + 4 * index as u16;
    let command = pci.read(f.dev, REG_COMMAND) & 0xffff;
    pci.write(f.dev, REG_COMMAND, command & !CMD_MEMORY);
    let low = pci.read(f.dev, reg);
    pci.write(f.dev, reg, u32::MAX);
    let mask = pci.read(f.dev, reg) & !0xf;
    pci.write(f.dev, reg, low);
    pci.write(f.dev, REG_COMMAND, command);
    let size = u64::from((!mask).wrapping_add(1));
    if base == 0 || common < base || size == 0 || common >= base + size {
        fail_case(
            "setup",
            "virtio",
            "common configuration",
            "not inside its BAR at",
            base,
        );
    }
    (base, size, msix_table)
}

// Raw MMIO at any alignment, for the BAR cases (`Region` insists on natural alignment).

fn raw_read(addr: u64, width: u32) -> u64 {
    let v: u64;
    // SAFETY: `addr` lies in the identity-mapped, uncached MMIO hole (a device BAR or the space
    // next to it); a load there has no effect on any Rust object.
    unsafe {
        match width {
            1 => {
                asm!("movzx {0:e}, byte ptr [{1}]", out(reg) v, in(reg) addr, options(nostack, preserves_flags))
            }
            2 => {
                asm!("movzx {0:e}, word ptr [{1}]", out(reg) v, in(reg) addr, options(nostack, preserves_flags))
            }
            4 => {
                asm!("mov {0:e}, dword ptr [{1}]", out(reg) v, in(reg) addr, options(nostack, preserves_flags))
            }
            _ => {
                asm!("mov {0}, qword ptr [{1}]", out(reg) v, in(reg) addr, options(nostack, preserves_flags))
            }
        }
    }
    v
}

fn raw_write(addr: u64, width: u32, v: u64) {
    // SAFETY: as for `raw_read`; the store reaches a device register, never a Rust object.
    unsafe {
        match width {
            1 => {
                asm!("mov byte ptr [{1}], {0:l}", in(reg) v, in(reg) addr, options(nostack, preserves_flags))
            }
            2 => {
                asm!("mov word ptr [{1}], {0:x}", in(reg) v, in(reg) addr, options(nostack, preserves_flags))
            }
            4 => {
                asm!("mov dword ptr [{1}], {0:e}", in(reg) v, in(reg) addr, options(nostack, preserves_flags))
            }
            _ => {
                asm!("mov qword ptr [{1}], {0}", in(reg) v, in(reg) addr, options(nostack, preserves_flags))
            }
        }
    }
}

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

/// Case 1: queue_size 3, then enable and DRIVER_OK: NEEDS_RESET, or the size write refused.
fn queue_size(rigs: &mut [Rig; 2]) -> Parts {
    let mut p = Parts::new();
    for r in rigs.iter_mut() {
        r.restart();
        let c = r.dev.common;
        c.write::<u16>(QUEUE_SELECT, 0);
        c.write::<u16>(QUEUE_SIZE, 3);
        let back = c.read::<u16>(QUEUE_SIZE);
        let at_write = r.needs_reset();
        // Carry on as a driver that did not look.
        r.program(None, r.rings());
        r.driver_ok();
        let at_driver_ok = r.needs_reset();
        let what = match (at_write, at_driver_ok) {
            (true, _) => "needs-reset-at-write",
            (false, true) => "needs-reset-at-driver-ok",
            (false, false) if back != 3 => "size-refused",
            _ => fail_case(
                "queue-size",
                r.name,
                "size 3",
                "accepted, reads back",
                back.into(),
            ),
        };
        p.add(r.name, what, None);
        p.add("size-reads", "", Some(back.into()));
    }
    for r in rigs.iter_mut() {
        r.restart();
    }
    p
}

/// Case 2: Rings outside guest RAM: NEEDS_RESET at enable, DRIVER_OK or the first kick.
fn ring_address(rigs: &mut [Rig; 2]) -> Parts {
    let mut p = Parts::new();
    for r in rigs.iter_mut() {
        let (d, a, u) = r.rings();
        let straddle = r.ram_end.saturating_sub(16);
        for (what, rings) in [
            ("desc", (FAR, a, u)),
            ("avail", (d, FAR, u)),
            ("used", (d, a, FAR)),
            ("used-at-ram-end", (d, a, straddle)),
        ] {
            r.restart();
            r.program(Some(SIZE), rings);
            let when = if r.needs_reset() {
                "enable"
            } else {
                r.driver_ok();
                if r.needs_reset() {
                    "driver-ok"
                } else {
                    r.post_valid();
                    match r.wait() {
                        Outcome::NeedsReset => "kick",
                        Outcome::Used(_) => fail_case(
                            "ring-address",
                            r.name,
                            what,
                            "ring outside RAM was used, status",
                            r.status().into(),
                        ),
                        Outcome::Timeout => fail_case(
                            "ring-address",
                            r.name,
                            what,
                            "no NEEDS_RESET after a kick, status",
                            r.status().into(),
                        ),
                    }
                }
            };
            p.add(r.name, what, None);
            p.add("at", when, None);
        }
        r.restart();
    }
    p
}

/// Case 3: Descriptor chains that loop or leave the table: IOERR or NEEDS_RESET.
fn desc_loop(r: &mut Rig) -> Parts {
    let mut p = Parts::new();
    let m = r.mem();
    let (hdr, data) = (m.hdr.base(), m.data.base());
    let loops: [(&'static str, [Desc; 2]); 3] = [
        (
            "two-loop",
            [
                (hdr, 16, DESC_F_NEXT, 1),
                (data, 512, DESC_F_WRITE | DESC_F_NEXT, 0),
            ],
        ),
        ("self-loop", [(hdr, 16, DESC_F_NEXT, 0), (0, 0, 0, 0)]),
        (
            "next-outside-table",
            [
                (hdr, 16, DESC_F_NEXT, 1),
                (data, 512, DESC_F_WRITE | DESC_F_NEXT, SIZE),
            ],
        ),
    ];
    for (what, chain) in loops {
        let n = if what == "self-loop" { 1 } else { 2 };
        let got = r.bad_chain("desc-loop", what, &chain[..n]);
        p.add(what, got, None);
    }
    r.restart();
    p
}

/// Case 4: Data buffers outside guest RAM: IOERR or NEEDS_RESET, nothing written to the disk.
fn data_address(r: &mut Rig) -> Parts {
    let mut p = Parts::new();
    let straddle = r.ram_end.saturating_sub(256);
    for (what, kind, addr, flags) in [
        ("out-far", T_OUT, FAR, 0),
        ("in-far", T_IN, FAR, DESC_F_WRITE),
        ("out-at-ram-end", T_OUT, straddle, 0),
        ("out-wrapping", T_OUT, u64::MAX - 255, 0),
    ] {
        let o = r.blk_request("data-address", kind, 8, &[(addr, 512, flags)]);
        p.add(what, r.refused("data-address", what, o), None);
    }
    r.restart();
    p
}

/// Case 5: Wrong directions: IOERR.
fn direction(r: &mut Rig) -> Parts {
    let mut p = Parts::new();
    let data = r.mem().data.base();
    let cases: [BlkCase; 3] = [
        ("in-device-readable", T_IN, [(data, 512, 0), (0, 0, 0)], 1),
        (
            "out-device-writable",
            T_OUT,
            [(data, 512, DESC_F_WRITE), (0, 0, 0)],
            1,
        ),
        (
            "readable-after-writable",
            T_IN,
            [(data, 512, DESC_F_WRITE), (data + 4096, 512, 0)],
            2,
        ),
    ];
    for (what, kind, bufs, n) in cases {
        let o = r.blk_request("direction", kind, 16, &bufs[..n]);
        p.add(what, r.refused("direction", what, o), None);
    }
    // A device-writable header.
    let m = r.mem();
    let (hdr, data) = (m.hdr.base(), m.data.base());
    let chain = [
        (hdr, 16, DESC_F_WRITE | DESC_F_NEXT, 1),
        (data, 512, DESC_F_WRITE | DESC_F_NEXT, 2),
        (hdr + 16, 1, DESC_F_WRITE, 0),
    ];
    p.add(
        "header-writable",
        r.bad_chain("direction", "header-writable", &chain),
        None,
    );
    r.restart();
    p
}

/// Case 6: Oversized lengths: IOERR or NEEDS_RESET.
fn oversized(r: &mut Rig) -> Parts {
    let mut p = Parts::new();
    let data = r.mem().data.base();
    let cases: [BlkCase; 4] = [
        (
            "in-4g",
            T_IN,
            [(data, 0xffff_f000, DESC_F_WRITE), (0, 0, 0)],
            1,
        ),
        ("out-4g", T_OUT, [(data, 0xffff_f000, 0), (0, 0, 0)], 1),
        (
            "in-sum-over-4g",
            T_IN,
            [
                (data, 0x8000_0000, DESC_F_WRITE),
                (data, 0x8000_0200, DESC_F_WRITE),
            ],
            2,
        ),
        ("out-not-sectors", T_OUT, [(data, 513, 0), (0, 0, 0)], 1),
    ];
    for (what, kind, bufs, n) in cases {
        let o = r.blk_request("oversized", kind, 24, &bufs[..n]);
        p.add(what, r.refused("oversized", what, o), None);
    }
    r.restart();
    p
}

/// Case 7: Sectors beyond the capacity: IOERR.
fn sector_range(r: &mut Rig) -> Parts {
    let mut p = Parts::new();
    let cap = r.mem().capacity;
    let data = r.mem().data.base();
    for (what, kind, sector, len, flags) in [
        ("in-at-capacity", T_IN, cap, 512, DESC_F_WRITE),
        ("out-across-the-end", T_OUT, cap.saturating_sub(1), 1024, 0),
        ("in-max-sector", T_IN, u64::MAX, 512, DESC_F_WRITE),
        ("out-offset-overflow", T_OUT, 1 << 55, 512, 0),
    ] {
        let o = r.blk_request("sector-range", kind, sector, &[(data, len, flags)]);
        p.add(what, r.refused("sector-range", what, o), None);
    }
    p.add("capacity", "", Some(cap));
    r.restart();
    p
}

/// Case 8: MSI-X vectors beyond the table read back as NO_VECTOR.
fn msix_vector(rigs: &mut [Rig; 2]) -> Parts {
    let mut p = Parts::new();
    for r in rigs.iter_mut() {
        r.restart();
        let c = r.dev.common;
        c.write::<u16>(QUEUE_SELECT, 0);
        let table = r.msix_table;
        let mut refused = 0u64;
        for v in [500u16, table, 0x7fff, 0xfffe] {
            if v < table {
                continue;
            }
            c.write::<u16>(QUEUE_MSIX_VECTOR, v);
            let q = c.read::<u16>(QUEUE_MSIX_VECTOR);
            c.write::<u16>(MSIX_CONFIG, v);
            let m = c.read::<u16>(MSIX_CONFIG);
            if q != NO_VECTOR {
                fail_case(
                    "msix-vector",
                    r.name,
                    "queue vector",
                    "out of range reads back",
                    q.into(),
                );
            }
            if m != NO_VECTOR {
                fail_case(
                    "msix-vector",
                    r.name,
                    "config vector",
                    "out of range reads back",
                    m.into(),
                );
            }
            refused += 1;
        }
        p.add(r.name, "no-vector", Some(refused));
        p.add("table-size", "", Some(table.into()));
        r.restart();
    }
    p
}

/// Queue selectors beyond num_queues: queue_size reads 0, writes change nothing.
fn queue_select(rigs: &mut [Rig; 2]) -> Parts {
    let mut p = Parts::new();
    for r in rigs.iter_mut() {
        r.restart();
        let c = r.dev.common;
        for sel in [r.num_queues, 0xffff] {
            c.write::<u16>(QUEUE_SELECT, sel);
            c.write::<u16>(QUEUE_SIZE, SIZE);
            c.write::<u32>(QUEUE_DESC, r.desc.base() as u32);
            c.write::<u16>(QUEUE_ENABLE, 1);
            let size = c.read::<u16>(QUEUE_SIZE);
            let enable = c.read::<u16>(QUEUE_ENABLE);
            if size != 0 || enable != 0 {
                fail_case(
                    "queue-select",
                    r.name,
                    "a missing queue",
                    "reads size|enable<<16",
                    u64::from(size) | u64::from(enable) << 16,
                );
            }
        }
        c.write::<u16>(QUEUE_SELECT, 0);
        let size0 = c.read::<u16>(QUEUE_SIZE);
        let desc0 = c.read::<u32>(QUEUE_DESC);
        if size0 != r.max || desc0 != 0 {
            fail_case(
                "queue-select",
                r.name,
                "queue 0",
                "changed by writes to a missing queue, size",
                size0.into(),
            );
        }
        p.add(r.name, "ignored", None);
        p.add("num-queues", "", Some(r.num_queues.into()));
        r.restart();
    }
    p
}

/// Case 9: Unaligned and out-of-range BAR accesses: reads give zero or all-ones, writes change
/// nothing, the VM stays up.
fn bar_access(rigs: &mut [Rig; 2]) -> Parts {
    let mut p = Parts::new();
    for r in rigs.iter_mut() {
        r.restart();
        let c = r.dev.common;
        let common = c.base();
        let status = r.status();
        c.write::<u32>(DEVICE_FEATURE_SELECT, 1);
        let features_hi = c.read::<u32>(DEVICE_FEATURE);
        let end = r.bar + r.bar_size;
        // Reads past the structure's end and at the BAR's end: zero or all-ones.
        let mut zeros = 0u64;
        for (addr, width) in [
            (common + COMMON_CFG_END + 4, 4),
            (common + 0x3f, 4),
            (common + 0x3d, 2),
            (common + 0x39, 1),
            (end - 16, 4),
            (end - 4, 4),
            (end - 8, 8),
        ] {
            let v = raw_read(addr, width);
            let ones = u64::MAX >> (64 - 8 * width);
            if v != 0 && v != ones {
                fail_case(
                    "bar-access",
                    r.name,
                    "read",
                    "at BAR offset got",
                    (addr - r.bar) << 32 | (v & 0xffff_ffff),
                );
            }
            zeros += u64::from(v == 0);
        }
        // Unaligned reads inside the structure, and a 64-bit read: any value, no crash.
        let _ = raw_read(common + 0x13, 4);
        let _ = raw_read(common + 0x01, 2);
        let _ = raw_read(common + QUEUE_DESC, 8);
        // Writes past the structure's end, at the BAR's end and just past it.
        raw_write(common + COMMON_CFG_END, 4, 0xffff_ffff);
        raw_write(common + 0x3d, 4, 0);
        raw_write(common + 0x3f, 2, 0xffff);
        raw_write(end - 16, 4, 0);
        raw_write(end - 4, 4, 0);
        // A read across the BAR's end (the next page may be another device's): any value.
        let _ = raw_read(end - 2, 4);
        let after = r.status();
        let hi_after = c.read::<u32>(DEVICE_FEATURE);
        if after != status || hi_after != features_hi {
            fail_case(
                "bar-access",
                r.name,
                "writes outside the structure",
                "changed the status to",
                after.into(),
            );
        }
        // Unaligned writes across fields inside the structure: anything may happen but a
        // crash; the reset below must still work.
        raw_write(common + CONFIG_GENERATION, 2, 0);
        raw_write(common + 0x17, 2, 0);
        let odd = r.status();
        p.add(r.name, "zero-reads", Some(zeros));
        p.add("status-after-unaligned-writes", "", Some(odd.into()));
        r.restart();
    }
    p
}

/// After all that and a reset, each device serves a valid request.
fn after_reset(rng: &mut Rig, blk: &mut Rig) -> Parts {
    let mut p = Parts::new();
    rng.start("after-reset");
    rng.post_valid();
    let buf = Region::new(rng.desc.base() + 2048, 64).expect("rng buffer");
    match rng.wait() {
        Outcome::Used(len) if len > 0 && len <= 64 => {
            let first = buf.read::<u8>(0);
            if len > 8 && (1..u64::from(len)).all(|i| buf.read::<u8>(i) == first) {
                fail_case(
                    "after-reset",
                    rng.name,
                    "request",
                    "returned one repeated byte",
                    first.into(),
                );
            }
            p.add("rng", "bytes", Some(len.into()));
        }
        Outcome::Used(len) => fail_case(
            "after-reset",
            rng.name,
            "request",
            "returned length",
            len.into(),
        ),
        _ => fail_case(
            "after-reset",
            rng.name,
            "request",
            "failed, status",
            rng.status().into(),
        ),
    }
    rng.restart();

    // Write the proof sector, then read it back.
    let base = PROOF_SECTOR * SECTOR;
    let data = blk.mem().data;
    blk.start("after-reset");
    data.fill_words(|o| (base + o) ^ PATTERN);
    let m = blk.mem();
    let (hdr, status) = (m.hdr.base(), m.hdr.base() + 16);
    let one = |rig: &mut Rig, kind: u32, buf: u64, flags: u16| {
        let m = rig.mem();
        m.hdr.write::<u32>(0, kind);
        m.hdr.write::<u32>(4, 0);
        m.hdr.write::<u64>(8, PROOF_SECTOR);
        m.hdr.write::<u8>(16, S_UNSET);
        rig.post(&[
            (hdr, 16, DESC_F_NEXT, 1),
            (buf, SECTOR as u32, flags | DESC_F_NEXT, 2),
            (status, 1, DESC_F_WRITE, 0),
        ]);
        match rig.wait() {
            Outcome::Used(_) => rig.mem().hdr.read::<u8>(16),
            _ => fail_case(
                "after-reset",
                rig.name,
                "request",
                "failed, status",
                rig.status().into(),
            ),
        }
    };
    let s = one(blk, T_OUT, data.base(), 0);
    if s != 0 {
        fail_case(
            "after-reset",
            blk.name,
            "write",
            "completed with status",
            s.into(),
        );
    }
    let back = data.sub(4096, SECTOR).expect("read buffer");
    back.zero();
    let s = one(blk, T_IN, back.base(), DESC_F_WRITE);
    if s != 0 {
        fail_case(
            "after-reset",
            blk.name,
            "read",
            "completed with status",
            s.into(),
        );
    }
    for o in (0..SECTOR).step_by(8) {
        if back.read::<u64>(o) != (base + o) ^ PATTERN {
            fail_case("after-reset", blk.name, "read back", "differs at byte", o);
        }
    }
    p.add("blk", "sector-written-and-read", Some(PROOF_SECTOR));
    blk.restart();
    p
}
