//! skiff-agent: runs commands in a guest for the host, over the agent protocol
//! (`agent-protocol`, described in docs/exec.md).
//!
//! As PID 1 of skiff's initramfs it sets the system up (`init`), connects to the host over
//! vsock, serves that connection, and powers the machine off when the host asks or goes away;
//! or, given a port to listen on (`skiff.agent=vsock:PORT`, for `skiff run --agent`), serves
//! every host connection to it until one asks for a shutdown.
//! Anywhere else it is an ordinary service:
//!
//! ```text
//! skiff-agent --listen unix:PATH | --listen vsock:PORT | --connect ADDR | --fd N [--no-set-clock]
//! ```

#[cfg(target_os = "linux")]
mod exec;
#[cfg(target_os = "linux")]
mod files;
#[cfg(target_os = "linux")]
mod init;
#[cfg(target_os = "linux")]
mod reaper;
#[cfg(target_os = "linux")]
mod session;
#[cfg(target_os = "linux")]
mod spawn;
#[cfg(target_os = "linux")]
mod system;
#[cfg(target_os = "linux")]
mod transport;

/// The agent is a Linux program; elsewhere (the workspace's Windows check) it only says so.
#[cfg(not(target_os = "linux"))]
fn main() -> std::process::ExitCode {
    eprintln!("skiff-agent: runs only on Linux");
    std::process::ExitCode::FAILURE
}

#[cfg(target_os = "linux")]
pub use linux::main;

#[cfg(target_os = "linux")]
mod linux {
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use std::process::ExitCode;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use crate::reaper::Reaper;
    use crate::session::{self, Context, End};
    use crate::transport::{self, Address, Listener};
    use crate::{init, system};

    /// How long PID 1 keeps trying to reach the host before powering off.
    const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

    const USAGE: &str = "usage: skiff-agent (--listen unix:PATH|vsock:PORT | --connect unix:PATH|vsock:CID:PORT | --fd N) [--no-set-clock]";

    #[derive(Debug)]
    enum Mode {
        Listen(Address),
        Connect(Address),
        Fd(i32),
    }

    fn parse_args(args: &[String]) -> Result<(Mode, bool), String> {
        let mut mode = None;
        let mut set_clock = true;
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
            let m = match arg.as_str() {
                "--listen" => Mode::Listen(Address::parse(value()?)?),
                "--connect" => Mode::Connect(Address::parse(value()?)?),
                "--fd" => {
                    let v = value()?;
                    Mode::Fd(
                        v.parse()
                            .map_err(|_| format!("--fd {v}: not a descriptor number"))?,
                    )
                }
                "--no-set-clock" => {
                    set_clock = false;
                    continue;
                }
                other => return Err(format!("unknown argument {other}")),
            };
            if mode.replace(m).is_some() {
                return Err("give one of --listen, --connect, --fd".into());
            }
        }
        Ok((
            mode.ok_or("give one of --listen, --connect, --fd")?,
            set_clock,
        ))
    }

    pub fn main() -> ExitCode {
        ensure_standard_fds();
        if std::process::id() == 1 {
            run_as_init();
        }
        let args: Vec<String> = std::env::args().skip(1).collect();
        if args.iter().any(|a| a == "--help" || a == "-h") {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        let (mode, set_clock) = match parse_args(&args) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("skiff-agent: {e}\n{USAGE}");
                return ExitCode::from(2);
            }
        };
        match run_service(mode, set_clock) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("skiff-agent: {e}");
                ExitCode::FAILURE
            }
        }
    }

    fn run_service(mode: Mode, set_clock: bool) -> Result<(), String> {
        let reaper = Reaper::start().map_err(|e| format!("starting the reaper: {e}"))?;
        let ctx = Arc::new(Context::new(reaper, set_clock));
        match mode {
            Mode::Fd(fd) => {
                if fd < 3 {
                    return Err(format!("--fd {fd}: a standard stream is not a connection"));
                }
                // SAFETY: the caller handed this descriptor to the agent to own.
                let stream = unsafe { File::from_raw_fd(fd) };
                serve_one(&ctx, stream)
            }
            Mode::Connect(addr) => {
                let stream =
                    transport::connect(&addr).map_err(|e| format!("connecting to {addr}: {e}"))?;
                serve_one(&ctx, stream)
            }
            Mode::Listen(addr) => {
                let listener =
                    Listener::bind(&addr).map_err(|e| format!("listening on {addr}: {e}"))?;
                loop {
                    let stream = listener
                        .accept()
                        .map_err(|e| format!("accepting on {addr}: {e}"))?;
                    let ctx = Arc::clone(&ctx);
                    let spawned =
                        std::thread::Builder::new()
                            .name("connection".into())
                            .spawn(move || match session::serve(&ctx, stream) {
                                Ok(End::Shutdown) => std::process::exit(0),
                                Ok(End::Closed) => {}
                                Err(e) => eprintln!("skiff-agent: connection: {e}"),
                            });
                    if let Err(e) = spawned {
                        eprintln!("skiff-agent: no thread for a connection: {e}");
                    }
                }
            }
        }
    }

    fn serve_one(ctx: &Context, stream: File) -> Result<(), String> {
        session::serve(ctx, stream)
            .map(|_| ())
            .map_err(|e| format!("serving: {e}"))
    }

    /// PID 1: set up, reach the host, serve it, power off. Never returns: PID 1 exiting would
    /// panic the kernel.
    fn run_as_init() -> ! {
        let cfg = init::setup();
        let Ok(reaper) = Reaper::start() else {
            eprintln!("skiff-agent: cannot start the reaper thread");
            system::power_off();
        };
        let ctx = Arc::new(Context::new(reaper, true));
        if let Address::Vsock {
            cid: libc::VMADDR_CID_ANY,
            ..
        } = cfg.agent
        {
            serve_listening(&ctx, &cfg.agent);
        }
        let started = Instant::now();
        let stream = loop {
            match transport::connect(&cfg.agent) {
                Ok(s) => break s,
                Err(e) if started.elapsed() > CONNECT_PATIENCE => {
                    eprintln!("skiff-agent: cannot reach the host at {}: {e}", cfg.agent);
                    system::power_off();
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        eprintln!("skiff-agent: connected to {}", cfg.agent);
        match session::serve(&ctx, stream) {
            Ok(End::Shutdown) => {}
            Ok(End::Closed) => eprintln!("skiff-agent: the host closed the connection"),
            Err(e) => eprintln!("skiff-agent: {e}"),
        }
        ctx.registry.signal_all(libc::SIGKILL);
        system::power_off();
    }

    /// PID 1 in a long-running VM (`skiff run --agent`): serves every host connection to the
    /// port, each on a thread, until one asks for a shutdown.
    fn serve_listening(ctx: &Arc<Context>, addr: &Address) -> ! {
        let listener = match Listener::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("skiff-agent: cannot listen on {addr}: {e}");
                system::power_off();
            }
        };
        eprintln!("skiff-agent: listening on {addr}");
        loop {
            let stream = match listener.accept() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("skiff-agent: accepting on {addr}: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let ctx = Arc::clone(ctx);
            let spawned = std::thread::Builder::new()
                .name("connection".into())
                .spawn(move || {
                    if let Ok(End::Shutdown) = session::serve(&ctx, stream) {
                        ctx.registry.signal_all(libc::SIGKILL);
                        system::power_off();
                    }
                });
            if let Err(e) = spawned {
                eprintln!("skiff-agent: no thread for a connection: {e}");
            }
        }
    }

    /// Opens /dev/null on any of fds 0-2 that is closed, so pipes never take those numbers.
    fn ensure_standard_fds() {
        for fd in 0..3 {
            // SAFETY: F_GETFD only queries the descriptor.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                // SAFETY: a NUL-terminated path; the lowest free number (this one) is taken.
                unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
            }
        }
    }
}
