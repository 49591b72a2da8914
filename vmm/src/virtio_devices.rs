//! The VM's virtio devices as one list that a fresh start and a restore both build from.
//!
//! `VirtioDeviceState` has one arm per device model, each holding that device's own saved
//! state (its `devices::persist::Persist::State`, defined next to the device). A fresh start
//! turns the command line into this list (`from_config`); a snapshot saves it (`save`) beside
//! each function's transport state (`VirtioFunctionState`); restore reads it back. Either way
//! each device is built by `build` through its `Persist::restore`, which runs the same checks
//! and set-up as the device's constructor, and the builder's one PCI step places them.
//!
//! This is the one place in the VMM that names every device model; the snapshot code reads
//! host resources (disk paths, taps, sockets) from these arms.

use std::sync::{Arc, Mutex};

use devices::persist::Persist;
use devices::vhost_user::{VhostUserDevice, VhostUserError, VhostUserState};
use devices::virtio::blk::{BlkError, BlkState, VirtioBlk};
use devices::virtio::console::{ConsoleError, ConsoleInput, ConsoleState, VirtioConsole};
use devices::virtio::net::{NetError, NetState, VirtioNet};
use devices::virtio::rng::{RngState, VirtioRng};
use devices::virtio::transport::VirtioPciState;
use devices::virtio::vsock::{VirtioVsock, VsockError, VsockState};
use devices::virtio::VirtioDevice;
use event_manager::{MutEventSubscriber, RemoteEndpoint};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::VmConfig;
use crate::guest_output::GuestOutputs;
use crate::memory::GuestRam;

/// Why a virtio device could not be built, from the command line or from its saved state.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// A `--disk` could not be opened (missing, wrong type or size, locked).
    #[error(transparent)]
    Disk(#[from] BlkError),
    /// A `--net` device could not be set up (its tap, its MAC).
    #[error(transparent)]
    Net(#[from] NetError),
    /// A `--vhost-user` backend could not be reached or refused the set-up (boxed: large).
    #[error(transparent)]
    VhostUser(Box<VhostUserError>),
    /// Guest memory cannot be shared with a vhost-user backend.
    #[error(transparent)]
    ShareMemory(#[from] crate::memory::share::ShareError),
    /// The `--console` device could not be set up.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// The `--vsock` device could not be set up (its socket).
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// The writer thread for the console's output could not be started.
    #[error("cannot start the guest output writer")]
    OutputWriter(#[source] std::io::Error),
}

impl From<VhostUserError> for DeviceError {
    fn from(e: VhostUserError) -> Self {
        Self::VhostUser(Box::new(e))
    }
}

/// One virtio device's own state: what it is and what it needs to be built again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    /// virtio-blk on a disk file (`--disk`).
    Blk(BlkState),
    /// virtio-rng (`--rng`).
    Rng(RngState),
    /// virtio-net on a tap (`--net`).
    Net(NetState),
    /// virtio-console (`--console`).
    Console(ConsoleState),
    /// virtio-vsock (`--vsock`).
    Vsock(VsockState),
    /// A device served by a vhost-user backend (`--vhost-user`).
    VhostUser(VhostUserState),
}

/// Everything a snapshot keeps of one virtio PCI function: the device's own state and the
/// transport's (registers, MSI-X, queue positions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioFunctionState {
    /// The device behind the function.
    pub device: VirtioDeviceState,
    /// The PCI transport.
    pub transport: VirtioPciState,
}

/// Why a device is being built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A fresh start from the command line.
    Boot,
    /// A restore: the guest's driver knew the device before (a vsock device tells it that
    /// its connections are gone).
    Snapshot,
}

/// What building the devices needs from the VM, and what it hands back besides them.
pub(crate) struct DeviceContext<'a> {
    /// Guest RAM (shared with vhost-user backends).
    pub(crate) ram: &'a GuestRam,
    /// The VM's event loop, which watches vhost-user sockets.
    pub(crate) event_loop: RemoteEndpoint<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    /// Where guest output goes (the console writes to stdout).
    pub(crate) outputs: &'a mut GuestOutputs,
    /// Set when a console was built: its input, which the runner feeds from stdin.
    pub(crate) console_input: Option<ConsoleInput>,
}

impl VirtioDeviceState {
    /// The devices `cfg` asks for, in bus order: disks, rngs, nets, vhost-user devices, vsock,
    /// console. A net device without `mac=` gets its random address here.
    pub fn from_config(cfg: &VmConfig) -> Result<Vec<Self>, DeviceError> {
        let mut list: Vec<Self> = cfg
            .disks
            .iter()
            .map(|d| Self::Blk(BlkState::from(d)))
            .collect();
        list.extend(cfg.rngs.iter().map(|_| Self::Rng(RngState)));
        for n in &cfg.nets {
            list.push(Self::Net(NetState::for_tap(&n.tap, n.mac)?));
        }
        list.extend(
            cfg.vhost_user
                .iter()
                .map(|c| Self::VhostUser(VhostUserState { config: c.clone() })),
        );
        list.extend(cfg.vsock.iter().map(|v| {
            Self::Vsock(VsockState {
                cid: v.cid,
                socket: v.socket.clone(),
                next_host_port: devices::virtio::vsock::FIRST_HOST_PORT,
            })
        }));
        if cfg.console {
            list.push(Self::Console(ConsoleState));
        }
        Ok(list)
    }

    /// Builds the device through its `Persist::restore`.
    pub(crate) fn build(
        &self,
        origin: Origin,
        ctx: &mut DeviceContext<'_>,
    ) -> Result<Box<dyn VirtioDevice>, DeviceError> {
        Ok(match self {
            Self::Blk(s) => Box::new(VirtioBlk::restore((), s)?),
            Self::Rng(s) => {
                let Ok(rng) = VirtioRng::restore((), s);
                Box::new(rng)
            }
            Self::Net(s) => Box::new(VirtioNet::restore((), s)?),
            Self::Console(s) => {
                let stdout = ctx.outputs.stdout().map_err(DeviceError::OutputWriter)?;
                let console = VirtioConsole::restore(Box::new(stdout), s)?;
                ctx.console_input = Some(console.input());
                Box::new(console)
            }
            Self::Vsock(s) => match origin {
                Origin::Boot => Box::new(VirtioVsock::new(s.cid, &s.socket)?),
                Origin::Snapshot => Box::new(VirtioVsock::restore((), s)?),
            },
            Self::VhostUser(s) => {
                let regions = crate::memory::share::shared_regions(ctx.ram)?;
                Box::new(VhostUserDevice::restore(
                    (regions, ctx.event_loop.clone()),
                    s,
                )?)
            }
        })
    }

    /// The state of `device` (its `Persist::save`); `None` for a device model without one.
    pub fn save(device: &dyn VirtioDevice) -> Option<Self> {
        let any = device.as_any();
        if let Some(d) = any.downcast_ref::<VirtioBlk>() {
            return Some(Self::Blk(d.save()));
        }
        if let Some(d) = any.downcast_ref::<VirtioRng>() {
            return Some(Self::Rng(d.save()));
        }
        if let Some(d) = any.downcast_ref::<VirtioNet>() {
            return Some(Self::Net(d.save()));
        }
        if let Some(d) = any.downcast_ref::<VirtioConsole>() {
            return Some(Self::Console(d.save()));
        }
        if let Some(d) = any.downcast_ref::<VirtioVsock>() {
            return Some(Self::Vsock(d.save()));
        }
        if let Some(d) = any.downcast_ref::<VhostUserDevice>() {
            return Some(Self::VhostUser(d.save()));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::PathBuf;
    use std::time::Duration;

    use devices::virtio::blk::{DiskConfig, IoEngineKind};
    use devices::virtio::vsock::VsockState;

    use super::*;
    use crate::config::{NetConfig, RngConfig, SerialConfig, VsockConfig};
    use crate::memory::backing::BackingKind;
    use crate::memory::MemoryConfig;

    fn config() -> VmConfig {
        let mut disk = DiskConfig::new("/d.img");
        disk.engine = IoEngineKind::IoUring;
        VmConfig {
            kernel: PathBuf::from("/k"),
            initrd: None,
            cmdline: String::new(),
            cpus: 1,
            memory: MemoryConfig {
                size: 1 << 20,
                backing: BackingKind::Memfd,
                prealloc: false,
                shared_with_snapshot: false,
            },
            serial: SerialConfig::Off,
            timeout: Some(Duration::from_secs(1)),
            disks: vec![disk],
            nets: vec![
                NetConfig {
                    tap: "tap0".into(),
                    mac: Some([2, 0, 0, 0, 0, 7]),
                },
                NetConfig {
                    tap: "tap1".into(),
                    mac: None,
                },
            ],
            console: true,
            rngs: RngConfig::repeated(1),
            vhost_user: Vec::new(),
            vsock: Some(VsockConfig {
                cid: 3,
                socket: "/v.sock".into(),
            }),
        }
    }

    #[test]
    fn the_command_line_becomes_the_device_states_in_bus_order() {
        let list = VirtioDeviceState::from_config(&config()).unwrap();
        let kinds: Vec<&str> = list
            .iter()
            .map(|d| match d {
                VirtioDeviceState::Blk(_) => "blk",
                VirtioDeviceState::Rng(_) => "rng",
                VirtioDeviceState::Net(_) => "net",
                VirtioDeviceState::Console(_) => "console",
                VirtioDeviceState::Vsock(_) => "vsock",
                VirtioDeviceState::VhostUser(_) => "vhost-user",
            })
            .collect();
        assert_eq!(kinds, ["blk", "rng", "net", "net", "vsock", "console"]);
        assert!(
            matches!(&list[0], VirtioDeviceState::Blk(b) if b.engine == IoEngineKind::IoUring),
            "io=uring is kept: {:?}",
            list[0]
        );
        assert!(matches!(&list[2], VirtioDeviceState::Net(n) if n.mac == [2, 0, 0, 0, 0, 7]));
        // Without mac=, the address is chosen now (locally administered unicast), so the
        // device and its saved state agree.
        assert!(matches!(&list[3], VirtioDeviceState::Net(n) if n.mac[0] & 0x03 == 0x02));
        assert_eq!(
            list[4],
            VirtioDeviceState::Vsock(VsockState {
                cid: 3,
                socket: "/v.sock".into(),
                next_host_port: devices::virtio::vsock::FIRST_HOST_PORT,
            })
        );
    }

    #[test]
    fn a_built_device_saves_the_state_it_was_built_from() {
        let Ok(rng) = VirtioRng::restore((), &RngState);
        assert_eq!(
            VirtioDeviceState::save(&rng),
            Some(VirtioDeviceState::Rng(RngState))
        );
        let dir = tempfile::tempdir().unwrap();
        let vsock = VsockState {
            cid: 3,
            socket: dir.path().join("v.sock"),
            next_host_port: devices::virtio::vsock::FIRST_HOST_PORT + 9,
        };
        let device = VirtioVsock::restore((), &vsock).unwrap();
        assert_eq!(
            VirtioDeviceState::save(&device),
            Some(VirtioDeviceState::Vsock(vsock))
        );
    }
}
