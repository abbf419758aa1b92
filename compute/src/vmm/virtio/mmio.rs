//! The virtio-mmio transport (version 2, "modern").
//!
//! One 4 KiB slot per device; registers as in the virtio 1.2 spec, section 4.2.2. The
//! guest finds the slots through the ACPI DSDT (`LNRO0005` devices, see
//! [`crate::vmm::acpi`]), as Firecracker does, because the Debian kernel lacks
//! `VIRTIO_MMIO_CMDLINE_DEVICES`.

use super::{ActivateContext, IrqTrigger, VirtioDevice, F_VERSION_1, INT_CONFIG};
use crate::vmm::bus::BusDevice;
use crate::vmm::memory::GuestMem;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MAGIC: u32 = 0x7472_6976;
const VENDOR: u32 = 0x4253_4c54; // "BSLT"

/// Register offsets.
pub mod reg {
    /// MagicValue.
    pub const MAGIC: u64 = 0x000;
    /// Version.
    pub const VERSION: u64 = 0x004;
    /// DeviceID.
    pub const DEVICE_ID: u64 = 0x008;
    /// VendorID.
    pub const VENDOR_ID: u64 = 0x00c;
    /// DeviceFeatures.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// DeviceFeaturesSel.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// DriverFeatures.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// DriverFeaturesSel.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// QueueSel.
    pub const QUEUE_SEL: u64 = 0x030;
    /// QueueNumMax.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// QueueNum.
    pub const QUEUE_NUM: u64 = 0x038;
    /// QueueReady.
    pub const QUEUE_READY: u64 = 0x044;
    /// QueueNotify.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// InterruptStatus.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// InterruptACK.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Status.
    pub const STATUS: u64 = 0x070;
    /// QueueDescLow.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// QueueDescHigh.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// QueueDriverLow (avail ring).
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    /// QueueDriverHigh.
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    /// QueueDeviceLow (used ring).
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    /// QueueDeviceHigh.
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    /// ConfigGeneration.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device config space.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    /// ACKNOWLEDGE.
    pub const ACKNOWLEDGE: u32 = 1;
    /// DRIVER.
    pub const DRIVER: u32 = 2;
    /// DRIVER_OK.
    pub const DRIVER_OK: u32 = 4;
    /// FEATURES_OK.
    pub const FEATURES_OK: u32 = 8;
    /// DEVICE_NEEDS_RESET.
    pub const NEEDS_RESET: u32 = 64;
    /// FAILED.
    pub const FAILED: u32 = 128;
}

/// A virtio device behind the MMIO register interface.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMem,
    irq: Arc<IrqTrigger>,
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    max_sizes: Vec<u16>,
    features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    active: bool,
    config_generation: u32,
}

impl MmioTransport {
    /// Puts `device` behind a transport over `mem`.
    pub fn new(mem: GuestMem, device: Box<dyn VirtioDevice>) -> std::io::Result<Self> {
        let max_sizes = device.queue_max_sizes();
        let mut queue_evts = Vec::new();
        for _ in &max_sizes {
            queue_evts.push(EventFd::new(EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            queues: fresh_queues(&max_sizes),
            max_sizes,
            device,
            mem,
            irq: Arc::new(IrqTrigger::new()?),
            queue_evts,
            features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            active: false,
            config_generation: 0,
        })
    }

    /// The interrupt (register its eventfd as the device's irqfd).
    pub fn irq(&self) -> Arc<IrqTrigger> {
        self.irq.clone()
    }

    /// The queue notification eventfds (register each as an ioeventfd on
    /// [`reg::QUEUE_NOTIFY`] with the queue index as datamatch).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Tells the driver the config space changed (balloon target, say).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.irq.trigger(INT_CONFIG);
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        if self.active {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queues = fresh_queues(&self.max_sizes);
        self.irq.ack(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        use status::*;
        if value == 0 {
            self.reset();
            return;
        }
        // FEATURES_OK only sticks when the driver accepted VERSION_1 and nothing we did
        // not offer.
        let mut value = value;
        if value & FEATURES_OK != 0 && self.status & FEATURES_OK == 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0 || self.driver_features & F_VERSION_1 == 0 {
                value &= !FEATURES_OK;
            }
        }
        self.status = value;
        if value & DRIVER_OK != 0 && !self.active && value & FEATURES_OK != 0 {
            let queues = std::mem::take(&mut self.queues);
            let mut evts = Vec::new();
            for e in &self.queue_evts {
                match e.try_clone() {
                    Ok(e) => evts.push(e),
                    Err(_) => {
                        self.status |= NEEDS_RESET;
                        return;
                    }
                }
            }
            let ctx = ActivateContext {
                mem: self.mem.clone(),
                queues,
                queue_evts: evts,
                irq: self.irq.clone(),
                features: self.driver_features,
            };
            match self.device.activate(ctx) {
                Ok(()) => self.active = true,
                Err(_) => self.status |= NEEDS_RESET,
            }
        }
    }
}

fn fresh_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        .map(|&m| Queue::new(m).unwrap_or_default())
        .collect()
}

fn u32_of(data: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(data.try_into().ok()?))
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => 2,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => {
                let f = self.device.features();
                match self.features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self
                .max_sizes
                .get(self.queue_sel as usize)
                .map_or(0, |&m| u32::from(m)),
            reg::QUEUE_READY => {
                if self.active {
                    1
                } else {
                    self.queues
                        .get(self.queue_sel as usize)
                        .map_or(0, |q| u32::from(q.ready()))
                }
            }
            reg::INTERRUPT_STATUS => self.irq.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        let Some(v) = u32_of(data) else { return };
        match offset {
            reg::DEVICE_FEATURES_SEL => self.features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW => {
                if let Some(q) = self.queue() {
                    q.set_desc_table_address(Some(v), None);
                }
            }
            reg::QUEUE_DESC_HIGH => {
                if let Some(q) = self.queue() {
                    q.set_desc_table_address(None, Some(v));
                }
            }
            reg::QUEUE_AVAIL_LOW => {
                if let Some(q) = self.queue() {
                    q.set_avail_ring_address(Some(v), None);
                }
            }
            reg::QUEUE_AVAIL_HIGH => {
                if let Some(q) = self.queue() {
                    q.set_avail_ring_address(None, Some(v));
                }
            }
            reg::QUEUE_USED_LOW => {
                if let Some(q) = self.queue() {
                    q.set_used_ring_address(Some(v), None);
                }
            }
            reg::QUEUE_USED_HIGH => {
                if let Some(q) = self.queue() {
                    q.set_used_ring_address(None, Some(v));
                }
            }
            reg::QUEUE_NOTIFY => {
                if let Some(e) = self.queue_evts.get(v as usize) {
                    let _ = e.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.irq.ack(v),
            reg::STATUS => self.set_status(v),
            _ => {}
        }
    }
}
