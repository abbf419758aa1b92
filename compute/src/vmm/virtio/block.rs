//! virtio-blk whose backend is a Basalt [`BlockDev`]: a LUN in the same process, an
//! [`NbdDev`](crate::nbd::NbdDev) to the daemon's LUN, or a file.
//!
//! On each kick the worker takes every available request, runs them concurrently on
//! the device's tokio runtime (a BlockDev is async), then completes them all and raises
//! one interrupt. Requests: read, write (FUA when the driver did not negotiate
//! VIRTIO_BLK_F_FLUSH would be needed by write-through semantics; we always offer
//! FLUSH), flush, get-id, discard and write-zeroes when the backend can. The guest's
//! logical block size is the backend's (`blk_size`); a request not aligned to it fails
//! with IOERR, as a real disk would.

use super::{
    read_config_bytes, wait, ActivateContext, ActivateError, VirtioDevice, Worker, F_VERSION_1,
    INT_VRING, STOP_TOKEN, TYPE_BLOCK,
};
use crate::vmm::memory::GuestMem;
use basalt_blockdev::{BlockDev, BlockError, WriteFlags, ZeroFlags};
use bytes::Bytes;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes as _, GuestAddress};
use vmm_sys_util::epoll::EpollEvent;

/// VIRTIO_BLK_F_SEG_MAX.
pub const F_SEG_MAX: u64 = 1 << 2;
/// VIRTIO_BLK_F_RO.
pub const F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_BLK_SIZE.
pub const F_BLK_SIZE: u64 = 1 << 6;
/// VIRTIO_BLK_F_FLUSH.
pub const F_FLUSH: u64 = 1 << 9;
/// VIRTIO_BLK_F_DISCARD.
pub const F_DISCARD: u64 = 1 << 13;
/// VIRTIO_BLK_F_WRITE_ZEROES.
pub const F_WRITE_ZEROES: u64 = 1 << 14;

/// Request types.
pub mod req {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Device id.
    pub const GET_ID: u32 = 8;
    /// Discard.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status: done.
pub const S_OK: u8 = 0;
/// Status: I/O error.
pub const S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const S_UNSUPP: u8 = 2;

const QUEUE_SIZE: u16 = 256;
const SEG_MAX: u32 = 126;

/// Counters of one disk (monotonic).
#[derive(Debug, Default)]
pub struct BlockCounters {
    /// Completed read requests.
    pub reads: AtomicU64,
    /// Completed write requests.
    pub writes: AtomicU64,
    /// Completed flushes.
    pub flushes: AtomicU64,
    /// Requests that failed.
    pub errors: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
}

/// A virtio-blk device.
pub struct Block {
    id: String,
    dev: Arc<dyn BlockDev>,
    read_only: bool,
    rt: tokio::runtime::Handle,
    counters: Arc<BlockCounters>,
    worker: Option<Worker>,
}

impl Block {
    /// A disk named `id` (its serial) on `dev`; `rt` runs the backend's futures.
    pub fn new(
        id: &str,
        dev: Arc<dyn BlockDev>,
        read_only: bool,
        rt: tokio::runtime::Handle,
    ) -> Self {
        let read_only = read_only || dev.geometry().capabilities.read_only;
        Block {
            id: id.to_string(),
            dev,
            read_only,
            rt,
            counters: Arc::default(),
            worker: None,
        }
    }

    /// The disk's counters.
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    fn config(&self) -> Vec<u8> {
        let g = self.dev.geometry();
        let mut c = vec![0u8; 60];
        let sectors = g.capacity_bytes() / 512;
        c[0..8].copy_from_slice(&sectors.to_le_bytes());
        let size_max = if g.max_io_bytes == 0 {
            1 << 20
        } else {
            g.max_io_bytes.min(1 << 20)
        };
        c[8..12].copy_from_slice(&size_max.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&g.block_size.to_le_bytes());
        let bs_sectors = g.block_size / 512;
        // max_discard_sectors, max_discard_seg, discard_sector_alignment
        c[36..40].copy_from_slice(&(u32::MAX / bs_sectors * bs_sectors).to_le_bytes());
        c[40..44].copy_from_slice(&1u32.to_le_bytes());
        c[44..48].copy_from_slice(&bs_sectors.to_le_bytes());
        // max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap
        c[48..52].copy_from_slice(&(u32::MAX / bs_sectors * bs_sectors).to_le_bytes());
        c[52..56].copy_from_slice(&1u32.to_le_bytes());
        c[56] = u8::from(g.capabilities.discard);
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let caps = self.dev.geometry().capabilities;
        let mut f = F_VERSION_1 | F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
        if self.read_only {
            f |= F_RO;
        } else {
            f |= F_WRITE_ZEROES;
            if caps.discard {
                f |= F_DISCARD;
            }
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != 1 || ctx.queue_evts.len() != 1 {
            return Err(ActivateError::Queues {
                expected: 1,
                got: ctx.queues.len(),
            });
        }
        let mut queue = ctx.queues.remove(0);
        let evt = ctx.queue_evts.remove(0);
        let engine = Engine {
            dev: self.dev.clone(),
            id: self.id.clone(),
            read_only: self.read_only,
            counters: self.counters.clone(),
        };
        let rt = self.rt.clone();
        let mem = ctx.mem;
        let irq = ctx.irq;
        self.worker = Some(Worker::spawn(
            &format!("blk-{}", self.id),
            vec![(evt.as_raw_fd(), 0)],
            move |epoll| {
                let mut events = vec![EpollEvent::default(); 4];
                loop {
                    let tokens = wait(&epoll, &mut events);
                    if tokens.contains(&STOP_TOKEN) {
                        return;
                    }
                    let _ = evt.read();
                    if engine.process(&rt, &mem, &mut queue) {
                        irq.trigger(INT_VRING);
                    }
                }
            },
        )?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}

/// A parsed request.
#[derive(Debug)]
struct Request {
    head: u16,
    kind: u32,
    sector: u64,
    /// Data buffers (guest address, length).
    data: Vec<(GuestAddress, u32)>,
    status: GuestAddress,
}

/// Why a chain is not a well-formed request.
#[derive(Debug, PartialEq, Eq)]
enum ParseError {
    Header,
    NoStatus,
    Direction,
}

fn parse<M>(
    chain: virtio_queue::DescriptorChain<M>,
    mem: &GuestMem,
) -> Result<Request, (u16, Option<GuestAddress>, ParseError)>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let head = chain.head_index();
    let descs: Vec<_> = chain.collect();
    let Some(last) = descs.last() else {
        return Err((head, None, ParseError::Header));
    };
    let status = (last.is_write_only() && last.len() >= 1).then_some(last.addr());
    let Some(status) = status else {
        return Err((head, None, ParseError::NoStatus));
    };
    let first = &descs[0];
    if first.is_write_only() || first.len() < 16 || descs.len() < 2 {
        return Err((head, Some(status), ParseError::Header));
    }
    let mut hdr = [0u8; 16];
    if mem.read_slice(&mut hdr, first.addr()).is_err() {
        return Err((head, Some(status), ParseError::Header));
    }
    let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let mut s = [0u8; 8];
    s.copy_from_slice(&hdr[8..16]);
    let sector = u64::from_le_bytes(s);
    let data: Vec<_> = descs[1..descs.len() - 1]
        .iter()
        .map(|d| (d.addr(), d.len()))
        .collect();
    // Reads and get-id fill buffers; everything else only reads them.
    let want_write = matches!(kind, req::IN | req::GET_ID);
    if descs[1..descs.len() - 1]
        .iter()
        .any(|d| d.is_write_only() != want_write)
    {
        return Err((head, Some(status), ParseError::Direction));
    }
    Ok(Request {
        head,
        kind,
        sector,
        data,
        status,
    })
}

struct Engine {
    dev: Arc<dyn BlockDev>,
    id: String,
    read_only: bool,
    counters: Arc<BlockCounters>,
}

impl Engine {
    /// Runs every available request; true when the guest should be interrupted.
    fn process(&self, rt: &tokio::runtime::Handle, mem: &GuestMem, queue: &mut Queue) -> bool {
        let mut any = false;
        loop {
            let mut reqs = Vec::new();
            let mut done: Vec<(u16, u32)> = Vec::new();
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                match parse(chain, mem) {
                    Ok(r) => reqs.push(r),
                    Err((head, status, _)) => {
                        if let Some(s) = status {
                            let _ = mem.write_obj(S_IOERR, s);
                            done.push((head, 1));
                        } else {
                            done.push((head, 0));
                        }
                        self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if reqs.is_empty() && done.is_empty() {
                break;
            }
            let results = rt.block_on(futures::future::join_all(
                reqs.iter().map(|r| self.execute(r, mem)),
            ));
            for (r, (status, written)) in reqs.iter().zip(results) {
                if status != S_OK {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                }
                let _ = mem.write_obj(status, r.status);
                done.push((r.head, written + 1));
            }
            for (head, len) in done {
                let _ = queue.add_used(mem, head, len);
            }
            any = true;
        }
        any && queue.needs_notification(mem).unwrap_or(true)
    }

    /// Runs one request; returns the status and the bytes written into guest buffers.
    async fn execute(&self, r: &Request, mem: &GuestMem) -> (u8, u32) {
        let g = self.dev.geometry();
        let len: u64 = r.data.iter().map(|&(_, l)| u64::from(l)).sum();
        let Some(offset) = r.sector.checked_mul(512) else {
            return (S_IOERR, 0);
        };
        match r.kind {
            req::IN => match self.dev.read(offset, len as usize).await {
                Ok(bytes) => {
                    let mut pos = 0usize;
                    for &(addr, l) in &r.data {
                        let l = l as usize;
                        if mem.write_slice(&bytes[pos..pos + l], addr).is_err() {
                            return (S_IOERR, 0);
                        }
                        pos += l;
                    }
                    self.counters.reads.fetch_add(1, Ordering::Relaxed);
                    self.counters.read_bytes.fetch_add(len, Ordering::Relaxed);
                    (S_OK, len as u32)
                }
                Err(_) => (S_IOERR, 0),
            },
            req::OUT => {
                if self.read_only {
                    return (S_IOERR, 0);
                }
                let mut buf = vec![0u8; len as usize];
                let mut pos = 0usize;
                for &(addr, l) in &r.data {
                    let l = l as usize;
                    if mem.read_slice(&mut buf[pos..pos + l], addr).is_err() {
                        return (S_IOERR, 0);
                    }
                    pos += l;
                }
                match self
                    .dev
                    .write(offset, Bytes::from(buf), WriteFlags::default())
                    .await
                {
                    Ok(()) => {
                        self.counters.writes.fetch_add(1, Ordering::Relaxed);
                        self.counters.write_bytes.fetch_add(len, Ordering::Relaxed);
                        (S_OK, 0)
                    }
                    Err(_) => (S_IOERR, 0),
                }
            }
            req::FLUSH => match self.dev.flush().await {
                Ok(()) => {
                    self.counters.flushes.fetch_add(1, Ordering::Relaxed);
                    (S_OK, 0)
                }
                Err(_) => (S_IOERR, 0),
            },
            req::GET_ID => {
                let mut id = [0u8; 20];
                let n = self.id.len().min(20);
                id[..n].copy_from_slice(&self.id.as_bytes()[..n]);
                let Some(&(addr, l)) = r.data.first() else {
                    return (S_IOERR, 0);
                };
                let n = (l as usize).min(20);
                if mem.write_slice(&id[..n], addr).is_err() {
                    return (S_IOERR, 0);
                }
                (S_OK, n as u32)
            }
            req::DISCARD | req::WRITE_ZEROES => {
                if self.read_only {
                    return (S_IOERR, 0);
                }
                // Segments of 16 bytes: sector u64, num_sectors u32, flags u32 (bit 0:
                // unmap).
                for &(addr, l) in &r.data {
                    if l % 16 != 0 {
                        return (S_IOERR, 0);
                    }
                    for i in 0..l / 16 {
                        let mut seg = [0u8; 16];
                        if mem
                            .read_slice(&mut seg, GuestAddress(addr.0 + u64::from(i) * 16))
                            .is_err()
                        {
                            return (S_IOERR, 0);
                        }
                        let mut s = [0u8; 8];
                        s.copy_from_slice(&seg[0..8]);
                        let sector = u64::from_le_bytes(s);
                        let n = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
                        let unmap = seg[12] & 1 != 0;
                        let (Some(off), Some(len)) =
                            (sector.checked_mul(512), u64::from(n).checked_mul(512))
                        else {
                            return (S_IOERR, 0);
                        };
                        let res = if r.kind == req::DISCARD {
                            self.dev.discard(off, len).await
                        } else {
                            self.dev
                                .write_zeroes(
                                    off,
                                    len,
                                    ZeroFlags {
                                        may_unmap: unmap,
                                        fast_only: false,
                                    },
                                )
                                .await
                        };
                        match res {
                            Ok(()) => {}
                            Err(BlockError::Unsupported(_)) => return (S_UNSUPP, 0),
                            Err(_) => return (S_IOERR, 0),
                        }
                    }
                }
                (S_OK, 0)
            }
            _ => {
                let _ = g;
                (S_UNSUPP, 0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::virtio::test_utils::{Desc, TestDriver};
    use basalt_blockdev::MemDev;

    fn header(kind: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }

    fn setup(read_only: bool) -> (tokio::runtime::Runtime, Arc<MemDev>, TestDriver) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let dev = Arc::new(MemDev::new(2048, 512));
        let block = Block::new("disk-7", dev.clone(), read_only, rt.handle().clone());
        let drv = TestDriver::new(
            Box::new(block),
            &[
                F_FLUSH,
                F_BLK_SIZE,
                F_DISCARD,
                F_WRITE_ZEROES,
                F_SEG_MAX,
                F_RO,
            ],
        );
        (rt, dev, drv)
    }

    #[test]
    fn write_then_read_through_the_queue() {
        let (rt, dev, mut drv) = setup(false);
        assert_eq!(drv.config_u64(0), 2048, "capacity in sectors");
        assert_eq!(drv.config_u32(20), 512, "blk_size");
        // Write two sectors from two buffers.
        let hdr = drv.alloc_bytes(&header(req::OUT, 8));
        let a = drv.alloc_bytes(&[0xaa; 512]);
        let b = drv.alloc_bytes(&[0xbb; 512]);
        let st = drv.alloc(1);
        drv.submit(
            0,
            &[
                Desc::r(hdr, 16),
                Desc::r(a, 512),
                Desc::r(b, 512),
                Desc::w(st, 1),
            ],
        );
        let used = drv.wait_used(0, 1);
        assert_eq!(used.len(), 1);
        assert_eq!(drv.read_u8(st), S_OK);
        let on_disk = rt.block_on(dev.read(8 * 512, 1024)).expect("read");
        assert!(on_disk[..512].iter().all(|&x| x == 0xaa));
        assert!(on_disk[512..].iter().all(|&x| x == 0xbb));
        // Read them back, plus get-id and flush in the same batch.
        let hdr = drv.alloc_bytes(&header(req::IN, 8));
        let out = drv.alloc(1024);
        let st1 = drv.alloc(1);
        let hdr2 = drv.alloc_bytes(&header(req::GET_ID, 0));
        let id = drv.alloc(20);
        let st2 = drv.alloc(1);
        let hdr3 = drv.alloc_bytes(&header(req::FLUSH, 0));
        let st3 = drv.alloc(1);
        drv.submit_many(
            0,
            &[
                vec![Desc::r(hdr, 16), Desc::w(out, 1024), Desc::w(st1, 1)],
                vec![Desc::r(hdr2, 16), Desc::w(id, 20), Desc::w(st2, 1)],
                vec![Desc::r(hdr3, 16), Desc::w(st3, 1)],
            ],
        );
        let used = drv.wait_used(0, 3);
        assert_eq!(used.len(), 3);
        assert_eq!(
            (drv.read_u8(st1), drv.read_u8(st2), drv.read_u8(st3)),
            (S_OK, S_OK, S_OK)
        );
        let data = drv.read_bytes(out, 1024);
        assert!(data[..512].iter().all(|&x| x == 0xaa) && data[512..].iter().all(|&x| x == 0xbb));
        assert_eq!(&drv.read_bytes(id, 6), b"disk-7");
        assert!(
            used.iter().any(|&(_, len)| len == 1025),
            "read reports bytes written + status"
        );
    }

    #[test]
    fn works_again_after_a_driver_reset() {
        let (_rt, _dev, mut drv) = setup(false);
        drv.reinit(&[F_FLUSH]);
        let hdr = drv.alloc_bytes(&header(req::FLUSH, 0));
        let st = drv.alloc(1);
        drv.submit(0, &[Desc::r(hdr, 16), Desc::w(st, 1)]);
        drv.wait_used(0, 1);
        assert_eq!(drv.read_u8(st), S_OK);
    }

    #[test]
    fn bad_requests_fail_cleanly() {
        let (_rt, _dev, mut drv) = setup(false);
        // Past the end of the disk.
        let hdr = drv.alloc_bytes(&header(req::IN, 2047));
        let out = drv.alloc(1024);
        let st = drv.alloc(1);
        drv.submit(0, &[Desc::r(hdr, 16), Desc::w(out, 1024), Desc::w(st, 1)]);
        drv.wait_used(0, 1);
        assert_eq!(drv.read_u8(st), S_IOERR);
        // Unknown type.
        let hdr = drv.alloc_bytes(&header(99, 0));
        let st = drv.alloc(1);
        drv.submit(0, &[Desc::r(hdr, 16), Desc::w(st, 1)]);
        drv.wait_used(0, 1);
        assert_eq!(drv.read_u8(st), S_UNSUPP);
        // A write whose data buffer is device-writable: wrong direction.
        let hdr = drv.alloc_bytes(&header(req::OUT, 0));
        let data = drv.alloc(512);
        let st = drv.alloc(1);
        drv.submit(0, &[Desc::r(hdr, 16), Desc::w(data, 512), Desc::w(st, 1)]);
        drv.wait_used(0, 1);
        assert_eq!(drv.read_u8(st), S_IOERR);
        // No status descriptor at all: returned with length 0.
        let hdr = drv.alloc_bytes(&header(req::IN, 0));
        drv.submit(0, &[Desc::r(hdr, 16)]);
        assert_eq!(drv.wait_used(0, 1), vec![(drv.last_head(), 0)]);
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let (_rt, _dev, mut drv) = setup(true);
        assert!(drv.device_features() & F_RO != 0);
        let hdr = drv.alloc_bytes(&header(req::OUT, 0));
        let data = drv.alloc_bytes(&[1; 512]);
        let st = drv.alloc(1);
        drv.submit(0, &[Desc::r(hdr, 16), Desc::r(data, 512), Desc::w(st, 1)]);
        drv.wait_used(0, 1);
        assert_eq!(drv.read_u8(st), S_IOERR);
    }

    #[test]
    fn discard_and_write_zeroes() {
        let (rt, dev, mut drv) = setup(false);
        rt.block_on(dev.write(0, Bytes::from(vec![7u8; 4096]), WriteFlags::default()))
            .expect("seed");
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&2u64.to_le_bytes());
        seg[8..12].copy_from_slice(&2u32.to_le_bytes());
        for kind in [req::WRITE_ZEROES, req::DISCARD] {
            let hdr = drv.alloc_bytes(&header(kind, 0));
            let s = drv.alloc_bytes(&seg);
            let st = drv.alloc(1);
            drv.submit(0, &[Desc::r(hdr, 16), Desc::r(s, 16), Desc::w(st, 1)]);
            drv.wait_used(0, 1);
            assert_eq!(drv.read_u8(st), S_OK);
            seg[0..8].copy_from_slice(&5u64.to_le_bytes());
        }
        let got = rt.block_on(dev.read(0, 4096)).expect("read");
        assert!(got[..1024].iter().all(|&x| x == 7));
        assert!(got[1024..2048].iter().all(|&x| x == 0));
        assert!(got[2048..2560].iter().all(|&x| x == 7));
        assert!(got[2560..3584].iter().all(|&x| x == 0));
    }
}
