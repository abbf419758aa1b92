use std::sync::Arc;
use tokio::sync::{
    OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
};

/// Striped range locks that make compare-and-write atomic against other I/O.
///
/// The device is cut into regions of [`RangeLocks::REGION_BYTES`]; region `r` maps to
/// stripe `r % STRIPES`. Ordinary reads and writes take their stripes shared, a
/// compare-and-write (or a RAID stripe update) takes them exclusive. Stripes are always
/// taken in ascending order, so two requests can never wait on each other in a cycle.
/// An uncontended shared acquisition costs a few atomic operations, so the common path
/// (no compare-and-write in flight) stays cheap.
///
/// The owned variants ([`RangeLocks::shared_owned`], [`RangeLocks::exclusive_owned`]) give
/// a guard that borrows nothing, so a backend can hand it to the request itself and drop it
/// when the kernel completes the I/O rather than when the caller's future goes away: a
/// write whose future is dropped while the kernel still runs it keeps its range locked,
/// and a compare-and-write cannot slip in between.
pub struct RangeLocks {
    stripes: Vec<Arc<RwLock<()>>>,
    region_shift: u32,
}

/// Held while a range is locked; dropping it releases the range.
pub enum RangeGuard<'a> {
    /// Shared hold.
    Shared(Vec<RwLockReadGuard<'a, ()>>),
    /// Exclusive hold.
    Exclusive(Vec<RwLockWriteGuard<'a, ()>>),
}

/// Like [`RangeGuard`] but borrowing nothing, so it can travel with a request to another
/// thread; dropping it releases the range.
pub enum OwnedRangeGuard {
    /// Shared hold.
    Shared(Vec<OwnedRwLockReadGuard<()>>),
    /// Exclusive hold.
    Exclusive(Vec<OwnedRwLockWriteGuard<()>>),
}

impl std::fmt::Debug for OwnedRangeGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OwnedRangeGuard::Shared(g) => write!(f, "OwnedRangeGuard::Shared({} stripes)", g.len()),
            OwnedRangeGuard::Exclusive(g) => {
                write!(f, "OwnedRangeGuard::Exclusive({} stripes)", g.len())
            }
        }
    }
}

impl Default for RangeLocks {
    fn default() -> Self {
        Self::new(Self::STRIPES, Self::REGION_BYTES)
    }
}

impl RangeLocks {
    /// Default number of stripes.
    pub const STRIPES: usize = 64;
    /// Default region size.
    pub const REGION_BYTES: u64 = 1 << 20;

    /// Locks with `stripes` stripes over regions of `region_bytes` (a power of two).
    pub fn new(stripes: usize, region_bytes: u64) -> Self {
        assert!(stripes > 0 && region_bytes.is_power_of_two());
        RangeLocks {
            stripes: (0..stripes).map(|_| Arc::new(RwLock::new(()))).collect(),
            region_shift: region_bytes.trailing_zeros(),
        }
    }

    fn stripes_of(&self, offset: u64, len: u64) -> Vec<usize> {
        let first = offset >> self.region_shift;
        let last = offset.saturating_add(len.max(1) - 1) >> self.region_shift;
        let n = self.stripes.len() as u64;
        if last - first + 1 >= n {
            return (0..self.stripes.len()).collect();
        }
        let mut ids: Vec<usize> = (first..=last).map(|r| (r % n) as usize).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Locks `[offset, offset + len)` shared.
    pub async fn shared(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let mut guards = Vec::new();
        for id in self.stripes_of(offset, len) {
            guards.push(self.stripes[id].read().await);
        }
        RangeGuard::Shared(guards)
    }

    /// Locks `[offset, offset + len)` exclusive.
    pub async fn exclusive(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let mut guards = Vec::new();
        for id in self.stripes_of(offset, len) {
            guards.push(self.stripes[id].write().await);
        }
        RangeGuard::Exclusive(guards)
    }

    /// Locks `[offset, offset + len)` shared, with a guard that borrows nothing.
    pub async fn shared_owned(&self, offset: u64, len: u64) -> OwnedRangeGuard {
        let mut guards = Vec::new();
        for id in self.stripes_of(offset, len) {
            guards.push(self.stripes[id].clone().read_owned().await);
        }
        OwnedRangeGuard::Shared(guards)
    }

    /// Locks `[offset, offset + len)` exclusive, with a guard that borrows nothing.
    pub async fn exclusive_owned(&self, offset: u64, len: u64) -> OwnedRangeGuard {
        let mut guards = Vec::new();
        for id in self.stripes_of(offset, len) {
            guards.push(self.stripes[id].clone().write_owned().await);
        }
        OwnedRangeGuard::Exclusive(guards)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn exclusive_waits_for_shared_on_same_region() {
        let locks = Arc::new(RangeLocks::default());
        let shared = locks.shared(0, 4096).await;
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.exclusive(512, 512).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(shared);
        waiter.await.unwrap();
    }

    #[tokio::test]
    async fn disjoint_regions_do_not_block() {
        let locks = RangeLocks::default();
        let _a = locks.exclusive(0, 4096).await;
        let _b = locks.exclusive(RangeLocks::REGION_BYTES, 4096).await;
    }

    #[test]
    fn huge_range_takes_every_stripe_once() {
        let locks = RangeLocks::new(4, 1 << 20);
        assert_eq!(locks.stripes_of(0, 100 << 20), vec![0, 1, 2, 3]);
        assert_eq!(locks.stripes_of(3 << 20, 2 << 20), vec![0, 3]);
    }
}
