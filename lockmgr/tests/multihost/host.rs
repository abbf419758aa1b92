//! The host process: this test binary re-executed (by `cluster.rs`, inside the host's
//! network namespace) with its configuration in the environment. It connects to the
//! shared LUN with its own iSCSI session, joins the lockspace and then either runs the
//! exclusion oracle (`Mode::Oracle`) or obeys commands read from stdin
//! (`Mode::Script`). Every line it prints on stdout is a JSON event carrying `t`, the
//! host's own `CLOCK_BOOTTIME` in seconds: the driver compares such times only within
//! one host, never across hosts.

use async_trait::async_trait;
use basalt_blockdev::{
    BlockDev, CompareOutcome, Extent, Geometry, Result as BlockResult, SharedBlockDev, WriteFlags,
    ZeroFlags,
};
use basalt_blockdev_iscsi::{IscsiDev, IscsiOptions};
use basalt_lockmgr::format::LockRecord;
use basalt_lockmgr::{
    BootClock, Clock, FencedDev, HostState, JoinOptions, LockError, LockGuard, LockMode, Lockspace,
    Presumed, ResourceId, SlotState, Tuning,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The environment variable that turns this test binary into a host process.
pub const ENV: &str = "BASALT_LOCKMGR_MULTIHOST_HOST";

/// Where the stamps begin in an oracle data block and in the value block.
pub const STAMP_LEN: usize = 24;

/// A host's configuration (JSON in [`ENV`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostCfg {
    /// iscsi:// URL of the shared LUN.
    pub url: String,
    /// Host number, 1..=255: the host id is 16 copies of it.
    pub host: u8,
    /// What to do once joined.
    pub mode: Mode,
    /// Report slot changes, lease renewals, fencing and metrics (`Mode::Script` tests).
    pub watch: bool,
    /// Heartbeat-region scan interval, ms.
    pub scan_ms: u64,
    /// Longest pause between polls of a contended lock, ms.
    pub poll_max_ms: u64,
    /// libiscsi's own timeout (an unanswered command resets the session), ms.
    pub iscsi_timeout_ms: u64,
    /// Seed of the oracle's choices.
    pub seed: u64,
}

/// What a host does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Mode {
    /// Acquire, stamp, hold, check, release, forever.
    Oracle {
        /// Resources contended on (`res0` ..).
        resources: u32,
        /// Hold time, microseconds.
        hold_us: u64,
        /// Byte offset of the data blocks (one sector per resource).
        data_base: u64,
        /// Percentage of shared-read acquisitions.
        shared_pct: u64,
    },
    /// Commands from stdin, one per line (see `script`).
    Script,
    /// The oracle's negative control: stamps data blocks without taking any lock.
    Rogue {
        /// Resources (`res0` ..).
        resources: u32,
        /// Byte offset of the data blocks.
        data_base: u64,
    },
}

static HOST: OnceLock<u8> = OnceLock::new();

fn now() -> f64 {
    BootClock.now().as_secs_f64()
}

/// Prints one event line: `ev`, the host, its clock, and the fields of `v`.
pub fn emit(ev: &str, v: Value) {
    let mut o = json!({"ev": ev, "h": HOST.get().copied().unwrap_or(0), "t": now()});
    if let (Some(o), Value::Object(m)) = (o.as_object_mut(), v) {
        o.extend(m);
    }
    println!("{o}");
}

/// A stamp: who wrote (host, slot generation, process nonce) and which write (counter).
pub fn stamp(host: u8, generation: u32, counter: u64, nonce: u64) -> [u8; STAMP_LEN] {
    let mut s = [0u8; STAMP_LEN];
    s[0] = host;
    s[1..5].copy_from_slice(&generation.to_le_bytes());
    s[8..16].copy_from_slice(&counter.to_le_bytes());
    s[16..24].copy_from_slice(&nonce.to_le_bytes());
    s
}

/// A stamp as JSON `[host, generation, counter, nonce]` (for matching across logs).
pub fn stamp_json(b: &[u8]) -> Value {
    if b.len() < STAMP_LEN {
        return Value::Null;
    }
    let u32at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let u64at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(a)
    };
    json!([b[0], u32at(1), u64at(8), u64at(16)])
}

fn nonce() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b) ^ u64::from(std::process::id()).rotate_left(32)
}

/// xorshift64*: the oracle's choices.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The lock manager's device: the iSCSI LUN, with one fault a network can cause but a
/// test cannot time from outside: an answer that arrives too late. When armed, the next
/// compare-and-write goes to the target (and is applied there) but its answer is held
/// back for `hold`, longer than the lock manager's request timeout, so the lock manager
/// sees a timeout and retries the same CAW, which the target then miscompares.
pub struct LateAnswer {
    inner: SharedBlockDev,
    armed: AtomicBool,
    hold: Duration,
}

#[async_trait]
impl BlockDev for LateAnswer {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    async fn read(&self, offset: u64, len: usize) -> BlockResult<Bytes> {
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> BlockResult<()> {
        self.inner.write(offset, data, flags).await
    }
    async fn flush(&self) -> BlockResult<()> {
        self.inner.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.inner.discard(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn compare_and_write(
        &self,
        offset: u64,
        compare: Bytes,
        data: Bytes,
        flags: WriteFlags,
    ) -> BlockResult<CompareOutcome> {
        let late = self.armed.swap(false, Ordering::SeqCst);
        let r = self
            .inner
            .compare_and_write(offset, compare, data, flags)
            .await;
        if late {
            emit(
                "late_answer",
                json!({"offset": offset, "outcome": format!("{r:?}")}),
            );
            tokio::time::sleep(self.hold).await;
        }
        r
    }
    async fn block_status(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
        self.inner.block_status(offset, len).await
    }
}

/// Runs the host; returns the process exit code (3: lost, rejoin by restarting).
pub fn main(cfg: HostCfg) -> i32 {
    let _ = HOST.set(cfg.host);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            emit("error", json!({"error": e.to_string()}));
            return 2;
        }
    };
    let code = rt.block_on(run(cfg));
    rt.shutdown_timeout(Duration::from_millis(100));
    code
}

async fn run(cfg: HostCfg) -> i32 {
    let o = IscsiOptions {
        initiator: format!("iqn.2026-11.org.basalt:mh-host{}", cfg.host),
        io_timeout: Duration::from_millis(cfg.iscsi_timeout_ms),
        reconnect_interval: Duration::from_millis(200),
        ..IscsiOptions::default()
    };
    let raw: SharedBlockDev = match IscsiDev::connect(&cfg.url, &o).await {
        Ok(d) => Arc::new(d),
        Err(e) => {
            emit("error", json!({"stage": "connect", "error": e.to_string()}));
            return 2;
        }
    };
    let hdr = match Lockspace::read_header(&raw, 0).await {
        Ok(h) => h,
        Err(e) => {
            emit("error", json!({"stage": "header", "error": e.to_string()}));
            return 2;
        }
    };
    let io_timeout = Duration::from_millis(u64::from(hdr.heartbeat_ms) / 2);
    let link = Arc::new(LateAnswer {
        inner: raw.clone(),
        armed: AtomicBool::new(false),
        hold: io_timeout + Duration::from_millis(300),
    });
    let mut jo = JoinOptions::new([cfg.host; 16], format!("host-{}", cfg.host));
    jo.tuning = Tuning {
        scan_interval: Duration::from_millis(cfg.scan_ms),
        poll_max: Duration::from_millis(cfg.poll_max_ms),
        ..Tuning::default()
    };
    let t_join = now();
    let ls = match Lockspace::join(link.clone(), 0, jo).await {
        Ok(ls) => Arc::new(ls),
        Err(e) => {
            emit("error", json!({"stage": "join", "error": e.to_string()}));
            return 2;
        }
    };
    let timing = ls.timing();
    emit(
        "joined",
        json!({"slot": ls.slot(), "generation": ls.generation(), "join_s": now() - t_join,
               "heartbeat_s": timing.heartbeat.as_secs_f64(), "dead_s": timing.dead_after.as_secs_f64(),
               "lease_s": timing.lease.as_secs_f64(), "io_s": io_timeout.as_secs_f64()}),
    );
    if cfg.watch {
        tokio::spawn(watch(ls.clone()));
    }
    match cfg.mode {
        Mode::Oracle {
            resources,
            hold_us,
            data_base,
            shared_pct,
        } => {
            let o = Oracle {
                ls,
                raw,
                resources,
                hold: Duration::from_micros(hold_us),
                data_base,
                shared_pct,
                io_timeout,
                rng: Rng(cfg.seed | 1),
                nonce: nonce(),
            };
            o.run().await
        }
        Mode::Script => script(ls, raw, link, io_timeout).await,
        Mode::Rogue {
            resources,
            data_base,
        } => {
            let bs = raw.geometry().block_size as usize;
            let mut rng = Rng(cfg.seed | 1);
            let n = nonce();
            for counter in 1.. {
                if matches!(ls.state(), HostState::Lost(_)) {
                    return 3;
                }
                let r = rng.next() % u64::from(resources.max(1));
                let mut blk = vec![0u8; bs];
                blk[..STAMP_LEN].copy_from_slice(&stamp(cfg.host, ls.generation(), counter, n));
                let _ = raw
                    .write(
                        data_base + r * bs as u64,
                        Bytes::from(blk),
                        WriteFlags::default(),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            0
        }
    }
}

/// Reports, from this host's point of view: its own lease renewals (`lease`: the issue
/// time of the acknowledged renewal is `expiry - lease`), every change of another slot
/// with the time this host's scanner first saw the new image (`slot`), its takeovers
/// (`takeover`: the dead image's counter, how long it had seen it unchanged when it
/// decided), the first failed fence check (`fenced`), the lost state (`lost`) and
/// metric changes (`metric`).
async fn watch(ls: Arc<Lockspace>) {
    let lease = ls.timing().lease;
    let mut last_expiry = -1.0f64;
    let mut slots: HashMap<u16, (Option<SlotState>, u32, u64)> = HashMap::new();
    let mut fenced = false;
    let mut lost = false;
    let mut takeovers = 0usize;
    let mut last_metrics = ls.metrics();
    loop {
        let t = now();
        let st = ls.status();
        let expiry = t + st.lease_remaining.as_secs_f64();
        if !st.lease_remaining.is_zero() && (expiry - last_expiry).abs() > 0.002 {
            // The slot counter is the number of acknowledged renewals (counted just
            // after the lease is extended).
            tokio::time::sleep(Duration::from_millis(1)).await;
            let own = st.slots.iter().find(|s| s.slot == st.slot);
            emit(
                "lease",
                json!({"expiry": expiry, "issue": expiry - lease.as_secs_f64(),
                       "counter": ls.metrics().heartbeats_total,
                       "status_counter": own.map(|s| s.counter), "generation": st.generation}),
            );
            last_expiry = expiry;
        }
        for s in &st.slots {
            if s.slot == st.slot {
                continue;
            }
            let key = (s.state, s.generation, s.counter);
            if slots.get(&s.slot) != Some(&key) {
                slots.insert(s.slot, key);
                if s.state.is_some_and(|x| x != SlotState::Free) || s.generation > 0 {
                    emit(
                        "slot",
                        json!({"slot": s.slot, "state": s.state, "generation": s.generation,
                               "counter": s.counter, "hostname": s.hostname,
                               "seen": t - s.unchanged_for.as_secs_f64(),
                               "by_me": s.presumed == Presumed::RecoveringByMe}),
                    );
                }
            }
        }
        for tk in st.takeovers.iter().skip(takeovers) {
            let decided = t - tk.decided_ago.as_secs_f64();
            emit(
                "takeover",
                json!({"slot": tk.slot, "dead_generation": tk.dead_generation,
                       "dead_counter": tk.dead_counter, "hostname": tk.hostname,
                       "unchanged_for": tk.unchanged_for.as_secs_f64(), "decided": decided,
                       "seen": decided - tk.unchanged_for.as_secs_f64()}),
            );
        }
        takeovers = takeovers.max(st.takeovers.len());
        if !fenced {
            if let Err(e) = ls.fence().check() {
                fenced = true;
                emit("fenced", json!({"error": e.to_string()}));
            }
        }
        if !lost {
            if let HostState::Lost(r) = st.state {
                lost = true;
                emit("lost", json!({"reason": r}));
            }
        }
        let m = ls.metrics();
        if m.own_image_recognized_total != last_metrics.own_image_recognized_total
            || m.takeovers_total != last_metrics.takeovers_total
            || m.heartbeat_failures_total != last_metrics.heartbeat_failures_total
            || m.breaks_total != last_metrics.breaks_total
            || m.recoveries_total != last_metrics.recoveries_total
        {
            emit(
                "metric",
                json!({"own_image_recognized": m.own_image_recognized_total,
                       "takeovers": m.takeovers_total, "heartbeat_failures": m.heartbeat_failures_total,
                       "breaks": m.breaks_total, "recoveries": m.recoveries_total,
                       "heartbeats": m.heartbeats_total}),
            );
            last_metrics = m;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Oracle {
    ls: Arc<Lockspace>,
    raw: SharedBlockDev,
    resources: u32,
    hold: Duration,
    data_base: u64,
    shared_pct: u64,
    io_timeout: Duration,
    rng: Rng,
    nonce: u64,
}

impl Oracle {
    /// The exclusion oracle (sanlock's devcount): each exclusive holder stamps the
    /// lock's value block (CAW-guarded by its holder entry) and the resource's data
    /// block (a plain write, issued after a lease check with more than its timeout
    /// left), holds, re-reads both, and reports any foreign stamp while its fence is
    /// still valid as a violation. Shared holders check that neither changes under
    /// them. A plain write that completed too late for the timing argument (its host
    /// was stopped between the lease check and the wire) or whose completion is unknown
    /// is reported as `late` with its stamp, so the driver can tell such a stale landing
    /// (outside the protocol's timing model) from a protocol failure.
    async fn run(mut self) -> i32 {
        let bs = self.raw.geometry().block_size as usize;
        let margin = self.ls.timing().heartbeat;
        let mut counter = 0u64;
        loop {
            if let HostState::Lost(r) = self.ls.state() {
                emit("lost", json!({"reason": r}));
                return 3;
            }
            let r = (self.rng.next() % u64::from(self.resources.max(1))) as u32;
            let shared = self.rng.next() % 100 < self.shared_pct;
            let mode = if shared {
                LockMode::SharedRead
            } else {
                LockMode::Exclusive
            };
            let Some(res) = ResourceId::from_name(&format!("res{r}")) else {
                return 2;
            };
            let g = match self
                .ls
                .lock_timeout(res, mode, Duration::from_millis(300))
                .await
            {
                Ok(g) => g,
                Err(LockError::Timeout) | Err(LockError::WouldBlock { .. }) => continue,
                Err(e) => {
                    if let HostState::Lost(r) = self.ls.state() {
                        emit("lost", json!({"reason": r, "error": e.to_string()}));
                        return 3;
                    }
                    emit("acq_err", json!({"error": e.to_string()}));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            counter += 1;
            emit(
                "a",
                json!({"r": r, "m": if shared {"s"} else {"x"}, "epoch": g.epoch()}),
            );
            let data_off = self.data_base + u64::from(r) * bs as u64;
            if shared {
                self.shared_hold(&g, data_off, bs).await;
            } else {
                let st = stamp(
                    HOST.get().copied().unwrap_or(0),
                    self.ls.generation(),
                    counter,
                    self.nonce,
                );
                self.exclusive_hold(&g, st, data_off, bs, margin).await;
            }
            if let Err(e) = g.unlock().await {
                if let HostState::Lost(r) = self.ls.state() {
                    emit("lost", json!({"reason": r, "error": e.to_string()}));
                    return 3;
                }
                emit("unlock_err", json!({"error": e.to_string()}));
            }
        }
    }

    async fn shared_hold(&self, g: &LockGuard, data_off: u64, bs: usize) {
        let p0 = g.read_payload().await;
        let d0 = self.raw.read(data_off, bs).await;
        tokio::time::sleep(self.hold).await;
        let p1 = g.read_payload().await;
        let d1 = self.raw.read(data_off, bs).await;
        let valid = g.fence().check().is_ok();
        if let (true, Ok(p0), Ok(p1), Ok(d0), Ok(d1)) = (valid, p0, p1, d0, d1) {
            if p0 != p1 {
                emit(
                    "viol",
                    json!({"kind": "value", "mode": "s", "found": stamp_json(&p1), "before": stamp_json(&p0)}),
                );
            }
            if d0 != d1 {
                emit(
                    "viol",
                    json!({"kind": "data", "mode": "s", "found": stamp_json(&d1), "before": stamp_json(&d0)}),
                );
            }
        }
    }

    async fn exclusive_hold(
        &self,
        g: &LockGuard,
        st: [u8; STAMP_LEN],
        data_off: u64,
        bs: usize,
        margin: Duration,
    ) {
        let clock = BootClock;
        // 1. The value block: a CAW of the record, refused at the target once this
        //    host's entry is gone.
        let wrote_value = match g.write_payload(&st).await {
            Ok(()) => true,
            Err(LockError::Fenced(r)) => {
                emit("refused", json!({"what": "value", "reason": r}));
                false
            }
            Err(e) => {
                emit("wp_err", json!({"error": e.to_string()}));
                false
            }
        };
        // 2. The data block: a plain write, only with more than its timeout left.
        let mut wrote_data = false;
        match g.fence().check_for(self.io_timeout) {
            Ok(left) => {
                let expiry = clock.now() + left;
                let mut blk = vec![0u8; bs];
                blk[..STAMP_LEN].copy_from_slice(&st);
                let w = self
                    .raw
                    .write(data_off, Bytes::from(blk), WriteFlags { fua: true });
                let r = tokio::time::timeout(self.io_timeout, w).await;
                let done = clock.now();
                let ok = matches!(r, Ok(Ok(())));
                if !ok || done >= expiry + margin {
                    emit(
                        "late",
                        json!({"stamp": stamp_json(&st), "ok": ok,
                               "over_s": done.as_secs_f64() - (expiry + margin).as_secs_f64()}),
                    );
                }
                wrote_data = ok;
            }
            Err(e) => emit("refused", json!({"what": "data", "error": e.to_string()})),
        }
        tokio::time::sleep(self.hold).await;
        let p = g.read_payload().await;
        let d = self.raw.read(data_off, bs).await;
        if g.fence().check().is_err() {
            emit("fenced_hold", json!({}));
            return;
        }
        if let Ok(p) = p {
            if wrote_value && p[..STAMP_LEN] != st {
                emit(
                    "viol",
                    json!({"kind": "value", "mode": "x", "found": stamp_json(&p), "mine": stamp_json(&st)}),
                );
            }
        }
        if let Ok(d) = d {
            if wrote_data && d[..STAMP_LEN] != st {
                emit(
                    "viol",
                    json!({"kind": "data", "mode": "x", "found": stamp_json(&d), "mine": stamp_json(&st)}),
                );
            }
        }
    }
}

/// Script mode: one command per stdin line, each run in its own task:
/// - `lock R`: lock resource `R` exclusively (waiting); `asked`, then `granted`.
/// - `unlock R`
/// - `write R` / `read R`: write this host's stamp into the value block / read it.
/// - `protect R`: protected writes in a loop (every 20 ms: lease check, then the value
///   block through `write_payload`); reports each outcome (`pw`); after each success
///   it reads the raw record, the image a stale CAW would compare against. Ends after
///   three refusals.
/// - `stale-caw R`: a CAW of the record from the last image `protect` saw, straight to
///   the LUN, bypassing every host-side check (what a host that slept between its
///   check and its write would send): `stale_caw` with the target's verdict.
/// - `fenced-write OFF`: a write through `FencedDev` with this host's membership fence.
/// - `late-next-caw`: arm [`LateAnswer`].
/// - `exit`: exits at once.
async fn script(
    ls: Arc<Lockspace>,
    raw: SharedBlockDev,
    link: Arc<LateAnswer>,
    io_timeout: Duration,
) -> i32 {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut line = String::new();
        while stdin.read_line(&mut line).is_ok_and(|n| n > 0) {
            if tx.send(line.trim().to_string()).is_err() {
                break;
            }
            line.clear();
        }
    });
    let guards: Arc<Mutex<HashMap<String, LockGuard>>> = Arc::default();
    let images: Arc<Mutex<HashMap<String, (u64, Bytes)>>> = Arc::default();
    while let Some(line) = rx.recv().await {
        let mut words = line.split_whitespace();
        let cmd = words.next().unwrap_or_default().to_string();
        let arg = words.next().unwrap_or_default().to_string();
        let (ls, raw, link, guards, images) = (
            ls.clone(),
            raw.clone(),
            link.clone(),
            guards.clone(),
            images.clone(),
        );
        match cmd.as_str() {
            "exit" => return 0,
            "lock" => {
                tokio::spawn(async move {
                    let Some(res) = ResourceId::from_name(&arg) else {
                        return;
                    };
                    emit("asked", json!({"res": arg}));
                    match ls
                        .lock_timeout(res, LockMode::Exclusive, Duration::from_secs(120))
                        .await
                    {
                        Ok(g) => {
                            let epoch = g.epoch();
                            guards.lock().unwrap().insert(arg.clone(), g);
                            emit("granted", json!({"res": arg, "epoch": epoch}));
                        }
                        Err(e) => emit("lock_err", json!({"res": arg, "error": e.to_string()})),
                    }
                });
            }
            "unlock" => {
                tokio::spawn(async move {
                    let g = guards.lock().unwrap().remove(&arg);
                    if let Some(g) = g {
                        let r = g.unlock().await.map_err(|e| e.to_string());
                        emit("unlocked", json!({"res": arg, "result": format!("{r:?}")}));
                    }
                });
            }
            "write" | "read" => {
                tokio::spawn(async move {
                    let Some(g) = guards.lock().unwrap().remove(&arg) else {
                        emit("error", json!({"not held": arg}));
                        return;
                    };
                    if cmd == "write" {
                        let st = stamp(HOST.get().copied().unwrap_or(0), ls.generation(), 1, 0);
                        let r = g.write_payload(&st).await.map_err(|e| e.to_string());
                        emit(
                            "written",
                            json!({"res": arg, "stamp": stamp_json(&st), "result": format!("{r:?}")}),
                        );
                    } else {
                        let r = g.read_payload().await;
                        emit(
                            "payload",
                            json!({"res": arg, "stamp": r.as_ref().map(|p| stamp_json(p)).unwrap_or(Value::Null),
                                               "result": format!("{:?}", r.as_ref().map(|_| ()).map_err(|e| e.to_string()))}),
                        );
                    }
                    guards.lock().unwrap().insert(arg, g);
                });
            }
            "protect" => {
                tokio::spawn(async move {
                    let Some(g) = guards.lock().unwrap().remove(&arg) else {
                        emit("error", json!({"not held": arg}));
                        return;
                    };
                    let bs = raw.geometry().block_size as usize;
                    let locks_at = ls.header().locks_offset();
                    let index = ls
                        .status()
                        .held
                        .iter()
                        .find(|h| Some(h.resource) == ResourceId::from_name(&arg))
                        .map(|h| h.index);
                    let Some(index) = index else { return };
                    let off = locks_at + u64::from(index) * bs as u64;
                    let mut n = 0u64;
                    let mut refusals = 0;
                    while refusals < 3 {
                        n += 1;
                        let st = stamp(g.fence().holder().slot as u8, ls.generation(), n, 0);
                        let r = match g.fence().check_for(io_timeout) {
                            Ok(_) => g.write_payload(&st).await,
                            Err(e) => Err(e),
                        };
                        match &r {
                            Ok(()) => {
                                if let Ok(img) = raw.read(off, bs).await {
                                    images.lock().unwrap().insert(arg.clone(), (off, img));
                                }
                            }
                            Err(e) => {
                                refusals += 1;
                                emit("pw", json!({"n": n, "ok": false, "error": e.to_string()}));
                            }
                        }
                        if n == 1 && r.is_ok() {
                            emit("pw", json!({"n": n, "ok": true}));
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    emit("protect_done", json!({"res": arg, "writes": n}));
                    guards.lock().unwrap().insert(arg, g);
                });
            }
            "stale-caw" => {
                tokio::spawn(async move {
                    let Some((off, img)) = images.lock().unwrap().get(&arg).cloned() else {
                        emit("stale_caw", json!({"error": "no image"}));
                        return;
                    };
                    let bs = img.len();
                    let index = ((off - ls.header().locks_offset()) / bs as u64) as u32;
                    let stale = LockRecord::decode(&img, bs, index).ok().flatten();
                    let Some(mut rec) = stale else {
                        emit("stale_caw", json!({"error": "record does not decode"}));
                        return;
                    };
                    rec.payload = [0xee; basalt_lockmgr::PAYLOAD_LEN];
                    let new = Bytes::from(rec.encode(bs));
                    let r = raw
                        .compare_and_write(off, img.clone(), new, WriteFlags { fua: true })
                        .await;
                    let now_img = raw.read(off, bs).await.ok();
                    let current = now_img
                        .and_then(|b| LockRecord::decode(&b, bs, index).ok().flatten())
                        .map(|r| {
                            json!({"epoch": r.epoch, "payload": stamp_json(&r.payload),
                                   "holders": r.holders.iter().map(|h| (h.slot, h.generation)).collect::<Vec<_>>()})
                        });
                    let outcome = match r {
                        Ok(CompareOutcome::Written) => "written".to_string(),
                        Ok(CompareOutcome::Miscompare { offset }) => {
                            format!("miscompare at {offset}")
                        }
                        Err(e) => format!("error: {e}"),
                    };
                    emit(
                        "stale_caw",
                        json!({"outcome": outcome, "current": current,
                               "stale_holders": rec.holders.iter().map(|h| (h.slot, h.generation)).collect::<Vec<_>>()}),
                    );
                });
            }
            "fenced-write" => {
                tokio::spawn(async move {
                    let off: u64 = arg.parse().unwrap_or(0);
                    let bs = raw.geometry().block_size as usize;
                    let f = FencedDev::new(raw.clone(), ls.fence(), io_timeout);
                    let r = f
                        .write(off, Bytes::from(vec![0xaa; bs]), WriteFlags { fua: true })
                        .await;
                    emit(
                        "fenced_write",
                        json!({"ok": r.is_ok(), "result": format!("{r:?}")}),
                    );
                });
            }
            "late-next-caw" => {
                link.armed.store(true, Ordering::SeqCst);
                emit("armed", json!({}));
            }
            other => emit("error", json!({"unknown command": other})),
        }
    }
    0
}
