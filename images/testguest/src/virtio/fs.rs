//! virtio-fs (device type 26) and the `virtio-fs=<file>` scenario. It reads the mount tag and
//! `num_request_queues` from the device configuration (tag[36], then a u32), sets up the
//! high-priority queue (0) and the first request queue (1), and speaks FUSE (`fuse.rs`) on the
//! request queue: INIT, LOOKUP of `<file>` in the root, OPEN, READ in `CHUNK`-byte pieces up to
//! end of file, RELEASE; then a FORGET of the file's node on the high-priority queue. It prints
//! the file's size, its first bytes in hex and an FNV-1a checksum of all of it, for the host to
//! compare with the file.
//!
//! Each request is one device-readable buffer (in header and arguments) and, unless it has no
//! reply, one device-writable buffer (out header and reply). Every reply is checked: the used
//! length against the buffer, the out header's length, error and unique, and the reply's size for
//! its opcode. Anything wrong fails the scenario naming the request; waits are bounded.
use crate::bootinfo::BootInfo;
use crate::mmio::Region;
use crate::pci::hex_fixed;
use crate::scenario::fail;
use crate::serial;
use crate::tsc::Deadline;
use crate::virtio::fuse;
use crate::virtio::queue::{Buf, Queue};
use crate::virtio::{dma, Device, F_VERSION_1};

const DEVICE_TYPE: u16 = 26;
const HIPRIO: u16 = 0;
const REQUEST: u16 = 1;
const QUEUE_MAX: u16 = 8;
// Device configuration: tag (NUL-padded, not NUL-terminated at full length), then a u32.
const CFG_TAG: u64 = 0;
const TAG_BYTES: usize = 36;
const CFG_NUM_REQUEST_QUEUES: u64 = 36;
/// Bytes asked for per READ.
const CHUNK: u64 = 32 << 10;
/// Longest file name the scenario sends (NAME_MAX).
const NAME_MAX: usize = 255;
/// First bytes of the file printed in hex.
const HEAD_BYTES: u64 = 32;
const TIMEOUT_MS: u64 = 10_000;
/// Written over the out header before each request, so a reply the device never wrote shows.
const POISON: u64 = 0xdead_beef_dead_beef;
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

struct Fs {
    dev: Device,
    hiprio: Queue,
    q: Queue,
    /// Device-readable: in header and arguments.
    req: Region,
    /// Device-writable: out header and reply.
    reply: Region,
    unique: u64,
}

/// The `virtio-fs=<file>` scenario.
pub fn run(info: &BootInfo, name: &[u8]) {
    if name.is_empty() || name.len() > NAME_MAX || name.iter().any(|&b| b == b'/' || b == 0) {
        fail(|w| {
            w.str("bad file name \"")
                .bytes(name)
                .str("\" (want 1 to 255 bytes, no '/')");
        });
    }
    let dev = Device::open(info, DEVICE_TYPE, "virtio-fs", F_VERSION_1);
    check_config(&dev);
    let hiprio = dev.setup_queue(HIPRIO, QUEUE_MAX);
    let q = dev.setup_queue(REQUEST, QUEUE_MAX);
    dev.driver_ok();
    let mut fs = Fs {
        dev,
        hiprio,
        q,
        req: dma::alloc(4096),
        reply: dma::alloc(fuse::OUT_HEADER + CHUNK),
        unique: 0,
    };
    fs.init();
    let (nodeid, size) = fs.lookup(name);
    let fh = fs.open(nodeid);
    fs.read_all(fh, size);
    fs.release(nodeid, fh);
    fs.forget(nodeid);
    serial::line().str("testguest: virtio-fs ok\n");
}

/// What a kernel's virtio-fs driver does when it probes the device at boot, for the `agent`
/// scenario under `skiff exec --share`/`--rootfs`: sets the first virtio-fs device up (its two
/// queues, then DRIVER_OK) if there is one, keeping the DMA arena of the devices opened before.
/// Returns the device and its queues, which the caller keeps (dropping the device resets it).
pub fn set_up_if_present(info: &BootInfo) -> Option<(Device, Queue, Queue)> {
    if !crate::virtio::present(info, DEVICE_TYPE) {
        return None;
    }
    let dev = Device::open_another(info, DEVICE_TYPE, "virtio-fs", F_VERSION_1);
    let hiprio = dev.setup_queue(HIPRIO, QUEUE_MAX);
    let requests = dev.setup_queue(REQUEST, QUEUE_MAX);
    dev.driver_ok();
    Some((dev, hiprio, requests))
}

/// Prints the tag and the request queue count; fails on an empty or unprintable tag or no
/// request queue.
fn check_config(dev: &Device) {
    let mut tag = [0u8; TAG_BYTES];
    for (i, b) in tag.iter_mut().enumerate() {
        *b = dev.cfg_u8(CFG_TAG + i as u64);
    }
    let len = tag.iter().position(|&b| b == 0).unwrap_or(TAG_BYTES);
    let requests = dev.cfg_u32(CFG_NUM_REQUEST_QUEUES);
    let printable = tag[..len].iter().all(|b| b.is_ascii_graphic());
    if len == 0 || !printable || tag[len..].iter().any(|&b| b != 0) {
        fail(|w| {
            w.str("bad tag in the device configuration (bytes");
            for &b in &tag {
                w.str(" ");
                hex_fixed(w, b.into(), 2);
            }
            w.str(")");
        });
    }
    if requests == 0 {
        fail(|w| {
            w.str("device configuration has num_request_queues=0");
        });
    }
    serial::line()
        .str("testguest: virtio-fs tag=")
        .bytes(&tag[..len])
        .str(" request-queues=")
        .dec(requests.into())
        .str("\n");
}

impl Fs {
    /// Writes the in header of a request with `args` bytes of arguments.
    fn header(&mut self, opcode: u32, nodeid: u64, args: u64) -> u64 {
        self.unique += 1;
        let r = &self.req;
        r.write::<u32>(fuse::IN_LEN, (fuse::IN_HEADER + args) as u32);
        r.write::<u32>(fuse::IN_OPCODE, opcode);
        r.write::<u64>(fuse::IN_UNIQUE, self.unique);
        r.write::<u64>(fuse::IN_NODEID, nodeid);
        r.write::<u32>(fuse::IN_UID, 0);
        r.write::<u32>(fuse::IN_GID, 0);
        r.write::<u32>(fuse::IN_PID, 1);
        r.write::<u32>(fuse::IN_EXT, 0);
        self.unique
    }

    /// Writes a u32 argument at `off` after the in header.
    fn arg_u32(&self, off: u64, v: u32) {
        self.req.write::<u32>(fuse::IN_HEADER + off, v);
    }

    /// Writes a u64 argument at `off` after the in header.
    fn arg_u64(&self, off: u64, v: u64) {
        self.req.write::<u64>(fuse::IN_HEADER + off, v);
    }

    /// Sends request `what` (header already written, `args` bytes of arguments) on the request
    /// queue with room for `reply_max` reply bytes, waits for it and checks the out header.
    /// Returns the reply's length after the out header.
    fn call(&mut self, what: &str, args: u64, reply_max: u64) -> u64 {
        let unique = self.req.read::<u64>(fuse::IN_UNIQUE);
        let request = self.req.sub(0, fuse::IN_HEADER + args).expect("request");
        let reply = self
            .reply
            .sub(0, fuse::OUT_HEADER + reply_max)
            .expect("reply");
        reply.write::<u64>(fuse::OUT_LEN, POISON);
        reply.write::<u64>(fuse::OUT_UNIQUE, POISON);
        let Some(head) = self
            .q
            .add(&[Buf::of(&request, false), Buf::of(&reply, true)])
        else {
            fail_full(what)
        };
        self.q.kick();
        let Some((done, used)) = self.q.wait(Deadline::after_ms(TIMEOUT_MS)) else {
            self.dev.fail_timeout(what)
        };
        if done != head {
            fail(|w| {
                w.str(what)
                    .str(": device completed descriptor ")
                    .dec(done.into())
                    .str(", the only one in flight is ")
                    .dec(head.into());
            });
        }
        let used = u64::from(used);
        let len = u64::from(reply.read::<u32>(fuse::OUT_LEN));
        let error = reply.read::<u32>(fuse::OUT_ERROR) as i32;
        let got_unique = reply.read::<u64>(fuse::OUT_UNIQUE);
        if used < fuse::OUT_HEADER || used > reply.len() || len != used {
            fail(|w| {
                w.str(what)
                    .str(": device wrote ")
                    .dec(used)
                    .str(" bytes into a ")
                    .dec(reply.len())
                    .str("-byte reply buffer, out header says len=")
                    .dec(len);
            });
        }
        if got_unique != unique {
            fail(|w| {
                w.str(what)
                    .str(": reply has unique ")
                    .hex(got_unique)
                    .str(", request had ")
                    .hex(unique);
            });
        }
        if error != 0 {
            fail(|w| {
                w.str(what).str(": error ");
                if error < 0 {
                    w.str("-");
                }
                w.dec(u64::from(error.unsigned_abs()));
            });
        }
        used - fuse::OUT_HEADER
    }

    /// Fails unless reply `what` is exactly `want` bytes (after the out header).
    fn expect_len(what: &str, got: u64, want: u64) {
        if got != want {
            fail(|w| {
                w.str(what)
                    .str(": reply of ")
                    .dec(got)
                    .str(" bytes, expected ")
                    .dec(want);
            });
        }
    }

    /// A u32 of the reply body at `off`.
    fn reply_u32(&self, off: u64) -> u32 {
        self.reply.read::<u32>(fuse::OUT_HEADER + off)
    }

    /// A u64 of the reply body at `off`.
    fn reply_u64(&self, off: u64) -> u64 {
        self.reply.read::<u64>(fuse::OUT_HEADER + off)
    }

    /// FUSE_INIT at 7.31; the reply must be major 7.
    fn init(&mut self) {
        self.header(fuse::INIT, 0, fuse::INIT_IN);
        self.arg_u32(fuse::INIT_IN_MAJOR, fuse::KERNEL_VERSION);
        self.arg_u32(fuse::INIT_IN_MINOR, fuse::KERNEL_MINOR);
        self.arg_u32(fuse::INIT_IN_MAX_READAHEAD, CHUNK as u32);
        self.arg_u32(fuse::INIT_IN_FLAGS, 0);
        let got = self.call("FUSE_INIT", fuse::INIT_IN, fuse::INIT_OUT);
        if got < fuse::INIT_OUT_COMPAT_22 {
            Self::expect_len("FUSE_INIT", got, fuse::INIT_OUT);
        }
        let major = self.reply_u32(fuse::INIT_OUT_MAJOR);
        let minor = self.reply_u32(fuse::INIT_OUT_MINOR);
        if major != fuse::KERNEL_VERSION {
            fail(|w| {
                w.str("FUSE_INIT: device speaks major ")
                    .dec(major.into())
                    .str(", not 7");
            });
        }
        // A 7.23+ server answers a 7.31 client with the full structure.
        let want = if minor >= 23 {
            fuse::INIT_OUT
        } else {
            fuse::INIT_OUT_COMPAT_22
        };
        Self::expect_len("FUSE_INIT", got, want);
        serial::line()
            .str("testguest: virtio-fs init major=")
            .dec(major.into())
            .str(" minor=")
            .dec(minor.into())
            .str("\n");
    }

    /// FUSE_LOOKUP of `name` in the root: the node id and size of a regular file.
    fn lookup(&mut self, name: &[u8]) -> (u64, u64) {
        let args = name.len() as u64 + 1;
        self.header(fuse::LOOKUP, fuse::ROOT_ID, args);
        for (i, &b) in name.iter().chain(&[0]).enumerate() {
            self.req.write::<u8>(fuse::IN_HEADER + i as u64, b);
        }
        let got = self.call("FUSE_LOOKUP", args, fuse::ENTRY_OUT);
        Self::expect_len("FUSE_LOOKUP", got, fuse::ENTRY_OUT);
        let nodeid = self.reply_u64(fuse::ENTRY_OUT_NODEID);
        let size = self.reply_u64(fuse::ENTRY_OUT_SIZE);
        let mode = self.reply_u32(fuse::ENTRY_OUT_MODE);
        if nodeid == 0 || nodeid == fuse::ROOT_ID {
            fail(|w| {
                w.str("FUSE_LOOKUP: node id ").dec(nodeid);
            });
        }
        if mode & fuse::S_IFMT != fuse::S_IFREG {
            fail(|w| {
                w.str("FUSE_LOOKUP: \"")
                    .bytes(name)
                    .str("\" is not a regular file (mode ")
                    .hex(mode.into())
                    .str(")");
            });
        }
        serial::line()
            .str("testguest: virtio-fs lookup ")
            .bytes(name)
            .str(" nodeid=")
            .dec(nodeid)
            .str(" size=")
            .dec(size)
            .str("\n");
        (nodeid, size)
    }

    /// FUSE_OPEN read-only: the file handle.
    fn open(&mut self, nodeid: u64) -> u64 {
        self.header(fuse::OPEN, nodeid, fuse::OPEN_IN);
        self.arg_u32(0, 0); // O_RDONLY
        self.arg_u32(4, 0);
        let got = self.call("FUSE_OPEN", fuse::OPEN_IN, fuse::OPEN_OUT);
        Self::expect_len("FUSE_OPEN", got, fuse::OPEN_OUT);
        self.reply_u64(fuse::OPEN_OUT_FH)
    }

    /// FUSE_READ from offset 0 until a read returns nothing; the total must be `size`. Prints
    /// the first bytes in hex, then the count and checksum.
    fn read_all(&mut self, fh: u64, size: u64) {
        let mut offset = 0u64;
        let mut reads = 0u64;
        let mut hash = FNV_OFFSET;
        let mut head = [0u8; HEAD_BYTES as usize];
        loop {
            self.header(fuse::READ, 0, fuse::READ_IN);
            self.arg_u64(fuse::READ_IN_FH, fh);
            self.arg_u64(fuse::READ_IN_OFFSET, offset);
            self.arg_u32(fuse::READ_IN_SIZE, CHUNK as u32);
            for off in (fuse::READ_IN_SIZE + 4..fuse::READ_IN).step_by(4) {
                self.arg_u32(off, 0);
            }
            let got = self.call("FUSE_READ", fuse::READ_IN, CHUNK);
            reads += 1;
            if got == 0 {
                break;
            }
            if offset + got > size {
                fail(|w| {
                    w.str("FUSE_READ: ")
                        .dec(offset + got)
                        .str(" bytes read from a file of ")
                        .dec(size);
                });
            }
            for i in 0..got {
                let b = self.reply.read::<u8>(fuse::OUT_HEADER + i);
                hash = (hash ^ u64::from(b)).wrapping_mul(FNV_PRIME);
                if let Some(slot) = head.get_mut((offset + i) as usize) {
                    *slot = b;
                }
            }
            offset += got;
        }
        if offset != size {
            fail(|w| {
                w.str("FUSE_READ: end of file after ")
                    .dec(offset)
                    .str(" bytes, LOOKUP said ")
                    .dec(size);
            });
        }
        let mut w = serial::line();
        w.str("testguest: virtio-fs head ");
        for &b in &head[..offset.min(HEAD_BYTES) as usize] {
            hex_fixed(&mut w, b.into(), 2);
        }
        w.str("\ntestguest: virtio-fs read bytes=")
            .dec(offset)
            .str(" reads=")
            .dec(reads)
            .str(" fnv1a=");
        hex_fixed(&mut w, hash, 16);
        w.str("\n");
    }

    /// FUSE_RELEASE of the handle; the reply has no body.
    fn release(&mut self, nodeid: u64, fh: u64) {
        self.header(fuse::RELEASE, nodeid, fuse::RELEASE_IN);
        self.arg_u64(fuse::RELEASE_IN_FH, fh);
        self.arg_u64(8, 0); // flags, release_flags
        self.arg_u64(16, 0); // lock_owner
        let got = self.call("FUSE_RELEASE", fuse::RELEASE_IN, 0);
        Self::expect_len("FUSE_RELEASE", got, 0);
    }

    /// FUSE_FORGET of the looked-up node on the high-priority queue (as Linux sends it): no
    /// reply, so the device completes a chain with only the request buffer, writing nothing.
    fn forget(&mut self, nodeid: u64) {
        self.header(fuse::FORGET, nodeid, fuse::FORGET_IN);
        self.arg_u64(0, 1);
        let request = self
            .req
            .sub(0, fuse::IN_HEADER + fuse::FORGET_IN)
            .expect("request");
        let Some(head) = self.hiprio.add(&[Buf::of(&request, false)]) else {
            fail_full("FUSE_FORGET")
        };
        self.hiprio.kick();
        let Some((done, used)) = self.hiprio.wait(Deadline::after_ms(TIMEOUT_MS)) else {
            self.dev
                .fail_timeout("FUSE_FORGET on the high-priority queue")
        };
        if done != head || used != 0 {
            fail(|w| {
                w.str("FUSE_FORGET: device completed descriptor ")
                    .dec(done.into())
                    .str(" (sent ")
                    .dec(head.into())
                    .str(") with ")
                    .dec(used.into())
                    .str(" bytes written to a read-only chain");
            });
        }
    }
}

fn fail_full(what: &str) -> ! {
    fail(|w| {
        w.str("queue full at ").str(what);
    })
}
