//! The result lines the `virtio-abuse` cases print, and the failure line that ends the scenario.
use crate::scenario::fail;
use crate::serial;

/// One `key=value[:number]` item of a result line.
#[derive(Clone, Copy)]
pub(super) struct Part {
    pub(super) key: &'static str,
    pub(super) val: &'static str,
    pub(super) num: Option<u64>,
}

/// The items of one result line.
pub(super) struct Parts {
    pub(super) items: [Part; 64],
    pub(super) len: usize,
}

impl Parts {
    pub(super) fn new() -> Parts {
        let empty = Part {
            key: "",
            val: "",
            num: None,
        };
        Parts {
            items: [empty; 64],
            len: 0,
        }
    }

    pub(super) fn add(&mut self, key: &'static str, val: &'static str, num: Option<u64>) {
        if self.len < self.items.len() {
            self.items[self.len] = Part { key, val, num };
            self.len += 1;
        }
    }

    /// Prints `testguest: virtio-abuse <case> ok (<parts>)`.
    pub(super) fn print_ok(&self, case: &str) {
        let mut w = serial::line();
        w.str("testguest: virtio-abuse ").str(case).str(" ok (");
        for (i, p) in self.items[..self.len].iter().enumerate() {
            if i > 0 {
                w.str(" ");
            }
            w.str(p.key).str("=").str(p.val);
            match (p.val.is_empty(), p.num) {
                (_, None) => {}
                (true, Some(n)) => {
                    w.hex(n);
                }
                (false, Some(n)) => {
                    w.str(":").hex(n);
                }
            }
        }
        w.str(")\n");
    }
}

/// Fails the scenario with `case: <device> <what> <detail> <number>`.
pub(super) fn fail_case(case: &str, dev: &str, what: &str, detail: &str, num: u64) -> ! {
    fail(|w| {
        w.str(case)
            .str(": ")
            .str(dev)
            .str(" ")
            .str(what)
            .str(": ")
            .str(detail)
            .str(" ")
            .hex(num);
    })
}
