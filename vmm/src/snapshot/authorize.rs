//! Which host resources a restore may open: the snapshot's own, when it is authenticated as
//! this user's (`auth.rs`), or the ones the user names again on the restore command line
//! (`--disk id=,path=`, `--net id=,tap=`, `--vhost-user id=,socket=`, `--vsock id=,socket=`,
//! `--parent`), which win
//! over the snapshot's. Anything else is refused, naming the first resource refused.
//!
//! The result, a `RestorePlan`, is the only source of what restore opens outside the snapshot
//! directory: the virtio devices are rebuilt from the plan's device states (overrides applied),
//! and a diff's parents are the plan's. `host_opens` lists those resources, which is what the
//! tests observe.

use std::path::PathBuf;

use thiserror::Error;

use super::auth::Authentication;
use super::chain::{resolve_parents, ChainError, Layer};
use super::host_resource::HostResource;
use super::loaded_snapshot::LoadedSnapshot;
use super::resources::{device_ids, device_resource};
use crate::virtio_devices::{VirtioDeviceState, VirtioFunctionState};

/// Host resources the user names again for a restore.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceOverrides {
    /// `--disk id=ID,path=PATH`.
    pub disks: Vec<(String, PathBuf)>,
    /// `--net id=ID,tap=TAP`.
    pub nets: Vec<(String, String)>,
    /// `--vhost-user id=ID,socket=PATH`.
    pub vhost_user: Vec<(String, PathBuf)>,
    /// `--vsock id=ID,socket=PATH`.
    pub vsock: Vec<(String, PathBuf)>,
    /// `--parent DIR`: a diff's parent directory.
    pub parent: Option<PathBuf>,
}

/// Why a restore may not go ahead.
#[derive(Debug, Error)]
pub enum AuthorizeError {
    /// An unauthenticated snapshot names a host resource the user did not name again.
    #[error(
        "snapshot {} is not authenticated for this user ({}); refusing to open {} {:?} at {} \
         (name it again with {})",
        .0.dir.display(), .0.why, .0.kind, .0.id, .0.location, .0.hint
    )]
    Refused(Box<Refusal>),
    /// An override names a device the snapshot does not have.
    #[error(
        "--{kind} id={id:?}: the snapshot has no {kind} device with that id (it has: {known})"
    )]
    UnknownId {
        /// The option.
        kind: &'static str,
        /// The id given.
        id: String,
        /// The ids the snapshot has, for the message.
        known: String,
    },
    /// The same id given twice.
    #[error("--{kind} id={id:?} is given twice")]
    Repeated {
        /// The option.
        kind: &'static str,
        /// The id.
        id: String,
    },
    /// `--parent` for a full snapshot.
    #[error("--parent: snapshot {0} is a full snapshot and has no parent")]
    NoParent(PathBuf),
    /// The parent chain is unusable.
    #[error(transparent)]
    Chain(#[from] ChainError),
}

/// The resource an unauthenticated snapshot may not open.
#[derive(Debug)]
pub struct Refusal {
    /// The snapshot.
    pub dir: PathBuf,
    /// Why it is not authenticated.
    pub why: String,
    /// The resource's kind.
    pub kind: &'static str,
    /// Its id.
    pub id: String,
    /// Its path or name.
    pub location: String,
    /// The option that names it.
    pub hint: String,
}

/// What a restore will open outside the snapshot directory, and with what.
#[derive(Debug)]
pub struct RestorePlan {
    /// The virtio functions' saved state, with overridden resources in place.
    pub devices: Vec<VirtioFunctionState>,
    /// A diff's parents, base first (empty for a full snapshot).
    pub parents: Vec<Layer>,
    /// Every host resource the restore will open, after overrides.
    pub host_opens: Vec<HostResource>,
}

fn check_ids<T>(
    kind: &'static str,
    given: &[(String, T)],
    known: &[String],
) -> Result<(), AuthorizeError> {
    for (i, (id, _)) in given.iter().enumerate() {
        if given[..i].iter().any(|(o, _)| o == id) {
            return Err(AuthorizeError::Repeated {
                kind,
                id: id.clone(),
            });
        }
        if !known.contains(id) {
            return Err(AuthorizeError::UnknownId {
                kind,
                id: id.clone(),
                known: if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                },
            });
        }
    }
    Ok(())
}

fn find<'a, T>(given: &'a [(String, T)], id: &str) -> Option<&'a T> {
    given.iter().find(|(i, _)| i == id).map(|(_, v)| v)
}

/// Applies `overrides` to the snapshot's devices and decides what may be opened: every
/// resource the snapshot names is either overridden or, for an authenticated snapshot, its
/// own; otherwise the restore is refused, naming the first such resource in bus order (the
/// parent last). Resolves a diff's parent chain only once it is allowed.
pub fn authorize(
    snap: &LoadedSnapshot,
    overrides: &ResourceOverrides,
) -> Result<RestorePlan, AuthorizeError> {
    let mut devices = snap.state.devices.virtio.clone();
    let ids = device_ids(&devices);
    let ids_of = |want: fn(&VirtioDeviceState) -> bool| -> Vec<String> {
        devices
            .iter()
            .zip(&ids)
            .filter(|(d, _)| want(&d.device))
            .filter_map(|(_, id)| id.clone())
            .collect()
    };
    let (disks, nets, vhost, vsock) = (
        ids_of(|d| matches!(d, VirtioDeviceState::Blk(_))),
        ids_of(|d| matches!(d, VirtioDeviceState::Net(_))),
        ids_of(|d| matches!(d, VirtioDeviceState::VhostUser(_))),
        ids_of(|d| matches!(d, VirtioDeviceState::Vsock(_))),
    );
    check_ids("disk", &overrides.disks, &disks)?;
    check_ids("net", &overrides.nets, &nets)?;
    check_ids("vhost-user", &overrides.vhost_user, &vhost)?;
    check_ids("vsock", &overrides.vsock, &vsock)?;
    let refused = |resource: &HostResource, hint: String| match &snap.authentication {
        Authentication::Authenticated => None,
        Authentication::NotAuthenticated(why) => Some(AuthorizeError::Refused(Box::new(Refusal {
            dir: snap.dir.clone(),
            why: why.clone(),
            kind: resource.kind(),
            id: resource.id().to_string(),
            location: resource.location(),
            hint,
        }))),
    };
    let mut host_opens = Vec::new();
    for (device, id) in devices.iter_mut().zip(&ids) {
        let Some(id) = id else { continue };
        let overridden = match &mut device.device {
            VirtioDeviceState::Blk(disk) => find(&overrides.disks, id)
                .map(|p| disk.path = p.clone())
                .ok_or_else(|| format!("--disk id={id},path=PATH")),
            VirtioDeviceState::Net(net) => find(&overrides.nets, id)
                .map(|t| net.tap = t.clone())
                .ok_or_else(|| format!("--net id={id},tap=TAP")),
            VirtioDeviceState::VhostUser(vhost) => find(&overrides.vhost_user, id)
                .map(|s| vhost.config.socket = s.clone())
                .ok_or_else(|| format!("--vhost-user id={id},socket=PATH")),
            VirtioDeviceState::Vsock(vsock) => find(&overrides.vsock, id)
                .map(|s| vsock.socket = s.clone())
                .ok_or_else(|| format!("--vsock id={id},socket=PATH")),
            VirtioDeviceState::Rng(_) | VirtioDeviceState::Console(_) => continue,
        };
        let Some(resource) = device_resource(&device.device, id) else {
            continue;
        };
        if let Err(hint) = overridden {
            if let Some(e) = refused(&resource, hint) {
                return Err(e);
            }
        }
        host_opens.push(resource);
    }
    let parents = match (&snap.manifest.parent, &overrides.parent) {
        (None, Some(_)) => return Err(AuthorizeError::NoParent(snap.dir.clone())),
        (None, None) => Vec::new(),
        (Some(_), Some(dir)) => {
            host_opens.push(HostResource::Parent { path: dir.clone() });
            resolve_parents(&snap.dir, &snap.manifest, Some(dir))?
        }
        (Some(p), None) => {
            let resource = HostResource::Parent {
                path: p.dir.clone(),
            };
            if let Some(e) = refused(&resource, "--parent DIR".into()) {
                return Err(e);
            }
            host_opens.push(resource);
            resolve_parents(&snap.dir, &snap.manifest, None)?
        }
    };
    Ok(RestorePlan {
        devices,
        parents,
        host_opens,
    })
}
