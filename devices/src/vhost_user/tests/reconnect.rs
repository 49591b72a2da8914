//! Reconnects (`reconnect=`) against scripted backends that die and come back: the rings
//! replayed from the guest's used index with a kick, a backend back without a feature failing
//! the device, and one back with another configuration space (the driver is told).

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::super::config::{VhostUserConfig, VhostUserKind};
use super::super::device::VhostUserDevice;
use super::{
    body_of, guest_memory, memfd_region, run_script, Requests, Script, BLK_FLUSH, SET_VRING_BASE,
    SET_VRING_ENABLE, VERSION_1,
};
use crate::virtio::device::{ActivateContext, VirtioDevice};
use crate::virtio::test_support::{DriverQueue, RecordingSignals, TestLoop};

/// A backend on a socket path that serves `scripts` on one connection each, in turn (each
/// script with its request limit), and returns the requests each connection saw.
pub(super) fn restarting_backend(
    path: &Path,
    scripts: Vec<(Script, usize)>,
) -> JoinHandle<Vec<Requests>> {
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for (script, stop_after) in scripts {
            let (stream, _) = listener.accept().unwrap();
            seen.push(run_script(stream, script, stop_after));
        }
        seen
    })
}

/// Turns `events` until `done` or 10 s passed.
pub(super) fn turn_until(events: &mut TestLoop, mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        events.wait(50);
    }
}

/// A blk device with `reconnect=50ms` on `path`, activated with one queue of `driver`.
pub(super) fn reconnecting_device(
    path: &Path,
    events: &TestLoop,
    driver: &DriverQueue<'_>,
    mem: &crate::guest_memory::TrackedGuestMemory,
    signals: Arc<RecordingSignals>,
) -> (VhostUserDevice, vmm_sys_util::eventfd::EventFd) {
    let mut cfg = VhostUserConfig::new(VhostUserKind::Blk, path);
    cfg.reconnect = Some(std::time::Duration::from_millis(50));
    let mut dev = VhostUserDevice::new(&cfg, vec![memfd_region()], events.endpoint()).unwrap();
    let (queue, kick) = driver.activated(0);
    dev.activate(ActivateContext {
        mem: mem.clone(),
        acked_features: VERSION_1 | BLK_FLUSH,
        queues: vec![queue],
        signals,
        event_loop: events.endpoint(),
    })
    .unwrap();
    (dev, kick)
}

#[test]
fn a_restarted_backend_gets_the_rings_back_from_the_guest_used_index_and_a_kick() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blk.sock");
    // The first backend serves start-up and activation, then dies; the second one serves the
    // reconnect: handshake (5), memory table, GET_CONFIG, features, memory table, 6 ring
    // messages.
    let backend = restarting_backend(&path, vec![(Script::good(), 7 + 8), (Script::good(), 15)]);
    let mut events = TestLoop::new();
    let mem = guest_memory(1 << 20);
    let driver = DriverQueue::new(&mem, 0x1_0000, 16);
    let signals = Arc::new(RecordingSignals::default());
    let (dev, kick) = reconnecting_device(&path, &events, &driver, &mem, signals.clone());
    // The dead backend had completed 5 requests.
    driver.set_used_idx(5);
    turn_until(&mut events, || backend.is_finished());
    let seen = backend.join().unwrap();
    assert_eq!(seen.len(), 2, "the device reconnected");
    let replay = &seen[1];
    let base = body_of(replay, SET_VRING_BASE).expect("SET_VRING_BASE replayed");
    assert_eq!(
        &base[..8],
        &[0, 0, 0, 0, 5, 0, 0, 0],
        "queue 0 from used index 5"
    );
    assert_eq!(replay.last().unwrap().0, SET_VRING_ENABLE, "{replay:?}");
    // The replay ends with one write to the kick eventfd (no backend drained it here).
    let mut kicked = 0;
    turn_until(&mut events, || {
        kicked = kick.read().unwrap_or(0);
        kicked != 0
    });
    assert_eq!(kicked, 1);
    assert!(
        !signals.needs_reset(),
        "a reconnect is not a device failure"
    );
    assert_eq!(
        signals.config_changes(),
        0,
        "the same configuration came back"
    );
    drop(dev);
}

#[test]
fn a_restarted_backend_without_a_feature_fails_the_device_instead_of_serving_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blk.sock");
    let mut poorer = Script::good();
    poorer.features &= !BLK_FLUSH;
    // The second backend gets as far as the handshake (5 requests), then skiff drops it.
    let backend = restarting_backend(&path, vec![(Script::good(), 7 + 8), (poorer, 5)]);
    let mut events = TestLoop::new();
    let mem = guest_memory(1 << 20);
    let driver = DriverQueue::new(&mem, 0x1_0000, 16);
    let signals = Arc::new(RecordingSignals::default());
    let (dev, _kick) = reconnecting_device(&path, &events, &driver, &mem, signals.clone());
    turn_until(&mut events, || signals.needs_reset());
    assert!(signals.needs_reset(), "the device was not failed");
    let seen = backend.join().unwrap();
    assert!(
        body_of(&seen[1], SET_VRING_BASE).is_none(),
        "rings were given to a backend that lacks FLUSH: {:?}",
        seen[1]
    );
    drop(dev);
}

#[test]
fn a_backend_back_with_a_new_capacity_is_read_again_and_the_driver_told() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blk.sock");
    let mut resized = Script::good();
    resized.config[..8].copy_from_slice(&16384u64.to_le_bytes());
    // Start-up and activation, then a death; the second backend serves the whole replay (15).
    let _backend = restarting_backend(&path, vec![(Script::good(), 7 + 8), (resized, 15)]);
    let mut events = TestLoop::new();
    let mem = guest_memory(1 << 20);
    let driver = DriverQueue::new(&mem, 0x1_0000, 16);
    let signals = Arc::new(RecordingSignals::default());
    let (dev, _kick) = reconnecting_device(&path, &events, &driver, &mem, signals.clone());
    let capacity = |dev: &dyn VirtioDevice| {
        let mut bytes = [0u8; 8];
        dev.read_config(0, &mut bytes);
        u64::from_le_bytes(bytes)
    };
    assert_eq!(capacity(&dev), 8192);
    turn_until(&mut events, || signals.config_changes() > 0);
    assert_eq!(
        signals.config_changes(),
        1,
        "one configuration-change interrupt"
    );
    assert_eq!(capacity(&dev), 16384, "the new backend's capacity");
    assert!(!signals.needs_reset());
    drop(dev);
}
