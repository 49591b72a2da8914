//! skiff.exe where the Windows Hypervisor Platform is missing (under wine on Linux CI, or a
//! Windows without the feature): `skiff run` parses its options, builds guest RAM and loads
//! the test guest into it, then stops at the hypervisor with one line on stderr and exit code
//! 123. Bad input stops earlier, with the same one-line errors and codes as on Linux.
#![cfg(windows)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// The test guest (`SKIFF_TESTGUEST`, set by scripts/test-windows): a Unix path is read
/// through wine's Z: drive.
fn testguest() -> PathBuf {
    let path = std::env::var("SKIFF_TESTGUEST")
        .expect("SKIFF_TESTGUEST names the test guest ELF (scripts/test-windows sets it)");
    if path.starts_with('/') {
        PathBuf::from(format!("Z:{}", path.replace('/', "\\")))
    } else {
        PathBuf::from(path)
    }
}

fn skiff(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(args)
        .output()
        .expect("skiff.exe starts")
}

/// Asserts exit `code` and one stderr line starting with `start`; returns the line.
fn one_line(out: &Output, code: i32, start: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(stderr.starts_with(start), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(!stderr.trim_end().contains('\r'), "{stderr:?}");
    assert!(out.stdout.is_empty());
    stderr
}

#[test]
fn the_test_guest_loads_and_the_missing_platform_ends_skiff_with_one_line_and_its_own_code() {
    let kernel = testguest();
    let kernel = kernel.to_str().unwrap();
    let out = skiff(&[
        "run", "--kernel", kernel, "--cpus", "2", "--memory", "size=64M",
    ]);
    one_line(
        &out,
        123,
        "skiff: Windows Hypervisor Platform is not enabled: winhvplatform.dll cannot be loaded",
    );
}

#[test]
fn a_kernel_that_cannot_be_read_stops_skiff_before_the_hypervisor() {
    let out = skiff(&["run", "--kernel", "no-such-vmlinux"]);
    let line = one_line(&out, 1, "skiff: cannot read kernel no-such-vmlinux: ");
    assert!(!line.contains("Hypervisor"), "{line}");
}

#[test]
fn bad_options_are_usage_errors() {
    let kernel = testguest();
    let kernel = kernel.to_str().unwrap();
    one_line(
        &skiff(&["run", "--kernel", kernel, "--memory", "size=1M"]),
        2,
        "skiff: invalid value 'size=1M' for '--memory <SPEC>': --memory: guest memory size 0x100000 is below",
    );
    one_line(
        &skiff(&["run", "--kernel", kernel, "--cpus", "300"]),
        2,
        "skiff: invalid value '300' for '--cpus <N>'",
    );
    one_line(
        &skiff(&["run", "--kernel", kernel, "--disk", "path=disk.img"]),
        2,
        "skiff: unexpected argument '--disk' found",
    );
}
