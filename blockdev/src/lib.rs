//! Block devices: the one abstraction every Basalt storage layer stands on.
//!
//! A [`BlockDev`] is a byte-addressed array of logical blocks with reads and writes in
//! whole blocks, flush, discard, write-zeroes, an atomic compare-and-write, and a
//! [`Geometry`]. Disks, arrays, LUNs and remote LUNs all implement it, so each layer
//! stacks on the one below (SPDK's bdev model) and every test can wrap any of them in
//! the fault injector.
//!
//! # Backends and wrappers
//!
//! - [`UringFile`] ([`uring`]): a regular file or a block device through io_uring, with a
//!   driver thread per device, batched submission and O_DIRECT.
//! - [`MemDev`] ([`memory`]): sparse memory, for tests.
//! - [`FaultDev`] ([`fault`]): wraps any device to inject errors, latency, torn writes,
//!   a volatile write cache, crashes and dead disks.
//! - [`Metered`] ([`metered`]): wraps any device to count its requests in [`IoStats`].
//! - `conformance` (feature `test-utils`): the suite that checks every contract below
//!   against any implementation.
//!
//! Buffers are owned ([`bytes::Bytes`]) rather than borrowed: an io_uring request keeps
//! its buffer until the kernel completes it, even if the caller's future is dropped, so a
//! borrowed slice would not be sound. Backends that need aligned memory (O_DIRECT) get
//! it from [`AlignedBuf`] and copy only when a caller hands them unaligned bytes;
//! [`AlignedBuf`] recycles its allocations through a bounded pool, so a read costs
//! neither a fresh `mmap` nor a memset.

#![deny(missing_docs)]

mod buf;
#[cfg(any(test, feature = "test-utils"))]
pub mod conformance;
mod error;
pub mod fault;
mod geometry;
pub mod memory;
pub mod metered;
mod range_lock;
mod rng;
mod stats;
pub mod uring;

pub use buf::{AlignedBuf, BufPoolStats};
pub use error::{BlockError, Result};
pub use fault::FaultDev;
pub use geometry::{Capabilities, Geometry};
pub use memory::MemDev;
pub use metered::{Metered, MeteredDev};
pub use range_lock::{OwnedRangeGuard, RangeGuard, RangeLocks};
pub use stats::{IoKind, IoStats, IoStatsSnapshot, KindSnapshot, LATENCY_BUCKETS_SECONDS};
pub use uring::{DirectMode, OpenError, UringFile, UringOptions};

use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;

/// Options of a write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force Unit Access: the write is durable when it completes, without a flush.
    pub fua: bool,
}

/// Options of a write-zeroes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The device may deallocate the range instead of writing zeroes (SCSI WRITE SAME
    /// with UNMAP, NBD WRITE_ZEROES without NO_HOLE). Reads return zeroes either way.
    pub may_unmap: bool,
    /// Fail with [`BlockError::Unsupported`] rather than fall back to writing zero
    /// buffers when the device has no fast way to zero (NBD FAST_ZERO).
    pub fast_only: bool,
}

/// The result of [`BlockDev::compare_and_write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOutcome {
    /// The range matched and the new data was written.
    Written,
    /// The range differed; nothing was written. `offset` is the byte offset, from the
    /// start of the compared range, of the first byte that differs (SCSI reports it in
    /// the sense data's INFORMATION field).
    Miscompare {
        /// Byte offset of the first difference within the compared range.
        offset: u64,
    },
}

/// A block device.
///
/// Contracts every implementation keeps (the conformance suite, `conformance` under the
/// `test-utils` feature, checks them):
/// - `offset` and every length are multiples of [`Geometry::block_size`] and the range
///   lies inside the device; otherwise the call fails with
///   [`BlockError::Misaligned`] or [`BlockError::OutOfRange`] and touches nothing.
/// - A read returns exactly `len` bytes. Blocks never written, discarded or zeroed read
///   back as zeroes when [`Capabilities::discard_zeroes`] is set.
/// - A write that completes is visible to every later read; it is durable after a
///   later [`flush`](BlockDev::flush) completes, or at once with [`WriteFlags::fua`].
/// - `compare_and_write` is atomic against every other I/O on the same device object.
/// - Methods take `&self` and may be called concurrently; there is no ordering between
///   concurrent requests, as with a real disk's queue.
#[async_trait]
pub trait BlockDev: Send + Sync + 'static {
    /// Size, block size and capabilities. Constant for the life of the object unless the
    /// device is resized, in which case the new geometry is returned from then on.
    fn geometry(&self) -> Geometry;

    /// Reads `len` bytes at `offset`.
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes>;

    /// Writes `data` at `offset`.
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()>;

    /// Makes every completed write durable.
    async fn flush(&self) -> Result<()>;

    /// Tells the device the range's contents are no longer needed. Afterwards the range
    /// reads as zeroes if [`Capabilities::discard_zeroes`] is set, otherwise as
    /// unspecified (but stable) data. Fails with [`BlockError::Unsupported`] when
    /// [`Capabilities::discard`] is not set.
    async fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes the range read as zeroes.
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()>;

    /// Atomically: reads the range `[offset, offset + compare.len())`, and if it equals
    /// `compare`, writes `data` (of the same length) there.
    async fn compare_and_write(
        &self,
        offset: u64,
        compare: Bytes,
        data: Bytes,
        flags: WriteFlags,
    ) -> Result<CompareOutcome>;

    /// Describes how `[offset, offset + len)` is provisioned, as extents in address
    /// order that cover the range exactly (NBD BLOCK_STATUS, SCSI GET LBA STATUS).
    /// The default says "all data", which is always true; thin devices override it to
    /// report holes and zeroes.
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(&self.geometry(), offset, len)?;
        Ok(vec![Extent {
            len,
            kind: ExtentKind::Data,
        }])
    }

    /// For a device whose blocks are bytes of a buffered file: `[offset, offset + len)`
    /// as a range of that file, when the page cache holds all of it, so that a caller
    /// that can (an NBD reply on plain TCP) sends it with `sendfile(2)` straight from the
    /// page cache instead of copying it into memory and out to the socket again.
    /// `Ok(None)`, the default, when the device cannot or the range is not all cached:
    /// the caller then reads.
    ///
    /// Not a read in the sense of the contracts above: the socket takes references to
    /// the cached pages and their bytes are copied out (by the peer's receive, or a
    /// NIC) when the network gets to them, possibly after writes that were issued
    /// later. So it is **not atomic against `compare_and_write`** or any write that
    /// overlaps it, and a caller must use it only where an overlapping write in flight
    /// may show through, as it may for an NBD read (concurrent overlapping requests
    /// have no order), never for SCSI's COMPARE AND WRITE users. Holding the range lock
    /// until the data is gone cannot be done (the kernel does not say when), and
    /// holding it until the socket took the pages would let a client that stops
    /// reading stall every writer of the range.
    async fn cached_range(&self, offset: u64, len: u64) -> Result<Option<CachedRange>> {
        check_range(&self.geometry(), offset, len)?;
        Ok(None)
    }
}

/// A range of an open file that the page cache held when it was handed out (see
/// [`BlockDev::cached_range`]).
#[derive(Debug)]
pub struct CachedRange {
    file: Arc<std::fs::File>,
    offset: u64,
    len: u64,
}

impl CachedRange {
    /// The range `[offset, offset + len)` of `file`.
    pub fn new(file: Arc<std::fs::File>, offset: u64, len: u64) -> Self {
        CachedRange { file, offset, len }
    }

    /// The file.
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// Where the range starts in the file.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// How a run of blocks is provisioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated, holding data (which may happen to be zero).
    Data,
    /// Allocated and known to read as zeroes.
    Zero,
    /// Not allocated; reads as zeroes when [`Capabilities::discard_zeroes`] is set.
    Hole,
}

/// A run of blocks with one provisioning state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (a multiple of the block size).
    pub len: u64,
    /// Its state.
    pub kind: ExtentKind,
}

/// A shared, type-erased block device, the form in which layers hold the layer below.
pub type SharedBlockDev = Arc<dyn BlockDev>;

/// An `Arc` of a device is a device, so wrappers generic over `D: BlockDev` (such as
/// [`Metered`]) also take a [`SharedBlockDev`].
#[async_trait]
impl<T: BlockDev + ?Sized> BlockDev for Arc<T> {
    fn geometry(&self) -> Geometry {
        (**self).geometry()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        (**self).read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        (**self).write(offset, data, flags).await
    }

    async fn flush(&self) -> Result<()> {
        (**self).flush().await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        (**self).discard(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        (**self).write_zeroes(offset, len, flags).await
    }

    async fn compare_and_write(
        &self,
        offset: u64,
        compare: Bytes,
        data: Bytes,
        flags: WriteFlags,
    ) -> Result<CompareOutcome> {
        (**self)
            .compare_and_write(offset, compare, data, flags)
            .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        (**self).block_status(offset, len).await
    }
    async fn cached_range(&self, offset: u64, len: u64) -> Result<Option<CachedRange>> {
        (**self).cached_range(offset, len).await
    }
}

/// Checks that `[offset, offset + len)` is block-aligned and inside a device of
/// `geometry`. Every backend calls this first, so the error is the same everywhere.
pub fn check_range(geometry: &Geometry, offset: u64, len: u64) -> Result<()> {
    let bs = u64::from(geometry.block_size);
    if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
        return Err(BlockError::Misaligned {
            offset,
            len,
            block_size: geometry.block_size,
        });
    }
    let capacity = geometry.capacity_bytes();
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(BlockError::OutOfRange {
            offset,
            len,
            capacity,
        }),
    }
}

/// Checks a compare-and-write request: both buffers of one length, a block-aligned
/// range inside the device. Returns the length in bytes.
pub fn check_compare_and_write(
    geometry: &Geometry,
    offset: u64,
    compare: &[u8],
    data: &[u8],
) -> Result<u64> {
    if compare.len() != data.len() {
        return Err(BlockError::InvalidRequest(format!(
            "compare-and-write buffers differ in length: {} and {}",
            compare.len(),
            data.len()
        )));
    }
    let len = data.len() as u64;
    check_range(geometry, offset, len)?;
    Ok(len)
}

/// Returns the offset of the first byte where `a` and `b` differ, if any.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<u64> {
    a.iter().zip(b).position(|(x, y)| x != y).map(|p| p as u64)
}
