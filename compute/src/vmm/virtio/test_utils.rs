//! A test-side virtio driver: lays out split rings in a plain guest memory, negotiates
//! through the MMIO transport's registers, submits descriptor chains and reads the used
//! ring, the way a guest driver would, without KVM.

use super::mmio::{reg, status, MmioTransport};
use super::VirtioDevice;
use crate::vmm::bus::BusDevice;
use crate::vmm::memory::{self, GuestMem};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// One descriptor of a chain to submit.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

impl Desc {
    /// Device-readable.
    pub fn r(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            write: false,
        }
    }
    /// Device-writable.
    pub fn w(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            write: true,
        }
    }
}

struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

pub struct TestDriver {
    pub mem: GuestMem,
    pub transport: MmioTransport,
    rings: Vec<Ring>,
    bump: u64,
    last_head: u16,
    device_features: u64,
}

impl TestDriver {
    /// Negotiates VERSION_1 plus the device's offered features that are in `accept`,
    /// sets up every queue at its maximum size and sets DRIVER_OK.
    pub fn new(device: Box<dyn VirtioDevice>, accept: &[u64]) -> Self {
        let mem = memory::create(16 << 20, false).expect("guest memory");
        let transport = MmioTransport::new(mem.clone(), device).expect("transport");
        let mut d = TestDriver {
            mem,
            transport,
            rings: Vec::new(),
            bump: 0x1000,
            last_head: 0,
            device_features: 0,
        };
        d.negotiate(accept);
        d
    }

    /// Resets the device (Status = 0) and negotiates again with fresh rings, as a
    /// driver does when it is reloaded.
    pub fn reinit(&mut self, accept: &[u64]) {
        self.reg_write(reg::STATUS, 0);
        assert_eq!(self.reg_read(reg::STATUS), 0);
        self.rings.clear();
        self.negotiate(accept);
    }

    fn negotiate(&mut self, accept: &[u64]) {
        let d = self;
        assert_eq!(d.reg_read(reg::MAGIC), 0x7472_6976);
        assert_eq!(d.reg_read(reg::VERSION), 2);
        d.reg_write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        d.reg_write(reg::DEVICE_FEATURES_SEL, 0);
        let lo = u64::from(d.reg_read(reg::DEVICE_FEATURES));
        d.reg_write(reg::DEVICE_FEATURES_SEL, 1);
        let hi = u64::from(d.reg_read(reg::DEVICE_FEATURES));
        d.device_features = lo | (hi << 32);
        let mut want = super::F_VERSION_1;
        for f in accept {
            want |= f;
        }
        let acked = d.device_features & want;
        d.reg_write(reg::DRIVER_FEATURES_SEL, 0);
        d.reg_write(reg::DRIVER_FEATURES, acked as u32);
        d.reg_write(reg::DRIVER_FEATURES_SEL, 1);
        d.reg_write(reg::DRIVER_FEATURES, (acked >> 32) as u32);
        d.reg_write(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert!(
            d.reg_read(reg::STATUS) & status::FEATURES_OK != 0,
            "FEATURES_OK refused"
        );
        let mut q = 0;
        loop {
            d.reg_write(reg::QUEUE_SEL, q);
            let max = d.reg_read(reg::QUEUE_NUM_MAX) as u16;
            if max == 0 {
                break;
            }
            let desc = d.alloc(16 * u64::from(max) as usize);
            let avail = d.alloc(6 + 2 * usize::from(max));
            let used = d.alloc(6 + 8 * usize::from(max));
            d.reg_write(reg::QUEUE_NUM, u32::from(max));
            d.reg_write(reg::QUEUE_DESC_LOW, desc as u32);
            d.reg_write(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
            d.reg_write(reg::QUEUE_AVAIL_LOW, avail as u32);
            d.reg_write(reg::QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
            d.reg_write(reg::QUEUE_USED_LOW, used as u32);
            d.reg_write(reg::QUEUE_USED_HIGH, (used >> 32) as u32);
            d.reg_write(reg::QUEUE_READY, 1);
            d.rings.push(Ring {
                size: max,
                desc,
                avail,
                used,
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
            });
            q += 1;
        }
        d.reg_write(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(
            d.reg_read(reg::STATUS) & status::NEEDS_RESET,
            0,
            "device failed to activate"
        );
    }

    pub fn reg_read(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn reg_write(&mut self, off: u64, v: u32) {
        self.transport.write(off, &v.to_le_bytes());
    }

    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    pub fn config_u32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(reg::CONFIG + off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn config_u64(&mut self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.transport.read(reg::CONFIG + off, &mut b);
        u64::from_le_bytes(b)
    }

    /// `len` zeroed bytes of guest memory, 16-byte aligned.
    pub fn alloc(&mut self, len: usize) -> u64 {
        let a = self.bump.next_multiple_of(16);
        self.bump = a + len as u64;
        self.mem
            .write_slice(&vec![0u8; len], GuestAddress(a))
            .expect("alloc");
        a
    }

    pub fn alloc_bytes(&mut self, data: &[u8]) -> u64 {
        let a = self.alloc(data.len());
        self.mem.write_slice(data, GuestAddress(a)).expect("write");
        a
    }

    pub fn read_u8(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).expect("read")
    }

    pub fn read_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .expect("read");
        v
    }

    pub fn last_head(&self) -> u16 {
        self.last_head
    }

    /// Places a chain in queue `q` without notifying; returns its head.
    pub fn place(&mut self, q: usize, chain: &[Desc]) -> u16 {
        let ring = &mut self.rings[q];
        let head = ring.next_desc;
        for (i, d) in chain.iter().enumerate() {
            let idx = (head + i as u16) % ring.size;
            let next = (idx + 1) % ring.size;
            let mut flags = 0u16;
            if i + 1 < chain.len() {
                flags |= 1; // NEXT
            }
            if d.write {
                flags |= 2; // WRITE
            }
            let base = ring.desc + 16 * u64::from(idx);
            self.mem
                .write_obj(d.addr, GuestAddress(base))
                .expect("desc");
            self.mem
                .write_obj(d.len, GuestAddress(base + 8))
                .expect("desc");
            self.mem
                .write_obj(flags, GuestAddress(base + 12))
                .expect("desc");
            self.mem
                .write_obj(next, GuestAddress(base + 14))
                .expect("desc");
        }
        ring.next_desc = (head + chain.len() as u16) % ring.size;
        let slot = ring.avail + 4 + 2 * u64::from(ring.avail_idx % ring.size);
        self.mem.write_obj(head, GuestAddress(slot)).expect("avail");
        ring.avail_idx = ring.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(ring.avail_idx, GuestAddress(ring.avail + 2))
            .expect("avail idx");
        self.last_head = head;
        head
    }

    pub fn notify(&mut self, q: usize) {
        self.reg_write(reg::QUEUE_NOTIFY, q as u32);
    }

    pub fn submit(&mut self, q: usize, chain: &[Desc]) -> u16 {
        let h = self.place(q, chain);
        self.notify(q);
        h
    }

    pub fn submit_many(&mut self, q: usize, chains: &[Vec<Desc>]) {
        for c in chains {
            self.place(q, c);
        }
        self.notify(q);
    }

    /// Used entries since the last call, at most `n`, without waiting.
    pub fn take_used(&mut self, q: usize, n: usize) -> Vec<(u16, u32)> {
        let ring = &mut self.rings[q];
        let used_idx: u16 = self
            .mem
            .read_obj(GuestAddress(ring.used + 2))
            .expect("used idx");
        let mut out = Vec::new();
        while ring.used_seen != used_idx && out.len() < n {
            let slot = ring.used + 4 + 8 * u64::from(ring.used_seen % ring.size);
            let id: u32 = self.mem.read_obj(GuestAddress(slot)).expect("used");
            let len: u32 = self.mem.read_obj(GuestAddress(slot + 4)).expect("used");
            out.push((id as u16, len));
            ring.used_seen = ring.used_seen.wrapping_add(1);
        }
        out
    }

    /// Waits (up to 5 s) for `n` used entries in queue `q`.
    pub fn wait_used(&mut self, q: usize, n: usize) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut out = Vec::new();
        while out.len() < n {
            out.extend(self.take_used(q, n - out.len()));
            if out.len() >= n {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} used entries in queue {q}, got {out:?}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        out
    }

    /// Waits (up to 5 s) for the interrupt eventfd; returns the status bits.
    pub fn wait_irq(&mut self) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(5);
        let irq = self.transport.irq();
        loop {
            if irq.eventfd().read().is_ok() {
                return irq.status();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for an interrupt"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl TestDriver {
    /// Writes a u32 into the device config space.
    pub fn transport_write_config(&mut self, off: u64, v: u32) {
        self.transport.write(reg::CONFIG + off, &v.to_le_bytes());
    }
}
