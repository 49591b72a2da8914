//! End-to-end runs of the no_std test guest under skiff: every scenario, 1 and 2 vCPUs, memfd and
//! file backings, a 5 GiB guest that crosses the MMIO hole, exit codes and the timeout.

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use skiff_tests::{run_testguest, Skiff};

const T: Duration = Duration::from_secs(60);

#[test]
fn hello_prints_marker_and_exits_zero() {
    let r = run_testguest("hello", &[], T);
    r.assert_code(0)
        .assert_stdout_has("testguest: boot cmdline=\"hello\"")
        .assert_stdout_has("testguest: hello")
        .assert_stdout_has("testguest: done");
    assert!(
        r.stderr.is_empty(),
        "a clean guest exit prints nothing on stderr: {}",
        r.stderr
    );
}

#[test]
fn exit_code_comes_from_the_debug_port() {
    for n in [0, 7, 42, 255] {
        let r = run_testguest(&format!("exit={n}"), &[], T);
        r.assert_code(n)
            .assert_stdout_has(&format!("testguest: exit {n}"));
    }
}

#[test]
fn memcheck_one_vcpu_memfd() {
    let r = run_testguest("memcheck", &["--memory", "size=128M"], T);
    r.assert_code(0).assert_stdout_has("testguest: memcheck ok");
    // 128 MiB of RAM is 32768 pages; the guest skips only its own image and the low megabyte's
    // reserved area, so it must verify nearly all of them.
    let pages = memcheck_pages(&r.stdout);
    assert!(pages > 32000 && pages <= 32768, "verified {pages} pages");
}

#[test]
fn memcheck_two_vcpus_file_backed() {
    let dir = tempfile::tempdir().unwrap();
    let ram = dir.path().join("guest.ram");
    let spec = format!("size=64M,file={}", ram.display());
    let r = run_testguest("memcheck", &["--cpus", "2", "--memory", &spec], T);
    r.assert_code(0).assert_stdout_has("testguest: memcheck ok");
    // The guest's pattern is in the file: RAM really is the file.
    let bytes = std::fs::read(&ram).unwrap();
    assert_eq!(bytes.len(), 64 << 20);
    let page = 0x400_0000 - 0x1000; // last page of RAM
    let word = u64::from_le_bytes(bytes[page..page + 8].try_into().unwrap());
    assert_ne!(
        word, 0,
        "the guest's pattern word must reach the memory file"
    );
}

#[test]
fn memcheck_five_gib_crosses_the_mmio_hole() {
    let r = run_testguest(
        "memcheck",
        &["--memory", "size=5G"],
        Duration::from_secs(300),
    );
    r.assert_code(0)
        .assert_stdout_has("testguest: memcheck range 0x100000000-0x180000000")
        .assert_stdout_has("testguest: memcheck ok ranges=3");
}

#[test]
fn smp_starts_every_ap() {
    for cpus in [1u32, 2] {
        let r = run_testguest("smp", &["--cpus", &cpus.to_string()], T);
        r.assert_code(0)
            .assert_stdout_has(&format!("testguest: smp cpus={cpus}"))
            .assert_stdout_has(&format!("testguest: smp ok cpus={cpus}"));
        for ap in 1..cpus {
            r.assert_stdout_has(&format!("testguest: smp cpu {ap} online"));
        }
    }
}

#[test]
fn all_scenarios_in_one_boot() {
    let r = run_testguest(
        "hello smp memcheck",
        &["--cpus", "2", "--memory", "size=256M"],
        T,
    );
    r.assert_code(0)
        .assert_stdout_has("testguest: hello")
        .assert_stdout_has("testguest: smp ok cpus=2")
        .assert_stdout_has("testguest: memcheck ok")
        .assert_stdout_has("testguest: done");
}

#[test]
fn serial_to_file_and_off() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let spec = format!("file={}", log.display());
    let r = run_testguest("hello", &["--serial", &spec], T);
    r.assert_code(0);
    assert!(
        !r.stdout.contains("testguest: hello"),
        "serial went to a file, not stdout"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("testguest: hello"), "{text}");

    let r = run_testguest("hello", &["--serial", "off"], T);
    r.assert_code(0);
    assert!(!r.stdout.contains("testguest"), "{}", r.stdout);
}

#[test]
fn timeout_ends_a_hung_guest() {
    // `hang` is not a scenario the guest knows, so use one that waits forever: the guest spins
    // when told `spin`.
    let r = run_testguest("spin", &["--timeout", "1"], T);
    r.assert_code(124).assert_stderr_has("timeout");
    assert!(r.elapsed < Duration::from_secs(10), "took {:?}", r.elapsed);
}

#[test]
fn sigterm_stops_the_vm_cleanly() {
    skiff_tests::require_kvm();
    let kernel = skiff_tests::testguest().to_string_lossy().into_owned();
    let mut vm = Skiff::spawn(&["run", "--kernel", &kernel, "--cmdline", "hello spin"]);
    vm.wait_for_line("testguest: hello", T);
    // SAFETY: sending a signal to a child we own.
    unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) };
    let r = vm.wait(T);
    r.assert_code(143).assert_stderr_has("signal 15");
}

fn memcheck_pages(stdout: &str) -> u64 {
    stdout
        .lines()
        .find_map(|l| l.split("testguest: memcheck ok").nth(1))
        .and_then(|rest| rest.split("pages=").nth(1))
        .and_then(|n| n.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
