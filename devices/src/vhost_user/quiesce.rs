//! Stopping a vhost-user device's rings for a snapshot of the paused VM, and where each ring
//! restarts: on resume (the same VM continues, `bring_up` at these positions) or in a restored
//! VM (a new connection, the same).
//!
//! Each started ring is stopped with `SET_VRING_ENABLE 0` and `GET_VRING_BASE`; the ring is
//! stopped when the reply arrives, and the reply is the next available-ring entry the backend
//! would take. The ring restarts at that reply, not at the used index in guest memory:
//!
//! - a backend that finishes its in-flight requests before replying (skiff's own backend,
//!   qemu-storage-daemon) has completed every chain it took, so both agree: nothing is lost,
//!   nothing runs twice;
//! - a backend that completes out of order and still holds requests when it replies has used
//!   entries that are not a prefix of the available ring, so restarting at the used index would
//!   offer chains it already completed a second time; the reply never does. The held requests
//!   themselves are not completed (that needs the inflight-tracking protocol, which skiff does
//!   not use): one warning names the queue and how many.
//!
//! The reply is untrusted: it must lie within one queue size after the used index (a backend
//! cannot have taken chains the guest never made available, nor fewer than it completed), or
//! the device fails (`DEVICE_NEEDS_RESET`) instead of resuming somewhere wrong. A ring the
//! backend does not serve (it is gone and `reconnect=` will bring it back) restarts at the used
//! index, as the reconnect replay would.

use virtio_queue::QueueT;

use super::connection::{Connection, VhostUserError};
use super::session::{guest_used_index, ActiveRings};
use crate::virtio::device::QueueProgress;

/// Stops every ring of `active` on `conn` (none when the backend is not serving them) and
/// returns where each restarts.
pub(super) fn stop_rings(
    name: &str,
    mut conn: Option<&mut Connection>,
    active: &ActiveRings,
) -> Result<Vec<QueueProgress>, VhostUserError> {
    let mut progress = Vec::with_capacity(active.rings.len());
    for ring in &active.rings {
        let used = guest_used_index(ring.index, &ring.queue, &active.mem)?;
        let next_avail = match conn.as_mut() {
            Some(conn) => {
                let reply = conn.stop_ring(ring.index)?;
                let base = restart_position(ring.index, reply, used, ring.queue.size())?;
                if base != used {
                    log::warn!(
                        "virtio {name}: queue {}: the backend stopped with {} request(s) not completed; they are not offered again",
                        ring.index,
                        base.wrapping_sub(used)
                    );
                }
                base
            }
            None => used,
        };
        progress.push(QueueProgress {
            index: ring.index,
            next_avail,
            next_used: used,
        });
    }
    Ok(progress)
}

/// Where queue `queue` (of `size` entries, used index `used` in guest memory) restarts after
/// the backend answered `GET_VRING_BASE` with `reply`; refused unless `reply` is a ring index
/// at most `size` entries after `used`.
pub(super) fn restart_position(
    queue: u16,
    reply: u32,
    used: u16,
    size: u16,
) -> Result<u16, VhostUserError> {
    let bad = || VhostUserError::BadVringBase {
        queue,
        base: reply,
        used,
        size,
    };
    let base = u16::try_from(reply).map_err(|_| bad())?;
    if base.wrapping_sub(used) > size {
        return Err(bad());
    }
    Ok(base)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_backend_position_is_taken_when_it_is_within_a_queue_of_the_used_index() {
        assert_eq!(restart_position(0, 7, 7, 16).unwrap(), 7, "all completed");
        assert_eq!(restart_position(0, 9, 7, 16).unwrap(), 9, "two held");
        assert_eq!(
            restart_position(0, 23, 7, 16).unwrap(),
            23,
            "a full queue held"
        );
        // Across the 16-bit wrap.
        assert_eq!(restart_position(1, 3, 0xfffe, 16).unwrap(), 3);
    }

    #[test]
    fn a_position_no_backend_could_report_is_refused() {
        for (reply, used) in [
            (24, 7),       // more taken than the queue holds
            (6, 7),        // behind what it completed
            (0x1_0007, 7), // not a ring index
            (u32::MAX, 0xffff),
        ] {
            let e = restart_position(2, reply, used, 16).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains("queue 2") && text.contains(&reply.to_string()),
                "{text}"
            );
        }
    }
}
