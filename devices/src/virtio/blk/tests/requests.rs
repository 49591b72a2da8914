//! Well-formed requests through the queue handler, on both engines: the file and guest memory
//! afterwards, status bytes, used lengths, notifications and the dirty bitmap.

use std::os::unix::fs::MetadataExt;

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::*;

fn dirty(mem: &TrackedGuestMemory, addr: u64) -> bool {
    let region = mem.find_region(GuestAddress(addr)).unwrap();
    region
        .bitmap()
        .dirty_at((addr - region.start_addr().0) as usize)
}

fn range(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut v = sector.to_le_bytes().to_vec();
    v.extend_from_slice(&sectors.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v
}

#[test]
fn write_then_read_round_trip() {
    for engine in ENGINES {
        let mem = memory();
        let mut rig = Rig::new(&mem, engine);
        // 8 KiB in two buffers, written at sector 3.
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 13 % 256) as u8).collect();
        mem.write_slice(&data[..4096], GuestAddress(DATA)).unwrap();
        mem.write_slice(&data[4096..], GuestAddress(DATA + 0x10000))
            .unwrap();
        let (status, used) = rig.request(
            T_OUT,
            3,
            &[(DATA, 4096, false), (DATA + 0x10000, 4096, false)],
        );
        assert_eq!(status, S_OK);
        assert_eq!(used, vec![(0, 1)]);
        assert_eq!(rig.signals.take_notified(), vec![0]);
        let file = rig.file_contents();
        assert_eq!(&file[3 * 512..3 * 512 + 8192], &data[..]);
        assert_eq!(
            &file[..3 * 512],
            &pattern(3 * 512)[..],
            "bytes before untouched"
        );
        assert_eq!(file[3 * 512 + 8192..], pattern(1 << 20)[3 * 512 + 8192..]);

        // Read it back (plus one sector of the pattern) into a page the test never wrote.
        assert!(!dirty(&mem, DATA2));
        let (status, used) = rig.request(T_IN, 3, &[(DATA2, 8192 + 512, true)]);
        assert_eq!(status, S_OK);
        assert_eq!(
            used,
            vec![(4, 8192 + 512 + 1)],
            "head after a 4-descriptor chain"
        );
        assert_eq!(rig.read_guest(DATA2, 8192), data);
        assert_eq!(
            rig.read_guest(DATA2 + 8192, 512),
            pattern(1 << 20)[3 * 512 + 8192..4 * 512 + 8192]
        );
        assert!(dirty(&mem, DATA2), "device writes are in the dirty bitmap");
        assert!(dirty(&mem, DATA2 + 8192));
        assert!(!dirty(&mem, DATA2 + 0x10000), "nothing else is");
    }
}

#[test]
fn read_at_the_last_sector() {
    let mem = memory();
    let mut rig = Rig::new(&mem, IoEngineKind::Threads);
    let last = (1 << 20) / 512 - 1;
    let (status, _) = rig.request(T_IN, last, &[(DATA, 512, true)]);
    assert_eq!(status, S_OK);
    assert_eq!(
        rig.read_guest(DATA, 512),
        pattern(1 << 20)[(1 << 20) - 512..]
    );
}

#[test]
fn a_buffer_may_hold_data_and_status() {
    // virtio 1.x has no framing rules: header and status may share buffers with data.
    let mem = memory();
    let mut rig = Rig::new(&mem, IoEngineKind::Threads);
    rig.header(HDR, T_IN, 1);
    rig.offer(&[(HDR, 16, false), (DATA, 513, true)]);
    let used = rig.finish();
    assert_eq!(used, vec![(0, 513)]);
    assert_eq!(rig.read_guest(DATA, 512), pattern(1024)[512..]);
    assert_eq!(rig.read_guest(DATA + 512, 1), vec![S_OK]);
}

#[test]
fn flush_and_get_id() {
    for engine in ENGINES {
        let mem = memory();
        let mut rig = Rig::with(&mem, engine, QSIZE, |c| c.id = Some("skiff-disk-7".into()));
        let (status, used) = rig.request(T_FLUSH, 0, &[]);
        assert_eq!((status, used), (S_OK, vec![(0, 1)]));
        mem.write_slice(&[0xffu8; 20], GuestAddress(DATA)).unwrap();
        let (status, used) = rig.request(T_GET_ID, 0, &[(DATA, 20, true)]);
        assert_eq!(
            (status, used),
            (S_OK, vec![(2, 21)]),
            "head after two 2- and 3-descriptor chains"
        );
        let mut want = b"skiff-disk-7".to_vec();
        want.resize(20, 0);
        assert_eq!(rig.read_guest(DATA, 20), want);
    }
}

#[test]
fn unknown_type_is_unsupported() {
    let mem = memory();
    let mut rig = Rig::new(&mem, IoEngineKind::Threads);
    let (status, used) = rig.request(0x77, 0, &[(DATA, 512, true)]);
    assert_eq!((status, used), (S_UNSUPP, vec![(0, 1)]));
    assert_eq!(rig.file_contents(), pattern(1 << 20));
}

#[test]
fn discard_and_write_zeroes_change_the_file() {
    for engine in ENGINES {
        let mem = memory();
        let mut rig = Rig::new(&mem, engine);
        rig.file.as_file().sync_all().unwrap();
        let before = rig.file.as_file().metadata().unwrap().blocks();
        // Discard 256 KiB at 256 KiB; write zeroes over 4 KiB at 768 KiB (no unmap) and
        // 4 KiB at 800 KiB (unmap), in one request of two ranges.
        mem.write_slice(&range(512, 512, 0), GuestAddress(DATA))
            .unwrap();
        let (status, _) = rig.request(T_DISCARD, 0, &[(DATA, 16, false)]);
        assert_eq!(status, S_OK);
        let mut two = range(1536, 8, 0);
        two.extend(range(1600, 8, 1));
        mem.write_slice(&two, GuestAddress(DATA)).unwrap();
        let (status, _) = rig.request(T_WRITE_ZEROES, 0, &[(DATA, 32, false)]);
        assert_eq!(status, S_OK);

        let file = rig.file_contents();
        let mut want = pattern(1 << 20);
        want[256 << 10..512 << 10].fill(0);
        want[768 << 10..(768 << 10) + 4096].fill(0);
        want[800 << 10..(800 << 10) + 4096].fill(0);
        assert_eq!(file.len(), want.len(), "the size is kept");
        assert!(file == want, "zeroed exactly the requested ranges");
        let after = rig.file.as_file().metadata().unwrap().blocks();
        assert!(
            after + 256 * 2 <= before,
            "discard freed space: {before} -> {after} blocks"
        );
    }
}

#[test]
fn discard_and_write_zeroes_limits() {
    let mem = memory();
    let mut rig = Rig::new(&mem, IoEngineKind::Threads);
    let sectors = (1u64 << 20) / 512;
    let cases: [(u32, Vec<u8>, u8); 7] = [
        // Discard must not carry UNMAP; unknown flags are unsupported.
        (T_DISCARD, range(0, 8, 1), S_UNSUPP),
        (T_WRITE_ZEROES, range(0, 8, 2), S_UNSUPP),
        // Past the end, and overflowing.
        (T_DISCARD, range(sectors - 4, 8, 0), S_IOERR),
        (T_WRITE_ZEROES, range(u64::MAX - 2, 8, 0), S_IOERR),
        // More sectors than max_discard_sectors.
        (T_DISCARD, range(0, u32::MAX, 0), S_IOERR),
        // More ranges than max_discard_seg.
        (T_DISCARD, range(0, 1, 0).repeat(9), S_IOERR),
        // Not a whole number of ranges.
        (T_WRITE_ZEROES, range(0, 1, 0)[..12].to_vec(), S_IOERR),
    ];
    for (kind, payload, want) in cases {
        mem.write_slice(&payload, GuestAddress(DATA)).unwrap();
        let (status, _) = rig.request(kind, 0, &[(DATA, payload.len() as u32, false)]);
        assert_eq!(status, want, "type {kind} payload {payload:02x?}");
    }
    assert_eq!(rig.file_contents(), pattern(1 << 20), "nothing was changed");
}

#[test]
fn read_only_disk_refuses_writes_without_touching_the_file() {
    for engine in ENGINES {
        let mem = memory();
        let mut rig = Rig::with(&mem, engine, QSIZE, |c| c.readonly = true);
        let mtime = rig.file.as_file().metadata().unwrap().mtime_nsec();
        mem.write_slice(&[0x11u8; 512], GuestAddress(DATA)).unwrap();
        let (status, used) = rig.request(T_OUT, 0, &[(DATA, 512, false)]);
        assert_eq!((status, used), (S_IOERR, vec![(0, 1)]));
        mem.write_slice(&range(0, 8, 0), GuestAddress(DATA))
            .unwrap();
        assert_eq!(rig.request(T_DISCARD, 0, &[(DATA, 16, false)]).0, S_IOERR);
        assert_eq!(
            rig.request(T_WRITE_ZEROES, 0, &[(DATA, 16, false)]).0,
            S_IOERR
        );
        assert_eq!(rig.request(T_FLUSH, 0, &[]).0, S_OK);
        // Reads still work.
        assert_eq!(rig.request(T_IN, 0, &[(DATA2, 512, true)]).0, S_OK);
        assert_eq!(rig.read_guest(DATA2, 512), pattern(512));
        assert_eq!(rig.file_contents(), pattern(1 << 20));
        assert_eq!(rig.file.as_file().metadata().unwrap().mtime_nsec(), mtime);
    }
}

#[test]
fn more_requests_than_the_engine_takes_all_complete() {
    // 300 one-sector reads on a 512-entry queue: the handler stops at MAX_IN_FLIGHT and
    // resumes from the ring as completions make room.
    let mem = memory();
    let mut rig = Rig::with(&mem, IoEngineKind::IoUring, 512, |_| {});
    let n = 300u64;
    for i in 0..n {
        let hdr = HDR + i * 16;
        rig.header(hdr, T_IN, i % 2048);
        rig.driver.add_chain(&[
            (hdr, 16, false),
            (DATA + i * 512, 512, true),
            (STATUS + i, 1, true),
        ]);
    }
    rig.kick();
    let used = rig.finish();
    assert_eq!(used.len(), n as usize);
    for i in 0..n {
        let s: u8 = mem.read_obj(GuestAddress(STATUS + i)).unwrap();
        assert_eq!(s, S_OK, "request {i}");
    }
    let want = pattern(1 << 20);
    assert_eq!(
        rig.read_guest(DATA + 299 * 512, 512),
        want[299 * 512..300 * 512]
    );
}

#[test]
fn event_idx_suppresses_notifications_until_used_event() {
    let mem = memory();
    let mut rig = Rig::build(&mem, IoEngineKind::Threads, QSIZE, true, |_| {});
    // The driver asks to hear only once the used index passes 1.
    rig.driver.set_used_event(1);
    rig.request(T_IN, 0, &[(DATA, 512, true)]);
    assert_eq!(
        rig.signals.take_notified(),
        Vec::<u16>::new(),
        "used idx 1: not yet"
    );
    rig.request(T_IN, 0, &[(DATA, 512, true)]);
    assert_eq!(
        rig.signals.take_notified(),
        vec![0],
        "used idx 2 passes used_event 1"
    );
}

#[test]
fn read_only_refusal_happens_before_any_file_operation() {
    // Checked on `prepare` itself: the refusal must not rely on the file being opened
    // read-only (which would also fail the write, but only after trying).
    use crate::virtio::blk::request::{prepare, Action, Request, RequestKind, Segment};
    let mem = memory();
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(1 << 20).unwrap();
    let mut cfg = DiskConfig::new(file.path());
    cfg.readonly = true;
    let disk = DiskImage::open(&cfg).unwrap();
    let data = vec![Segment {
        addr: GuestAddress(DATA),
        len: 512,
    }];
    for kind in [
        RequestKind::Out,
        RequestKind::Discard,
        RequestKind::WriteZeroes,
    ] {
        let req = Request {
            head: 0,
            kind,
            sector: 0,
            readable: data.clone(),
            writable: Vec::new(),
            status: GuestAddress(STATUS),
        };
        let action = prepare(&req, &mem, &disk);
        assert!(
            matches!(
                action,
                Action::Complete {
                    status: S_IOERR,
                    used_len: 1
                }
            ),
            "{kind:?}: {action:?}"
        );
    }
}
