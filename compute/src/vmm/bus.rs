//! Address buses: which device answers a port or MMIO access.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// A device on a bus. `offset` is relative to the device's base.
pub trait BusDevice: Send {
    /// A read of `data.len()` bytes.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and its owner.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Ranges `[base, base + len)` mapped to devices, with no overlap.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

/// Two devices on one address.
#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps another device")]
pub struct Overlap {
    /// Base asked for.
    pub base: u64,
    /// Length asked for.
    pub len: u64,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `dev` at `[base, base + len)`.
    pub fn insert(&mut self, dev: SharedDevice, base: u64, len: u64) -> Result<(), Overlap> {
        let end = base.checked_add(len).ok_or(Overlap { base, len })?;
        if len == 0 {
            return Err(Overlap { base, len });
        }
        if let Some((&b, &(l, _))) = self.ranges.range(..end).next_back() {
            if b + l > base {
                return Err(Overlap { base, len });
            }
        }
        self.ranges.insert(base, (len, dev));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, dev))
    }

    /// Dispatches a read; false when no device is there (the data is left as is).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .read(off, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_and_rejects_overlaps() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Reg(1))), 0x10, 8)
            .expect("a");
        bus.insert(Arc::new(Mutex::new(Reg(10))), 0x18, 8)
            .expect("b");
        assert!(bus.insert(Arc::new(Mutex::new(Reg(0))), 0x14, 2).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Reg(0))), 0x0c, 8).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x18, &[50]));
        assert!(bus.read(0x19, &mut b));
        assert_eq!(b[0], 51);
        assert!(!bus.read(0x20, &mut b));
    }
}
