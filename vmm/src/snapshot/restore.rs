//! Restoring a VM from a snapshot directory: check the files, build guest RAM over them, then
//! the builder's own steps (hypervisor VM with memory slots and platform devices, legacy
//! devices, PCI devices, vCPUs), each fed the saved state instead of boot state.
//!
//! Order: the platform devices' state goes in right after they are created, before any vCPU
//! exists (the virtio devices too: rebuilt from their own saved state through the builder's
//! PCI step, the transport's state applied and the running ones activated at their saved queue
//! positions); each vCPU is created and restored in full (its own ordering is in
//! `hypervisor/kvm/vcpu_state.rs`); the clock is set last, once every vCPU's TSC is back. The
//! VM comes out paused in the sense that no vCPU thread exists yet: the runner starts them.
//!
//! A diff snapshot is restored over its parent chain (`chain.rs`): its memory is always built
//! by copying, base first, then each diff's data extents; `cow` falls back to that.
//!
//! The directory is untrusted input: `load` opens every file relative to it (`dir.rs`), checks
//! the manifest against the arch layout and the host, and the state against the manifest,
//! keeps the memory files open (nothing is reopened by path later), and verifies the MAC
//! (`auth.rs`). What may be opened outside the directory is decided by `authorize`, whose
//! `RestorePlan` `restore_vm` builds from.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use devices::bus::Bus;
use devices::virtio::transport::VirtioPciState;
use devices::vm_exit::VmExitSignal;
use thiserror::Error;

use super::auth::{Authentication, SnapshotKey};
use super::authorize::{AuthorizeError, RestorePlan};
use super::chain::{layer_file, layer_region, ChainError, Layer};
use super::dir::{DirError, SnapshotDir, SnapshotFile};
use super::host_resource::HostResource;
use super::loaded_snapshot::LoadedSnapshot;
use super::manifest::{self, ManifestError};
use super::memory_file::{copy_sparse, MemoryFileError};
use super::resources;
use super::state_file::{self, StateFileError, MAX_STATE_FILE_BYTES};
use crate::builder::{
    create_legacy_devices, create_pci_devices, create_vcpus, create_vm, BuildError, BuiltVm,
    VcpuStart, VmEvents, VmParts,
};
use crate::config::SerialConfig;
use crate::guest_output::GuestOutputs;
use crate::hypervisor::kvm::KvmHypervisor;
use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::memory::backing::{Backing, BackingKind};
use crate::memory::{GuestRam, Mappable, MemoryError, ShareableRegion};
use crate::virtio_devices::{VirtioDeviceState, VirtioFunctionState};

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
    /// The snapshot directory cannot be opened.
    #[error(transparent)]
    Dir(DirError),
    /// The state file cannot be opened or read (missing, not a regular file, too large).
    #[error("cannot read state file")]
    ReadState(#[source] DirError),
    /// The state file's checksum differs from the manifest's.
    #[error("state file {path} has CRC-32 {actual:#010x} but the manifest says {expected:#010x}")]
    StateCrc {
        /// The path.
        path: PathBuf,
        /// Per the manifest.
        expected: u32,
        /// In the file's header.
        actual: u32,
    },
    /// The manifest's resource list is not what the state and VM description name.
    #[error(
        "snapshot manifest is invalid: its resources list {listed} but the snapshot names {actual}"
    )]
    ResourcesDiffer {
        /// The manifest's list (JSON).
        listed: String,
        /// The list derived from the state (JSON).
        actual: String,
    },
    /// The VM's memory is larger than the host's.
    #[error("snapshot memory_size {size:#x} exceeds the host's {total:#x} bytes of RAM (restored guest RAM is anonymous memory, which `skiff run` refuses beyond the host's RAM too)")]
    MemoryExceedsHost {
        /// The snapshot's memory size.
        size: u64,
        /// The host's RAM.
        total: u64,
    },
    /// The snapshot names host resources it may not open.
    #[error(transparent)]
    Authorize(#[from] AuthorizeError),
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
    /// A memory file is missing, unreadable or not a regular file.
    #[error("cannot open memory file")]
    MemoryFile(#[source] DirError),
    /// A memory file could not be duplicated or fresh memory not opened.
    #[error("cannot open memory {what}")]
    MemoryFd {
        /// Which.
        what: String,
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
    /// Putting the VM's state back failed.
    #[error("cannot restore the VM's interrupt controllers, timer or clock")]
    Vm(#[source] HypervisorError),
    /// A diff's parent chain is unusable.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// A memory file to map copy-on-write is in use by a running VM.
    #[error(transparent)]
    MemoryLock(#[from] super::memory_lock::MemoryLockError),
    /// `--memory-mode cow` for a snapshot whose vhost-user backends need shared memory.
    #[error("--memory-mode cow: the snapshot has a vhost-user device (socket {0}), whose backend needs guest memory shared; use --memory-mode copy (the default for such snapshots)")]
    CowWithVhostUser(PathBuf),
}

/// The memory mode for restoring `devices` (the plan's, overrides applied): `requested` if
/// given, else `cow`, except that a snapshot with vhost-user devices needs shared memory:
/// `copy` by default, and an explicit `cow` is refused.
pub fn memory_mode(
    devices: &[VirtioFunctionState],
    requested: Option<MemoryMode>,
) -> Result<MemoryMode, RestoreError> {
    let vhost_user = devices.iter().find_map(|d| match &d.device {
        VirtioDeviceState::VhostUser(s) => Some(s.config.socket.clone()),
        _ => None,
    });
    match (requested, vhost_user) {
        (Some(MemoryMode::Cow), Some(socket)) => Err(RestoreError::CowWithVhostUser(socket)),
        (Some(mode), _) => Ok(mode),
        (None, Some(_)) => Ok(MemoryMode::Copy),
        (None, None) => Ok(MemoryMode::Cow),
    }
}

/// Refuses guest RAM larger than the host's: restored RAM is a memfd (copy) or private
/// copy-on-write pages (cow), anonymous memory either way, which `run` refuses beyond the
/// host's RAM too.
fn check_memory_fits_host(size: u64) -> Result<(), RestoreError> {
    let total = crate::builder::host_ram_bytes();
    if total > 0 && size > total {
        return Err(RestoreError::MemoryExceedsHost { size, total });
    }
    Ok(())
}

/// Reads and checks a snapshot directory: manifest (version, values, layout, host memory),
/// state file (type and size before reading, checksum, contents, vCPU count), every memory
/// file's type and size, the resource list, and the MAC under `key` (when the user has one).
/// Nothing outside the directory is opened and nothing is mapped yet.
pub fn load(dir: &Path, key: Option<&SnapshotKey>) -> Result<LoadedSnapshot, RestoreError> {
    let opened = SnapshotDir::open(dir).map_err(RestoreError::Dir)?;
    let (_, manifest) = manifest::read_in(&opened)?;
    check_memory_fits_host(manifest.vm.memory_size)?;
    let state_file = opened
        .open_regular(&manifest.state.file, MAX_STATE_FILE_BYTES, "state file")
        .map_err(RestoreError::ReadState)?;
    let path = state_file.path.clone();
    if state_file.len != manifest.state.size {
        return Err(RestoreError::StateSize {
            path,
            expected: manifest.state.size,
            actual: state_file.len,
        });
    }
    let bytes = opened
        .read_capped(&manifest.state.file, manifest.state.size, "state file")
        .map_err(RestoreError::ReadState)?;
    let state = state_file::decode(&bytes)
        .and_then(|s| state_file::check_vcpus(&s, manifest.vm.cpus).map(|()| s))
        .map_err(|source| RestoreError::State {
            path: path.clone(),
            source,
        })?;
    let crc = bytes
        .get(20..24)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if crc != manifest.state.crc32 {
        return Err(RestoreError::StateCrc {
            path,
            expected: manifest.state.crc32,
            actual: crc,
        });
    }
    let memory_files = manifest
        .memory
        .iter()
        .map(|r| {
            let f = opened
                .open_regular(&r.file, u64::MAX, "memory file")
                .map_err(RestoreError::MemoryFile)?;
            if f.len != r.size {
                return Err(RestoreError::MemorySize {
                    path: f.path,
                    expected: r.size,
                    actual: f.len,
                });
            }
            Ok(f)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let resources = resources::list(&manifest, &state);
    if resources != manifest.resources {
        let json = |r: &[HostResource]| serde_json::to_string(r).unwrap_or_default();
        return Err(RestoreError::ResourcesDiffer {
            listed: json(&manifest.resources),
            actual: json(&resources),
        });
    }
    let authentication = match key {
        Some(key) => key.verify(&manifest, &bytes),
        None => Authentication::NotAuthenticated("this user has no snapshot key".into()),
    };
    Ok(LoadedSnapshot {
        dir: dir.to_path_buf(),
        manifest,
        state,
        memory_files,
        resources,
        authentication,
    })
}

fn clone_memory_file(f: &SnapshotFile) -> Result<File, RestoreError> {
    f.file.try_clone().map_err(|source| RestoreError::MemoryFd {
        what: format!("file {}", f.path.display()),
        source,
    })
}

/// Builds guest RAM from the snapshot's memory files (opened by `load`) over `parents` (a
/// diff's, from the `RestorePlan`).
pub fn build_ram(
    snap: &LoadedSnapshot,
    parents: &[Layer],
    mode: MemoryMode,
    max_slots: usize,
) -> Result<GuestRam, RestoreError> {
    let page = arch::layout::PAGE_SIZE;
    let mode = if parents.is_empty() {
        mode
    } else {
        // A diff's memory is its layers together: there is no one file to map.
        log::info!(
            "{} is a diff over {} parent snapshot(s): copying the layers into fresh memory",
            snap.dir.display(),
            parents.len()
        );
        MemoryMode::Copy
    };
    match mode {
        MemoryMode::Cow => {
            let regions = snap
                .manifest
                .memory
                .iter()
                .zip(&snap.memory_files)
                .map(|(r, f)| {
                    let file = clone_memory_file(f)?;
                    // Held for the VM's life: the file must not change under the mapping.
                    super::memory_lock::lock_shared(&file, &f.path)?;
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
            let memfd = backing
                .file
                .try_clone_file()
                .map_err(|source| RestoreError::MemoryFd {
                    what: "memfd".into(),
                    source,
                })?;
            let file = Arc::new(backing.file);
            let never = AtomicBool::new(false);
            let mut offset = 0;
            let mut regions = Vec::new();
            for (i, (r, src)) in snap
                .manifest
                .memory
                .iter()
                .zip(&snap.memory_files)
                .enumerate()
            {
                if parents.is_empty() {
                    copy_sparse(&src.file, 0, &memfd, offset, r.size, &never).map_err(
                        |source| RestoreError::Copy {
                            path: src.path.clone(),
                            source,
                        },
                    )?;
                } else {
                    layer_region(parents, i, &memfd, offset, &never)?;
                    layer_file(
                        &src.file,
                        &src.path,
                        &snap.manifest,
                        i,
                        &memfd,
                        offset,
                        &never,
                    )?;
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

/// Builds a VM from a loaded snapshot, every piece in its saved state, ready for the runner;
/// host resources come from `plan` (`authorize`) only.
pub fn restore_vm(
    snap: &LoadedSnapshot,
    plan: &RestorePlan,
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
    let ram = build_ram(snap, &plan.parents, mode, hypervisor.max_memory_slots())?;
    let mapped = started.elapsed();
    let vm = create_vm(&hypervisor, &ram)?;
    let created = started.elapsed();
    // The chips exist now; their state goes in before any vCPU does.
    vm.restore_devices(&snap.state.vm)
        .map_err(RestoreError::Vm)?;
    let exit = VmExitSignal::new().map_err(BuildError::EventFd)?;
    let mut outputs = GuestOutputs::default();
    let saved = &snap.state.devices;
    let mut legacy = create_legacy_devices(
        &*vm,
        serial,
        &mut outputs,
        &exit,
        Some((&saved.serial, &saved.i8042)),
    )?;
    // The PCI segment with the saved virtio devices, their state back and the running ones
    // active again (their handlers join the event loop when the runner starts it).
    let events = VmEvents::new().map_err(|e| BuildError::EventLoop(format!("{e:?}")))?;
    let mut mmio = Bus::new();
    let (devices, transports): (Vec<VirtioDeviceState>, Vec<VirtioPciState>) = plan
        .devices
        .iter()
        .map(|f| (f.device.clone(), f.transport.clone()))
        .unzip();
    let pci = create_pci_devices(
        &*vm,
        &ram,
        &devices,
        Some(&transports),
        &events,
        &mut outputs,
        &mut legacy.pio,
        &mut mmio,
    )?;
    let vcpus = create_vcpus(&hypervisor, &*vm, cpus, VcpuStart::Saved(&snap.state.vcpus))?;
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
    Ok(VmParts {
        vm,
        vcpus,
        legacy,
        mmio,
        exit,
        events,
        pci,
        outputs,
    }
    .with_ram(ram))
}

#[cfg(test)]
mod tests;
