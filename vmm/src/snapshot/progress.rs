//! How far a snapshot's memory write has got: bytes copied so far and bytes to copy, shared
//! between the job thread that copies and the event loop that answers
//! `GET /vm/snapshot/progress` (and so `skiff ctl snapshot`'s progress bar).
//!
//! The total is the touched memory to write, known before the copy starts (the backing's data
//! extents, or a diff's dirty pages); a live snapshot's later passes add the pages they find,
//! and a copy that finds more than expected (a private mapping's own pages, memory touched
//! during a live first pass) raises the total with it. Both counters only grow, and a reading
//! never shows more done than total. Regions linked or reflinked count as done at once.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// The counters of one snapshot's write.
#[derive(Debug, Default)]
pub struct SnapshotProgress {
    done: AtomicU64,
    total: AtomicU64,
}

/// One reading, for the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProgressReading {
    /// Bytes of memory written (or linked) so far.
    pub bytes_done: u64,
    /// Bytes of memory to write in all, as far as known now.
    pub bytes_total: u64,
}

impl SnapshotProgress {
    /// More bytes to write.
    pub fn add_to_total(&self, bytes: u64) {
        self.total.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes written; the total grows with them if they exceed it.
    pub fn advance(&self, bytes: u64) {
        let done = self
            .done
            .fetch_add(bytes, Ordering::Relaxed)
            .saturating_add(bytes);
        self.total.fetch_max(done, Ordering::Relaxed);
    }

    /// The counters now. `done` is read first, so the clamp only hides an `advance` caught
    /// between its two steps; both values never go down from one reading to the next.
    pub fn read(&self) -> ProgressReading {
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        ProgressReading {
            bytes_done: done.min(total),
            bytes_total: total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_never_passes_total_and_both_only_grow() {
        let p = SnapshotProgress::default();
        p.add_to_total(100);
        p.advance(40);
        assert_eq!(
            p.read(),
            ProgressReading {
                bytes_done: 40,
                bytes_total: 100
            }
        );
        p.advance(90);
        assert_eq!(
            p.read(),
            ProgressReading {
                bytes_done: 130,
                bytes_total: 130
            },
            "an unexpected page raises the total"
        );
        p.add_to_total(10);
        assert_eq!(p.read().bytes_total, 140);
    }
}
