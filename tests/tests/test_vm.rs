//! The runner as a library (`vmm::test_runner::test_vm`): boot a test-guest VM with its agent,
//! run commands and read and write files through it (closing and remaking its connection),
//! stop it into a snapshot, fork two VMs from that snapshot, and see each fork start from the
//! snapshot's state and keep its own changes; every VM is gone once its `TestVm` is dropped.

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;

use skiff_tests::{require_kvm, skiff_bin, testguest};
use vmm::test_runner::suite::{AgentKind, VmSpec};
use vmm::test_runner::test_vm::{TestVm, TestVmError};

/// Whether process `pid` still exists (and is not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn dir_in(root: &Path, name: &str) -> std::path::PathBuf {
    let d = root.join(name);
    std::fs::create_dir(&d).unwrap();
    d
}

#[test]
fn boot_exec_read_snapshot_and_fork() {
    require_kvm();
    let root = tempfile::tempdir().unwrap();
    let mut spec = VmSpec::new("tg", testguest(), AgentKind::Testguest);
    spec.setup = vec![vec![
        "put".into(),
        "/state".into(),
        "before".into(),
        "the".into(),
        "snapshot".into(),
    ]];
    let mut vm = TestVm::boot(skiff_bin(), &spec, &dir_in(root.path(), "base")).unwrap();
    let out = vm.exec(&["echo", "hello", "library"]).unwrap();
    assert_eq!(
        (out.code(), out.stdout_text()),
        (Some(0), "hello library\n".into())
    );
    assert_eq!(vm.exec(&["exit=6"]).unwrap().code(), Some(6));
    assert_eq!(vm.read_file("/state").unwrap(), b"before the snapshot\n");
    let missing = vm.read_file("/nothing").unwrap_err();
    assert!(
        matches!(missing, TestVmError::Agent(ref m) if m.contains("no such file")),
        "{missing}"
    );
    vm.write_file("/w", b"written by the library\n").unwrap();
    assert_eq!(
        vm.exec(&["cat", "/w"]).unwrap().stdout_text(),
        "written by the library\n"
    );
    // The test guest keeps files of at most 512 bytes: a larger one is the agent's refusal.
    let refused = vm.write_file("/big", &[b'x'; 600]).unwrap_err();
    assert!(
        matches!(refused, TestVmError::Agent(ref m) if m.contains("over 512 bytes")),
        "{refused}"
    );
    // Closed and made again on the next call.
    vm.disconnect();
    assert_eq!(vm.read_file("/w").unwrap(), b"written by the library\n");
    let snapshot = root.path().join("snap");
    vm.snapshot(&snapshot).unwrap();

    let mut a = TestVm::fork(skiff_bin(), &snapshot, &dir_in(root.path(), "a")).unwrap();
    let mut b = TestVm::fork(skiff_bin(), &snapshot, &dir_in(root.path(), "b")).unwrap();
    assert_eq!(
        a.exec(&["put", "/state", "fork", "a"]).unwrap().code(),
        Some(0)
    );
    assert_eq!(a.read_file("/state").unwrap(), b"fork a\n");
    // b starts from the snapshot, not from a.
    assert_eq!(
        b.exec(&["cat", "/state"]).unwrap().stdout_text(),
        "before the snapshot\n"
    );
    let timed_out = b
        .exec_with_timeout(&["spin"], std::time::Duration::from_millis(300))
        .unwrap_err();
    assert!(timed_out.to_string().contains("timed out"), "{timed_out}");
    assert!(
        a.serial().contains("testguest: agent exec put"),
        "{}",
        a.serial()
    );

    // Dropping a TestVm kills its VM.
    let pid = a.pid();
    assert!(alive(pid));
    drop(a);
    assert!(!alive(pid), "the VM outlived its TestVm");
}

#[test]
fn a_vm_that_never_answers_is_a_boot_error_with_its_serial_tail() {
    require_kvm();
    let root = tempfile::tempdir().unwrap();
    let mut spec = VmSpec::new("quiet", testguest(), AgentKind::Testguest);
    // `exit=3` ends the guest before `agent-listen` runs.
    spec.cmdline = "exit=3".into();
    let err = TestVm::boot(skiff_bin(), &spec, root.path()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, TestVmError::Boot(_)), "{text}");
    assert!(text.contains("the VM ended (skiff exit 3)"), "{text}");
    assert!(text.contains("serial: testguest: boot"), "{text}");
}
