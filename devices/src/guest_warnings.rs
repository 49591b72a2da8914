//! A rate limit for the warnings a guest can cause (a bad queue size, a refused FEATURES_OK, a
//! BAR placed over another, a malformed chain): each device shows the first
//! `SHOWN_PER_KIND` warnings of each kind, then counts the rest, and one summary line per kind
//! gives the count when the VMM calls `summarize_all` at the VM's end (or the device goes away
//! first). Every `GuestWarnings` registers itself (weakly) for that. A guest that repeats
//! its abuse in a loop thus costs the host a bounded number of log lines per device, while the
//! first occurrences still say exactly what happened.
//!
//! Use `guest_warn!` at every guest-triggered `warn!`. Warnings about the host (a failed
//! eventfd write, a missing tap) are not the guest's doing and are not limited here.

use std::sync::{Arc, Mutex, PoisonError, Weak};

/// Warnings of one kind shown per device before the rest are only counted.
pub const SHOWN_PER_KIND: u32 = 5;

/// What to do with one warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarnVerdict {
    /// Log it.
    Show,
    /// Log it, saying that later ones of its kind are only counted.
    ShowLast,
    /// Count it (it goes to the debug level).
    Suppress,
}

#[derive(Debug)]
struct KindCount {
    kind: &'static str,
    shown: u32,
    suppressed: u64,
}

/// Every live `GuestWarnings`, for `summarize_all`.
static REGISTRY: Mutex<Vec<Weak<Counters>>> = Mutex::new(Vec::new());

#[derive(Debug)]
struct Counters {
    device: String,
    kinds: Mutex<Vec<KindCount>>,
}

/// One device's guest-warning counters, by kind.
#[derive(Debug)]
pub struct GuestWarnings {
    counters: Arc<Counters>,
}

/// Logs the summary of every device's suppressed warnings (see `GuestWarnings::summarize`).
/// The VMM calls this once the VM has stopped.
pub fn summarize_all() {
    let live: Vec<Arc<Counters>> = REGISTRY
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    for counters in live {
        counters.summarize();
    }
}

impl GuestWarnings {
    /// Counters for the device named `device` in summaries ("virtio blk", "MSI-X").
    pub fn new(device: impl Into<String>) -> Self {
        let counters = Arc::new(Counters {
            device: device.into(),
            kinds: Mutex::new(Vec::new()),
        });
        let mut registry = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
        registry.retain(|w| w.strong_count() > 0);
        registry.push(Arc::downgrade(&counters));
        Self { counters }
    }

    /// Counts a warning of `kind` and says whether to show it.
    pub fn admit(&self, kind: &'static str) -> WarnVerdict {
        let mut kinds = self
            .counters
            .kinds
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let index = match kinds.iter().position(|k| k.kind == kind) {
            Some(i) => i,
            None => {
                kinds.push(KindCount {
                    kind,
                    shown: 0,
                    suppressed: 0,
                });
                kinds.len() - 1
            }
        };
        let count = &mut kinds[index];
        if count.shown < SHOWN_PER_KIND {
            count.shown += 1;
            if count.shown == SHOWN_PER_KIND {
                WarnVerdict::ShowLast
            } else {
                WarnVerdict::Show
            }
        } else {
            count.suppressed = count.suppressed.saturating_add(1);
            WarnVerdict::Suppress
        }
    }

    /// The suppressed count of each kind that has one, and clears those counts (the kinds stay
    /// limited).
    pub fn take_suppressed(&self) -> Vec<(&'static str, u64)> {
        self.counters.take_suppressed()
    }

    /// Logs one line per kind with suppressed warnings: how many were not shown.
    pub fn summarize(&self) {
        self.counters.summarize();
    }
}

impl Counters {
    fn take_suppressed(&self) -> Vec<(&'static str, u64)> {
        let mut kinds = self.kinds.lock().unwrap_or_else(PoisonError::into_inner);
        kinds
            .iter_mut()
            .filter(|k| k.suppressed > 0)
            .map(|k| (k.kind, std::mem::take(&mut k.suppressed)))
            .collect()
    }

    fn summarize(&self) {
        for (kind, n) in self.take_suppressed() {
            log::warn!("{}: {n} more \"{kind}\" warnings suppressed", self.device);
        }
    }
}

impl Drop for GuestWarnings {
    fn drop(&mut self) {
        self.summarize();
    }
}

/// `log::warn!` for a warning a guest caused, limited by `$warnings` (an
/// `Option<&GuestWarnings>`; `None` shows every warning) under the kind `$kind` (a short
/// `&'static str` naming what the guest did).
#[macro_export]
macro_rules! guest_warn {
    ($warnings:expr, $kind:expr, $($arg:tt)+) => {{
        let warnings: Option<&$crate::guest_warnings::GuestWarnings> = $warnings;
        match warnings.map_or($crate::guest_warnings::WarnVerdict::Show, |w| w.admit($kind)) {
            $crate::guest_warnings::WarnVerdict::Show => log::warn!($($arg)+),
            $crate::guest_warnings::WarnVerdict::ShowLast => log::warn!(
                "{} (further \"{}\" warnings from this device are counted, not shown)",
                format_args!($($arg)+),
                $kind
            ),
            $crate::guest_warnings::WarnVerdict::Suppress => log::debug!($($arg)+),
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_a_few_of_each_kind_then_counts() {
        let w = GuestWarnings::new("virtio test");
        let verdicts: Vec<_> = (0..8).map(|_| w.admit("queue size")).collect();
        let shown = SHOWN_PER_KIND as usize;
        assert!(verdicts[..shown - 1]
            .iter()
            .all(|v| *v == WarnVerdict::Show));
        assert_eq!(verdicts[shown - 1], WarnVerdict::ShowLast);
        assert!(verdicts[shown..]
            .iter()
            .all(|v| *v == WarnVerdict::Suppress));
        // Another kind has its own budget.
        assert_eq!(w.admit("status clear"), WarnVerdict::Show);
        assert_eq!(w.take_suppressed(), vec![("queue size", 3)]);
        // Counts start again after a summary; the kind stays limited.
        assert_eq!(w.take_suppressed(), vec![]);
        assert_eq!(w.admit("queue size"), WarnVerdict::Suppress);
        assert_eq!(w.take_suppressed(), vec![("queue size", 1)]);
    }

    #[test]
    fn many_warnings_cost_a_bounded_number_of_lines() {
        let w = GuestWarnings::new("virtio test");
        let kinds = ["a", "b", "c"];
        let mut shown = 0;
        for i in 0..100_000 {
            if w.admit(kinds[i % 3]) != WarnVerdict::Suppress {
                shown += 1;
            }
        }
        assert_eq!(shown, 3 * SHOWN_PER_KIND);
        let total: u64 = w.take_suppressed().iter().map(|(_, n)| n).sum();
        assert_eq!(total, 100_000 - u64::from(3 * SHOWN_PER_KIND));
    }
}
