//! Multi-host test support: [`HostLink`], one host's path to a shared device.
//!
//! In-process multi-host tests give every host its own `HostLink` over one shared
//! device (whose compare-and-write is atomic for all of them, like a real target's).
//! The link injects the faults that belong to one host rather than to the device:
//!
//! - [`HostLink::pause`]: requests wait before being issued until
//!   [`resume`](HostLink::resume) (the host's process or VM stopped; SIGSTOP).
//! - [`HostLink::cut`]: every request fails with `EIO` (the host lost its storage path).
//! - [`HostLink::lose_next_ack`]: the next compare-and-write is applied by the device
//!   but reported as timed out (the answer was lost), so the host's retry miscompares
//!   against its own image.
//! - [`HostLink::delay_next_ack`]: the next compare-and-write is applied, but its
//!   answer arrives only after a delay (longer than the request timeout, it times out).
//! - [`HostLink::set_latency`]: a delay before every request.
//!
//! Device-wide faults (torn writes, crashes) come from wrapping the shared device in
//! [`FaultDev`](basalt_blockdev::FaultDev) once, below every link: a `FaultDev` per host
//! would not do, since each keeps its own cache and its compare-and-write is atomic only
//! against itself.

use async_trait::async_trait;
use basalt_blockdev::{
    BlockDev, BlockError, CompareOutcome, Extent, Geometry, Result, SharedBlockDev, WriteFlags,
    ZeroFlags,
};
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// One host's link to a shared device. See the [module docs](self).
///
/// Every request runs as its own tokio task, so a request the host has given up on
/// (timed out, future dropped) still reaches the device later, as a command already
/// on the wire would.
pub struct HostLink {
    inner: SharedBlockDev,
    st: Arc<LinkState>,
}

struct LinkState {
    paused: watch::Sender<bool>,
    cut: AtomicBool,
    lose_acks: AtomicU64,
    late_ack: Mutex<Option<Duration>>,
    latency: Mutex<Duration>,
    issued: AtomicU64,
}

impl HostLink {
    /// A fault-free link to `inner`.
    pub fn new(inner: SharedBlockDev) -> Self {
        HostLink {
            inner,
            st: Arc::new(LinkState {
                paused: watch::channel(false).0,
                cut: AtomicBool::new(false),
                lose_acks: AtomicU64::new(0),
                late_ack: Mutex::new(None),
                latency: Mutex::new(Duration::ZERO),
                issued: AtomicU64::new(0),
            }),
        }
    }

    /// Holds every request not yet at the device until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.st.paused.send_replace(true);
    }

    /// Releases held requests.
    pub fn resume(&self) {
        self.st.paused.send_replace(false);
    }

    /// Fails every request with `EIO` while `cut` is true.
    pub fn cut(&self, cut: bool) {
        self.st.cut.store(cut, Ordering::SeqCst);
    }

    /// The next `n` compare-and-writes are applied but reported as timed out.
    pub fn lose_next_ack(&self, n: u64) {
        self.st.lose_acks.store(n, Ordering::SeqCst);
    }

    /// The next compare-and-write is applied, but its answer comes back `d` later.
    pub fn delay_next_ack(&self, d: Duration) {
        *self
            .st
            .late_ack
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(d);
    }

    /// Delay before every request.
    pub fn set_latency(&self, d: Duration) {
        *self
            .st
            .latency
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = d;
    }

    /// Requests that reached the device.
    pub fn issued(&self) -> u64 {
        self.st.issued.load(Ordering::Relaxed)
    }

    async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(SharedBlockDev) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        let st = self.st.clone();
        let inner = self.inner.clone();
        let task = tokio::spawn(async move {
            st.enter(op).await?;
            f(inner).await
        });
        match task.await {
            Ok(r) => r,
            Err(e) => Err(BlockError::Offline(format!("link task failed: {e}"))),
        }
    }
}

impl LinkState {
    async fn enter(&self, op: &'static str) -> Result<()> {
        let d = *self
            .latency
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
        let mut rx = self.paused.subscribe();
        while *rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                break;
            }
        }
        if self.cut.load(Ordering::SeqCst) {
            return Err(BlockError::io(
                op,
                0,
                0,
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        self.issued.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[async_trait]
impl BlockDev for HostLink {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.run("read", move |d| async move { d.read(offset, len).await })
            .await
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.run("write", move |d| async move {
            d.write(offset, data, flags).await
        })
        .await
    }
    async fn flush(&self) -> Result<()> {
        self.run("flush", move |d| async move { d.flush().await })
            .await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.run(
            "discard",
            move |d| async move { d.discard(offset, len).await },
        )
        .await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.run("write_zeroes", move |d| async move {
            d.write_zeroes(offset, len, flags).await
        })
        .await
    }
    async fn compare_and_write(
        &self,
        offset: u64,
        compare: Bytes,
        data: Bytes,
        flags: WriteFlags,
    ) -> Result<CompareOutcome> {
        let st = self.st.clone();
        self.run("compare_and_write", move |d| async move {
            let r = d.compare_and_write(offset, compare, data, flags).await;
            let late = st
                .late_ack
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(late) = late {
                tokio::time::sleep(late).await;
            }
            let lose = st
                .lose_acks
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if lose {
                return Err(BlockError::io(
                    "compare_and_write",
                    offset,
                    0,
                    std::io::Error::from_raw_os_error(libc::ETIMEDOUT),
                ));
            }
            r
        })
        .await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.run("block_status", move |d| async move {
            d.block_status(offset, len).await
        })
        .await
    }
}
