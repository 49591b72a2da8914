//! vhost-user end to end: the test guest's virtio-blk scenario (a 1 MiB pattern written, flushed,
//! read back) through out-of-process backends, checked on the host's image file afterwards:
//! skiff's own backend, qemu-storage-daemon, and skiff's backend under QEMU as the frontend.
//! Also the start-up errors (missing socket, not a socket, a backend that hangs up, talks
//! garbage or lacks features), a backend that dies while the guest runs, and snapshots under
//! the test guest's `blkloop=N` scenario: paused full and diff snapshots restored in a new
//! process against the same backend (skiff's; qemu-storage-daemon for the full one), live
//! snapshots following the backend's dirty log (skiff's and qemu-storage-daemon's), a live
//! snapshot refused for a backend without one, a restore without the backend.

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use skiff_tests::{require_kvm, run_testguest, testguest, Backend, Skiff};

mod snapshot_support;
use snapshot_support::{assert_restore_fails, ctl, ctl_ok, restore};

const T: Duration = Duration::from_secs(60);
/// Every u64 the guest writes at byte offset o holds o ^ PATTERN, over the first 1 MiB.
const PATTERN: u64 = 0xa5a5_a5a5_a5a5_a5a5;

struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A zeroed raw image of `size` bytes.
    fn image(&self, size: u64) -> PathBuf {
        let p = self.path("disk.img");
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        p
    }
}

fn assert_pattern(image: &Path) {
    let bytes = std::fs::read(image).unwrap();
    for o in (0..1usize << 20).step_by(8) {
        let v = u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        assert_eq!(v, o as u64 ^ PATTERN, "image offset {o:#x}");
    }
}

fn vhost_user_arg(socket: &Path) -> String {
    format!("type=blk,socket={}", socket.display())
}

#[test]
fn skiff_backend_serves_the_test_guest() {
    let s = Scratch::new();
    let (sock, img) = (s.path("blk.sock"), s.image(4 << 20));
    let backend = Backend::skiff_blk(&sock, &img, &[]);
    let r = run_testguest("virtio-blk", &["--vhost-user", &vhost_user_arg(&sock)], T);
    r.assert_code(0)
        .assert_stdout_has("testguest: virtio-blk capacity=8192 id=skiff-vhost-user-blk")
        .assert_stdout_has("testguest: virtio-blk ok written=1048576");
    assert_pattern(&img);
    drop(backend);
}

#[test]
fn skiff_backend_read_only_refuses_writes() {
    let s = Scratch::new();
    let (sock, img) = (s.path("blk.sock"), s.image(4 << 20));
    std::fs::write(&img, vec![0x3cu8; 4 << 20]).unwrap();
    let _backend = Backend::skiff_blk(&sock, &img, &["--readonly"]);
    let r = run_testguest("virtio-blk", &["--vhost-user", &vhost_user_arg(&sock)], T);
    r.assert_code(0)
        .assert_stdout_has("testguest: virtio-blk readonly ok");
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0x3c));
}

#[test]
fn skiff_backend_serves_one_vm_after_another() {
    let s = Scratch::new();
    let (sock, img) = (s.path("blk.sock"), s.image(4 << 20));
    let mut backend = Backend::skiff_blk(&sock, &img, &[]);
    for _ in 0..2 {
        let r = run_testguest("virtio-blk", &["--vhost-user", &vhost_user_arg(&sock)], T);
        r.assert_code(0)
            .assert_stdout_has("testguest: virtio-blk ok");
    }
    assert!(backend.is_running(), "{}", backend.stderr_text());
}

#[test]
fn qemu_storage_daemon_serves_the_test_guest() {
    let s = Scratch::new();
    let (sock, img) = (s.path("qsd.sock"), s.image(4 << 20));
    let _qsd = Backend::qemu_storage_daemon(&sock, &img);
    let r = run_testguest("virtio-blk", &["--vhost-user", &vhost_user_arg(&sock)], T);
    r.assert_code(0)
        .assert_stdout_has("testguest: virtio-blk capacity=8192 id=vhost_user_blk")
        .assert_stdout_has("testguest: virtio-blk ok written=1048576");
    assert_pattern(&img);
}

#[test]
fn qemu_as_frontend_with_the_skiff_backend() {
    require_kvm();
    let s = Scratch::new();
    let (sock, img) = (s.path("blk.sock"), s.image(4 << 20));
    let _backend = Backend::skiff_blk(&sock, &img, &["--once"]);
    let out = Command::new("timeout")
        .arg("60")
        .arg("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,pcie=on",
            "-enable-kvm",
            "-cpu",
            "host,-arch-capabilities",
        ])
        .args([
            "-m",
            "256M",
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
        ])
        .args(["-numa", "node,memdev=mem"])
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", sock.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=c0,disable-legacy=on"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=1"])
        .args(["-nographic", "-nodefaults", "-serial", "stdio"])
        .arg("-kernel")
        .arg(testguest())
        .args(["-append", "virtio-blk ecam=0xe0000000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The guest's exit value v comes out of QEMU as (v << 1) | 1.
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("testguest: virtio-blk ok written=1048576"),
        "{stdout}\n{stderr}"
    );
    assert_pattern(&img);
}

/// Runs skiff with one vhost-user device on `socket` and expects a start-up failure: exit 1
/// and exactly one stderr line containing `text`.
fn assert_start_fails(socket: &Path, text: &str) {
    let r = run_testguest("virtio-blk", &["--vhost-user", &vhost_user_arg(socket)], T);
    r.assert_code(1).assert_stderr_has(text);
    assert_eq!(r.stderr.lines().count(), 1, "one line: {}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn missing_socket_and_not_a_socket_are_one_line_errors() {
    let s = Scratch::new();
    assert_start_fails(&s.path("nothing.sock"), "does not exist");
    let file = s.image(512);
    assert_start_fails(&file, "is not a Unix socket");
    // A socket file nobody listens on.
    let stale = s.path("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert_start_fails(&stale, "cannot connect to vhost-user backend");
}

/// A fake backend: accepts one connection and runs `script` on it in a thread.
fn fake_backend(
    socket: &Path,
    script: impl FnOnce(std::os::unix::net::UnixStream) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        if let Ok((stream, _)) = listener.accept() {
            script(stream);
        }
    })
}

/// Reads one request header and body; returns the request code.
fn read_request(stream: &mut std::os::unix::net::UnixStream) -> Option<u32> {
    let mut hdr = [0u8; 12];
    stream.read_exact(&mut hdr).ok()?;
    let code = u32::from_le_bytes(hdr[0..4].try_into().ok()?);
    let size = u32::from_le_bytes(hdr[8..12].try_into().ok()?);
    let mut body = vec![0u8; size as usize];
    stream.read_exact(&mut body).ok()?;
    Some(code)
}

fn reply_u64(stream: &mut std::os::unix::net::UnixStream, code: u32, value: u64) {
    let mut msg = Vec::new();
    msg.extend_from_slice(&code.to_le_bytes());
    msg.extend_from_slice(&0x5u32.to_le_bytes()); // version 1, reply
    msg.extend_from_slice(&8u32.to_le_bytes());
    msg.extend_from_slice(&value.to_le_bytes());
    let _ = stream.write_all(&msg);
}

const GET_FEATURES: u32 = 1;

#[test]
fn backend_that_hangs_up_mid_handshake() {
    let s = Scratch::new();
    let sock = s.path("hangup.sock");
    let fake = fake_backend(&sock, |mut stream| {
        let _ = read_request(&mut stream); // SET_OWNER
        let _ = read_request(&mut stream); // GET_FEATURES: no answer, hang up
    });
    assert_start_fails(&sock, "GET_FEATURES failed");
    fake.join().unwrap();
}

#[test]
fn backend_that_sends_garbage() {
    let s = Scratch::new();
    let sock = s.path("garbage.sock");
    let fake = fake_backend(&sock, |mut stream| {
        let _ = read_request(&mut stream);
        let _ = read_request(&mut stream);
        // A reply header with an unknown code, a bad version and a huge size, then noise.
        let _ = stream.write_all(&[0xff; 12]);
        let _ = stream.write_all(&[0x5a; 100]);
        std::thread::sleep(Duration::from_millis(200));
    });
    assert_start_fails(&sock, "GET_FEATURES failed");
    fake.join().unwrap();
}

#[test]
fn backend_without_virtio_1_is_refused() {
    let s = Scratch::new();
    let sock = s.path("old.sock");
    let fake = fake_backend(&sock, |mut stream| {
        let _ = read_request(&mut stream); // SET_OWNER
        if read_request(&mut stream) == Some(GET_FEATURES) {
            reply_u64(&mut stream, GET_FEATURES, 1 << 9); // FLUSH only
        }
        let _ = read_request(&mut stream);
    });
    assert_start_fails(&sock, "lack VIRTIO_F_VERSION_1");
    fake.join().unwrap();
}

#[test]
fn backend_death_is_one_log_line_and_the_vm_survives() {
    require_kvm();
    let s = Scratch::new();
    let (sock, img) = (s.path("blk.sock"), s.image(4 << 20));
    let mut backend = Backend::skiff_blk(&sock, &img, &[]);
    // The guest does its I/O, then spins; the VM ends only by --timeout (exit code 124).
    let mut vm = spawn_guest(
        "virtio-blk spin",
        &vhost_user_arg(&sock),
        &["--timeout", "4"],
    );
    vm.wait_for_line("testguest: virtio-blk ok", T);
    backend.kill();
    let r = vm.wait(T);
    r.assert_code(124);
    assert!(
        r.stderr
            .contains("the vhost-user backend closed its connection; the device needs a reset"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert_pattern(&img);
}

// ---- Backend restarts (`reconnect=`), under the test guest's `blkloop=N` scenario ----

/// `blkloop` writes this many bytes per round at offset 0.
const LOOP_BYTES: usize = 64 << 10;

/// The pattern of `blkloop` round `round` (testguest `blk::loop_pattern`).
fn loop_pattern(round: u64) -> u64 {
    PATTERN ^ round.wrapping_mul(0x0100_0000_0000_0001)
}

fn assert_loop_pattern(image: &Path, round: u64) {
    let bytes = std::fs::read(image).unwrap();
    for o in (0..LOOP_BYTES).step_by(8) {
        let v = u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        assert_eq!(v, o as u64 ^ loop_pattern(round), "image offset {o:#x}");
    }
}

/// skiff running `blkloop=rounds` on a vhost-user-blk device with `extra` options, and the
/// command-line arguments `more`.
fn spawn_blkloop(socket: &Path, rounds: u32, extra: &str, more: &[&str]) -> Skiff {
    let device = format!("{}{extra}", vhost_user_arg(socket));
    let mut args = vec!["--timeout", "300"];
    args.extend_from_slice(more);
    spawn_guest(&format!("blkloop={rounds}"), &device, &args)
}

/// skiff running the test guest with `cmdline`, the vhost-user device `device` and the
/// command-line arguments `more`.
fn spawn_guest(cmdline: &str, device: &str, more: &[&str]) -> Skiff {
    let kernel = testguest().to_string_lossy().into_owned();
    let mut args = vec![
        "run",
        "--kernel",
        &kernel,
        "--cmdline",
        cmdline,
        "--vhost-user",
        device,
    ];
    args.extend_from_slice(more);
    Skiff::spawn(&args)
}

fn round_line(round: u32) -> String {
    format!("testguest: blkloop round={round} ok")
}

#[test]
fn a_restarted_backend_is_reconnected_and_the_guest_finishes_every_round() {
    require_kvm();
    let s = Scratch::new();
    let (sock, img) = (s.path("blk.sock"), s.image(4 << 20));
    let mut backend = Backend::skiff_blk(&sock, &img, &[]);
    let mut vm = spawn_blkloop(&sock, 4, ",reconnect=0.2", &[]);
    // Round 1 done: kill and restart at once (the guest's next round, 500 ms later, most
    // likely finds the backend back).
    vm.wait_for_line(&round_line(1), T);
    backend.kill();
    backend = Backend::skiff_blk(&sock, &img, &[]);
    // Round 2 done: stay down past the guest's pause, so round 3's requests and kick arrive
    // while skiff is disconnected and must be served after the replay.
    vm.wait_for_line(&round_line(2), T);
    backend.kill();
    std::thread::sleep(Duration::from_millis(1500));
    backend = Backend::skiff_blk(&sock, &img, &[]);
    vm.wait_for_line(&round_line(3), T);
    backend.kill();
    backend = Backend::skiff_blk(&sock, &img, &[]);
    let r = vm.wait(T);
    r.assert_code(0)
        .assert_stdout_has("testguest: blkloop ok rounds=4");
    assert_loop_pattern(&img, 4);
    let lost = r
        .stderr
        .matches("closed its connection; reconnecting every 0.2s")
        .count();
    let back = r
        .stderr
        .matches("reconnected to the vhost-user backend")
        .count();
    assert_eq!((lost, back), (3, 3), "{}", r.stderr);
    assert!(!r.stderr.contains("needs a reset"), "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    drop(backend);
}

#[test]
fn without_reconnect_a_dead_backend_fails_the_device_and_the_guest_sees_it() {
    require_kvm();
    let s = Scratch::new();
    let (sock, img) = (s.path("blk.sock"), s.image(4 << 20));
    let mut backend = Backend::skiff_blk(&sock, &img, &[]);
    let mut vm = spawn_blkloop(&sock, 3, "", &[]);
    vm.wait_for_line(&round_line(1), T);
    backend.kill();
    // The VM keeps running: the guest's next request sees DEVICE_NEEDS_RESET and it fails
    // its scenario (exit 33) on its own.
    let r = vm.wait(T);
    r.assert_code(33)
        .assert_stdout_has("FAIL blkloop: timeout waiting for a virtio-blk request")
        .assert_stdout_has("needs reset");
    assert!(
        r.stderr
            .contains("the vhost-user backend closed its connection; the device needs a reset"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert_loop_pattern(&img, 1);
}

#[test]
fn a_backend_that_comes_back_with_fewer_features_fails_the_device() {
    require_kvm();
    let s = Scratch::new();
    let (sock, img) = (s.path("blk.sock"), s.image(4 << 20));
    let mut backend = Backend::skiff_blk(&sock, &img, &[]);
    let mut vm = spawn_blkloop(&sock, 3, ",reconnect=0.2", &[]);
    vm.wait_for_line(&round_line(1), T);
    backend.kill();
    std::fs::remove_file(&sock).unwrap();
    // The "restarted" backend offers VERSION_1 and nothing else (no FLUSH, no protocol
    // features), then waits for skiff to hang up.
    let fake = fake_backend(&sock, |mut stream| {
        let _ = read_request(&mut stream); // SET_OWNER
        if read_request(&mut stream) == Some(GET_FEATURES) {
            reply_u64(&mut stream, GET_FEATURES, 1 << 32);
        }
        while read_request(&mut stream).is_some() {}
    });
    let r = vm.wait(T);
    r.assert_code(33).assert_stdout_has("needs reset");
    assert!(
        r.stderr
            .contains("the restarted vhost-user backend cannot serve the device"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("the device needs a reset"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    fake.join().unwrap();
}

// ---- Snapshots of a VM with a vhost-user device, under `blkloop=N` ----

const SNAP_ROUNDS: u32 = 6;

/// The round numbers of every `testguest: blkloop round=R ok` line in `text`.
fn loop_rounds(text: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|l| l.strip_prefix("testguest: blkloop round="))
        .filter_map(|rest| rest.strip_suffix(" ok")?.parse().ok())
        .collect()
}

/// Starts a backend serving an image on a socket.
type StartBackend = fn(&Path, &Path) -> Backend;

fn skiff_backend(socket: &Path, image: &Path) -> Backend {
    Backend::skiff_blk(socket, image, &[])
}

/// A VM running `blkloop=rounds` on the backend `start` starts, with a control socket:
/// (scratch, image, backend socket, control socket, backend, VM).
fn snapshot_subject(
    rounds: u32,
    start: StartBackend,
) -> (Scratch, PathBuf, PathBuf, PathBuf, Backend, Skiff) {
    require_kvm();
    let s = Scratch::new();
    let (sock, img) = (s.path("blk.sock"), s.image(4 << 20));
    let backend = start(&sock, &img);
    let api = s.path("api.sock");
    let vm = spawn_blkloop(&sock, rounds, "", &["--api-socket", api.to_str().unwrap()]);
    (s, img, sock, api, backend, vm)
}

/// Which snapshot `snapshot_mid_run_and_restore` takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Paused,
    /// A full snapshot first, the VM going on, then a diff.
    Diff,
    /// `--live`: memory copied while the guest (and the backend) run.
    Live,
}

/// Snapshots the loop mid-run with `--stop` (see `Kind`), restores it in a new process against
/// the same backend and checks the two runs read as one and the image holds the last round's
/// pattern.
fn snapshot_mid_run_and_restore(kind: Kind, start: StartBackend) {
    let diff = kind == Kind::Diff;
    let (s, img, _sock, api, backend, mut vm) = snapshot_subject(SNAP_ROUNDS, start);
    vm.wait_for_line(&round_line(1), T);
    let mut args = vec!["snapshot".to_string()];
    if diff {
        // The VM continues after this one: its rings restart where the backend stopped.
        let base = s.path("base");
        let summary = ctl_ok(&api, &["snapshot", base.to_str().unwrap()]);
        assert_eq!(summary["stopped"], false, "{summary}");
        vm.wait_for_line(&round_line(3), T);
        args.push("--diff".into());
    } else {
        vm.wait_for_line(&round_line(2), T);
    }
    let snap = s.path("snap");
    args.push(snap.to_str().unwrap().into());
    args.push("--stop".into());
    if kind == Kind::Live {
        args.push("--live".into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let summary = ctl_ok(&api, &args);
    assert_eq!(summary["stopped"], true, "{summary}");
    if kind == Kind::Live {
        let passes = summary["live"]["passes"].as_array().unwrap();
        assert!(!passes.is_empty(), "{summary}");
        assert!(summary["live"]["final_pass"].is_object(), "{summary}");
        // How many pages the backend's log gave depends on the I/O in flight during the short
        // precopy (often none); `vhost_user::tests::dirty_log` checks the log's contents.
        assert!(passes[0]["device_pages"].is_u64(), "{summary}");
    }
    if diff {
        assert_eq!(summary["kind"], "diff", "{summary}");
        assert!(
            summary["notes"]
                .to_string()
                .contains("every page with data is in this diff"),
            "{summary}"
        );
    }
    let before = vm.wait(T);
    before.assert_code(0);
    let done_before = loop_rounds(&before.stdout);
    assert!(
        !done_before.is_empty() && *done_before.last().unwrap() < SNAP_ROUNDS,
        "the snapshot was not taken mid-run:\n{}",
        before.stdout
    );
    // Copy mode is the default for such a snapshot; the backend serves the new process next.
    let after = restore(&snap, &[]);
    let mut all = done_before;
    all.extend(loop_rounds(&after.stdout));
    assert_eq!(
        all,
        (1..=SNAP_ROUNDS).collect::<Vec<_>>(),
        "rounds do not continue\n--- before ---\n{}\n--- after ---\n{}\n--- stderr ---\n{}",
        before.stdout,
        after.stdout,
        after.stderr
    );
    after
        .assert_code(0)
        .assert_stdout_has(&format!("testguest: blkloop ok rounds={SNAP_ROUNDS}"));
    assert!(!after.stderr.contains("needs a reset"), "{}", after.stderr);
    assert_loop_pattern(&img, u64::from(SNAP_ROUNDS));
    drop(backend);
}

#[test]
fn a_paused_snapshot_is_restored_against_the_same_backend_and_every_round_finishes() {
    snapshot_mid_run_and_restore(Kind::Paused, skiff_backend);
}

#[test]
fn a_paused_snapshot_is_restored_against_qemu_storage_daemon_and_every_round_finishes() {
    snapshot_mid_run_and_restore(Kind::Paused, Backend::qemu_storage_daemon);
}

#[test]
fn a_diff_after_a_full_snapshot_the_vm_survived_is_restored_and_every_round_finishes() {
    snapshot_mid_run_and_restore(Kind::Diff, skiff_backend);
}

#[test]
fn a_live_snapshot_follows_the_backend_dirty_log_and_every_round_finishes() {
    snapshot_mid_run_and_restore(Kind::Live, skiff_backend);
}

#[test]
fn a_live_snapshot_against_qemu_storage_daemon_follows_its_dirty_log() {
    snapshot_mid_run_and_restore(Kind::Live, Backend::qemu_storage_daemon);
}

/// A fake backend that completes the handshake offering neither `LOG_SHMFD` nor
/// `VHOST_F_LOG_ALL`, and acknowledges every later request.
fn backend_without_dirty_log(stream: &mut std::os::unix::net::UnixStream) {
    const GET_PROTOCOL_FEATURES: u32 = 15;
    const REPLY_ACK: u64 = 1 << 3;
    loop {
        let mut hdr = [0u8; 12];
        if stream.read_exact(&mut hdr).is_err() {
            return;
        }
        let code = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap());
        let mut body = vec![0u8; size as usize];
        if stream.read_exact(&mut body).is_err() {
            return;
        }
        match code {
            // VERSION_1 and VHOST_USER_F_PROTOCOL_FEATURES.
            GET_FEATURES => reply_u64(stream, code, (1 << 32) | (1 << 30)),
            GET_PROTOCOL_FEATURES => reply_u64(stream, code, REPLY_ACK),
            _ if flags & 0x8 != 0 => reply_u64(stream, code, 0),
            _ => {}
        }
    }
}

#[test]
fn a_live_snapshot_is_refused_for_a_backend_without_a_dirty_log_and_the_vm_runs_on() {
    require_kvm();
    let s = Scratch::new();
    let (sock, api) = (s.path("nolog.sock"), s.path("api.sock"));
    let fake = fake_backend(&sock, |mut stream| backend_without_dirty_log(&mut stream));
    let more = ["--api-socket", api.to_str().unwrap(), "--timeout", "20"];
    let mut vm = spawn_guest("spin", &vhost_user_arg(&sock), &more);
    vm.wait_for_line("testguest: spinning", T);
    let snap = s.path("snap");
    let (code, _, err) = ctl(&api, &["snapshot", snap.to_str().unwrap(), "--live"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot take a live snapshot of this VM: virtio vhost-user-blk")
            && err.contains("keeps no dirty log")
            && err.contains("LOG_SHMFD"),
        "{err}"
    );
    assert!(!snap.exists());
    // The VM runs on: a paused snapshot still works.
    let paused = s.path("paused");
    let (code, _, err) = ctl(&api, &["snapshot", paused.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    // ... and ends by its --timeout.
    let r = vm.wait(T);
    r.assert_code(124);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    fake.join().unwrap();
}

#[test]
fn a_restore_without_the_backend_or_with_cow_memory_is_one_line() {
    let (s, _img, sock, api, mut backend, mut vm) = snapshot_subject(3, skiff_backend);
    vm.wait_for_line(&round_line(1), T);
    let snap = s.path("snap");
    ctl_ok(&api, &["snapshot", snap.to_str().unwrap(), "--stop"]);
    vm.wait(T).assert_code(0);
    let cow = restore(&snap, &["--memory-mode", "cow"]);
    cow.assert_code(1);
    assert_eq!(cow.stderr.lines().count(), 1, "{}", cow.stderr);
    assert!(
        cow.stderr.contains("--memory-mode cow")
            && cow.stderr.contains(sock.to_str().unwrap())
            && cow.stderr.contains("--memory-mode copy"),
        "{}",
        cow.stderr
    );
    backend.kill();
    assert_restore_fails(&snap, sock.to_str().unwrap());
}

// ---- A backend killed in the middle of a stream of writes (`blkbench`) ----

/// `blkbench` request size: each 512 KiB chunk of the image is written whole by one request.
const BENCH_CHUNK: usize = 512 << 10;

/// Waits until the guest's writes have reached `image`, so a kill right after lands in the
/// middle of the write stream: until more than 8 chunks hold data, so (with at most 8 requests
/// in flight) at least one request has completed.
fn wait_for_writes(image: &Path) {
    use std::os::unix::fs::MetadataExt;
    let deadline = std::time::Instant::now() + T;
    while std::fs::metadata(image).unwrap().blocks() * 512 <= 8 * BENCH_CHUNK as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "no write reached the image"
        );
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Classifies each 512 KiB chunk of a `blkbench` image: `Some(true)` when it holds one whole
/// request buffer (slot s of the guest's ring: every u64 at chunk offset o is
/// `(s * 512 KiB + o) ^ PATTERN`), `Some(false)` when it is all zeros (never written), `None`
/// when it is anything else (torn or foreign data).
fn bench_chunks(image: &Path) -> Vec<Option<bool>> {
    let bytes = std::fs::read(image).unwrap();
    bytes
        .chunks(BENCH_CHUNK)
        .map(|c| {
            let word = |o: usize| u64::from_le_bytes(c[o..o + 8].try_into().unwrap());
            if c.iter().all(|&b| b == 0) {
                return Some(false);
            }
            let base = word(0) ^ PATTERN;
            let whole = base.is_multiple_of(BENCH_CHUNK as u64)
                && (0..c.len())
                    .step_by(8)
                    .all(|o| word(o) == (base + o as u64) ^ PATTERN);
            whole.then_some(true)
        })
        .collect()
}

#[test]
fn a_backend_killed_mid_write_stream_is_reconnected_and_every_write_lands() {
    require_kvm();
    let s = Scratch::new();
    let (sock, img) = (s.path("blk.sock"), s.image(256 << 20));
    let mut backend = Backend::skiff_blk(&sock, &img, &[]);
    let device = format!("{},reconnect=0.05", vhost_user_arg(&sock));
    let vm = spawn_guest("blkbench=256", &device, &["--timeout", "120"]);
    wait_for_writes(&img);
    backend.kill();
    backend = Backend::skiff_blk(&sock, &img, &[]);
    let r = vm.wait(T);
    r.assert_code(0)
        .assert_stdout_has("testguest: blkbench write bytes=268435456")
        .assert_stdout_has("testguest: blkbench read bytes=268435456");
    assert!(
        r.stderr.contains("reconnected to the vhost-user backend"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    // The requests in flight at the kill were offered again to the new backend: every chunk
    // holds one whole request's data.
    let chunks = bench_chunks(&img);
    let bad: Vec<usize> = (0..chunks.len())
        .filter(|&i| chunks[i] != Some(true))
        .collect();
    assert!(bad.is_empty(), "chunks not written whole: {bad:?}");
    drop(backend);
}

#[test]
fn without_reconnect_a_backend_killed_mid_write_stream_is_one_line_and_the_guest_sees_it() {
    require_kvm();
    let s = Scratch::new();
    let (sock, img) = (s.path("blk.sock"), s.image(256 << 20));
    let mut backend = Backend::skiff_blk(&sock, &img, &[]);
    let vm = spawn_guest(
        "blkbench=256",
        &vhost_user_arg(&sock),
        &["--timeout", "120"],
    );
    wait_for_writes(&img);
    backend.kill();
    // The VM keeps running; the guest's request never completes and, at its timeout, it sees
    // DEVICE_NEEDS_RESET and fails its scenario on its own.
    let r = vm.wait(T);
    r.assert_code(33)
        .assert_stdout_has("FAIL blkbench: timeout waiting for a virtio-blk request")
        .assert_stdout_has("needs reset");
    let lines: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains("vhost-user"))
        .collect();
    assert_eq!(lines.len(), 1, "{}", r.stderr);
    assert!(
        lines[0].contains("the vhost-user backend closed its connection; the device needs a reset"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    // What the backend wrote before it died is there in whole chunks; only the requests in
    // flight at the kill (at most the guest's 8) may have left a chunk partly written.
    let chunks = bench_chunks(&img);
    let whole = chunks.iter().filter(|c| **c == Some(true)).count();
    let torn = chunks.iter().filter(|c| c.is_none()).count();
    assert!(whole > 0, "nothing reached the image");
    assert!(
        torn <= 8,
        "{torn} chunks hold neither a whole request nor zeros"
    );
}
