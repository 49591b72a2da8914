//! virtio-console's queue handler on fuzzed queues: receiveq0 (queue 0, rings in the first
//! region) gets host input, transmitq0 (queue 1, rings in the second region) goes to a writer
//! that counts bytes, or refuses them when `Config::alternate`.
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{activated_queue, guest_memory, Config, NoSignals};
use crate::virtio::console::queue_handler::ConsoleQueueHandler;
use crate::virtio::console::{ConsoleCounters, ConsoleInput};

/// Host input offered to the guest, by `Config::variant`.
const INPUT_LENGTHS: [usize; 4] = [0, 1, 100, 5000];

/// Counts what reaches it; refuses everything when `refuse` is set.
#[derive(Debug)]
struct CountingWriter {
    bytes: Arc<AtomicU64>,
    refuse: bool,
}

impl Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.refuse {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What `console_queues` saw: the handler's counters, and whether it marked itself broken.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleOutcome {
    /// The handler's counters after one pass over both queues.
    pub counters: ConsoleCounters,
    /// A queue failure stopped the handler.
    pub broken: bool,
}

/// Runs the console's queue handler once over both fuzzed queues. Panics when its counters
/// disagree with what reached the writer or exceed the input it was given.
pub fn console_queues(data: &[u8]) -> ConsoleOutcome {
    let Some((&config, image)) = data.split_first() else {
        return ConsoleOutcome::default();
    };
    let config = Config(config);
    let Some(mem) = guest_memory(image) else {
        return ConsoleOutcome::default();
    };
    let (Some(rx), Some(tx)) = (
        activated_queue(&mem, config, 0),
        activated_queue(&mem, config, 1),
    ) else {
        return ConsoleOutcome::default();
    };
    let Ok(input) = ConsoleInput::new() else {
        return ConsoleOutcome::default();
    };
    let typed = INPUT_LENGTHS[usize::from(config.variant())];
    let offered = input.enqueue(&vec![b'k'; typed]);
    let written = Arc::new(AtomicU64::new(0));
    let writer = CountingWriter {
        bytes: written.clone(),
        refuse: config.alternate(),
    };
    let mut handler = ConsoleQueueHandler::new(
        mem,
        rx,
        tx,
        input.clone(),
        Arc::new(Mutex::new(Box::new(writer))),
        Arc::new(NoSignals),
        Arc::new(AtomicBool::new(false)),
    );
    handler.serve_queues();
    let counters = handler.counters();
    assert_eq!(counters.tx_bytes, written.load(Ordering::Relaxed));
    assert!(
        counters.rx_bytes <= offered as u64,
        "{counters:?} of {offered}"
    );
    assert_eq!(
        input.pending() as u64,
        offered as u64 - counters.rx_bytes,
        "input consumed but not counted"
    );
    ConsoleOutcome {
        counters,
        broken: handler.broken(),
    }
}
