//! The Windows Hypervisor Platform backend.
//!
//! - `library` (Windows): `winhvplatform.dll` and `winhvemulation.dll`, loaded at run time into
//!   typed function pointers, and the check that the platform is present and enabled.
//! - `cpuid`: the partition's CPUID result and exit lists from skiff's per-vCPU tables, and the
//!   answers to CPUID exits (platform-neutral, unit-tested on Linux).
//! - `exit`: WHP exits in neutral form, decoded into the seam's `VcpuExit` for the shared run
//!   loop, and the register write-back that finishes `in`/`out` and CPUID exits.
//! - `exit_context` (Windows): `WHV_RUN_VP_EXIT_CONTEXT` decoded into the neutral form.
//! - `interrupt`: interrupt requests (MSI, IOAPIC) as `WHvRequestInterrupt` controls.
//! - `registers`: the neutral register types as WHP register names and values.
//! - `partition` (Windows): partition set-up, guest RAM as mapped GPA ranges, interrupts.
//! - `emulation`: what the instruction emulator's port and memory callbacks do (neutral);
//!   `emulator` (Windows): the emulator and its `extern "system"` callbacks.
//! - `halt`: a halted vCPU's bounded wait for an interrupt.
//! - `ext_int`: when and how the PIC's interrupts are injected (neutral).
//! - `host_cpuid`: the host's CPUID leaves, the starting point of the partition's CPUID.
//! - `msi_routes`: the GSI-to-MSI table.
//! - `vcpu` (Windows): `WhpVcpu`, the seam's `Vcpu`, and `VcpuCanceller`.
//! - `vm` (Windows): `WhpHypervisor` and `WhpVm`, the seam's `Hypervisor` and `Vm`, and the
//!   user-space IOAPIC, PIC and PIT (`WhpPlatform`).
//!
//! What this backend does not have yet (skiff.exe running a VM on it, snapshots) is listed in
//! docs/windows.md.

pub mod cpuid;
pub mod emulation;
#[cfg(windows)]
pub mod emulator;
pub mod exit;
#[cfg(windows)]
pub mod exit_context;
pub mod ext_int;
pub mod halt;
pub mod host_cpuid;
pub mod interrupt;
#[cfg(windows)]
pub mod library;
pub mod msi_routes;
#[cfg(windows)]
pub mod partition;
pub mod registers;
#[cfg(windows)]
pub mod vcpu;
#[cfg(windows)]
pub mod vm;

#[cfg(windows)]
pub use library::{WhpLibrary, WhpLoadError};
#[cfg(windows)]
pub use vm::{WhpHypervisor, WhpPlatform, WhpVm};
