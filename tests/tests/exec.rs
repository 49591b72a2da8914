//! `skiff exec` end to end with the test guest's `agent` scenario, which speaks the agent
//! protocol over vsock and runs named scenarios instead of programs: exit codes, signals,
//! streaming, timeouts, agent death, garbage, a guest that never starts the agent, bad input,
//! and virtiofsd missing or dying. Every run gets a TMPDIR of its own, checked empty afterwards
//! (no temporary file left), and no process may be left that mentions it or runs with it as
//! its TMPDIR (no orphaned virtiofsd, skiff or VM teardown process).

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use skiff_tests::{
    processes_mentioning, require_kvm, skiff_bin, testguest, virtiofsd_bin, Finished, Skiff,
};
use vmm::test_runner::suite::{AgentKind, VmSpec};
use vmm::test_runner::test_vm::TestVm;

const LIMIT: Duration = Duration::from_secs(60);

/// A private TMPDIR for one `skiff exec`.
struct Run {
    tmp: tempfile::TempDir,
}

impl Run {
    fn new() -> Self {
        require_kvm();
        Run {
            tmp: tempfile::Builder::new()
                .prefix("sx")
                .tempdir_in("/tmp")
                .expect("temp dir"),
        }
    }

    fn command(&self, extra: &[&str], cmd: &[&str]) -> Command {
        let mut c = Command::new(skiff_bin());
        c.env("TMPDIR", self.tmp.path())
            .arg("exec")
            .arg("--kernel")
            .arg(testguest())
            .args(extra)
            .arg("--")
            .args(cmd);
        c
    }

    /// Runs `skiff exec` with the guest's `agent` scenario.
    fn exec(&self, extra: &[&str], cmd: &[&str]) -> Finished {
        let mut args = vec!["--cmdline", "agent"];
        args.extend_from_slice(extra);
        self.finish(Skiff::spawn_command(&mut self.command(&args, cmd)))
    }

    fn finish(&self, skiff: Skiff) -> Finished {
        let done = skiff.wait(LIMIT);
        self.assert_clean();
        done
    }

    /// Nothing left in TMPDIR, and no process mentions it in its command line (a virtiofsd)
    /// or runs with it as its TMPDIR (skiff, the process that tears its VM down, anything
    /// they started).
    fn assert_clean(&self) {
        let left: Vec<_> = std::fs::read_dir(self.tmp.path())
            .expect("read TMPDIR")
            .map(|e| e.expect("entry").path())
            .collect();
        assert!(left.is_empty(), "skiff exec left {left:?}");
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let mut procs = processes_mentioning(self.tmp.path());
            procs.extend(processes_with_tmpdir(self.tmp.path()));
            if procs.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "processes left behind: {procs:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Live processes (not zombies) whose environment has `TMPDIR=tmp`: (pid, command line).
fn processes_with_tmpdir(tmp: &Path) -> Vec<(u32, String)> {
    let needle = format!("TMPDIR={}", tmp.display()).into_bytes();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if !zombie && env.split(|&b| b == 0).any(|var| var == needle.as_slice()) {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            out.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    out
}

#[test]
fn exit_codes_and_signals_come_back() {
    let run = Run::new();
    let r = run.exec(&[], &["echo", "hello", "world"]);
    r.assert_code(0);
    assert_eq!(r.stdout, "hello world\n");
    assert_eq!(r.stderr, "", "a clean run prints nothing of its own");
    run.exec(&[], &["exit=42"]).assert_code(42);
    run.exec(&[], &["false"]).assert_code(1);
    // 128 + N for a signal, as a shell reports it.
    run.exec(&[], &["signal=9"]).assert_code(137);
    let r = run.exec(&[], &["warn", "to", "stderr"]);
    r.assert_code(0);
    assert_eq!(r.stderr, "to stderr\n");
    assert_eq!(r.stdout, "");
}

#[test]
fn a_missing_command_exits_127() {
    let run = Run::new();
    run.exec(&[], &["no-such-command"])
        .assert_code(127)
        .assert_stderr_has("no-such-command: command not found");
}

#[test]
fn output_streams_in_full() {
    let run = Run::new();
    let bytes = 3_000_000;
    let r = run.exec(&[], &[&format!("flood={bytes}")]);
    r.assert_code(0);
    assert_eq!(r.stdout.len(), bytes);
    for (i, b) in r.stdout.bytes().enumerate().step_by(997) {
        let want = if i % 64 == 63 {
            b'\n'
        } else {
            b'a' + (i % 26) as u8
        };
        assert_eq!(b, want, "byte {i}");
    }
}

#[test]
fn a_command_timeout_exits_124() {
    let run = Run::new();
    let start = Instant::now();
    let r = run.exec(&["--timeout", "0.5"], &["spin"]);
    r.assert_code(124).assert_stderr_has("--timeout expired");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn an_agent_that_dies_mid_command_is_lost() {
    let run = Run::new();
    run.exec(&[], &["die"])
        .assert_code(203)
        .assert_stderr_has("skiff: the agent was lost")
        // The serial console's last lines come with it.
        .assert_stderr_has("testguest: agent dies mid-exec");
}

#[test]
fn garbage_from_the_guest_is_its_own_code() {
    let run = Run::new();
    run.exec(&[], &["garbage"])
        .assert_code(204)
        .assert_stderr_has("broke the agent protocol: bad frame magic");
}

#[test]
fn a_guest_that_never_starts_the_agent() {
    let run = Run::new();
    // The guest drives its vsock device (it listens on port 1024) but never connects: the
    // boot timeout ends it.
    let start = Instant::now();
    let mut cmd = run.command(
        &["--cmdline", "agent-listen", "--boot-timeout", "1"],
        &["true"],
    );
    let r = run.finish(Skiff::spawn_command(&mut cmd));
    r.assert_code(201)
        .assert_stderr_has("the guest never came up: no agent connected within 1 s")
        .assert_stderr_has("testguest: agent listening");
    assert_eq!(own_lines(&r), 1, "{}", r.stderr);
    assert!(start.elapsed() < Duration::from_secs(10));
}

/// skiff's own `skiff: ` lines, without the serial tail's heading.
fn own_lines(r: &Finished) -> usize {
    r.stderr
        .lines()
        .filter(|l| l.starts_with("skiff: ") && !l.starts_with("skiff: last lines"))
        .count()
}

#[test]
fn a_kernel_without_vsock_or_virtiofs_support_is_its_own_code() {
    // A guest that never sets its virtio-vsock (or virtio-fs) device up is what a kernel
    // without vsock (or virtio-fs) support looks like from the host.
    let run = Run::new();
    // It ends before any agent could connect.
    let mut cmd = run.command(&["--cmdline", "exit=3"], &["true"]);
    let r = run.finish(Skiff::spawn_command(&mut cmd));
    r.assert_code(208)
        .assert_stderr_has(
            "the guest ended before its agent connected and never set up its virtio-vsock device",
        )
        .assert_stderr_has("CONFIG_VIRTIO_VSOCKETS")
        .assert_stderr_has("testguest: exit 3");
    assert_eq!(own_lines(&r), 1, "{}", r.stderr);
    // It runs on and never does: the boot timeout ends it.
    let start = Instant::now();
    let mut cmd = run.command(&["--cmdline", "spin", "--boot-timeout", "1"], &["true"]);
    run.finish(Skiff::spawn_command(&mut cmd))
        .assert_code(208)
        .assert_stderr_has(
            "had no agent connected within 1 s and never set up its virtio-vsock device",
        )
        .assert_stderr_has("testguest: spinning");
    assert!(start.elapsed() < Duration::from_secs(10));

    // The agent connects, but the guest never set up the virtio-fs device of a `--share`
    // (`agent-nofs`): the command is not run without its files. The virtiofsd goes too.
    let share = tempfile::tempdir().expect("share dir");
    let share_arg = format!("{}:/mnt/share", share.path().display());
    let mut cmd = run.command(
        &["--cmdline", "agent-nofs", "--share", &share_arg],
        &["echo", "never run"],
    );
    cmd.env("SKIFF_VIRTIOFSD", virtiofsd_bin());
    let r = run.finish(Skiff::spawn_command(&mut cmd));
    r.assert_code(208).assert_stderr_has(&format!(
        "its kernel never set up the virtio-fs device for --share {share_arg}"
    ));
    assert_eq!(r.stdout, "", "the command ran");
    assert_eq!(own_lines(&r), 1, "{}", r.stderr);
    // The same guest with a virtio-fs driver (`agent`) runs it.
    let mut cmd = run.command(
        &["--cmdline", "agent", "--share", &share_arg],
        &["echo", "run"],
    );
    cmd.env("SKIFF_VIRTIOFSD", virtiofsd_bin());
    let r = run.finish(Skiff::spawn_command(&mut cmd));
    r.assert_code(0);
    assert_eq!(r.stdout, "run\n");
}

#[test]
fn bad_input_gets_one_line_and_its_code() {
    let run = Run::new();
    let mut cmd = Command::new(skiff_bin());
    cmd.env("TMPDIR", run.tmp.path())
        .args(["exec", "--kernel", "/no/such/kernel", "--", "true"]);
    let r = run.finish(Skiff::spawn_command(&mut cmd));
    r.assert_code(200)
        .assert_stderr_has("skiff: kernel /no/such/kernel: not a readable file");
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);

    let r = run.exec(&["--initrd", "/no/such/initrd"], &["true"]);
    r.assert_code(200).assert_stderr_has("/no/such/initrd");
    let r = run.exec(&["--share", "/no/such/dir:/mnt"], &["true"]);
    r.assert_code(200)
        .assert_stderr_has("--share /no/such/dir: not a directory");
    let r = run.exec(&["--share", "/tmp:relative"], &["true"]);
    r.assert_code(2);
    // No command at all.
    let mut cmd = Command::new(skiff_bin());
    cmd.args(["exec", "--kernel", "/x"]);
    let r = run.finish(Skiff::spawn_command(&mut cmd));
    r.assert_code(2);
}

#[test]
fn a_missing_or_failing_virtiofsd_is_its_own_code() {
    let run = Run::new();
    let share = tempfile::tempdir().expect("share dir");
    let share_arg = format!("{}:/mnt/share", share.path().display());

    let mut cmd = run.command(&["--cmdline", "agent", "--share", &share_arg], &["true"]);
    cmd.env("SKIFF_VIRTIOFSD", "/no/such/virtiofsd");
    run.finish(Skiff::spawn_command(&mut cmd))
        .assert_code(205)
        .assert_stderr_has("virtiofsd not found");

    // A "virtiofsd" that exits at once.
    let fake = share.path().join("fake-virtiofsd");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho fake virtiofsd gives up >&2\nexit 3\n",
    )
    .expect("script");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let mut cmd = run.command(&["--cmdline", "agent", "--share", &share_arg], &["true"]);
    cmd.env("SKIFF_VIRTIOFSD", &fake);
    run.finish(Skiff::spawn_command(&mut cmd))
        .assert_code(205)
        .assert_stderr_has("exited (exit status: 3): fake virtiofsd gives up");
}

#[test]
fn a_virtiofsd_that_dies_mid_command_ends_the_run() {
    let run = Run::new();
    let share = tempfile::tempdir().expect("share dir");
    let share_arg = format!("{}:/mnt/share", share.path().display());
    let log_dir = tempfile::tempdir().expect("log dir");
    let log = log_dir.path().join("serial.log");
    let log_arg = log.to_string_lossy().into_owned();
    let mut cmd = run.command(
        &[
            "--cmdline",
            "agent",
            "--share",
            &share_arg,
            "--serial-log",
            &log_arg,
        ],
        &["spin"],
    );
    cmd.env("SKIFF_VIRTIOFSD", virtiofsd_bin());
    let skiff = Skiff::spawn_command(&mut cmd);
    let deadline = Instant::now() + LIMIT;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("testguest: agent exec spin")
    {
        assert!(Instant::now() < deadline, "the exec never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let daemons: Vec<u32> = processes_mentioning(run.tmp.path())
        .into_iter()
        .filter(|(pid, _)| *pid != skiff.pid())
        .map(|(pid, _)| pid)
        .collect();
    assert!(!daemons.is_empty(), "no virtiofsd found");
    for pid in daemons {
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    run.finish(skiff)
        .assert_code(205)
        .assert_stderr_has("virtiofsd for");
}

/// Runs `skiff ctl exec` against the VM behind `vsock`.
fn ctl_exec(vsock: &Path, extra: &[&str], cmd: &[&str]) -> Finished {
    let mut c = Command::new(skiff_bin());
    c.args(["ctl", "exec", "--vsock"])
        .arg(vsock)
        .args(extra)
        .arg("--")
        .args(cmd);
    Skiff::spawn_command(&mut c).wait(LIMIT)
}

#[test]
fn ctl_exec_runs_commands_in_a_long_running_agent_vm() {
    require_kvm();
    let dir = tempfile::tempdir().expect("dir");
    // `skiff run --agent` (the `Linux` agent kind) with the test guest listening as the agent.
    let mut spec = VmSpec::new("ctl", testguest(), AgentKind::Linux);
    spec.cmdline = "agent-listen".into();
    let mut vm = TestVm::boot(skiff_bin(), &spec, dir.path()).expect("boot");
    // `ctl exec` makes its own connections; the test guest serves one at a time.
    vm.disconnect();
    let vsock = vm.vsock_socket().to_path_buf();
    // The agent's initramfs and its parameters came after the user's command line.
    assert!(vm
        .serial()
        .contains("agent-listen rdinit=/skiff-agent skiff.agent=vsock:1024"));

    let r = ctl_exec(&vsock, &[], &["echo", "one"]);
    r.assert_code(0);
    assert_eq!(r.stdout, "one\n");
    ctl_exec(&vsock, &[], &["exit=5"]).assert_code(5);
    ctl_exec(&vsock, &["--timeout", "0.3"], &["spin"]).assert_code(124);
    ctl_exec(&vsock, &[], &["missing"]).assert_code(127);
    let r = ctl_exec(&vsock, &[], &["flood=200000"]);
    r.assert_code(0);
    assert_eq!(r.stdout.len(), 200_000);
    // Nothing listens behind a socket that is not a VM's.
    ctl_exec(&dir.path().join("nope"), &[], &["true"])
        .assert_code(200)
        .assert_stderr_has("cannot connect to");
    // The library's own connection comes back after `ctl exec`'s.
    assert_eq!(vm.exec(&["exit=4"]).expect("exec").code(), Some(4));
    drop(vm);

    // --agent without --vsock is a usage error.
    let mut bad = Command::new(skiff_bin());
    bad.args(["run", "--agent", "--kernel"]).arg(testguest());
    Skiff::spawn_command(&mut bad)
        .wait(LIMIT)
        .assert_code(2)
        .assert_stderr_has("--agent needs --vsock");
}

/// One agent-protocol frame (what `agent_protocol` encodes; written out here so the test reads
/// the bytes the guest sends rather than trusting the same encoder).
fn frame(kind: u8, request: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = b"SKAG".to_vec();
    f.extend_from_slice(&[1, kind, 0, 0]);
    f.extend_from_slice(&request.to_le_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn the_agent_protocol_also_runs_on_a_virtio_console_port() {
    use std::io::{Read, Write};
    require_kvm();
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("serial.log");
    // `--console` feeds the virtio console from a terminal on stdin and writes it to stdout;
    // `--timeout` ends stdout (and so the read below) if the guest never answers.
    let (master, slave) = skiff_tests::open_pty();
    let mut vm = Command::new(skiff_bin())
        .args(["run", "--console", "--timeout", "60", "--kernel"])
        .arg(testguest())
        .args(["--cmdline", "agent-console", "--serial"])
        .arg(format!("file={}", log.display()))
        .stdin(std::process::Stdio::from(slave))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("skiff");
    let deadline = Instant::now() + LIMIT;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("testguest: agent on the console")
    {
        assert!(Instant::now() < deadline, "the agent never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut keyboard = std::fs::File::from(master);
    let mut hello = 1u32.to_le_bytes().to_vec();
    hello.extend_from_slice(&0u32.to_le_bytes());
    let mut exec = 0u32.to_le_bytes().to_vec(); // flags
    exec.extend_from_slice(&0u64.to_le_bytes()); // no timeout
    exec.extend_from_slice(&0u32.to_le_bytes()); // cwd
    exec.extend_from_slice(&1u32.to_le_bytes()); // argv: one entry
    exec.extend_from_slice(&6u32.to_le_bytes());
    exec.extend_from_slice(b"exit=3");
    exec.extend_from_slice(&0u32.to_le_bytes()); // env
    exec.extend_from_slice(&0u32.to_le_bytes()); // stdin
    keyboard
        .write_all(&[frame(0x01, 0, &hello), frame(0x02, 1, &exec)].concat())
        .expect("write frames");
    // HelloReply, Started, Exit(code 3): read stdout until the Exit frame is complete.
    let want_exit = frame(0x85, 1, &[0, 3, 0, 0, 0]);
    let mut out = Vec::new();
    let mut stdout = vm.stdout.take().expect("stdout");
    let mut buf = [0u8; 256];
    while !out.windows(want_exit.len()).any(|w| w == want_exit) {
        assert!(
            Instant::now() < deadline,
            "no Exit frame; got {:?}",
            String::from_utf8_lossy(&out)
        );
        let n = stdout.read(&mut buf).expect("read stdout");
        assert!(n > 0, "stdout ended: {:?}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
    assert!(
        out.starts_with(&frame(0x81, 0, &[])[..5]),
        "the first frame is not a HelloReply: {out:?}"
    );
    assert!(out.windows(15).any(|w| w == b"skiff-testguest"));
    let _ = vm.kill();
    let _ = vm.wait();
}
