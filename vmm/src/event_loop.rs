//! The event-loop thread's subscribers (`event-manager`): the VM-end eventfd, host terminal input
//! for the serial port (or the virtio console with `--console`), and SIGINT/SIGTERM/SIGHUP
//! through a signalfd. The same loop also carries the control socket and the net, rng and
//! console queues; each virtio-blk disk runs on a thread of its own (`devices::virtio::blk`).

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};

use devices::legacy::serial::Serial;
use devices::virtio::console::ConsoleInput;
use devices::vm_exit::{GuestEnd, VmExitSignal};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

/// Signals that stop skiff cleanly (terminal restored, vCPUs joined).
pub const STOP_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Wakes the loop when the VM's end is requested.
#[derive(Debug)]
pub struct ExitWatcher {
    exit: VmExitSignal,
}

impl ExitWatcher {
    /// Watches `exit`'s eventfd.
    pub fn new(exit: VmExitSignal) -> Self {
        Self { exit }
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Drain the counter; the main loop checks `is_requested` after every wake-up.
        let _ = self.exit.event().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.event(), EventSet::IN)) {
            log::error!("cannot watch the VM exit event: {e:?}");
        }
    }
}

/// Where host stdin goes.
enum InputTarget {
    /// The 16550 serial port's RX FIFO.
    Serial(Arc<Mutex<Serial>>),
    /// The virtio console's receive buffer (`--console`).
    Console(ConsoleInput),
}

/// Feeds host stdin to the guest's serial port, or to its virtio console.
pub struct SerialInput {
    target: InputTarget,
    pending: Vec<u8>,
    stdin: io::Stdin,
    closed: bool,
}

impl std::fmt::Debug for SerialInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialInput")
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl SerialInput {
    /// Reads from this process's stdin.
    pub fn new(serial: Arc<Mutex<Serial>>) -> Self {
        Self::with_target(InputTarget::Serial(serial))
    }

    /// Reads from this process's stdin into the virtio console instead of the serial port.
    pub fn for_console(console: ConsoleInput) -> Self {
        Self::with_target(InputTarget::Console(console))
    }

    fn with_target(target: InputTarget) -> Self {
        Self {
            target,
            pending: Vec::new(),
            stdin: io::stdin(),
            closed: false,
        }
    }

    /// Whether bytes wait for room in the UART's FIFO or the console's buffer (the loop then
    /// retries on a short timer).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Moves pending bytes into the UART (or console) as far as its buffer allows.
    pub fn flush_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let taken = match &self.target {
            InputTarget::Serial(serial) => {
                let mut serial = serial.lock().unwrap_or_else(PoisonError::into_inner);
                match serial.enqueue_input(&self.pending) {
                    Ok(n) => n,
                    Err(e) => {
                        log::warn!("serial input: {e}");
                        return;
                    }
                }
            }
            InputTarget::Console(console) => console.enqueue(&self.pending),
        };
        self.pending.drain(..taken);
    }
}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        // Stop reading while earlier input still waits for the guest: the loop retries it.
        if self.pending.len() < 4096 {
            let mut buf = [0u8; 256];
            match self.stdin.lock().read(&mut buf) {
                Ok(0) => self.closed = true,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.closed = true,
            }
        }
        if self.closed || events.event_set().contains(EventSet::HANG_UP) {
            let _ = ops.remove(Events::empty_raw(events.fd()));
        }
        self.flush_pending();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.stdin, EventSet::IN)) {
            log::warn!("cannot watch stdin for serial input: {e:?}");
        }
    }
}

/// Turns SIGINT/SIGTERM/SIGHUP into a clean VM end. The signals must be blocked in every thread
/// (see `block_stop_signals`) so that only the signalfd sees them.
#[derive(Debug)]
pub struct StopSignals {
    fd: OwnedFd,
    exit: VmExitSignal,
}

fn stop_signal_set() -> libc::sigset_t {
    // SAFETY: an all-zero sigset is valid storage; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid, writable storage for a sigset.
    unsafe { libc::sigemptyset(&mut set) };
    for sig in STOP_SIGNALS {
        // SAFETY: `set` was initialised above and `sig` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    set
}

/// Blocks the stop signals in the calling thread (and the threads it spawns afterwards).
pub fn block_stop_signals() -> io::Result<()> {
    let set = stop_signal_set();
    // SAFETY: `set` is an initialised sigset; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

impl StopSignals {
    /// Creates the signalfd.
    pub fn new(exit: VmExitSignal) -> io::Result<Self> {
        let set = stop_signal_set();
        // SAFETY: `set` is an initialised sigset; -1 asks for a new descriptor.
        let raw: RawFd =
            unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self { fd, exit })
    }
}

impl MutEventSubscriber for StopSignals {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // SAFETY: all-zero is a valid signalfd_siginfo to be overwritten.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`, which is that large.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if usize::try_from(n).ok() == Some(size) {
            self.exit.request(GuestEnd::HostSignal(
                i32::try_from(info.ssi_signo).unwrap_or(0),
            ));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("cannot watch stop signals: {e:?}");
        }
    }
}
