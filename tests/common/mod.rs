//! Test harness: runs the real `basalt` binary as a daemon in a temporary data
//! directory, and talks to it with the `basalt` CLI and with curl (an HTTPS client
//! nobody here wrote).

#![allow(dead_code)]
// Test fixtures: a failure here is a failed test, which is what unwrap reports.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BASALT: &str = env!("CARGO_BIN_EXE_basalt");

/// A running daemon. Killed (SIGKILL) on drop if still running.
pub struct Daemon {
    pub data_dir: PathBuf,
    pub child: Option<Child>,
    pub log: PathBuf,
}

/// The result of a command, with its output as text.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "command failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// A minimal config that listens on an ephemeral port.
pub const EPHEMERAL: &str = "version = 1\n[api]\nlisten = [\"127.0.0.1:0\"]\n";

impl Daemon {
    /// Starts a daemon on `data_dir`, applying `config` at start if given.
    pub fn start(data_dir: &Path, config: Option<&str>) -> Daemon {
        let log = data_dir.with_extension("log");
        std::fs::create_dir_all(data_dir).unwrap();
        let mut cmd = Command::new(BASALT);
        cmd.arg("serve").arg("--data-dir").arg(data_dir);
        if let Some(text) = config {
            let path = data_dir.with_extension("start.toml");
            std::fs::write(&path, text).unwrap();
            cmd.arg("--config").arg(path);
        }
        let logfile = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(logfile.try_clone().unwrap())
            .stderr(logfile)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn basalt serve");
        let mut d = Daemon {
            data_dir: data_dir.to_path_buf(),
            child: Some(child),
            log,
        };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("daemon exited early with {status}:\n{}", self.log_text());
                }
            }
            if self.data_dir.join("basalt.sock").exists() {
                let r = self.cli(&["status"]);
                if r.code == 0 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "daemon not ready after 60 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs the CLI against this daemon's data directory.
    pub fn cli(&self, args: &[&str]) -> Run {
        Command::new(BASALT)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .output()
            .expect("run basalt")
            .into()
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    pub fn cert(&self) -> PathBuf {
        self.data_dir.join("tls/cert.pem")
    }

    /// The HTTPS port the daemon listens on (from its status).
    pub fn port(&self) -> u16 {
        let r = self.cli(&["--json", "status"]).ok();
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        let addr = v["listen"][0].as_str().expect("a TCP listener").to_string();
        addr.rsplit_once(':').unwrap().1.parse().unwrap()
    }

    /// `curl` over HTTPS, verifying the daemon's certificate. Returns (status, body).
    pub fn curl(&self, path: &str, token: Option<&str>, extra: &[&str]) -> (u16, String) {
        let url = format!("https://localhost:{}{}", self.port(), path);
        curl(&url, &self.cert(), token, extra)
    }

    /// Sends SIGTERM and waits for the exit; returns the exit code.
    pub fn stop(&mut self) -> i32 {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "daemon ignored SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `curl` with the given CA certificate. Returns (HTTP status, body).
pub fn curl(url: &str, cacert: &Path, token: Option<&str>, extra: &[&str]) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "--cacert"])
        .arg(cacert)
        .args(extra);
    if let Some(t) = token {
        cmd.arg("-H").arg(format!("Authorization: Bearer {t}"));
    }
    let out = cmd
        .arg(url)
        .output()
        .expect("curl is installed (deploy/install-deps.sh test)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A fresh temporary directory for one test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("basalt-test-")
        .tempdir()
        .unwrap()
}

/// `promtool check metrics` on a scrape: it must pass without a single remark.
pub fn promtool_check(scrape: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (deploy/install-deps.sh test)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool says:\n{report}"
    );
}
