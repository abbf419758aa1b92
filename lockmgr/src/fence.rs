//! Fencing: how a host that is no longer entitled to write learns it before writing.
//!
//! Three mechanisms, from cheapest to strongest (DESIGN.md, "Fencing"):
//!
//! 1. **Lease check** ([`Fence::check`]): every lock guard carries a [`Fence`] sharing
//!    the host's lease. The lease runs from the issue time of the last acknowledged
//!    heartbeat for `dead_after - heartbeat` (6 s by default), measured with the local
//!    monotonic clock; no other host may take the slot over before `dead_after` (9 s)
//!    after that heartbeat landed. `check` returns the time left; a protected write may
//!    be issued only while the time left exceeds its I/O timeout ([`FencedDev`] does
//!    exactly that), so it lands before anyone can take over.
//! 2. **Generation**: when a paused host resumes, its next renewal CAW miscompares
//!    against the taker's image (generation + 1); it declares itself lost and every
//!    `Fence` of it fails from then on.
//! 3. **CAW-guarded metadata** ([`crate::LockGuard::write_payload`]): the lock's value
//!    block is written with a CAW of the whole lock record, which includes the holder
//!    entry `(slot, generation)`. Once a taker has transferred the entry to the new
//!    generation, the stale holder's write miscompares and is refused, whatever its
//!    clock says and however long it was paused between check and write.

use crate::clock::Clock;
use crate::error::{FenceReason, LockError};
use crate::format::Holder;
use crate::metrics::Metrics;
use async_trait::async_trait;
use basalt_blockdev::{
    BlockDev, BlockError, CompareOutcome, Extent, Geometry, Result as BlockResult, WriteFlags,
    ZeroFlags,
};
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The lease of one slot incarnation: valid until `expiry` (clock time, ns) unless
/// revoked.
#[derive(Debug)]
pub(crate) struct LeaseCell {
    expiry_ns: AtomicU64,
    revoked: AtomicBool,
}

impl LeaseCell {
    pub(crate) fn new(expiry: Duration) -> Arc<Self> {
        Arc::new(LeaseCell {
            expiry_ns: AtomicU64::new(dur_ns(expiry)),
            revoked: AtomicBool::new(false),
        })
    }

    /// Moves the expiry forward (never back).
    pub(crate) fn extend(&self, expiry: Duration) {
        self.expiry_ns.fetch_max(dur_ns(expiry), Ordering::AcqRel);
    }

    pub(crate) fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
    }

    pub(crate) fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    pub(crate) fn expiry(&self) -> Duration {
        Duration::from_nanos(self.expiry_ns.load(Ordering::Acquire))
    }

    /// Time left at `now`, or why none.
    pub(crate) fn remaining(&self, now: Duration) -> Result<Duration, FenceReason> {
        if self.is_revoked() {
            return Err(FenceReason::Lost);
        }
        let exp = self.expiry();
        if now >= exp {
            return Err(FenceReason::LeaseExpired);
        }
        Ok(exp - now)
    }
}

fn dur_ns(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

/// A fencing token: the right to issue protected writes, valid while the holder's
/// lease(s) are and while the lock it came with is held. Cheap to clone and check.
#[derive(Clone)]
pub struct Fence {
    pub(crate) cells: Vec<Arc<LeaseCell>>,
    pub(crate) held: Option<Arc<AtomicBool>>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) holder: Holder,
    pub(crate) epoch: u64,
    pub(crate) metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence")
            .field("holder", &self.holder)
            .field("epoch", &self.epoch)
            .field("check", &self.check_quiet())
            .finish()
    }
}

impl Fence {
    /// Time left on the lease, or why the token is no longer valid. A protected write
    /// may be issued only if the time left exceeds its I/O timeout.
    pub fn check(&self) -> Result<Duration, LockError> {
        self.check_quiet().map_err(|r| {
            self.metrics.fenced_writes_refused.inc();
            LockError::Fenced(r)
        })
    }

    fn check_quiet(&self) -> Result<Duration, FenceReason> {
        if let Some(h) = &self.held {
            if !h.load(Ordering::Acquire) {
                return Err(FenceReason::Released);
            }
        }
        let now = self.clock.now();
        let mut left = Duration::MAX;
        for c in &self.cells {
            left = left.min(c.remaining(now)?);
        }
        Ok(left)
    }

    /// [`check`](Self::check), and also that at least `io_timeout` is left.
    pub fn check_for(&self, io_timeout: Duration) -> Result<Duration, LockError> {
        let left = self.check()?;
        if left <= io_timeout {
            self.metrics.fenced_writes_refused.inc();
            return Err(LockError::Fenced(FenceReason::LeaseExpired));
        }
        Ok(left)
    }

    /// The holder (slot and generation) this token belongs to.
    pub fn holder(&self) -> Holder {
        self.holder
    }

    /// The lock's epoch at grant: a number that grows with every grant of the resource,
    /// for data structures that want to record which grant wrote them.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// A device whose modifying requests are issued only while a [`Fence`] is valid with at
/// least `io_timeout` to spare, and are abandoned (reported failed) after `io_timeout`.
/// Refused requests fail with [`BlockError::Offline`] saying "fenced". Reads pass.
pub struct FencedDev<D> {
    inner: D,
    fence: Fence,
    io_timeout: Duration,
}

impl<D: BlockDev> FencedDev<D> {
    /// Guards `inner` with `fence`.
    pub fn new(inner: D, fence: Fence, io_timeout: Duration) -> Self {
        FencedDev {
            inner,
            fence,
            io_timeout,
        }
    }

    fn gate(&self) -> BlockResult<()> {
        self.fence
            .check_for(self.io_timeout)
            .map(|_| ())
            .map_err(|e| BlockError::Offline(format!("fenced: {e}")))
    }

    async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = BlockResult<T>>,
    ) -> BlockResult<T> {
        match tokio::time::timeout(self.io_timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(BlockError::io(
                "fenced write",
                0,
                0,
                std::io::Error::from_raw_os_error(libc::ETIMEDOUT),
            )),
        }
    }
}

#[async_trait]
impl<D: BlockDev> BlockDev for FencedDev<D> {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    async fn read(&self, offset: u64, len: usize) -> BlockResult<Bytes> {
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> BlockResult<()> {
        self.gate()?;
        self.timed(self.inner.write(offset, data, flags)).await
    }
    async fn flush(&self) -> BlockResult<()> {
        self.inner.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.gate()?;
        self.timed(self.inner.discard(offset, len)).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.gate()?;
        self.timed(self.inner.write_zeroes(offset, len, flags))
            .await
    }
    async fn compare_and_write(
        &self,
        offset: u64,
        compare: Bytes,
        data: Bytes,
        flags: WriteFlags,
    ) -> BlockResult<CompareOutcome> {
        self.gate()?;
        self.timed(self.inner.compare_and_write(offset, compare, data, flags))
            .await
    }
    async fn block_status(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
        self.inner.block_status(offset, len).await
    }
}
