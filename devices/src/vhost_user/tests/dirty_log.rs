//! The dirty log end to end in one process: skiff's own backend (`blk_backend::serve`) on a
//! socket, the frontend device over file-backed guest memory, a read request served while the
//! log is on: the pages the backend wrote (the data the I/O engine read into guest memory, the
//! status byte, the used ring) come back from the log.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::QueueT;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestRegionMmap};

use crate::guest_memory::TrackedGuestMemory;
use crate::vhost_user::blk_backend::{serve, BlkBackendConfig};
use crate::vhost_user::config::{SharedMemoryRegion, VhostUserConfig, VhostUserKind};
use crate::vhost_user::device::VhostUserDevice;
use crate::virtio::device::{ActivateContext, VirtioDevice};
use crate::virtio::test_support::{DriverQueue, RecordingSignals, TestLoop};

const SIZE: usize = 1 << 20;

/// Guest memory backed by a file, and the region a backend maps.
fn shared_memory() -> (TrackedGuestMemory, SharedMemoryRegion) {
    let file = tempfile::tempfile().unwrap();
    file.set_len(SIZE as u64).unwrap();
    let mapping: MmapRegion<AtomicBitmap> =
        MmapRegion::from_file(FileOffset::new(file.try_clone().unwrap(), 0), SIZE).unwrap();
    let region = GuestRegionMmap::new(mapping, GuestAddress(0)).unwrap();
    let mem = TrackedGuestMemory::from_regions(vec![region]).unwrap();
    let host_address = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    let shared = SharedMemoryRegion {
        guest_address: 0,
        size: SIZE as u64,
        host_address,
        fd: OwnedFd::from(file),
        file_offset: 0,
    };
    (mem, shared)
}

#[test]
fn the_skiff_backend_logs_the_pages_it_writes_engine_reads_included() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, disk) = (dir.path().join("blk.sock"), dir.path().join("disk.img"));
    let mut image = std::fs::File::create(&disk).unwrap();
    image.write_all(&[0x5a; 1 << 16]).unwrap();
    drop(image);
    let cfg = BlkBackendConfig {
        socket: socket.clone(),
        disk,
        readonly: false,
        once: true,
    };
    let server = std::thread::spawn(move || serve(&cfg));
    let started = Instant::now();
    while !socket.exists() && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (mem, region) = shared_memory();
    let events = TestLoop::new();
    let cfg = VhostUserConfig::new(VhostUserKind::Blk, &socket);
    let mut dev = VhostUserDevice::new(&cfg, vec![region], events.endpoint()).unwrap();
    let mut driver = DriverQueue::new(&mem, 0x1_0000, 16);
    let (queue, kick) = driver.activated(0);
    let used_page = queue.queue.used_ring() & !0xfff;
    dev.activate(ActivateContext {
        mem: mem.clone(),
        acked_features: 1 << 32,
        queues: vec![queue],
        signals: Arc::new(RecordingSignals::default()),
        event_loop: events.endpoint(),
    })
    .unwrap();
    let log = dev.dirty_log().unwrap();
    log.start(SIZE as u64).unwrap();
    // A read of sector 0 (type IN) into 0x8_0000, status at 0x3_0000.
    mem.write_obj(0u32, GuestAddress(0x2_0000)).unwrap();
    mem.write_obj(0u64, GuestAddress(0x2_0008)).unwrap();
    driver.add_chain(&[
        (0x2_0000, 16, false),
        (0x8_0000, 4096, true),
        (0x3_0000, 1, true),
    ]);
    kick.write(1).unwrap();
    let started = Instant::now();
    let mut used = Vec::new();
    while used.is_empty() && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
        used = driver.take_used();
    }
    assert_eq!(used.len(), 1, "the request was not served");
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x8_0000)).unwrap(), 0x5a);
    let mut pages = Vec::new();
    log.take(&mut |a| pages.push(a));
    for page in [0x8_0000, 0x3_0000, used_page] {
        assert!(pages.contains(&page), "{page:#x} not logged: {pages:x?}");
    }
    assert!(
        !pages.contains(&0x2_0000),
        "only what the backend wrote: {pages:x?}"
    );
    log.stop();
    drop(dev);
    server.join().unwrap().unwrap();
}
