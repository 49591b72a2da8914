//! The skiff virtual machine monitor.
//!
//! - `memory`: guest RAM as `ShareableRegion`s (backing files, validation, mapping).
//! - `hypervisor`: the seam to the hypervisor: KVM on Linux, the Windows Hypervisor Platform.
//! - `config`: the typed, validated VM configuration parsed from the command line.
//! - `boot`: loading the kernel, initrd and command line, and the boot CPU state.
//! - `boot_state`: the boot protocol, the boot vCPU's state and the initrd's place, shared by
//!   both boot paths.
//! - `builder`: builds a VM in named steps (memory, VM, boot, devices, vCPUs).
//! - `vcpu`: the per-vCPU run loop that dispatches exits to the device buses.
//! - `guest_output`: bounded buffers and writer threads between guest output and host sinks.
//! - `event_loop`: the event-loop subscribers (VM end, serial input, stop signals).
//! - `pci_devices`: the PCI segment: host bridge, config access, virtio devices on PCI.
//! - `runner`: runs a built VM to its end: vCPU threads, event loop, timeout, outcome.
//! - `running_vm`: a VM with live vCPU threads: pause, resume, status, snapshot.
//! - `sandbox`: per-thread seccomp filters, no_new_privs, dropped capabilities, closed inherited
//!   descriptors, and `--sandbox` (Landlock).
//! - `snapshot`: snapshot directories: manifest, state file, sparse memory files, restore.
//! - `cli`: the command line: every subcommand's arguments and `--help` examples.
//! - `commands`: the `skiff restore`, `snapshot-*` and `skiff ctl` subcommands.
//! - `api`: the control API (HTTP + JSON on a Unix socket) and its `skiff ctl` client.
//! - `exec`: `skiff exec`: boot with the guest agent, run one command, return its status.
//! - `kernel_image`: loading an ELF or bzImage kernel into any vm-memory guest memory without
//!   linux-loader (the Windows path; checked against linux-loader in tests).
//! - `windows_vm`: `skiff run` on Windows: the VM built on section RAM and the Windows
//!   Hypervisor Platform, its vCPU threads, and the wait for its end.
//! - `test_runner`: `skiff test`: a TOML suite of cases run in VMs, cold or forked from a
//!   snapshot, and the runner as a library (`test_runner::test_vm`).
//! - `host_file`: opening command-line files without blocking, with their type checked.
//! - `exit_code`: the process exit codes skiff documents, their reasons and verdict lines.
//! - `exit_status_file`: `--exit-status-file`, the verdict as JSON written atomically.
//! - `teardown`: ends skiff without waiting for the kernel's VM teardown.
//! - `terminal`: raw mode for the host terminal.
//! - `vhost_user_blk`: the `skiff vhost-user-blk` subcommand (skiff's own vhost-user backend).
//! - `virtio_devices`: the VM's virtio devices as one list of their own states, which a fresh
//!   start and a restore both build from.

pub mod hypervisor;
pub mod memory;

#[cfg(target_os = "linux")]
pub mod api;
#[cfg(target_os = "linux")]
pub mod boot;
pub mod boot_state;
#[cfg(target_os = "linux")]
pub mod builder;
#[cfg(target_os = "linux")]
pub mod cli;
#[cfg(target_os = "linux")]
pub mod commands;
pub mod config;
#[cfg(target_os = "linux")]
pub mod event_loop;
#[cfg(target_os = "linux")]
pub mod exec;
pub mod exit_code;
#[cfg(target_os = "linux")]
pub mod exit_status_file;
#[cfg(target_os = "linux")]
pub mod guest_output;
#[cfg(target_os = "linux")]
pub mod host_file;
pub mod kernel_image;
#[cfg(target_os = "linux")]
pub mod pci_devices;
#[cfg(target_os = "linux")]
pub mod runner;
#[cfg(target_os = "linux")]
pub mod running_vm;
#[cfg(target_os = "linux")]
pub mod sandbox;
#[cfg(target_os = "linux")]
pub mod snapshot;
#[cfg(target_os = "linux")]
pub mod teardown;
#[cfg(target_os = "linux")]
pub mod terminal;
#[cfg(target_os = "linux")]
pub mod test_runner;
#[cfg(any(target_os = "linux", windows))]
pub mod vcpu;
#[cfg(target_os = "linux")]
pub mod vhost_user_blk;
#[cfg(target_os = "linux")]
pub mod virtio_devices;
pub mod windows_vm;

/// Formats an error and its `source()` chain on one line: `outer: inner: root` (one helper for
/// every crate: `devices` owns it).
pub use devices::error_chain;
