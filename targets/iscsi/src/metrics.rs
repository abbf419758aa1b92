//! Counters per target and per LUN, as plain atomics; [`IscsiServer::metrics`]
//! returns a serde-serialisable snapshot that the daemon renders (Prometheus names are
//! its business). Counters are monotonic; `sessions` is a gauge.
//!
//! ```json
//! {"targets":[{"iqn":"iqn.2026-11.x:t","sessions":2,"logins":5,"login_failures":1,
//!   "luns":[{"lun":0,"name":"disk0","commands":120,"read_bytes":4096,"write_bytes":0,
//!     "errors_by_sense_key":{"5":1},"latency_buckets":[[0.0001,80],...],
//!     "latency_sum_seconds":0.02}]}]}
//! ```
//!
//! [`IscsiServer::metrics`]: crate::IscsiServer::metrics

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Upper bounds of the latency histogram buckets, seconds (the last is +Inf).
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.005,
    0.01,
    0.025,
    0.1,
    1.0,
    f64::INFINITY,
];

/// Counters of one LUN of one target.
#[derive(Debug, Default)]
pub struct LunCounters {
    commands: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    errors: [AtomicU64; 16],
    buckets: [AtomicU64; 12],
    latency_ns: AtomicU64,
}

impl LunCounters {
    /// Records one finished command.
    pub fn record(&self, read: u64, written: u64, sense_key: Option<u8>, nanos: u64) {
        self.commands.fetch_add(1, Ordering::Relaxed);
        self.read_bytes.fetch_add(read, Ordering::Relaxed);
        self.write_bytes.fetch_add(written, Ordering::Relaxed);
        if let Some(k) = sense_key {
            self.errors[usize::from(k & 0x0f)].fetch_add(1, Ordering::Relaxed);
        }
        let s = nanos as f64 / 1e9;
        let i = LATENCY_BUCKETS.iter().position(|&b| s <= b).unwrap_or(11);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.latency_ns.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// Counters of one target.
#[derive(Debug, Default)]
pub struct TargetCounters {
    pub(crate) sessions: AtomicU64,
    pub(crate) logins: AtomicU64,
    pub(crate) login_failures: AtomicU64,
    luns: Mutex<BTreeMap<u64, (String, Arc<LunCounters>)>>,
}

impl TargetCounters {
    /// The counters of `lun` (created on first use).
    pub fn lun(&self, lun: u64, name: &str) -> Arc<LunCounters> {
        let mut m = self
            .luns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry(lun)
            .or_insert_with(|| (name.to_string(), Arc::default()))
            .1
            .clone()
    }
}

/// A snapshot of every target's counters.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MetricsSnapshot {
    /// Per target.
    pub targets: Vec<TargetSnapshot>,
}

/// One target's counters.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TargetSnapshot {
    /// The target's name.
    pub iqn: String,
    /// Sessions logged in now.
    pub sessions: u64,
    /// Successful logins since start.
    pub logins: u64,
    /// Refused logins (unknown target, ACL, CHAP).
    pub login_failures: u64,
    /// Per LUN.
    pub luns: Vec<LunSnapshot>,
}

/// One LUN's counters.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LunSnapshot {
    /// LUN number.
    pub lun: u64,
    /// Unit name.
    pub name: String,
    /// SCSI commands completed.
    pub commands: u64,
    /// Data-In bytes.
    pub read_bytes: u64,
    /// Data-Out bytes.
    pub write_bytes: u64,
    /// Commands that ended with sense data, by sense key.
    pub errors_by_sense_key: BTreeMap<u8, u64>,
    /// (upper bound in seconds, count in this bucket) — not cumulative.
    pub latency_buckets: Vec<(f64, u64)>,
    /// Sum of latencies, seconds.
    pub latency_sum_seconds: f64,
}

impl TargetCounters {
    pub(crate) fn snapshot(&self, iqn: &str) -> TargetSnapshot {
        let m = self
            .luns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        TargetSnapshot {
            iqn: iqn.to_string(),
            sessions: self.sessions.load(Ordering::Relaxed),
            logins: self.logins.load(Ordering::Relaxed),
            login_failures: self.login_failures.load(Ordering::Relaxed),
            luns: m
                .iter()
                .map(|(lun, (name, c))| LunSnapshot {
                    lun: *lun,
                    name: name.clone(),
                    commands: c.commands.load(Ordering::Relaxed),
                    read_bytes: c.read_bytes.load(Ordering::Relaxed),
                    write_bytes: c.write_bytes.load(Ordering::Relaxed),
                    errors_by_sense_key: c
                        .errors
                        .iter()
                        .enumerate()
                        .filter_map(|(k, v)| {
                            let v = v.load(Ordering::Relaxed);
                            (v > 0).then_some((k as u8, v))
                        })
                        .collect(),
                    latency_buckets: LATENCY_BUCKETS
                        .iter()
                        .zip(&c.buckets)
                        .map(|(b, n)| (*b, n.load(Ordering::Relaxed)))
                        .collect(),
                    latency_sum_seconds: c.latency_ns.load(Ordering::Relaxed) as f64 / 1e9,
                })
                .collect(),
        }
    }
}
