//! The host terminal while skiff runs with `--serial stdio`: when stdin is a terminal it is put
//! in raw mode (no line buffering, no echo) so keystrokes reach the guest, and its settings are
//! restored when skiff exits, whatever the exit path (guest exit, timeout, signal).

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::Duration;

use skiff_tests::{open_pty, require_kvm, skiff_bin, testguest, Skiff};

fn lflag(fd: &OwnedFd) -> libc::tcflag_t {
    // SAFETY: all-zero is valid storage for tcgetattr to overwrite.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is writable and `fd` is an open terminal.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t.c_lflag
}

fn run_on_terminal(cmdline: &str, extra: &[&str], slave: &OwnedFd) -> Skiff {
    let kernel = testguest().to_string_lossy().into_owned();
    let mut cmd = Command::new(skiff_bin());
    cmd.args(["run", "--kernel", &kernel, "--cmdline", cmdline])
        .args(extra);
    cmd.stdin(Stdio::from(slave.try_clone().unwrap()));
    Skiff::spawn_command_with_stdin(&mut cmd)
}

#[test]
fn raw_mode_while_running_and_restored_after_timeout() {
    require_kvm();
    let (_master, slave) = open_pty();
    let before = lflag(&slave);
    assert_ne!(
        before & libc::ICANON,
        0,
        "a new pty starts in canonical mode"
    );
    let mut vm = run_on_terminal("hello spin", &["--timeout", "3"], &slave);
    vm.wait_for_line("testguest: spinning", Duration::from_secs(30));
    let during = lflag(&slave);
    assert_eq!(
        during & (libc::ICANON | libc::ECHO),
        0,
        "raw mode while the guest runs"
    );
    assert_ne!(during & libc::ISIG, 0, "Ctrl-C still reaches skiff");
    let r = vm.wait(Duration::from_secs(30));
    r.assert_code(124);
    assert_eq!(
        lflag(&slave),
        before,
        "terminal settings restored after exit"
    );
}

#[test]
fn terminal_restored_after_sigint() {
    require_kvm();
    let (_master, slave) = open_pty();
    let before = lflag(&slave);
    let mut vm = run_on_terminal("hello spin", &[], &slave);
    vm.wait_for_line("testguest: spinning", Duration::from_secs(30));
    // SAFETY: sends SIGINT to the child we started.
    unsafe { libc::kill(vm.pid() as i32, libc::SIGINT) };
    let r = vm.wait(Duration::from_secs(30));
    r.assert_code(130);
    assert_eq!(lflag(&slave), before);
}
