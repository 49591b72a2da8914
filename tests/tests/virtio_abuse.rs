//! Bad input from the guest to the virtio-pci devices: the test guest's `virtio-abuse` scenario
//! misprograms a virtio-rng, a virtio-blk, a virtio-net and a virtio-console device (queue sizes
//! that are not powers of two, rings and buffers outside guest RAM or in the MMIO hole, looping
//! chains, bad indirect tables, an available index far ahead, a used ring over the descriptors,
//! a bogus `used_event`, writes after DRIVER_OK, a reset with I/O in flight, kicks from both
//! vCPUs at once, wrong directions,
//! oversized lengths, sectors past the end, MSI-X vectors out of range, MSI-X messages to odd
//! addresses and mask storms, odd BAR, ROM BAR and capability-list writes) and checks that each
//! one is refused with IOERR or DEVICE_NEEDS_RESET, or harmlessly ignored, then that a reset
//! device works again. The host side checks that skiff neither panicked nor wrote the disk
//! anywhere but the one sector the guest's final, valid write targets, and stayed quiet on
//! stderr.

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use skiff_tests::{require_kvm, skiff_bin, testguest, NetNs, Skiff};

const T: Duration = Duration::from_secs(120);
const DISK_BYTES: usize = 4 << 20;
const FILL: u8 = 0x3c;
/// The sector the guest's `after-reset` case writes, and the pattern it writes there.
const PROOF_SECTOR: usize = 1;
const PATTERN: u64 = 0xa5a5_a5a5_a5a5_a5a5;

/// Every case line the scenario prints, with what skiff must have done.
const CASES: [(&str, &[&str]); 21] = [
    (
        "queue-size",
        &[
            "rng=needs-reset-at-write",
            "blk=needs-reset-at-write",
            "net=",
            "console=",
        ],
    ),
    (
        "ring-address",
        &[
            "rng=desc at=enable",
            "rng=avail at=enable",
            "rng=used at=enable",
            "rng=used-at-ram-end at=enable",
            "blk=desc at=enable",
            "blk=avail at=enable",
            "blk=used at=enable",
            "blk=used-at-ram-end at=enable",
            "net=used-at-ram-end at=",
            "console=used-at-ram-end at=",
        ],
    ),
    (
        "desc-loop",
        &[
            "two-loop=needs-reset",
            "self-loop=needs-reset",
            "next-outside-table=needs-reset",
        ],
    ),
    (
        "data-address",
        &[
            "out-far=ioerr",
            "in-far=ioerr",
            "out-at-ram-end=ioerr",
            "out-wrapping=ioerr",
        ],
    ),
    (
        "direction",
        &[
            "in-device-readable=ioerr",
            "out-device-writable=ioerr",
            "readable-after-writable=ioerr",
            "header-writable=ioerr",
        ],
    ),
    (
        "oversized",
        &["in-4g=ioerr", "out-4g=ioerr", "out-not-sectors=ioerr"],
    ),
    (
        "sector-range",
        &[
            "in-at-capacity=ioerr",
            "out-across-the-end=ioerr",
            "in-max-sector=ioerr",
            "out-offset-overflow=ioerr",
            "capacity=0x2000",
        ],
    ),
    (
        "msix-vector",
        &[
            "rng=no-vector:0x4 table-size=0x2",
            "blk=no-vector:0x4 table-size=0x2",
        ],
    ),
    (
        "queue-select",
        &[
            "rng=ignored",
            "blk=ignored",
            "net=ignored",
            "console=ignored",
        ],
    ),
    (
        "bar-access",
        &[
            "rng=zero-reads:0x7",
            "blk=zero-reads:0x7",
            "net=zero-reads:0x7",
            "console=zero-reads:0x7",
        ],
    ),
    (
        "indirect",
        &[
            "blk=zero-length got=",
            "blk=not-multiple-of-16 got=",
            "blk=nested got=",
            "blk=looping got=",
            "blk=outside-ram got=",
            "blk=in-mmio-hole got=",
            "net=in-mmio-hole got=",
            "console=in-mmio-hole got=",
            "rng=in-mmio-hole got=",
            "valid=ok",
        ],
    ),
    ("avail-far-ahead", &["rng=", "blk=", "net=", "console="]),
    (
        "used-overlap",
        &[
            "rng=over-descriptors",
            "blk=over-descriptors",
            "blk=over-data",
            "net=over-descriptors",
            "console=over-descriptors",
        ],
    ),
    (
        "mmio-hole",
        &[
            "in-hole-start=ioerr",
            "out-own-bar=ioerr",
            "in-own-bar=ioerr",
            "in-lapic=ioerr",
        ],
    ),
    ("used-event", &["served=0x3"]),
    ("driver-ok-writes", &["rng=", "blk=", "net=", "console="]),
    ("reset-in-flight", &["resets=0x4", "then=served"]),
    ("smp-kicks", &["cpus=0x2", "served=0x8"]),
    (
        "msix-table",
        &[
            "rng=bogus-addresses-served:0x3",
            "blk=bogus-addresses-served:0x3",
            "net=bogus-addresses-served:0x3",
            "console=bogus-addresses-served:0x3",
            "after-storm=served",
        ],
    ),
    (
        "config-space",
        &[
            "rng=bar",
            "blk=bar",
            "net=bar",
            "console=bar",
            "rom=0x0",
            "then=served",
        ],
    ),
    (
        "after-reset",
        &["rng=bytes:0x40", "blk=sector-written-and-read:0x1"],
    ),
];

/// skiff's stderr may carry a few warnings per device about what the guest did, never a flood.
const MAX_STDERR_LINES: usize = 200;

#[test]
fn guest_abuse_of_virtio_devices_is_refused_and_a_reset_recovers() {
    require_kvm();
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), vec![FILL; DISK_BYTES]).unwrap();
    let spec = format!("path={}", f.path().display());
    // The net device needs a tap: the guest's frames go to one in a private namespace.
    let ns = NetNs::new("skab0");
    let kernel = testguest().to_string_lossy().into_owned();
    let mut cmd = ns.command(&skiff_bin().to_string_lossy());
    cmd.args([
        "run",
        "--kernel",
        &kernel,
        "--cmdline",
        "virtio-abuse",
        "--cpus",
        "2",
        "--rng",
        "--disk",
        &spec,
        "--net",
        "tap=skab0",
        "--console",
    ]);
    let r = Skiff::spawn_command(&mut cmd).wait(T);
    r.assert_code(0)
        .assert_stdout_has("testguest: virtio-abuse ok cases=21")
        .assert_stdout_has("testguest: done");
    let stderr_lines = r.stderr.lines().count();
    assert!(
        stderr_lines < MAX_STDERR_LINES,
        "skiff wrote {stderr_lines} lines to stderr:\n{}",
        r.stderr
    );
    for (case, details) in CASES {
        let prefix = format!("testguest: virtio-abuse {case} ok (");
        let line = r
            .stdout
            .lines()
            // Console output (newlines) may share a line with the guest's serial output.
            .find(|l| l.contains(&prefix))
            .unwrap_or_else(|| panic!("no {case:?} line\n--- stdout ---\n{}", r.stdout));
        for d in details {
            assert!(line.contains(d), "{case}: {d:?} missing from {line:?}");
        }
    }
    // The second vCPU really kicked while the first one's reads were served.
    assert!(
        r.stdout.contains("ap-kicks=0x") && !r.stdout.contains("ap-kicks=0x0)"),
        "{}",
        r.stdout
    );
    // An unusual sum of lengths may be refused either way, but never accepted.
    assert!(
        r.stdout.contains("in-sum-over-4g=ioerr")
            || r.stdout.contains("in-sum-over-4g=needs-reset"),
        "{}",
        r.stdout
    );
    for bad in ["panicked", "PANIC", "FAIL"] {
        assert!(!r.stdout.contains(bad), "stdout has {bad:?}:\n{}", r.stdout);
        assert!(!r.stderr.contains(bad), "stderr has {bad:?}:\n{}", r.stderr);
    }

    // Nothing but the proof sector changed: the refused writes never reached the file.
    let bytes = std::fs::read(f.path()).unwrap();
    assert_eq!(bytes.len(), DISK_BYTES, "the disk changed size");
    let proof = PROOF_SECTOR * 512..(PROOF_SECTOR + 1) * 512;
    for (i, &b) in bytes.iter().enumerate() {
        if !proof.contains(&i) {
            assert_eq!(b, FILL, "disk byte {i:#x} changed");
        }
    }
    for o in proof.step_by(8) {
        let v = u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        assert_eq!(v, o as u64 ^ PATTERN, "proof sector word at {o:#x}");
    }
}

/// Guest-caused warnings are rate-limited per device and kind: the scenario run three times in
/// one boot costs only a few more stderr lines than once (the summaries of what was counted),
/// and virtio-queue's own error lines about the guest's rings do not reach stderr.
#[test]
fn repeated_abuse_keeps_the_host_log_bounded() {
    require_kvm();
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), vec![FILL; DISK_BYTES]).unwrap();
    let spec = format!("path={}", f.path().display());
    let ns = NetNs::new("skab1");
    let kernel = testguest().to_string_lossy().into_owned();
    let run = |cmdline: &str| {
        let mut cmd = ns.command(&skiff_bin().to_string_lossy());
        cmd.args([
            "run",
            "--kernel",
            &kernel,
            "--cmdline",
            cmdline,
            "--cpus",
            "2",
            "--rng",
            "--disk",
            &spec,
            "--net",
            "tap=skab1",
            "--console",
        ]);
        let r = Skiff::spawn_command(&mut cmd).wait(T);
        r.assert_code(0);
        r
    };
    let once = run("virtio-abuse");
    let thrice = run("virtio-abuse virtio-abuse virtio-abuse");
    assert_eq!(
        thrice
            .stdout
            .matches("testguest: virtio-abuse ok cases=21")
            .count(),
        3,
        "{}",
        thrice.stdout
    );
    let (n1, n3) = (once.stderr.lines().count(), thrice.stderr.lines().count());
    let summaries = thrice
        .stderr
        .lines()
        .filter(|l| l.contains("warnings suppressed"))
        .count();
    assert!(
        summaries > 0,
        "no summary of suppressed warnings:\n{}",
        thrice.stderr
    );
    assert!(
        n3 <= n1 + summaries + 8,
        "3 rounds wrote {n3} lines, 1 round {n1}:\n{}",
        thrice.stderr
    );
    assert!(
        !thrice.stderr.contains("skiff: error: virtio queue"),
        "{}",
        thrice.stderr
    );
}
