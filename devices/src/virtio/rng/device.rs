//! `VirtioRng`: the virtio-rng device model. No configuration space and no device-specific
//! features; one queue. Activation registers the queue handler with the event loop; reset stops
//! and removes it.

use std::sync::{Arc, Mutex, PoisonError};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::queue_handler::RngQueueHandler;
use crate::virtio::device::{ActivateContext, ActivateError, QueueProgress, VirtioDevice};
use crate::virtio::subscription::LoopSubscription;

/// virtio device type of an entropy source.
const VIRTIO_ID_RNG: u32 = 4;
/// Maximum size of the request queue.
pub const RNG_QUEUE_SIZE: u16 = 256;

struct Active {
    handler: Arc<Mutex<RngQueueHandler>>,
    subscription: LoopSubscription,
}

/// A virtio entropy device backed by the host's `getrandom`.
#[derive(Default)]
pub struct VirtioRng {
    active: Option<Active>,
}

impl std::fmt::Debug for VirtioRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioRng")
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl VirtioRng {
    /// A new, inactive device.
    pub fn new() -> Self {
        Self::default()
    }
}

impl VirtioDevice for VirtioRng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn name(&self) -> &'static str {
        "rng"
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![RNG_QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.reset();
        let mut queues = ctx.queues.into_iter();
        let queue = match (queues.next(), queues.next()) {
            (Some(q), None) if q.index == 0 => q,
            _ => {
                return Err(ActivateError::BadQueues {
                    device: "rng",
                    reason: "the driver must enable exactly queue 0".into(),
                })
            }
        };
        let handler = Arc::new(Mutex::new(RngQueueHandler::new(
            ctx.mem,
            queue,
            ctx.signals,
        )));
        let subscription =
            LoopSubscription::add(&ctx.event_loop, handler.clone()).map_err(|source| {
                ActivateError::Host {
                    device: "rng",
                    source,
                }
            })?;
        self.active = Some(Active {
            handler,
            subscription,
        });
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(active) = self.active.take() {
            active
                .handler
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .stop();
            active.subscription.remove();
        }
    }

    fn quiesce(&mut self) -> Option<Vec<QueueProgress>> {
        // Requests are served synchronously: nothing is ever in flight between handler runs.
        let active = self.active.take()?;
        let progress = {
            let mut handler = active
                .handler
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            handler.stop();
            handler.progress()
        };
        active.subscription.remove();
        Some(vec![progress])
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::virtio::test_support::{guest_memory, DriverQueue, RecordingSignals, TestLoop};
    use vm_memory::{Bytes, GuestAddress};

    const QUEUE_BASE: u64 = 0x1_0000;

    fn activate(
        rng: &mut VirtioRng,
        mem: &crate::guest_memory::TrackedGuestMemory,
        driver: &DriverQueue<'_>,
        events: &TestLoop,
        signals: &Arc<RecordingSignals>,
    ) -> vmm_sys_util::eventfd::EventFd {
        let (queue, kick) = driver.activated(0);
        rng.activate(ActivateContext {
            mem: mem.clone(),
            acked_features: 1 << VIRTIO_F_VERSION_1,
            queues: vec![queue],
            signals: signals.clone(),
            event_loop: events.endpoint(),
        })
        .unwrap();
        kick
    }

    #[test]
    fn fills_requests_when_kicked_and_notifies() {
        let mem = guest_memory(1 << 20);
        let mut driver = DriverQueue::new(&mem, QUEUE_BASE, 16);
        let mut events = TestLoop::new();
        let signals = Arc::new(RecordingSignals::default());
        let mut rng = VirtioRng::new();
        let kick = activate(&mut rng, &mem, &driver, &events, &signals);
        let a = driver.add_chain(&[(0x4_0000, 32, true)]);
        let b = driver.add_chain(&[(0x5_0000, 8, true), (0x6_0000, 8, true)]);
        kick.write(1).unwrap();
        events.turn();
        assert_eq!(driver.take_used(), vec![(a, 32), (b, 16)]);
        assert_eq!(signals.take_notified(), vec![0]);
        let mut bytes = [0u8; 32];
        mem.read_slice(&mut bytes, GuestAddress(0x4_0000)).unwrap();
        assert!(bytes.iter().any(|&x| x != bytes[0]));
        assert!(!signals.needs_reset());
    }

    #[test]
    fn bad_requests_mark_the_device_broken() {
        for bad in [(0x4_0000u64, 32u32, false), (0x7fff_0000, 32, true)] {
            let mem = guest_memory(1 << 20);
            let mut driver = DriverQueue::new(&mem, QUEUE_BASE, 16);
            let mut events = TestLoop::new();
            let signals = Arc::new(RecordingSignals::default());
            let mut rng = VirtioRng::new();
            let kick = activate(&mut rng, &mem, &driver, &events, &signals);
            driver.add_chain(&[bad]);
            driver.add_chain(&[(0x5_0000, 8, true)]);
            kick.write(1).unwrap();
            events.turn();
            assert!(signals.needs_reset(), "{bad:x?}");
            assert_eq!(
                driver.take_used(),
                vec![],
                "nothing completed after the bad request"
            );
            // The handler stays quiet until reset.
            kick.write(1).unwrap();
            events.turn();
            assert_eq!(driver.take_used(), vec![]);
        }
    }

    #[test]
    fn reset_removes_the_handler_and_reactivation_serves_again() {
        let mem = guest_memory(1 << 20);
        let mut driver = DriverQueue::new(&mem, QUEUE_BASE, 16);
        let mut events = TestLoop::new();
        let signals = Arc::new(RecordingSignals::default());
        let mut rng = VirtioRng::new();
        let kick = activate(&mut rng, &mem, &driver, &events, &signals);
        events.turn();
        rng.reset();
        events.turn();
        driver.add_chain(&[(0x4_0000, 8, true)]);
        kick.write(1).unwrap();
        events.turn();
        assert_eq!(driver.take_used(), vec![], "no handler after reset");

        let mut driver = DriverQueue::new(&mem, QUEUE_BASE + 0x1_0000, 16);
        let kick = activate(&mut rng, &mem, &driver, &events, &signals);
        let head = driver.add_chain(&[(0x4_0000, 8, true)]);
        kick.write(1).unwrap();
        events.turn();
        assert_eq!(driver.take_used(), vec![(head, 8)]);
    }

    /// Activates `rng` on `driver`'s queue with a clone of `kick`, as the transport does: every
    /// activation gets the same kick eventfd (the one KVM's ioeventfd writes).
    fn activate_with_kick(
        rng: &mut VirtioRng,
        mem: &crate::guest_memory::TrackedGuestMemory,
        driver: &DriverQueue<'_>,
        events: &TestLoop,
        kick: &vmm_sys_util::eventfd::EventFd,
    ) {
        let (mut queue, _own_kick) = driver.activated(0);
        queue.kick = kick.try_clone().unwrap();
        rng.activate(ActivateContext {
            mem: mem.clone(),
            acked_features: 1 << VIRTIO_F_VERSION_1,
            queues: vec![queue],
            signals: Arc::new(RecordingSignals::default()),
            event_loop: events.endpoint(),
        })
        .unwrap();
    }

    #[test]
    fn a_kick_right_after_reactivation_reaches_the_new_handler() {
        // After a reset the old handler stays on the loop until the loop runs its messages,
        // which it does after the ready fds: it must not drain the shared kick eventfd, or a
        // driver that re-initialises and kicks quickly is never served.
        let mem = guest_memory(1 << 20);
        let mut events = TestLoop::new();
        let mut rng = VirtioRng::new();
        let kick =
            vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let driver = DriverQueue::new(&mem, QUEUE_BASE, 16);
        activate_with_kick(&mut rng, &mem, &driver, &events, &kick);
        events.turn();
        rng.reset();
        let mut driver = DriverQueue::new(&mem, QUEUE_BASE + 0x1_0000, 16);
        activate_with_kick(&mut rng, &mem, &driver, &events, &kick);
        let head = driver.add_chain(&[(0x4_0000, 8, true)]);
        kick.write(1).unwrap();
        events.turn();
        assert_eq!(driver.take_used(), vec![(head, 8)]);
    }

    #[test]
    fn activation_needs_exactly_queue_0() {
        let mem = guest_memory(1 << 20);
        let events = TestLoop::new();
        let mut rng = VirtioRng::new();
        let err = rng
            .activate(ActivateContext {
                mem,
                acked_features: 1 << VIRTIO_F_VERSION_1,
                queues: vec![],
                signals: Arc::new(RecordingSignals::default()),
                event_loop: events.endpoint(),
            })
            .unwrap_err();
        assert!(matches!(err, ActivateError::BadQueues { .. }));
        assert_eq!(rng.queue_max_sizes(), vec![RNG_QUEUE_SIZE]);
        assert_eq!(rng.device_type(), 4);
    }
}
