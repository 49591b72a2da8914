//! A backend that restarts while a live snapshot has the dirty log on: the new connection gets
//! the same log (`SET_LOG_BASE`) before the replay, `VHOST_F_LOG_ALL` with the driver's
//! features, and logged rings, so the snapshot keeps following the backend's writes.

use std::sync::Arc;

use super::reconnect::{reconnecting_device, restarting_backend, turn_until};
use super::{
    guest_memory, Script, LOG_ALL, PF_LOG_SHMFD, SET_FEATURES, SET_LOG_BASE, SET_VRING_ADDR,
};
use crate::virtio::device::VirtioDevice;
use crate::virtio::test_support::{DriverQueue, RecordingSignals, TestLoop};

#[test]
fn a_backend_restarted_while_the_dirty_log_is_on_gets_the_log_and_logged_rings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blk.sock");
    let mut script = Script::good();
    script.features |= LOG_ALL;
    script.protocol |= PF_LOG_SHMFD;
    // First backend: start-up (7), activation (8), the log switched on (3), then it dies.
    // Second: handshake (5), memory table, GET_CONFIG, SET_LOG_BASE, features, memory table,
    // 6 ring messages.
    let backend = restarting_backend(&path, vec![(script.clone(), 7 + 8 + 3), (script, 16)]);
    let mut events = TestLoop::new();
    let mem = guest_memory(1 << 20);
    let driver = DriverQueue::new(&mem, 0x1_0000, 16);
    let signals = Arc::new(RecordingSignals::default());
    let (dev, _kick) = reconnecting_device(&path, &events, &driver, &mem, signals.clone());
    let log = dev.dirty_log().unwrap();
    log.start(1 << 20).unwrap();
    turn_until(&mut events, || backend.is_finished());
    assert!(
        backend.is_finished(),
        "the second backend did not get the 16 requests of a logged replay"
    );
    let seen = backend.join().unwrap();
    assert_eq!(seen.len(), 2, "the device reconnected");
    let replay = &seen[1];
    let at = |code: u32| replay.iter().position(|(c, _)| *c == code);
    let (base, features) = (at(SET_LOG_BASE), at(SET_FEATURES));
    assert!(
        base.is_some() && base < features,
        "the log before the features: {replay:?}"
    );
    let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let features = &replay[features.unwrap()].1;
    assert_ne!(u64_at(features, 0) & LOG_ALL, 0, "VHOST_F_LOG_ALL replayed");
    let addr = &replay[at(SET_VRING_ADDR).unwrap()].1;
    // VhostUserVringAddr: index, flags (u32), ...; VHOST_VRING_F_LOG is bit 0.
    assert_eq!(u32::from_le_bytes(addr[4..8].try_into().unwrap()), 1);
    assert!(!signals.needs_reset());
    drop(dev);
}
