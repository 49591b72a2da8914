//! Host input for COM1 without an event loop: a thread reads the host side (stdin when it is a
//! console) and moves the bytes into the UART's RX FIFO as the guest makes room, waiting
//! `RETRY` between tries while the FIFO is full. It stops reading at end of input, on a read
//! error, or once the VM has ended. A read blocks, so the thread is left behind when the VM
//! ends during one; it holds nothing the VM's teardown needs but its share of the UART.
//!
//! Platform-neutral; tested on Linux.

use std::io::{self, Read};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use devices::legacy::serial::Serial;
use devices::vm_exit::VmExitSignal;

/// How long the thread waits for the guest to drain a full RX FIFO before trying again.
const RETRY: Duration = Duration::from_millis(1);

/// Feeds `input` to `serial` until the input ends or `exit` is requested.
pub fn feed_serial(mut input: impl Read, serial: &Mutex<Serial>, exit: &VmExitSignal) {
    let mut buf = [0u8; 256];
    while !exit.is_requested() {
        let n = match input.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("serial input: {e}");
                return;
            }
        };
        let mut pending = &buf[..n];
        while !pending.is_empty() && !exit.is_requested() {
            let taken = serial
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .enqueue_input(pending);
            match taken {
                Ok(0) => std::thread::sleep(RETRY),
                Ok(taken) => pending = &pending[taken..],
                Err(e) => {
                    log::warn!("serial input: {e}");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::bus::BusDevice;
    use devices::interrupt::InterruptLine;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[derive(Debug, Default)]
    struct Count(Arc<AtomicUsize>);

    impl InterruptLine for Count {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// Reads the guest side of the UART: RBR while LSR says data is ready.
    fn drain(serial: &Mutex<Serial>) -> Vec<u8> {
        let mut got = Vec::new();
        let mut serial = serial.lock().unwrap();
        loop {
            let mut lsr = [0u8];
            serial.read(5, &mut lsr);
            if lsr[0] & 1 == 0 {
                return got;
            }
            let mut rbr = [0u8];
            serial.read(0, &mut rbr);
            got.push(rbr[0]);
        }
    }

    #[test]
    fn input_longer_than_the_fifo_reaches_the_guest_as_it_reads() {
        let raised = Arc::new(AtomicUsize::new(0));
        let serial = Arc::new(Mutex::new(Serial::new(None, Count(raised.clone()))));
        serial.lock().unwrap().write(1, &[0x01]); // IER: data available
        let exit = VmExitSignal::new().unwrap();
        let input: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let feeder = {
            let (serial, exit, input) = (serial.clone(), exit.clone(), input.clone());
            std::thread::spawn(move || feed_serial(&input[..], &serial, &exit))
        };
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.len() < input.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "got {} bytes",
                got.len()
            );
            got.extend(drain(&serial));
            std::thread::sleep(Duration::from_millis(1));
        }
        feeder.join().unwrap();
        assert_eq!(got, input);
        assert!(raised.load(Ordering::SeqCst) > 0, "no RX interrupt");
    }

    #[test]
    fn the_vm_s_end_stops_a_feeder_waiting_for_room() {
        let serial = Arc::new(Mutex::new(Serial::new(None, Count::default())));
        let exit = VmExitSignal::new().unwrap();
        let feeder = {
            let (serial, exit) = (serial.clone(), exit.clone());
            // More than the FIFO holds, and the guest never reads.
            std::thread::spawn(move || feed_serial(&[b'x'; 200][..], &serial, &exit))
        };
        std::thread::sleep(Duration::from_millis(20));
        exit.request(devices::vm_exit::GuestEnd::PowerOff);
        feeder.join().unwrap();
        assert_eq!(drain(&serial).len(), 64, "the FIFO holds 64 bytes");
    }
}
