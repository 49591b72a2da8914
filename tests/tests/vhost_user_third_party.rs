//! vhost-user end to end with backends skiff did not write: QEMU's virtiofsd serving a shared
//! directory to the test guest's `virtio-fs=<file>` scenario (FUSE INIT, LOOKUP, OPEN, READ,
//! RELEASE, FORGET), whose printed bytes and checksum are compared with the file; and rust-vmm's
//! vhost-device-rng serving the `virtio-rng` scenario. Each test starts and stops its backend,
//! and fails (never skips) when the backend is not installed (`scripts/setup` installs both).

#![cfg(unix)] // KVM tests: Linux only (the Windows build compiles them to nothing)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use skiff_tests::{run_testguest, Backend};

const T: Duration = Duration::from_secs(60);
/// Not a multiple of the guest's 32 KiB reads or of a page: the last read is short.
const FILE_BYTES: usize = 80_000 + 123;
const TAG: &str = "skiff-share";

/// A temporary directory with `shared/` (the directory virtiofsd exports) in it.
struct SharedDir {
    dir: tempfile::TempDir,
}

impl SharedDir {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("shared")).unwrap();
        Self { dir }
    }

    fn shared(&self) -> PathBuf {
        self.dir.path().join("shared")
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("virtiofsd.sock")
    }

    /// Writes `shared/<name>` with `len` random bytes and returns them.
    fn random_file(&self, name: &str, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        std::fs::File::open("/dev/urandom")
            .unwrap()
            .read_exact(&mut bytes)
            .unwrap();
        std::fs::write(self.shared().join(name), &bytes).unwrap();
        bytes
    }
}

/// FNV-1a, 64-bit, as the guest computes it.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn fs_arg(socket: &Path, extra: &str) -> String {
    format!("type=fs,socket={}{extra}", socket.display())
}

#[test]
fn virtiofsd_serves_a_file_to_the_test_guest() {
    let d = SharedDir::new();
    let content = d.random_file("data.bin", FILE_BYTES);
    let backend = Backend::virtiofsd(&d.socket(), &d.shared());
    let arg = fs_arg(&d.socket(), &format!(",tag={TAG}"));
    let r = run_testguest("virtio-fs=data.bin", &["--vhost-user", &arg], T);
    let context = format!("{}\nvirtiofsd:\n{}", r.stderr, backend.stderr_text());
    assert_eq!(r.code, Some(0), "{}\n{context}", r.stdout);
    r.assert_stdout_has(&format!(
        "testguest: virtio-fs tag={TAG} request-queues=1\n"
    ))
    .assert_stdout_has("testguest: virtio-fs init major=7 minor=")
    .assert_stdout_has(&format!("size={FILE_BYTES}\n"))
    .assert_stdout_has(&format!(
        "testguest: virtio-fs head {}\n",
        hex(&content[..32])
    ))
    .assert_stdout_has(&format!(
        "testguest: virtio-fs read bytes={FILE_BYTES} reads=4 fnv1a={:016x}\n",
        fnv1a(&content)
    ))
    .assert_stdout_has("testguest: virtio-fs ok\n");
}

#[test]
fn more_queues_than_virtiofsd_serves_is_a_one_line_error() {
    // virtiofsd serves the high-priority queue and one request queue (GET_QUEUE_NUM says 2);
    // queues=3 would give the guest a request queue nobody serves.
    let d = SharedDir::new();
    let _backend = Backend::virtiofsd(&d.socket(), &d.shared());
    let arg = fs_arg(&d.socket(), ",tag=q3,queues=3");
    let r = run_testguest("virtio-fs=x", &["--vhost-user", &arg], T);
    r.assert_code(1)
        .assert_stderr_has("serves at most 2 queues, 3 configured");
    assert_eq!(r.stderr.lines().count(), 1, "one line: {}", r.stderr);
}

#[test]
fn virtiofsd_error_reply_fails_the_guest_scenario() {
    // The guest checks every reply: a LOOKUP of a missing file gets ENOENT (-2), which must end
    // the scenario with a FAIL line, not a hang or a pass.
    let d = SharedDir::new();
    let _backend = Backend::virtiofsd(&d.socket(), &d.shared());
    let arg = fs_arg(&d.socket(), &format!(",tag={TAG}"));
    let r = run_testguest("virtio-fs=absent", &["--vhost-user", &arg], T);
    r.assert_code(33)
        .assert_stdout_has("testguest: FAIL virtio-fs: FUSE_LOOKUP: error -2\n");
}

#[test]
fn type_fs_without_a_tag_is_a_one_line_error() {
    // virtiofsd has no configuration space of its own, so skiff needs tag=.
    let d = SharedDir::new();
    let _backend = Backend::virtiofsd(&d.socket(), &d.shared());
    let r = run_testguest(
        "virtio-fs=x",
        &["--vhost-user", &fs_arg(&d.socket(), "")],
        T,
    );
    r.assert_code(1)
        .assert_stderr_has("gives no mount tag in its configuration space: give tag=TAG");
    assert_eq!(r.stderr.lines().count(), 1, "one line: {}", r.stderr);
}

#[test]
fn vhost_device_rng_serves_the_test_guest() {
    let d = tempfile::tempdir().unwrap();
    let socket = d.path().join("rng.sock0");
    let mut backend = Backend::vhost_device_rng(&socket);
    let arg = format!("type=rng,socket={}", socket.display());
    let r = run_testguest("virtio-rng", &["--vhost-user", &arg], T);
    let context = format!("{}\nvhost-device-rng:\n{}", r.stderr, backend.stderr_text());
    assert_eq!(r.code, Some(0), "{}\n{context}", r.stdout);
    r.assert_stdout_has("testguest: virtio-rng ok bytes=128");
    assert!(backend.is_running(), "{context}");
}
