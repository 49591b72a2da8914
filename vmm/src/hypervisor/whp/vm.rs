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
//! instruction emulator. Its platform devices are the user-space IOAPIC, PIC and PIT
//! (`WhpPlatform`, and the PIT's timer thread), delivering through `WHvRequestInterrupt` and
//! waking halted vCPUs; EOIs WHP reports go back to the IOAPIC; MSI routes live in `MsiRoutes`. The buses the vCPUs' emulators reach are attached with `attach_buses`
//! before the first `create_vcpu`. Dirty-page tracking and snapshots are `NotSupported` here.
//!
//! Windows only; compiled and clippy-checked here but never run (wine has no hypervisor).

use std::sync::{Arc, Mutex, PoisonError};

use arch::regs::CpuidEntry;
use devices::bus::{Bus, BusError};
use devices::interrupt::InterruptLine;
use devices::irqchip::{
    HostClock, InterruptRequest, InterruptSink, Ioapic, IsaIrq, Pic, PicPorts, Pit, PitClock,
    PitPorts, PitTimer,
};
use windows::Win32::System::Hypervisor::{
    WHvMapGpaRangeFlagExecute, WHvMapGpaRangeFlagRead, WHvMapGpaRangeFlagWrite,
    WHV_MAP_GPA_RANGE_FLAGS,
};

use super::cpuid::CpuidPlan;
use super::halt::HaltWake;
use super::host_cpuid::host_cpuid;
use super::library::{WhpLibrary, WhpLoadError};
use super::msi_routes::MsiRoutes;
use super::partition::Partition;
use super::vcpu::{VcpuCanceller, VcpuIo, WhpVcpu};
use crate::hypervisor::state::VmState;
use crate::hypervisor::{
    DirtyLog, Hypervisor, HypervisorError, MsiRoute, MsiRouting, Result, Vcpu, Vm, VmSnapshot,
};
use crate::memory::{MappedRam, SlotMemory};

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

impl WhpHypervisor {
    /// `create_vm` with the concrete type, for the Windows builder, which also needs
    /// `WhpVm`'s own steps (`attach_buses`, `platform`, `isa_irq`, `canceller`).
    pub fn create_whp_vm(&self) -> Result<WhpVm> {
        let partition = Partition::create(self.lib.clone(), self.vcpus, &self.cpuid)
            .map_err(HypervisorError::Partition)?;
        let wakes = (0..self.vcpus)
            .map(|_| Arc::new(HaltWake::default()))
            .collect();
        Ok(WhpVm {
            interrupts: Arc::new(WhpInterrupts {
                partition: Arc::new(partition),
                wakes,
            }),
            cpuid: self.cpuid.clone(),
            ram: Arc::new(MappedRam::default()),
            mapped: Mutex::new(Vec::new()),
            routes: Arc::new(MsiRoutes::default()),
            platform: Mutex::new(None),
            pit_timer: Mutex::new(None),
            buses: Mutex::new(None),
            boot_kick: Arc::new(Mutex::new(None)),
        })
    }
}

impl Hypervisor for WhpHypervisor {
    fn create_vm(&self) -> Result<Box<dyn Vm>> {
        Ok(Box::new(self.create_whp_vm()?))
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

/// An ISA line that also kicks the boot vCPU out of its run when the PIC, after the pulse, asks
/// for an interrupt, so that `WhpVcpu` injects it at once rather than at its next exit.
#[derive(Debug)]
struct KickingIsaIrq {
    line: IsaIrq,
    pic: Arc<Mutex<Pic>>,
    boot_kick: Arc<Mutex<Option<VcpuCanceller>>>,
}

impl InterruptLine for KickingIsaIrq {
    fn trigger(&self) -> std::io::Result<()> {
        self.line.trigger()?;
        if !self
            .pic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .has_interrupt()
        {
            return Ok(());
        }
        let kick = self
            .boot_kick
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match kick {
            Some(kick) => kick.cancel().map_err(std::io::Error::other),
            None => Ok(()),
        }
    }
}

/// The IOAPIC's MMIO window, as KVM's in-kernel one has it.
pub const IOAPIC_MMIO_LEN: u64 = 0x100;
/// The PIC's port ranges (master, slave, ELCR), two ports each.
const PIC_PORTS: [u16; 3] = [0x20, 0xa0, 0x4d0];

/// The user-space interrupt controllers and timer of a WHP VM.
#[derive(Debug, Clone)]
pub struct WhpPlatform {
    /// The IOAPIC, delivering through `WhpInterrupts`.
    pub ioapic: Arc<Mutex<Ioapic>>,
    /// The 8259A pair.
    pub pic: Arc<Mutex<Pic>>,
    /// The 8254, on ISA IRQ 0 (PIC input 0 and the IOAPIC pin the MADT names).
    pub pit: Arc<Mutex<Pit>>,
}

impl WhpPlatform {
    /// Puts the IOAPIC at `arch::layout::IOAPIC_START` on `mmio`, and the PIC (0x20, 0xa0,
    /// 0x4d0) and the PIT's counters (0x40-0x43) on `pio`. The PIT's speaker port (0x61,
    /// `PitPorts::new(pit, SPEAKER_PORT)`) is left to the caller: skiff's i8042 covers 0x61.
    pub fn attach(&self, pio: &Bus, mmio: &Bus) -> std::result::Result<(), BusError> {
        mmio.insert(
            self.ioapic.clone(),
            arch::layout::IOAPIC_START,
            IOAPIC_MMIO_LEN,
        )?;
        for base in PIC_PORTS {
            pio.insert(
                Arc::new(Mutex::new(PicPorts::new(self.pic.clone(), base))),
                u64::from(base),
                2,
            )?;
        }
        pio.insert(
            Arc::new(Mutex::new(PitPorts::new(
                self.pit.clone(),
                devices::irqchip::pit::PIT_PORT,
            ))),
            u64::from(devices::irqchip::pit::PIT_PORT),
            4,
        )
    }
}

/// One WHP partition behind the `Vm` trait.
#[derive(Debug)]
pub struct WhpVm {
    interrupts: Arc<WhpInterrupts>,
    cpuid: Arc<CpuidPlan>,
    ram: Arc<MappedRam>,
    /// Each mapped GPA range with the memory behind it, held until the range is unmapped.
    mapped: Mutex<Vec<(u64, Arc<dyn SlotMemory>)>>,
    routes: Arc<MsiRoutes>,
    platform: Mutex<Option<WhpPlatform>>,
    pit_timer: Mutex<Option<PitTimer>>,
    buses: Mutex<Option<(Arc<Bus>, Arc<Bus>)>>,
    boot_kick: Arc<Mutex<Option<VcpuCanceller>>>,
}

impl WhpVm {
    fn kicking_line(
        &self,
        pic: &Arc<Mutex<Pic>>,
        ioapic: &Arc<Mutex<Ioapic>>,
        irq: u8,
        gsi: usize,
    ) -> Arc<dyn InterruptLine> {
        Arc::new(KickingIsaIrq {
            line: IsaIrq::new(pic.clone(), ioapic.clone(), irq, gsi),
            pic: pic.clone(),
            boot_kick: self.boot_kick.clone(),
        })
    }

    /// ISA interrupt `irq` (0..16) as a device's `InterruptLine`: PIC input `irq` and IOAPIC
    /// pin `irq`, kicking the boot vCPU when the PIC then asks for an interrupt. `None` before
    /// `create_platform_devices` or for an `irq` past 15.
    pub fn isa_irq(&self, irq: u8) -> Option<Arc<dyn InterruptLine>> {
        let platform = self.platform().filter(|_| irq < 16)?;
        Some(self.kicking_line(&platform.pic, &platform.ioapic, irq, usize::from(irq)))
    }

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

    /// What cancels vCPU `index`'s runs from another thread (`None` past the partition's
    /// processors); the same as that vCPU's own `WhpVcpu::canceller`.
    pub fn canceller(&self, index: u32) -> Option<VcpuCanceller> {
        let wake = self.interrupts.wakes.get(usize::try_from(index).ok()?)?;
        Some(VcpuCanceller::new(
            self.interrupts.partition.clone(),
            index,
            wake.clone(),
        ))
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
        for (gpa, memory) in self
            .mapped
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            // SAFETY: the range was mapped by `map_memory` on this live partition.
            let hr = unsafe {
                (partition.lib().unmap_gpa_range)(partition.handle(), gpa, memory.size())
            };
            if let Err(e) = hr.ok() {
                log::warn!("WHvUnmapGpaRange at {gpa:#x} failed: {e}");
                // The partition may still reach the memory: keep it mapped for good.
                std::mem::forget(memory);
            }
        }
    }
}

impl Vm for WhpVm {
    fn map_memory(
        &self,
        _slot: u32,
        guest_address: u64,
        memory: Arc<dyn SlotMemory>,
    ) -> Result<()> {
        let flags =
            WHvMapGpaRangeFlagRead.0 | WHvMapGpaRangeFlagWrite.0 | WHvMapGpaRangeFlagExecute.0;
        let partition = self.partition();
        // SAFETY: `memory` is a readable and writable mapping of `memory.size()` bytes
        // (`SlotMemory`'s contract), which `mapped` holds until `Drop` unmaps the range.
        unsafe {
            (partition.lib().map_gpa_range)(
                partition.handle(),
                memory.as_ptr().cast_const().cast(),
                guest_address,
                memory.size(),
                WHV_MAP_GPA_RANGE_FLAGS(flags),
            )
        }
        .ok()
        .map_err(|e| HypervisorError::call("WHvMapGpaRange", e))?;
        self.ram.add(guest_address, memory.clone());
        self.mapped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((guest_address, memory));
        Ok(())
    }

    /// The IOAPIC, the PIC and the PIT with its timer thread (`WhpPlatform`); they reach the
    /// buses through `WhpPlatform::attach`.
    fn create_platform_devices(&self) -> Result<()> {
        let sink: Arc<dyn InterruptSink> = self.interrupts.clone();
        let ioapic = Arc::new(Mutex::new(Ioapic::new(sink)));
        let pic = Arc::new(Mutex::new(Pic::new()));
        let pit_gsi = usize::try_from(arch::acpi::PIT_GSI).unwrap_or(0);
        let irq0 = self.kicking_line(&pic, &ioapic, arch::acpi::PIT_ISA_IRQ, pit_gsi);
        let clock: Arc<dyn PitClock> = Arc::new(HostClock::default());
        let pit = Arc::new(Mutex::new(Pit::new(clock.clone(), irq0)));
        let timer = PitTimer::start(pit.clone(), clock)
            .map_err(|e| HypervisorError::call("starting the PIT timer thread", e))?;
        *self
            .pit_timer
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(timer);
        *self.platform.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(WhpPlatform { ioapic, pic, pit });
        Ok(())
    }

    fn set_msi_routes(&self, routes: &[MsiRoute]) -> Result<()> {
        self.routes.set(routes).map_err(HypervisorError::MsiRoutes)
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
            return Err(HypervisorError::NoBuses { index });
        };
        let wake = usize::try_from(index)
            .ok()
            .and_then(|i| self.interrupts.wakes.get(i))
            .cloned()
            .ok_or(HypervisorError::VcpuIndex {
                index,
                count: self.interrupts.wakes.len(),
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
        // The PIC's output reaches the boot vCPU's LINT0 only.
        let pic = self.platform().filter(|_| index == 0).map(|p| p.pic);
        let io = VcpuIo {
            pio,
            mmio,
            ram: self.ram.clone(),
            eoi,
            pic,
        };
        let vcpu = WhpVcpu::create(
            self.interrupts.partition.clone(),
            index,
            self.cpuid.clone(),
            io,
            wake,
        )?;
        if index == 0 {
            *self
                .boot_kick
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(vcpu.canceller());
        }
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
        self.0.set(routes).map_err(HypervisorError::MsiRoutes)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Requests(Mutex<Vec<InterruptRequest>>);

    impl InterruptSink for Requests {
        fn deliver(&self, request: InterruptRequest) -> std::io::Result<()> {
            self.0.lock().unwrap().push(request);
            Ok(())
        }
    }

    /// The controllers as `create_platform_devices` wires them, without a partition.
    #[test]
    fn the_platform_on_the_buses_routes_the_pits_irq0_through_the_ioapic() {
        let sink = Arc::new(Requests::default());
        let ioapic = Arc::new(Mutex::new(Ioapic::new(sink.clone())));
        let pic = Arc::new(Mutex::new(Pic::new()));
        let gsi = usize::try_from(arch::acpi::PIT_GSI).unwrap();
        let irq0 = Arc::new(IsaIrq::new(pic.clone(), ioapic.clone(), 0, gsi));
        let pit = Arc::new(Mutex::new(Pit::new(
            Arc::new(HostClock::default()),
            irq0.clone(),
        )));
        let platform = WhpPlatform { ioapic, pic, pit };
        let (pio, mmio) = (Bus::new(), Bus::new());
        platform.attach(&pio, &mmio).unwrap();
        // The guest routes the PIT's pin to vector 0x30 through the IOAPIC's MMIO window.
        let base = arch::layout::IOAPIC_START;
        mmio.write(base, &(0x10 + 2 * arch::acpi::PIT_GSI).to_le_bytes());
        mmio.write(base + 0x10, &0x30u32.to_le_bytes());
        // ... and programs channel 0 through the ports: the timer is armed.
        pio.write(0x43, &[0x34]);
        pio.write(0x40, &[0x9c]);
        pio.write(0x40, &[0x2e]);
        assert!(platform.pit.lock().unwrap().next_deadline().is_some());
        irq0.trigger().unwrap();
        let got = sink.0.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].vector, 0x30);
        // The PIC answers on its ports, and the ranges are taken.
        let mut imr = [0u8];
        pio.read(0x21, &mut imr);
        assert_eq!(imr, [0]);
        assert!(pio.check_free(0xa0, 2).is_err());
        assert!(pio.check_free(0x4d0, 2).is_err());
        assert!(
            pio.check_free(0x61, 1).is_ok(),
            "0x61 is left to the caller"
        );
    }
}
