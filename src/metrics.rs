//! Prometheus metrics: the text exposition format served at `/metrics`.
//!
//! Names follow node_exporter's (`basalt_disk_reads_completed_total` mirrors
//! `node_disk_reads_completed_total`), in base units with `_total`, `_bytes` and
//! `_seconds` suffixes, and label sets bounded by configuration (disk names, API route
//! templates), never by request data. Disk counters live in `blockdev`'s lock-free
//! `IoStats`; they are turned into metric families at scrape time, so the I/O path
//! never touches the registry.

use crate::api::types::{DiskInfo, DiskState};
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
