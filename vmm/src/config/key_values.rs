//! The one splitter behind every `--option key=value,...` value: commas separate the pieces,
//! each piece is `key=value` (or, where the option has one, a bare value for its default key,
//! as in `--disk FILE`), and a key the option does not have or a key given twice is refused.
//! What a value means is each option's own business (`disk.rs`, `net.rs`, ...); only the shape
//! of the list is checked here, so every option treats it the same way.

use thiserror::Error;

/// A `key=value,...` list that does not have the option's shape.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyValueError {
    /// A key the option does not have.
    #[error("unknown {option} key {key:?}: expected {}", expected.join(", "))]
    UnknownKey {
        /// The option, e.g. `--disk`.
        option: &'static str,
        /// The key as given.
        key: String,
        /// The keys the option has.
        expected: &'static [&'static str],
    },
    /// A key given twice.
    #[error("{option} {key}= given twice")]
    Repeated {
        /// The option.
        option: &'static str,
        /// The key.
        key: &'static str,
    },
    /// A piece without `=` where the option has no default key.
    #[error("{option}: {piece:?} is not key=value")]
    NotKeyValue {
        /// The option.
        option: &'static str,
        /// The piece as given.
        piece: String,
    },
}

/// How one option's `key=value` list looks.
#[derive(Debug, Clone, Copy)]
pub struct KeyValueSpec {
    /// The option's name, for messages (`--disk`).
    pub option: &'static str,
    /// The keys it has, as written in messages and returned by `split`.
    pub keys: &'static [&'static str],
    /// The key a bare value (no `=`) stands for, if any.
    pub bare: Option<&'static str>,
}

impl KeyValueSpec {
    /// Splits `s` into (key, value) pairs in the order given. Keys come back as the spec's own
    /// `&'static str`, so callers match on them; an underscore in a given key matches a dash in
    /// the spec (`virtio_id` is `virtio-id`). Empty pieces (`a=1,,b=2`, a trailing comma) are
    /// skipped.
    pub fn split<'a>(&self, s: &'a str) -> Result<Vec<(&'static str, &'a str)>, KeyValueError> {
        let mut pairs: Vec<(&'static str, &'a str)> = Vec::new();
        for piece in s.split(',').filter(|p| !p.is_empty()) {
            let (given, value) = match (piece.split_once('='), self.bare) {
                (Some((key, value)), _) => (key, value),
                (None, Some(bare)) => (bare, piece),
                (None, None) => {
                    return Err(KeyValueError::NotKeyValue {
                        option: self.option,
                        piece: piece.to_string(),
                    })
                }
            };
            let key = self
                .keys
                .iter()
                .copied()
                .find(|k| *k == given || k.replace('-', "_") == given)
                .ok_or_else(|| KeyValueError::UnknownKey {
                    option: self.option,
                    key: given.to_string(),
                    expected: self.keys,
                })?;
            if pairs.iter().any(|(k, _)| *k == key) {
                return Err(KeyValueError::Repeated {
                    option: self.option,
                    key,
                });
            }
            pairs.push((key, value));
        }
        Ok(pairs)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const SPEC: KeyValueSpec = KeyValueSpec {
        option: "--thing",
        keys: &["path", "virtio-id", "on"],
        bare: Some("path"),
    };

    #[test]
    fn pairs_in_order_with_bare_value_and_aliases() {
        assert_eq!(
            SPEC.split("/a,virtio_id=3,,on=yes,").unwrap(),
            vec![("path", "/a"), ("virtio-id", "3"), ("on", "yes")]
        );
        assert_eq!(SPEC.split("").unwrap(), vec![]);
        assert_eq!(SPEC.split("path=").unwrap(), vec![("path", "")]);
    }

    #[test]
    fn unknown_repeated_and_bare_without_default() {
        let e = SPEC.split("path=/a,color=red").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown --thing key \"color\": expected path, virtio-id, on"
        );
        assert_eq!(
            SPEC.split("/a,path=/b").unwrap_err(),
            KeyValueError::Repeated {
                option: "--thing",
                key: "path"
            }
        );
        assert_eq!(
            SPEC.split("virtio-id=1,virtio_id=2")
                .unwrap_err()
                .to_string(),
            "--thing virtio-id= given twice"
        );
        let strict = KeyValueSpec { bare: None, ..SPEC };
        assert_eq!(
            strict.split("on=1,loose").unwrap_err().to_string(),
            "--thing: \"loose\" is not key=value"
        );
    }
}
