//! Restoring a VM from a snapshot directory: check the files, build guest RAM over them, then
//! the builder's own steps (hypervisor VM with memory slots and platform devices, legacy
//! devices, vCPUs), each fed the saved state instead of boot state.
//!
//! Order: the platform devices' state goes in right after they are created, before any vCPU
//! exists (the virtio devices too: rebuilt from their saved identity, their state applied and
//! the running ones activated at their saved queue positions); each vCPU is created and restored in full (its own ordering is in
//! `hypervisor/kvm/vcpu_state.rs`); the clock is set last, once every vCPU's TSC is back. The
//! VM comes out paused in the sense that no vCPU thread exists yet: the runner starts them.
//!
//! A diff snapshot is restored over its parent chain (`chain.rs`): its memory is always built
//! by copying, base first, then each diff's data extents; `cow` falls back to that.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use devices::bus::Bus;
use devices::vm_exit::VmExitSignal;
use thiserror::Error;

use super::chain::{layer_region, resolve_parents, ChainError, Layer};
use super::manifest::{self, ManifestError, SnapshotManifest};
use super::memory_file::{copy_sparse, MemoryFileError};
use super::state_file::{self, SnapshotState, StateFileError};
use crate::builder::{
    create_legacy_devices, create_restored_pci_devices, create_vm, BuildError, BuiltVm, VmEvents,
};
use crate::config::SerialConfig;
use crate::guest_output::GuestOutputs;
use crate::hypervisor::kvm::KvmHypervisor;
use crate::hypervisor::{Hypervisor, HypervisorError, Vcpu};
use crate::memory::backing::{Backing, BackingKind};
use crate::memory::{GuestRam, Mappable, MemoryError, ShareableRegion};

/// How restored guest RAM relates to the snapshot's memory files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryMode {
    /// Map the files copy-on-write (`MAP_PRIVATE`): restore time does not depend on guest size,
    /// the files stay unchanged, but the regions cannot be shared with vhost-user backends.
    Cow,
    /// Copy the files' data into a fresh memfd (shareable, like a booted VM's RAM).
    Copy,
}

impl std::str::FromStr for MemoryMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cow" => Ok(Self::Cow),
            "copy" => Ok(Self::Copy),
            _ => Err(format!("invalid --memory-mode {s:?}: expected cow or copy")),
        }
    }
}

/// Errors from restoring a snapshot.
#[derive(Debug, Error)]
pub enum RestoreError {
    /// The manifest is missing or unusable.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The state file cannot be read.
    #[error("cannot read state file {path}")]
    ReadState {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The state file's size differs from the manifest's.
    #[error("state file {path} is {actual} bytes but the manifest says {expected}")]
    StateSize {
        /// The path.
        path: PathBuf,
        /// Per the manifest.
        expected: u64,
        /// On disk.
        actual: u64,
    },
    /// The state file is unusable.
    #[error("{path}")]
    State {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: StateFileError,
    },
    /// A memory file is missing or unreadable.
    #[error("cannot open memory file {path}")]
    MemoryFile {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A memory file has the wrong size.
    #[error("memory file {path} is {actual} bytes but its region is {expected}")]
    MemorySize {
        /// The path.
        path: PathBuf,
        /// The region size.
        expected: u64,
        /// On disk.
        actual: u64,
    },
    /// Copying a memory file into fresh memory failed.
    #[error("cannot copy memory file {path}")]
    Copy {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: MemoryFileError,
    },
    /// Guest RAM could not be built over the files.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A builder step failed.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// Putting state back into the hypervisor failed.
    #[error("cannot restore vCPU {index}")]
    Vcpu {
        /// The vCPU.
        index: u32,
        /// The cause.
        #[source]
        source: HypervisorError,
    },
    /// Putting the VM's state back failed.
    #[error("cannot restore the VM's interrupt controllers, timer or clock")]
    Vm(#[source] HypervisorError),
    /// A diff's parent chain is unusable.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// `--memory-mode cow` for a snapshot whose vhost-user backends need shared memory.
    #[error("--memory-mode cow: the snapshot has a vhost-user device (socket {0}), whose backend needs guest memory shared; use --memory-mode copy (the default for such snapshots)")]
    CowWithVhostUser(PathBuf),
}

/// The memory mode for restoring `snap`: `requested` if given, else `cow`, except that a
/// snapshot with vhost-user devices needs shared memory: `copy` by default, and an explicit
/// `cow` is refused.
pub fn memory_mode(
    snap: &LoadedSnapshot,
    requested: Option<MemoryMode>,
) -> Result<MemoryMode, RestoreError> {
    let vhost_user = snap
        .state
        .devices
        .virtio
        .iter()
        .find_map(|d| match &d.identity {
            devices::virtio::DeviceIdentity::VhostUser(cfg) => Some(cfg.socket.clone()),
            _ => None,
        });
    match (requested, vhost_user) {
        (Some(MemoryMode::Cow), Some(socket)) => Err(RestoreError::CowWithVhostUser(socket)),
        (Some(mode), _) => Ok(mode),
        (None, Some(_)) => Ok(MemoryMode::Copy),
        (None, None) => Ok(MemoryMode::Cow),
    }
}

/// A snapshot directory whose manifest and state have been read and checked.
#[derive(Debug)]
pub struct LoadedSnapshot {
    /// The directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: SnapshotManifest,
    /// Its decoded state.
    pub state: SnapshotState,
    /// For a diff: its parents, base first, each checked (empty for a full snapshot).
    pub parents: Vec<Layer>,
}

/// Reads and checks a snapshot directory: manifest (version, values), state file (size,
/// checksum, contents, vCPU count) and every memory file's size. Nothing is mapped yet.
pub fn load(dir: &Path) -> Result<LoadedSnapshot, RestoreError> {
    let manifest = manifest::read(dir)?;
    let path = dir.join(&manifest.state.file);
    let read_err = |source| RestoreError::ReadState {
        path: path.clone(),
        source,
    };
    let actual = std::fs::metadata(&path).map_err(read_err)?.len();
    if actual != manifest.state.size {
        return Err(RestoreError::StateSize {
            path,
            expected: manifest.state.size,
            actual,
        });
    }
    let bytes = std::fs::read(&path).map_err(read_err)?;
    let state = state_file::decode(&bytes)
        .and_then(|s| state_file::check_vcpus(&s, manifest.vm.cpus).map(|()| s))
        .map_err(|source| RestoreError::State {
            path: path.clone(),
            source,
        })?;
    for r in &manifest.memory {
        let p = dir.join(&r.file);
        let len = std::fs::metadata(&p)
            .map_err(|source| RestoreError::MemoryFile {
                path: p.clone(),
                source,
            })?
            .len();
        if len != r.size {
            return Err(RestoreError::MemorySize {
                path: p,
                expected: r.size,
                actual: len,
            });
        }
    }
    let parents = resolve_parents(dir, &manifest, None)?;
    Ok(LoadedSnapshot {
        dir: dir.to_path_buf(),
        manifest,
        state,
        parents,
    })
}

fn open_memory_file(path: &Path) -> Result<File, RestoreError> {
    File::open(path).map_err(|source| RestoreError::MemoryFile {
        path: path.to_path_buf(),
        source,
    })
}

/// Builds guest RAM from the snapshot's memory files.
pub fn build_ram(
    snap: &LoadedSnapshot,
    mode: MemoryMode,
    max_slots: usize,
) -> Result<GuestRam, RestoreError> {
    let page = arch::layout::PAGE_SIZE;
    let mode = if snap.parents.is_empty() {
        mode
    } else {
        // A diff's memory is its layers together: there is no one file to map.
        log::info!(
            "{} is a diff over {} parent snapshot(s): copying the layers into fresh memory",
            snap.dir.display(),
            snap.parents.len()
        );
        MemoryMode::Copy
    };
    match mode {
        MemoryMode::Cow => {
            let regions = snap
                .manifest
                .memory
                .iter()
                .map(|r| {
                    let file = open_memory_file(&snap.dir.join(&r.file))?;
                    Ok(ShareableRegion {
                        guest_address: r.guest_address,
                        size: r.size,
                        file: Arc::new(Mappable::new(file.into())),
                        file_offset: 0,
                    })
                })
                .collect::<Result<Vec<_>, RestoreError>>()?;
            Ok(GuestRam::from_regions_private(regions, page, max_slots)?)
        }
        MemoryMode::Copy => {
            let total = snap.manifest.vm.memory_size;
            let backing = Backing::create(&BackingKind::Memfd, total, false)
                .map_err(|e| RestoreError::Memory(e.into()))?;
            let memfd =
                backing
                    .file
                    .try_clone_file()
                    .map_err(|source| RestoreError::MemoryFile {
                        path: PathBuf::from("memfd"),
                        source,
                    })?;
            let file = Arc::new(backing.file);
            let never = AtomicBool::new(false);
            let mut offset = 0;
            let mut regions = Vec::new();
            let top = Layer {
                dir: snap.dir.clone(),
                manifest: snap.manifest.clone(),
            };
            for (i, r) in snap.manifest.memory.iter().enumerate() {
                if snap.parents.is_empty() {
                    let path = snap.dir.join(&r.file);
                    let src = open_memory_file(&path)?;
                    copy_sparse(&src, 0, &memfd, offset, r.size, &never)
                        .map_err(|source| RestoreError::Copy { path, source })?;
                } else {
                    layer_region(&snap.parents, i, &memfd, offset, &never)?;
                    layer_region(std::slice::from_ref(&top), i, &memfd, offset, &never)?;
                }
                regions.push(ShareableRegion {
                    guest_address: r.guest_address,
                    size: r.size,
                    file: file.clone(),
                    file_offset: offset,
                });
                offset += r.size;
            }
            Ok(GuestRam::from_regions(regions, page, false, max_slots)?)
        }
    }
}

/// Builds a VM from a loaded snapshot, every piece in its saved state, ready for the runner.
pub fn restore_vm(
    snap: &LoadedSnapshot,
    mode: MemoryMode,
    serial: &SerialConfig,
) -> Result<BuiltVm, RestoreError> {
    let started = Instant::now();
    let hypervisor = KvmHypervisor::new().map_err(BuildError::from)?;
    let cpus = snap.manifest.vm.cpus;
    let max = hypervisor.max_vcpus();
    if usize::try_from(cpus).map_or(true, |n| n > max) {
        return Err(BuildError::TooManyVcpus {
            requested: cpus,
            max,
        }
        .into());
    }
    let opened = started.elapsed();
    let ram = build_ram(snap, mode, hypervisor.max_memory_slots())?;
    let mapped = started.elapsed();
    let vm = create_vm(&hypervisor, &ram)?;
    let created = started.elapsed();
    // The chips exist now; their state goes in before any vCPU does.
    vm.restore_devices(&snap.state.vm)
        .map_err(RestoreError::Vm)?;
    let exit = VmExitSignal::new().map_err(BuildError::EventFd)?;
    let mut outputs = GuestOutputs::default();
    let (mut pio, serial, i8042) =
        create_legacy_devices(&*vm, serial, &mut outputs, &exit, Some(&snap.state.devices))?;
    // The PCI segment with the saved virtio devices, their state back and the running ones
    // active again (their handlers join the event loop when the runner starts it).
    let events = VmEvents::new().map_err(|e| BuildError::EventLoop(format!("{e:?}")))?;
    let mut mmio = Bus::new();
    let (console_input, virtio) = create_restored_pci_devices(
        &*vm,
        &ram,
        &snap.state.devices.virtio,
        &events,
        &mut outputs,
        &mut pio,
        &mut mmio,
    )?;
    let vcpus = (0..cpus)
        .zip(&snap.state.vcpus)
        .map(|(index, saved)| {
            let vcpu = vm.create_vcpu(index).map_err(BuildError::from)?;
            vcpu.restore_state(saved)
                .map_err(|source| RestoreError::Vcpu { index, source })?;
            Ok(vcpu)
        })
        .collect::<Result<Vec<Box<dyn Vcpu>>, RestoreError>>()?;
    let vcpus_done = started.elapsed();
    // Last: every vCPU's TSC is back, so the clock offset computed now holds for all of them.
    vm.restore_clock(&snap.state.vm).map_err(RestoreError::Vm)?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    log::info!(
        "restored {} from {} in {:.2} ms (/dev/kvm open {:.2}, memory mapped {:.2}, VM created \
         {:.2}, devices and vCPUs restored {:.2}, clock {:.2})",
        snap.manifest.vm.kernel.display(),
        snap.dir.display(),
        ms(started.elapsed()),
        ms(opened),
        ms(mapped),
        ms(created),
        ms(vcpus_done),
        ms(started.elapsed()),
    );
    Ok(BuiltVm {
        ram,
        vm,
        vcpus,
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        serial,
        i8042,
        exit,
        events: Some(events),
        console_input,
        virtio,
        outputs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::manifest::{MANIFEST_FILE, STATE_FILE};
    use crate::snapshot::state_file::{encode, tests::sample_state};

    /// A snapshot directory on disk with a 2-vCPU state and one 8 MiB memory file.
    fn write_sample(dir: &Path) {
        let state = encode(&sample_state()).unwrap();
        let mut m = manifest::tests::sample();
        m.state.size = state.len() as u64;
        std::fs::write(dir.join(STATE_FILE), &state).unwrap();
        std::fs::write(dir.join(MANIFEST_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
        let f = File::create(dir.join("memory-0.bin")).unwrap();
        f.set_len(8 << 20).unwrap();
    }

    fn load_err(dir: &Path) -> String {
        crate::error_chain(&load(dir).unwrap_err())
    }

    #[test]
    fn a_snapshot_with_a_vhost_user_device_is_restored_by_copying_and_refuses_cow() {
        use devices::vhost_user::{VhostUserConfig, VhostUserKind};
        use devices::virtio::DeviceIdentity;
        let d = tempfile::tempdir().unwrap();
        write_sample(d.path());
        let mut snap = load(d.path()).unwrap();
        assert_eq!(memory_mode(&snap, None).unwrap(), MemoryMode::Cow);
        let cfg = VhostUserConfig::new(VhostUserKind::Blk, "/run/blk.sock");
        snap.state.devices.virtio[0].identity = DeviceIdentity::VhostUser(cfg.clone());
        // The identity survives the state file.
        let again = state_file::decode(&encode(&snap.state).unwrap()).unwrap();
        assert_eq!(
            again.devices.virtio[0].identity,
            DeviceIdentity::VhostUser(cfg)
        );
        assert_eq!(memory_mode(&snap, None).unwrap(), MemoryMode::Copy);
        assert_eq!(
            memory_mode(&snap, Some(MemoryMode::Copy)).unwrap(),
            MemoryMode::Copy
        );
        let e = crate::error_chain(&memory_mode(&snap, Some(MemoryMode::Cow)).unwrap_err());
        assert!(
            e.contains("--memory-mode cow") && e.contains("/run/blk.sock"),
            "{e}"
        );
    }

    #[test]
    fn loads_a_good_directory_and_names_each_bad_file() {
        let d = tempfile::tempdir().unwrap();
        write_sample(d.path());
        let snap = load(d.path()).unwrap();
        assert_eq!(snap.state.vcpus.len(), 2);

        let mem = d.path().join("memory-0.bin");
        File::options()
            .write(true)
            .open(&mem)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        assert!(load_err(d.path()).contains("is 4194304 bytes but its region is 8388608"));
        std::fs::remove_file(&mem).unwrap();
        assert!(load_err(d.path()).contains("cannot open memory file"));

        write_sample(d.path());
        let state = d.path().join(STATE_FILE);
        let mut bytes = std::fs::read(&state).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 4;
        std::fs::write(&state, &bytes).unwrap();
        assert!(
            load_err(d.path()).contains("CRC-32"),
            "{}",
            load_err(d.path())
        );
        bytes.truncate(100);
        std::fs::write(&state, &bytes).unwrap();
        assert!(load_err(d.path()).contains("but the manifest says"));
        std::fs::remove_file(&state).unwrap();
        assert!(load_err(d.path()).contains("cannot read state file"));
        std::fs::remove_file(d.path().join(MANIFEST_FILE)).unwrap();
        assert!(load_err(d.path()).contains("manifest.json"));
    }

    #[test]
    fn both_memory_modes_show_the_file_contents_and_leave_the_file_alone() {
        use std::os::unix::fs::FileExt;
        use vm_memory::{Bytes, GuestAddress};
        let d = tempfile::tempdir().unwrap();
        write_sample(d.path());
        let mem = File::options()
            .read(true)
            .write(true)
            .open(d.path().join("memory-0.bin"))
            .unwrap();
        mem.write_all_at(&0xfeed_u64.to_le_bytes(), 0x10_0000)
            .unwrap();
        let snap = load(d.path()).unwrap();
        for mode in [MemoryMode::Cow, MemoryMode::Copy] {
            let ram = build_ram(&snap, mode, 32).unwrap();
            assert_eq!(ram.is_private(), mode == MemoryMode::Cow);
            let v: u64 = ram.memory().read_obj(GuestAddress(0x10_0000)).unwrap();
            assert_eq!(v, 0xfeed);
            ram.memory()
                .write_obj(1u64, GuestAddress(0x10_0000))
                .unwrap();
        }
        let mut buf = [0u8; 8];
        mem.read_exact_at(&mut buf, 0x10_0000).unwrap();
        assert_eq!(
            u64::from_le_bytes(buf),
            0xfeed,
            "the snapshot file is unchanged"
        );
    }
}
