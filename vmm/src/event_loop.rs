//! The event-loop thread's subscribers (`event-manager`): the VM-end eventfd, host terminal input
//! for the serial port (or the virtio console with `--console`), and SIGINT/SIGTERM/SIGHUP
//! through a signalfd. The same loop also carries the control socket, the net, rng, console
//! and vsock queues, and each vhost-user connection's hang-up watch; each virtio-blk disk runs
//! on a thread of its own (`devices::virtio::blk`), so a slow disk never delays the others.
//! While the VM is still being built, `StartupSignalWatch` takes the stop signals instead.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

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

/// A non-blocking signalfd for the stop signals.
fn stop_signalfd() -> io::Result<OwnedFd> {
    let set = stop_signal_set();
    // SAFETY: `set` is an initialised sigset; -1 asks for a new descriptor.
    let raw: RawFd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Reads one signal from a stop-signal signalfd: its number, or `None` if none is pending.
fn read_stop_signal(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: all-zero is a valid signalfd_siginfo to be overwritten.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `size` bytes into `info`, which is that large.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    (usize::try_from(n).ok() == Some(size)).then(|| i32::try_from(info.ssi_signo).unwrap_or(0))
}

impl StopSignals {
    /// Creates the signalfd.
    pub fn new(exit: VmExitSignal) -> io::Result<Self> {
        Ok(Self {
            fd: stop_signalfd()?,
            exit,
        })
    }
}

/// Takes the stop signals while the VM is built (they are blocked in every thread from the
/// start, so one that arrives waits for a signalfd): a thread polls a signalfd and, if a stop
/// signal comes before `stop`, hands it to `on_signal`, which ends skiff. A hung start-up (a
/// backend that never answers) thus still ends at once on SIGTERM, with its verdict.
#[derive(Debug)]
pub struct StartupSignalWatch {
    stop: vmm_sys_util::eventfd::EventFd,
    thread: Option<JoinHandle<()>>,
}

impl StartupSignalWatch {
    /// Starts watching; `on_signal` gets the signal number and must end the process.
    pub fn start(on_signal: impl FnOnce(i32) + Send + 'static) -> io::Result<Self> {
        let signals = stop_signalfd()?;
        let stop = vmm_sys_util::eventfd::EventFd::new(libc::EFD_CLOEXEC)?;
        let wake = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("skiff-startup".into())
            .spawn(move || loop {
                let mut fds = [
                    libc::pollfd {
                        fd: signals.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: wake.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                // SAFETY: `fds` holds two initialised pollfds for open descriptors.
                let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                if rc < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // Stopping wins: a signal not read here stays pending for the run loop.
                if rc < 0 || fds[1].revents != 0 {
                    return;
                }
                if let Some(signal) = read_stop_signal(&signals) {
                    on_signal(signal);
                    return;
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Ends the watch; from now on the run loop's signalfd takes the stop signals.
    pub fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = thread.join();
        }
    }
}

impl Drop for StartupSignalWatch {
    fn drop(&mut self) {
        self.end();
    }
}

impl MutEventSubscriber for StopSignals {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        if let Some(signal) = read_stop_signal(&self.fd) {
            self.exit.request(GuestEnd::HostSignal(signal));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("cannot watch stop signals: {e:?}");
        }
    }
}
