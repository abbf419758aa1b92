//! Per-device I/O counters, kept with atomics so the I/O path never takes a lock.
//!
//! The daemon renders them as Prometheus metrics named as node_exporter names disk
//! statistics (`*_reads_completed_total`, `*_read_bytes_total`, ...). Counters only ever
//! grow: scrapes compute rates, nothing resets them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Upper bounds, in seconds, of the latency histogram buckets (the last bucket, +Inf, is
/// implicit).
pub const LATENCY_BUCKETS_SECONDS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// The kinds of request counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoKind {
    /// Reads.
    Read,
    /// Writes (including the write half of compare-and-write).
    Write,
    /// Flushes.
    Flush,
    /// Discards.
    Discard,
    /// Write-zeroes.
    WriteZeroes,
    /// Compare-and-write.
    CompareAndWrite,
}

impl IoKind {
    /// Every kind, in a fixed order.
    pub const ALL: [IoKind; 6] = [
        IoKind::Read,
        IoKind::Write,
        IoKind::Flush,
        IoKind::Discard,
        IoKind::WriteZeroes,
        IoKind::CompareAndWrite,
    ];

    /// The name used in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            IoKind::Read => "read",
            IoKind::Write => "write",
            IoKind::Flush => "flush",
            IoKind::Discard => "discard",
            IoKind::WriteZeroes => "write_zeroes",
            IoKind::CompareAndWrite => "compare_and_write",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Default)]
struct KindCounters {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    time_ns: AtomicU64,
    buckets: [AtomicU64; LATENCY_BUCKETS_SECONDS.len() + 1],
}

/// Live counters of one device.
#[derive(Default)]
pub struct IoStats {
    kinds: [KindCounters; 6],
    in_flight: AtomicU64,
    busy_since_ns: AtomicU64,
    busy_ns: AtomicU64,
}

/// A point-in-time copy of one kind's counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KindSnapshot {
    /// Completed requests (successful or not).
    pub ops: u64,
    /// Bytes moved by successful requests.
    pub bytes: u64,
    /// Failed requests.
    pub errors: u64,
    /// Total time spent in requests.
    pub time: Duration,
    /// Non-cumulative counts per latency bucket; the last entry is the +Inf bucket.
    pub buckets: Vec<u64>,
}

/// A point-in-time copy of a device's counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IoStatsSnapshot {
    /// Per kind, in [`IoKind::ALL`] order.
    pub kinds: Vec<(IoKind, KindSnapshot)>,
    /// Requests in flight now.
    pub in_flight: u64,
    /// Total time with at least one request in flight (node_exporter's io_time).
    pub busy: Duration,
}

impl IoStatsSnapshot {
    /// The snapshot of one kind.
    pub fn kind(&self, kind: IoKind) -> &KindSnapshot {
        &self.kinds[kind.index()].1
    }
}

fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // Start at 1 so that 0 can mean "idle".
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

impl IoStats {
    /// Marks the start of a request; pass the returned token to [`IoStats::finish`].
    pub fn start(&self) -> Instant {
        if self.in_flight.fetch_add(1, Relaxed) == 0 {
            self.busy_since_ns.store(now_ns(), Relaxed);
        }
        Instant::now()
    }

    /// Records the end of a request started at `started` that moved `bytes` bytes
    /// (ignored on failure).
    pub fn finish(&self, kind: IoKind, started: Instant, bytes: u64, ok: bool) {
        let elapsed = started.elapsed();
        let k = &self.kinds[kind.index()];
        k.ops.fetch_add(1, Relaxed);
        if ok {
            k.bytes.fetch_add(bytes, Relaxed);
        } else {
            k.errors.fetch_add(1, Relaxed);
        }
        k.time_ns.fetch_add(elapsed.as_nanos() as u64, Relaxed);
        let secs = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS_SECONDS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS_SECONDS.len());
        k.buckets[bucket].fetch_add(1, Relaxed);
        if self.in_flight.fetch_sub(1, Relaxed) == 1 {
            let since = self.busy_since_ns.swap(0, Relaxed);
            if since != 0 {
                self.busy_ns
                    .fetch_add(now_ns().saturating_sub(since), Relaxed);
            }
        }
    }

    /// Copies the counters.
    pub fn snapshot(&self) -> IoStatsSnapshot {
        let kinds = IoKind::ALL
            .iter()
            .map(|&kind| {
                let k = &self.kinds[kind.index()];
                (
                    kind,
                    KindSnapshot {
                        ops: k.ops.load(Relaxed),
                        bytes: k.bytes.load(Relaxed),
                        errors: k.errors.load(Relaxed),
                        time: Duration::from_nanos(k.time_ns.load(Relaxed)),
                        buckets: k.buckets.iter().map(|b| b.load(Relaxed)).collect(),
                    },
                )
            })
            .collect();
        let mut busy = self.busy_ns.load(Relaxed);
        let since = self.busy_since_ns.load(Relaxed);
        if since != 0 {
            busy += now_ns().saturating_sub(since);
        }
        IoStatsSnapshot {
            kinds,
            in_flight: self.in_flight.load(Relaxed),
            busy: Duration::from_nanos(busy),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_ops_bytes_errors_and_buckets() {
        let stats = IoStats::default();
        let t = stats.start();
        stats.finish(IoKind::Read, t, 4096, true);
        let t = stats.start();
        stats.finish(IoKind::Read, t, 4096, false);
        let snap = stats.snapshot();
        let read = snap.kind(IoKind::Read);
        assert_eq!(read.ops, 2);
        assert_eq!(read.bytes, 4096);
        assert_eq!(read.errors, 1);
        assert_eq!(read.buckets.iter().sum::<u64>(), 2);
        assert_eq!(snap.in_flight, 0);
        assert_eq!(snap.kind(IoKind::Write).ops, 0);
    }
}
