//! `/metrics` checked by Prometheus's own tools: `promtool check metrics` on a scrape,
//! and a real Prometheus server scraping the daemon over HTTPS.

mod common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

fn daemon_with_disk_io(dir: &std::path::Path) -> Daemon {
    let d = Daemon::start(&dir.join("var"), Some(EPHEMERAL));
    // Adding a disk probes it with a read, so the disk counters are not all zero.
    d.cli(&["disk", "add", "d0", "--size", "64M"]).ok();
    d
}

#[test]
fn promtool_finds_nothing_wrong() {
    let dir = tempdir();
    let d = daemon_with_disk_io(dir.path());
    // Some API traffic for the request metrics, including a 401 and a 404.
    d.cli(&["status"]).ok();
    d.curl("/api/v1/status", None, &[]);
    d.curl("/api/v1/nothing", Some(&d.token()), &[]);
    let (code, scrape) = d.curl("/metrics", None, &[]);
    assert_eq!(code, 200);
    for name in [
        "basalt_build_info",
        "basalt_api_requests_total",
        "basalt_api_request_duration_seconds_bucket",
        "basalt_disk_reads_completed_total{disk=\"d0\"}",
        "basalt_disk_read_bytes_total{disk=\"d0\"}",
        "basalt_disk_io_duration_seconds_bucket{disk=\"d0\",op=\"read\"",
        "basalt_disk_up{disk=\"d0\"} 1",
        "process_resident_memory_bytes",
    ] {
        assert!(scrape.contains(name), "{name} missing from:\n{scrape}");
    }
    assert!(
        !scrape.contains("basalt_disk_reads_completed_total{disk=\"d0\"} 0\n"),
        "probe read not counted"
    );
    promtool_check(&scrape);
}

#[test]
fn a_prometheus_server_scrapes_the_daemon() {
    let dir = tempdir();
    let d = daemon_with_disk_io(dir.path());
    let port = d.port();
    let prom_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: basalt\n    scheme: https\n    \
             tls_config:\n      ca_file: {}\n      server_name: localhost\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n",
            d.cert().display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("prometheus is installed (deploy/install-deps.sh test)");
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _kill = Kill(&mut prom);

    let query = |q: &str| -> String {
        let out = Command::new("curl")
            .args(["-sS", "--get", "--data-urlencode"])
            .arg(format!("query={q}"))
            .arg(format!("http://127.0.0.1:{prom_port}/api/v1/query"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let up = query("up{job=\"basalt\"}");
        let reads = query("basalt_disk_reads_completed_total{disk=\"d0\"}");
        if up.contains("\"1\"]") && reads.contains("\"disk\":\"d0\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape the daemon: up={up} reads={reads}\n{}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
