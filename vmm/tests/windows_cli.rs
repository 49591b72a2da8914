//! skiff.exe where the Windows Hypervisor Platform is missing (under wine on Linux CI, or a
//! Windows without the feature): one line on stderr and exit code 123.
#![cfg(windows)]

use std::process::Command;

#[test]
fn a_missing_platform_ends_skiff_with_one_line_and_its_own_code() {
    let out = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(["run", "--kernel", "vmlinux"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(123), "stderr: {stderr}");
    assert!(
        stderr.starts_with(
            "skiff: Windows Hypervisor Platform is not enabled: winhvplatform.dll cannot be loaded"
        ),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(!stderr.trim_end().contains('\r'), "{stderr:?}");
    assert!(out.stdout.is_empty());
}
