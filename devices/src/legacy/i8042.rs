//! A minimal i8042 PS/2 controller at ports 0x60-0x64, mainly so the guest can reset the machine.
//!
//! Registered as one device at `I8042_PORT` (0x60) covering 5 ports: 0x60 is the data port,
//! 0x64 the status (read) / command (write) port, 0x61 is the PC's system control port B, kept
//! as a plain latch, and 0x62-0x63 read as 0xff. The controller answers the commands Linux's
//! i8042 driver sends while probing, so the probe finishes without waiting on timeouts:
//! reading and writing the controller configuration byte, self tests, and the AUX port checks
//! (answered so that Linux concludes no mouse port exists). Command 0xFE (pulse the CPU reset
//! line) ends the guest with `GuestEnd::Reset`.
//!
//! Deliberately not here: a keyboard or mouse behind the controller (bytes sent to them are
//! dropped), IRQ 1/12, and PIT channel 2's output on bit 5 of port 0x61 (KVM's in-kernel PIT
//! serves 0x61 when the VMM creates one).

use std::collections::VecDeque;
use std::convert::Infallible;

use crate::bus::BusDevice;
use crate::persist::Persist;
use crate::vm_exit::{GuestEnd, VmExitSignal};

/// Base I/O port of the controller (its data port).
pub const I8042_PORT: u64 = 0x60;
/// Number of ports the device covers, `0x60..=0x64`.
pub const I8042_PORT_LEN: u64 = 5;

// Offsets from `I8042_PORT`.
const DATA: u64 = 0;
const PORT_B: u64 = 1;
const STATUS_COMMAND: u64 = 4;

// Status register: the output buffer holds a byte for the CPU.
const STATUS_OUTPUT_FULL: u8 = 0x01;

// Controller configuration byte ("command byte", CCB) bits.
const CCB_KBD_INT: u8 = 0x01;
const CCB_SYSTEM_FLAG: u8 = 0x04;
const CCB_KBD_DISABLED: u8 = 0x10;
const CCB_AUX_DISABLED: u8 = 0x20;
const CCB_TRANSLATE: u8 = 0x40;
// What firmware would leave: keyboard interrupt on, scancode translation on, POST passed, and
// the (absent) mouse port disabled.
const CCB_DEFAULT: u8 = CCB_KBD_INT | CCB_SYSTEM_FLAG | CCB_AUX_DISABLED | CCB_TRANSLATE;

// Controller commands (written to 0x64).
const CMD_READ_CCB: u8 = 0x20;
const CMD_WRITE_CCB: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_BUFFER: u8 = 0xd2;
const CMD_WRITE_AUX_BUFFER: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

// Command responses.
const SELF_TEST_PASSED: u8 = 0x55;
const PORT_TEST_PASSED: u8 = 0x00;
// "Clock line stuck low": tells the guest there is no usable AUX (mouse) port.
const PORT_TEST_CLOCK_STUCK_LOW: u8 = 0x01;

// Output port: bit 0 high = CPU not held in reset, bit 1 = A20 gate enabled.
const OUTPUT_PORT_DEFAULT: u8 = 0x03;

// Bytes the output buffer holds at most; a real controller holds one, Linux flushes up to 16.
const OUTPUT_BUFFER_MAX: usize = 16;

/// The i8042 PS/2 controller.
#[derive(Debug)]
pub struct I8042 {
    exit: VmExitSignal,
    ccb: u8,
    output_port: u8,
    /// The command whose parameter byte the next data-port write is.
    pending_command: Option<u8>,
    /// Bytes waiting for the CPU on the data port; non-empty means the status OBF bit is set.
    output: VecDeque<u8>,
    /// The byte the data port last returned; reading an empty buffer repeats it.
    last_output: u8,
    port_b: u8,
}

impl I8042 {
    /// A controller that reports the guest's reset requests to `exit`.
    pub fn new(exit: VmExitSignal) -> Self {
        Self {
            exit,
            ccb: CCB_DEFAULT,
            output_port: OUTPUT_PORT_DEFAULT,
            pending_command: None,
            output: VecDeque::new(),
            last_output: 0,
            port_b: 0,
        }
    }

    fn status(&self) -> u8 {
        if self.output.is_empty() {
            0
        } else {
            STATUS_OUTPUT_FULL
        }
    }

    fn push_output(&mut self, byte: u8) {
        if self.output.len() < OUTPUT_BUFFER_MAX {
            self.output.push_back(byte);
        }
    }

    fn read_data(&mut self) -> u8 {
        if let Some(byte) = self.output.pop_front() {
            self.last_output = byte;
        }
        self.last_output
    }

    fn write_command(&mut self, command: u8) {
        // A new command abandons a half-finished one and any unread response, so a stale
        // byte never answers the next command.
        self.pending_command = None;
        self.output.clear();
        match command {
            CMD_READ_CCB => self.push_output(self.ccb),
            CMD_WRITE_CCB
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KBD_BUFFER
            | CMD_WRITE_AUX_BUFFER
            | CMD_WRITE_AUX => self.pending_command = Some(command),
            CMD_AUX_DISABLE => self.ccb |= CCB_AUX_DISABLED,
            CMD_AUX_ENABLE => self.ccb &= !CCB_AUX_DISABLED,
            CMD_AUX_TEST => self.push_output(PORT_TEST_CLOCK_STUCK_LOW),
            CMD_SELF_TEST => self.push_output(SELF_TEST_PASSED),
            CMD_KBD_TEST => self.push_output(PORT_TEST_PASSED),
            CMD_KBD_DISABLE => self.ccb |= CCB_KBD_DISABLED,
            CMD_KBD_ENABLE => self.ccb &= !CCB_KBD_DISABLED,
            CMD_READ_OUTPUT_PORT => self.push_output(self.output_port),
            CMD_RESET_CPU => self.exit.request(GuestEnd::Reset),
            _ => {}
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.pending_command.take() {
            Some(CMD_WRITE_CCB) => self.ccb = value,
            Some(CMD_WRITE_OUTPUT_PORT) => self.output_port = value,
            // Both echo the byte as if the device had sent it. The AUX echo comes back marked
            // as keyboard data (status bit 5 clear), which Linux's loopback test reads as "no
            // AUX port" at once instead of timing out.
            Some(CMD_WRITE_KBD_BUFFER | CMD_WRITE_AUX_BUFFER) => self.push_output(value),
            // To the mouse, or (no command pending) to the keyboard: neither exists.
            _ => {}
        }
    }
}

/// The controller's snapshot state: everything but the VM-end signal it reports resets to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    /// Controller configuration byte.
    pub ccb: u8,
    /// Output port.
    pub output_port: u8,
    /// The command waiting for its parameter byte.
    pub pending_command: Option<u8>,
    /// Bytes waiting on the data port (at most 16 are restored).
    pub output: Vec<u8>,
    /// The byte the data port last returned.
    pub last_output: u8,
    /// System control port B latch.
    pub port_b: u8,
}

impl Persist for I8042 {
    type State = I8042State;
    /// Where the guest's reset requests go.
    type RestoreArgs = VmExitSignal;
    type Error = Infallible;

    /// The state to save in a snapshot.
    fn save(&self) -> I8042State {
        I8042State {
            ccb: self.ccb,
            output_port: self.output_port,
            pending_command: self.pending_command,
            output: self.output.iter().copied().collect(),
            last_output: self.last_output,
            port_b: self.port_b,
        }
    }

    /// A controller in the saved `state`, reporting resets to `exit`. An over-long output
    /// buffer (from a corrupt snapshot) is cut to the controller's capacity.
    fn restore(exit: VmExitSignal, state: &I8042State) -> Result<Self, Infallible> {
        Ok(Self {
            exit,
            ccb: state.ccb,
            output_port: state.output_port,
            pending_command: state.pending_command,
            output: state
                .output
                .iter()
                .copied()
                .take(OUTPUT_BUFFER_MAX)
                .collect(),
            last_output: state.last_output,
            port_b: state.port_b,
        })
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let [byte] = data else {
            data.fill(0xff);
            return;
        };
        *byte = match offset {
            DATA => self.read_data(),
            PORT_B => self.port_b,
            STATUS_COMMAND => self.status(),
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let &[value] = data else {
            return;
        };
        match offset {
            DATA => self.write_data(value),
            PORT_B => self.port_b = value,
            STATUS_COMMAND => self.write_command(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn controller() -> (I8042, VmExitSignal) {
        let exit = VmExitSignal::new().unwrap();
        (I8042::new(exit.clone()), exit)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    /// Sends `command`, then its parameter bytes; returns what the data port then holds.
    fn command(dev: &mut I8042, command: u8, params: &[u8]) -> Vec<u8> {
        dev.write(STATUS_COMMAND, &[command]);
        for &p in params {
            dev.write(DATA, &[p]);
        }
        let mut out = Vec::new();
        while read(dev, STATUS_COMMAND) & STATUS_OUTPUT_FULL != 0 {
            out.push(read(dev, DATA));
        }
        out
    }

    #[test]
    fn reset_command_requests_reset() {
        let (mut dev, exit) = controller();
        dev.write(STATUS_COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(GuestEnd::Reset));
    }

    #[test]
    fn other_commands_and_data_do_not_reset() {
        let (mut dev, exit) = controller();
        dev.write(STATUS_COMMAND, &[0xff]);
        dev.write(DATA, &[CMD_RESET_CPU]);
        dev.write(STATUS_COMMAND, &[CMD_RESET_CPU, 0]); // 2-byte access: ignored
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn idle_status_is_zero() {
        let (mut dev, _) = controller();
        assert_eq!(read(&mut dev, STATUS_COMMAND), 0);
    }

    #[test]
    fn ccb_reads_back_through_the_data_port() {
        let (mut dev, _) = controller();
        assert_eq!(command(&mut dev, CMD_READ_CCB, &[]), [CCB_DEFAULT]);
        assert_eq!(
            read(&mut dev, STATUS_COMMAND),
            0,
            "status clears once the byte is read"
        );
        assert_eq!(command(&mut dev, CMD_WRITE_CCB, &[0x30]), []);
        assert_eq!(command(&mut dev, CMD_READ_CCB, &[]), [0x30]);
        command(&mut dev, CMD_KBD_ENABLE, &[]);
        command(&mut dev, CMD_AUX_ENABLE, &[]);
        assert_eq!(command(&mut dev, CMD_READ_CCB, &[]), [0x00]);
    }

    #[test]
    fn restored_controller_continues_where_the_saved_one_was() {
        let (mut dev, exit) = controller();
        command(&mut dev, CMD_WRITE_CCB, &[0x30]);
        dev.write(PORT_B, &[0x02]);
        dev.write(STATUS_COMMAND, &[CMD_READ_CCB]);
        let state = dev.save();
        let Ok(mut back) = I8042::restore(exit.clone(), &state);
        assert_eq!(back.save(), state);
        assert_eq!(read(&mut back, STATUS_COMMAND), STATUS_OUTPUT_FULL);
        assert_eq!(read(&mut back, DATA), 0x30, "the unread response survives");
        assert_eq!(read(&mut back, PORT_B), 0x02);
        let huge = I8042State {
            output: vec![1; 1000],
            ..state
        };
        let Ok(cut) = I8042::restore(exit, &huge);
        assert_eq!(cut.save().output.len(), OUTPUT_BUFFER_MAX);
    }

    #[test]
    fn answers_linux_probe_commands() {
        let (mut dev, _) = controller();
        assert_eq!(command(&mut dev, CMD_SELF_TEST, &[]), [SELF_TEST_PASSED]);
        assert_eq!(command(&mut dev, CMD_KBD_TEST, &[]), [PORT_TEST_PASSED]);
        assert_eq!(
            command(&mut dev, CMD_READ_OUTPUT_PORT, &[]),
            [OUTPUT_PORT_DEFAULT]
        );
        // AUX loopback: echoed, but not flagged as AUX data (status bit 5).
        dev.write(STATUS_COMMAND, &[CMD_WRITE_AUX_BUFFER]);
        dev.write(DATA, &[0x5a]);
        assert_eq!(read(&mut dev, STATUS_COMMAND), STATUS_OUTPUT_FULL);
        // The next command drops the unread echo and answers for itself.
        assert_eq!(
            command(&mut dev, CMD_AUX_TEST, &[]),
            [PORT_TEST_CLOCK_STUCK_LOW]
        );
    }

    #[test]
    fn data_port_repeats_last_byte_when_empty() {
        let (mut dev, _) = controller();
        assert_eq!(command(&mut dev, CMD_WRITE_KBD_BUFFER, &[0x1c]), [0x1c]);
        assert_eq!(read(&mut dev, DATA), 0x1c);
    }

    #[test]
    fn port_b_is_a_latch_and_unused_ports_read_ff() {
        let (mut dev, _) = controller();
        dev.write(PORT_B, &[0x03]);
        assert_eq!(read(&mut dev, PORT_B), 0x03);
        dev.write(2, &[0x12]);
        assert_eq!(read(&mut dev, 2), 0xff);
        assert_eq!(read(&mut dev, 3), 0xff);
        let mut wide = [0u8; 2];
        dev.read(DATA, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }
}
