//! `WhpHypervisor` and `WhpVm`: the Windows Hypervisor Platform behind the hypervisor seam's
//! `Hypervisor` and `Vm` traits.
//!
//! WHP fixes a partition's processor count and CPUID before set-up, and set-up comes before any
//! memory is mapped, whereas the seam's `create_vm` takes nothing. So a `WhpHypervisor` is made
//! for one VM shape (`new(vcpus)`): it reads the host's CPUID (`host_cpuid`), shapes it per vCPU
//! with `arch::cpuid::adjust_cpuid` exactly as the builder does for KVM, and sets the partition
//! up from that plan; the builder's later `set_cpuid` calls confirm the same tables.
//!
//! `WhpVm` maps memory as GPA ranges (unmapped on drop) and records them in a `MappedRam` for the
//! instruction emulator. Its platform devices are the user-space IOAPIC and PIC
//! (`WhpPlatform`), delivering through `WHvRequestInterrupt` and waking halted vCPUs; MSI routes
//! live in `MsiRoutes`. The buses the vCPUs' emulators reach are attached with `attach_buses`
//! before the first `create_vcpu`. Dirty-page tracking and snapshots are `NotSupported` here.
//!
//! Windows only; compiled and clippy-checked here but never run (wine has no hypervisor).

use std::sync::{Arc, Mutex, PoisonError};

use arch::regs::CpuidEntry;
use devices::bus::Bus;
use devices::irqchip::{InterruptRequest, InterruptSink, Ioapic, Pic};
use windows::Win32::System::Hypervisor::{
    WHvMapGpaRangeFlagExecute, WHvMapGpaRangeFlagRead, WHvMapGpaRangeFlagWrite,
    WHV_MAP_GPA_RANGE_FLAGS,
};

use super::cpuid::CpuidPlan;
use super::halt::HaltWake;
use super::host_cpuid::host_cpuid;
use super::library::{WhpLibrary, WhpLoadError};
use super::msi_routes::MsiRoutes;
use super::partition::{Partition, PartitionError};
use super::vcpu::{VcpuIo, WhpVcpu};
use crate::hypervisor::state::VmState;
use crate::hypervisor::{
    DirtyLog, Hypervisor, HypervisorError, MsiRoute, MsiRouting, Result, Vcpu, Vm, VmSnapshot,
};
use crate::memory::MappedRam;

/// At most this many vCPUs: xAPIC IDs are 8 bits and 0xFF is the broadcast ID.
pub const MAX_VCPUS: usize = 254;
/// WHP maps GPA ranges without a slot table; skiff's RAM is a handful of regions. This bound
/// only keeps the validation the same as on KVM.
pub const MAX_MEMORY_RANGES: usize = 512;

/// The Windows Hypervisor Platform, set up for VMs of one shape.
#[derive(Debug)]
pub struct WhpHypervisor {
    lib: Arc<WhpLibrary>,
    vcpus: u32,
    supported: Vec<CpuidEntry>,
    cpuid: Arc<CpuidPlan>,
}

impl WhpHypervisor {
    /// Loads the platform and plans CPUID for VMs of `vcpus` vCPUs.
    pub fn new(vcpus: u32) -> std::result::Result<Self, WhpLoadError> {
        let lib = Arc::new(WhpLibrary::load()?);
        let supported = host_cpuid();
        let tables = (0..vcpus)
            .map(|index| {
                let mut table = supported.clone();
                arch::cpuid::adjust_cpuid(&mut table, index, vcpus);
                table
            })
            .collect();
        Ok(Self {
            lib,
            vcpus,
            supported,
            cpuid: Arc::new(CpuidPlan::new(tables)),
        })
    }
}

impl Hypervisor for WhpHypervisor {
    fn create_vm(&self) -> Result<Box<dyn Vm>> {
        let partition = Partition::create(self.lib.clone(), self.vcpus, &self.cpuid)
            .map_err(partition_error)?;
        let wakes = (0..self.vcpus)
            .map(|_| Arc::new(HaltWake::default()))
            .collect();
        Ok(Box::new(WhpVm {
            interrupts: Arc::new(WhpInterrupts {
                partition: Arc::new(partition),
                wakes,
            }),
            cpuid: self.cpuid.clone(),
            ram: Arc::new(MappedRam::default()),
            mapped: Mutex::new(Vec::new()),
            routes: Arc::new(MsiRoutes::default()),
            platform: Mutex::new(None),
            buses: Mutex::new(None),
        }))
    }

    fn max_vcpus(&self) -> usize {
        MAX_VCPUS
    }

    fn max_memory_slots(&self) -> usize {
        MAX_MEMORY_RANGES
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        Ok(self.supported.clone())
    }
}

fn partition_error(e: PartitionError) -> HypervisorError {
    let what = match &e {
        PartitionError::TooManyVcpus { .. } => "setting the WHP partition's processor count",
        _ => "setting up the WHP partition",
    };
    HypervisorError::op(what, std::io::Error::other(crate::error_chain(&e)))
}

/// Interrupt delivery for one partition: `WHvRequestInterrupt`, then a wake-up for vCPUs that
/// wait in a halt (a request may target any of them).
#[derive(Debug)]
pub struct WhpInterrupts {
    partition: Arc<Partition>,
    wakes: Vec<Arc<HaltWake>>,
}

impl InterruptSink for WhpInterrupts {
    fn deliver(&self, request: InterruptRequest) -> std::io::Result<()> {
        let result = self.partition.deliver(request);
        for wake in &self.wakes {
            wake.notify();
        }
        result
    }
}

/// The user-space interrupt controllers of a WHP VM, for the builder to put on the buses
/// (IOAPIC at `arch::layout::IOAPIC_START`, PIC ports through `PicPorts`).
#[derive(Debug, Clone)]
pub struct WhpPlatform {
    /// The IOAPIC, delivering through `WhpInterrupts`.
    pub ioapic: Arc<Mutex<Ioapic>>,
    /// The 8259A pair.
    pub pic: Arc<Mutex<Pic>>,
}

/// One WHP partition behind the `Vm` trait.
#[derive(Debug)]
pub struct WhpVm {
    interrupts: Arc<WhpInterrupts>,
    cpuid: Arc<CpuidPlan>,
    ram: Arc<MappedRam>,
    mapped: Mutex<Vec<(u64, u64)>>,
    routes: Arc<MsiRoutes>,
    platform: Mutex<Option<WhpPlatform>>,
    buses: Mutex<Option<(Arc<Bus>, Arc<Bus>)>>,
}

impl WhpVm {
    fn partition(&self) -> &Partition {
        &self.interrupts.partition
    }

    /// The buses (port I/O, MMIO) the vCPUs' instruction emulators reach; attach them before
    /// the first `create_vcpu`. They are the run loop's own, so emulated and decoded accesses
    /// reach the same devices.
    pub fn attach_buses(&self, pio: Arc<Bus>, mmio: Arc<Bus>) {
        *self.buses.lock().unwrap_or_else(PoisonError::into_inner) = Some((pio, mmio));
    }

    /// The interrupt controllers, once `create_platform_devices` made them.
    pub fn platform(&self) -> Option<WhpPlatform> {
        self.platform
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Delivers the MSI routed to `gsi`, if any (a device's interrupt on WHP, where KVM would
    /// take an irqfd write).
    pub fn signal_msi(&self, gsi: u32) -> std::io::Result<()> {
        match self.routes.request(gsi) {
            Some(request) => self.interrupts.deliver(request),
            None => Ok(()),
        }
    }
}

impl Drop for WhpVm {
    fn drop(&mut self) {
        let partition = &self.interrupts.partition;
        for (gpa, size) in self
            .mapped
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            // SAFETY: the range was mapped by `map_memory` on this live partition.
            let hr = unsafe { (partition.lib().unmap_gpa_range)(partition.handle(), gpa, size) };
            if let Err(e) = hr.ok() {
                log::warn!("WHvUnmapGpaRange at {gpa:#x} failed: {e}");
            }
        }
    }
}

impl Vm for WhpVm {
    unsafe fn map_memory(
        &self,
        _slot: u32,
        guest_address: u64,
        size: u64,
        host_address: u64,
    ) -> Result<()> {
        let flags =
            WHvMapGpaRangeFlagRead.0 | WHvMapGpaRangeFlagWrite.0 | WHvMapGpaRangeFlagExecute.0;
        let partition = self.partition();
        // SAFETY: the caller promises a live writable mapping of `size` bytes at
        // `host_address` that outlives the VM; it is unmapped in `Drop`.
        unsafe {
            (partition.lib().map_gpa_range)(
                partition.handle(),
                host_address as *const _,
                guest_address,
                size,
                WHV_MAP_GPA_RANGE_FLAGS(flags),
            )
        }
        .ok()
        .map_err(|e| HypervisorError::op("WHvMapGpaRange", e))?;
        self.mapped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((guest_address, size));
        // SAFETY: the same promise covers the emulator's accesses through `ram`, which the VM
        // holds no longer than the mapping lives.
        unsafe { self.ram.add(guest_address, size, host_address) };
        Ok(())
    }

    fn create_platform_devices(&self) -> Result<()> {
        let sink: Arc<dyn InterruptSink> = self.interrupts.clone();
        *self.platform.lock().unwrap_or_else(PoisonError::into_inner) = Some(WhpPlatform {
            ioapic: Arc::new(Mutex::new(Ioapic::new(sink))),
            pic: Arc::new(Mutex::new(Pic::new())),
        });
        Ok(())
    }

    fn set_msi_routes(&self, routes: &[MsiRoute]) -> Result<()> {
        self.routes
            .set(routes)
            .map_err(|e| HypervisorError::op("setting MSI routes", std::io::Error::other(e)))
    }

    fn msi_routing(&self) -> Result<Arc<dyn MsiRouting>> {
        Ok(Arc::new(Routing(self.routes.clone())))
    }

    fn create_vcpu(&self, index: u32) -> Result<Box<dyn Vcpu>> {
        let Some((pio, mmio)) = self
            .buses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return Err(HypervisorError::op(
                "creating a WHP vCPU",
                std::io::Error::other("no buses attached (WhpVm::attach_buses comes first)"),
            ));
        };
        let wake = usize::try_from(index)
            .ok()
            .and_then(|i| self.interrupts.wakes.get(i))
            .cloned()
            .ok_or_else(|| {
                HypervisorError::op(
                    "creating a WHP vCPU",
                    std::io::Error::other(format!(
                        "vCPU {index} is past the partition's {} processors",
                        self.interrupts.wakes.len()
                    )),
                )
            })?;
        let eoi = self.platform().map(|p| {
            let ioapic = p.ioapic;
            Arc::new(move |vector: u8| {
                ioapic
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .end_of_interrupt(vector);
            }) as Arc<dyn Fn(u8) + Send + Sync>
        });
        let io = VcpuIo {
            pio,
            mmio,
            ram: self.ram.clone(),
            eoi,
        };
        let vcpu = WhpVcpu::create(
            self.interrupts.partition.clone(),
            index,
            self.cpuid.clone(),
            io,
            wake,
        )?;
        Ok(Box::new(vcpu))
    }

    fn dirty_log(&self) -> Result<Arc<dyn DirtyLog>> {
        Err(HypervisorError::NotSupported("dirty-page tracking on WHP"))
    }
}

/// `MsiRouting` over a VM's `MsiRoutes`.
#[derive(Debug)]
struct Routing(Arc<MsiRoutes>);

impl MsiRouting for Routing {
    fn set_msi_routes(&self, routes: &[MsiRoute]) -> Result<()> {
        self.0
            .set(routes)
            .map_err(|e| HypervisorError::op("setting MSI routes", std::io::Error::other(e)))
    }
}

impl VmSnapshot for WhpVm {
    fn save_state(&self) -> Result<VmState> {
        Err(HypervisorError::NotSupported("snapshots of WHP VMs"))
    }

    fn restore_devices(&self, _state: &VmState) -> Result<()> {
        Err(HypervisorError::NotSupported("snapshots of WHP VMs"))
    }

    fn restore_clock(&self, _state: &VmState) -> Result<()> {
        Err(HypervisorError::NotSupported("snapshots of WHP VMs"))
    }
}
