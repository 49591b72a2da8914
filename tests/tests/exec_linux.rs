//! `skiff exec` with the minimal Linux kernel from `images/linux` and no user initramfs but
//! skiff's own (the agent as PID 1).
//!
//! A probe picks the tier: on a PVM host (`/sys/module/kvm_pvm`) Linux user space cannot run,
//! so the test checks that the kernel got as far as running the agent as init and that skiff
//! says in one line, with its own exit code, that this host cannot run it; on hardware KVM the
//! busybox initramfs is appended and `uname -a` and `false` run in the guest. The test prints
//! which tier ran.

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)

use std::process::Command;
use std::time::Duration;

use skiff_tests::{linux_images, pvm_host, require_kvm, skiff_bin, Finished, Skiff};

/// See linux_boot.rs: kernel-mode instructions the PVM emulator cannot run, and a shortcut.
const PVM_SAFE_ARGS: &str = "noxsave clearcpuid=cx16,smap,smep,popcnt rodata=off";
/// Boots reach `Run /init` in 22 s on a quiet PVM host and 60-70 s under load.
const LIMIT: Duration = Duration::from_secs(400);

fn exec(initrd: Option<&std::path::Path>, cmd: &[&str]) -> Finished {
    let images = linux_images();
    let mut c = Command::new(skiff_bin());
    c.args(["exec", "--kernel"])
        .arg(&images.vmlinux)
        .args(["--memory", "size=512M", "--cmdline", PVM_SAFE_ARGS])
        .args(["--boot-timeout", "300"]);
    if let Some(initrd) = initrd {
        c.arg("--initrd").arg(initrd);
    }
    c.arg("--").args(cmd);
    Skiff::spawn_command(&mut c).wait(LIMIT)
}

#[test]
fn linux_runs_the_agent_as_init() {
    require_kvm();
    let images = linux_images();
    if pvm_host() {
        eprintln!(
            "skiff exec Linux tier: PVM host, checked up to the kernel running the agent as init"
        );
        let r = exec(None, &["uname", "-a"]);
        r.assert_code(202)
            .assert_stderr_has("cannot run Linux user space")
            .assert_stderr_has("Run /skiff-agent as init process");
        assert_eq!(
            r.stderr
                .lines()
                .filter(|l| l.starts_with("skiff: ") && !l.starts_with("skiff: last lines"))
                .count(),
            1,
            "one line of skiff's own:\n{}",
            r.stderr
        );
    } else {
        eprintln!("skiff exec Linux tier: hardware KVM, uname -a and false run in the guest");
        let r = exec(Some(&images.initramfs), &["uname", "-a"]);
        r.assert_code(0);
        assert!(r.stdout.starts_with("Linux "), "{}", r.stdout);
        exec(Some(&images.initramfs), &["false"]).assert_code(1);
        exec(Some(&images.initramfs), &["no-such-command"]).assert_code(127);
    }
}
