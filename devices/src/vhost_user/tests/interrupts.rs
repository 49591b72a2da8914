//! Where a backend's interrupts go: the irqfd of the queue's MSI-X vector while it is
//! deliverable (no trip through skiff's event loop), the forwarder's eventfd while it is masked
//! (so the mask holds the interrupt back), switched by `interrupt_delivery_changed`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{activate_at, device, Script, SET_VRING_CALL};
use crate::virtio::device::{DeviceSignals, VirtioDevice};
use crate::virtio::test_support::{guest_memory, DriverQueue, RecordingSignals, TestLoop};

/// Signals whose queue 0 has an irqfd the test reads, deliverable while `unmasked` is set.
#[derive(Debug)]
struct VectorSignals {
    irqfd: EventFd,
    unmasked: AtomicBool,
    forwarded: RecordingSignals,
}

impl DeviceSignals for VectorSignals {
    fn notify_queue(&self, queue: u16) -> std::io::Result<()> {
        self.forwarded.notify_queue(queue)
    }

    fn notify_config(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn set_needs_reset(&self) {
        self.forwarded.set_needs_reset();
    }

    fn queue_irqfd(&self, queue: u16) -> Option<EventFd> {
        let deliverable = queue == 0 && self.unmasked.load(Ordering::SeqCst);
        deliverable.then(|| self.irqfd.try_clone().unwrap())
    }
}

impl VectorSignals {
    /// How many interrupts the backend raised through the irqfd since the last look.
    fn direct_interrupts(&self) -> u64 {
        self.irqfd.read().unwrap_or(0)
    }

    /// How many it raised through the forwarder, after turning the loop until one arrived or
    /// a second passed.
    fn forwarded_interrupts(&self, events: &mut TestLoop) -> usize {
        let mut seen = Vec::new();
        for _ in 0..20 {
            seen.extend(self.forwarded.take_notified());
            if !seen.is_empty() {
                break;
            }
            events.wait(50);
        }
        seen.len()
    }
}

#[test]
fn the_backend_interrupts_through_the_vector_irqfd_unless_the_guest_masked_it() {
    let script = Script {
        signal_calls: true,
        ..Script::good()
    };
    let mut events = TestLoop::new();
    let (mut dev, backend) = device(script, usize::MAX, &events);
    let mem = guest_memory(1 << 20);
    let driver = DriverQueue::new(&mem, 0x1_0000, 16);
    let signals = Arc::new(VectorSignals {
        irqfd: EventFd::new(EFD_NONBLOCK).unwrap(),
        unmasked: AtomicBool::new(true),
        forwarded: RecordingSignals::default(),
    });
    activate_at(&mut dev, &driver, &mem, &signals, &events, 0);
    // With REPLY_ACK the backend wrote the fd it got before acknowledging it.
    assert_eq!(
        signals.direct_interrupts(),
        1,
        "activation: the vector's irqfd"
    );
    assert_eq!(signals.forwarded_interrupts(&mut events), 0);

    // The guest masks the vector: the backend gets the forwarder's eventfd back.
    signals.unmasked.store(false, Ordering::SeqCst);
    dev.interrupt_delivery_changed();
    assert_eq!(signals.direct_interrupts(), 0, "masked: not the irqfd");
    assert_eq!(
        signals.forwarded_interrupts(&mut events),
        1,
        "masked: forwarded"
    );

    // A change that leaves the vector masked sends nothing.
    dev.interrupt_delivery_changed();
    // Unmasked again: the irqfd once more.
    signals.unmasked.store(true, Ordering::SeqCst);
    dev.interrupt_delivery_changed();
    assert_eq!(signals.direct_interrupts(), 1, "unmasked: the irqfd again");
    assert_eq!(signals.forwarded_interrupts(&mut events), 0);

    drop(dev);
    let calls = backend
        .join()
        .unwrap()
        .iter()
        .filter(|(code, _)| *code == SET_VRING_CALL)
        .count();
    assert_eq!(calls, 3, "activation, mask, unmask");
}
