//! The guest cannot wedge the control plane: guest output goes through a bounded buffer, so a
//! stdout nobody reads or a failing `--serial file=` neither stalls the vCPUs (pause works) nor
//! delays SIGTERM, and the loss is counted (`GET /vm`, the exit line, the status file). The
//! control socket times out idle connections, makes room when all slots are taken, and refuses
//! oversized or odd requests; `skiff ctl` has a timeout and shows the server's error text.

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use skiff_tests::{skiff_bin, testguest, Skiff};

const T: Duration = Duration::from_secs(60);

fn ctl(socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new(skiff_bin())
        .arg("ctl")
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap()
}

fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + T;
    while UnixStream::connect(socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "no socket at {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A pipe whose read end the test holds and never reads, shrunk to one page so a guest fills
/// it in about a second: (read end, write end).
fn small_pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and nothing else owns them.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ on a pipe we own; the kernel rounds up to a page.
    unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    (read, write)
}

fn bytes_in_pipe(read: &OwnedFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to `n`; `read` is an open pipe.
    unsafe { libc::ioctl(read.as_raw_fd(), libc::FIONREAD, &mut n) };
    usize::try_from(n).unwrap_or(0)
}

#[test]
fn a_stdout_nobody_reads_blocks_neither_pause_nor_sigterm() {
    skiff_tests::require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let status_file = dir.path().join("status.json");
    let (read, write) = small_pipe();
    let mut child = Command::new(skiff_bin())
        .args(["run", "--kernel"])
        .arg(testguest())
        .args(["--cmdline", "flood", "--api-socket"])
        .arg(&socket)
        .arg("--exit-status-file")
        .arg(&status_file)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill on any failure below.
    struct KillOnDrop(u32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            // SAFETY: sending a signal to a child we own (harmless if it has exited).
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
    let _guard = KillOnDrop(child.id());
    wait_for_socket(&socket);
    // The pipe is full and the writer blocked in write(2) while the guest keeps printing: the
    // bounded buffer behind it overflows, which the VM counts. (How many bytes a one-page pipe
    // holds before it blocks depends on the sizes of the writes, so that is not the signal.)
    let deadline = Instant::now() + T;
    loop {
        let out = ctl(&socket, &["status"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if v["guest_output_dropped_bytes"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest never overflowed the output buffer: {v}; {} bytes in the pipe",
            bytes_in_pipe(&read)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(bytes_in_pipe(&read) > 0, "nothing reached the pipe");

    let out = ctl(&socket, &["pause"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctl(&socket, &["resume"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctl(&socket, &["status"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["guest_output_dropped_bytes"].is_u64(), "{v}");

    let started = Instant::now();
    // SAFETY: sending a signal to a child we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let took = started.elapsed();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(took < Duration::from_secs(1), "SIGTERM took {took:?}");
    assert_eq!(status.code(), Some(143), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with("skiff: stopped by signal 15 (exit code 143); "),
        "{stderr}"
    );
    assert!(
        stderr.contains("bytes of guest output dropped (stdout was not drained)"),
        "{stderr}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&status_file).unwrap()).unwrap();
    assert_eq!(v["reason"], "signal");
    assert!(v["guest_output_dropped_bytes"].as_u64().unwrap() > 0, "{v}");
    drop(read);
}

#[test]
fn a_failing_serial_file_is_counted_and_reported() {
    skiff_tests::require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let kernel = testguest().to_string_lossy().into_owned();
    let sock = socket.to_string_lossy().into_owned();
    let vm = Skiff::spawn(&[
        "run",
        "--kernel",
        &kernel,
        "--cmdline",
        "flood",
        "--serial",
        "file=/dev/full",
        "--api-socket",
        &sock,
    ]);
    wait_for_socket(&socket);
    let deadline = Instant::now() + T;
    let dropped = loop {
        let out = ctl(&socket, &["status"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let n = v["guest_output_dropped_bytes"].as_u64().unwrap();
        if n > 0 {
            break n;
        }
        assert!(Instant::now() < deadline, "nothing counted as dropped: {v}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(dropped > 0);
    let out = ctl(&socket, &["shutdown"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = vm.wait(T);
    r.assert_code(0);
    assert_eq!(r.stderr.lines().count(), 1, "one line: {}", r.stderr);
    r.assert_stderr_has("stopped through the control API (exit code 0); ")
        .assert_stderr_has(
            "bytes of guest output dropped (serial file /dev/full: No space left on device",
        );
}

/// Sends raw bytes on a new connection and returns the whole answer.
fn raw_request(socket: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let _ = s.write_all(bytes);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn idle_and_odd_connections_do_not_lock_anyone_out() {
    skiff_tests::require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let kernel = testguest().to_string_lossy().into_owned();
    let sock = socket.to_string_lossy().into_owned();
    let mut vm = Skiff::spawn(&[
        "run",
        "--kernel",
        &kernel,
        "--cmdline",
        "hello spin",
        "--api-socket",
        &sock,
    ]);
    vm.wait_for_line("testguest: spinning", T);

    // 80 idle connections: more than the server's 64 slots.
    let mut idle: Vec<UnixStream> = (0..80)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let out = ctl(&socket, &["status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // The oldest idle ones were closed to make room, with a 408 saying why.
    let mut first = String::new();
    idle[0].set_read_timeout(Some(T)).unwrap();
    let _ = idle[0].read_to_string(&mut first);
    assert!(first.starts_with("HTTP/1.1 408"), "{first:?}");
    assert!(first.contains("make room"), "{first:?}");
    // The rest time out: within the 5 s limit and the 1 s tick, with a 408.
    let last = idle.last_mut().unwrap();
    last.set_read_timeout(Some(T)).unwrap();
    let waited = Instant::now();
    let mut text = String::new();
    let _ = last.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?}");
    assert!(text.contains("no complete request within 5 s"), "{text:?}");
    assert!(
        waited.elapsed() < Duration::from_secs(8),
        "{:?}",
        waited.elapsed()
    );
    drop(idle);

    // A 70 KB header block is refused whole, and Content-Length is digits only.
    let mut big = b"GET /vm HTTP/1.1\r\n".to_vec();
    for i in 0..7 {
        big.extend(format!("X-Pad-{i}: {}\r\n", "a".repeat(10_000)).as_bytes());
    }
    big.extend(b"\r\n");
    let answer = raw_request(&socket, &big);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    let answer = raw_request(
        &socket,
        b"PUT /vm/pause HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}",
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert!(answer.contains("Content-Length"), "{answer:?}");

    // Still serving.
    let out = ctl(&socket, &["status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctl(&socket, &["shutdown"]);
    assert!(out.status.success());
    vm.wait(T).assert_code(0);
    assert!(!socket.exists(), "the socket is removed at exit");
}

#[test]
fn ctl_gives_up_on_a_silent_server_and_shows_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    // A server that accepts and never answers.
    let silent = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&silent).unwrap();
    let holder = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        std::thread::sleep(Duration::from_secs(5));
        drop(conn);
    });
    let started = Instant::now();
    let out = ctl(&silent, &["--timeout", "1", "status"]);
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(took < Duration::from_secs(3), "ctl took {took:?}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("no answer from --api-socket") && err.contains("within 1 s"),
        "{err}"
    );
    holder.join().unwrap();

    // A server that answers 503 and closes without reading the request (the kernel resets the
    // connection): ctl shows the server's text, not the reset.
    let busy = dir.path().join("busy.sock");
    let listener = UnixListener::bind(&busy).unwrap();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let body = "{\"error\": \"too many control requests in progress\"}\n";
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(answer.as_bytes()).unwrap();
        // Let the request arrive unread, then close: a reset.
        std::thread::sleep(Duration::from_millis(200));
        drop(conn);
    });
    let out = ctl(&busy, &["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.trim_end(),
        "skiff: too many control requests in progress (HTTP 503)",
        "{err}"
    );
    server.join().unwrap();
}

#[test]
fn an_exiting_vm_leaves_another_vm_s_socket_alone() {
    skiff_tests::require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let kernel = testguest().to_string_lossy().into_owned();
    let sock = socket.to_string_lossy().into_owned();
    let mut first = Skiff::spawn(&[
        "run",
        "--kernel",
        &kernel,
        "--cmdline",
        "hello spin",
        "--api-socket",
        &sock,
    ]);
    first.wait_for_line("testguest: spinning", T);
    // The path is taken over by another server (here the test's own listener).
    std::fs::remove_file(&socket).unwrap();
    let _other = UnixListener::bind(&socket).unwrap();
    let other_inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&socket).unwrap());
    // SAFETY: sending a signal to a child we own.
    unsafe { libc::kill(first.pid() as i32, libc::SIGTERM) };
    first.wait(T).assert_code(143);
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::ino(&meta), other_inode);
}
