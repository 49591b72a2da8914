//! The host resources a snapshot names: what restoring it would make skiff open outside the
//! snapshot directory (disks, taps, vhost-user sockets, vsock listening sockets, a diff's parent
//! directory), and what it merely records (kernel, initrd, the original `file=` memory backing).
//!
//! The list is derived from the decoded state and the manifest's VM description, and
//! `manifest.json` carries the same list (`resources`) so that `skiff snapshot-info` can show it
//! and a reader can see it; restore refuses a manifest whose list differs from what the state
//! really names. Devices get ids: a disk's own `id=` (its serial) when it has a unique one,
//! else `disk0`, `disk1`, ... in bus order; `net0`, ...; `vhost-user0`, ...; `vsock0`.
//!
//! Not here: whether restore may open them (`authorize`).

use super::host_resource::HostResource;
use super::manifest::SnapshotManifest;
use super::state_file::SnapshotState;
use crate::virtio_devices::{VirtioDeviceState, VirtioFunctionState};

/// Each virtio function's device id (`None` for devices that name no host resource: rng,
/// console), in bus order.
pub fn device_ids(devices: &[VirtioFunctionState]) -> Vec<Option<String>> {
    let mut ids: Vec<Option<String>> = vec![None; devices.len()];
    // Disks' own ids first, when unique and non-empty, so generated names avoid them.
    for (i, d) in devices.iter().enumerate() {
        if let VirtioDeviceState::Blk(disk) = &d.device {
            let Some(id) = &disk.id else { continue };
            let unique = devices
                .iter()
                .filter(
                    |o| matches!(&o.device, VirtioDeviceState::Blk(other) if other.id.as_ref() == Some(id)),
                )
                .count()
                == 1;
            if unique && !id.is_empty() {
                ids[i] = Some(id.clone());
            }
        }
    }
    // The others: `disk{n}` for the n-th disk in bus order (the next free number if that
    // name is some disk's own id), likewise for net, vhost-user and vsock.
    let mut counters = [0usize; 4];
    for (i, d) in devices.iter().enumerate() {
        let (slot, prefix) = match &d.device {
            VirtioDeviceState::Blk(_) => (0, "disk"),
            VirtioDeviceState::Net(_) => (1, "net"),
            VirtioDeviceState::VhostUser(_) => (2, "vhost-user"),
            VirtioDeviceState::Vsock(_) => (3, "vsock"),
            VirtioDeviceState::Rng(_) | VirtioDeviceState::Console(_) => continue,
        };
        let position = counters[slot];
        counters[slot] += 1;
        if ids[i].is_some() {
            continue;
        }
        let name = (position..)
            .map(|n| format!("{prefix}{n}"))
            .find(|name| !ids.iter().any(|x| x.as_deref() == Some(name.as_str())));
        ids[i] = name;
    }
    ids
}

/// The host resource one virtio function names, under device id `id`.
pub fn device_resource(device: &VirtioDeviceState, id: &str) -> Option<HostResource> {
    match device {
        VirtioDeviceState::Blk(disk) => Some(HostResource::Disk {
            id: id.to_string(),
            path: disk.path.clone(),
            readonly: disk.readonly,
        }),
        VirtioDeviceState::Net(net) => Some(HostResource::Net {
            id: id.to_string(),
            tap: net.tap.clone(),
        }),
        VirtioDeviceState::VhostUser(vhost) => Some(HostResource::VhostUser {
            id: id.to_string(),
            socket: vhost.config.socket.clone(),
        }),
        VirtioDeviceState::Vsock(vsock) => Some(HostResource::Vsock {
            id: id.to_string(),
            socket: vsock.socket.clone(),
        }),
        VirtioDeviceState::Rng(_) | VirtioDeviceState::Console(_) => None,
    }
}

/// Every host resource the snapshot (`manifest` without its `resources`, and `state`) names:
/// devices in bus order, then the parent, kernel, initrd and memory backing.
pub fn list(manifest: &SnapshotManifest, state: &SnapshotState) -> Vec<HostResource> {
    let devices = &state.devices.virtio;
    let mut out: Vec<HostResource> = devices
        .iter()
        .zip(device_ids(devices))
        .filter_map(|(d, id)| device_resource(&d.device, id.as_deref()?))
        .collect();
    if let Some(p) = &manifest.parent {
        out.push(HostResource::Parent {
            path: p.dir.clone(),
        });
    }
    let vm = &manifest.vm;
    out.push(HostResource::Kernel {
        path: vm.kernel.clone(),
    });
    if let Some(path) = &vm.initrd {
        out.push(HostResource::Initrd { path: path.clone() });
    }
    if let Some(path) = &vm.memory_file {
        out.push(HostResource::MemoryBacking { path: path.clone() });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::state_file::tests::{sample_state, sample_virtio_state};

    use devices::virtio::blk::{BlkState, IoEngineKind};

    fn with(device: VirtioDeviceState) -> VirtioFunctionState {
        let mut s = sample_virtio_state();
        s.device = device;
        s
    }

    fn blk(id: Option<&str>) -> VirtioDeviceState {
        VirtioDeviceState::Blk(BlkState {
            path: "/d".into(),
            readonly: false,
            id: id.map(Into::into),
            queues: 1,
            engine: IoEngineKind::Auto,
        })
    }

    #[test]
    fn ids_use_a_disks_own_unique_id_and_number_the_rest() {
        use devices::vhost_user::{VhostUserConfig, VhostUserKind, VhostUserState};
        let devices = vec![
            with(blk(None)),
            with(blk(Some("disk0"))),
            with(VirtioDeviceState::Rng(devices::virtio::rng::RngState)),
            with(VirtioDeviceState::Net(devices::virtio::net::NetState {
                tap: "tap0".into(),
                mac: [2, 0, 0, 0, 0, 1],
            })),
            with(blk(Some("root"))),
            with(blk(Some("twice"))),
            with(blk(Some("twice"))),
            with(VirtioDeviceState::VhostUser(VhostUserState {
                config: VhostUserConfig::new(VhostUserKind::Blk, "/s"),
            })),
        ];
        let ids = device_ids(&devices);
        let ids: Vec<_> = ids.iter().map(|x| x.as_deref()).collect();
        assert_eq!(
            ids,
            [
                Some("disk1"),
                Some("disk0"),
                None,
                Some("net0"),
                Some("root"),
                Some("disk3"),
                Some("disk4"),
                Some("vhost-user0")
            ]
        );
    }

    #[test]
    fn the_list_names_devices_then_recorded_files_and_round_trips_as_json() {
        let mut m = crate::snapshot::manifest::tests::sample();
        m.vm.initrd = Some("/i".into());
        let list = list(&m, &sample_state());
        assert_eq!(
            list,
            [
                HostResource::Disk {
                    id: "disk0".into(),
                    path: "/var/tmp/disk.img".into(),
                    readonly: false
                },
                HostResource::Kernel { path: "/k".into() },
                HostResource::Initrd { path: "/i".into() },
            ]
        );
        let json = serde_json::to_string(&list).unwrap();
        assert!(json.contains(r#"{"kind":"disk","id":"disk0","path":"/var/tmp/disk.img""#));
        let back: Vec<HostResource> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, list);
        assert!(list[0].opened_on_restore() && !list[1].opened_on_restore());
    }
}
