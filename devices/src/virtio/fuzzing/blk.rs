//! virtio-blk requests from fuzzed chains: `request::parse`, then `request::prepare` against a
//! 1 MiB scratch disk (read-only when `Config::alternate`). Nothing is read from or written to
//! the disk; the planned operations are checked instead.
use std::sync::OnceLock;

use vm_memory::GuestMemoryBackend;

use super::{activated_queue, guest_memory, serve_chains, Config};
use crate::guest_memory::TrackedGuestMemory;
use crate::virtio::blk::disk::{DiskConfig, DiskImage, SECTOR_SIZE};
use crate::virtio::blk::engine::IoOp;
use crate::virtio::blk::request::{self, Action, Segment};

/// Sectors of the scratch disks.
const DISK_SECTORS: u64 = 2048;

/// What `blk_requests` saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlkOutcome {
    /// Chains taken from the queue.
    pub chains: usize,
    /// Chains `parse` accepted.
    pub parsed: usize,
    /// Requests `prepare` turned into file operations.
    pub io: usize,
}

/// A writable and a read-only scratch disk, opened once per process (each locks its file;
/// the files are unlinked once open).
fn disks() -> Option<&'static (DiskImage, DiskImage)> {
    static DISKS: OnceLock<Option<(DiskImage, DiskImage)>> = OnceLock::new();
    DISKS
        .get_or_init(|| {
            let open = |name: &str, readonly: bool| {
                let path = std::env::temp_dir()
                    .join(format!("skiff-fuzz-{}-{name}.img", std::process::id()));
                let file = std::fs::File::create(&path).ok()?;
                file.set_len(DISK_SECTORS * SECTOR_SIZE).ok()?;
                let mut cfg = DiskConfig::new(&path);
                cfg.readonly = readonly;
                cfg.id = Some("fuzz".into());
                let disk = DiskImage::open(&cfg);
                let _ = std::fs::remove_file(&path);
                disk.ok()
            };
            Some((open("rw", false)?, open("ro", true)?))
        })
        .as_ref()
}

fn in_memory(mem: &TrackedGuestMemory, segs: &[Segment]) -> bool {
    segs.iter().all(|s| mem.check_range(s.addr, s.len as usize))
}

fn len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Runs every chain of the fuzzed queue through virtio-blk's request parsing. Panics (the
/// fuzzer's finding) when an accepted request names memory outside guest RAM, a used length
/// exceeds the chain's writable bytes, or a planned operation leaves the disk.
pub fn blk_requests(data: &[u8]) -> BlkOutcome {
    let mut outcome = BlkOutcome::default();
    let Some((&config, image)) = data.split_first() else {
        return outcome;
    };
    let config = Config(config);
    let (Some(mem), Some((rw, ro))) = (guest_memory(image), disks()) else {
        return outcome;
    };
    let Some(mut queue) = activated_queue(&mem, config, 0) else {
        return outcome;
    };
    let disk = if config.alternate() { ro } else { rw };
    let disk_bytes = disk.sectors() * SECTOR_SIZE;
    outcome.chains = serve_chains(&mem, &mut queue, |chain| {
        let req = match request::parse(chain, &mem) {
            Ok(req) => req,
            Err(bad) => {
                // The device answers IOERR through a usable status byte, or needs a reset.
                if let Some(status) = bad.status {
                    assert!(mem.check_range(status, 1), "status byte outside memory");
                }
                return 1;
            }
        };
        outcome.parsed += 1;
        assert!(
            in_memory(&mem, &req.readable),
            "readable {:?}",
            req.readable
        );
        assert!(
            in_memory(&mem, &req.writable),
            "writable {:?}",
            req.writable
        );
        assert!(mem.check_range(req.status, 1), "status {:?}", req.status);
        let room = len(&req.writable) + 1;
        match request::prepare(&req, &mem, disk) {
            Action::Complete { used_len, .. } => {
                assert!((1..=room).contains(&u64::from(used_len)), "used {used_len}");
                used_len
            }
            Action::Io {
                ops,
                used_len,
                dirty,
            } => {
                outcome.io += 1;
                assert!((1..=room).contains(&u64::from(used_len)), "used {used_len}");
                assert!(in_memory(&mem, &dirty), "dirty {dirty:?}");
                for op in &ops {
                    let (offset, bytes, write) = match op {
                        IoOp::Read { offset, iov } => (*offset, iov.remaining_len() as u64, false),
                        IoOp::Write { offset, iov } => (*offset, iov.remaining_len() as u64, true),
                        IoOp::Fallocate { offset, len, .. } => (*offset, *len, true),
                        IoOp::Flush => (0, 0, false),
                    };
                    assert!(
                        offset.checked_add(bytes).is_some_and(|e| e <= disk_bytes),
                        "{op:?} leaves the {disk_bytes}-byte disk"
                    );
                    assert!(!(write && disk.readonly()), "{op:?} on a read-only disk");
                }
                used_len
            }
        }
    });
    outcome
}
