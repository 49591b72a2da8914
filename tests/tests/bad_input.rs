//! Bad user input: each case must give one clear line on stderr naming the problem, a non-zero
//! exit, no panic, and no file left behind.

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use skiff_tests::{require_kvm, run_skiff, skiff_bin, testguest, Finished, Skiff};

const T: Duration = Duration::from_secs(30);

fn run(args: &[&str]) -> Finished {
    run_skiff(args, T)
}

fn assert_one_line_error(r: &Finished, code: i32, needle: &str) {
    r.assert_code(code);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one stderr line, got:\n{}",
        r.stderr
    );
    assert!(lines[0].starts_with("skiff: "), "{}", lines[0]);
    assert!(lines[0].contains(needle), "{:?} lacks {needle:?}", lines[0]);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

fn guest() -> String {
    testguest().to_string_lossy().into_owned()
}

#[test]
fn missing_kernel() {
    let r = run(&["run", "--kernel", "/nonexistent/vmlinux"]);
    assert_one_line_error(&r, 1, "cannot read kernel /nonexistent/vmlinux");
}

#[test]
fn unreadable_kernel_is_reported_by_a_non_root_user() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("vmlinux");
    std::fs::copy(testguest(), &k).unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(skiff_bin())
        .args(["run", "--kernel"])
        .arg(&k);
    let r = Skiff::spawn_command(&mut cmd).wait(T);
    assert_one_line_error(&r, 1, "Permission denied");
}

#[test]
fn kernel_that_is_a_directory() {
    let r = run(&["run", "--kernel", "/tmp"]);
    assert_one_line_error(&r, 1, "not a regular file");
}

#[test]
fn kernel_that_is_neither_elf_nor_bzimage() {
    require_kvm();
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), b"MZ this is not a kernel").unwrap();
    let r = run(&["run", "--kernel", f.path().to_str().unwrap()]);
    assert_one_line_error(&r, 1, "not an ELF or bzImage (first bytes 4d 5a");
}

#[test]
fn truncated_kernel() {
    require_kvm();
    let image = std::fs::read(testguest()).unwrap();
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), &image[..image.len().min(200)]).unwrap();
    let r = run(&["run", "--kernel", f.path().to_str().unwrap()]);
    assert_one_line_error(&r, 1, "cannot load ELF");
}

#[test]
fn missing_initrd() {
    let r = run(&[
        "run",
        "--kernel",
        &guest(),
        "--initrd",
        "/nonexistent/initrd",
    ]);
    assert_one_line_error(&r, 1, "cannot read initrd /nonexistent/initrd");
}

#[test]
fn initrd_larger_than_ram() {
    require_kvm();
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(64 << 20).unwrap();
    let r = run(&[
        "run",
        "--kernel",
        &guest(),
        "--memory",
        "size=32M",
        "--initrd",
        f.path().to_str().unwrap(),
    ]);
    assert_one_line_error(&r, 1, "does not fit in guest RAM");
}

#[test]
fn zero_and_absurd_cpus() {
    let r = run(&["run", "--kernel", &guest(), "--cpus", "0"]);
    assert_one_line_error(&r, 2, "--cpus 0 is out of range");
    let r = run(&["run", "--kernel", &guest(), "--cpus", "100000"]);
    assert_one_line_error(&r, 2, "--cpus 100000 is out of range");
    let r = run(&["run", "--kernel", &guest(), "--cpus", "many"]);
    assert_one_line_error(&r, 2, "invalid --cpus \"many\"");
}

#[test]
fn zero_unaligned_and_absurd_memory() {
    require_kvm();
    let r = run(&["run", "--kernel", &guest(), "--memory", "size=0"]);
    assert_one_line_error(&r, 2, "below the minimum");
    let r = run(&["run", "--kernel", &guest(), "--memory", "size=10000001"]);
    assert_one_line_error(&r, 2, "not a multiple of the page size 0x1000");
    let r = run(&["run", "--kernel", &guest(), "--memory", "size=100T"]);
    assert_one_line_error(&r, 2, "exceeds");
    let r = run(&["run", "--kernel", &guest(), "--memory", "size=1G,size=2G"]);
    assert_one_line_error(&r, 2, "--memory size= given twice");
    let r = run(&["run", "--kernel", &guest(), "--memory", "size=lots"]);
    assert_one_line_error(&r, 2, "invalid size \"lots\"");
}

#[test]
fn hugepages_without_free_pages() {
    require_kvm();
    let free: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    // Ask for more huge pages than are free.
    let size = format!("size={}M,hugepages=on", (free + 16) * 2);
    let r = run(&["run", "--kernel", &guest(), "--memory", &size]);
    assert_one_line_error(&r, 1, "free huge pages");
}

#[test]
fn memory_file_on_a_read_only_path() {
    require_kvm();
    // /proc is never writable for new files, even for root.
    let r = run(&[
        "run",
        "--kernel",
        &guest(),
        "--memory",
        "size=64M,file=/proc/skiff-ram",
    ]);
    assert_one_line_error(&r, 1, "cannot open memory file /proc/skiff-ram");
}

#[test]
fn failed_start_leaves_no_memory_file_behind() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let ram = dir.path().join("ram");
    let spec = format!("size=64M,file={}", ram.display());
    let r = run(&["run", "--kernel", "/etc/hostname", "--memory", &spec]);
    assert_one_line_error(&r, 1, "not an ELF or bzImage");
    assert!(
        !ram.exists(),
        "a failed start must remove the memory file it created"
    );
}

#[test]
fn existing_memory_file_survives_a_failed_start() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let ram = dir.path().join("ram");
    std::fs::write(&ram, vec![0xabu8; 4096]).unwrap();
    let spec = format!("size=64M,file={}", ram.display());
    let r = run(&["run", "--kernel", "/etc/hostname", "--memory", &spec]);
    r.assert_code(1);
    let bytes = std::fs::read(&ram).unwrap();
    assert_eq!(
        &bytes[..4096],
        &[0xabu8; 4096][..],
        "existing contents must survive"
    );
}

#[test]
fn bad_serial_and_unknown_options() {
    let r = run(&["run", "--kernel", &guest(), "--serial", "tcp:1"]);
    assert_one_line_error(&r, 2, "invalid --serial");
    let r = run(&[
        "run",
        "--kernel",
        &guest(),
        "--memory",
        "size=1G,colour=red",
    ]);
    assert_one_line_error(&r, 2, "unknown --memory key \"colour\"");
    let r = run(&["run", "--kernel", &guest(), "--timeout=-1"]);
    assert_one_line_error(&r, 2, "--timeout");
}

#[test]
fn no_kvm_device() {
    // A private mount namespace with an empty /dev: /dev/kvm does not exist there.
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--",
        "sh",
        "-c",
        "mount -t tmpfs none /dev && exec \"$0\" \"$@\"",
    ])
    .arg(skiff_bin())
    .args(["run", "--kernel", &guest()]);
    let r = Skiff::spawn_command(&mut cmd).wait(T);
    assert_one_line_error(&r, 1, "/dev/kvm does not exist");
}

#[test]
fn no_permission_for_kvm() {
    require_kvm();
    let mode = std::fs::metadata("/dev/kvm").unwrap().permissions().mode();
    assert_eq!(
        mode & 0o006,
        0,
        "this test needs /dev/kvm closed to other users"
    );
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("guest");
    std::fs::copy(testguest(), &k).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(skiff_bin())
        .args(["run", "--kernel"])
        .arg(&k);
    let r = Skiff::spawn_command(&mut cmd).wait(T);
    assert_one_line_error(&r, 1, "no permission to open /dev/kvm");
}

fn mkfifo(dir: &std::path::Path) -> String {
    let p = dir.join("fifo");
    let ok = Command::new("mkfifo").arg(&p).status().unwrap().success();
    assert!(ok, "mkfifo");
    p.to_string_lossy().into_owned()
}

#[test]
fn a_fifo_as_kernel_initrd_or_serial_file_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = mkfifo(dir.path());
    // Nobody ever writes or reads the FIFO: a blocking open would hang until the timeout.
    let quick = Duration::from_secs(10);
    let r = run_skiff(&["run", "--kernel", &fifo], quick);
    assert_one_line_error(
        &r,
        1,
        &format!("kernel {fifo} is a FIFO, not a regular file"),
    );
    let r = run_skiff(&["run", "--kernel", &guest(), "--initrd", &fifo], quick);
    assert_one_line_error(
        &r,
        1,
        &format!("initrd {fifo} is a FIFO, not a regular file"),
    );
    require_kvm();
    let serial = format!("file={fifo}");
    let r = run_skiff(&["run", "--kernel", &guest(), "--serial", &serial], quick);
    assert_one_line_error(
        &r,
        1,
        &format!("serial output file {fifo} is a FIFO, not a regular file or a character device"),
    );
    // A character device is a fine sink.
    let r = run_skiff(
        &[
            "run",
            "--kernel",
            &guest(),
            "--serial",
            "file=/dev/null",
            "--cmdline",
            "exit=7",
        ],
        T,
    );
    r.assert_code(7);
}

#[test]
fn a_proc_file_or_an_empty_file_is_no_disk() {
    require_kvm();
    let r = run(&["run", "--kernel", &guest(), "--disk", "path=/proc/self/mem"]);
    assert_one_line_error(&r, 1, "disk /proc/self/mem: size is 0 bytes");
    let f = tempfile::NamedTempFile::new().unwrap();
    let spec = format!("path={}", f.path().display());
    let r = run(&["run", "--kernel", &guest(), "--disk", &spec]);
    assert_one_line_error(&r, 1, "size is 0 bytes");
    let r = run(&["run", "--kernel", &guest(), "--disk", "path=/dev/zero"]);
    assert_one_line_error(
        &r,
        1,
        "a character device, not a regular file or block device",
    );
}

#[test]
fn an_elf_of_the_wrong_class_or_machine_is_refused() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let image = std::fs::read(testguest()).unwrap();
    let k = dir.path().join("vmlinux");
    let mut bad = image.clone();
    bad[4] = 1; // EI_CLASS: 32-bit
    std::fs::write(&k, &bad).unwrap();
    let r = run(&["run", "--kernel", k.to_str().unwrap()]);
    assert_one_line_error(
        &r,
        1,
        "cannot load ELF: ELF class (EI_CLASS) is 1, not 2 (64-bit)",
    );
    let mut bad = image;
    bad[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    std::fs::write(&k, &bad).unwrap();
    let r = run(&["run", "--kernel", k.to_str().unwrap()]);
    assert_one_line_error(&r, 1, "ELF machine (e_machine) is 183, not 62 (x86-64)");
}
