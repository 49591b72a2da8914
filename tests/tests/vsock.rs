//! virtio-vsock end to end: the test guest's vsock driver against host programs on the Unix
//! sockets of the hybrid convention (`PATH_P` for guest connections, `CONNECT P` on `PATH`
//! for host connections): data both ways, 64 connections at once, a host that stops reading
//! (skiff's memory stays bounded, the guest waits for credit), a host that goes away, guest
//! abuse, and snapshot/restore (listener back, connections reset by a transport-reset event).

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use skiff_tests::{require_kvm, run_skiff, skiff_bin, testguest, Skiff};

const T: Duration = Duration::from_secs(120);
const CID: u64 = 42;

/// The guest scenarios' pattern: byte i of connection k.
fn pattern(k: usize, i: u64) -> u8 {
    ((i * 7 + k as u64 * 13 + i / 251) & 0xff) as u8
}

fn port_path(base: &Path, port: u32) -> PathBuf {
    PathBuf::from(format!("{}_{port}", base.display()))
}

/// Starts the test guest with `--vsock cid=CID,socket=PATH`.
fn start(cmdline: &str, socket: &Path, extra: &[&str]) -> Skiff {
    require_kvm();
    let kernel = testguest().to_string_lossy().into_owned();
    let vsock = format!("cid={CID},socket={}", socket.display());
    let mut args = vec![
        "run",
        "--kernel",
        &kernel,
        "--cmdline",
        cmdline,
        "--vsock",
        &vsock,
    ];
    args.extend_from_slice(extra);
    Skiff::spawn(&args)
}

/// Echoes every connection to the listener at `path` on a thread of its own until the peer
/// shuts down sending; then shuts down its own sending side.
fn echo_server(path: &Path) -> thread::JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let mut buf = [0u8; 65536];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = stream.shutdown(Shutdown::Write);
            });
        }
    })
}

/// Connects to skiff's listener and asks for guest port `port`; returns the stream and the
/// host port from the `OK` line.
fn host_connect(socket: &Path, port: u32) -> (UnixStream, u32) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed before OK: {line:?}");
        line.push(byte[0]);
    }
    let line = String::from_utf8(line).unwrap();
    let hostport = line
        .strip_prefix("OK ")
        .and_then(|p| p.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("not an OK line: {line:?}"));
    (s, hostport)
}

/// Sends `len` pattern bytes of connection `k` and checks the echo, writing on a thread of
/// its own while the caller reads.
fn echo_through(mut s: UnixStream, k: usize, len: u64) {
    let mut writer = s.try_clone().unwrap();
    let w = thread::spawn(move || {
        let mut at = 0u64;
        let mut buf = vec![0u8; 16384];
        while at < len {
            let n = (len - at).min(buf.len() as u64) as usize;
            for (j, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(k, at + j as u64);
            }
            writer.write_all(&buf[..n]).unwrap();
            at += n as u64;
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = 0u64;
    let mut buf = vec![0u8; 65536];
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        for (j, &b) in buf[..n].iter().enumerate() {
            assert_eq!(
                b,
                pattern(k, got + j as u64),
                "connection {k}, byte {}",
                got + j as u64
            );
        }
        got += n as u64;
    }
    w.join().unwrap();
    assert_eq!(got, len, "connection {k}: echoed bytes");
}

#[test]
fn guest_connection_to_host_port_carries_a_mebibyte_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("v.sock");
    let _echo = echo_server(&port_path(&socket, 5000));
    let vm = start("vsock-echo=5000,1048576,1", &socket, &[]);
    let r = vm.wait(T);
    r.assert_code(0)
        .assert_stdout_has("testguest: vsock echo ok conns=1 bytes=1048576 closed=1");
}

#[test]
fn sixty_four_guest_connections_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("v.sock");
    let _echo = echo_server(&port_path(&socket, 5001));
    let vm = start("vsock-echo=5001,65536,64", &socket, &[]);
    let r = vm.wait(T);
    r.assert_code(0)
        .assert_stdout_has("testguest: vsock echo connected conns=64")
        .assert_stdout_has("testguest: vsock echo ok conns=64 bytes=4194304 closed=64");
}

#[test]
fn host_connection_to_guest_port_carries_a_mebibyte_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("v.sock");
    let mut vm = start("vsock-serve=6000,1", &socket, &[]);
    vm.wait_for_line("testguest: vsock listening port=6000", T);
    let (s, hostport) = host_connect(&socket, 6000);
    assert!(hostport >= 1024, "host port {hostport}");
    echo_through(s, 0, 1 << 20);
    vm.wait(T)
        .assert_code(0)
        .assert_stdout_has("testguest: vsock serve ok conns=1 bytes=1048576");
}

#[test]
fn sixty_four_host_connections_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("v.sock");
    let mut vm = start("vsock-serve=6001,64", &socket, &[]);
    vm.wait_for_line("testguest: vsock listening port=6001", T);
    // All 64 connected before any data moves.
    let streams: Vec<(UnixStream, u32)> = (0..64).map(|_| host_connect(&socket, 6001)).collect();
    let mut ports: Vec<u32> = streams.iter().map(|s| s.1).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 64, "distinct host ports");
    let workers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(k, (s, _))| thread::spawn(move || echo_through(s, k, 32768)))
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    vm.wait(T)
        .assert_code(0)
        .assert_stdout_has("testguest: vsock serve ok conns=64 bytes=2097152");
}

/// skiff's anonymous memory (its heap: guest RAM is a shared mapping and not counted).
fn rss_anon_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn host_that_stops_reading_blocks_the_guest_with_bounded_memory() {
    const BYTES: u64 = 32 << 20;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("v.sock");
    let listener = UnixListener::bind(port_path(&socket, 7000)).unwrap();
    let mut vm = start(&format!("vsock-flood=7000,{BYTES}"), &socket, &[]);
    let (mut s, _) = listener.accept().unwrap();
    let line = vm.wait_for_line("testguest: vsock flood waiting for credit", T);
    let before = rss_anon_kib(vm.pid());
    thread::sleep(Duration::from_millis(1500));
    let after = rss_anon_kib(vm.pid());
    assert!(
        !vm.stdout_text().contains("vsock flood ok"),
        "the guest finished although nobody read: {line}"
    );
    // Without flow control the 32 MiB would pile up in skiff.
    assert!(
        after < 16 * 1024,
        "skiff's RssAnon grew to {after} KiB (from {before})"
    );
    let sent: u64 = line.rsplit('=').next().unwrap().parse().unwrap();
    assert!(sent < 4 << 20, "the guest sent {sent} bytes before waiting");
    // Resume reading: everything arrives, in order.
    let mut got = 0u64;
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + T;
    while got < BYTES {
        assert!(Instant::now() < deadline, "only {got} bytes arrived");
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "end of file after {got} bytes");
        for (j, &b) in buf[..n].iter().enumerate() {
            assert_eq!(b, pattern(0, got + j as u64), "byte {}", got + j as u64);
        }
        got += n as u64;
    }
    assert_eq!(s.read(&mut buf).unwrap(), 0, "more than was sent");
    drop(s);
    vm.wait(T)
        .assert_code(0)
        .assert_stdout_has(&format!("testguest: vsock flood ok sent={BYTES} waited=1"));
}

#[test]
fn host_that_goes_away_is_seen_by_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("v.sock");
    let listener = UnixListener::bind(port_path(&socket, 7100)).unwrap();
    let mut vm = start("vsock-vanish=7100 vsock-serve=7200,1", &socket, &[]);
    // Guest-initiated: the host reads the greeting and closes.
    let (s, _) = listener.accept().unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert_eq!(line, "hello from the guest\n");
    drop(s);
    vm.wait_for_line("testguest: vsock peer gone", T);
    vm.wait_for_line("testguest: vsock vanish ok", T);
    // Host-initiated: the host program connects and dies without shutting down; the guest's
    // server sees the connection end and finishes.
    vm.wait_for_line("testguest: vsock listening port=7200", T);
    let (s, _) = host_connect(&socket, 7200);
    drop(s);
    vm.wait(T)
        .assert_code(0)
        .assert_stdout_has("testguest: vsock serve ok conns=1");
}

#[test]
fn guest_abuse_leaves_the_device_working() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("v.sock");
    let _echo = echo_server(&port_path(&socket, 7300));
    let vm = start("vsock-abuse=7300", &socket, &[]);
    vm.wait(T)
        .assert_code(0)
        .assert_stdout_has("testguest: vsock abuse ok resets=4");
}

#[test]
fn bad_vsock_options_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = testguest().to_string_lossy().into_owned();
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    for (spec, needle) in [
        ("cid=2,socket=/tmp/x".to_string(), "--vsock cid=\"2\""),
        ("cid=3".to_string(), "--vsock needs socket=PATH"),
        (format!("cid=3,socket={}", file.display()), "already exists"),
    ] {
        let r = run_skiff(
            &[
                "run",
                "--kernel",
                &kernel,
                "--cmdline",
                "hello",
                "--vsock",
                &spec,
            ],
            T,
        );
        assert_ne!(r.code, Some(0), "{spec}: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{spec}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{spec}: {}", r.stderr);
    }
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"x",
        "the file was left alone"
    );
}

fn ctl(sock: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(skiff_bin())
        .arg("ctl")
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skiff ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn restore_resets_connections_and_listens_again() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("v.sock");
    let api = dir.path().join("api.sock");
    let _echo = echo_server(&port_path(&socket, 8000));
    let mut vm = start(
        "vsock-snapshot=8000",
        &socket,
        &["--api-socket", api.to_str().unwrap()],
    );
    vm.wait_for_line("testguest: vsock snapshot ready", T);
    let snap = dir.path().join("snap");
    ctl(&api, &["snapshot", snap.to_str().unwrap(), "--stop"]);
    vm.wait(T).assert_code(0);
    // The stopped VM's socket file may still be there: nobody listens on it any more, so the
    // restored VM replaces it.

    // Restored onto another socket (the snapshot's `vsock0` resource overridden): skiff
    // listens there, and guest connections go to its `_PORT` siblings.
    let moved = dir.path().join("moved.sock");
    // Only the moved echo service answers now.
    std::fs::remove_file(port_path(&socket, 8000)).unwrap();
    let _moved_echo = echo_server(&port_path(&moved, 8000));
    let spec = format!("id=vsock0,socket={}", moved.display());
    let mut restored = Skiff::spawn(&["restore", snap.to_str().unwrap(), "--vsock", &spec]);
    let line = restored.wait_for_line("testguest: vsock transport reset", T);
    assert!(line.ends_with(&format!("cid={CID}")), "{line}");
    restored.wait_for_line("testguest: vsock listening port=8001", T);
    let (s, _) = host_connect(&moved, 8001);
    echo_through(s, 3, 100_000);
    restored
        .wait(T)
        .assert_code(0)
        .assert_stdout_has("testguest: vsock snapshot ok");
}
