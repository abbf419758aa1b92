//! Counters and histograms of one host's lock manager, kept with atomics so that no
//! lock is taken to count. Counters only grow (the daemon scrapes them; nothing resets).
//! [`Metrics::snapshot`] gives plain data for rendering (Prometheus names suggested in
//! each field's docs, `basalt_lockmgr_` prefix).

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds, in seconds, of the latency histogram buckets (+Inf implicit).
pub const LATENCY_BUCKETS_SECONDS: [f64; 16] = basalt_blockdev::LATENCY_BUCKETS_SECONDS;

/// A monotonic counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A latency histogram with the buckets of [`LATENCY_BUCKETS_SECONDS`].
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_SECONDS.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BUCKETS_SECONDS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(LATENCY_BUCKETS_SECONDS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u128::from(u64::MAX)) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// A copy of the current values.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds_seconds: LATENCY_BUCKETS_SECONDS.to_vec(),
            counts: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            sum_seconds: self.sum_ns.load(Relaxed) as f64 / 1e9,
            count: self.count.load(Relaxed),
        }
    }
}

/// A histogram's values: `counts[i]` observations fell in `(bounds[i-1], bounds[i]]`,
/// the last count past the last bound (not cumulative; Prometheus wants cumulative, so
/// sum while rendering).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistogramSnapshot {
    /// Upper bounds in seconds.
    pub bounds_seconds: Vec<f64>,
    /// Per-bucket counts, one more than `bounds_seconds` (+Inf).
    pub counts: Vec<u64>,
    /// Sum of all observations, seconds.
    pub sum_seconds: f64,
    /// Number of observations.
    pub count: u64,
}

/// Live counters of one host's lock manager.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Heartbeat renewals that succeeded.
    pub heartbeats: Counter,
    /// Heartbeat renewal attempts that failed (I/O error or timeout).
    pub heartbeat_failures: Counter,
    /// Latency of successful renewals.
    pub heartbeat_latency: Histogram,
    /// Locks granted.
    pub acquires: Counter,
    /// `try_lock` refusals and waits because of a conflicting holder.
    pub contended: Counter,
    /// Latency of granted acquisitions (from call to grant, including waiting).
    pub acquire_latency: Histogram,
    /// Device round trips spent in granted acquisitions.
    pub acquire_round_trips: Counter,
    /// Locks released.
    pub releases: Counter,
    /// Lock entries of dead hosts removed after their recovery.
    pub breaks: Counter,
    /// Stale entries (of hosts already recovered) removed while acquiring.
    pub stale_cleaned: Counter,
    /// Slots of dead hosts taken over by this host.
    pub takeovers: Counter,
    /// Recoveries completed.
    pub recoveries: Counter,
    /// Recoveries abandoned (callback error or lost lease).
    pub recoveries_failed: Counter,
    /// Times this host fenced itself (lost its lease or its slot).
    pub fencing_events: Counter,
    /// Protected writes refused because the lease or the lock was gone.
    pub fenced_writes_refused: Counter,
    /// Sectors that failed their checksum.
    pub checksum_errors: Counter,
    /// Torn sectors of this host's own writes repaired.
    pub torn_repairs: Counter,
    /// Timed-out CAWs found applied on retry (own image recognised).
    pub own_image_recognized: Counter,
}

/// Plain-data copy of [`Metrics`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[allow(missing_docs)]
pub struct MetricsSnapshot {
    pub heartbeats_total: u64,
    pub heartbeat_failures_total: u64,
    pub heartbeat_latency_seconds: HistogramSnapshot,
    pub acquires_total: u64,
    pub contended_total: u64,
    pub acquire_latency_seconds: HistogramSnapshot,
    pub acquire_round_trips_total: u64,
    pub releases_total: u64,
    pub breaks_total: u64,
    pub stale_cleaned_total: u64,
    pub takeovers_total: u64,
    pub recoveries_total: u64,
    pub recoveries_failed_total: u64,
    pub fencing_events_total: u64,
    pub fenced_writes_refused_total: u64,
    pub checksum_errors_total: u64,
    pub torn_repairs_total: u64,
    pub own_image_recognized_total: u64,
}

impl Metrics {
    /// A copy of every value.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            heartbeats_total: self.heartbeats.get(),
            heartbeat_failures_total: self.heartbeat_failures.get(),
            heartbeat_latency_seconds: self.heartbeat_latency.snapshot(),
            acquires_total: self.acquires.get(),
            contended_total: self.contended.get(),
            acquire_latency_seconds: self.acquire_latency.snapshot(),
            acquire_round_trips_total: self.acquire_round_trips.get(),
            releases_total: self.releases.get(),
            breaks_total: self.breaks.get(),
            stale_cleaned_total: self.stale_cleaned.get(),
            takeovers_total: self.takeovers.get(),
            recoveries_total: self.recoveries.get(),
            recoveries_failed_total: self.recoveries_failed.get(),
            fencing_events_total: self.fencing_events.get(),
            fenced_writes_refused_total: self.fenced_writes_refused.get(),
            checksum_errors_total: self.checksum_errors.get(),
            torn_repairs_total: self.torn_repairs.get(),
            own_image_recognized_total: self.own_image_recognized.get(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(30));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(100));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.counts[0], 1);
        assert_eq!(s.counts[6], 1);
        assert_eq!(*s.counts.last().unwrap(), 1);
    }
}
