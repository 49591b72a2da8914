//! Requirement expressions: capability names combined with `&`, `|`, `!` and parentheses, plus
//! the comparisons `cpus>=N` and `mem>=SIZE` (SIZE with K, M, G or T). `!` binds tightest, then
//! `&`, then `|`. Evaluated against a `HostCapabilities`; an unmet requirement says which
//! capabilities decided it.

use std::fmt;

use thiserror::Error;

use super::host_probe::HostCapabilities;

/// A requirement that does not parse, or that the host does not meet.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequirementError {
    #[error("unexpected {found:?} at offset {at}")]
    Unexpected { found: String, at: usize },
    #[error("unexpected end (expected a capability, '!' or '(')")]
    UnexpectedEnd,
    #[error("bad number {0:?} (expected digits, for mem>= optionally followed by K, M, G or T)")]
    Number(String),
    /// The host does not meet the requirement: `terms` names each deciding term's value.
    #[error("requires {requirement} ({terms})")]
    Unmet { requirement: String, terms: String },
}

/// One term of an expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Atom {
    /// A named capability.
    Cap(String),
    /// `cpus>=N`.
    CpusAtLeast(u64),
    /// `mem>=SIZE` (bytes).
    MemAtLeast(u64),
}

impl Atom {
    /// Whether `host` has this.
    pub fn holds(&self, host: &HostCapabilities) -> bool {
        match self {
            Atom::Cap(name) => host.has_cap(name),
            Atom::CpusAtLeast(n) => host.cpus() >= *n,
            Atom::MemAtLeast(n) => host.mem_bytes() >= *n,
        }
    }
}

/// A parsed requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Atom(Atom),
    Not(Box<Requirement>),
    And(Box<Requirement>, Box<Requirement>),
    Or(Box<Requirement>, Box<Requirement>),
}

impl fmt::Display for Atom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cap(c) => write!(f, "{c}"),
            Self::CpusAtLeast(n) => write!(f, "cpus>={n}"),
            Self::MemAtLeast(n) => write!(f, "mem>={n}"),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Atom(a) => write!(f, "{a}"),
            Self::Not(r) => write!(f, "!{r}"),
            Self::And(a, b) => write!(f, "({a} & {b})"),
            Self::Or(a, b) => write!(f, "({a} | {b})"),
        }
    }
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

fn size(s: &str) -> Result<u64, RequirementError> {
    let bad = || RequirementError::Number(s.to_string());
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        Some(b'T' | b't') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

impl Parser<'_> {
    fn skip_space(&mut self) {
        while self.text[self.pos..].starts_with(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<char> {
        self.skip_space();
        self.text[self.pos..].chars().next()
    }

    fn unexpected(&self) -> RequirementError {
        match self.text[self.pos..].chars().next() {
            None => RequirementError::UnexpectedEnd,
            Some(c) => RequirementError::Unexpected {
                found: c.to_string(),
                at: self.pos,
            },
        }
    }

    fn or(&mut self) -> Result<Requirement, RequirementError> {
        let mut left = self.and()?;
        while self.peek() == Some('|') {
            self.pos += 1;
            left = Requirement::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Requirement, RequirementError> {
        let mut left = self.unary()?;
        while self.peek() == Some('&') {
            self.pos += 1;
            left = Requirement::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Requirement, RequirementError> {
        match self.peek() {
            Some('!') => {
                self.pos += 1;
                Ok(Requirement::Not(Box::new(self.unary()?)))
            }
            Some('(') => {
                self.pos += 1;
                let inner = self.or()?;
                if self.peek() != Some(')') {
                    return Err(self.unexpected());
                }
                self.pos += 1;
                Ok(inner)
            }
            _ => self.atom(),
        }
    }

    fn atom(&mut self) -> Result<Requirement, RequirementError> {
        let word_len = |s: &str| {
            s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'))
                .unwrap_or(s.len())
        };
        let rest = &self.text[self.pos..];
        let n = word_len(rest);
        if n == 0 {
            return Err(self.unexpected());
        }
        let name = &rest[..n];
        self.pos += n;
        if !self.text[self.pos..].starts_with(">=") {
            return Ok(Requirement::Atom(Atom::Cap(name.to_string())));
        }
        self.pos += 2;
        let rest = &self.text[self.pos..];
        let m = word_len(rest);
        let value = &rest[..m];
        self.pos += m;
        match name {
            "cpus" => Ok(Requirement::Atom(Atom::CpusAtLeast(
                value
                    .parse()
                    .map_err(|_| RequirementError::Number(value.to_string()))?,
            ))),
            "mem" => Ok(Requirement::Atom(Atom::MemAtLeast(size(value)?))),
            _ => Err(RequirementError::Unexpected {
                found: format!("{name}>="),
                at: self.pos - m - 2 - n,
            }),
        }
    }
}

impl Requirement {
    /// Parses an expression.
    pub fn parse(text: &str) -> Result<Self, RequirementError> {
        let mut p = Parser { text, pos: 0 };
        let r = p.or()?;
        if p.peek().is_some() {
            return Err(p.unexpected());
        }
        Ok(r)
    }

    fn holds(&self, host: &HostCapabilities, decisive: &mut Vec<String>) -> bool {
        match self {
            Self::Atom(a) => {
                let ok = a.holds(host);
                decisive.push(if ok {
                    format!("{a}")
                } else {
                    format!("{a} unmet")
                });
                ok
            }
            Self::Not(r) => !r.holds(host, decisive),
            Self::And(a, b) => a.holds(host, decisive) & b.holds(host, decisive),
            Self::Or(a, b) => a.holds(host, decisive) | b.holds(host, decisive),
        }
    }

    /// `Ok` when the host meets it, else the reason (the requirement and each term's value).
    pub fn check(&self, host: &HostCapabilities) -> Result<(), RequirementError> {
        let mut terms = Vec::new();
        if self.holds(host, &mut terms) {
            Ok(())
        } else {
            Err(RequirementError::Unmet {
                requirement: self.to_string(),
                terms: terms.join(", "),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn host(caps: &[&str]) -> HostCapabilities {
        HostCapabilities::with(caps.iter().map(|c| c.to_string()).collect(), 2, 4 << 30)
    }

    #[test]
    fn precedence_and_evaluation() {
        let r = Requirement::parse("kvm & !hardware-kvm | cpus>=8").unwrap();
        assert_eq!(r.to_string(), "((kvm & !hardware-kvm) | cpus>=8)");
        assert!(r.check(&host(&["kvm"])).is_ok());
        let e = r
            .check(&host(&["kvm", "hardware-kvm"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cpus>=8 unmet"), "{e}");
        let r = Requirement::parse("!(a | b) & mem>=2G").unwrap();
        assert!(r.check(&host(&[])).is_ok());
        assert!(r.check(&host(&["b"])).is_err());
        assert!(Requirement::parse("mem>=8G")
            .unwrap()
            .check(&host(&[]))
            .is_err());
    }

    #[test]
    fn bad_expressions() {
        for bad in [
            "", "a &", "(a", "a b", "a | | b", "cpus>=x", "mem>=3Q", "foo>=1", "a)", "&",
        ] {
            assert!(Requirement::parse(bad).is_err(), "{bad:?}");
        }
    }
}
