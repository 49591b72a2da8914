//! `VirtioBlk` through the `VirtioDevice` interface: features, configuration space,
//! activation (each disk served on a thread of its own; several queues), reset and
//! re-activation.

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::blk::{BlkError, DiskError, VirtioBlk};
use crate::virtio::device::{ActivateContext, ActivateError, VirtioDevice};
use crate::virtio::test_support::TestLoop;

const VERSION_1: u64 = 1 << 32;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const RINGS_1: u64 = 0x8000;

fn disk_file() -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&pattern(1 << 20)).unwrap();
    f
}

fn device(f: &tempfile::NamedTempFile, tweak: impl FnOnce(&mut DiskConfig)) -> VirtioBlk {
    let mut cfg = DiskConfig::new(f.path());
    tweak(&mut cfg);
    VirtioBlk::new(&cfg).unwrap()
}

fn config_u32(dev: &VirtioBlk, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read_config(offset, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn features_and_configuration_space() {
    let f = disk_file();
    let dev = device(&f, |c| c.queues = 3);
    assert_eq!(dev.device_type(), 2);
    assert_eq!(dev.queue_max_sizes(), vec![256; 3]);
    let want = VERSION_1 | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_MQ | F_DISCARD | F_WRITE_ZEROES;
    assert_eq!(dev.device_features() & want, want);
    assert_eq!(dev.device_features() & F_RO, 0);
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
    assert_eq!(config_u32(&dev, 12), 254, "seg_max");
    assert_eq!(config_u32(&dev, 20), 512, "blk_size");
    let mut nq = [0u8; 2];
    dev.read_config(34, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 3);
    assert_eq!(config_u32(&dev, 36), 1 << 22, "max_discard_sectors");
    assert_eq!(config_u32(&dev, 40), 8, "max_discard_seg");
    assert_eq!(config_u32(&dev, 44), 8, "discard_sector_alignment");
    assert_eq!(config_u32(&dev, 48), 1 << 22, "max_write_zeroes_sectors");
    assert_eq!(config_u32(&dev, 52), 8, "max_write_zeroes_seg");
    // A read crossing the end: the tail is zeros. Reads past the end and at absurd offsets too.
    let mut tail = [0xffu8; 8];
    dev.read_config(56, &mut tail);
    assert_eq!(
        tail,
        [1, 0, 0, 0, 0, 0, 0, 0],
        "write_zeroes_may_unmap, then nothing"
    );
    let mut past = [0xffu8; 4];
    dev.read_config(4096, &mut past);
    assert_eq!(past, [0; 4]);
    dev.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 4]);
}

#[test]
fn read_only_disk_offers_ro_and_no_discard() {
    let f = disk_file();
    let mut dev = device(&f, |c| c.readonly = true);
    assert!(dev.readonly());
    let feats = dev.device_features();
    assert_ne!(feats & F_RO, 0);
    assert_eq!(feats & (F_DISCARD | F_WRITE_ZEROES), 0);
    assert_eq!(config_u32(&dev, 36), 0);
    // The configuration space cannot be written.
    dev.write_config(0, &[0xff; 8]);
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
}

#[test]
fn start_up_errors_are_clear() {
    let e = VirtioBlk::new(&DiskConfig::new("/nonexistent/disk.img")).unwrap_err();
    assert!(matches!(e, BlkError::Disk(DiskError::Missing(_))));
    assert_eq!(e.to_string(), "disk /nonexistent/disk.img: no such file");
    let f = disk_file();
    let _first = device(&f, |_| {});
    let e = VirtioBlk::new(&DiskConfig::new(f.path())).unwrap_err();
    assert!(e.to_string().contains("locked by another process"), "{e}");
}

/// Threads of this process with `name` (the kernel keeps 15 bytes of it).
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

/// Waits up to 5 s for a thread named `name` (a new thread names itself once it runs).
fn thread_appears(name: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while threads_named(name) == 0 {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

struct Activated<'a> {
    queues: Vec<(driver::Driver<'a>, vmm_sys_util::eventfd::EventFd)>,
    signals: Arc<RecordingSignals>,
}

fn activate<'a>(dev: &mut VirtioBlk, mem: &'a TrackedGuestMemory, lp: &TestLoop) -> Activated<'a> {
    let mut queues = Vec::new();
    let mut activated = Vec::new();
    for (i, base) in [(0u16, RINGS), (1, RINGS_1)] {
        let dq = driver::Driver::new(mem, base, QSIZE);
        let (aq, kick) = dq.activated(i);
        activated.push(aq);
        queues.push((dq, kick));
    }
    let signals = Arc::new(RecordingSignals::default());
    dev.activate(ActivateContext {
        mem: mem.clone(),
        acked_features: VERSION_1 | F_MQ,
        queues: activated,
        signals: signals.clone(),
        event_loop: lp.endpoint(),
    })
    .unwrap();
    Activated { queues, signals }
}

/// Offers a one-sector read of `sector` on queue `q` and kicks it.
fn read_sector(mem: &TrackedGuestMemory, a: &mut Activated<'_>, q: usize, sector: u64, at: u64) {
    let mut h = [0u8; 16];
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR + 64 * q as u64))
        .unwrap();
    mem.write_obj(S_UNTOUCHED, GuestAddress(STATUS + q as u64))
        .unwrap();
    let (dq, kick) = &mut a.queues[q];
    dq.add_chain(&[
        (HDR + 64 * q as u64, 16, false),
        (at, 512, true),
        (STATUS + q as u64, 1, true),
    ]);
    kick.write(1).unwrap();
}

/// Turns the loop until queue `q` has used entries (or 5 s pass).
fn wait_used(lp: &mut TestLoop, a: &mut Activated<'_>, q: usize) -> Vec<(u16, u32)> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        lp.wait(50);
        let used = a.queues[q].0.take_used();
        if !used.is_empty() || Instant::now() > deadline {
            return used;
        }
    }
}

#[test]
fn two_queues_on_the_disk_thread() {
    let mem = memory();
    let mut lp = TestLoop::new();
    let f = disk_file();
    let mut dev = device(&f, |c| {
        c.queues = 2;
        c.engine = IoEngineKind::Threads;
    });
    assert_eq!(dev.engine_name(), "threads");
    let mut a = activate(&mut dev, &mem, &lp);
    lp.turn();
    read_sector(&mem, &mut a, 1, 5, DATA);
    assert_eq!(wait_used(&mut lp, &mut a, 1), vec![(0, 513)]);
    assert_eq!(a.signals.take_notified(), vec![1]);
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, pattern(6 * 512)[5 * 512..]);
    read_sector(&mem, &mut a, 0, 7, DATA2);
    assert_eq!(wait_used(&mut lp, &mut a, 0), vec![(0, 513)]);
    assert_eq!(a.signals.take_notified(), vec![0]);
    assert_eq!(dev.is_broken(), Some(false));
}

#[test]
fn activation_checks_the_queues() {
    let mem = memory();
    let lp = TestLoop::new();
    let f = disk_file();
    let mut dev = device(&f, |_| {});
    let ctx = |queues| ActivateContext {
        mem: mem.clone(),
        acked_features: VERSION_1,
        queues,
        signals: Arc::new(RecordingSignals::default()),
        event_loop: lp.endpoint(),
    };
    let err = dev.activate(ctx(Vec::new())).unwrap_err();
    assert!(matches!(err, ActivateError::BadQueues { .. }), "{err}");
    let dq = driver::Driver::new(&mem, RINGS, QSIZE);
    let (q, _kick) = dq.activated(1);
    let err = dev.activate(ctx(vec![q])).unwrap_err();
    assert!(
        err.to_string()
            .contains("queue 1 enabled, the device has 1"),
        "{err}"
    );
}

#[test]
fn reset_stops_the_handler_and_activation_starts_afresh() {
    let mem = memory();
    let mut lp = TestLoop::new();
    let f = disk_file();
    let mut dev = device(&f, |c| {
        c.queues = 2;
        c.id = Some("reset-check".into());
    });
    let mut a = activate(&mut dev, &mem, &lp);
    assert!(thread_appears("disk-reset-chec"), "the disk's thread runs");
    dev.reset();
    assert_eq!(
        threads_named("disk-reset-chec"),
        0,
        "reset joined the thread"
    );
    assert_eq!(dev.is_broken(), None);
    read_sector(&mem, &mut a, 0, 1, DATA);
    std::thread::sleep(Duration::from_millis(50));
    assert!(a.queues[0].0.take_used().is_empty());
    let s: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(s, S_UNTOUCHED, "a reset device leaves requests alone");

    // The driver sets the device up again (fresh rings).
    mem.write_slice(&vec![0u8; 0x10000], GuestAddress(RINGS))
        .unwrap();
    let mut a = activate(&mut dev, &mem, &lp);
    lp.turn();
    read_sector(&mem, &mut a, 0, 2, DATA);
    assert_eq!(wait_used(&mut lp, &mut a, 0), vec![(0, 513)]);
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, pattern(3 * 512)[2 * 512..]);
}

#[test]
fn a_kick_right_after_reactivation_reaches_the_new_handler() {
    // The transport hands every activation a clone of the same kick eventfd (the one KVM's
    // ioeventfd writes). The old handler must leave it undrained (it may see the kick before its
    // thread is told to end), or a driver that re-initialises and kicks quickly is never served.
    let mem = memory();
    let mut lp = TestLoop::new();
    let f = disk_file();
    let mut dev = device(&f, |_| {});
    let kick = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    let activate_with_kick = |dev: &mut VirtioBlk, lp: &TestLoop, driver: &driver::Driver<'_>| {
        let (mut queue, _own_kick) = driver.activated(0);
        queue.kick = kick.try_clone().unwrap();
        dev.activate(ActivateContext {
            mem: mem.clone(),
            acked_features: VERSION_1,
            queues: vec![queue],
            signals: Arc::new(RecordingSignals::default()),
            event_loop: lp.endpoint(),
        })
        .unwrap();
    };
    let driver = driver::Driver::new(&mem, RINGS, QSIZE);
    activate_with_kick(&mut dev, &lp, &driver);
    lp.turn();
    dev.reset();
    let mut driver = driver::Driver::new(&mem, RINGS_1, QSIZE);
    activate_with_kick(&mut dev, &lp, &driver);
    mem.write_slice(&[0u8; 16], GuestAddress(HDR)).unwrap();
    mem.write_obj(S_UNTOUCHED, GuestAddress(STATUS)).unwrap();
    let head = driver.add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    kick.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut used = Vec::new();
    while used.is_empty() && Instant::now() < deadline {
        lp.wait(50);
        used = driver.take_used();
    }
    assert_eq!(used, vec![(head, 513)]);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
}

#[test]
fn the_saved_state_is_the_disk_as_configured_and_builds_the_same_device() {
    use crate::persist::Persist;
    let f = disk_file();
    let mut engines = vec![IoEngineKind::Auto, IoEngineKind::Threads];
    if probe_uring().is_ok() {
        engines.push(IoEngineKind::IoUring);
    }
    for engine in engines {
        let dev = device(&f, |c| {
            c.readonly = true;
            c.id = Some("root".into());
            c.queues = 2;
            c.engine = engine;
        });
        let saved = dev.save();
        let engine_in_use = dev.engine_name();
        assert_eq!(saved.engine, engine, "io= as configured, not as resolved");
        assert_eq!(saved.path, f.path());
        assert!(saved.readonly);
        assert_eq!(saved.id.as_deref(), Some("root"));
        assert_eq!(saved.queues, 2);
        drop(dev);
        let back = VirtioBlk::restore((), &saved).unwrap();
        assert_eq!(back.save(), saved);
        assert_eq!(back.engine_name(), engine_in_use);
    }
    // A saved state goes through the constructor's checks.
    let mut bad = device(&f, |_| {}).save();
    bad.path = f.path().with_extension("missing");
    assert!(matches!(
        VirtioBlk::restore((), &bad),
        Err(BlkError::Disk(DiskError::Missing(_)))
    ));
}
