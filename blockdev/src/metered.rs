//! [`Metered`]: a pass-through wrapper that counts every request in an [`IoStats`].
//!
//! The counters are shared (`Arc<IoStats>`), so the daemon keeps one handle for its
//! `/metrics` rendering while the device travels up the stack. Rejected requests
//! (misaligned, out of range) count as errors like any other failure: they are requests
//! the device received. A compare-and-write counts once, as
//! [`IoKind::CompareAndWrite`], with its data length as bytes when it wrote and 0 when it
//! miscompared.

use crate::{
    BlockDev, CompareOutcome, Extent, Geometry, IoKind, IoStats, Result, SharedBlockDev,
    WriteFlags, ZeroFlags,
};
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;

/// Counts every request to `D` in an [`IoStats`].
pub struct Metered<D> {
    inner: D,
    stats: Arc<IoStats>,
}

/// The usual form: metering a shared device.
pub type MeteredDev = Metered<SharedBlockDev>;

impl<D: BlockDev> Metered<D> {
    /// Wraps `inner` with fresh counters.
    pub fn new(inner: D) -> Self {
        Self::with_stats(inner, Arc::new(IoStats::default()))
    }

    /// Wraps `inner`, counting into `stats` (which may be shared with other devices to
    /// aggregate them).
    pub fn with_stats(inner: D, stats: Arc<IoStats>) -> Self {
        Metered { inner, stats }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<IoStats> {
        &self.stats
    }

    /// The wrapped device.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Unwraps.
    pub fn into_inner(self) -> D {
        self.inner
    }
}

#[async_trait]
impl<D: BlockDev> BlockDev for Metered<D> {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        let t = self.stats.start();
        let r = self.inner.read(offset, len).await;
        self.stats.finish(IoKind::Read, t, len as u64, r.is_ok());
        r
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        let len = data.len() as u64;
        let t = self.stats.start();
        let r = self.inner.write(offset, data, flags).await;
        self.stats.finish(IoKind::Write, t, len, r.is_ok());
        r
    }

    async fn flush(&self) -> Result<()> {
        let t = self.stats.start();
        let r = self.inner.flush().await;
        self.stats.finish(IoKind::Flush, t, 0, r.is_ok());
        r
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let t = self.stats.start();
        let r = self.inner.discard(offset, len).await;
        self.stats.finish(IoKind::Discard, t, len, r.is_ok());
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let t = self.stats.start();
        let r = self.inner.write_zeroes(offset, len, flags).await;
        self.stats.finish(IoKind::WriteZeroes, t, len, r.is_ok());
        r
    }

    async fn compare_and_write(
        &self,
        offset: u64,
        compare: Bytes,
        data: Bytes,
        flags: WriteFlags,
    ) -> Result<CompareOutcome> {
        let len = data.len() as u64;
        let t = self.stats.start();
        let r = self
            .inner
            .compare_and_write(offset, compare, data, flags)
            .await;
        let bytes = match r {
            Ok(CompareOutcome::Written) => len,
            _ => 0,
        };
        self.stats
            .finish(IoKind::CompareAndWrite, t, bytes, r.is_ok());
        r
    }

    /// Forwarded, uncounted (it moves no data).
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.block_status(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{conformance, BlockError, MemDev};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance() {
        conformance::run("Metered(MemDev)", || async {
            let mem: SharedBlockDev = Arc::new(MemDev::new(32 << 11, 512));
            Arc::new(Metered::new(mem)) as SharedBlockDev
        })
        .await;
    }

    #[tokio::test]
    async fn counts_each_kind() {
        let dev: MeteredDev = Metered::new(Arc::new(MemDev::new(1024, 512)));
        let no = WriteFlags::default();
        dev.write(0, Bytes::from(vec![1u8; 1024]), no)
            .await
            .unwrap();
        dev.read(0, 512).await.unwrap();
        assert!(matches!(
            dev.read(1, 512).await,
            Err(BlockError::Misaligned { .. })
        ));
        dev.flush().await.unwrap();
        dev.discard(0, 512).await.unwrap();
        dev.write_zeroes(512, 512, ZeroFlags::default())
            .await
            .unwrap();
        let miss = dev
            .compare_and_write(
                0,
                Bytes::from(vec![9u8; 512]),
                Bytes::from(vec![2u8; 512]),
                no,
            )
            .await
            .unwrap();
        assert!(matches!(miss, CompareOutcome::Miscompare { offset: 0 }));
        let s = dev.stats().snapshot();
        assert_eq!(s.kind(IoKind::Write).ops, 1);
        assert_eq!(s.kind(IoKind::Write).bytes, 1024);
        assert_eq!(s.kind(IoKind::Read).ops, 2);
        assert_eq!(s.kind(IoKind::Read).errors, 1);
        assert_eq!(s.kind(IoKind::Read).bytes, 512);
        assert_eq!(s.kind(IoKind::Flush).ops, 1);
        assert_eq!(s.kind(IoKind::Discard).bytes, 512);
        assert_eq!(s.kind(IoKind::WriteZeroes).bytes, 512);
        assert_eq!(s.kind(IoKind::CompareAndWrite).ops, 1);
        assert_eq!(s.kind(IoKind::CompareAndWrite).bytes, 0);
        assert_eq!(s.in_flight, 0);
    }
}
