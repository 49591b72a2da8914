//! Guest output on its way to the host: COM1 and the virtio console write into a bounded buffer
//! per host sink (stdout, a `--serial file=`), and one writer thread per sink drains it.
//!
//! The guest must never be able to stall skiff through its output: a vCPU thread writing THR
//! and the event loop moving console chains only copy bytes into memory and return. When the
//! sink is slower than the guest (nobody reads the pipe on stdout, a terminal is stopped with
//! XOFF) or failing (`/dev/full`, a closed pipe), the bytes that do not fit, or that the sink
//! refused, are dropped and counted. The count is one number for the VM (`GET /vm` shows it as
//! `guest_output_dropped_bytes`); at the end, `GuestOutputs::finish` gives the writers a short,
//! bounded time to drain and reports what was lost in one line.
//!
//! Not here: the UART and console models (`devices`), host input (`event_loop.rs`).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// Bytes a sink's buffer holds before guest output is dropped.
pub const BUFFER_BYTES: usize = 256 * 1024;
/// Most bytes one `write` to the sink takes from the buffer.
const CHUNK_BYTES: usize = 64 * 1024;
/// How long the writers may take to drain at the end of the VM, all sinks together.
pub const DRAIN_LIMIT: Duration = Duration::from_millis(300);
/// Pause before writing again to a non-blocking sink that was full.
const RETRY_FULL: Duration = Duration::from_millis(10);

/// What a writer thread and the writers feeding it share.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// The writer thread waits here for bytes or the end.
    work: Condvar,
    /// `finish` waits here for the buffer to empty.
    idle: Condvar,
    /// The VM's dropped-byte count (every sink adds to the same one).
    dropped: Arc<AtomicU64>,
}

#[derive(Debug, Default)]
struct State {
    buf: VecDeque<u8>,
    /// Bytes the writer took out of `buf` and is writing now.
    in_flight: usize,
    /// No more bytes come; the writer leaves once `buf` is empty.
    closed: bool,
    /// `finish` gave up waiting and counted what was left: the writer counts nothing more.
    abandoned: bool,
    /// The sink's first error, for the report.
    error: Option<io::Error>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn drop_bytes(&self, n: usize) {
        self.dropped
            .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// The device side of a sink: `write` copies what fits into the buffer, counts the rest as
/// dropped, and never blocks on the sink or fails.
#[derive(Debug, Clone)]
pub struct SinkWriter {
    shared: Arc<Shared>,
}

impl Write for SinkWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut state = self.shared.lock();
        if state.closed {
            drop(state);
            self.shared.drop_bytes(bytes.len());
            return Ok(bytes.len());
        }
        let room = BUFFER_BYTES.saturating_sub(state.buf.len());
        let taken = bytes.len().min(room);
        state.buf.extend(&bytes[..taken]);
        drop(state);
        if taken > 0 {
            self.shared.work.notify_one();
        }
        if taken < bytes.len() {
            self.shared.drop_bytes(bytes.len() - taken);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // The writer thread writes as soon as bytes arrive; waiting here is what must not be.
        Ok(())
    }
}

/// One host sink with its buffer and writer thread.
#[derive(Debug)]
struct OutputSink {
    /// Names the sink in the report: "stdout", "serial file /x".
    name: String,
    shared: Arc<Shared>,
}

impl OutputSink {
    fn start(name: String, mut sink: File, dropped: Arc<AtomicU64>) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            idle: Condvar::new(),
            dropped,
        });
        let thread_shared = shared.clone();
        thread::Builder::new()
            .name("skiff-output".into())
            .spawn(move || {
                devices::thread_kind::enter(devices::thread_kind::ThreadKind::GuestOutput);
                drain(&thread_shared, &mut sink)
            })?;
        Ok(Self { name, shared })
    }

    fn writer(&self) -> SinkWriter {
        SinkWriter {
            shared: self.shared.clone(),
        }
    }
}

/// The writer thread: takes chunks from the buffer and writes them to the sink until the
/// buffer is closed and empty (or abandoned).
fn drain(shared: &Shared, sink: &mut File) {
    loop {
        let chunk: Vec<u8> = {
            let mut state = shared.lock();
            while state.buf.is_empty() && !state.closed {
                state = shared
                    .work
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.buf.is_empty() || state.abandoned {
                shared.idle.notify_all();
                return;
            }
            let n = state.buf.len().min(CHUNK_BYTES);
            state.in_flight = n;
            state.buf.drain(..n).collect()
        };
        let result = write_chunk(sink, &chunk);
        let mut state = shared.lock();
        state.in_flight = 0;
        if let Err((written, e)) = result {
            if !state.abandoned {
                shared.drop_bytes(chunk.len() - written);
            }
            state.error.get_or_insert(e);
        }
        if state.buf.is_empty() {
            shared.idle.notify_all();
        }
    }
}

/// Writes all of `chunk`; on an error, how much was written and the error.
fn write_chunk(sink: &mut File, chunk: &[u8]) -> Result<(), (usize, io::Error)> {
    let mut written = 0;
    while written < chunk.len() {
        match sink.write(&chunk[written..]) {
            Ok(0) => return Err((written, io::ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A sink someone made non-blocking (a shared pipe): wait, the buffer absorbs the
            // guest meanwhile and drops what does not fit.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(RETRY_FULL),
            Err(e) => return Err((written, e)),
        }
    }
    Ok(())
}

/// The VM's guest-output sinks: stdout (shared by the serial port and the console) and files.
#[derive(Debug, Default)]
pub struct GuestOutputs {
    stdout: Option<OutputSink>,
    files: Vec<OutputSink>,
    dropped: Arc<AtomicU64>,
}

/// What `GuestOutputs::finish` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputReport {
    /// Guest output bytes that never reached their sink.
    pub dropped_bytes: u64,
    /// Why, in a few words ("stdout: Broken pipe (os error 32)", "stdout was not drained").
    pub why: Option<String>,
}

impl OutputReport {
    /// The report's one-line form, or `None` when nothing was lost.
    pub fn line(&self) -> Option<String> {
        (self.dropped_bytes > 0).then(|| {
            let why = self.why.as_deref().unwrap_or("the sink was too slow");
            format!(
                "{} bytes of guest output dropped ({why})",
                self.dropped_bytes
            )
        })
    }
}

impl GuestOutputs {
    /// A writer into the stdout sink, started on first use.
    pub fn stdout(&mut self) -> io::Result<SinkWriter> {
        if let Some(sink) = &self.stdout {
            return Ok(sink.writer());
        }
        // A descriptor of our own: the writer never takes std's stdout lock, which the rest of
        // skiff (the exit report) must be able to take while the writer is blocked.
        let fd = io::stdout().as_fd().try_clone_to_owned()?;
        let sink = OutputSink::start("stdout".into(), File::from(fd), self.dropped.clone())?;
        let writer = sink.writer();
        self.stdout = Some(sink);
        Ok(writer)
    }

    /// A writer into a new sink writing `file`, named `name` in the report.
    pub fn file(&mut self, name: String, file: File) -> io::Result<SinkWriter> {
        let sink = OutputSink::start(name, file, self.dropped.clone())?;
        let writer = sink.writer();
        self.files.push(sink);
        Ok(writer)
    }

    /// The VM's dropped-byte counter, for `GET /vm`.
    pub fn dropped_counter(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }

    /// Closes every sink and waits up to `limit`, all together, for the writers to drain;
    /// counts what is still buffered or being written then as dropped. Never blocks longer.
    pub fn finish(self, limit: Duration) -> OutputReport {
        let deadline = Instant::now() + limit;
        let mut why = None;
        for sink in self.stdout.iter().chain(&self.files) {
            let mut state = sink.shared.lock();
            state.closed = true;
            sink.shared.work.notify_one();
            while !state.buf.is_empty() || state.in_flight > 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                state = sink
                    .shared
                    .idle
                    .wait_timeout(state, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            let left = state.buf.len() + state.in_flight;
            if left > 0 {
                state.abandoned = true;
                state.buf.clear();
                sink.shared.drop_bytes(left);
                sink.shared.work.notify_one();
            }
            let reason = match (&state.error, left) {
                (Some(e), _) => Some(format!("{}: {e}", sink.name)),
                (None, 0) => None,
                (None, _) => Some(format!("{} was not drained", sink.name)),
            };
            if why.is_none() {
                why = reason;
            }
        }
        let dropped_bytes = self.dropped.load(Ordering::Relaxed);
        OutputReport {
            dropped_bytes,
            why: why.filter(|_| dropped_bytes > 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};

    fn pipe() -> (File, File) {
        let mut fds = [0i32; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 returns.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors were just created and nothing else owns them.
        unsafe {
            (
                File::from(OwnedFd::from_raw_fd(fds[0])),
                File::from(OwnedFd::from_raw_fd(fds[1])),
            )
        }
    }

    #[test]
    fn everything_arrives_when_the_sink_keeps_up() {
        let (mut read, write) = pipe();
        let mut outputs = GuestOutputs::default();
        let mut w = outputs.file("test pipe".into(), write).unwrap();
        let reader = thread::spawn(move || {
            let mut all = Vec::new();
            read.read_to_end(&mut all).unwrap();
            all
        });
        let mut sent = Vec::new();
        for i in 0..20_000u32 {
            let line = format!("line {i}\n");
            w.write_all(line.as_bytes()).unwrap();
            sent.extend_from_slice(line.as_bytes());
        }
        drop(w);
        let report = outputs.finish(Duration::from_secs(10));
        assert_eq!(report.dropped_bytes, 0, "{report:?}");
        assert_eq!(report.line(), None);
        assert_eq!(reader.join().unwrap(), sent);
    }

    #[test]
    fn a_sink_nobody_reads_never_blocks_the_writer() {
        let (read, write) = pipe();
        let mut outputs = GuestOutputs::default();
        let counter = outputs.dropped_counter();
        let mut w = outputs.file("stuck pipe".into(), write).unwrap();
        let started = Instant::now();
        // Far more than the pipe (64 KiB) and the buffer hold together.
        let block = vec![b'x'; 4096];
        for _ in 0..1024 {
            w.write_all(&block).unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "writes blocked for {:?}",
            started.elapsed()
        );
        assert!(counter.load(Ordering::Relaxed) > 0, "nothing was dropped");
        let finishing = Instant::now();
        let report = outputs.finish(Duration::from_millis(100));
        assert!(finishing.elapsed() < Duration::from_secs(2));
        // What reached the pipe plus what was dropped is what was written.
        let in_pipe = {
            let mut n: libc::c_int = 0;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&read);
            // SAFETY: FIONREAD writes one int to `n`; `fd` is an open pipe.
            let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
            assert_eq!(rc, 0);
            u64::try_from(n).unwrap()
        };
        assert_eq!(report.dropped_bytes + in_pipe, 4096 * 1024, "{report:?}");
        let line = report.line().unwrap();
        assert!(line.contains("stuck pipe was not drained"), "{line}");
        // Bytes written after the end are counted, not buffered.
        let before = counter.load(Ordering::Relaxed);
        w.write_all(b"late").unwrap();
        assert_eq!(counter.load(Ordering::Relaxed), before + 4);
    }

    #[test]
    fn a_failing_sink_is_counted_and_named() {
        let full = File::options().write(true).open("/dev/full").unwrap();
        let mut outputs = GuestOutputs::default();
        let mut w = outputs.file("serial file /dev/full".into(), full).unwrap();
        w.write_all(&[b'y'; 1000]).unwrap();
        let report = outputs.finish(Duration::from_secs(5));
        assert_eq!(report.dropped_bytes, 1000);
        let line = report.line().unwrap();
        assert!(
            line.starts_with("1000 bytes of guest output dropped (serial file /dev/full: "),
            "{line}"
        );
        assert!(line.contains("No space left"), "{line}");
    }
}
