//! x86_64 facts as data and pure functions for skiff.
//!
//! This crate owns the guest physical memory map, the e820 table, the PVH and Linux 64-bit boot
//! protocol structures, the boot CPU state (GDT, page tables, control registers), CPUID and MSR
//! set-up and the ACPI tables. It makes no hypervisor calls: every function here either returns
//! plain data or writes into guest memory through `vm-memory`, so it is unit-testable without KVM.

pub mod acpi;
pub mod cpuid;
pub mod e820;
pub mod gdt;
pub mod layout;
pub mod linux_boot;
pub mod msr;
pub mod pvh;
pub mod regs;
