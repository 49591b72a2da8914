//! Malformed and hostile chains: each is answered `VIRTIO_BLK_S_IOERR` when its status byte is
//! usable, or marks the device `NEEDS_RESET` when it is not, without panicking, hanging, or
//! touching the disk file or memory outside the guest's.

use vm_memory::{Bytes, GuestAddress};

use super::*;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// A request answered with IOERR and nothing else happening.
fn assert_ioerr(rig: &mut Rig<'_>, kind: u32, sector: u64, bufs: &[Buf]) {
    let (status, used) = rig.request(kind, sector, bufs);
    assert_eq!(
        status, S_IOERR,
        "type {kind} sector {sector} bufs {bufs:x?}"
    );
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, 1, "only the status byte was written");
    assert!(!rig.signals.needs_reset());
    assert!(!rig.handler.is_broken());
}

#[test]
fn wrong_directions_are_io_errors() {
    let mem = memory();
    let mut rig = Rig::new(&mem, IoEngineKind::Threads);
    // IN whose data buffer is device-readable; OUT whose data buffer is device-writable.
    assert_ioerr(&mut rig, T_IN, 0, &[(DATA, 512, false)]);
    mem.write_slice(&[0x55u8; 512], GuestAddress(DATA)).unwrap();
    assert_ioerr(&mut rig, T_OUT, 0, &[(DATA, 512, true)]);
    // A device-readable buffer after a device-writable one.
    assert_ioerr(&mut rig, T_IN, 0, &[(DATA, 512, true), (DATA2, 512, false)]);
    // GET_ID reading instead of writing, FLUSH with data.
    assert_ioerr(&mut rig, T_GET_ID, 0, &[(DATA, 20, false)]);
    assert_ioerr(&mut rig, T_FLUSH, 0, &[(DATA, 512, true)]);
    assert_eq!(rig.file_contents(), pattern(1 << 20));
    assert_eq!(
        rig.read_guest(DATA, 512),
        vec![0x55u8; 512],
        "no data was read into it"
    );
}

#[test]
fn out_of_range_sectors_and_lengths_are_io_errors() {
    let mem = memory();
    let mut rig = Rig::new(&mem, IoEngineKind::Threads);
    let sectors = (1u64 << 20) / 512;
    // Past the end, straddling the end, and wrapping around u64.
    assert_ioerr(&mut rig, T_IN, sectors, &[(DATA, 512, true)]);
    assert_ioerr(&mut rig, T_OUT, sectors - 1, &[(DATA, 1024, false)]);
    assert_ioerr(&mut rig, T_IN, u64::MAX, &[(DATA, 512, true)]);
    assert_ioerr(&mut rig, T_IN, u64::MAX / 512 + 1, &[(DATA, 512, true)]);
    // Not a multiple of 512.
    assert_ioerr(&mut rig, T_IN, 0, &[(DATA, 511, true)]);
    assert_ioerr(
        &mut rig,
        T_OUT,
        0,
        &[(DATA, 100, false), (DATA2, 100, false)],
    );
    assert_eq!(rig.file_contents(), pattern(1 << 20));
}

#[test]
fn oversized_requests_are_io_errors() {
    // A 256 MiB (sparse) disk, and buffers that lie in RAM but add up to more than
    // MAX_IO_BYTES (128 MiB): three 48 MiB buffers over the same guest memory.
    let mem = guest_memory(64 << 20);
    let mut rig = Rig::with(&mem, IoEngineKind::Threads, QSIZE, |c| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&c.path)
            .unwrap();
        f.set_len(256 << 20).unwrap();
    });
    let big = 48 << 20;
    let three = [(DATA2, big, true), (DATA2, big, true), (DATA2, big, true)];
    assert_ioerr(&mut rig, T_IN, 0, &three);
    // Two of them (96 MiB) are within the bound.
    assert_eq!(rig.request(T_IN, 0, &three[..2]).0, S_OK);
}

#[test]
fn buffers_outside_guest_memory_are_io_errors() {
    let mem = memory();
    let mut rig = Rig::new(&mem, IoEngineKind::Threads);
    let ram = RAM as u64;
    // Entirely outside, straddling the end, and a length that wraps the address space.
    assert_ioerr(&mut rig, T_IN, 0, &[(ram + 0x1000, 512, true)]);
    assert_ioerr(&mut rig, T_IN, 0, &[(ram - 512, 1024, true)]);
    assert_ioerr(&mut rig, T_OUT, 0, &[(u64::MAX - 100, 512, false)]);
    // A header outside memory.
    rig.offer(&[(ram + 64, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(rig.finish().len(), 1);
    assert_eq!(rig.status(), S_IOERR);
    assert_eq!(rig.file_contents(), pattern(1 << 20));
}

#[test]
fn short_header_is_an_io_error() {
    let mem = memory();
    let mut rig = Rig::new(&mem, IoEngineKind::Threads);
    rig.header(HDR, T_IN, 0);
    rig.offer(&[(HDR, 8, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(rig.finish(), vec![(0, 1)]);
    assert_eq!(rig.status(), S_IOERR);
}

#[test]
fn status_outside_memory_needs_reset() {
    let mem = memory();
    let mut rig = Rig::new(&mem, IoEngineKind::Threads);
    rig.header(HDR, T_IN, 0);
    rig.offer(&[
        (HDR, 16, false),
        (DATA, 512, true),
        (RAM as u64 + 8, 1, true),
    ]);
    assert!(rig.finish().is_empty(), "nothing to answer with");
    assert!(rig.signals.needs_reset());
    assert!(rig.handler.is_broken());
}

#[test]
fn missing_status_byte_needs_reset() {
    let mem = memory();
    let mut rig = Rig::new(&mem, IoEngineKind::Threads);
    mem.write_slice(&[0x33u8; 512], GuestAddress(DATA)).unwrap();
    rig.header(HDR, T_OUT, 0);
    // The last descriptor is device-readable: no status byte.
    rig.offer(&[(HDR, 16, false), (DATA, 512, false)]);
    assert!(rig.finish().is_empty());
    assert!(rig.signals.needs_reset());
    assert_eq!(
        rig.file_contents(),
        pattern(1 << 20),
        "the write was not done"
    );
}

#[test]
fn zero_length_status_needs_reset() {
    let mem = memory();
    let mut rig = Rig::new(&mem, IoEngineKind::Threads);
    rig.header(HDR, T_IN, 0);
    rig.offer(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 0, true)]);
    assert!(rig.finish().is_empty());
    assert!(rig.signals.needs_reset());
}

#[test]
fn descriptor_loop_needs_reset_and_stops_the_device() {
    let mem = memory();
    let mut rig = Rig::new(&mem, IoEngineKind::Threads);
    rig.header(HDR, T_IN, 0);
    // Four descriptors, the status one pointing back at the head: the queue size (16) is a
    // multiple of the loop, so iteration stops on the status descriptor, still marked NEXT.
    let head = rig.driver.add_chain(&[
        (HDR, 16, false),
        (DATA, 512, true),
        (DATA2, 512, true),
        (STATUS, 1, true),
    ]);
    rig.driver
        .write_desc(head + 3, STATUS, 1, F_WRITE | F_NEXT, head);
    mem.write_obj(S_UNTOUCHED, GuestAddress(STATUS)).unwrap();
    rig.kick();
    assert!(rig.finish().is_empty());
    assert!(rig.signals.needs_reset());
    assert_eq!(rig.status(), S_UNTOUCHED);
    // A broken device leaves later chains alone.
    rig.header(HDR, T_IN, 0);
    rig.offer(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert!(rig.finish().is_empty());
    assert_eq!(rig.status(), S_UNTOUCHED);
}

#[test]
fn next_index_beyond_the_table_needs_reset() {
    let mem = memory();
    let mut rig = Rig::new(&mem, IoEngineKind::Threads);
    rig.header(HDR, T_IN, 0);
    let head = rig
        .driver
        .add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    rig.driver
        .write_desc(head + 1, DATA, 512, F_WRITE | F_NEXT, QSIZE + 3);
    rig.kick();
    assert!(rig.finish().is_empty());
    assert!(rig.signals.needs_reset());
}

#[test]
fn head_index_beyond_the_queue_needs_reset() {
    let mem = memory();
    let mut rig = Rig::new(&mem, IoEngineKind::Threads);
    rig.driver.offer_head(QSIZE + 5);
    rig.kick();
    assert!(rig.finish().is_empty());
    assert!(rig.signals.needs_reset());
}

#[test]
fn available_index_too_far_ahead_needs_reset() {
    let mem = memory();
    let mut rig = Rig::new(&mem, IoEngineKind::Threads);
    rig.driver.set_avail_idx(QSIZE + 1);
    rig.kick();
    assert!(rig.finish().is_empty());
    assert!(rig.signals.needs_reset());
}

#[test]
fn indirect_table_outside_memory_needs_reset() {
    let mem = memory();
    let mut rig = Rig::new(&mem, IoEngineKind::Threads);
    let head = rig.driver.add_chain(&[(HDR, 16, false)]);
    // VRING_DESC_F_INDIRECT (4) pointing past the end of RAM.
    rig.driver
        .write_desc(head, RAM as u64 + 0x1000, 16 * 4, 4, 0);
    rig.kick();
    assert!(rig.finish().is_empty());
    assert!(rig.signals.needs_reset());
}

#[test]
fn good_requests_around_a_bad_one_still_complete() {
    let mem = memory();
    let mut rig = Rig::new(&mem, IoEngineKind::Threads);
    assert_eq!(rig.request(T_IN, 0, &[(DATA, 512, true)]).0, S_OK);
    assert_ioerr(&mut rig, T_IN, 0, &[(RAM as u64, 512, true)]);
    assert_eq!(rig.request(T_IN, 1, &[(DATA, 512, true)]).0, S_OK);
    assert_eq!(rig.read_guest(DATA, 512), pattern(1024)[512..]);
}
