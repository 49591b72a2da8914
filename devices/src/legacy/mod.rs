//! Legacy PC devices on port I/O: the COM1 16550A UART, the i8042 controller (for its reset
//! line), the ACPI power-management registers (poweroff, reset), and the debug-exit port test
//! guests use to report a result.
//!
//! Each file owns one device and its port constants; wiring them to buses, irqfds and the
//! host terminal is the VMM's job.

pub mod acpi_pm;
pub mod debug_exit;
pub mod i8042;
pub mod serial;
