//! The exit decoder on its own, and the shared run loop (`vcpu::run_vcpu`) dispatching WHP
//! exits from a fake exit source to real buses.

use super::*;
use arch::regs::CpuidEntry;

fn plan() -> CpuidPlan {
    let entry = |function, ebx| CpuidEntry {
        function,
        index: 0,
        significant_index: false,
        eax: 0x11,
        ebx,
        ecx: 0x33,
        edx: 0x44,
    };
    // Leaf 1 differs per vCPU (APIC ID), so it exits.
    CpuidPlan::new(vec![vec![entry(1, 0)], vec![entry(1, 1 << 24)]])
}

fn port_access(port: u16, size: u8, write: bool, rep: bool, rax: u64) -> RawExit {
    RawExit::PortAccess {
        port,
        size,
        write,
        string: false,
        rep,
        rax,
        rip: 0x1000,
        instruction_length: 2,
    }
}

fn out(port: u16, size: u8, rax: u64) -> RawExit {
    port_access(port, size, true, false, rax)
}

fn inb(port: u16, size: u8, rax: u64) -> RawExit {
    port_access(port, size, false, false, rax)
}

#[test]
fn an_out_carries_the_low_bytes_of_rax_and_steps_past_the_instruction() {
    let mut d = ExitDecoder::new(0);
    match d.decode(out(0x3f8, 2, 0xdead_beef_1234_5678), &plan()) {
        VcpuExit::IoOut { port, data } => assert_eq!((port, data), (0x3f8, &[0x78, 0x56][..])),
        other => panic!("{other:?}"),
    }
    assert_eq!(d.take_completion(), Some(Completion::Rip(0x1002)));
    assert_eq!(d.take_completion(), None);
}

#[test]
fn an_in_merges_into_rax_as_the_cpu_does() {
    let rax = 0xffff_ffff_ffff_ffff;
    for (size, expected) in [
        (1, 0xffff_ffff_ffff_ff5a),
        (2, 0xffff_ffff_ffff_a55a),
        (4, 0x0000_0000_3ca5_a55a),
    ] {
        let mut d = ExitDecoder::new(0);
        match d.decode(inb(0x60, size, rax), &plan()) {
            VcpuExit::IoIn { port, data } => {
                assert_eq!((port, data.len()), (0x60, usize::from(size)));
                data.copy_from_slice(&[0x5a, 0xa5, 0xa5, 0x3c][..usize::from(size)]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            d.take_completion(),
            Some(Completion::RaxRip {
                rax: expected,
                rip: 0x1002
            }),
            "size {size}"
        );
    }
}

#[test]
fn cpuid_exits_are_answered_per_vcpu_or_with_whps_default() {
    let mut d = ExitDecoder::new(1);
    let cpuid = |leaf| RawExit::Cpuid {
        leaf,
        subleaf: 0,
        default: [1, 2, 3, 4],
        rip: 0x2000,
        instruction_length: 2,
    };
    assert!(matches!(d.decode(cpuid(1), &plan()), VcpuExit::Interrupted));
    assert_eq!(
        d.take_completion(),
        Some(Completion::Cpuid {
            regs: [0x11, 1 << 24, 0x33, 0x44],
            rip: 0x2002
        })
    );
    d.decode(cpuid(0x8000_0000), &plan());
    assert_eq!(
        d.take_completion(),
        Some(Completion::Cpuid {
            regs: [1, 2, 3, 4],
            rip: 0x2002
        })
    );
}

#[test]
fn other_exits_map_to_the_seams_exits() {
    let mut d = ExitDecoder::new(0);
    let p = plan();
    assert!(matches!(d.decode(RawExit::Halt, &p), VcpuExit::Halt));
    assert!(matches!(
        d.decode(RawExit::Canceled, &p),
        VcpuExit::Interrupted
    ));
    assert!(matches!(
        d.decode(RawExit::InterruptWindow, &p),
        VcpuExit::Interrupted
    ));
    assert!(matches!(
        d.decode(RawExit::ApicEoi { vector: 0x30 }, &p),
        VcpuExit::Interrupted
    ));
    assert!(matches!(
        d.decode(RawExit::UnrecoverableException, &p),
        VcpuExit::Shutdown
    ));
    assert!(matches!(
        d.decode(RawExit::InvalidRegisterValue, &p),
        VcpuExit::InternalError
    ));
    let rep = port_access(0x3f8, 1, true, true, 0);
    assert!(matches!(d.decode(rep, &p), VcpuExit::Unhandled(t) if t.contains("emulator")));
    assert!(matches!(
        d.decode(out(0x80, 3, 0), &p),
        VcpuExit::Unhandled(_)
    ));
    assert!(matches!(
        d.decode(RawExit::MemoryAccess { gpa: 0xfec0_0000 }, &p),
        VcpuExit::Unhandled(t) if t.contains("0xfec00000")
    ));
    assert!(matches!(
        d.decode(RawExit::Other(0x99), &p),
        VcpuExit::Unhandled(_)
    ));
    // None of those leaves anything to write back.
    assert_eq!(d.take_completion(), None);
}

#[test]
fn the_vcpu_keeps_emulation_eois_windows_and_halts_and_decodes_the_rest() {
    let string = RawExit::PortAccess {
        port: 0x3f8,
        size: 1,
        write: true,
        string: true,
        rep: false,
        rax: 0,
        rip: 0x1000,
        instruction_length: 1,
    };
    for (raw, step) in [
        (string, VcpuStep::EmulateIo),
        (port_access(0x3f8, 1, true, true, 0), VcpuStep::EmulateIo),
        (
            RawExit::MemoryAccess { gpa: 0xfec0_0000 },
            VcpuStep::EmulateMmio(0xfec0_0000),
        ),
        (RawExit::InterruptWindow, VcpuStep::InterruptWindow),
        (RawExit::ApicEoi { vector: 0x31 }, VcpuStep::Eoi(0x31)),
        (RawExit::Halt, VcpuStep::Halt),
        (RawExit::InvalidRegisterValue, VcpuStep::InvalidState),
        (out(0x3f8, 1, 0x41), VcpuStep::Decode),
        (inb(0x60, 1, 0), VcpuStep::Decode),
        (RawExit::Canceled, VcpuStep::Decode),
        (RawExit::UnrecoverableException, VcpuStep::Decode),
        (RawExit::Other(0x1000), VcpuStep::Decode),
    ] {
        assert_eq!(VcpuStep::of(&raw), step, "{raw:?}");
    }
}

#[cfg(target_os = "linux")]
mod dispatch {
    //! `vcpu::run_vcpu` with a fake WHP vCPU: a script of raw exits, decoded by `ExitDecoder`,
    //! completions checked against the registers the guest would see.

    use std::sync::{Arc, Mutex};

    use arch::regs::{MsrEntry, SpecialRegisters, StandardRegisters};
    use devices::bus::{Bus, BusDevice};
    use devices::legacy::debug_exit::{DebugExit, DEBUG_EXIT_PORT, DEBUG_EXIT_PORT_LEN};
    use devices::vm_exit::{GuestEnd, VmExitSignal};

    use super::*;
    use crate::hypervisor::state::{SkippedState, VcpuState};
    use crate::hypervisor::{HypervisorError, Result, Vcpu, VcpuSnapshot};
    use crate::vcpu::{run_vcpu, VcpuContext, VcpuControl};

    #[derive(Debug)]
    struct ScriptedWhpVcpu {
        script: std::vec::IntoIter<RawExit>,
        decoder: ExitDecoder,
        plan: CpuidPlan,
        completions: Arc<Mutex<Vec<Completion>>>,
    }

    impl Vcpu for ScriptedWhpVcpu {
        fn run(&mut self) -> Result<VcpuExit<'_>> {
            if let Some(c) = self.decoder.take_completion() {
                self.completions.lock().unwrap().push(c);
            }
            let raw = self
                .script
                .next()
                .unwrap_or(RawExit::UnrecoverableException);
            Ok(self.decoder.decode(raw, &self.plan))
        }
        fn regs(&self) -> Result<StandardRegisters> {
            Ok(StandardRegisters::default())
        }
        fn set_regs(&self, _: &StandardRegisters) -> Result<()> {
            Ok(())
        }
        fn sregs(&self) -> Result<SpecialRegisters> {
            Err(HypervisorError::MissingCapability("sregs in a fake"))
        }
        fn set_sregs(&self, _: &SpecialRegisters) -> Result<()> {
            Ok(())
        }
        fn set_cpuid(&self, _: &[CpuidEntry]) -> Result<()> {
            Ok(())
        }
        fn set_msrs(&self, _: &[MsrEntry]) -> Result<()> {
            Ok(())
        }
        fn reset_fpu(&self) -> Result<()> {
            Ok(())
        }
        fn internal_error_info(&mut self) -> (u32, String) {
            (0, "fake".into())
        }
        fn setup_lapic_lint(&self) -> Result<()> {
            Ok(())
        }
    }

    impl VcpuSnapshot for ScriptedWhpVcpu {
        fn save_state(&self) -> Result<(VcpuState, SkippedState)> {
            Err(HypervisorError::MissingCapability("snapshots in a fake"))
        }
        fn restore_state(&self, _: &VcpuState) -> Result<()> {
            Ok(())
        }
    }

    /// A port device that records writes and answers reads with 0x42.
    #[derive(Debug, Default)]
    struct Port(Vec<u8>);

    impl BusDevice for Port {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(0x42);
        }
        fn write(&mut self, _: u64, data: &[u8]) {
            self.0.extend_from_slice(data);
        }
    }

    #[test]
    fn the_shared_run_loop_dispatches_whp_exits_to_the_buses() {
        let exit = VmExitSignal::new().unwrap();
        let pio = Arc::new(Bus::new());
        let port = Arc::new(Mutex::new(Port::default()));
        pio.insert(port.clone(), 0x3f8, 8).unwrap();
        pio.insert(
            Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
            DEBUG_EXIT_PORT,
            DEBUG_EXIT_PORT_LEN,
        )
        .unwrap();
        let completions = Arc::new(Mutex::new(Vec::new()));
        let script = vec![
            out(0x3f8, 1, u64::from(b'h')),
            out(0x3f8, 1, u64::from(b'i')),
            inb(0x3fd, 1, 0x1100),
            RawExit::Cpuid {
                leaf: 1,
                subleaf: 0,
                default: [0; 4],
                rip: 0x3000,
                instruction_length: 2,
            },
            RawExit::Canceled,
            out(DEBUG_EXIT_PORT as u16, 1, 7),
        ];
        let vcpu = ScriptedWhpVcpu {
            script: script.into_iter(),
            decoder: ExitDecoder::new(1),
            plan: plan(),
            completions: completions.clone(),
        };
        let report = run_vcpu(VcpuContext {
            index: 1,
            vcpu: Box::new(vcpu),
            pio,
            mmio: Arc::new(Bus::new()),
            exit: exit.clone(),
            control: Arc::new(VcpuControl::new(1)),
        });
        assert_eq!(report, None);
        assert_eq!(exit.reason(), Some(GuestEnd::DebugExit(7)));
        assert_eq!(port.lock().unwrap().0, b"hi");
        assert_eq!(
            *completions.lock().unwrap(),
            vec![
                Completion::Rip(0x1002),
                Completion::Rip(0x1002),
                Completion::RaxRip {
                    rax: 0x1142,
                    rip: 0x1002
                },
                Completion::Cpuid {
                    regs: [0x11, 1 << 24, 0x33, 0x44],
                    rip: 0x3002
                },
            ]
        );
    }

    #[test]
    fn a_triple_fault_ends_the_vm_with_a_report() {
        let exit = VmExitSignal::new().unwrap();
        let vcpu = ScriptedWhpVcpu {
            script: vec![RawExit::UnrecoverableException].into_iter(),
            decoder: ExitDecoder::new(0),
            plan: plan(),
            completions: Arc::default(),
        };
        let report = run_vcpu(VcpuContext {
            index: 0,
            vcpu: Box::new(vcpu),
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
            exit: exit.clone(),
            control: Arc::new(VcpuControl::new(0)),
        });
        assert_eq!(exit.reason(), Some(GuestEnd::TripleFault { vcpu: 0 }));
        assert!(report.unwrap().contains("triple-faulted"));
    }
}
