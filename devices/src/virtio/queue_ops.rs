//! Taking chains from an activated queue and returning them, with the failures that make a
//! queue unusable told apart from an empty one: an available index more than a queue's size
//! ahead, a head index beyond the queue, a used ring the device cannot write. A device reports
//! those with `DeviceSignals::set_needs_reset` and stops using the queue.
//!
//! Also here: `queue_slots`, which lines the enabled queues up by index and stands in for
//! queues the driver left disabled (a driver that only writes to a console may set up only
//! its transmit queue).

use std::sync::atomic::{fence, Ordering};

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
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
///
/// With `VIRTIO_RING_F_EVENT_IDX`, finding the ring empty also moves `avail_event` to where the
/// device stands, so the driver kicks for the next chain it offers (and only for that one);
/// a chain offered meanwhile is taken at once instead of waiting for a kick that never comes.
pub fn next_chain<'m>(
    queue: &mut ActivatedQueue,
    mem: &'m TrackedGuestMemory,
) -> Result<Option<DescriptorChain<&'m TrackedGuestMemory>>, QueueFailure> {
    if !queue.queue.ready() {
        return Ok(None);
    }
    let index = queue.index;
    let failure = |source| QueueFailure {
        queue: index,
        source,
    };
    // Twice at most: the second look follows an `avail_event` update that saw new chains.
    for _ in 0..2 {
        if let Some(chain) = queue.queue.iter(mem).map_err(failure)?.next() {
            return Ok(Some(chain));
        }
        if !queue.queue.event_idx_enabled()
            || !queue.queue.enable_notification(mem).map_err(failure)?
        {
            return Ok(None);
        }
    }
    Ok(None)
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

/// Size of the used ring's header (flags, idx) and of one used element.
const USED_HEADER: u64 = 4;
const USED_ELEMENT: u64 = 8;

/// Returns several chains at once, for a frame merged across receive buffers, which the
/// driver must see whole: every used element is written first and the used index moves once,
/// after them. Notifications for a queue used this way are decided by
/// `needs_notification_since` (the queue's own count of added entries does not see these).
pub fn add_used_together(
    queue: &mut ActivatedQueue,
    mem: &TrackedGuestMemory,
    entries: &[(u16, u32)],
) -> Result<(), QueueFailure> {
    let index = queue.index;
    let failure = |source| QueueFailure {
        queue: index,
        source,
    };
    let q = &mut queue.queue;
    let size = q.size();
    if size == 0 || entries.len() > usize::from(size) {
        return Err(failure(virtio_queue::Error::InvalidSize));
    }
    let ring = GuestAddress(q.used_ring());
    let mut next = q.next_used();
    for &(head, len) in entries {
        if head >= size {
            return Err(failure(virtio_queue::Error::InvalidDescriptorIndex));
        }
        let slot = USED_HEADER + u64::from(next % size) * USED_ELEMENT;
        let at = ring
            .checked_add(slot)
            .ok_or(failure(virtio_queue::Error::AddressOverflow))?;
        // `struct virtq_used_elem`: the head index as a le32, then the length.
        let mut element = [0u8; USED_ELEMENT as usize];
        element[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        element[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&element, at)
            .map_err(|e| failure(virtio_queue::Error::GuestMemory(e)))?;
        next = next.wrapping_add(1);
    }
    q.set_next_used(next);
    let idx_at = ring
        .checked_add(2)
        .ok_or(failure(virtio_queue::Error::AddressOverflow))?;
    // Release: the elements above are visible before the index that hands them over.
    mem.store(next.to_le(), idx_at, Ordering::Release)
        .map_err(|e| failure(virtio_queue::Error::GuestMemory(e)))
}

/// Whether the driver wants an interrupt for the used entries from index `since` up to the
/// queue's next used index: always without `VIRTIO_RING_F_EVENT_IDX`, else when `used_event`
/// lies in that range (the same test as virtio-queue's `needs_notification`). Errs on the side
/// of notifying when `used_event` is unreadable.
pub fn needs_notification_since(
    queue: &ActivatedQueue,
    mem: &TrackedGuestMemory,
    since: u16,
) -> bool {
    let q = &queue.queue;
    if !q.event_idx_enabled() {
        return true;
    }
    let now = q.next_used();
    // `used_event` follows the available ring's flags, idx and `size` entries.
    let at = GuestAddress(q.avail_ring()).checked_add(4 + 2 * u64::from(q.size()));
    // The used index written above must be visible before `used_event` is read.
    fence(Ordering::SeqCst);
    let Some(used_event) = at.and_then(|at| mem.load::<u16>(at, Ordering::Acquire).ok()) else {
        return true;
    };
    let used_event = u16::from_le(used_event);
    now.wrapping_sub(used_event).wrapping_sub(1) < now.wrapping_sub(since)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::virtio::blk::tests::driver::Driver;
    use crate::virtio::test_support::guest_memory;

    const SIZE: u16 = 8;

    #[test]
    fn with_event_idx_an_empty_ring_asks_for_the_next_kick() {
        let mem = guest_memory(1 << 20);
        for event_idx in [false, true] {
            let mut d = Driver::new(&mem, 0, SIZE);
            let (mut q, _kick) = d.activated(0);
            q.queue.set_event_idx(event_idx);
            for i in 0..3u64 {
                d.add_chain(&[(0x1_0000 + i * 0x100, 16, true)]);
            }
            let mut taken = 0;
            while let Some(chain) = next_chain(&mut q, &mem).unwrap() {
                add_used(&mut q, &mem, chain.head_index(), 0).unwrap();
                taken += 1;
            }
            assert_eq!(taken, 3);
            // Without the feature `avail_event` is not the device's to write.
            assert_eq!(d.avail_event(), if event_idx { 3 } else { 0 });
        }
    }

    #[test]
    fn chains_used_together_appear_at_once_and_notify_by_used_event() {
        let mem = guest_memory(1 << 20);
        let d = Driver::new(&mem, 0, SIZE);
        let (mut q, _kick) = d.activated(0);
        q.queue.set_event_idx(true);
        // Wrap the ring: positions 6, 7, 0 (mod 8).
        q.queue.set_next_used(6);
        d.set_used_event(7);
        add_used_together(&mut q, &mem, &[(1, 100), (2, 200), (3, 50)]).unwrap();
        assert_eq!(q.queue.used_idx(&mem, Ordering::Acquire).unwrap().0, 9);
        assert!(
            needs_notification_since(&q, &mem, 6),
            "used_event 7 in 6..9"
        );
        assert!(
            !needs_notification_since(&q, &mem, 8),
            "used_event 7 before 8..9"
        );
        assert_eq!(
            add_used_together(&mut q, &mem, &[(SIZE, 1)])
                .unwrap_err()
                .to_string(),
            "queue 0: invalid descriptor index"
        );
        let too_many = vec![(0u16, 0u32); usize::from(SIZE) + 1];
        assert!(add_used_together(&mut q, &mem, &too_many).is_err());
        assert_eq!(q.queue.next_used(), 9, "refused batches change nothing");
    }
}
