//! The harness skiff's end-to-end tests use: build and locate the `skiff` binary and the guest
//! images, start skiff, wait for serial lines with a timeout, collect the exit code, and kill the
//! VM on drop so a failing test never leaves one running.
//!
//! Tests that need KVM call `require_kvm()`, which fails (never skips) when `/dev/kvm` is absent.
//! `open_pty()` gives tests that need a terminal (raw mode, progress bars) a pseudo-terminal.
//! The harness drives KVM VMs, so it is Unix-only (the Windows tests live in `vmm`).
#![cfg(unix)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// A new pseudo-terminal, 120 columns by 40 rows: (master, slave). Give the slave to skiff as
/// its stdin or stderr (a terminal: skiff forwards keystrokes to the guest, draws progress bars)
/// and read or write the other side on the master.
pub fn open_pty() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (-1, -1);
    let size = libc::winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two new descriptors into the out-pointers and reads `size`; the
    // name and termios arguments may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty failed");
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    }
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Fails the test unless `/dev/kvm` exists: KVM tests must not pass vacuously.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: this test needs KVM and must not be skipped"
    );
}

/// Whether `/dev/kvm` is PVM-backed (`/sys/module/kvm_pvm`): guest kernel mode is emulated,
/// Linux user space cannot run, and guests read the host's TSC (KVM's TSC offset does not apply,
/// so a restored guest's TSC shows the time between snapshot and restore).
pub fn pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

fn run_build(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run the build of {what}: {e}"));
    assert!(
        out.status.success(),
        "building {what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The release `skiff` binary, built once per test process.
pub fn skiff_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("SKIFF_BIN") {
            return PathBuf::from(p);
        }
        let root = workspace_root();
        run_build(
            Command::new(env!("CARGO")).current_dir(&root).args([
                "build",
                "--release",
                "-p",
                "vmm",
                "--bin",
                "skiff",
            ]),
            "skiff",
        );
        root.join("target/release/skiff")
    })
}

/// The test guest ELF (`images/testguest`), built once per test process.
pub fn testguest() -> &'static Path {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        if let Ok(p) = std::env::var("SKIFF_TESTGUEST") {
            return PathBuf::from(p);
        }
        let dir = workspace_root().join("images/testguest");
        run_build(
            Command::new(env!("CARGO"))
                .current_dir(&dir)
                .env_remove("RUSTFLAGS")
                .env_remove("CARGO_TARGET_DIR")
                .args(["build", "--release", "--target", "x86_64-unknown-none"]),
            "the test guest",
        );
        dir.join("target/x86_64-unknown-none/release/testguest")
    })
}

/// The minimal Linux kernel and initramfs (`images/linux/build.sh`, cached by config hash).
#[derive(Debug, Clone)]
pub struct LinuxImages {
    /// ELF vmlinux (PVH).
    pub vmlinux: PathBuf,
    /// bzImage.
    pub bzimage: PathBuf,
    /// busybox initramfs.
    pub initramfs: PathBuf,
    /// A 10 KiB initramfs whose static `/init` prints a marker and powers off: for hosts where
    /// unpacking the busybox one costs minutes (PVM, whose kernel mode is emulated).
    pub initramfs_min: PathBuf,
}

/// Builds (or finds cached) Linux images.
pub fn linux_images() -> &'static LinuxImages {
    static IMAGES: OnceLock<LinuxImages> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let dir = match std::env::var("SKIFF_LINUX_DIR") {
            Ok(d) => PathBuf::from(d),
            Err(_) => {
                let script = workspace_root().join("images/linux/build.sh");
                let out = Command::new("bash")
                    .arg(&script)
                    .stderr(Stdio::inherit())
                    .output()
                    .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
                assert!(out.status.success(), "{} failed", script.display());
                let stdout = String::from_utf8_lossy(&out.stdout);
                PathBuf::from(stdout.lines().last().unwrap_or_default().trim())
            }
        };
        LinuxImages {
            vmlinux: dir.join("vmlinux"),
            bzimage: dir.join("bzImage"),
            initramfs: dir.join("initramfs.cpio.gz"),
            initramfs_min: dir.join("initramfs-min.cpio"),
        }
    })
}

/// What a finished skiff run produced.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Exit code (None if killed by a signal).
    pub code: Option<i32>,
    /// Everything written to stdout (the serial console by default).
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
}

impl Finished {
    /// Asserts the run exited with `code`, showing the output otherwise.
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "unexpected exit code\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// Asserts stdout contains `text`.
    pub fn assert_stdout_has(&self, text: &str) -> &Self {
        assert!(
            self.stdout.contains(text),
            "stdout lacks {text:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// Asserts stderr contains `text`.
    pub fn assert_stderr_has(&self, text: &str) -> &Self {
        assert!(
            self.stderr.contains(text),
            "stderr lacks {text:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// A running skiff process. Killed on drop.
#[derive(Debug)]
pub struct Skiff {
    child: Child,
    started: Instant,
    lines: Receiver<String>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<thread::JoinHandle<()>>,
}

fn pump<R: Read + Send + 'static>(
    source: R,
    sink: Arc<Mutex<String>>,
    lines: Option<std::sync::mpsc::Sender<String>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(source);
        let mut buf = Vec::new();
        while let Ok(n) = reader.read_until(b'\n', &mut buf) {
            if n == 0 {
                break;
            }
            let line = String::from_utf8_lossy(&buf).into_owned();
            sink.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push_str(&line);
            if let Some(tx) = &lines {
                let _ = tx.send(line.trim_end().to_string());
            }
            buf.clear();
        }
    })
}

impl Skiff {
    /// Starts `skiff` with `args` (stdin closed).
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Self {
        Self::spawn_command(Command::new(skiff_bin()).args(args))
    }

    /// Starts a prepared command (for wrappers such as `unshare` or `setpriv`), stdin closed.
    pub fn spawn_command(cmd: &mut Command) -> Self {
        Self::spawn_command_with_stdin(cmd.stdin(Stdio::null()))
    }

    /// Starts a prepared command with the stdin it already has (a terminal, say).
    pub fn spawn_command_with_stdin(cmd: &mut Command) -> Self {
        let started = Instant::now();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start skiff: {e}"));
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = channel();
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(pump(out, stdout.clone(), Some(tx)));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(pump(err, stderr.clone(), None));
        }
        Self {
            child,
            started,
            lines,
            stdout,
            stderr,
            readers,
        }
    }

    /// Waits until a stdout line contains `pattern`; returns that line.
    pub fn wait_for_line(&mut self, pattern: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(pattern) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!(
                        "no line with {pattern:?} within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                        self.stdout_text(),
                        self.stderr_text()
                    );
                }
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "skiff ended before printing {pattern:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.stdout_text(),
                    self.stderr_text()
                ),
            }
        }
    }

    /// stdout so far.
    pub fn stdout_text(&self) -> String {
        self.stdout
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for exit (killing the VM after `timeout`) and collects its output.
    pub fn wait(mut self, timeout: Duration) -> Finished {
        let deadline = self.started + timeout;
        let status: Option<ExitStatus> = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break None;
                }
                Ok(None) => thread::sleep(Duration::from_millis(2)),
                Err(e) => panic!("waiting for skiff failed: {e}"),
            }
        };
        let elapsed = self.started.elapsed();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let finished = Finished {
            code: status.and_then(|s| s.code()),
            stdout: self.stdout_text(),
            stderr: self.stderr_text(),
            elapsed,
        };
        assert!(
            status.is_some(),
            "skiff did not exit within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            finished.stdout,
            finished.stderr
        );
        finished
    }
}

impl Drop for Skiff {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs skiff with `args` to completion (killed after `timeout`).
pub fn run_skiff<S: AsRef<std::ffi::OsStr>>(args: &[S], timeout: Duration) -> Finished {
    Skiff::spawn(args).wait(timeout)
}

/// Runs the test guest with `cmdline` and extra skiff arguments.
pub fn run_testguest(cmdline: &str, extra: &[&str], timeout: Duration) -> Finished {
    require_kvm();
    let kernel = testguest().to_string_lossy().into_owned();
    let mut args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        kernel,
        "--cmdline".into(),
        cmdline.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    run_skiff(&args, timeout)
}

/// A network namespace of the test's own with a tap in it, removed on drop: network tests
/// never touch the host's interfaces.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace and a `vnet_hdr` tap named `tap` in it, up.
    pub fn new(tap: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("skiff-test-{}-{n}", std::process::id());
        let ip = |args: &[&str]| {
            let ok = Command::new("ip").args(args).status().map(|s| s.success());
            assert!(matches!(ok, Ok(true)), "ip {args:?} failed");
        };
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ip(&[
            "-n", &ns.name, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr",
        ]);
        ip(&["-n", &ns.name, "link", "set", tap, "up"]);
        ns
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Where Debian packages put virtiofsd: QEMU's (qemu-system-common, QEMU 7.2 and earlier) and
/// the standalone Rust one (the `virtiofsd` package).
const VIRTIOFSD_PATHS: [&str; 2] = ["/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd"];

/// The virtiofsd binary: `SKIFF_VIRTIOFSD`, or the first of `VIRTIOFSD_PATHS` that exists.
/// Panics (the test fails, never skips) when there is none.
pub fn virtiofsd_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SKIFF_VIRTIOFSD") {
        return PathBuf::from(p);
    }
    VIRTIOFSD_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("virtiofsd is not installed (looked in {VIRTIOFSD_PATHS:?}); run scripts/setup")
        })
}

/// The vhost-device-rng version `scripts/setup` installs (keep the two in step).
pub const VHOST_DEVICE_RNG_VERSION: &str = "0.1.0";

/// The vhost-device-rng binary: `SKIFF_VHOST_DEVICE_RNG`, or where `scripts/setup` installs it
/// (`${SKIFF_CACHE:-$HOME/.cache/skiff}/vhost-device-rng-VERSION/bin`). Panics (the test fails,
/// never skips) when it is missing.
pub fn vhost_device_rng_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SKIFF_VHOST_DEVICE_RNG") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("SKIFF_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/skiff")))
        .unwrap_or_else(|| PathBuf::from(".cache/skiff"));
    let bin = cache
        .join(format!("vhost-device-rng-{VHOST_DEVICE_RNG_VERSION}"))
        .join("bin/vhost-device-rng");
    assert!(
        bin.exists(),
        "vhost-device-rng is not installed at {}; run scripts/setup",
        bin.display()
    );
    bin
}

/// A vhost-user backend process a test started (skiff's own, qemu-storage-daemon, ...),
/// killed on drop; its stderr is kept for messages.
#[derive(Debug)]
pub struct Backend {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Backend {
    /// Starts `cmd` and waits (up to 10 s) until `socket` exists as a socket.
    pub fn start(cmd: &mut Command, socket: &Path) -> Self {
        use std::os::unix::fs::FileTypeExt;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the backend {cmd:?}: {e}"));
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(err) = child.stderr.take() {
            pump(err, stderr.clone(), None);
        }
        let backend = Self { child, stderr };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready = std::fs::metadata(socket).is_ok_and(|m| m.file_type().is_socket());
            if ready {
                return backend;
            }
            assert!(
                Instant::now() < deadline,
                "the backend did not create {} within 10 s; stderr:\n{}",
                socket.display(),
                backend.stderr_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `skiff vhost-user-blk` serving `disk` on `socket`.
    pub fn skiff_blk(socket: &Path, disk: &Path, extra: &[&str]) -> Self {
        let mut cmd = Command::new(skiff_bin());
        cmd.arg("vhost-user-blk")
            .arg("--socket")
            .arg(socket)
            .arg("--disk")
            .arg(disk)
            .args(extra);
        Self::start(&mut cmd, socket)
    }

    /// `qemu-storage-daemon` exporting `image` (raw) as vhost-user-blk on `socket`, writable.
    pub fn qemu_storage_daemon(socket: &Path, image: &Path) -> Self {
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=d0",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on",
                socket.display()
            ));
        Self::start(&mut cmd, socket)
    }

    /// QEMU's virtiofsd sharing `dir` on `socket`, with no caching (so every read reaches the
    /// file). Fails the test if virtiofsd is not installed (`scripts/setup` installs it).
    pub fn virtiofsd(socket: &Path, dir: &Path) -> Self {
        let mut cmd = Command::new(virtiofsd_bin());
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg("-o")
            .arg(format!("source={}", dir.display()))
            .args(["-o", "cache=none", "-o", "sandbox=chroot"]);
        Self::start(&mut cmd, socket)
    }

    /// rust-vmm's `vhost-device-rng` serving `/dev/urandom` on `socket`. It appends the socket's
    /// index to the path it is given, so it is started with `socket` less its final `0`. Fails
    /// the test if it is not installed (`scripts/setup` installs it).
    pub fn vhost_device_rng(socket: &Path) -> Self {
        let text = socket.to_string_lossy();
        let base = text
            .strip_suffix('0')
            .unwrap_or_else(|| panic!("vhost-device-rng sockets end in 0, not {text}"));
        let mut cmd = Command::new(vhost_device_rng_bin());
        cmd.arg("--socket-path").arg(base);
        Self::start(&mut cmd, socket)
    }

    /// What the backend wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the backend and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Live processes (not zombies) whose command line mentions `path`: (pid, command line). Tests
/// use it to show that nothing they started (a VM, a virtiofsd) outlives its run.
pub fn processes_mentioning(path: &Path) -> Vec<(u32, String)> {
    let needle = path.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if cmdline.contains(&needle) && !zombie {
            out.push((pid, cmdline));
        }
    }
    out
}
