//! virtio over PCI end to end: the test guest's own virtio-pci driver enumerates PCI through the
//! ECAM area skiff describes in the MCFG, drives each device, and the test checks what reached
//! the host (the disk file, the tap). Also the ACPI poweroff and reset paths, and device start-up
//! errors.

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::Duration;

use skiff_tests::{require_kvm, run_skiff, run_testguest, skiff_bin, testguest, NetNs, Skiff};

const T: Duration = Duration::from_secs(60);

fn disk(size: u64) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(size).unwrap();
    f
}

#[test]
fn pci_enumeration_and_virtio_rng() {
    let r = run_testguest("pci virtio-rng", &["--rng"], T);
    r.assert_code(0)
        .assert_stdout_has("testguest: pci config ecam=0xe0000000")
        .assert_stdout_has("testguest: pci 00:00.0 ") // host bridge
        .assert_stdout_has(" 1af4:1044 ")
        .assert_stdout_has("testguest: pci ok devices=2")
        .assert_stdout_has("testguest: virtio-rng ok");
}

#[test]
fn virtio_blk_writes_reach_the_host_file() {
    let f = disk(4 << 20);
    let spec = format!("path={},id=testdisk", f.path().display());
    let r = run_testguest("virtio-blk", &["--disk", &spec], T);
    r.assert_code(0)
        .assert_stdout_has("testguest: virtio-blk capacity=8192 id=testdisk")
        .assert_stdout_has("testguest: virtio-blk ok written=1048576");
    // The guest's pattern: every u64 at byte offset o holds o ^ 0xa5a5a5a5a5a5a5a5.
    let bytes = std::fs::read(f.path()).unwrap();
    for o in (0..1usize << 20).step_by(4096 + 8) {
        let o = o & !7;
        let v = u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        assert_eq!(v, o as u64 ^ 0xa5a5_a5a5_a5a5_a5a5, "offset {o:#x}");
    }
}

#[test]
fn virtio_blk_read_only_disk_refuses_writes_and_stays_untouched() {
    let f = disk(4 << 20);
    std::fs::write(f.path(), vec![0x3cu8; 4 << 20]).unwrap();
    let before = std::fs::read(f.path()).unwrap();
    let spec = format!("path={},readonly=on", f.path().display());
    let r = run_testguest("virtio-blk", &["--disk", &spec], T);
    r.assert_code(0)
        .assert_stdout_has("testguest: virtio-blk readonly ok");
    assert!(
        std::fs::read(f.path()).unwrap() == before,
        "a read-only disk must not change"
    );
}

#[test]
fn several_devices_at_once_and_the_virtio_console() {
    let (a, b) = (disk(4 << 20), disk(2 << 20));
    let spec_a = format!("path={},id=first", a.path().display());
    let spec_b = format!("path={},id=second,readonly=on", b.path().display());
    let r = run_testguest(
        "pci virtio-blk virtio-rng virtio-console",
        &[
            "--disk",
            &spec_a,
            "--disk",
            &spec_b,
            "--rng",
            "--rng",
            "--console",
        ],
        T,
    );
    r.assert_code(0)
        .assert_stdout_has("testguest: pci ok devices=6")
        .assert_stdout_has("id=first")
        .assert_stdout_has("testguest: virtio-rng ok")
        .assert_stdout_has("testguest: virtio-console hello")
        .assert_stdout_has("testguest: virtio-console ok");
}

#[test]
fn guest_moves_a_virtio_bar_and_uses_the_device_there() {
    require_kvm();
    let mut cmd = std::process::Command::new(skiff_bin());
    cmd.env("SKIFF_LOG", "trace").args([
        "run",
        "--kernel",
        &testguest().to_string_lossy(),
        "--cmdline",
        "virtio-bar-move",
        "--rng",
    ]);
    let r = Skiff::spawn_command(&mut cmd).wait(T);
    r.assert_code(0)
        .assert_stdout_has("testguest: virtio-bar-move moved 0xc0000000 -> 0xd0000000")
        .assert_stdout_has("testguest: virtio-rng ok")
        .assert_stdout_has("testguest: virtio-bar-move ok")
        .assert_stderr_has("BAR moved from 0xc0000000 to nowhere")
        .assert_stderr_has("BAR moved from nowhere to 0xd0000000");
    // The BAR over the ECAM area was refused, and said so once.
    assert_eq!(
        r.stderr
            .matches("guest placed the BAR at 0xe0000000")
            .count(),
        1,
        "{}",
        r.stderr
    );
    // Every kick reached the ioeventfd bound at the new notification address: none took an
    // MMIO exit (which the transport traces).
    assert!(
        !r.stderr.contains("notified through an MMIO exit"),
        "{}",
        r.stderr
    );
}

#[test]
fn acpi_poweroff_ends_the_vm_with_exit_code_zero() {
    let r = run_testguest("hello poweroff", &[], T);
    r.assert_code(0)
        .assert_stdout_has("testguest: poweroff sleep_type=5");
    assert!(!r.stdout.contains("FAIL"), "{}", r.stdout);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
}

#[test]
fn acpi_reset_register_ends_the_vm_as_a_reset() {
    let r = run_testguest("acpi-reset", &[], T);
    r.assert_code(120).assert_stderr_has("reset");
}

/// Answers the guest's ping frame (ethertype 0x88b5) with a pong to the guest's MAC.
const RESPONDER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
s.bind((sys.argv[1], 0))
s.settimeout(60)
print("ready", flush=True)
while True:
    f = s.recv(4096)
    if f[12:14] == b"\x88\xb5" and f[14:].startswith(b"skiff-testguest-ping"):
        s.send(f[6:12] + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + b"skiff-host-pong".ljust(46, b"\0"))
        print("answered", flush=True)
        break
"#;

#[test]
fn virtio_net_frames_cross_the_tap_both_ways() {
    require_kvm();
    let ns = NetNs::new("sk0");
    let mut responder: Child = ns
        .command("python3")
        .args(["-c", RESPONDER, "sk0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(responder.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let kernel = testguest().to_string_lossy().into_owned();
    let mut cmd = ns.command(&skiff_bin().to_string_lossy());
    cmd.args([
        "run",
        "--kernel",
        &kernel,
        "--cmdline",
        "virtio-net",
        "--net",
        "tap=sk0,mac=52:54:00:12:34:56",
    ]);
    let r = Skiff::spawn_command(&mut cmd).wait(T);
    let _ = responder.kill();
    let _ = responder.wait();
    r.assert_code(0)
        .assert_stdout_has("testguest: virtio-net ok rx=");
    assert_eq!(
        lines.next().map(|l| l.unwrap()),
        Some("answered".to_string())
    );
}

/// `netbench=N` against `scripts/net-peer` (the benchmark's own peer): every transmitted frame
/// reaches the host, every frame the peer sends arrives (the first only starts the clock), and
/// every ping is answered.
#[test]
fn netbench_streams_both_ways_and_ping_pongs_through_the_tap() {
    require_kvm();
    let ns = NetNs::new("skb0");
    let peer_script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/net-peer");
    let mut peer: Child = ns
        .command("python3")
        .arg(&peer_script)
        .args(["skb0", "300"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(peer.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let kernel = testguest().to_string_lossy().into_owned();
    let mut cmd = ns.command(&skiff_bin().to_string_lossy());
    cmd.args([
        "run",
        "--kernel",
        &kernel,
        "--cmdline",
        "netbench=300",
        "--net",
        "tap=skb0",
    ]);
    let r = Skiff::spawn_command(&mut cmd).wait(T);
    let summary = lines.next().map(|l| l.unwrap());
    let _ = peer.kill();
    let _ = peer.wait();
    r.assert_code(0)
        .assert_stdout_has("testguest: netbench tx frames=300 bytes=454200 ")
        .assert_stdout_has("testguest: netbench rx frames=299 ")
        .assert_stdout_has("testguest: netbench pingpong rounds=100 ");
    assert_eq!(
        summary.as_deref(),
        Some("peer: tx frames received=300 rx frames sent=300")
    );
}

#[test]
fn disk_start_up_errors_are_one_line() {
    let guest = testguest().to_string_lossy().into_owned();
    let one_line = |args: &[&str], needle: &str| {
        let mut all = vec!["run", "--kernel", guest.as_str()];
        all.extend_from_slice(args);
        let r = run_skiff(&all, T);
        r.assert_code(1);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        r.assert_stderr_has(needle);
    };
    one_line(
        &["--disk", "path=/nonexistent/disk.img"],
        "/nonexistent/disk.img",
    );
    let odd = disk(1000);
    let spec = format!("path={}", odd.path().display());
    one_line(&["--disk", &spec], "512");
    one_line(&["--disk", "path=/tmp"], "/tmp");
}

#[test]
fn a_disk_in_use_by_another_skiff_is_refused() {
    require_kvm();
    let f = disk(1 << 20);
    let spec = format!("path={}", f.path().display());
    let kernel = testguest().to_string_lossy().into_owned();
    let mut first = Skiff::spawn(&[
        "run",
        "--kernel",
        &kernel,
        "--cmdline",
        "spin",
        "--disk",
        &spec,
    ]);
    first.wait_for_line("testguest: spinning", T);
    let r = run_skiff(
        &[
            "run",
            "--kernel",
            &kernel,
            "--cmdline",
            "hello",
            "--disk",
            &spec,
        ],
        T,
    );
    r.assert_code(1).assert_stderr_has("lock");
    drop(first);
}
