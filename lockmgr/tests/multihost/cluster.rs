//! The driver side: namespaces, the target, a lockspace formatted over iSCSI, host
//! processes in their namespaces, and their event streams. Each event is stamped with
//! the driver's own clock on arrival (`Ev::at`, an upper bound of when it happened);
//! the host's own clock is in the event (`t`).

use crate::host::{self, HostCfg, Mode};
use crate::net::{self, Net};
use crate::target::Target;
use basalt_blockdev::SharedBlockDev;
use basalt_blockdev_iscsi::{IscsiDev, IscsiOptions};
use basalt_lockmgr::{FormatOptions, Lockspace};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One event from a host.
#[derive(Debug, Clone)]
pub struct Ev {
    /// Host index (0 = host 1).
    pub host: usize,
    /// Arrival on the driver's clock.
    pub at: Instant,
    /// The event.
    pub v: Value,
}

impl Ev {
    /// Its kind.
    pub fn ev(&self) -> &str {
        self.v["ev"].as_str().unwrap_or("")
    }
    /// The host's clock, seconds.
    pub fn t(&self) -> f64 {
        self.f("t")
    }
    /// A numeric field.
    pub fn f(&self, k: &str) -> f64 {
        self.v[k].as_f64().unwrap_or(f64::NAN)
    }
    /// Is it `ev` from host `h`?
    pub fn is(&self, h: usize, ev: &str) -> bool {
        self.host == h && self.ev() == ev
    }
}

/// A host process slot.
#[derive(Default)]
pub struct HostProc {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    /// Process id of the current incarnation.
    pub pid: u32,
    /// SIGSTOPped now.
    pub stopped: bool,
    /// Incarnations started.
    pub starts: u32,
}

/// A test's world. Dropping it kills every host, stops the target and deletes the
/// namespaces (in that order).
pub struct Cluster {
    /// Host processes.
    pub hosts: Vec<HostProc>,
    /// Every event received so far.
    pub events: Vec<Ev>,
    rx: mpsc::Receiver<Ev>,
    tx: mpsc::Sender<Ev>,
    logs: Option<tempfile::TempDir>,
    /// The target (in the hub namespace).
    pub target: Target,
    /// The namespaces.
    pub net: Net,
    exe: std::path::PathBuf,
}

fn format_over_iscsi(hub: &str, url: String, fmt: FormatOptions) {
    net::in_ns(hub, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let o = IscsiOptions {
                initiator: "iqn.2026-11.org.basalt:mh-format".into(),
                ..IscsiOptions::default()
            };
            let dev: SharedBlockDev = Arc::new(IscsiDev::connect(&url, &o).await.unwrap());
            Lockspace::format(&dev, 0, &fmt).await.unwrap();
            let h = Lockspace::read_header(&dev, 0).await.unwrap();
            assert_eq!(
                u64::from(h.dead_after_ms),
                fmt.dead_after.as_millis() as u64
            );
        });
    });
}

impl Cluster {
    /// Namespaces for `n` hosts, the target on a 64 MiB file LUN, and a lockspace
    /// formatted through the iSCSI initiator with `fmt`.
    pub fn new(tag: &str, n: usize, fmt: FormatOptions) -> Cluster {
        net::require_root();
        let net = Net::new(tag, n);
        let target = Target::start(&net.hub, 64);
        format_over_iscsi(&net.hub, target.url.clone(), fmt);
        let (tx, rx) = mpsc::channel();
        let logs = tempfile::Builder::new()
            .prefix(&format!("lockmgr-multihost-{tag}-"))
            .tempdir()
            .unwrap();
        Cluster {
            hosts: (0..n).map(|_| HostProc::default()).collect(),
            events: Vec::new(),
            rx,
            tx,
            logs: Some(logs),
            target,
            net,
            exe: std::env::current_exe().unwrap(),
        }
    }

    /// A host configuration with the library's default tuning.
    pub fn cfg(&self, i: usize, mode: Mode, watch: bool) -> HostCfg {
        HostCfg {
            url: self.target.url.clone(),
            host: (i + 1) as u8,
            mode,
            watch,
            scan_ms: 500,
            poll_max_ms: 500,
            iscsi_timeout_ms: 3000,
            seed: 0x9e37_79b9_7f4a_7c15 ^ ((i as u64 + 1) * 0x1234_5678),
        }
    }

    /// Starts (or restarts) host `i` in its namespace.
    pub fn spawn(&mut self, i: usize, cfg: &HostCfg) {
        let ns = self.net.hosts[i].clone();
        let h = &mut self.hosts[i];
        h.starts += 1;
        let dir = self.logs.as_ref().map(|d| d.path().to_path_buf()).unwrap();
        let log_path = dir.join(format!("host{}.{}.log", i + 1, h.starts));
        let err =
            std::fs::File::create(dir.join(format!("host{}.{}.stderr", i + 1, h.starts))).unwrap();
        let mut cmd = Command::new("ip");
        // SAFETY: the closure runs in the forked child before exec and only makes one
        // async-signal-safe system call. The host dies with the thread that started
        // it (this test), even if the test process is killed before its Drop runs.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .args(["netns", "exec", &ns])
            .arg(&self.exe)
            .args([
                "--exact",
                "zz_host_process_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(host::ENV, serde_json::to_string(cfg).unwrap())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        h.stdin = child.stdin.take();
        h.pid = child.id();
        h.stopped = false;
        h.child = Some(child);
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            let mut log = std::fs::File::create(log_path).ok();
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                if let Some(f) = log.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                // libtest may print "test zz_host_process_entry ... " before the first.
                if let Some(json_at) = line.find('{') {
                    if let Ok(v) = serde_json::from_str::<Value>(&line[json_at..]) {
                        if tx.send(Ev { host: i, at, v }).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = tx.send(Ev {
                host: i,
                at: Instant::now(),
                v: serde_json::json!({"ev": "eof"}),
            });
        });
    }

    /// Sends a command line to host `i` (script mode).
    pub fn send(&mut self, i: usize, cmd: &str) {
        if let Some(s) = self.hosts[i].stdin.as_mut() {
            let _ = writeln!(s, "{cmd}");
            let _ = s.flush();
        }
    }

    /// Sends `sig` to host `i`.
    pub fn signal(&mut self, i: usize, sig: i32) {
        let pid = self.hosts[i].pid as libc::pid_t;
        if pid > 0 {
            // SAFETY: kill(2) on a child we started and have not reaped.
            unsafe { libc::kill(pid, sig) };
        }
        match sig {
            libc::SIGSTOP => self.hosts[i].stopped = true,
            libc::SIGCONT => self.hosts[i].stopped = false,
            _ => {}
        }
    }

    /// SIGKILLs host `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        self.signal(i, libc::SIGKILL);
        let h = &mut self.hosts[i];
        if let Some(mut c) = h.child.take() {
            let _ = c.wait();
        }
        h.stdin = None;
        h.pid = 0;
        h.stopped = false;
    }

    /// Whether host `i` runs (a process exists and has not exited).
    pub fn running(&mut self, i: usize) -> bool {
        let h = &mut self.hosts[i];
        match h.child.as_mut() {
            Some(c) => match c.try_wait() {
                Ok(None) => true,
                _ => {
                    h.child = None;
                    h.stdin = None;
                    h.pid = 0;
                    false
                }
            },
            None => false,
        }
    }

    /// Receives events until `deadline`.
    pub fn pump_until(&mut self, deadline: Instant) {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match self.rx.recv_timeout(left) {
                Ok(e) => self.events.push(e),
                Err(mpsc::RecvTimeoutError::Timeout) => return,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Receives events for `d`.
    pub fn pump(&mut self, d: Duration) {
        self.pump_until(Instant::now() + d);
    }

    /// Waits for the first event, received from now on, that satisfies `pred`.
    pub fn wait(&mut self, timeout: Duration, what: &str, pred: impl Fn(&Ev) -> bool) -> Ev {
        let from = self.events.len();
        self.wait_from(from, timeout, what, pred)
    }

    /// Waits for the first event at or after position `from` of [`Cluster::events`]
    /// (already received or not) that satisfies `pred`.
    pub fn wait_from(
        &mut self,
        from: usize,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Ev) -> bool,
    ) -> Ev {
        if let Some(e) = self.events[from.min(self.events.len())..]
            .iter()
            .find(|e| pred(e))
        {
            return e.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(e) => {
                    self.events.push(e.clone());
                    if pred(&e) {
                        return e;
                    }
                }
                Err(_) => {
                    let tail: Vec<String> = self
                        .events
                        .iter()
                        .rev()
                        .take(40)
                        .rev()
                        .map(|e| format!("  host{} {}", e.host + 1, e.v))
                        .collect();
                    panic!(
                        "timed out after {timeout:?} waiting for {what}; last events:\n{}",
                        tail.join("\n")
                    );
                }
            }
        }
    }

    /// Events of host `h` of kind `ev`, in arrival order.
    pub fn of(&self, h: usize, ev: &str) -> Vec<&Ev> {
        self.events.iter().filter(|e| e.is(h, ev)).collect()
    }

    /// Where the host logs are (kept if the test fails).
    pub fn log_dir(&self) -> String {
        self.logs
            .as_ref()
            .map(|d| d.path().display().to_string())
            .unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.hosts.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            if let Some(d) = self.logs.take() {
                eprintln!("host logs kept in {}", d.keep().display());
            }
        }
    }
}
