//! `--partition K/N`: a deterministic slice of the suite, so a CI job matrix can spread one
//! suite over N hosts. Case i (in file order, after `--filter`) belongs to slice `i % N + 1`:
//! the N slices are disjoint and together are the whole suite, on every host alike.

use std::str::FromStr;

use thiserror::Error;

/// A malformed `--partition`.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid --partition {0:?}: expected K/N with 1 <= K <= N")]
pub struct PartitionError(String);

/// Slice `index` (1-based) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub index: usize,
    pub count: usize,
}

impl FromStr for Partition {
    type Err = PartitionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PartitionError(s.to_string());
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = k.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if index == 0 || count == 0 || index > count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

impl Partition {
    /// Whether the case at `position` (0-based, file order) is in this slice.
    pub fn contains(&self, position: usize) -> bool {
        position % self.count == self.index - 1
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn slices_cover_the_suite_once() {
        for count in 1..6 {
            let mut seen = [0; 23];
            for index in 1..=count {
                let p: Partition = format!("{index}/{count}").parse().unwrap();
                for (i, s) in seen.iter_mut().enumerate() {
                    if p.contains(i) {
                        *s += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&s| s == 1));
        }
        for bad in ["0/2", "3/2", "1/0", "1", "a/b", "1/2/3"] {
            assert!(bad.parse::<Partition>().is_err(), "{bad}");
        }
    }
}
