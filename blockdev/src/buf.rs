//! [`AlignedBuf`] and the pool that recycles its allocations.
//!
//! Every read needs a fresh buffer, and allocating one is not free: glibc serves a
//! 1 MiB request with `mmap`, the first touch of each of its 256 pages faults, and
//! `free` gives it back with `munmap`. Measured on the NBD path, sequential 1 MiB reads
//! went from 540 to 1650 MiB/s once that churn stopped. So buffers come from a pool:
//!
//! - **Size classes**: powers of two from 4 KiB ([`AlignedBuf::ALIGN`]) to 8 MiB. A
//!   buffer takes the smallest class that holds it; larger ones bypass the pool.
//! - **Sharded**: a mutex-protected free list per class in each of a few shards
//!   (one per CPU, up to 16); a thread keeps to its own shard and only looks at the
//!   others (without waiting for their locks) when its own has nothing.
//! - **Bounded**: at most [`AlignedBuf::set_pool_limit`] bytes (128 MiB by default) wait
//!   in the pool, and one class may fill at most half of it (counted over all shards),
//!   so one size of request cannot take all of it. Whatever does not fit is freed. The
//!   bound must hold a target's whole queue of large reads: at 64 MiB with a quarter of
//!   a shard's share per class, only 16 MiB of 1 MiB buffers were kept, an iSCSI
//!   initiator at QD32 keeps 32 in flight, and half the CPU of 1 MiB iSCSI reads went to
//!   allocating, page-faulting and unmapping fresh buffers (perf, `bench/iscsi-vs-tgt.sh`).
//! - **Returned on drop**: [`AlignedBuf::freeze`] hands the buffer to
//!   [`Bytes::from_owner`], so the allocation goes back to the pool when the last clone
//!   or slice of the `Bytes` is dropped, wherever that happens.
//!
//! A recycled buffer holds whatever its previous user left in it: initialised memory,
//! but stale. [`AlignedBuf::zeroed`] clears it; [`AlignedBuf::for_overwrite`] does not,
//! for callers (reads, bounce copies) that overwrite every byte before anyone sees it.

use bytes::Bytes;
use std::alloc::{self, Layout};
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};

/// A heap buffer whose start is aligned for direct I/O.
///
/// O_DIRECT needs the buffer address, the offset and the length aligned to the device's
/// logical block size; [`AlignedBuf::ALIGN`] (4096) covers every block size we use.
/// [`AlignedBuf::freeze`] turns it into [`Bytes`] without copying, so a buffer read from
/// a disk travels up the stack and out to a socket as is. Allocations are recycled
/// through a process-wide pool (see [`AlignedBuf::pool_stats`]).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads through `&[u8]`.
unsafe impl Sync for AlignedBuf {}

/// Counters of the buffer pool, for benchmarks and tuning.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BufPoolStats {
    /// Buffers served from the pool.
    pub hits: u64,
    /// Buffers of a pooled size that had to be allocated.
    pub misses: u64,
    /// Buffers given back to the pool.
    pub recycled: u64,
    /// Buffers of a pooled size freed because the pool was full.
    pub released: u64,
    /// Bytes waiting in the pool now.
    pub cached_bytes: u64,
}

impl AlignedBuf {
    /// The alignment of every buffer.
    pub const ALIGN: usize = 4096;

    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let (mut buf, fresh) = Self::obtain(len);
        if !fresh {
            buf.as_mut_slice().fill(0);
        }
        buf
    }

    /// A buffer of `len` bytes with unspecified contents: zeroes, or whatever an earlier
    /// user of the same memory left there (initialised, but possibly another device's
    /// data). For callers that overwrite every byte before the buffer is seen, such as a
    /// read that fails unless it fills the buffer, or a copy.
    pub fn for_overwrite(len: usize) -> Self {
        Self::obtain(len).0
    }

    /// A buffer from the pool, or a fresh (zeroed) allocation, and which one it is.
    fn obtain(len: usize) -> (Self, bool) {
        match class_of(len) {
            Some(class) => {
                let layout = class_layout(class);
                match pool().take(class) {
                    Some(ptr) => (AlignedBuf { ptr, len, layout }, false),
                    None => {
                        pool().misses.fetch_add(1, Ordering::Relaxed);
                        (Self::allocate(len, layout), true)
                    }
                }
            }
            None => {
                let size = len.next_multiple_of(Self::ALIGN);
                match Layout::from_size_align(size, Self::ALIGN) {
                    Ok(layout) => (Self::allocate(len, layout), true),
                    Err(_) => panic!("buffer of {len} bytes is too large"),
                }
            }
        }
    }

    /// A fresh allocation, zeroed once here so that a recycled buffer never holds
    /// uninitialised bytes.
    fn allocate(len: usize, layout: Layout) -> Self {
        // SAFETY: every layout here has a non-zero size (at least one page).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, layout }
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_from(data: &[u8]) -> Self {
        let mut buf = Self::for_overwrite(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes while self lives (zeroed when
        // allocated, and only ever written with initialised data since).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer for handing to the kernel.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Shortens the buffer to `len` bytes (no reallocation).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Converts into [`Bytes`] without copying; the allocation lives as long as any
    /// clone or slice of the result, then goes back to the pool.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }

    /// True when `data` starts at an address aligned to `align`.
    pub fn is_aligned(data: &[u8], align: usize) -> bool {
        (data.as_ptr() as usize).is_multiple_of(align)
    }

    /// Counters of the process-wide buffer pool.
    pub fn pool_stats() -> BufPoolStats {
        pool().stats()
    }

    /// Caps the bytes the process-wide buffer pool keeps for reuse (default 128 MiB; 0
    /// turns recycling off). Buffers already cached above a lowered limit are freed as
    /// they are taken, not at once.
    pub fn set_pool_limit(bytes: usize) {
        pool().limit.store(bytes, Ordering::Relaxed);
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(class) = class_of_size(self.layout.size()) {
            if pool().give(class, self.ptr) {
                return;
            }
        }
        // SAFETY: ptr was allocated with this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

/// log2 of the smallest class (4 KiB, one page: `AlignedBuf::ALIGN`).
const MIN_SHIFT: u32 = 12;
/// Number of classes: 4 KiB, 8 KiB, ..., 8 MiB.
const CLASSES: usize = 12;
/// Default cap on the bytes cached by the pool.
const DEFAULT_LIMIT: usize = 128 << 20;
/// Most shards, whatever the CPU count.
const MAX_SHARDS: usize = 16;

fn class_size(class: usize) -> usize {
    1 << (MIN_SHIFT as usize + class)
}

fn class_layout(class: usize) -> Layout {
    // Powers of two of at least 4096 bytes, aligned to 4096: always a valid layout.
    Layout::from_size_align(class_size(class), AlignedBuf::ALIGN)
        .unwrap_or_else(|_| unreachable!("class sizes are valid layouts"))
}

/// The class that holds `len` bytes, if any.
fn class_of(len: usize) -> Option<usize> {
    let size = len.max(1).checked_next_power_of_two()?;
    let shift = size.trailing_zeros().max(MIN_SHIFT);
    let class = (shift - MIN_SHIFT) as usize;
    (class < CLASSES).then_some(class)
}

/// The class whose size is exactly `size`, if any.
fn class_of_size(size: usize) -> Option<usize> {
    if !size.is_power_of_two() {
        return None;
    }
    let shift = size.trailing_zeros();
    if shift < MIN_SHIFT {
        return None;
    }
    let class = (shift - MIN_SHIFT) as usize;
    (class < CLASSES).then_some(class)
}

/// A cached allocation of one class.
struct Block(NonNull<u8>);

// SAFETY: a cached block is owned by the pool alone; whoever takes it owns it.
unsafe impl Send for Block {}

#[derive(Default)]
struct ShardLists {
    free: [Vec<Block>; CLASSES],
    hits: u64,
    recycled: u64,
    released: u64,
}

/// One shard, on cache lines of its own.
#[repr(align(128))]
#[derive(Default)]
struct Shard(Mutex<ShardLists>);

impl Shard {
    fn lock(&self) -> MutexGuard<'_, ShardLists> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn try_lock(&self) -> Option<MutexGuard<'_, ShardLists>> {
        match self.0.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }
}

struct Pool {
    shards: Box<[Shard]>,
    /// Bytes waiting in the pool, across shards: the bound is checked against it.
    cached: AtomicUsize,
    /// The same per class, for the per-class bound.
    class_cached: [AtomicUsize; CLASSES],
    limit: AtomicUsize,
    misses: AtomicUsize,
    /// Hands out shards to threads round-robin.
    next_home: AtomicUsize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Pool::new(cpus.clamp(1, MAX_SHARDS), DEFAULT_LIMIT)
    })
}

thread_local! {
    /// This thread's shard (usize::MAX until first use).
    static HOME: Cell<usize> = const { Cell::new(usize::MAX) };
}

impl Pool {
    fn new(shards: usize, limit: usize) -> Pool {
        Pool {
            shards: (0..shards.max(1)).map(|_| Shard::default()).collect(),
            cached: AtomicUsize::new(0),
            class_cached: std::array::from_fn(|_| AtomicUsize::new(0)),
            limit: AtomicUsize::new(limit),
            misses: AtomicUsize::new(0),
            next_home: AtomicUsize::new(0),
        }
    }

    fn home(&self) -> usize {
        let n = self.shards.len();
        // During thread teardown the thread-local may be gone: use shard 0.
        HOME.try_with(|h| {
            if h.get() == usize::MAX {
                h.set(self.next_home.fetch_add(1, Ordering::Relaxed));
            }
            h.get() % n
        })
        .unwrap_or(0)
    }

    /// Most buffers of `class` the pool keeps, across its shards: half of the limit
    /// (at least one). Counted over the whole pool rather than per shard, so that the
    /// bound does not shrink with the number of CPUs.
    fn class_cap(&self, class: usize) -> usize {
        (self.limit.load(Ordering::Relaxed) / 2 / class_size(class)).max(1)
    }

    /// A cached buffer of `class`: from this thread's shard, else from any other shard
    /// whose lock is free.
    fn take(&self, class: usize) -> Option<NonNull<u8>> {
        let home = self.home();
        let n = self.shards.len();
        for i in 0..n {
            let shard = &self.shards[(home + i) % n];
            let lists = if i == 0 {
                Some(shard.lock())
            } else {
                shard.try_lock()
            };
            let Some(mut lists) = lists else { continue };
            if let Some(Block(ptr)) = lists.free[class].pop() {
                lists.hits += 1;
                drop(lists);
                self.cached.fetch_sub(class_size(class), Ordering::Relaxed);
                self.class_cached[class].fetch_sub(class_size(class), Ordering::Relaxed);
                return Some(ptr);
            }
        }
        None
    }

    /// Keeps `ptr` (an allocation of `class`) for reuse; false when the pool is full and
    /// the caller must free it.
    fn give(&self, class: usize, ptr: NonNull<u8>) -> bool {
        let size = class_size(class);
        let class_limit = self.class_cap(class) * size;
        let limit = self.limit.load(Ordering::Relaxed);
        let mut lists = self.shards[self.home()].lock();
        let fits = self.cached.fetch_add(size, Ordering::Relaxed) + size <= limit;
        let class_fits =
            self.class_cached[class].fetch_add(size, Ordering::Relaxed) + size <= class_limit;
        if !fits || !class_fits {
            self.cached.fetch_sub(size, Ordering::Relaxed);
            self.class_cached[class].fetch_sub(size, Ordering::Relaxed);
            lists.released += 1;
            return false;
        }
        lists.free[class].push(Block(ptr));
        lists.recycled += 1;
        true
    }

    fn stats(&self) -> BufPoolStats {
        let mut s = BufPoolStats {
            misses: self.misses.load(Ordering::Relaxed) as u64,
            cached_bytes: self.cached.load(Ordering::Relaxed) as u64,
            ..BufPoolStats::default()
        };
        for shard in self.shards.iter() {
            let l = shard.lock();
            s.hits += l.hits;
            s.recycled += l.recycled;
            s.released += l.released;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_is_aligned_and_zero() {
        for len in [0, 1, 512, 4096, 4097, 1 << 20, (8 << 20) + 1] {
            let buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.len(), len);
            assert!(AlignedBuf::is_aligned(buf.as_slice(), AlignedBuf::ALIGN));
            assert!(buf.as_slice().iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn freeze_keeps_bytes_and_alignment() {
        let mut buf = AlignedBuf::zeroed(8192);
        buf.as_mut_slice()[100] = 7;
        let bytes = buf.freeze();
        assert_eq!(bytes.len(), 8192);
        assert_eq!(bytes[100], 7);
        assert!(AlignedBuf::is_aligned(&bytes, 4096));
        let tail = bytes.slice(4096..);
        assert!(AlignedBuf::is_aligned(&tail, 4096));
    }

    #[test]
    fn classes() {
        assert_eq!(class_of(0), Some(0));
        assert_eq!(class_of(1), Some(0));
        assert_eq!(class_of(4096), Some(0));
        assert_eq!(class_of(4097), Some(1));
        assert_eq!(class_of(1 << 20), Some(8));
        assert_eq!(class_of((1 << 20) + 512), Some(9));
        assert_eq!(class_of(8 << 20), Some(11));
        assert_eq!(class_of((8 << 20) + 1), None);
        assert_eq!(class_of(usize::MAX), None);
        assert_eq!(class_of_size(4096), Some(0));
        assert_eq!(class_of_size(8 << 20), Some(11));
        assert_eq!(class_of_size(8192 + 4096), None);
        assert_eq!(class_of_size(2048), None);
        assert_eq!(class_of_size(16 << 20), None);
    }

    // Each test runs in a process of its own (nextest), so the global pool's counters
    // below see only this test's buffers.
    #[test]
    fn buffers_come_back_when_the_last_bytes_clone_drops() {
        let mut buf = AlignedBuf::for_overwrite(1 << 20);
        buf.as_mut_slice().fill(0xa5);
        let addr = buf.as_slice().as_ptr() as usize;
        let bytes = buf.freeze();
        let slice = bytes.slice(4096..8192);
        drop(bytes);
        // A slice still holds it: a new buffer must be other memory.
        let other = AlignedBuf::for_overwrite(1 << 20);
        assert_ne!(other.as_slice().as_ptr() as usize, addr);
        assert_eq!(slice[0], 0xa5);
        drop(slice);
        // Now it is back, and served again (stale, as promised) to the same thread.
        let again = AlignedBuf::for_overwrite((1 << 20) - 4096);
        assert_eq!(again.as_slice().as_ptr() as usize, addr);
        assert!(again.as_slice().iter().all(|&b| b == 0xa5));
        drop(again);
        // zeroed clears a recycled buffer.
        let z = AlignedBuf::zeroed(1 << 20);
        assert_eq!(z.as_slice().as_ptr() as usize, addr);
        assert!(z.as_slice().iter().all(|&b| b == 0));
        drop(other);
        drop(z);
        let s = AlignedBuf::pool_stats();
        assert!(s.hits >= 2 && s.misses >= 2 && s.recycled >= 3, "{s:?}");
        assert_eq!(s.cached_bytes, 2 << 20, "{s:?}");
    }

    #[test]
    fn buffers_move_between_threads() {
        // Allocated on one thread, dropped on another, taken again on the first.
        let buf = AlignedBuf::for_overwrite(64 << 10);
        let addr = buf.as_slice().as_ptr() as usize;
        std::thread::spawn(move || drop(buf.freeze()))
            .join()
            .unwrap();
        let again = AlignedBuf::for_overwrite(64 << 10);
        assert_eq!(again.as_slice().as_ptr() as usize, addr);
    }

    #[test]
    fn limit_bounds_what_is_kept() {
        AlignedBuf::set_pool_limit(3 << 20);
        let bufs: Vec<_> = (0..8).map(|_| AlignedBuf::for_overwrite(1 << 20)).collect();
        drop(bufs);
        let s = AlignedBuf::pool_stats();
        assert!(s.cached_bytes <= 3 << 20, "{s:?}");
        assert!(s.released >= 5, "{s:?}");
        AlignedBuf::set_pool_limit(0);
        let b = AlignedBuf::for_overwrite(4096);
        drop(b);
        let t = AlignedBuf::pool_stats();
        assert_eq!(t.released, s.released + 1, "{t:?}");
        // Large buffers bypass the pool altogether.
        AlignedBuf::set_pool_limit(DEFAULT_LIMIT);
        let big = AlignedBuf::for_overwrite(9 << 20);
        assert_eq!(big.len(), 9 << 20);
        drop(big);
        assert_eq!(AlignedBuf::pool_stats().released, t.released);
    }

    #[test]
    fn pool_shards_share_and_cap_classes() {
        let pool = Pool::new(2, 64 << 20);
        // Half of the 64 MiB limit: sixteen buffers of 2 MiB (class 9), four of 8 MiB,
        // whatever the number of shards.
        assert_eq!(pool.class_cap(9), 16);
        assert_eq!(pool.class_cap(11), 4);
        assert_eq!(Pool::new(16, 64 << 20).class_cap(9), 16);
        let layout = class_layout(0);
        // SAFETY: test allocation of a valid layout, freed below.
        let p = NonNull::new(unsafe { alloc::alloc_zeroed(layout) }).unwrap();
        assert!(pool.give(0, p));
        assert_eq!(pool.cached.load(Ordering::Relaxed), 4096);
        // Another thread (another home shard) finds it by looking at the other shards.
        let got = std::thread::scope(|s| {
            // A new thread gets the next shard as its home.
            s.spawn(|| pool.take(0).map(|p| p.as_ptr() as usize))
                .join()
                .unwrap()
        });
        assert_eq!(got, Some(p.as_ptr() as usize));
        assert_eq!(pool.cached.load(Ordering::Relaxed), 0);
        assert!(pool.take(0).is_none());
        // SAFETY: allocated above with this layout; the pool no longer holds it.
        unsafe { alloc::dealloc(p.as_ptr(), layout) };
    }
}
