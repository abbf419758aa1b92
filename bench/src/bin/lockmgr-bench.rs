//! `lockmgr-bench`: the lock manager's uncontended acquire latency (in CAW round trips
//! and microseconds) on a device, and the measured takeover time after the holder is
//! SIGKILLed, side by side with VMFS (16 s) and sanlock (140 s by default).
//!
//! `--device` takes `mem` (an in-memory LUN), a file or block device path (io_uring),
//! or an `iscsi://host[:port]/iqn/lun` URL (libiscsi; the target must implement COMPARE
//! AND WRITE: Basalt's own, `bench/lockmgr-bench.sh` starts one). The lockspace is
//! formatted at `--offset` with the default timings (3 s heartbeat, 9 s dead-host
//! timeout) first (`--no-format` to use an existing one).
//!
//! Latency: one raw single-sector COMPARE AND WRITE (the unit of every lock-manager
//! step); the first acquisition (binds the record); repeated uncontended acquisitions
//! (the image cached from our own release: one CAW); acquisitions right after another
//! host released (a second host on its own session: the cached image is stale, so
//! CAW, miscompare, read, CAW); releases; heartbeat renewals.
//!
//! Takeover over iSCSI: a `lockmgr-host --hold` process (the binary next to this one)
//! joins and takes a lock; after one of its heartbeats plus a random part of a period,
//! it is SIGKILLed; this process, another host, waits in `lock` and reports the time
//! from the kill to its grant, and from when it first saw the holder's last heartbeat.
//! With `mem` or a path (no second process can share it), the holder is a second host
//! in this process whose link is cut, as before.

use basalt_blockdev::{
    BlockDev, CompareOutcome, MemDev, SharedBlockDev, UringFile, UringOptions, WriteFlags,
};
use basalt_blockdev_iscsi::{IscsiDev, IscsiOptions};
use basalt_lockmgr::testing::HostLink;
use basalt_lockmgr::{
    BootClock, Clock, FormatOptions, JoinOptions, LockMode, Lockspace, ResourceId, SlotState,
};
use bytes::Bytes;
use clap::Parser;
use std::io::BufRead;
use std::sync::Arc;
use std::time::{Duration, Instant};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Lock manager latency and takeover benchmark.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// `mem`, a path, or an iscsi:// URL.
    #[arg(long, default_value = "mem")]
    device: String,
    /// Byte offset of the lockspace on the device.
    #[arg(long, default_value_t = 0)]
    offset: u64,
    /// Use the lockspace already there.
    #[arg(long)]
    no_format: bool,
    /// Acquire/release pairs to time.
    #[arg(long, default_value_t = 2000)]
    iterations: u32,
    /// Takeover measurements (0: none). Each takes about 10 s.
    #[arg(long, default_value_t = 3)]
    takeovers: u32,
    /// iSCSI initiator name prefix.
    #[arg(long, default_value = "iqn.2026-11.org.basalt:lockmgr-bench")]
    initiator: String,
}

async fn open(spec: &str, initiator: &str) -> Result<SharedBlockDev, BoxError> {
    if spec == "mem" {
        return Ok(Arc::new(MemDev::new(1 << 16, 512)));
    }
    if spec.starts_with("iscsi://") {
        let o = IscsiOptions {
            initiator: initiator.into(),
            ..IscsiOptions::default()
        };
        return Ok(Arc::new(IscsiDev::connect(spec, &o).await?));
    }
    Ok(Arc::new(UringFile::open(
        std::path::Path::new(spec),
        &UringOptions::default(),
    )?))
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One row of the latency table.
struct Row {
    what: &'static str,
    trips: Option<f64>,
    samples: Vec<f64>,
}

impl Row {
    fn print(&mut self) {
        self.samples.sort_by(f64::total_cmp);
        let trips = self.trips.map_or("-".into(), |t| format!("{t:.2}"));
        println!(
            "| {:<44} | {:>11} | {:>8.1} | {:>8.1} | {:>6} |",
            self.what,
            trips,
            pct(&self.samples, 0.5),
            pct(&self.samples, 0.99),
            self.samples.len()
        );
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({"what": self.what, "round_trips": self.trips,
            "p50_us": pct(&self.samples, 0.5), "p99_us": pct(&self.samples, 0.99), "n": self.samples.len()})
    }
}

fn us(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e6
}

async fn latency(args: &Args) -> Result<(), BoxError> {
    let dev = open(&args.device, &format!("{}-a", args.initiator)).await?;
    if !args.no_format {
        let o = FormatOptions {
            max_locks: 1024,
            force: true,
            ..FormatOptions::default()
        };
        Lockspace::format(&dev, args.offset, &o).await?;
    }
    let hdr = Lockspace::read_header(&dev, args.offset).await?;
    let bs = dev.geometry().block_size as usize;
    let mut rows = Vec::new();

    // A raw one-sector CAW past the lockspace, for reference.
    let scratch = args.offset + hdr.total_bytes() + (1 << 20);
    let mut cur = dev.read(scratch, bs).await?;
    let mut raw = Vec::new();
    for i in 0..args.iterations {
        let mut next = vec![0u8; bs];
        next[..4].copy_from_slice(&i.to_le_bytes());
        let next = Bytes::from(next);
        let t = Instant::now();
        let r = dev
            .compare_and_write(scratch, cur.clone(), next.clone(), WriteFlags { fua: true })
            .await?;
        raw.push(us(t));
        if r != CompareOutcome::Written {
            return Err(format!("raw CAW: {r:?}").into());
        }
        cur = next;
    }
    rows.push(Row {
        what: "raw COMPARE AND WRITE, one sector (FUA)",
        trips: Some(1.0),
        samples: raw,
    });

    let ls = Lockspace::join(
        dev.clone(),
        args.offset,
        JoinOptions::new(*b"lockmgr-bench-01", "bench-a"),
    )
    .await?;
    let res = ResourceId::from_name("bench/resource").ok_or("bad name")?;
    let m0 = ls.metrics();
    let t = Instant::now();
    let g = ls.lock(res, LockMode::Exclusive).await?;
    let first = us(t);
    g.unlock().await?;
    let m1 = ls.metrics();
    rows.push(Row {
        what: "first acquire (binds the record)",
        trips: Some((m1.acquire_round_trips_total - m0.acquire_round_trips_total) as f64),
        samples: vec![first],
    });
    let mut acq = Vec::new();
    let mut rel = Vec::new();
    for _ in 0..args.iterations {
        let t = Instant::now();
        let g = ls.lock(res, LockMode::Exclusive).await?;
        acq.push(us(t));
        let t = Instant::now();
        g.unlock().await?;
        rel.push(us(t));
    }
    let m2 = ls.metrics();
    rows.push(Row {
        what: "uncontended re-acquire (exclusive)",
        trips: Some(
            (m2.acquire_round_trips_total - m1.acquire_round_trips_total) as f64
                / f64::from(args.iterations),
        ),
        samples: acq,
    });
    rows.push(Row {
        what: "release",
        trips: Some(1.0),
        samples: rel,
    });

    // Hand-over: a second host on its own session; each acquires right after the
    // other released.
    let dev_b = if args.device.starts_with("iscsi://") {
        open(&args.device, &format!("{}-b", args.initiator)).await?
    } else {
        dev.clone()
    };
    let lb = Lockspace::join(
        dev_b,
        args.offset,
        JoinOptions::new(*b"lockmgr-bench-02", "bench-b"),
    )
    .await?;
    let hand = ResourceId::from_name("bench/handover").ok_or("bad name")?;
    lb.lock(hand, LockMode::Exclusive).await?.unlock().await?;
    let mut handover = Vec::new();
    let ma = ls.metrics();
    let mb = lb.metrics();
    let n = args.iterations / 2;
    for _ in 0..n {
        let t = Instant::now();
        let g = ls.lock(hand, LockMode::Exclusive).await?;
        handover.push(us(t));
        g.unlock().await?;
        let t = Instant::now();
        let g = lb.lock(hand, LockMode::Exclusive).await?;
        handover.push(us(t));
        g.unlock().await?;
    }
    let trips = (ls.metrics().acquire_round_trips_total - ma.acquire_round_trips_total
        + lb.metrics().acquire_round_trips_total
        - mb.acquire_round_trips_total) as f64
        / f64::from(2 * n.max(1));
    rows.push(Row {
        what: "acquire right after another host released",
        trips: Some(trips),
        samples: handover,
    });
    let hb = ls.metrics().heartbeat_latency_seconds;
    let hb_mean = if hb.count > 0 {
        hb.sum_seconds / hb.count as f64 * 1e6
    } else {
        0.0
    };
    println!(
        "\nlock manager on {} ({} iterations; heartbeat {} ms, dead-host timeout {} ms)\n",
        args.device, args.iterations, hdr.heartbeat_ms, hdr.dead_after_ms
    );
    println!(
        "| {:<44} | {:>11} | {:>8} | {:>8} | {:>6} |",
        "operation", "round trips", "p50 us", "p99 us", "n"
    );
    println!(
        "|{:-<46}|{:-<13}|{:-<10}|{:-<10}|{:-<8}|",
        "", "", "", "", ""
    );
    for r in &mut rows {
        r.print();
    }
    println!(
        "| {:<44} | {:>11} | {:>8.1} | {:>8} | {:>6} |",
        "heartbeat renewal (mean)", "1.00", hb_mean, "-", hb.count
    );
    println!(
        "{}",
        serde_json::json!({"bench": "lockmgr_latency", "device": args.device,
            "rows": rows.iter().map(Row::json).collect::<Vec<_>>(), "heartbeat_mean_us": hb_mean})
    );
    lb.leave().await?;
    ls.leave().await?;
    Ok(())
}

/// A takeover over iSCSI with a real process kill. Returns (since kill, since the
/// holder's last heartbeat was seen by this host).
async fn takeover_iscsi(args: &Args, run: u32) -> Result<(f64, f64), BoxError> {
    let exe = std::env::current_exe()?.with_file_name("lockmgr-host");
    let host = 100 + (run % 100) as u8;
    let name = format!("takeover/{run}");
    let res = ResourceId::from_name(&name).ok_or("bad name")?;
    let dev = open(&args.device, &format!("{}-t{run}", args.initiator)).await?;
    let b = Lockspace::join(
        dev,
        args.offset,
        JoinOptions::new(*b"lockmgr-bench-03", "bench-waiter"),
    )
    .await?;
    let mut child = std::process::Command::new(&exe)
        .args(["--device", &args.device, "--host", &host.to_string()])
        .args(["--offset", &args.offset.to_string(), "--hold", &name])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", exe.display()))?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut holder_slot = None;
    let mut beats = 0;
    // Kill after the second heartbeat after the grant, plus a pseudo-random phase.
    while beats < 2 {
        let line = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await?
            .ok_or("lockmgr-host exited")?;
        if line.contains("\"joined\"") {
            let v: serde_json::Value = serde_json::from_str(&line)?;
            holder_slot = v["slot"].as_u64();
        }
        if line.contains("\"heartbeat\"") && holder_slot.is_some() {
            beats += 1;
        }
    }
    let phase = Duration::from_millis(u64::from(run) * 1117 % 3000);
    tokio::time::sleep(phase).await;
    child.kill()?;
    let killed = Instant::now();
    let _ = child.wait();
    let slot = holder_slot.ok_or("no slot")? as u16;
    // Watch the holder's slot while waiting: when did this host first see its last
    // image (its own clock)?
    let watch = {
        let clock = BootClock;
        let status = move |ls: &Lockspace| {
            ls.status().slots.iter().find(|s| s.slot == slot).map(|s| {
                (
                    s.state,
                    s.counter,
                    clock.now().saturating_sub(s.unchanged_for),
                )
            })
        };
        let mut last_live = None;
        let lock = b.lock(res, LockMode::Exclusive);
        tokio::pin!(lock);
        loop {
            tokio::select! {
                g = &mut lock => break (g?, last_live),
                _ = tokio::time::sleep(Duration::from_millis(5)) => {
                    if let Some((Some(SlotState::Live), _, seen)) = status(&b) {
                        last_live = Some(seen);
                    }
                }
            }
        }
    };
    let (g, seen) = watch;
    let granted = BootClock.now();
    let since_kill = killed.elapsed().as_secs_f64();
    let since_seen = seen.map_or(f64::NAN, |s| (granted - s).as_secs_f64());
    g.unlock().await?;
    b.leave().await?;
    Ok((since_kill, since_seen))
}

/// The in-process variant (mem or a path): host A's link is cut and A dropped.
async fn takeover_in_process() -> Result<(f64, f64), BoxError> {
    let lun: SharedBlockDev = Arc::new(MemDev::new(1 << 14, 512));
    Lockspace::format(&lun, 0, &FormatOptions::default()).await?;
    let link_a = Arc::new(HostLink::new(lun.clone()));
    let a = Lockspace::join(link_a.clone(), 0, JoinOptions::new([1; 16], "host-a")).await?;
    let b = Lockspace::join(lun.clone(), 0, JoinOptions::new([2; 16], "host-b")).await?;
    let res = ResourceId::from_name("vm1").ok_or("bad name")?;
    let g = a.lock(res, LockMode::Exclusive).await?;
    let n = a.metrics().heartbeats_total;
    while a.metrics().heartbeats_total == n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let last_beat = Instant::now();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    link_a.cut(true);
    std::mem::forget(g);
    drop(a);
    let killed = Instant::now();
    let g = b.lock(res, LockMode::Exclusive).await?;
    let r = (
        killed.elapsed().as_secs_f64(),
        last_beat.elapsed().as_secs_f64(),
    );
    g.unlock().await?;
    Ok(r)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    latency(&args).await?;
    if args.takeovers == 0 {
        return Ok(());
    }
    let iscsi = args.device.starts_with("iscsi://");
    println!(
        "\ntakeover after the holder is killed (heartbeat 3 s, dead-host timeout 9 s; {}):\n",
        if iscsi {
            "lockmgr-host process, SIGKILL"
        } else {
            "in-process host, link cut"
        }
    );
    println!(
        "| {:<4} | {:>18} | {:>34} |",
        "run", "granted after kill", "after its last heartbeat was seen"
    );
    println!("|{:-<6}|{:-<20}|{:-<36}|", "", "", "");
    let mut kills = Vec::new();
    for run in 0..args.takeovers {
        let (k, s) = if iscsi {
            takeover_iscsi(&args, run).await?
        } else {
            takeover_in_process().await?
        };
        println!("| {:<4} | {:>16.2} s | {:>32.2} s |", run + 1, k, s);
        println!(
            "{}",
            serde_json::json!({"bench": "lockmgr_takeover", "device": args.device, "run": run + 1,
                "since_kill_s": k, "since_last_heartbeat_seen_s": s, "vmfs_s": 16, "sanlock_s": 140})
        );
        kills.push(k);
    }
    kills.sort_by(f64::total_cmp);
    let worst = kills.last().copied().unwrap_or(f64::NAN);
    println!(
        "\n| {:<28} | {:>16} |\n|{:-<30}|{:-<18}|\n| {:<28} | {:>14.1} s |\n| {:<28} | {:>14.1} s |\n| {:<28} | {:>14.1} s |",
        "takeover after a killed host",
        "time",
        "",
        "",
        "Basalt lockmgr (worst run)",
        worst,
        "VMFS (HB timeout 16 s)",
        16.0,
        "sanlock (default, 140 s)",
        140.0
    );
    println!(
        "Basalt is {:.1}x faster than VMFS and {:.0}x faster than sanlock here.",
        16.0 / worst,
        140.0 / worst
    );
    Ok(())
}
