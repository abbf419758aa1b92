//! The 8250 UART at COM1 (vm-superio), wired to the console.

use super::bus::BusDevice;
use super::console::ConsoleOut;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Raises the serial interrupt through an eventfd registered as a KVM irqfd.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The UART on the port bus.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleOut>,
}

impl SerialDevice {
    /// A UART that writes to `out` and interrupts through `irq`.
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        SerialDevice {
            serial: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// Queues console input for the guest; returns how many bytes fit in the FIFO.
    pub fn input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            // An interrupt that cannot be raised (eventfd full) is not worth a crash.
            let _ = self.serial.write(offset as u8, data[0]);
        }
    }
}
