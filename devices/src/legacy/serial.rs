//! COM1: a 16550A UART on port I/O, built on `vm_superio::Serial`.
//!
//! Owns the register model's host side: where guest output goes (written through, one byte per
//! THR write, flushed at once), how host input enters the 64-byte RX FIFO, and how the UART's
//! interrupt reaches the guest (an `EventFd` the VMM registers as a KVM irqfd for GSI 4).
//! Deliberately not here: reading stdin, raw-mode terminals, and any other COM port.

use std::io::{self, Write};

use crate::bus::BusDevice;
use crate::interrupt::InterruptLine;
use crate::persist::Persist;
use thiserror::Error;
use vm_superio::serial::{Error as UartError, NoEvents};
use vm_superio::Trigger;

/// Base I/O port of COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// Number of I/O ports COM1 decodes (`COM1_PORT..COM1_PORT + COM1_PORT_LEN`).
pub const COM1_PORT_LEN: u64 = 8;
/// The ISA IRQ (and GSI) of COM1.
pub const COM1_IRQ: u32 = 4;

/// Errors from feeding host input to the UART.
#[derive(Debug, Error)]
pub enum SerialError {
    /// The bytes were queued, but signalling the guest's interrupt eventfd failed.
    #[error("queued {queued} input bytes but could not raise the serial interrupt")]
    Interrupt {
        /// How many bytes entered the FIFO before the failure; the caller must not resend them.
        queued: usize,
        /// The eventfd write error.
        #[source]
        source: io::Error,
    },
    /// A saved UART state cannot be used.
    #[error("cannot restore the serial port: {0}")]
    Restore(String),
}

/// Raises the UART's interrupt through its line (an eventfd registered as a KVM irqfd on Linux).
#[derive(Debug)]
struct IrqTrigger(Box<dyn InterruptLine>);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// Where guest output goes; `None` discards it (`--serial off`).
struct GuestOutput(Option<Box<dyn Write + Send>>);

impl Write for GuestOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.0 {
            Some(out) => out.write(buf),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.0 {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for GuestOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "GuestOutput(writer)"
        } else {
            "GuestOutput(discard)"
        })
    }
}

/// The COM1 16550A UART.
#[derive(Debug)]
pub struct Serial {
    uart: vm_superio::Serial<IrqTrigger, NoEvents, GuestOutput>,
    /// Guest output bytes the writer refused (e.g. a closed pipe).
    lost_output_bytes: u64,
}

impl Serial {
    /// A UART writing guest output to `output` (`None`: discard it, the guest still sees a
    /// working UART) and raising its interrupt by writing to `interrupt`.
    ///
    /// `output` is written once per byte and flushed after each, so pass an unbuffered or
    /// line-buffered writer such as `std::io::stdout()` or a `File`; a write that blocks
    /// stalls the vCPU that made it.
    pub fn new(
        output: Option<Box<dyn Write + Send>>,
        interrupt: impl InterruptLine + 'static,
    ) -> Self {
        Self {
            uart: vm_superio::Serial::new(IrqTrigger(Box::new(interrupt)), GuestOutput(output)),
            lost_output_bytes: 0,
        }
    }

    /// Queues host input for the guest to read from RBR, raising the RX interrupt if the
    /// guest enabled it. Returns how many leading bytes of `bytes` were taken: fewer than
    /// `bytes.len()` (possibly 0) when the FIFO is full, or while the guest holds the UART
    /// in loopback mode. Keep the rest and retry once [`Self::is_input_ready_for_more`].
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        let space_before = self.uart.fifo_capacity();
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(taken) => Ok(taken),
            Err(UartError::FullFifo) => Ok(0),
            Err(UartError::Trigger(source)) => Err(SerialError::Interrupt {
                queued: space_before - self.uart.fifo_capacity(),
                source,
            }),
            // enqueue_raw_bytes never writes output; if a future version does, the bytes
            // were still queued exactly as in the success case.
            Err(UartError::IOError(_)) => Ok(space_before - self.uart.fifo_capacity()),
        }
    }

    /// Free bytes in the RX FIFO.
    pub fn input_space(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Whether the RX FIFO has room for at least one more host byte. The VMM's input loop
    /// should stop reading the host side while this is false.
    pub fn is_input_ready_for_more(&self) -> bool {
        self.input_space() > 0
    }

    /// How many guest output bytes the writer failed to take so far.
    pub fn lost_output_bytes(&self) -> u64 {
        self.lost_output_bytes
    }
}

impl Persist for Serial {
    type State = SerialState;
    /// Where guest output goes and the line the UART raises, as for `new`.
    type RestoreArgs = (Option<Box<dyn Write + Send>>, Box<dyn InterruptLine>);
    type Error = SerialError;

    /// The UART's registers and RX FIFO, to save in a snapshot.
    fn save(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            rx_fifo: s.in_buffer,
        }
    }

    /// A UART in the saved `state`, writing to `output` and raising `interrupt` as `new` does.
    /// An interrupt the saved UART had pending is raised again at once.
    fn restore(
        (output, interrupt): Self::RestoreArgs,
        state: &SerialState,
    ) -> Result<Self, SerialError> {
        let uart_state = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.rx_fifo.clone(),
        };
        let uart = vm_superio::Serial::from_state(
            &uart_state,
            IrqTrigger(interrupt),
            NoEvents,
            GuestOutput(output),
        )
        .map_err(|e| match e {
            UartError::FullFifo => SerialError::Restore(format!(
                "saved RX FIFO holds {} bytes, more than the UART's 64",
                state.rx_fifo.len()
            )),
            UartError::Trigger(source) => SerialError::Interrupt { queued: 0, source },
            UartError::IOError(source) => SerialError::Restore(source.to_string()),
        })?;
        Ok(Self {
            uart,
            lost_output_bytes: 0,
        })
    }
}

/// The UART's snapshot state (the registers `vm_superio` keeps, and the RX FIFO's bytes).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[allow(missing_docs)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Host input the guest has not read yet.
    pub rx_fifo: Vec<u8>,
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(reg), [byte]) if u64::from(reg) < COM1_PORT_LEN => *byte = self.uart.read(reg),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(reg), &[value]) = (u8::try_from(offset), data) else {
            return;
        };
        if u64::from(reg) >= COM1_PORT_LEN {
            return;
        }
        match self.uart.write(reg, value) {
            Ok(()) => {}
            Err(UartError::IOError(_)) => {
                self.lost_output_bytes = self.lost_output_bytes.saturating_add(1)
            }
            // The guest cannot be told either way; a missed interrupt is recovered by the
            // guest driver's timeout polling.
            Err(UartError::Trigger(_) | UartError::FullFifo) => {}
        }
    }
}

// The tests drive the UART's interrupt through an eventfd (Unix).
#[cfg(test)]
#[cfg(unix)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};

    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    const THR: u64 = 0;
    const RBR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 0x01;
    const LSR_THR_EMPTY: u8 = 0x20;
    const IER_RX: u8 = 0x01;
    const IIR_RX_DATA: u8 = 0x04;
    const MCR_LOOP: u8 = 0x10;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct BrokenPipe;

    impl Write for BrokenPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn serial_with(output: Option<Box<dyn Write + Send>>) -> (Serial, EventFd) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let serial = Serial::new(output, irq.try_clone().unwrap());
        (serial, irq)
    }

    fn read_reg(serial: &mut Serial, offset: u64) -> u8 {
        let mut b = [0u8];
        serial.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn thr_writes_reach_the_writer_immediately() {
        let out = SharedBuf::default();
        let (mut serial, _irq) = serial_with(Some(Box::new(out.clone())));
        for &b in b"ok\n" {
            serial.write(THR, &[b]);
        }
        assert_eq!(*out.0.lock().unwrap(), b"ok\n");
        assert_ne!(
            read_reg(&mut serial, LSR) & LSR_THR_EMPTY,
            0,
            "THR reads as empty again"
        );
        assert_eq!(serial.lost_output_bytes(), 0);
    }

    #[test]
    fn serial_off_discards_output_but_uart_still_works() {
        let (mut serial, _irq) = serial_with(None);
        serial.write(THR, b"x");
        serial.write(7, &[0x5a]); // scratch register
        assert_eq!(read_reg(&mut serial, 7), 0x5a);
        assert_eq!(serial.lost_output_bytes(), 0);
        assert_eq!(serial.enqueue_input(b"in").unwrap(), 2);
        assert_eq!(read_reg(&mut serial, RBR), b'i');
    }

    #[test]
    fn refused_output_is_counted() {
        let (mut serial, _irq) = serial_with(Some(Box::new(BrokenPipe)));
        serial.write(THR, b"a");
        serial.write(THR, b"b");
        assert_eq!(serial.lost_output_bytes(), 2);
    }

    #[test]
    fn input_is_readable_from_rbr_with_data_ready() {
        let (mut serial, irq) = serial_with(None);
        assert_eq!(read_reg(&mut serial, LSR) & LSR_DATA_READY, 0);
        assert_eq!(serial.enqueue_input(b"hi").unwrap(), 2);
        assert_eq!(
            irq.read().map_err(|e| e.kind()),
            Err(io::ErrorKind::WouldBlock),
            "RX irq disabled"
        );
        assert_ne!(read_reg(&mut serial, LSR) & LSR_DATA_READY, 0);
        assert_eq!(read_reg(&mut serial, RBR), b'h');
        assert_ne!(read_reg(&mut serial, LSR) & LSR_DATA_READY, 0);
        assert_eq!(read_reg(&mut serial, RBR), b'i');
        assert_eq!(read_reg(&mut serial, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn rx_interrupt_fires_when_enabled() {
        let (mut serial, irq) = serial_with(None);
        serial.write(IER, &[IER_RX]);
        assert_eq!(serial.enqueue_input(b"k").unwrap(), 1);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(read_reg(&mut serial, IIR) & 0x0f, IIR_RX_DATA);
        assert_eq!(read_reg(&mut serial, RBR), b'k');
    }

    #[test]
    fn enabling_rx_interrupt_with_pending_input_fires_it() {
        let (mut serial, irq) = serial_with(None);
        serial.enqueue_input(b"z").unwrap();
        serial.write(IER, &[IER_RX]);
        assert_eq!(irq.read().unwrap(), 1);
    }

    #[test]
    fn restored_uart_keeps_registers_fifo_and_output() {
        let (mut serial, _irq) = serial_with(None);
        serial.write(LCR, &[0x1b]);
        serial.write(7, &[0x77]);
        serial.enqueue_input(b"xy").unwrap();
        let state = serial.save();
        let out = SharedBuf::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut back =
            Serial::restore((Some(Box::new(out.clone())), Box::new(irq)), &state).unwrap();
        assert_eq!(back.save(), state);
        assert_eq!(read_reg(&mut back, LCR), 0x1b);
        assert_eq!(read_reg(&mut back, 7), 0x77);
        assert_eq!(read_reg(&mut back, RBR), b'x');
        back.write(THR, b"!");
        assert_eq!(*out.0.lock().unwrap(), b"!");
        let too_long = SerialState {
            rx_fifo: vec![0; 65],
            ..state
        };
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let e = Serial::restore((None, Box::new(irq)), &too_long).unwrap_err();
        assert!(e.to_string().contains("65 bytes"), "{e}");
    }

    #[test]
    fn input_respects_fifo_capacity() {
        let (mut serial, _irq) = serial_with(None);
        let space = serial.input_space();
        assert_eq!(space, 64);
        let input: Vec<u8> = (0..100).collect();
        assert_eq!(serial.enqueue_input(&input).unwrap(), space);
        assert!(!serial.is_input_ready_for_more());
        assert_eq!(serial.enqueue_input(&input[space..]).unwrap(), 0);
        assert_eq!(read_reg(&mut serial, RBR), 0);
        assert!(serial.is_input_ready_for_more());
        assert_eq!(serial.enqueue_input(&input[space..]).unwrap(), 1);
        assert_eq!(serial.enqueue_input(&[]).unwrap(), 0);
    }

    #[test]
    fn loopback_mode_takes_no_host_input() {
        let (mut serial, _irq) = serial_with(None);
        serial.write(MCR, &[MCR_LOOP]);
        assert_eq!(serial.enqueue_input(b"abc").unwrap(), 0);
        serial.write(THR, b"L");
        assert_eq!(read_reg(&mut serial, RBR), b'L', "THR loops back to RBR");
    }

    #[test]
    fn wide_and_out_of_range_accesses_are_ignored() {
        let out = SharedBuf::default();
        let (mut serial, _irq) = serial_with(Some(Box::new(out.clone())));
        serial.write(THR, b"ab");
        serial.write(LCR, &[0x80, 0]); // would set DLAB if taken
        serial.write(8, b"c");
        assert!(out.0.lock().unwrap().is_empty());
        assert_eq!(
            read_reg(&mut serial, LCR),
            0x03,
            "LCR keeps its reset value"
        );
        let mut wide = [0u8; 2];
        serial.read(LSR, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        assert_eq!(read_reg(&mut serial, 8), 0xff);
    }
}
