//! Virtio devices on the virtio-mmio transport (virtio 1.x, split rings from
//! `virtio-queue`).
//!
//! Every device implements [`VirtioDevice`]: its identity, features, config space and an
//! `activate` that starts a worker thread once the driver sets DRIVER_OK. The worker owns
//! the queues and waits (epoll) on one eventfd per queue, which the transport writes on
//! QueueNotify and which the VM also registers with KVM as an ioeventfd on the notify
//! register, so a guest kick reaches the worker without a vCPU exit. Interrupts go out
//! through an [`IrqTrigger`]: the interrupt status bits the transport shows, plus an
//! eventfd that KVM injects as the device's GSI (irqfd). Tests drive all of this without
//! KVM: a test-side driver (`test_utils`) writes descriptors into a plain
//! [`GuestMem`], kicks through the transport's registers and
//! waits on the trigger's eventfd.
//!
//! Devices: [`block`] (backend: any [`basalt_blockdev::BlockDev`]), [`net`] (backend: a
//! TAP), [`balloon`] (inflate, deflate, statistics).

pub mod balloon;
pub mod block;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub(crate) mod test_utils;

use super::memory::GuestMem;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Device type of virtio-net.
pub const TYPE_NET: u32 = 1;
/// Device type of virtio-blk.
pub const TYPE_BLOCK: u32 = 2;
/// Device type of virtio-balloon.
pub const TYPE_BALLOON: u32 = 5;

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bit: a used buffer was added.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt: status bits plus the eventfd that raises its GSI.
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    evt: EventFd,
}

impl IrqTrigger {
    /// A trigger with a fresh eventfd.
    pub fn new() -> std::io::Result<Self> {
        Ok(IrqTrigger {
            status: AtomicU32::new(0),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Sets `bit` in the status and raises the interrupt.
    pub fn trigger(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        // The eventfd counter saturates long before 2^64; a failed write means the
        // interrupt is already pending.
        let _ = self.evt.write(1);
    }

    /// The eventfd (to register as an irqfd, or to wait on in tests).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Current status bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMem,
    /// The configured queues, in order.
    pub queues: Vec<Queue>,
    /// One notification eventfd per queue.
    pub queue_evts: Vec<EventFd>,
    /// The interrupt.
    pub irq: Arc<IrqTrigger>,
    /// Features the driver accepted.
    pub features: u64,
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured the wrong number of queues.
    #[error("expected {expected} queues, got {got}")]
    Queues {
        /// Queues the device has.
        expected: usize,
        /// Queues configured.
        got: usize,
    },
    /// The worker could not be started.
    #[error("cannot start the device worker: {0}")]
    Worker(#[from] std::io::Error),
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device type.
    fn device_type(&self) -> u32;
    /// The largest size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features offered (include [`F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Reads the device-specific config space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific config space (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the device (driver reset); it may be activated again.
    fn reset(&mut self);
}

/// Reads `data.len()` bytes at `offset` of a config space held as bytes; out of range
/// reads as zeroes.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// A device worker thread: an epoll set over a stop eventfd plus the device's own
/// fds, and the join handle. Dropping it stops and joins the thread.
pub struct Worker {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

/// The epoll token of the stop eventfd.
pub const STOP_TOKEN: u64 = u64::MAX;

impl Worker {
    /// Starts `body` on a thread named `name`. `body` gets an epoll set that already
    /// watches the stop eventfd (token [`STOP_TOKEN`]) and returns when it sees it.
    pub fn spawn(
        name: &str,
        fds: Vec<(i32, u64)>,
        body: impl FnOnce(Epoll) + Send + 'static,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        for (fd, token) in fds {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || body(epoll))?;
        Ok(Worker {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Waits for epoll events; retries on EINTR. Returns the tokens that fired.
pub fn wait(epoll: &Epoll, events: &mut [EpollEvent]) -> Vec<u64> {
    loop {
        match epoll.wait(-1, events) {
            Ok(n) => return events[..n].iter().map(|e| e.data()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return vec![STOP_TOKEN],
        }
    }
}
