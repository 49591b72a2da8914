//! `Rig`: one virtio device driven through its raw registers, with a split queue 0 the cases
//! corrupt at will, and raw MMIO at any alignment.
use core::arch::asm;
use core::hint::spin_loop;
use core::sync::atomic::fence;
use core::sync::atomic::Ordering;

use super::report::fail_case;
use super::{
    BAIT, BLK, CAP_ID_MSIX, CAP_ID_VENDOR, CMD_MEMORY, CONSOLE, DESC_F_NEXT, DESC_F_WRITE,
    F_INDIRECT_DESC, NET, NUM_QUEUES, REG_BAR0, REG_COMMAND, RING_MAX, SIZE, S_IOERR, S_UNSET,
    T_IN, WAIT_MS,
};
use crate::bootinfo::BootInfo;
use crate::mmio::Region;
use crate::pci::Pci;
use crate::tsc::Deadline;
use crate::virtio::{
    dma, Device, DEVICE_STATUS, F_VERSION_1, MODERN_ID_BASE, MSIX_CONFIG, NO_VECTOR, QUEUE_DESC,
    QUEUE_DEVICE, QUEUE_DRIVER, QUEUE_ENABLE, QUEUE_MSIX_VECTOR, QUEUE_NOTIFY_OFF, QUEUE_SELECT,
    QUEUE_SIZE, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_NEEDS_RESET, VENDOR,
};

/// One descriptor: address, length, flags, next.
pub(super) type Desc = (u64, u32, u16, u16);

/// A blk request case: name, type, data buffers (address, length, flags), how many are used.
pub(super) type BlkCase = (&'static str, u32, [(u64, u32, u16); 2], usize);

/// What a device did with a posted chain.
#[derive(Clone, Copy)]
pub(super) enum Outcome {
    /// Returned it in the used ring with this length.
    Used(u32),
    /// Set DEVICE_NEEDS_RESET without returning it.
    NeedsReset,
    /// Neither, within `WAIT_MS`.
    Timeout,
}

/// Memory for virtio-blk requests: header and status byte, and data buffers.
pub(super) struct BlkMem {
    /// Header at 0 (16 bytes), status byte at 16.
    pub(super) hdr: Region,
    /// Three pages of `BAIT` (bogus requests) or proof data.
    pub(super) data: Region,
    pub(super) capacity: u64,
}

/// One device with raw access to its registers and a split queue 0 the cases corrupt at will.
pub(super) struct Rig {
    pub(super) dev: Device,
    pub(super) name: &'static str,
    /// virtio device type.
    pub(super) kind: u16,
    /// The queue the cases drive: 0, or the transmit queue (1) of net and console, whose
    /// chains the device takes as soon as they are offered.
    pub(super) qi: u16,
    pub(super) wanted: u64,
    /// The driven queue's maximum size.
    pub(super) max: u16,
    pub(super) num_queues: u16,
    pub(super) desc: Region,
    pub(super) avail: Region,
    pub(super) used: Region,
    pub(super) notify: Region,
    pub(super) avail_idx: u16,
    pub(super) used_idx: u16,
    /// BAR holding the common configuration, and its size.
    pub(super) bar: u64,
    pub(super) bar_size: u64,
    /// MSI-X table size (0 without MSI-X).
    pub(super) msix_table: u16,
    /// End of the RAM range holding the rings.
    pub(super) ram_end: u64,
    /// A page for the data of rng, net and console requests.
    pub(super) buf: Region,
    pub(super) blk: Option<BlkMem>,
}

impl Rig {
    /// Opens the device (reset, features negotiated, no queue yet). Allocates nothing: opening
    /// the next device starts a fresh DMA arena.
    pub(super) fn open(info: &BootInfo, device_type: u16, name: &'static str) -> Device {
        Device::open(info, device_type, name, F_VERSION_1)
    }

    /// Finds the PCI details and allocates rings and buffers for `dev`.
    pub(super) fn new(info: &BootInfo, dev: Device, device_type: u16, name: &'static str) -> Rig {
        let c = dev.common;
        let qi = u16::from(matches!(device_type, NET | CONSOLE));
        c.write::<u16>(QUEUE_SELECT, qi);
        let max = c.read::<u16>(QUEUE_SIZE);
        if max < SIZE {
            fail_case("setup", name, "queue", "is smaller than 8:", max.into());
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
        let (_, bar, bar_size, msix_table) = pci_details(info, device_type, dev.common.base());
        let n = u64::from(max.min(RING_MAX));
        let desc = dma::alloc(16 * n);
        let avail = dma::alloc(6 + 2 * n);
        let used = dma::alloc(6 + 8 * n);
        let buf = dma::alloc(4096);
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
            kind: device_type,
            qi,
            wanted: F_VERSION_1 | F_INDIRECT_DESC,
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
            buf,
            blk,
        }
    }

    pub(super) fn status(&self) -> u8 {
        self.dev.common.read::<u8>(DEVICE_STATUS)
    }

    pub(super) fn needs_reset(&self) -> bool {
        self.status() & STATUS_NEEDS_RESET != 0
    }

    /// Resets the device (waiting for status 0), negotiates features again and clears the rings.
    pub(super) fn restart(&mut self) {
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

    pub(super) fn rings(&self) -> (u64, u64, u64) {
        (self.desc.base(), self.avail.base(), self.used.base())
    }

    /// Programs the driven queue (size `size` unless `None`) with these ring addresses and enables it.
    pub(super) fn program(&self, size: Option<u16>, (desc, avail, used): (u64, u64, u64)) {
        let c = self.dev.common;
        c.write::<u16>(QUEUE_SELECT, self.qi);
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

    pub(super) fn driver_ok(&self) {
        self.dev.driver_ok();
    }

    /// Reset, a valid driven queue of `SIZE` entries, DRIVER_OK; fails if the device is unhappy.
    pub(super) fn start(&mut self, case: &str) {
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
    pub(super) fn post(&mut self, descs: &[Desc]) {
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
    pub(super) fn wait(&mut self) -> Outcome {
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

    /// A request the device should serve: rng 64 bytes, blk a one-sector read of sector 0, net
    /// a 60-byte frame (after the 12-byte header) to transmit, console one newline to print.
    pub(super) fn post_valid(&mut self) {
        let buf = self.buf.base();
        let chain: [Desc; 3];
        let n = match (&self.blk, self.kind) {
            (Some(m), _) => {
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
            (None, NET) => {
                // Header all zeros, then a broadcast frame of an unused EtherType.
                self.buf.zero();
                self.buf.write::<u32>(12, u32::MAX);
                self.buf.write::<u16>(16, u16::MAX);
                self.buf.write::<u16>(24, 0xb588);
                chain = [(buf, 72, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0)];
                1
            }
            (None, CONSOLE) => {
                self.buf.write::<u8>(0, b'\n');
                chain = [(buf, 1, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0)];
                1
            }
            (None, _) => {
                chain = [(buf, 64, DESC_F_WRITE, 0), (0, 0, 0, 0), (0, 0, 0, 0)];
                1
            }
        };
        self.post(&chain[..n]);
    }

    pub(super) fn mem(&self) -> &BlkMem {
        self.blk.as_ref().expect("a blk rig")
    }

    /// Fills the data buffers with `BAIT`.
    pub(super) fn bait(&self) {
        self.mem().data.fill_words(|_| BAIT);
    }

    /// Starts the device and posts header (type `kind`, `sector`), `data`, status byte.
    pub(super) fn blk_request(
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
    pub(super) fn refused(&mut self, case: &str, what: &str, outcome: Outcome) -> &'static str {
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
    pub(super) fn bad_chain(&mut self, case: &str, what: &str, chain: &[Desc]) -> &'static str {
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

/// PCI device number, BAR address and size of the BAR holding the common configuration at
/// `common`, and the MSI-X table size, of the first device `1af4:(1040 + device_type)`.
pub(super) fn pci_details(info: &BootInfo, device_type: u16, common: u64) -> (u8, u64, u64, u16) {
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
    (f.dev, base, size, msix_table)
}

// Raw MMIO at any alignment, for the BAR cases (`Region` insists on natural alignment).

pub(super) fn raw_read(addr: u64, width: u32) -> u64 {
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

pub(super) fn raw_write(addr: u64, width: u32, v: u64) {
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
