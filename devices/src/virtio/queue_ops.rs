//! Taking chains from an activated queue and returning them, with the failures that make a
//! queue unusable told apart from an empty one: an available index more than a queue's size
//! ahead, a head index beyond the queue, a used ring the device cannot write. A device reports
//! those with `DeviceSignals::set_needs_reset` and stops using the queue.
//!
//! Also here: `queue_slots`, which lines the enabled queues up by index and stands in for
//! queues the driver left disabled (a driver that only writes to a console may set up only
//! its transmit queue).

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{ActivateError, ActivatedQueue};
use crate::guest_memory::TrackedGuestMemory;

/// A queue the device can no longer use.
#[derive(Debug, Error)]
#[error("queue {queue}: {source}")]
pub struct QueueFailure {
    /// Queue index.
    pub queue: u16,
    /// What virtio-queue refused.
    #[source]
    pub source: virtio_queue::Error,
}

/// The next available chain, `None` when the driver offers none (or never enabled the queue).
pub fn next_chain<'m>(
    queue: &mut ActivatedQueue,
    mem: &'m TrackedGuestMemory,
) -> Result<Option<DescriptorChain<&'m TrackedGuestMemory>>, QueueFailure> {
    if !queue.queue.ready() {
        return Ok(None);
    }
    let index = queue.index;
    match queue.queue.iter(mem) {
        Ok(mut chains) => Ok(chains.next()),
        Err(source) => Err(QueueFailure {
            queue: index,
            source,
        }),
    }
}

/// Returns chain `head` to the driver with `len` bytes written.
pub fn add_used(
    queue: &mut ActivatedQueue,
    mem: &TrackedGuestMemory,
    head: u16,
    len: u32,
) -> Result<(), QueueFailure> {
    queue
        .queue
        .add_used(mem, head, len)
        .map_err(|source| QueueFailure {
            queue: queue.index,
            source,
        })
}

/// Asks the driver to kick the queue when it adds chains (`wanted`) or to spare the kick
/// (`VIRTQ_USED_F_NO_NOTIFY`, or no new `avail_event` with `VIRTIO_F_EVENT_IDX`). When asking
/// for kicks again, `Ok(true)` says chains arrived while they were off. A queue the driver never
/// enabled is left alone.
pub fn want_kicks(
    queue: &mut ActivatedQueue,
    mem: &TrackedGuestMemory,
    wanted: bool,
) -> Result<bool, QueueFailure> {
    if !queue.queue.ready() {
        return Ok(false);
    }
    let index = queue.index;
    let failure = |source| QueueFailure {
        queue: index,
        source,
    };
    if wanted {
        queue.queue.enable_notification(mem).map_err(failure)
    } else {
        queue
            .queue
            .disable_notification(mem)
            .map(|()| false)
            .map_err(failure)
    }
}

/// Whether the driver wants an interrupt for what was just used (no `NO_INTERRUPT` flag, or
/// the event index reached). Errs on the side of notifying when the ring is unreadable.
pub fn needs_notification(queue: &mut ActivatedQueue, mem: &TrackedGuestMemory) -> bool {
    queue.queue.needs_notification(mem).unwrap_or(true)
}

/// The device's queues in index order, one per entry of `max_sizes`: each enabled queue in its
/// slot, and for a disabled one a stand-in that is never ready and whose kick never fires.
/// An index beyond `max_sizes`, or the same index twice, is refused.
pub fn queue_slots(
    device: &'static str,
    enabled: Vec<ActivatedQueue>,
    max_sizes: &[u16],
) -> Result<Vec<ActivatedQueue>, ActivateError> {
    let bad = |reason: String| ActivateError::BadQueues { device, reason };
    let mut slots: Vec<Option<ActivatedQueue>> = max_sizes.iter().map(|_| None).collect();
    for queue in enabled {
        let index = queue.index;
        match slots.get_mut(usize::from(index)) {
            Some(slot @ None) => *slot = Some(queue),
            Some(Some(_)) => return Err(bad(format!("queue {index} given twice"))),
            None => {
                return Err(bad(format!(
                    "queue {index} does not exist (the device has {})",
                    max_sizes.len()
                )))
            }
        }
    }
    slots
        .into_iter()
        .zip(max_sizes)
        .zip(0u16..)
        .map(|((slot, &max), index)| match slot {
            Some(queue) => Ok(queue),
            None => Ok(ActivatedQueue {
                index,
                queue: Queue::new(max).map_err(|e| bad(format!("queue {index}: {e}")))?,
                kick: EventFd::new(EFD_NONBLOCK)
                    .map_err(|source| ActivateError::Host { device, source })?,
            }),
        })
        .collect()
}

/// `queue_slots` for a device with a receive queue (0) and a transmit queue (1): the pair.
pub fn rx_tx_slots(
    device: &'static str,
    enabled: Vec<ActivatedQueue>,
    max_sizes: &[u16],
) -> Result<(ActivatedQueue, ActivatedQueue), ActivateError> {
    let mut slots = queue_slots(device, enabled, max_sizes)?.into_iter();
    match (slots.next(), slots.next()) {
        (Some(rx), Some(tx)) => Ok((rx, tx)),
        _ => Err(ActivateError::BadQueues {
            device,
            reason: "no receive and transmit queues".to_string(),
        }),
    }
}
