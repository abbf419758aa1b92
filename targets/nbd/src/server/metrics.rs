//! Counters of the NBD server, kept with atomics (the I/O path never takes a lock) and
//! handed to the daemon as plain snapshots, which it renders as Prometheus series.
//!
//! Per export, keyed by export name (not by creation order), and for the server as a
//! whole. Counters only grow; a removed export's counters go away with it, and an export
//! added again starts from zero (Prometheus treats that as a counter reset).
//!
//! A snapshot serialises as, for example:
//!
//! ```json
//! {"server": {"connections_total": 3, "connections_active": 1, "connections_refused": 0,
//!             "handshakes_failed": 1, "tls_handshakes": 2, "protocol_errors": 0},
//!  "exports": {"lun0": {"connections_total": 2, "connections_active": 1,
//!     "access_denied": 1,
//!     "commands": {"read": {"ops": 10, "errors": 0, "bytes": 40960, "time_seconds": 0.01,
//!                           "latency_buckets": [..17 counts..]}, ...}}}}
//! ```
//!
//! Suggested series: `basalt_nbd_commands_total{export,command}`,
//! `basalt_nbd_command_errors_total{export,command}`,
//! `basalt_nbd_bytes_total{export,command}` (read and write),
//! `basalt_nbd_command_duration_seconds{export,command}` (histogram from
//! `latency_buckets` with [`LATENCY_BUCKETS_SECONDS`] as upper bounds, the last bucket
//! +Inf), `basalt_nbd_connections{export}` and `basalt_nbd_connections_total{export}`.

use crate::transmission::CommandKind;
pub use basalt_blockdev::LATENCY_BUCKETS_SECONDS;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

const KINDS: usize = CommandKind::ALL.len();
const BUCKETS: usize = LATENCY_BUCKETS_SECONDS.len() + 1;

#[derive(Debug, Default)]
struct CommandCounters {
    ops: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
    time_ns: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

/// Live counters of one export.
#[derive(Debug, Default)]
pub struct ExportMetrics {
    commands: [CommandCounters; KINDS],
    connections_total: AtomicU64,
    connections_active: AtomicU64,
    access_denied: AtomicU64,
}

impl ExportMetrics {
    pub(crate) fn command(&self, kind: CommandKind, elapsed: Duration, bytes: u64, ok: bool) {
        let c = &self.commands[kind.index()];
        c.ops.fetch_add(1, Relaxed);
        if ok {
            c.bytes.fetch_add(bytes, Relaxed);
        } else {
            c.errors.fetch_add(1, Relaxed);
        }
        c.time_ns.fetch_add(elapsed.as_nanos() as u64, Relaxed);
        let secs = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS_SECONDS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS - 1);
        c.buckets[bucket].fetch_add(1, Relaxed);
    }

    pub(crate) fn connected(&self) {
        self.connections_total.fetch_add(1, Relaxed);
        self.connections_active.fetch_add(1, Relaxed);
    }

    pub(crate) fn disconnected(&self) {
        self.connections_active.fetch_sub(1, Relaxed);
    }

    pub(crate) fn denied(&self) {
        self.access_denied.fetch_add(1, Relaxed);
    }

    /// A point-in-time copy.
    pub fn snapshot(&self) -> ExportMetricsSnapshot {
        let commands = CommandKind::ALL
            .iter()
            .map(|&k| {
                let c = &self.commands[k.index()];
                (
                    k.as_str().to_owned(),
                    CommandSnapshot {
                        ops: c.ops.load(Relaxed),
                        errors: c.errors.load(Relaxed),
                        bytes: c.bytes.load(Relaxed),
                        time_seconds: c.time_ns.load(Relaxed) as f64 / 1e9,
                        latency_buckets: c.buckets.iter().map(|b| b.load(Relaxed)).collect(),
                    },
                )
            })
            .collect();
        ExportMetricsSnapshot {
            connections_total: self.connections_total.load(Relaxed),
            connections_active: self.connections_active.load(Relaxed),
            access_denied: self.access_denied.load(Relaxed),
            commands,
        }
    }
}

/// Live counters of the whole server.
#[derive(Debug, Default)]
pub(crate) struct ServerCounters {
    pub(crate) connections_total: AtomicU64,
    pub(crate) connections_active: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) handshakes_failed: AtomicU64,
    pub(crate) tls_handshakes: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
}

/// One command kind's counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CommandSnapshot {
    /// Commands completed (successful or not, including those refused as invalid).
    pub ops: u64,
    /// Commands answered with an error.
    pub errors: u64,
    /// Bytes moved by successful commands (READ, WRITE; for TRIM, WRITE_ZEROES, CACHE
    /// and BLOCK_STATUS the length covered).
    pub bytes: u64,
    /// Total time from receiving a request to queueing its reply.
    pub time_seconds: f64,
    /// Non-cumulative counts per latency bucket ([`LATENCY_BUCKETS_SECONDS`], then
    /// +Inf).
    pub latency_buckets: Vec<u64>,
}

/// A point-in-time copy of one export's counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ExportMetricsSnapshot {
    /// Connections that entered the transmission phase on this export.
    pub connections_total: u64,
    /// Connections on this export now.
    pub connections_active: u64,
    /// Handshake requests for this export refused by its allowed networks.
    pub access_denied: u64,
    /// Per command kind (`read`, `write`, `flush`, `trim`, `cache`, `write_zeroes`,
    /// `block_status`, `other`).
    pub commands: BTreeMap<String, CommandSnapshot>,
}

/// A point-in-time copy of the server-wide counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ServerMetricsSnapshot {
    /// Connections accepted.
    pub connections_total: u64,
    /// Connections open now (handshake or transmission).
    pub connections_active: u64,
    /// Connections closed at accept because of `max_connections`.
    pub connections_refused: u64,
    /// Connections that ended before the transmission phase for a reason other than the
    /// client's ABORT (violations, refused EXPORT_NAME, TLS failures, timeouts).
    pub handshakes_failed: u64,
    /// TLS sessions established.
    pub tls_handshakes: u64,
    /// Connections closed for a framing violation in the transmission phase.
    pub protocol_errors: u64,
}

/// Everything: the server and every export by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NbdMetrics {
    /// Server-wide counters.
    pub server: ServerMetricsSnapshot,
    /// Per export.
    pub exports: BTreeMap<String, ExportMetricsSnapshot>,
}

impl ServerCounters {
    pub(crate) fn snapshot(&self) -> ServerMetricsSnapshot {
        ServerMetricsSnapshot {
            connections_total: self.connections_total.load(Relaxed),
            connections_active: self.connections_active.load(Relaxed),
            connections_refused: self.connections_refused.load(Relaxed),
            handshakes_failed: self.handshakes_failed.load(Relaxed),
            tls_handshakes: self.tls_handshakes.load(Relaxed),
            protocol_errors: self.protocol_errors.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_totals() {
        let m = ExportMetrics::default();
        m.command(CommandKind::Read, Duration::from_micros(30), 4096, true);
        m.command(CommandKind::Read, Duration::from_secs(100), 4096, false);
        m.connected();
        let s = m.snapshot();
        let r = &s.commands["read"];
        assert_eq!((r.ops, r.errors, r.bytes), (2, 1, 4096));
        assert_eq!(r.latency_buckets[0], 1);
        assert_eq!(*r.latency_buckets.last().unwrap(), 1);
        assert_eq!(r.latency_buckets.len(), LATENCY_BUCKETS_SECONDS.len() + 1);
        assert_eq!(s.connections_active, 1);
        m.disconnected();
        assert_eq!(m.snapshot().connections_active, 0);
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.contains("\"block_status\""));
    }
}
