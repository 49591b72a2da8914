//! `skiff run` on Windows: the VM built on section-backed RAM and the Windows Hypervisor
//! Platform, run on vCPU threads until it ends.
//!
//! - `args`: the `skiff run` options Windows supports, parsed and validated into a
//!   `WindowsVmConfig` (platform-neutral).
//! - `boot`: the kernel, initrd, command line and boot structures written into guest memory
//!   through vm-memory, without linux-loader (platform-neutral).
//! - `serial_input`: host input moved into COM1's RX FIFO by a thread (platform-neutral).
//! - `wait`: the vCPU threads and the wait for the VM's end: the first vCPU to leave its run
//!   loop, or the timeout, ends the VM and every other vCPU is kicked out of its run
//!   (platform-neutral; `VcpuKick` is `WHvCancelRunVirtualProcessor` on Windows).
//! - `build` (Windows): section RAM, the guest loaded into its views, then the WHP partition,
//!   the GPA mappings, the legacy and platform devices on the buses, and the vCPUs.
//! - `run` (Windows): the `skiff run` command: parse, build, run, and the exit status.
//!
//! The platform-neutral modules build on Linux too, where they are tested (tests/ compares
//! the loader with the Linux path on the project's real kernel images).
//!
//! Linux's event loop (epoll, eventfds, signalfd) does not exist here: the main thread waits on
//! a channel the vCPU threads report to, with the timeout as its deadline.

pub mod args;
pub mod boot;
pub mod serial_input;
pub mod wait;

#[cfg(windows)]
pub mod build;
#[cfg(windows)]
pub mod run;
