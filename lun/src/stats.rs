//! Counters of pools and LUNs, as plain atomics the daemon renders at scrape time.
//!
//! Counters only grow (the daemon computes rates); gauges (sizes, usage) come from
//! [`Pool::usage`](crate::Pool::usage) and [`Pool::list`](crate::Pool::list). I/O counts
//! use blockdev's [`IoStats`], which the daemon already renders for disks, so a LUN's
//! series look like a disk's. A JSON form (`serde`) is there for the API.

use basalt_blockdev::IoStats;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

macro_rules! counters {
    ($(#[$m:meta])* $name:ident, $snap:ident { $($(#[$fm:meta])* $f:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Default)]
        pub struct $name {
            $($(#[$fm])* pub $f: AtomicU64,)*
        }

        /// A point-in-time copy of the counters.
        #[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
        pub struct $snap {
            $($(#[$fm])* pub $f: u64,)*
        }

        impl $name {
            /// Copies every counter.
            pub fn snapshot(&self) -> $snap {
                $snap { $($f: self.$f.load(Relaxed),)* }
            }
        }
    };
}

counters!(
    /// Per-pool counters.
    PoolCounters, PoolCountersSnapshot {
        /// Metadata commits (journal appends and checkpoints).
        commits_total,
        /// Journal blocks written.
        journal_blocks_total,
        /// Checkpoints written.
        checkpoints_total,
        /// Time spent committing, in nanoseconds.
        commit_nanoseconds_total,
        /// Chunks allocated.
        chunks_allocated_total,
        /// Chunks freed (by discard, overwrite of a shared chunk's last reader, delete).
        chunks_freed_total,
        /// Copy-on-write copies of shared chunks.
        cow_copies_total,
        /// Writes failed for lack of space.
        nospace_errors_total,
        /// Transitions into a higher alert level.
        alerts_raised_total,
    }
);

counters!(
    /// Per-LUN counters beyond plain I/O.
    LunCounters, LunCountersSnapshot {
        /// Chunks this volume allocated on first write or copy-on-write.
        chunks_allocated_total,
        /// Copy-on-write copies of shared chunks.
        cow_copies_total,
        /// Writes failed for lack of space.
        nospace_errors_total,
    }
);

/// Everything the daemon renders for one volume.
#[derive(Default)]
pub struct VolumeStats {
    /// Reads, writes, flushes, discards... as for a disk.
    pub io: Arc<IoStats>,
    /// Allocation counters.
    pub counters: LunCounters,
}

pub(crate) fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

impl std::fmt::Debug for VolumeStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeStats")
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}
