//! The VM's PCI segment: the host bridge and configuration access (ECAM on the MMIO bus, ports
//! 0xCF8/0xCFC on the I/O bus), and every virtio device as a PCI function.
//!
//! For each virtio device `add_virtio_device` places BAR 0 in the 32-bit PCI window, gives each
//! MSI-X vector a GSI (from `FIRST_MSI_GSI` up) with an irqfd, and hands the function an
//! `MsiRouteUpdater` that keeps the VM's MSI routing table in step with the guest's vector
//! table. `attach` then puts configuration access on the buses and gives each function its BAR
//! on the MMIO bus (`BarMapping`: the 32-bit window is where the guest may move it, and KVM
//! ioeventfds follow it); `map_bars` maps them, each queue's notification address bound to an
//! ioeventfd so a kick never exits to a vCPU thread. This module does no device emulation of its
//! own: that lives in `devices::pci` and `devices::virtio`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use arch::layout::{
    PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_LEN, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO32_SIZE,
    PCI_MMIO32_START, PCI_MMIO64_SIZE, PCI_MMIO64_START,
};
use devices::bus::{Bus, BusError};
use devices::guest_memory::TrackedGuestMemory;
use devices::pci::{
    BarAllocError, BarAllocator, BarMapError, BarSpace, BarWindow, IoEventRegistry, MsiMessage,
    MsiRouteUpdater, PciConfigIo, PciEcam, PciRoot, PciRootError,
};
use devices::virtio::transport::{
    msix_vector_count, TransportError, VirtioPciDevice, VirtioPciResources, VIRTIO_PCI_BAR_SIZE,
};
use devices::virtio::{EventLoop, VirtioDevice};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::hypervisor::{HypervisorError, IoEvents, MsiRoute, MsiRouting, Vm, FIRST_MSI_GSI};

/// Highest GSI KVM routes (its routing table holds 4096 entries).
const MAX_GSI: u32 = 4095;

/// Errors from building the PCI segment.
#[derive(Debug, Error)]
pub enum PciDevicesError {
    /// The virtio PCI function could not be built.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// No room for a device's BAR.
    #[error("virtio {device}: cannot place its BAR")]
    Bar {
        /// Device name.
        device: &'static str,
        /// The cause.
        #[source]
        source: BarAllocError,
    },
    /// Bus 0 is full.
    #[error("virtio {device}: cannot add it to PCI bus 0")]
    Slot {
        /// Device name.
        device: &'static str,
        /// The cause.
        #[source]
        source: PciRootError,
    },
    /// More MSI-X vectors than the VM has GSIs for.
    #[error(
        "virtio {device}: no GSIs left for its {vectors} MSI-X vectors (GSIs end at {MAX_GSI})"
    )]
    OutOfGsis {
        /// Device name.
        device: &'static str,
        /// Vectors it needs.
        vectors: usize,
    },
    /// An irqfd could not be created.
    #[error("virtio {device}: cannot create an irqfd")]
    EventFd {
        /// Device name.
        device: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The hypervisor refused an irqfd or ioeventfd.
    #[error("virtio {device}: cannot bind {what}")]
    Hypervisor {
        /// Device name.
        device: &'static str,
        /// What was being bound.
        what: String,
        /// The cause.
        #[source]
        source: HypervisorError,
    },
    /// The VM's MSI routing or ioeventfds could not be shared.
    #[error("cannot share the VM's {0} with the devices")]
    VmHandle(&'static str, #[source] HypervisorError),
    /// A function's BAR could not be mapped where it was placed.
    #[error("virtio {device}: cannot map its BAR")]
    MapBar {
        /// Device name.
        device: &'static str,
        /// The cause.
        #[source]
        source: BarMapError,
    },
    /// A range could not be placed on a bus.
    #[error("cannot place {what} on the {bus} bus")]
    Bus {
        /// What.
        what: String,
        /// "MMIO" or "I/O".
        bus: &'static str,
        /// The cause.
        #[source]
        source: BusError,
    },
}

/// The VM's MSI routes, one table shared by every device: the hypervisor replaces its whole
/// routing table on each update, so every update carries all routes.
struct MsiRoutingTable {
    vm: Arc<dyn MsiRouting>,
    routes: Mutex<BTreeMap<u32, MsiRoute>>,
}

impl std::fmt::Debug for MsiRoutingTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsiRoutingTable").finish_non_exhaustive()
    }
}

impl MsiRoutingTable {
    fn set(&self, route: MsiRoute) -> Result<(), HypervisorError> {
        // Held across the ioctl so that concurrent updates from two vCPUs apply in order.
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        log::debug!(
            "MSI route: GSI {} -> address {:#x} data {:#x}",
            route.gsi,
            route.address,
            route.data
        );
        routes.insert(route.gsi, route);
        let all: Vec<MsiRoute> = routes.values().copied().collect();
        self.vm.set_msi_routes(&all)
    }
}

/// One device's vectors: vector *n* raises GSI `gsis[n]`.
#[derive(Debug)]
struct DeviceMsiRoutes {
    table: Arc<MsiRoutingTable>,
    gsis: Vec<u32>,
}

impl MsiRouteUpdater for DeviceMsiRoutes {
    fn update_route(&self, vector: u16, message: MsiMessage) -> std::io::Result<()> {
        let gsi = *self.gsis.get(usize::from(vector)).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("MSI-X vector {vector} has no GSI"),
            )
        })?;
        self.table
            .set(MsiRoute {
                gsi,
                address: message.address,
                data: message.data,
            })
            .map_err(std::io::Error::other)
    }
}

/// The VM's ioeventfds as the devices' BARs bind them.
struct VmIoEvents(Arc<dyn IoEvents>);

impl IoEventRegistry for VmIoEvents {
    fn register(&self, event: &EventFd, address: u64) -> std::io::Result<()> {
        self.0
            .register(event, address)
            .map_err(std::io::Error::other)
    }

    fn unregister(&self, event: &EventFd, address: u64) -> std::io::Result<()> {
        self.0
            .unregister(event, address)
            .map_err(std::io::Error::other)
    }
}

/// Builds the PCI segment of one VM.
pub struct PciDevices<'a> {
    vm: &'a dyn Vm,
    mem: TrackedGuestMemory,
    event_loop: EventLoop,
    root: PciRoot,
    bars: BarAllocator,
    routes: Arc<MsiRoutingTable>,
    ioevents: Arc<dyn IoEventRegistry>,
    next_gsi: u32,
    functions: Vec<Arc<Mutex<VirtioPciDevice>>>,
}

impl std::fmt::Debug for PciDevices<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciDevices")
            .field("root", &self.root)
            .field("next_gsi", &self.next_gsi)
            .finish_non_exhaustive()
    }
}

impl<'a> PciDevices<'a> {
    /// An empty segment (host bridge only) for `vm`, whose devices will use `mem` and register
    /// their handlers with `event_loop`.
    pub fn new(
        vm: &'a dyn Vm,
        mem: TrackedGuestMemory,
        event_loop: EventLoop,
    ) -> Result<Self, PciDevicesError> {
        Ok(Self {
            routes: Arc::new(MsiRoutingTable {
                vm: vm
                    .msi_routing()
                    .map_err(|e| PciDevicesError::VmHandle("MSI routing", e))?,
                routes: Mutex::new(BTreeMap::new()),
            }),
            ioevents: Arc::new(VmIoEvents(
                vm.ioevents()
                    .map_err(|e| PciDevicesError::VmHandle("ioeventfds", e))?,
            )),
            vm,
            mem,
            event_loop,
            root: PciRoot::new(),
            bars: BarAllocator::new(
                (PCI_MMIO32_START, PCI_MMIO32_SIZE),
                (PCI_MMIO64_START, PCI_MMIO64_SIZE),
            ),
            next_gsi: FIRST_MSI_GSI,
            functions: Vec::new(),
        })
    }

    /// Adds `device` as the next function on bus 0; returns its device number.
    pub fn add_virtio_device(
        &mut self,
        device: Box<dyn VirtioDevice>,
    ) -> Result<u8, PciDevicesError> {
        let name = device.name();
        let hv = |what: String| {
            move |source| PciDevicesError::Hypervisor {
                device: name,
                what,
                source,
            }
        };
        let bar_address = self
            .bars
            .allocate(BarWindow::Mmio32, VIRTIO_PCI_BAR_SIZE)
            .map_err(|source| PciDevicesError::Bar {
                device: name,
                source,
            })?;
        let vectors = msix_vector_count(&*device);
        let gsis = self.allocate_gsis(name, vectors)?;
        let mut irqs = Vec::with_capacity(vectors);
        for &gsi in &gsis {
            let irq = EventFd::new(EFD_NONBLOCK).map_err(|source| PciDevicesError::EventFd {
                device: name,
                source,
            })?;
            self.vm
                .register_irqfd(&irq, gsi)
                .map_err(hv(format!("an irqfd to GSI {gsi}")))?;
            irqs.push(irq);
        }
        let function = VirtioPciDevice::new(
            device,
            VirtioPciResources {
                mem: self.mem.clone(),
                event_loop: self.event_loop.clone(),
                bar_address,
                msix_irqs: irqs,
                msi_routes: Arc::new(DeviceMsiRoutes {
                    table: self.routes.clone(),
                    gsis,
                }),
            },
        )?;
        let function = Arc::new(Mutex::new(function));
        let number =
            self.root
                .add_device(function.clone())
                .map_err(|source| PciDevicesError::Slot {
                    device: name,
                    source,
                })?;
        log::debug!("virtio {name} at PCI 00:{number:02x}.0, BAR 0 at {bar_address:#x}");
        self.functions.push(function);
        Ok(number)
    }

    fn allocate_gsis(
        &mut self,
        device: &'static str,
        vectors: usize,
    ) -> Result<Vec<u32>, PciDevicesError> {
        let first = self.next_gsi;
        let end = u32::try_from(vectors)
            .ok()
            .and_then(|n| first.checked_add(n))
            .filter(|&end| end <= MAX_GSI + 1)
            .ok_or(PciDevicesError::OutOfGsis { device, vectors })?;
        self.next_gsi = end;
        Ok((first..end).collect())
    }

    /// Puts configuration access on the buses and gives every function its BAR on `mmio`
    /// (mapped by `map_bars`, after a restore has put the saved BAR addresses back); returns
    /// the virtio functions in the order they were added (snapshots save and restore them in
    /// it).
    pub fn attach(
        self,
        pio: &mut Bus,
        mmio: &mut Bus,
    ) -> Result<Vec<Arc<Mutex<VirtioPciDevice>>>, PciDevicesError> {
        let root = Arc::new(self.root);
        mmio.insert(
            Arc::new(Mutex::new(PciEcam::new(root.clone()))),
            PCI_ECAM_START,
            PCI_ECAM_SIZE,
        )
        .map_err(|source| PciDevicesError::Bus {
            what: "the PCI ECAM area".into(),
            bus: "MMIO",
            source,
        })?;
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(root))),
            PCI_CONFIG_IO_PORT,
            PCI_CONFIG_IO_PORT_LEN,
        )
        .map_err(|source| PciDevicesError::Bus {
            what: "the PCI configuration ports".into(),
            bus: "I/O",
            source,
        })?;
        let space = BarSpace::new(mmio.clone(), self.ioevents);
        for f in &self.functions {
            let as_bus_device: Arc<Mutex<dyn devices::bus::BusDevice>> = f.clone();
            let mut function = f.lock().unwrap_or_else(PoisonError::into_inner);
            let device = function.name();
            let bar = space
                .add(
                    device,
                    Arc::downgrade(&as_bus_device),
                    VIRTIO_PCI_BAR_SIZE,
                    vec![(PCI_MMIO32_START, PCI_MMIO32_SIZE)],
                    &function.notify_events(),
                )
                .map_err(|source| PciDevicesError::MapBar { device, source })?;
            function.set_bar_mapping(bar);
        }
        Ok(self.functions)
    }
}

/// Maps every function's BAR where its configuration space says, with its ioeventfds.
pub fn map_bars(functions: &[Arc<Mutex<VirtioPciDevice>>]) -> Result<(), PciDevicesError> {
    for f in functions {
        let mut function = f.lock().unwrap_or_else(PoisonError::into_inner);
        function
            .map_bar()
            .map_err(|source| PciDevicesError::MapBar {
                device: function.name(),
                source,
            })?;
    }
    Ok(())
}
