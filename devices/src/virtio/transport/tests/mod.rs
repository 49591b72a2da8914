//! Unit tests of the virtio PCI transport, driving it as a guest driver would: through its
//! configuration space and BAR 0, with a recording device model behind it. No KVM.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::bus::BusDevice;
use crate::pci::msix::{MsiMessage, MsiRouteUpdater};
use crate::pci::PciDevice;
use crate::virtio::device::{ActivateContext, ActivateError, DeviceSignals, VirtioDevice};
use crate::virtio::test_support::guest_memory;

const VERSION_1: u64 = 1 << 32;
const EVENT_IDX: u64 = 1 << 29;
const BAR: u64 = 0xc000_0000;
const MEM_SIZE: u64 = 1 << 20;

// Common configuration offsets, as a driver knows them from the spec.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

const ACKNOWLEDGE: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;
const NEEDS_RESET: u8 = 0x40;

/// An activation as the device saw it: acked features, and (index, size, event index) of
/// each queue.
type Activation = (u64, Vec<(u16, u16, bool)>);

#[derive(Debug, Default)]
struct Record {
    activations: Vec<Activation>,
    resets: usize,
    config_writes: Vec<(u64, Vec<u8>)>,
    /// (index, next_avail, next_used) of each queue, per activation.
    positions: Vec<Vec<(u16, u16, u16)>>,
    /// Calls of `interrupt_delivery_changed`.
    delivery_changes: usize,
}

struct FakeDevice {
    record: Arc<Mutex<Record>>,
    fail_activation: bool,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        4
    }
    fn name(&self) -> &'static str {
        "fake"
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16, 8]
    }
    fn device_features(&self) -> u64 {
        VERSION_1 | EVENT_IDX | 1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset as u8).wrapping_add(i as u8);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.record
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let queues = ctx
            .queues
            .iter()
            .map(|q| {
                use virtio_queue::QueueT;
                (q.index, q.queue.size(), q.queue.event_idx_enabled())
            })
            .collect();
        let positions = ctx
            .queues
            .iter()
            .map(|q| {
                use virtio_queue::QueueT;
                (q.index, q.queue.next_avail(), q.queue.next_used())
            })
            .collect();
        let mut record = self.record.lock().unwrap();
        record.activations.push((ctx.acked_features, queues));
        record.positions.push(positions);
        drop(record);
        if self.fail_activation {
            return Err(ActivateError::BadQueues {
                device: "fake",
                reason: "test".into(),
            });
        }
        Ok(())
    }
    fn reset(&mut self) {
        self.record.lock().unwrap().resets += 1;
    }
    fn interrupt_delivery_changed(&mut self) {
        self.record.lock().unwrap().delivery_changes += 1;
    }
    fn quiesce(&mut self) -> Option<Vec<crate::virtio::QueueProgress>> {
        // Pretend the driver used queue 0 a little: avail 5, used 3.
        let record = self.record.lock().unwrap();
        let last = record.positions.last()?;
        Some(
            last.iter()
                .map(|&(index, a, u)| crate::virtio::QueueProgress {
                    index,
                    next_avail: a + 5,
                    next_used: u + 3,
                })
                .collect(),
        )
    }
}

#[derive(Debug, Default)]
struct Routes(Mutex<Vec<(u16, MsiMessage)>>);

impl MsiRouteUpdater for Routes {
    fn update_route(&self, vector: u16, message: MsiMessage) -> std::io::Result<()> {
        self.0.lock().unwrap().push((vector, message));
        Ok(())
    }
}

struct Harness {
    dev: VirtioPciDevice,
    record: Arc<Mutex<Record>>,
    irqs: Vec<EventFd>,
    routes: Arc<Routes>,
    _events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
}

fn harness_with(fail_activation: bool) -> Harness {
    let record = Arc::new(Mutex::new(Record::default()));
    let device = Box::new(FakeDevice {
        record: record.clone(),
        fail_activation,
    });
    let n = msix_vector_count(&*device);
    let irqs: Vec<EventFd> = (0..n)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let routes = Arc::new(Routes::default());
    let events = EventManager::new().unwrap();
    let dev = VirtioPciDevice::new(
        device,
        VirtioPciResources {
            mem: guest_memory(MEM_SIZE as usize),
            event_loop: events.remote_endpoint(),
            bar_address: BAR,
            msix_irqs: irqs.iter().map(|e| e.try_clone().unwrap()).collect(),
            msi_routes: routes.clone(),
        },
    )
    .unwrap();
    Harness {
        dev,
        record,
        irqs,
        routes,
        _events: events,
    }
}

fn harness() -> Harness {
    harness_with(false)
}

impl Harness {
    fn w8(&mut self, off: u64, v: u8) {
        self.dev.write(off, &[v]);
    }
    fn w16(&mut self, off: u64, v: u16) {
        self.dev.write(off, &v.to_le_bytes());
    }
    fn w32(&mut self, off: u64, v: u32) {
        self.dev.write(off, &v.to_le_bytes());
    }
    fn w64(&mut self, off: u64, v: u64) {
        // Two dword writes, as Linux does.
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }
    fn r8(&mut self, off: u64) -> u8 {
        let mut b = [0u8; 1];
        self.dev.read(off, &mut b);
        b[0]
    }
    fn r16(&mut self, off: u64) -> u16 {
        let mut b = [0u8; 2];
        self.dev.read(off, &mut b);
        u16::from_le_bytes(b)
    }
    fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn cfg32(&mut self, off: u16) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read_config(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn status(&mut self) -> u8 {
        self.r8(DEVICE_STATUS)
    }

    fn negotiate(&mut self, features: u64) -> u8 {
        self.w8(DEVICE_STATUS, ACKNOWLEDGE);
        self.w8(DEVICE_STATUS, ACKNOWLEDGE | DRIVER);
        self.w32(DRIVER_FEATURE_SELECT, 0);
        self.w32(DRIVER_FEATURE, features as u32);
        self.w32(DRIVER_FEATURE_SELECT, 1);
        self.w32(DRIVER_FEATURE, (features >> 32) as u32);
        self.w8(DEVICE_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        self.status()
    }

    /// Sets up queue `q` with `size` entries at `base` (rings inside guest memory).
    fn setup_queue(&mut self, q: u16, size: u16, base: u64) {
        self.w16(QUEUE_SELECT, q);
        self.w16(QUEUE_SIZE, size);
        self.w64(QUEUE_DESC, base);
        self.w64(QUEUE_DRIVER, base + 0x1000);
        self.w64(QUEUE_DEVICE, base + 0x2000);
        self.w16(QUEUE_ENABLE, 1);
    }

    fn driver_ok(&mut self) {
        self.w8(
            DEVICE_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
    }
}

/// Walks the capability list; returns (offset, id, virtio cfg_type) of each.
fn capabilities(h: &mut Harness) -> Vec<(u16, u8, u8)> {
    let mut out = vec![];
    let mut next = (h.cfg32(0x34) & 0xff) as u16;
    while next != 0 && out.len() < 48 {
        let head = h.cfg32(next);
        out.push((next, head as u8, (head >> 24) as u8));
        next = ((head >> 8) & 0xff) as u16;
    }
    out
}

#[test]
fn pci_identity_bar_and_capabilities() {
    let mut h = harness();
    assert_eq!(h.cfg32(0), 0x1044_1af4, "virtio vendor, device 0x1040 + 4");
    assert_eq!(h.cfg32(8) & 0xff, 1, "revision 1");
    assert_eq!(h.cfg32(0x10), BAR as u32);
    h.dev.write_config(0x10, &[0xff; 4]);
    assert_eq!(!(h.cfg32(0x10) & !0xf) + 1, VIRTIO_PCI_BAR_SIZE as u32);
    h.dev.write_config(0x10, &(BAR as u32).to_le_bytes());

    let caps = capabilities(&mut h);
    assert_eq!(caps[0].1, 0x11, "MSI-X first");
    let types: Vec<u8> = caps.iter().filter(|c| c.1 == 0x09).map(|c| c.2).collect();
    assert_eq!(types, vec![1, 2, 3, 4, 5]);
    let msix = caps[0].0;
    assert_eq!(
        (h.cfg32(msix) >> 16) & 0x7ff,
        2,
        "3 vectors: table size - 1"
    );
    assert_eq!(h.cfg32(msix + 4), 0x4000, "table in BAR 0 at 0x4000");
    let notify = caps.iter().find(|c| c.2 == 2).unwrap().0;
    assert_eq!(h.cfg32(notify + 4) & 0xff, 0, "BAR 0");
    assert_eq!(h.cfg32(notify + 8), NOTIFY_OFFSET as u32);
    assert_eq!(h.cfg32(notify + 12), 8, "two queues x 4 bytes");
    assert_eq!(h.cfg32(notify + 16), NOTIFY_OFF_MULTIPLIER);
    // Queue notify offsets give each queue its own address.
    for q in 0..2u16 {
        h.w16(QUEUE_SELECT, q);
        assert_eq!(h.r16(QUEUE_NOTIFY_OFF), q);
        assert_eq!(
            h.dev.queue_notify(usize::from(q)).unwrap().0,
            NOTIFY_OFFSET + 4 * u64::from(q)
        );
    }
    assert!(h.dev.queue_notify(2).is_none());
    assert_eq!(h.r16(NUM_QUEUES), 2);
}

#[test]
fn feature_negotiation_accepts_a_subset_with_version_1() {
    let mut h = harness();
    h.w32(DEVICE_FEATURE_SELECT, 0);
    assert_eq!(h.r32(DEVICE_FEATURE), (EVENT_IDX | 1) as u32);
    h.w32(DEVICE_FEATURE_SELECT, 1);
    assert_eq!(h.r32(DEVICE_FEATURE), 1, "VERSION_1");
    h.w32(DEVICE_FEATURE_SELECT, 2);
    assert_eq!(h.r32(DEVICE_FEATURE), 0);
    assert_eq!(h.negotiate(VERSION_1 | 1) & FEATURES_OK, FEATURES_OK);
    // Features are frozen once FEATURES_OK is set.
    h.w32(DRIVER_FEATURE_SELECT, 0);
    h.w32(DRIVER_FEATURE, 0);
    assert_eq!(h.r32(DRIVER_FEATURE), 1);
}

#[test]
fn feature_negotiation_refuses_unoffered_features_and_legacy_drivers() {
    let mut h = harness();
    assert_eq!(
        h.negotiate(VERSION_1 | 1 << 5) & FEATURES_OK,
        0,
        "feature not offered"
    );
    h.w8(DEVICE_STATUS, 0);
    assert_eq!(h.negotiate(1) & FEATURES_OK, 0, "VERSION_1 not accepted");
    // DRIVER_OK without FEATURES_OK does nothing.
    h.driver_ok();
    assert_eq!(h.status() & DRIVER_OK, 0);
    assert!(h.record.lock().unwrap().activations.is_empty());
}

#[test]
fn full_initialisation_activates_with_enabled_queues() {
    let mut h = harness();
    h.negotiate(VERSION_1 | EVENT_IDX);
    h.w16(QUEUE_SELECT, 0);
    assert_eq!(h.r16(QUEUE_SIZE), 16, "reads the maximum after reset");
    h.setup_queue(0, 8, 0x1_0000);
    h.w16(QUEUE_SELECT, 0);
    assert_eq!(h.r16(QUEUE_SIZE), 8);
    assert_eq!(h.r16(QUEUE_ENABLE), 1);
    let mut q = [0u8; 8];
    h.dev.read(QUEUE_DRIVER, &mut q);
    assert_eq!(
        u64::from_le_bytes(q),
        0x1_1000,
        "64-bit read of a 64-bit field"
    );
    h.driver_ok();
    assert_eq!(h.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(
        h.record.lock().unwrap().activations,
        vec![(VERSION_1 | EVENT_IDX, vec![(0, 8, true)])],
        "only the enabled queue, with event index as negotiated"
    );
    // Queue set-up is frozen after DRIVER_OK.
    h.w16(QUEUE_SELECT, 1);
    h.w16(QUEUE_SIZE, 4);
    assert_eq!(h.r16(QUEUE_SIZE), 8);
    // A notification written to the BAR (no ioeventfd bound) reaches the queue's eventfd.
    h.w16(NOTIFY_OFFSET, 0);
    assert_eq!(h.dev.queue_notify(0).unwrap().1.read().unwrap(), 1);
    h.w16(NOTIFY_OFFSET + 2, 0); // not a queue's address
    h.w16(NOTIFY_OFFSET + 0x400, 0);
    assert!(h.dev.queue_notify(1).unwrap().1.read().is_err());
    // Device-specific configuration goes to the device model.
    assert_eq!(h.r32(0x2000 + 4), u32::from_le_bytes([4, 5, 6, 7]));
    h.w8(0x2000 + 9, 0xab);
    assert_eq!(
        h.record.lock().unwrap().config_writes,
        vec![(9, vec![0xab])]
    );
}

#[test]
fn reset_resets_the_device_and_the_transport() {
    let mut h = harness();
    h.negotiate(VERSION_1);
    h.setup_queue(1, 4, 0x2_0000);
    h.w16(CONFIG_MSIX_VECTOR, 0);
    h.driver_ok();
    h.w8(DEVICE_STATUS, 0);
    assert_eq!(h.record.lock().unwrap().resets, 1);
    assert_eq!(h.status(), 0);
    assert_eq!(h.r16(CONFIG_MSIX_VECTOR), NO_VECTOR);
    h.w16(QUEUE_SELECT, 1);
    assert_eq!((h.r16(QUEUE_SIZE), h.r16(QUEUE_ENABLE)), (8, 0));
    h.w32(DRIVER_FEATURE_SELECT, 1);
    assert_eq!(h.r32(DRIVER_FEATURE), 0);
    // A second initialisation activates again.
    h.negotiate(VERSION_1);
    h.setup_queue(0, 16, 0x1_0000);
    h.driver_ok();
    assert_eq!(h.record.lock().unwrap().activations.len(), 2);
    // Resetting a device that was never activated does not reset the model.
    let mut fresh = harness();
    fresh.w8(DEVICE_STATUS, 0);
    assert_eq!(fresh.record.lock().unwrap().resets, 0);
}

#[test]
fn queue_size_not_a_power_of_two_is_rejected() {
    for bad in [0u16, 3, 12, 32] {
        let mut h = harness();
        h.negotiate(VERSION_1);
        h.w16(QUEUE_SELECT, 0);
        h.w16(QUEUE_SIZE, bad);
        assert_eq!(h.r16(QUEUE_SIZE), 16, "size {bad} refused");
        assert_eq!(
            h.status() & NEEDS_RESET,
            NEEDS_RESET,
            "size {bad} marks the device broken"
        );
        // A reset clears the mark.
        h.w8(DEVICE_STATUS, 0);
        assert_eq!(h.status(), 0);
    }
}

#[test]
fn queue_outside_guest_memory_marks_the_device_broken() {
    for (desc, driver, device) in [
        (MEM_SIZE - 0x10, 0x1000, 0x2000), // descriptor table runs past RAM
        (0x1000, 0xdead_0000_0000, 0x2000), // available ring far outside
        (0x1000, 0x2000, u64::MAX - 3),    // used ring wraps
        (0x1001, 0x2000, 0x3000),          // misaligned descriptor table
    ] {
        let mut h = harness();
        h.negotiate(VERSION_1);
        h.w16(QUEUE_SELECT, 0);
        h.w64(QUEUE_DESC, desc);
        h.w64(QUEUE_DRIVER, driver);
        h.w64(QUEUE_DEVICE, device);
        h.w16(QUEUE_ENABLE, 1);
        assert_eq!(h.r16(QUEUE_ENABLE), 0, "{desc:#x} {driver:#x} {device:#x}");
        assert_eq!(h.status() & NEEDS_RESET, NEEDS_RESET);
        h.driver_ok();
        let acts = h.record.lock().unwrap().activations.clone();
        assert_eq!(
            acts,
            vec![(VERSION_1, vec![])],
            "the bad queue is never handed over"
        );
    }
}

#[test]
fn failed_activation_marks_the_device_broken() {
    let mut h = harness_with(true);
    h.negotiate(VERSION_1);
    h.setup_queue(0, 16, 0x1_0000);
    h.driver_ok();
    assert_eq!(h.status() & NEEDS_RESET, NEEDS_RESET);
    h.w8(DEVICE_STATUS, 0);
    assert_eq!(
        h.record.lock().unwrap().resets,
        1,
        "a failed activation is still reset"
    );
}

#[test]
fn status_bits_cannot_be_cleared_without_reset() {
    let mut h = harness();
    h.negotiate(VERSION_1);
    h.w8(DEVICE_STATUS, ACKNOWLEDGE);
    assert_eq!(h.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK);
}

#[test]
fn msix_vectors_out_of_range_read_back_as_no_vector() {
    let mut h = harness();
    h.w16(CONFIG_MSIX_VECTOR, 2);
    assert_eq!(h.r16(CONFIG_MSIX_VECTOR), 2);
    h.w16(CONFIG_MSIX_VECTOR, 3);
    assert_eq!(h.r16(CONFIG_MSIX_VECTOR), NO_VECTOR);
    h.w16(QUEUE_SELECT, 1);
    h.w16(QUEUE_MSIX_VECTOR, 1);
    assert_eq!(h.r16(QUEUE_MSIX_VECTOR), 1);
    h.w16(QUEUE_MSIX_VECTOR, 0x7ff);
    assert_eq!(h.r16(QUEUE_MSIX_VECTOR), NO_VECTOR);
    h.w16(QUEUE_SELECT, 9);
    h.w16(QUEUE_MSIX_VECTOR, 0);
    assert_eq!(
        h.r16(QUEUE_MSIX_VECTOR),
        NO_VECTOR,
        "queue that does not exist"
    );
    assert_eq!(h.r16(QUEUE_SIZE), 0);
}

#[test]
fn device_signals_raise_the_programmed_msix_vector() {
    let mut h = harness();
    h.negotiate(VERSION_1);
    h.w16(CONFIG_MSIX_VECTOR, 0);
    h.w16(QUEUE_SELECT, 1);
    h.w16(QUEUE_MSIX_VECTOR, 2);
    // Enable MSI-X in the capability and program/unmask vector 2 in the table.
    let msix_cap = capabilities(&mut h)[0].0;
    h.dev.write_config(msix_cap + 2, &0x8000u16.to_le_bytes());
    h.w64(0x4000 + 2 * 16, 0xfee0_0000);
    h.w32(0x4000 + 2 * 16 + 8, 0x41);
    let changes = |h: &Harness| h.record.lock().unwrap().delivery_changes;
    assert_eq!(changes(&h), 0, "every vector still masked");
    assert!(h.dev.signals().queue_irqfd(1).is_none(), "vector 2 masked");
    h.w32(0x4000 + 2 * 16 + 12, 0);
    assert_eq!(changes(&h), 1, "the unmask is reported to the device");
    let direct = h
        .dev
        .signals()
        .queue_irqfd(1)
        .expect("vector 2 deliverable");
    direct.write(1).unwrap();
    assert_eq!(
        h.irqs[2].read().unwrap(),
        1,
        "queue 1's irqfd is vector 2's"
    );
    assert!(
        h.dev.signals().queue_irqfd(0).is_none(),
        "queue 0 has no vector"
    );
    assert_eq!(
        *h.routes.0.lock().unwrap(),
        vec![(
            2,
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            }
        )]
    );
    let signals = h.dev.signals().clone();
    signals.notify_queue(1).unwrap();
    assert_eq!(h.irqs[2].read().unwrap(), 1);
    assert_eq!(h.r8(0x1000), 1, "ISR: queue interrupt");
    assert_eq!(h.r8(0x1000), 0, "ISR clears on read");
    // Vector 0 is still masked: the configuration interrupt waits in the PBA.
    signals.set_needs_reset();
    assert!(h.irqs[0].read().is_err());
    assert_eq!(h.r32(0x6000), 1);
    assert_eq!(h.status() & NEEDS_RESET, NEEDS_RESET);
    assert_eq!(h.r8(0x1000), 2, "ISR: configuration change");
    // Unknown queues are ignored.
    signals.notify_queue(7).unwrap();
}

#[test]
fn odd_bar_accesses_never_panic() {
    let mut h = harness();
    let mut buf = [0xaau8; 8];
    for off in [
        0x36,
        0x37,
        0x38,
        0xfff,
        0x1001,
        0x2ffc,
        0x3ffe,
        0x5ffc,
        0x6ffc,
        0x7ffc,
        0x7fff,
        u64::MAX - 2,
    ] {
        h.dev.read(off, &mut buf);
        h.dev.write(off, &buf);
        h.dev.read(off, &mut buf[..1]);
        h.dev.write(off, &buf[..3]);
    }
    // Straddling the end of the common configuration reads zero past it.
    let mut b = [0xaau8; 4];
    h.dev.read(0x36, &mut b);
    assert_eq!(&b[2..], &[0, 0]);
}

#[test]
fn pci_configuration_access_capability_reaches_the_bar() {
    let mut h = harness();
    let cap = capabilities(&mut h).iter().find(|c| c.2 == 5).unwrap().0;
    h.dev.write_config(cap + 4, &[0]); // bar
    h.dev
        .write_config(cap + 8, &(NUM_QUEUES as u32).to_le_bytes());
    h.dev.write_config(cap + 12, &2u32.to_le_bytes());
    let mut d = [0u8; 4];
    h.dev.read_config(cap + 16, &mut d);
    assert_eq!(
        u16::from_le_bytes([d[0], d[1]]),
        2,
        "num_queues through config space"
    );
    h.dev
        .write_config(cap + 8, &(DEVICE_STATUS as u32).to_le_bytes());
    h.dev.write_config(cap + 12, &1u32.to_le_bytes());
    h.dev.write_config(cap + 16, &[ACKNOWLEDGE, 0, 0, 0]);
    assert_eq!(h.status(), ACKNOWLEDGE);
    // A window beyond the BAR is refused.
    h.dev
        .write_config(cap + 8, &(VIRTIO_PCI_BAR_SIZE as u32).to_le_bytes());
    h.dev.write_config(cap + 16, &[0xff; 4]);
    assert_eq!(h.status(), ACKNOWLEDGE);
}

/// A driven-up device: features, queue 0 (size 8) and queue 1 (size 4) set up, vectors 0 and
/// 1 for the queues and 2 for configuration changes, MSI-X enabled with vector 1 masked and
/// pending, memory and bus mastering on, DRIVER_OK.
fn running_device() -> Harness {
    let mut h = harness();
    h.dev.write_config(0x04, &(0b110u16).to_le_bytes());
    let msix = capabilities(&mut h)[0].0;
    h.dev.write_config(msix + 2, &0x8000u16.to_le_bytes());
    for v in 0..3u64 {
        let entry = 0x4000 + 16 * v;
        h.w32(entry, 0xfee0_0000 + 0x1000 * v as u32);
        h.w32(entry + 8, 0x40 + v as u32);
        h.w32(entry + 12, u32::from(v == 1));
    }
    h.negotiate(VERSION_1 | EVENT_IDX);
    h.w16(CONFIG_MSIX_VECTOR, 2);
    h.setup_queue(0, 8, 0x1_0000);
    h.w16(QUEUE_MSIX_VECTOR, 0);
    h.setup_queue(1, 4, 0x2_0000);
    h.w16(QUEUE_MSIX_VECTOR, 1);
    h.driver_ok();
    h.dev.signals().notify_queue(1).unwrap();
    h
}

#[test]
fn snapshot_round_trip_restores_transport_config_space_and_msix() {
    let mut h = running_device();
    assert_eq!(
        h.record.lock().unwrap().positions,
        vec![vec![(0, 0, 0), (1, 0, 0)]]
    );
    h.dev.quiesce();
    let saved = h.dev.save();
    assert_eq!(saved.progress.len(), 2);
    assert!(
        saved.msix.pending[0] & 0b10 != 0,
        "masked vector 1 is pending"
    );
    assert_eq!(saved.signals.isr & 1, 1, "ISR queue bit set");

    let mut fresh = harness();
    fresh.dev.restore(&saved).unwrap();
    // The restored function saves back to the very same state (it runs again, so it holds
    // no quiesced positions until its own next snapshot).
    let again = fresh.dev.save();
    assert!(again.progress.is_empty());
    assert_eq!(
        VirtioPciState {
            progress: saved.progress.clone(),
            ..again
        },
        saved
    );
    // Activated without the driver doing anything, at the saved positions.
    assert_eq!(
        fresh.record.lock().unwrap().positions,
        vec![vec![(0, 5, 3), (1, 5, 3)]]
    );
    assert_eq!(
        fresh.status(),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    );
    fresh.w16(QUEUE_SELECT, 1);
    assert_eq!(fresh.r16(QUEUE_SIZE), 4);
    assert_eq!(fresh.r16(QUEUE_MSIX_VECTOR), 1);
    assert_eq!(fresh.r16(CONFIG_MSIX_VECTOR), 2);
    assert_eq!(fresh.cfg32(0x04) & 0xffff, 0b110, "command register");
    assert_eq!(fresh.cfg32(0x10), BAR as u32);
    // MSI-X: unmasked vectors are routed again; the pending one fires once unmasked.
    let routed: Vec<u16> = fresh.routes.0.lock().unwrap().iter().map(|r| r.0).collect();
    assert_eq!(routed, vec![0, 2]);
    assert!(fresh.irqs[1].read().is_err(), "still masked");
    fresh.w32(0x4000 + 16 + 12, 0);
    assert_eq!(
        fresh.irqs[1].read().unwrap(),
        1,
        "pending interrupt delivered"
    );
    assert_eq!(fresh.r8(0x1000) & 1, 1, "ISR survives");
    // Queue kicks were raised so that chains made available before the snapshot are taken.
    for q in 0..2 {
        assert_eq!(fresh.dev.queue_notify(q).unwrap().1.read().unwrap(), 1);
    }

    // The original resumes at the positions it quiesced at.
    h.dev.resume();
    assert_eq!(
        h.record.lock().unwrap().positions[1],
        vec![(0, 5, 3), (1, 5, 3)]
    );
}

#[test]
fn a_device_not_yet_activated_round_trips_without_activation() {
    let mut h = harness();
    h.negotiate(VERSION_1);
    h.setup_queue(0, 16, 0x1_0000);
    h.dev.quiesce();
    let saved = h.dev.save();
    assert!(saved.progress.is_empty());
    let mut fresh = harness();
    fresh.dev.restore(&saved).unwrap();
    assert!(fresh.record.lock().unwrap().activations.is_empty());
    assert_eq!(fresh.dev.save(), saved);
    // The driver finishes its initialisation after the restore.
    fresh.driver_ok();
    assert_eq!(fresh.record.lock().unwrap().activations.len(), 1);
}

#[test]
fn out_of_range_saved_values_are_refused() {
    let mut h = running_device();
    h.dev.quiesce();
    let saved = h.dev.save();
    let refused = |change: &dyn Fn(&mut VirtioPciState), expect: &str| {
        let mut bad = saved.clone();
        change(&mut bad);
        let mut fresh = harness();
        let err = fresh.dev.restore(&bad).unwrap_err();
        let text = format!(
            "{err} {:?}",
            std::error::Error::source(&err).map(|s| s.to_string())
        );
        assert!(text.contains(expect), "{text:?} lacks {expect:?}");
        assert!(fresh.record.lock().unwrap().activations.is_empty());
    };
    refused(
        &|s| s.common.queues[0].size = 6,
        "size 6 is not a power of two",
    );
    refused(
        &|s| s.common.queues[0].size = 32,
        "size 32 is not a power of two",
    );
    refused(&|s| s.signals.queue_vectors[1] = 3, "vector 3 is beyond");
    refused(
        &|s| s.signals.config_vector = 0x800,
        "vector 2048 is beyond",
    );
    refused(
        &|s| s.common.queues[1].desc = MEM_SIZE,
        "outside guest memory",
    );
    refused(
        &|s| s.common.queues.pop().map(drop).unwrap_or(()),
        "1 queues",
    );
    refused(&|s| s.common.status |= 0x20, "unknown bits");
    refused(&|s| s.common.driver_features |= 1 << 40, "not a subset");
    refused(&|s| s.msix.entries.push(s.msix.entries[0]), "MSI-X");
    refused(&|s| s.msix.pending[0] |= 1 << 9, "MSI-X");
    refused(&|s| s.progress[1].index = 0, "queue 0 does not match");
    refused(&|s| s.progress[1].index = 9, "queue 9 does not match");
    refused(
        &|s| {
            s.common.status = ACKNOWLEDGE | DRIVER | FEATURES_OK;
        },
        "never activated",
    );
}

mod bar_moves;
