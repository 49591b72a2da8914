//! One connection to the host: reads request frames, dispatches them, and owns the connection's
//! shared writer. A malformed frame gets one `Error` frame and ends the connection; when the
//! connection ends, its running execs are killed.

use std::ffi::CString;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_protocol::{read_frame, write_message, ErrorCode, Message, ReadFrameError, VERSION};

use crate::exec::{self, ExecRequest, Registry};
use crate::reaper::Reaper;
use crate::{files, system};

/// What the agent shares between connections.
#[derive(Debug)]
pub struct Context {
    pub reaper: Arc<Reaper>,
    pub registry: Arc<Registry>,
    /// Whether `Resume` sets the wall clock (off when the agent shares a host's clock).
    pub set_clock: bool,
    next_conn: AtomicU64,
}

impl Context {
    pub fn new(reaper: Arc<Reaper>, set_clock: bool) -> Context {
        Context {
            reaper,
            registry: Arc::new(Registry::default()),
            set_clock,
            next_conn: AtomicU64::new(1),
        }
    }
}

/// The connection's sending half: whole frames, one at a time.
#[derive(Debug)]
pub struct Writer(Mutex<File>);

impl Writer {
    /// Sends one message for request `req`.
    pub fn send(&self, req: u32, msg: &Message<'_>) -> std::io::Result<()> {
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        write_message(&mut *w, msg, req)
    }

    /// Sends an `Error` frame (ignoring a failure to send: the connection is then gone).
    pub fn error(&self, req: u32, code: ErrorCode, message: &str) {
        let _ = self.send(
            req,
            &Message::Error {
                code,
                message: message.as_bytes(),
            },
        );
    }
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The host closed it, or sent something malformed.
    Closed,
    /// The host asked for a shutdown (already answered).
    Shutdown,
}

/// Serves requests on `stream` until it closes or the host asks for a shutdown.
pub fn serve(ctx: &Context, stream: File) -> std::io::Result<End> {
    let conn = ctx.next_conn.fetch_add(1, Ordering::Relaxed);
    let out = Arc::new(Writer(Mutex::new(stream.try_clone()?)));
    let mut reader = stream;
    let mut payload = Vec::new();
    let end = loop {
        let header = match read_frame(&mut reader, &mut payload) {
            Ok(Some(h)) => h,
            Ok(None) => break End::Closed,
            Err(ReadFrameError::Decode(e)) => {
                out.error(0, ErrorCode::Malformed, &format!("frame header: {e}"));
                break End::Closed;
            }
            Err(ReadFrameError::Truncated { got }) => {
                eprintln!("skiff-agent: connection ended inside a frame ({got} bytes)");
                break End::Closed;
            }
            Err(ReadFrameError::Io(e)) => {
                eprintln!("skiff-agent: reading the connection failed: {e}");
                break End::Closed;
            }
        };
        let msg = match Message::decode(header.kind, &payload) {
            Ok(m) => m,
            Err(e) => {
                out.error(
                    header.request,
                    ErrorCode::Malformed,
                    &format!("{:?} payload: {e}", header.kind),
                );
                break End::Closed;
            }
        };
        if handle(ctx, &out, conn, header.request, msg) == Some(End::Shutdown) {
            break End::Shutdown;
        }
    };
    ctx.registry.kill_connection(conn);
    Ok(end)
}

fn handle(ctx: &Context, out: &Arc<Writer>, conn: u64, req: u32, msg: Message<'_>) -> Option<End> {
    match msg {
        Message::Hello { .. } => {
            let agent = concat!("skiff-agent ", env!("CARGO_PKG_VERSION"));
            let _ = out.send(
                req,
                &Message::HelloReply {
                    version: u32::from(VERSION),
                    features: 0,
                    agent: agent.as_bytes(),
                },
            );
        }
        Message::Exec {
            flags,
            timeout_ms,
            cwd,
            argv,
            env,
            stdin,
        } => match exec_request(flags, timeout_ms, cwd, argv, env, stdin) {
            Ok(request) => exec::start(&ctx.reaper, &ctx.registry, out, conn, req, request),
            Err(what) => out.error(req, ErrorCode::Malformed, what),
        },
        Message::Stdin(data) => {
            if !ctx.registry.stdin(conn, req, Some(data.to_vec())) {
                out.error(req, ErrorCode::UnknownRequest, "stdin for no running exec");
            }
        }
        Message::StdinEof => {
            if !ctx.registry.stdin(conn, req, None) {
                out.error(
                    req,
                    ErrorCode::UnknownRequest,
                    "stdin end for no running exec",
                );
            }
        }
        Message::Signal(sig) => {
            if !(1..=64).contains(&sig) {
                out.error(
                    req,
                    ErrorCode::Malformed,
                    &format!("signal {sig} out of range"),
                );
            } else if ctx.registry.signal(conn, req, sig) {
                let _ = out.send(req, &Message::Done);
            } else {
                out.error(req, ErrorCode::UnknownRequest, "signal for no running exec");
            }
        }
        Message::ReadFile { path } => files::read_file(Arc::clone(out), req, path),
        Message::WriteFile {
            flags,
            mode,
            path,
            data,
        } => match files::write_file(path, flags, mode, data) {
            Ok(()) => {
                let _ = out.send(req, &Message::Done);
            }
            Err(e) => out.error(req, ErrorCode::Io, &e),
        },
        Message::Quiesce => {
            ctx.registry.signal_all(libc::SIGSTOP);
            system::sync();
            let _ = out.send(req, &Message::Done);
        }
        Message::Resume {
            unix_time_ns,
            entropy,
        } => {
            let result = system::resume(ctx.set_clock, unix_time_ns, entropy);
            ctx.registry.signal_all(libc::SIGCONT);
            match result {
                Ok(()) => {
                    let _ = out.send(req, &Message::Done);
                }
                Err(e) => out.error(req, ErrorCode::Io, &e),
            }
        }
        Message::Shutdown => {
            let _ = out.send(req, &Message::Done);
            return Some(End::Shutdown);
        }
        other => out.error(
            req,
            ErrorCode::Unsupported,
            &format!("{:?} is not a request", other.kind()),
        ),
    }
    None
}

/// Copies an `Exec` into owned C strings, adding the agent's environment under the request's.
fn exec_request(
    flags: agent_protocol::ExecFlags,
    timeout_ms: u64,
    cwd: &[u8],
    argv: agent_protocol::ByteList<'_>,
    env: agent_protocol::ByteList<'_>,
    stdin: &[u8],
) -> Result<ExecRequest, &'static str> {
    let c = |b: &[u8]| CString::new(b).map_err(|_| "a string with a NUL byte");
    let argv = argv.iter().map(c).collect::<Result<Vec<_>, _>>()?;
    let mut merged: Vec<CString> = Vec::new();
    let given = env.iter().map(c).collect::<Result<Vec<_>, _>>()?;
    if given.iter().any(|e| !e.as_bytes().contains(&b'=')) {
        return Err("an environment entry without '='");
    }
    let key = |e: &CString| {
        let b = e.as_bytes();
        b[..b.iter().position(|&x| x == b'=').unwrap_or(b.len())].to_vec()
    };
    for (k, v) in std::env::vars_os() {
        use std::os::unix::ffi::OsStrExt;
        let mut entry = k.as_bytes().to_vec();
        entry.push(b'=');
        entry.extend_from_slice(v.as_bytes());
        if let Ok(entry) = CString::new(entry) {
            if !given.iter().any(|g| key(g) == key(&entry)) {
                merged.push(entry);
            }
        }
    }
    merged.extend(given);
    // PID 1 gets no PATH from the kernel; give programs the one the agent searches.
    if !merged.iter().any(|e| e.as_bytes().starts_with(b"PATH=")) {
        merged.push(c(format!("PATH={}", crate::spawn::DEFAULT_PATH).as_bytes())?);
    }
    Ok(ExecRequest {
        argv,
        env: merged,
        cwd: if cwd.is_empty() { None } else { Some(c(cwd)?) },
        stdin: stdin.to_vec(),
        flags,
        timeout: (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms)),
    })
}
