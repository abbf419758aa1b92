//! Prometheus metrics: the text exposition format served at `/metrics`.
//!
//! Names follow node_exporter's (`basalt_disk_reads_completed_total` mirrors
//! `node_disk_reads_completed_total`), in base units with `_total`, `_bytes` and
//! `_seconds` suffixes, and label sets bounded by configuration (disk names, API route
//! templates), never by request data. Disk counters live in `blockdev`'s lock-free
//! `IoStats`; they are turned into metric families at scrape time, so the I/O path
//! never touches the registry.

use crate::api::types::{DiskInfo, DiskState};
use crate::daemon::storage::StorageMetrics;
use basalt_blockdev::{IoKind, IoStatsSnapshot, LATENCY_BUCKETS_SECONDS};
use basalt_net::{DropReason, PortCountersSnapshot};
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};
use std::collections::BTreeMap;
use std::time::Duration;

/// What the appliance's subsystems report at scrape time.
#[derive(Default)]
pub struct Inputs {
    /// Disks with their I/O counters.
    pub disks: Vec<(DiskInfo, IoStatsSnapshot)>,
    /// Switches with their per-port counters.
    pub switches: Vec<(String, BTreeMap<String, PortCountersSnapshot>)>,
    /// Arrays, pools and volumes.
    pub storage: StorageMetrics,
    /// The NBD server, when it runs.
    pub nbd: Option<basalt_nbd::NbdMetrics>,
    /// The iSCSI target, when it runs.
    pub iscsi: Option<basalt_iscsi::MetricsSnapshot>,
    /// Cluster lockspaces.
    pub lockspaces: Vec<crate::daemon::lockspaces::LockspaceMetrics>,
    /// VMs.
    pub vms: Vec<crate::daemon::vms::VmMetrics>,
}

/// The daemon's metrics.
pub struct Metrics {
    registry: Registry,
    api_requests: IntCounterVec,
    api_duration: HistogramVec,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    match r {
        Ok(v) => v,
        // Only reachable through a programming error in the fixed definitions below.
        Err(e) => panic!("metric definition rejected: {e}"),
    }
}

impl Metrics {
    /// Registers the static metrics.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let build_info = must(IntGaugeVec::new(
            Opts::new(
                "basalt_build_info",
                "A metric with a constant '1' value labeled by version and revision of Basalt.",
            ),
            &["version", "revision"],
        ));
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("BASALT_REVISION")])
            .set(1);
        must(registry.register(Box::new(build_info)));
        let api_requests = must(IntCounterVec::new(
            Opts::new("basalt_api_requests_total", "API requests answered."),
            &["method", "route", "code"],
        ));
        must(registry.register(Box::new(api_requests.clone())));
        let api_duration = must(HistogramVec::new(
            HistogramOpts::new(
                "basalt_api_request_duration_seconds",
                "Time to answer API requests.",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            &["method", "route"],
        ));
        must(registry.register(Box::new(api_duration.clone())));
        #[cfg(target_os = "linux")]
        must(registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        )));
        Metrics {
            registry,
            api_requests,
            api_duration,
        }
    }

    /// Records one answered API request.
    pub fn observe_request(&self, method: &str, route: &str, code: u16, elapsed: Duration) {
        self.api_requests
            .with_label_values(&[method, route, &code.to_string()])
            .inc();
        self.api_duration
            .with_label_values(&[method, route])
            .observe(elapsed.as_secs_f64());
    }

    /// Renders every metric in the text exposition format.
    pub fn render(&self, input: &Inputs) -> String {
        let mut families = self.registry.gather();
        families.extend(disk_families(&input.disks));
        families.extend(switch_families(&input.switches));
        families.extend(storage_families(&input.storage));
        if let Some(nbd) = &input.nbd {
            families.extend(nbd_families(nbd));
        }
        if let Some(iscsi) = &input.iscsi {
            families.extend(iscsi_families(iscsi));
        }
        families.extend(lockspace_families(&input.lockspaces));
        families.extend(vm_families(&input.vms));
        // The encoder stops at a family without samples (an iSCSI target without
        // errors, a lockspace never joined), dropping every family after it.
        families.retain(|f| !f.get_metric().is_empty());
        let mut out = Vec::new();
        if let Err(e) = prometheus::TextEncoder::new().encode(&families, &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// VM states, each a series of `basalt_vm_state`.
const VM_STATES: [(basalt_compute::store::VmState, &str); 6] = {
    use basalt_compute::store::VmState as S;
    [
        (S::Stopped, "stopped"),
        (S::Starting, "starting"),
        (S::Running, "running"),
        (S::Stopping, "stopping"),
        (S::Crashed, "crashed"),
        (S::Failed, "failed"),
    ]
};

fn vm_families(vms: &[crate::daemon::vms::VmMetrics]) -> Vec<MetricFamily> {
    if vms.is_empty() {
        return Vec::new();
    }
    let info = vms
        .iter()
        .map(|v| gauge(&[("vm", &v.name), ("runner", &v.runner)], 1.0))
        .collect();
    let states = vms
        .iter()
        .flat_map(|v| {
            VM_STATES.iter().map(|(st, name)| {
                gauge(
                    &[("vm", &v.name), ("state", name)],
                    if v.state == *st { 1.0 } else { 0.0 },
                )
            })
        })
        .collect();
    let restarts = vms
        .iter()
        .map(|v| counter(&[("vm", &v.name)], v.restarts_total as f64))
        .collect();
    vec![
        family(
            "basalt_vm_info",
            "A metric with a constant '1' value labeled by VM and the runner it uses.",
            MetricType::GAUGE,
            info,
        ),
        family(
            "basalt_vm_state",
            "VM state (1 for the current one).",
            MetricType::GAUGE,
            states,
        ),
        family(
            "basalt_vm_restarts_total",
            "Restarts of the VM after crashes, since the daemon started.",
            MetricType::COUNTER,
            restarts,
        ),
    ]
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name(k.to_string());
            l.set_value(v.to_string());
            l
        })
        .collect()
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn counter(pairs: &[(&str, &str)], value: f64) -> Metric {
    let mut m = Metric::from_label(labels(pairs));
    let mut c = Counter::default();
    c.set_value(value);
    m.set_counter(c);
    m
}

fn gauge(pairs: &[(&str, &str)], value: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(value);
    let mut m = Metric::from_gauge(g);
    m.set_label(labels(pairs));
    m
}

fn histogram(pairs: &[(&str, &str)], buckets: &[u64], sum: Duration) -> Metric {
    let mut cumulative = 0;
    let mut out = Vec::new();
    for (bound, count) in LATENCY_BUCKETS_SECONDS.iter().zip(buckets) {
        cumulative += count;
        let mut b = Bucket::default();
        b.set_upper_bound(*bound);
        b.set_cumulative_count(cumulative);
        out.push(b);
    }
    let total: u64 = buckets.iter().sum();
    let mut h = Histogram::default();
    h.set_bucket(out);
    h.set_sample_count(total);
    h.set_sample_sum(sum.as_secs_f64());
    let mut m = Metric::from_label(labels(pairs));
    m.set_histogram(h);
    m
}

/// A per-disk counter family from one field of the snapshots.
fn disk_counter(
    disks: &[(DiskInfo, IoStatsSnapshot)],
    name: &str,
    help: &str,
    value: impl Fn(&IoStatsSnapshot) -> f64,
) -> MetricFamily {
    let metrics = disks
        .iter()
        .map(|(d, s)| counter(&[("disk", &d.name)], value(s)))
        .collect();
    family(name, help, MetricType::COUNTER, metrics)
}

fn disk_families(disks: &[(DiskInfo, IoStatsSnapshot)]) -> Vec<MetricFamily> {
    if disks.is_empty() {
        return Vec::new();
    }
    let mut f = Vec::new();
    f.push(family(
        "basalt_disk_info",
        "Disk identity; constant 1.",
        MetricType::GAUGE,
        disks
            .iter()
            .map(|(d, _)| {
                let serial = d.serial.clone().unwrap_or_default();
                gauge(
                    &[
                        ("disk", &d.name),
                        ("path", &d.path),
                        ("kind", &d.kind),
                        ("serial", &serial),
                    ],
                    1.0,
                )
            })
            .collect(),
    ));
    f.push(family(
        "basalt_disk_up",
        "1 when the disk is open and serving I/O, 0 when it is missing or failed.",
        MetricType::GAUGE,
        disks
            .iter()
            .map(|(d, _)| {
                let up = if d.state == DiskState::Online {
                    1.0
                } else {
                    0.0
                };
                gauge(&[("disk", &d.name)], up)
            })
            .collect(),
    ));
    f.push(family(
        "basalt_disk_size_bytes",
        "Disk capacity in bytes.",
        MetricType::GAUGE,
        disks
            .iter()
            .map(|(d, _)| gauge(&[("disk", &d.name)], d.size_bytes as f64))
            .collect(),
    ));
    let ops = |k: IoKind| move |s: &IoStatsSnapshot| s.kind(k).ops as f64;
    let bytes = |k: IoKind| move |s: &IoStatsSnapshot| s.kind(k).bytes as f64;
    let time = |k: IoKind| move |s: &IoStatsSnapshot| s.kind(k).time.as_secs_f64();
    f.push(disk_counter(
        disks,
        "basalt_disk_reads_completed_total",
        "Reads completed.",
        ops(IoKind::Read),
    ));
    f.push(disk_counter(
        disks,
        "basalt_disk_read_bytes_total",
        "Bytes read.",
        bytes(IoKind::Read),
    ));
    f.push(disk_counter(
        disks,
        "basalt_disk_read_time_seconds_total",
        "Time spent in reads.",
        time(IoKind::Read),
    ));
    f.push(disk_counter(
        disks,
        "basalt_disk_writes_completed_total",
        "Writes completed.",
        ops(IoKind::Write),
    ));
    f.push(disk_counter(
        disks,
        "basalt_disk_written_bytes_total",
        "Bytes written.",
        bytes(IoKind::Write),
    ));
    f.push(disk_counter(
        disks,
        "basalt_disk_write_time_seconds_total",
        "Time spent in writes.",
        time(IoKind::Write),
    ));
    f.push(disk_counter(
        disks,
        "basalt_disk_discards_completed_total",
        "Discards completed.",
        ops(IoKind::Discard),
    ));
    f.push(disk_counter(
        disks,
        "basalt_disk_discarded_bytes_total",
        "Bytes discarded.",
        bytes(IoKind::Discard),
    ));
    f.push(disk_counter(
        disks,
        "basalt_disk_flush_requests_total",
        "Flushes completed.",
        ops(IoKind::Flush),
    ));
    f.push(disk_counter(
        disks,
        "basalt_disk_flush_requests_time_seconds_total",
        "Time spent in flushes.",
        time(IoKind::Flush),
    ));
    f.push(disk_counter(
        disks,
        "basalt_disk_io_time_seconds_total",
        "Time with at least one request in flight.",
        |s| s.busy.as_secs_f64(),
    ));
    f.push(family(
        "basalt_disk_io_now",
        "Requests in flight.",
        MetricType::GAUGE,
        disks
            .iter()
            .map(|(d, s)| gauge(&[("disk", &d.name)], s.in_flight as f64))
            .collect(),
    ));
    let mut errors = Vec::new();
    let mut latency = Vec::new();
    for (d, s) in disks {
        for (kind, k) in &s.kinds {
            errors.push(counter(
                &[("disk", &d.name), ("op", kind.as_str())],
                k.errors as f64,
            ));
            latency.push(histogram(
                &[("disk", &d.name), ("op", kind.as_str())],
                &k.buckets,
                k.time,
            ));
        }
    }
    f.push(family(
        "basalt_disk_io_errors_total",
        "Failed requests by operation.",
        MetricType::COUNTER,
        errors,
    ));
    f.push(family(
        "basalt_disk_io_duration_seconds",
        "Request latency by operation.",
        MetricType::HISTOGRAM,
        latency,
    ));
    f
}

/// A histogram from bucket bounds and non-cumulative counts (a count past the last
/// finite bound belongs to +Inf, which the encoder adds from the total).
fn histogram_from(pairs: &[(&str, &str)], bounds: &[f64], counts: &[u64], sum: f64) -> Metric {
    let mut cumulative = 0;
    let mut out = Vec::new();
    for (bound, count) in bounds.iter().zip(counts) {
        cumulative += count;
        if bound.is_finite() {
            let mut b = Bucket::default();
            b.set_upper_bound(*bound);
            b.set_cumulative_count(cumulative);
            out.push(b);
        }
    }
    let mut h = Histogram::default();
    h.set_bucket(out);
    h.set_sample_count(counts.iter().sum());
    h.set_sample_sum(sum);
    let mut m = Metric::from_label(labels(pairs));
    m.set_histogram(h);
    m
}

/// Families of (labels, value) rows.
fn rows(
    name: &str,
    help: &str,
    kind: MetricType,
    rows: Vec<(Vec<(&str, String)>, f64)>,
) -> MetricFamily {
    let metrics = rows
        .iter()
        .map(|(l, v)| {
            let pairs: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
            match kind {
                MetricType::COUNTER => counter(&pairs, *v),
                _ => gauge(&pairs, *v),
            }
        })
        .collect();
    family(name, help, kind, metrics)
}

const ARRAY_STATES: [&str; 8] = [
    "clean",
    "active",
    "degraded",
    "recovering",
    "resync",
    "check",
    "failed",
    "stopped",
];

fn storage_families(s: &StorageMetrics) -> Vec<MetricFamily> {
    let mut f = Vec::new();
    if !s.arrays.is_empty() {
        let pool = |p: &String| vec![("pool", p.clone())];
        let mut states = Vec::new();
        for (p, m) in &s.arrays {
            for st in ARRAY_STATES {
                states.push((
                    vec![("pool", p.clone()), ("state", st.to_string())],
                    if m.state == st { 1.0 } else { 0.0 },
                ));
            }
        }
        f.push(rows(
            "basalt_md_state",
            "Array state (1 for the current one), as node_md_state.",
            MetricType::GAUGE,
            states,
        ));
        let mut disks = Vec::new();
        for (p, m) in &s.arrays {
            for (st, n) in [
                ("active", m.disks_active),
                ("rebuilding", m.disks_rebuilding),
                ("faulty", m.disks_faulty),
                ("missing", m.disks_missing),
                ("spare", m.disks_spare),
            ] {
                disks.push((
                    vec![("pool", p.clone()), ("state", st.to_string())],
                    n as f64,
                ));
            }
        }
        f.push(rows(
            "basalt_md_disks",
            "Array members by state, as node_md_disks.",
            MetricType::GAUGE,
            disks,
        ));
        let per = |name: &str,
                   help: &str,
                   kind: MetricType,
                   v: fn(&basalt_raid::MetricsSnapshot) -> f64| {
            rows(
                name,
                help,
                kind,
                s.arrays.iter().map(|(p, m)| (pool(p), v(m))).collect(),
            )
        };
        f.push(per(
            "basalt_md_blocks",
            "Array size in 1 KiB blocks, as node_md_blocks.",
            MetricType::GAUGE,
            |m| (m.size_bytes / 1024) as f64,
        ));
        f.push(per(
            "basalt_md_blocks_synced",
            "Blocks synced by the running rebuild, resync or scrub, as node_md_blocks_synced.",
            MetricType::GAUGE,
            |m| (m.sync_done_bytes / 1024) as f64,
        ));
        f.push(per(
            "basalt_md_degraded_reads_total",
            "Reads served by reconstruction.",
            MetricType::COUNTER,
            |m| m.degraded_reads_total as f64,
        ));
        f.push(per(
            "basalt_md_member_errors_total",
            "Member I/O errors.",
            MetricType::COUNTER,
            |m| m.member_errors_total as f64,
        ));
        f.push(per(
            "basalt_md_member_read_errors_corrected_total",
            "Member read errors corrected by rewriting the data from redundancy.",
            MetricType::COUNTER,
            |m| m.read_errors_corrected_total as f64,
        ));
        f.push(per(
            "basalt_md_journal_writes_total",
            "Write-hole journal writes.",
            MetricType::COUNTER,
            |m| m.journal_writes_total as f64,
        ));
        f.push(per(
            "basalt_md_scrub_mismatches",
            "Mismatches the last scrub found.",
            MetricType::GAUGE,
            |m| m.scrub_mismatches as f64,
        ));
        f.push(per(
            "basalt_md_scrub_repaired_total",
            "Blocks scrubs repaired.",
            MetricType::COUNTER,
            |m| m.scrub_repaired_total as f64,
        ));
        let mut stripes = Vec::new();
        for (p, m) in &s.arrays {
            for (k, n) in [
                ("full", m.full_stripe_writes_total),
                ("rmw", m.rmw_writes_total),
                ("rcw", m.rcw_writes_total),
                ("degraded", m.degraded_writes_total),
            ] {
                stripes.push((vec![("pool", p.clone()), ("kind", k.to_string())], n as f64));
            }
        }
        f.push(rows(
            "basalt_md_stripe_writes_total",
            "Stripe writes by kind.",
            MetricType::COUNTER,
            stripes,
        ));
    }
    if !s.usage.is_empty() {
        let per = |name: &str, help: &str, v: fn(&basalt_lun::Usage) -> f64| {
            rows(
                name,
                help,
                MetricType::GAUGE,
                s.usage
                    .iter()
                    .map(|(p, u)| (vec![("pool", p.clone())], v(u)))
                    .collect(),
            )
        };
        f.push(per("basalt_pool_size_bytes", "Pool data area.", |u| {
            u.data_bytes as f64
        }));
        f.push(per(
            "basalt_pool_allocated_bytes",
            "Bytes in allocated chunks.",
            |u| u.allocated_bytes as f64,
        ));
        f.push(per(
            "basalt_pool_reserved_bytes",
            "Bytes reserved for thick LUNs.",
            |u| u.reserved_bytes as f64,
        ));
        f.push(per(
            "basalt_pool_free_bytes",
            "Bytes thin LUNs can still take.",
            |u| u.free_bytes as f64,
        ));
        f.push(per(
            "basalt_pool_provisioned_bytes",
            "Sum of the writable LUNs' virtual sizes.",
            |u| u.provisioned_bytes as f64,
        ));
        f.push(per(
            "basalt_pool_snapshot_bytes",
            "Bytes only snapshots hold.",
            |u| u.snapshot_bytes as f64,
        ));
        f.push(per(
            "basalt_pool_metadata_used_bytes",
            "Metadata checkpoint bytes in use.",
            |u| u.metadata_used_bytes as f64,
        ));
        f.push(per(
            "basalt_pool_metadata_size_bytes",
            "Metadata checkpoint slot size.",
            |u| u.metadata_total_bytes as f64,
        ));
        let mut alerts = Vec::new();
        for (p, u) in &s.usage {
            for res in ["data", "metadata"] {
                let level = u
                    .alerts
                    .iter()
                    .filter(|a| {
                        serde_json::to_value(a.resource)
                            .ok()
                            .and_then(|v| v.as_str().map(String::from))
                            .as_deref()
                            == Some(res)
                    })
                    .map(|a| a.level as u8)
                    .max()
                    .unwrap_or(0);
                alerts.push((
                    vec![("pool", p.clone()), ("resource", res.to_string())],
                    f64::from(level),
                ));
            }
        }
        f.push(rows(
            "basalt_pool_alert_level",
            "Space alert: 0 ok, 1 warning, 2 critical, 3 full.",
            MetricType::GAUGE,
            alerts,
        ));
    }
    if !s.volumes.is_empty() {
        let lun = |p: &String, v: &basalt_lun::VolumeInfo| {
            vec![("pool", p.clone()), ("lun", v.name.clone())]
        };
        let per =
            |name: &str,
             help: &str,
             kind: MetricType,
             value: &dyn Fn(&basalt_lun::VolumeInfo, &IoStatsSnapshot) -> f64| {
                rows(
                    name,
                    help,
                    kind,
                    s.volumes
                        .iter()
                        .map(|(p, v, io)| (lun(p, v), value(v, io)))
                        .collect(),
                )
            };
        f.push(per(
            "basalt_lun_size_bytes",
            "LUN virtual size.",
            MetricType::GAUGE,
            &|v, _| v.size_bytes as f64,
        ));
        f.push(per(
            "basalt_lun_allocated_bytes",
            "Bytes allocated to the LUN (own or shared).",
            MetricType::GAUGE,
            &|v, _| v.mapped_bytes as f64,
        ));
        f.push(per(
            "basalt_lun_snapshot_bytes",
            "Bytes only the LUN's snapshots hold.",
            MetricType::GAUGE,
            &|v, _| v.snapshot_bytes as f64,
        ));
        f.push(per(
            "basalt_lun_reads_completed_total",
            "Reads completed.",
            MetricType::COUNTER,
            &|_, io| io.kind(IoKind::Read).ops as f64,
        ));
        f.push(per(
            "basalt_lun_read_bytes_total",
            "Bytes read.",
            MetricType::COUNTER,
            &|_, io| io.kind(IoKind::Read).bytes as f64,
        ));
        f.push(per(
            "basalt_lun_writes_completed_total",
            "Writes completed.",
            MetricType::COUNTER,
            &|_, io| io.kind(IoKind::Write).ops as f64,
        ));
        f.push(per(
            "basalt_lun_written_bytes_total",
            "Bytes written.",
            MetricType::COUNTER,
            &|_, io| io.kind(IoKind::Write).bytes as f64,
        ));
        f.push(per(
            "basalt_lun_discarded_bytes_total",
            "Bytes discarded (unmapped).",
            MetricType::COUNTER,
            &|_, io| io.kind(IoKind::Discard).bytes as f64,
        ));
        let mut latency = Vec::new();
        for (p, v, io) in &s.volumes {
            for kind in [IoKind::Read, IoKind::Write, IoKind::Flush] {
                let k = io.kind(kind);
                latency.push(histogram_from(
                    &[("pool", p), ("lun", &v.name), ("op", kind.as_str())],
                    &LATENCY_BUCKETS_SECONDS,
                    &k.buckets,
                    k.time.as_secs_f64(),
                ));
            }
        }
        f.push(family(
            "basalt_lun_io_duration_seconds",
            "LUN request latency by operation.",
            MetricType::HISTOGRAM,
            latency,
        ));
    }
    f
}

fn nbd_families(m: &basalt_nbd::NbdMetrics) -> Vec<MetricFamily> {
    let server = |name: &str, help: &str, v: u64| {
        rows(
            name,
            help,
            MetricType::COUNTER,
            vec![(Vec::new(), v as f64)],
        )
    };
    let mut f = vec![
        server(
            "basalt_nbd_connections_refused_total",
            "Connections refused (limits, access).",
            m.server.connections_refused,
        ),
        server(
            "basalt_nbd_handshakes_failed_total",
            "Handshakes that failed.",
            m.server.handshakes_failed,
        ),
        server(
            "basalt_nbd_tls_handshakes_total",
            "TLS handshakes completed.",
            m.server.tls_handshakes,
        ),
        server(
            "basalt_nbd_protocol_errors_total",
            "Connections closed for protocol errors.",
            m.server.protocol_errors,
        ),
    ];
    let exp = |e: &String| vec![("export", e.clone())];
    f.push(rows(
        "basalt_nbd_connections",
        "Open connections per export.",
        MetricType::GAUGE,
        m.exports
            .iter()
            .map(|(e, x)| (exp(e), x.connections_active as f64))
            .collect(),
    ));
    f.push(rows(
        "basalt_nbd_connections_total",
        "Connections per export.",
        MetricType::COUNTER,
        m.exports
            .iter()
            .map(|(e, x)| (exp(e), x.connections_total as f64))
            .collect(),
    ));
    let mut ops = Vec::new();
    let mut errors = Vec::new();
    let mut bytes = Vec::new();
    let mut latency = Vec::new();
    for (e, x) in &m.exports {
        for (cmd, c) in &x.commands {
            let l = vec![("export", e.clone()), ("command", cmd.clone())];
            ops.push((l.clone(), c.ops as f64));
            errors.push((l.clone(), c.errors as f64));
            bytes.push((l, c.bytes as f64));
            latency.push(histogram_from(
                &[("export", e), ("command", cmd)],
                &LATENCY_BUCKETS_SECONDS,
                &c.latency_buckets,
                c.time_seconds,
            ));
        }
    }
    f.push(rows(
        "basalt_nbd_commands_total",
        "NBD commands by export and command.",
        MetricType::COUNTER,
        ops,
    ));
    f.push(rows(
        "basalt_nbd_command_errors_total",
        "NBD commands answered with an error.",
        MetricType::COUNTER,
        errors,
    ));
    f.push(rows(
        "basalt_nbd_bytes_total",
        "Bytes covered by NBD commands.",
        MetricType::COUNTER,
        bytes,
    ));
    f.push(family(
        "basalt_nbd_command_duration_seconds",
        "NBD command latency.",
        MetricType::HISTOGRAM,
        latency,
    ));
    f
}

fn iscsi_families(m: &basalt_iscsi::MetricsSnapshot) -> Vec<MetricFamily> {
    let tgt = |t: &basalt_iscsi::metrics::TargetSnapshot| vec![("target", t.iqn.clone())];
    let mut f = vec![
        rows(
            "basalt_iscsi_sessions",
            "Open sessions per target.",
            MetricType::GAUGE,
            m.targets
                .iter()
                .map(|t| (tgt(t), t.sessions as f64))
                .collect(),
        ),
        rows(
            "basalt_iscsi_logins_total",
            "Logins per target.",
            MetricType::COUNTER,
            m.targets
                .iter()
                .map(|t| (tgt(t), t.logins as f64))
                .collect(),
        ),
        rows(
            "basalt_iscsi_login_failures_total",
            "Refused logins per target.",
            MetricType::COUNTER,
            m.targets
                .iter()
                .map(|t| (tgt(t), t.login_failures as f64))
                .collect(),
        ),
    ];
    let mut cmds = Vec::new();
    let mut rd = Vec::new();
    let mut wr = Vec::new();
    let mut errs = Vec::new();
    let mut latency = Vec::new();
    for t in &m.targets {
        for l in &t.luns {
            let lbl = vec![("target", t.iqn.clone()), ("lun", l.name.clone())];
            cmds.push((lbl.clone(), l.commands as f64));
            rd.push((lbl.clone(), l.read_bytes as f64));
            wr.push((lbl.clone(), l.write_bytes as f64));
            for (key, n) in &l.errors_by_sense_key {
                let mut e = lbl.clone();
                e.push(("sense_key", format!("{key:#x}")));
                errs.push((e, *n as f64));
            }
            let bounds: Vec<f64> = l.latency_buckets.iter().map(|(b, _)| *b).collect();
            let counts: Vec<u64> = l.latency_buckets.iter().map(|(_, c)| *c).collect();
            latency.push(histogram_from(
                &[("target", &t.iqn), ("lun", &l.name)],
                &bounds,
                &counts,
                l.latency_sum_seconds,
            ));
        }
    }
    f.push(rows(
        "basalt_iscsi_commands_total",
        "SCSI commands per target and LUN.",
        MetricType::COUNTER,
        cmds,
    ));
    f.push(rows(
        "basalt_iscsi_read_bytes_total",
        "Data-In bytes.",
        MetricType::COUNTER,
        rd,
    ));
    f.push(rows(
        "basalt_iscsi_written_bytes_total",
        "Data-Out bytes.",
        MetricType::COUNTER,
        wr,
    ));
    f.push(rows(
        "basalt_iscsi_errors_total",
        "Commands ended with sense data, by sense key.",
        MetricType::COUNTER,
        errs,
    ));
    f.push(family(
        "basalt_iscsi_command_duration_seconds",
        "SCSI command latency.",
        MetricType::HISTOGRAM,
        latency,
    ));
    f
}

fn lockspace_families(ls: &[crate::daemon::lockspaces::LockspaceMetrics]) -> Vec<MetricFamily> {
    use crate::daemon::lockspaces::{SLOT_STATES, STATES};
    if ls.is_empty() {
        return Vec::new();
    }
    let name =
        |l: &crate::daemon::lockspaces::LockspaceMetrics| vec![("lockspace", l.name.clone())];
    let mut f = vec![
        rows(
            "basalt_lockspace_info",
            "A metric with a constant '1' value labeled by lockspace, device, lockspace id and this host's name in it.",
            MetricType::GAUGE,
            ls.iter()
                .map(|l| {
                    (
                        vec![
                            ("lockspace", l.name.clone()),
                            ("device", l.device.clone()),
                            ("lockspace_id", l.lockspace_id.clone()),
                            ("host", l.host_name.clone()),
                        ],
                        1.0,
                    )
                })
                .collect(),
        ),
        rows(
            "basalt_lockspace_up",
            "Whether this host holds a live lease in the lockspace (1) or not (0).",
            MetricType::GAUGE,
            ls.iter()
                .map(|l| (name(l), f64::from(u8::from(l.state == "live"))))
                .collect(),
        ),
        rows(
            "basalt_lockspace_state",
            "This host's state in the lockspace: 1 for the current state.",
            MetricType::GAUGE,
            ls.iter()
                .flat_map(|l| {
                    STATES.iter().map(move |s| {
                        (
                            vec![("lockspace", l.name.clone()), ("state", s.to_string())],
                            f64::from(u8::from(l.state == *s)),
                        )
                    })
                })
                .collect(),
        ),
        rows(
            "basalt_lockspace_hosts",
            "Heartbeat slots by state as this host sees them (live, dead, recovering, free, corrupt).",
            MetricType::GAUGE,
            ls.iter()
                .flat_map(|l| {
                    SLOT_STATES.iter().map(move |s| {
                        (
                            vec![("lockspace", l.name.clone()), ("state", s.to_string())],
                            l.hosts.get(s).copied().unwrap_or(0) as f64,
                        )
                    })
                })
                .collect(),
        ),
        rows(
            "basalt_lockspace_locks_held",
            "Locks this host holds in the lockspace.",
            MetricType::GAUGE,
            ls.iter().map(|l| (name(l), l.locks_held as f64)).collect(),
        ),
        rows(
            "basalt_lockspace_lease_remaining_seconds",
            "Time left on this host's lease; zero when lost or not joined.",
            MetricType::GAUGE,
            ls.iter()
                .map(|l| (name(l), l.lease_remaining_seconds))
                .collect(),
        ),
        rows(
            "basalt_lockspace_lost_total",
            "Times this host lost its lease (fenced itself) since the daemon started.",
            MetricType::COUNTER,
            ls.iter().map(|l| (name(l), l.lost_total as f64)).collect(),
        ),
    ];
    type Field = fn(&basalt_lockmgr::MetricsSnapshot) -> u64;
    let counters: [(&str, &str, Field); 12] = [
        (
            "basalt_lockspace_heartbeats_total",
            "Heartbeat renewals that succeeded.",
            |m| m.heartbeats_total,
        ),
        (
            "basalt_lockspace_heartbeat_failures_total",
            "Heartbeat renewal attempts that failed (I/O error or timeout).",
            |m| m.heartbeat_failures_total,
        ),
        (
            "basalt_lockspace_lock_acquires_total",
            "Locks granted to this host.",
            |m| m.acquires_total,
        ),
        (
            "basalt_lockspace_lock_contended_total",
            "Lock requests that met a conflicting holder.",
            |m| m.contended_total,
        ),
        (
            "basalt_lockspace_lock_releases_total",
            "Locks released by this host.",
            |m| m.releases_total,
        ),
        (
            "basalt_lockspace_breaks_total",
            "Lock entries of dead hosts broken after their recovery.",
            |m| m.breaks_total,
        ),
        (
            "basalt_lockspace_takeovers_total",
            "Slots of dead hosts taken over by this host.",
            |m| m.takeovers_total,
        ),
        (
            "basalt_lockspace_recoveries_total",
            "Recoveries of dead hosts completed.",
            |m| m.recoveries_total,
        ),
        (
            "basalt_lockspace_recovery_failures_total",
            "Recoveries abandoned (callback error or lost lease).",
            |m| m.recoveries_failed_total,
        ),
        (
            "basalt_lockspace_fencing_events_total",
            "Times this host fenced itself (lost its lease or its slot).",
            |m| m.fencing_events_total,
        ),
        (
            "basalt_lockspace_fenced_writes_refused_total",
            "Protected writes refused because the lease or the lock was gone.",
            |m| m.fenced_writes_refused_total,
        ),
        (
            "basalt_lockspace_checksum_errors_total",
            "Lock-manager sectors that failed their checksum.",
            |m| m.checksum_errors_total,
        ),
    ];
    let joined: Vec<_> = ls
        .iter()
        .filter_map(|l| l.snapshot.as_ref().map(|s| (l, s)))
        .collect();
    for (metric, help, field) in counters {
        f.push(rows(
            metric,
            help,
            MetricType::COUNTER,
            joined
                .iter()
                .map(|(l, s)| (name(l), field(s) as f64))
                .collect(),
        ));
    }
    for (metric, help, hist) in [
        (
            "basalt_lockspace_heartbeat_duration_seconds",
            "Latency of successful heartbeat renewals.",
            (|m| &m.heartbeat_latency_seconds)
                as fn(&basalt_lockmgr::MetricsSnapshot) -> &basalt_lockmgr::HistogramSnapshot,
        ),
        (
            "basalt_lockspace_lock_acquire_duration_seconds",
            "Time from a lock request to its grant, waiting included.",
            |m| &m.acquire_latency_seconds,
        ),
    ] {
        f.push(family(
            metric,
            help,
            MetricType::HISTOGRAM,
            joined
                .iter()
                .map(|(l, s)| {
                    let h = hist(s);
                    histogram_from(
                        &[("lockspace", &l.name)],
                        &h.bounds_seconds,
                        &h.counts,
                        h.sum_seconds,
                    )
                })
                .collect(),
        ));
    }
    f
}

fn switch_families(
    switches: &[(String, BTreeMap<String, PortCountersSnapshot>)],
) -> Vec<MetricFamily> {
    if switches.is_empty() {
        return Vec::new();
    }
    let ports = || {
        switches.iter().flat_map(|(sw, ports)| {
            ports
                .iter()
                .map(move |(port, c)| (sw.as_str(), port.as_str(), c))
        })
    };
    let per_port = |name: &str, help: &str, value: fn(&PortCountersSnapshot) -> u64| {
        family(
            name,
            help,
            MetricType::COUNTER,
            ports()
                .map(|(sw, port, c)| counter(&[("switch", sw), ("port", port)], value(c) as f64))
                .collect(),
        )
    };
    let mut drops = Vec::new();
    for (sw, port, c) in ports() {
        for reason in DropReason::ALL {
            let n = c.drops.get(reason.label()).copied().unwrap_or(0);
            drops.push(counter(
                &[("switch", sw), ("port", port), ("reason", reason.label())],
                n as f64,
            ));
        }
    }
    vec![
        per_port(
            "basalt_switch_port_received_packets_total",
            "Frames the switch received from the port.",
            |c| c.rx_packets,
        ),
        per_port(
            "basalt_switch_port_received_bytes_total",
            "Bytes the switch received from the port.",
            |c| c.rx_bytes,
        ),
        per_port(
            "basalt_switch_port_sent_packets_total",
            "Frames the switch sent to the port.",
            |c| c.tx_packets,
        ),
        per_port(
            "basalt_switch_port_sent_bytes_total",
            "Bytes the switch sent to the port.",
            |c| c.tx_bytes,
        ),
        family(
            "basalt_switch_port_dropped_packets_total",
            "Frames dropped at the port, by reason.",
            MetricType::COUNTER,
            drops,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_blockdev::IoStats;

    #[test]
    fn renders_disk_and_api_metrics() {
        let m = Metrics::new();
        m.observe_request("GET", "/api/v1/status", 200, Duration::from_millis(3));
        let stats = IoStats::default();
        let t = stats.start();
        stats.finish(IoKind::Read, t, 4096, true);
        let info = DiskInfo {
            name: "d0".into(),
            path: "/x \"quoted\"".into(),
            kind: "file".into(),
            size_bytes: 1 << 30,
            block_size: 512,
            serial: None,
            direct_io: true,
            state: DiskState::Online,
            error: None,
        };
        let mut port = PortCountersSnapshot {
            rx_packets: 3,
            ..Default::default()
        };
        port.drops.insert("vlan".into(), 2);
        let inputs = Inputs {
            disks: vec![(info, stats.snapshot())],
            switches: vec![("vs0".into(), BTreeMap::from([("vm1".to_string(), port)]))],
            ..Inputs::default()
        };
        let text = m.render(&inputs);
        assert!(
            text.contains(
                "basalt_switch_port_received_packets_total{switch=\"vs0\",port=\"vm1\"} 3"
            ),
            "{text}"
        );
        assert!(text.contains("basalt_switch_port_dropped_packets_total{switch=\"vs0\",port=\"vm1\",reason=\"vlan\"} 2"), "{text}");
        assert!(
            text.contains("basalt_disk_reads_completed_total{disk=\"d0\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("basalt_disk_read_bytes_total{disk=\"d0\"} 4096"),
            "{text}"
        );
        assert!(text.contains("path=\"/x \\\"quoted\\\"\""), "{text}");
        assert!(
            text.contains(
                "basalt_api_requests_total{code=\"200\",method=\"GET\",route=\"/api/v1/status\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("basalt_build_info{"), "{text}");
        assert!(
            text.contains(
                "basalt_disk_io_duration_seconds_bucket{disk=\"d0\",op=\"read\",le=\"+Inf\"} 1"
            ),
            "{text}"
        );
    }
}
