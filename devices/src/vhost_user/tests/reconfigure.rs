//! A backend that comes back with another configuration space (a disk resized while it was
//! down): the device takes it and tells the driver.

use std::sync::Arc;

use super::{guest_memory, reconnecting_device, restarting_backend, turn_until, Script};
use crate::virtio::device::VirtioDevice;
use crate::virtio::test_support::{DriverQueue, RecordingSignals, TestLoop};

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
