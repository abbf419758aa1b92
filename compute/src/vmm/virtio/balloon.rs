//! virtio-balloon with statistics: the host sets a target, the guest gives pages back,
//! the host drops them (`MADV_DONTNEED`) and sees the guest's memory statistics.
//!
//! The memory-reclaim work drives it through a [`BalloonHandle`]: `set_target_pages`
//! updates `num_pages` in the config space and raises a config interrupt; the guest
//! inflates (queue 0, arrays of 4 KiB page frame numbers) until `actual` matches, or
//! deflates (queue 1). Statistics (queue 2) follow the spec's protocol: the guest posts
//! a buffer of `(tag u16, value u64)` pairs once, the device keeps it, and each
//! `request_stats` hands it back so the guest refills and reposts it.

use super::{
    read_config_bytes, wait, ActivateContext, ActivateError, IrqTrigger, VirtioDevice, Worker,
    F_VERSION_1, INT_CONFIG, INT_VRING, STOP_TOKEN, TYPE_BALLOON,
};
use crate::vmm::memory::{discard_range, GuestMem};
use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EpollEvent;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// VIRTIO_BALLOON_F_STATS_VQ.
pub const F_STATS_VQ: u64 = 1 << 1;
/// VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;

const QUEUE_SIZE: u16 = 256;
/// Balloon pages are 4 KiB whatever the guest's page size.
pub const PAGE: u64 = 4096;

/// Statistic tags (virtio 1.2, 5.5.6.3).
pub mod tag {
    /// Swapped in.
    pub const SWAP_IN: u16 = 0;
    /// Swapped out.
    pub const SWAP_OUT: u16 = 1;
    /// Major faults.
    pub const MAJFLT: u16 = 2;
    /// Minor faults.
    pub const MINFLT: u16 = 3;
    /// Free memory.
    pub const MEMFREE: u16 = 4;
    /// Total memory.
    pub const MEMTOT: u16 = 5;
    /// Available memory.
    pub const AVAIL: u16 = 6;
    /// Disk caches.
    pub const CACHES: u16 = 7;
}

#[derive(Default)]
struct State {
    target_pages: u32,
    actual_pages: u32,
    inflated_pages: u64,
    deflated_pages: u64,
    stats: BTreeMap<u16, u64>,
    stats_updates: u64,
    irq: Option<Arc<IrqTrigger>>,
}

/// The host's side of a balloon: target, progress, statistics. Cloneable.
#[derive(Clone)]
pub struct BalloonHandle {
    state: Arc<Mutex<State>>,
    stats_evt: Arc<EventFd>,
}

/// A snapshot of the balloon.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BalloonStatus {
    /// Pages the host asked for.
    pub target_pages: u32,
    /// Pages the guest says it has given.
    pub actual_pages: u32,
    /// Pages received through the inflate queue (total).
    pub inflated_pages: u64,
    /// Pages received through the deflate queue (total).
    pub deflated_pages: u64,
    /// The latest statistics, by tag.
    pub stats: BTreeMap<u16, u64>,
    /// How many statistics buffers arrived.
    pub stats_updates: u64,
}

impl BalloonHandle {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks the guest to hold `pages` 4 KiB pages in the balloon.
    pub fn set_target_pages(&self, pages: u32) {
        let irq = {
            let mut s = self.lock();
            s.target_pages = pages;
            s.irq.clone()
        };
        if let Some(irq) = irq {
            irq.trigger(INT_CONFIG);
        }
    }

    /// Asks the guest for fresh statistics (they arrive in [`BalloonHandle::status`]).
    pub fn request_stats(&self) {
        let _ = self.stats_evt.write(1);
    }

    /// The current state.
    pub fn status(&self) -> BalloonStatus {
        let s = self.lock();
        BalloonStatus {
            target_pages: s.target_pages,
            actual_pages: s.actual_pages,
            inflated_pages: s.inflated_pages,
            deflated_pages: s.deflated_pages,
            stats: s.stats.clone(),
            stats_updates: s.stats_updates,
        }
    }
}

/// A virtio-balloon device.
pub struct Balloon {
    handle: BalloonHandle,
    worker: Option<Worker>,
}

impl Balloon {
    /// A balloon with a target of zero pages.
    pub fn new() -> std::io::Result<Self> {
        Ok(Balloon {
            handle: BalloonHandle {
                state: Arc::default(),
                stats_evt: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            },
            worker: None,
        })
    }

    /// The host's handle.
    pub fn handle(&self) -> BalloonHandle {
        self.handle.clone()
    }
}

const INFLATE: u64 = 0;
const DEFLATE: u64 = 1;
const STATS: u64 = 2;
const STATS_REQ: u64 = 3;

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_STATS_VQ | F_DEFLATE_ON_OOM
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let s = self.handle.lock();
        let mut c = [0u8; 8];
        c[0..4].copy_from_slice(&s.target_pages.to_le_bytes());
        c[4..8].copy_from_slice(&s.actual_pages.to_le_bytes());
        read_config_bytes(&c, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (offset 4) is the driver's to write.
        if offset == 4 && data.len() == 4 {
            self.handle.lock().actual_pages =
                u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        }
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let stats_on = ctx.features & F_STATS_VQ != 0;
        let want = if stats_on { 3 } else { 2 };
        if ctx.queues.len() < want || ctx.queue_evts.len() < want {
            return Err(ActivateError::Queues {
                expected: want,
                got: ctx.queues.len(),
            });
        }
        ctx.queues.truncate(want);
        ctx.queue_evts.truncate(want);
        self.handle.lock().irq = Some(ctx.irq.clone());
        let mut fds: Vec<(i32, u64)> = ctx
            .queue_evts
            .iter()
            .enumerate()
            .map(|(i, e)| (e.as_raw_fd(), i as u64))
            .collect();
        fds.push((self.handle.stats_evt.as_raw_fd(), STATS_REQ));
        let handle = self.handle.clone();
        let mem = ctx.mem;
        let irq = ctx.irq;
        let evts = ctx.queue_evts;
        let mut queues = ctx.queues;
        self.worker = Some(Worker::spawn("balloon", fds, move |epoll| {
            let mut events = vec![EpollEvent::default(); 8];
            // The statistics buffer the device holds, if any.
            let mut held: Option<u16> = None;
            loop {
                let mut notify = false;
                for t in wait(&epoll, &mut events) {
                    match t {
                        STOP_TOKEN => return,
                        INFLATE | DEFLATE => {
                            let _ = evts[t as usize].read();
                            notify |= pages(&mem, &mut queues[t as usize], t == INFLATE, &handle);
                        }
                        STATS => {
                            let _ = evts[2].read();
                            while let Some(chain) = queues[2].pop_descriptor_chain(&mem) {
                                let head = chain.head_index();
                                let mut stats = BTreeMap::new();
                                for d in chain.filter(|d| !d.is_write_only()) {
                                    for i in 0..d.len() / 10 {
                                        let a = GuestAddress(d.addr().0 + u64::from(i) * 10);
                                        let tag: u16 = mem.read_obj(a).unwrap_or(u16::MAX);
                                        let val: u64 =
                                            mem.read_obj(GuestAddress(a.0 + 2)).unwrap_or(0);
                                        stats.insert(tag, val);
                                    }
                                }
                                let mut s = handle.lock();
                                s.stats = stats;
                                s.stats_updates += 1;
                                held = Some(head);
                            }
                        }
                        STATS_REQ => {
                            let _ = handle.stats_evt.read();
                            if let Some(head) = held.take() {
                                if queues.len() > 2 {
                                    let _ = queues[2].add_used(&mem, head, 0);
                                    notify = true;
                                }
                            }
                        }
                        _ => {}
                    }
                }
                if notify {
                    irq.trigger(INT_VRING);
                }
            }
        })?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        self.handle.lock().irq = None;
    }
}

/// Handles inflate (`inflate`) or deflate buffers: arrays of u32 page frame numbers.
fn pages(mem: &GuestMem, q: &mut Queue, inflate: bool, handle: &BalloonHandle) -> bool {
    let mut any = false;
    while let Some(chain) = q.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let mut count = 0u64;
        for d in chain.filter(|d| !d.is_write_only()) {
            for i in 0..d.len() / 4 {
                let Ok(pfn) = mem.read_obj::<u32>(GuestAddress(d.addr().0 + u64::from(i) * 4))
                else {
                    break;
                };
                if inflate {
                    // A page outside RAM is the guest's bug; skip it.
                    discard_range(mem, GuestAddress(u64::from(pfn) * PAGE), PAGE);
                }
                count += 1;
            }
        }
        {
            let mut s = handle.lock();
            if inflate {
                s.inflated_pages += count;
            } else {
                s.deflated_pages += count;
            }
        }
        let _ = q.add_used(mem, head, 0);
        any = true;
    }
    any && q.needs_notification(mem).unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::virtio::mmio::reg;
    use crate::vmm::virtio::test_utils::{Desc, TestDriver};

    #[test]
    fn inflate_drops_pages_and_stats_round_trip() {
        let balloon = Balloon::new().expect("balloon");
        let h = balloon.handle();
        let mut drv = TestDriver::new(Box::new(balloon), &[F_STATS_VQ]);

        // Host asks for 2 pages: config interrupt, num_pages visible.
        h.set_target_pages(2);
        assert_eq!(drv.wait_irq() & INT_CONFIG, INT_CONFIG);
        assert_eq!(drv.config_u32(0), 2);

        // Guest fills two pages, then inflates them.
        let p1 = 0x40_0000u64;
        let p2 = 0x40_1000u64;
        drv.mem
            .write_slice(&[0x5a; 4096], GuestAddress(p1))
            .expect("fill");
        drv.mem
            .write_slice(&[0x5a; 4096], GuestAddress(p2))
            .expect("fill");
        let mut pfns = Vec::new();
        pfns.extend_from_slice(&((p1 / PAGE) as u32).to_le_bytes());
        pfns.extend_from_slice(&((p2 / PAGE) as u32).to_le_bytes());
        let arr = drv.alloc_bytes(&pfns);
        drv.submit(0, &[Desc::r(arr, 8)]);
        drv.wait_used(0, 1);
        assert_eq!(drv.read_bytes(p1, 4096), vec![0; 4096], "page dropped");
        assert_eq!(drv.read_bytes(p2, 16), vec![0; 16]);
        drv.transport_write_config(4, 2);
        let st = h.status();
        assert_eq!((st.inflated_pages, st.actual_pages), (2, 2));

        // Deflate one.
        let arr = drv.alloc_bytes(&((p1 / PAGE) as u32).to_le_bytes());
        drv.submit(1, &[Desc::r(arr, 4)]);
        drv.wait_used(1, 1);
        assert_eq!(h.status().deflated_pages, 1);

        // Statistics: the guest posts a buffer; the device keeps it until asked.
        let mut buf = Vec::new();
        for (t, v) in [(tag::MEMFREE, 100u64 << 20), (tag::MEMTOT, 128u64 << 20)] {
            buf.extend_from_slice(&t.to_le_bytes());
            buf.extend_from_slice(&v.to_le_bytes());
        }
        let sb = drv.alloc_bytes(&buf);
        drv.submit(2, &[Desc::r(sb, 20)]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while h.status().stats_updates == 0 {
            assert!(std::time::Instant::now() < deadline, "no stats");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(h.status().stats.get(&tag::MEMTOT), Some(&(128u64 << 20)));
        assert!(
            drv.take_used(2, 1).is_empty(),
            "buffer held until requested"
        );
        h.request_stats();
        assert_eq!(drv.wait_used(2, 1).len(), 1);
        let _ = reg::CONFIG;
    }
}
