//! `blockdev-vs-fio`: Basalt's io_uring backend ([`UringFile`]) against fio on the same
//! file, side by side.
//!
//! For each workload (4 KiB random read at QD 32, 1 MiB sequential read at QD 8, 1 MiB
//! sequential write at QD 8) it runs fio (`ioengine=io_uring`, `direct=1`, time based)
//! and then the same workload through `UringFile` (O_DIRECT required), with as many tokio
//! tasks as the queue depth each keeping one request in flight, for the same time. The
//! rounds alternate which tool goes first (fio, basalt, basalt, fio, ...) to spread drift
//! (host caches, thermal, neighbours) evenly, and the table reports the mean of the
//! rounds. The goal is a ratio of at least 0.9.
//!
//! The test file is written in full first (random data) so that reads hit allocated
//! blocks rather than holes; an existing file of the right size that is fully allocated
//! is reused.

use basalt_blockdev::uring::{create_sparse_file, DriverStats};
use basalt_blockdev::{AlignedBuf, BlockDev, DirectMode, UringFile, UringOptions, WriteFlags};
use bytes::Bytes;
use clap::Parser;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Basalt's io_uring block backend against fio, on the same file.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory for the test file (created if missing).
    #[arg(long, default_value = "/var/tmp/basalt-bench")]
    dir: PathBuf,
    /// Test file size in MiB.
    #[arg(long, default_value_t = 2048)]
    size_mib: u64,
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    runtime: u64,
    /// Runs per tool and workload; the order alternates between rounds.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Tokio worker threads on the Basalt side.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// `UringOptions::max_submit_batch` on the Basalt side (default: the library's).
    #[arg(long)]
    max_submit_batch: Option<u32>,
    /// Only the workloads whose name contains this.
    #[arg(long)]
    only: Option<String>,
    /// Delete the test file at the end.
    #[arg(long)]
    remove: bool,
    /// Run only the Basalt side (to profile it under perf or valgrind); the table then
    /// has no fio figures.
    #[arg(long)]
    skip_fio: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rw {
    RandRead,
    SeqRead,
    SeqWrite,
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    rw: Rw,
    bs: usize,
    qd: u32,
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "randread 4k qd32",
        rw: Rw::RandRead,
        bs: 4096,
        qd: 32,
    },
    Workload {
        name: "seqread 1m qd8",
        rw: Rw::SeqRead,
        bs: 1 << 20,
        qd: 8,
    },
    Workload {
        name: "seqwrite 1m qd8",
        rw: Rw::SeqWrite,
        bs: 1 << 20,
        qd: 8,
    },
];

const GOAL: f64 = 0.9;

#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    iops: f64,
    bytes_per_sec: f64,
    /// CPU time (user + system, every thread of the process) per I/O, in microseconds:
    /// steadier than IOPS on a shared machine, and what a wakeup costs shows up here.
    cpu_us_per_io: f64,
    /// Context switches (voluntary and not) per I/O.
    ctx_per_io: f64,
}

impl Figures {
    fn mean(runs: &[Figures]) -> Figures {
        let n = runs.len().max(1) as f64;
        let avg = |f: fn(&Figures) -> f64| runs.iter().map(f).sum::<f64>() / n;
        Figures {
            iops: avg(|f| f.iops),
            bytes_per_sec: avg(|f| f.bytes_per_sec),
            cpu_us_per_io: avg(|f| f.cpu_us_per_io),
            ctx_per_io: avg(|f| f.ctx_per_io),
        }
    }

    fn mb_per_sec(&self) -> f64 {
        self.bytes_per_sec / 1e6
    }
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers.max(1))
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<(), BoxError> {
    let fio_version = command_output("fio", &["--version"])
        .map_err(|e| format!("fio is needed (apt-get install -y fio): {e}"))?;
    std::fs::create_dir_all(&args.dir)
        .map_err(|e| format!("{}: cannot create: {e}", args.dir.display()))?;
    let path = args.dir.join("blockdev-vs-fio.img");
    let size = args.size_mib << 20;
    prepare(&path, size).await?;

    let probe = UringFile::open(
        &path,
        &UringOptions {
            direct: DirectMode::Require,
            block_size: Some(4096),
            ..UringOptions::default()
        },
    )?;
    println!("environment:");
    println!(
        "  kernel      {}",
        read_trimmed("/proc/sys/kernel/osrelease")
    );
    println!(
        "  cpus        {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("  fio         {}", fio_version.trim());
    println!(
        "  file        {} ({} MiB) on {}",
        path.display(),
        args.size_mib,
        filesystem_of(&args.dir)
    );
    println!(
        "  O_DIRECT    fio direct=1; basalt {}",
        if probe.is_direct() { "yes" } else { "NO" }
    );
    println!(
        "  basalt      UringFile, {} tokio worker thread(s), one driver thread",
        args.workers
    );
    println!(
        "  runs        {} s each, {} round(s) per tool, order alternating",
        args.runtime, args.rounds
    );
    drop(probe);

    let runtime = Duration::from_secs(args.runtime);
    let mut rows = Vec::new();
    for w in WORKLOADS {
        if let Some(only) = &args.only {
            if !w.name.contains(only.as_str()) {
                continue;
            }
        }
        let mut fio = Vec::new();
        let mut ours = Vec::new();
        for round in 0..args.rounds {
            // fio first in even rounds, basalt first in odd ones.
            for fio_turn in [round % 2 == 0, round % 2 != 0] {
                if fio_turn && args.skip_fio {
                    continue;
                }
                if fio_turn {
                    let f = run_fio(&w, &path, size, args.runtime)?;
                    println!(
                        "  {:<18} round {} fio    {:>10.0} IOPS {:>9.1} MB/s   ({:.1} us CPU, {:.3} context switches per I/O)",
                        w.name,
                        round + 1,
                        f.iops,
                        f.mb_per_sec(),
                        f.cpu_us_per_io,
                        f.ctx_per_io,
                    );
                    fio.push(f);
                } else {
                    let (f, s) =
                        run_basalt(&w, &path, size, runtime, args.max_submit_batch).await?;
                    println!(
                        "  {:<18} round {} basalt {:>10.0} IOPS {:>9.1} MB/s   ({:.1} us CPU, {:.3} context switches per I/O; {:.1} requests per enter, {:.3} sleeps, {:.3} wakeups, {:.3} relayed batches per request)",
                        w.name,
                        round + 1,
                        f.iops,
                        f.mb_per_sec(),
                        f.cpu_us_per_io,
                        f.ctx_per_io,
                        s.requests as f64 / s.enters.max(1) as f64,
                        s.sleeps as f64 / s.requests.max(1) as f64,
                        s.wakeups as f64 / s.requests.max(1) as f64,
                        s.relayed_batches as f64 / s.requests.max(1) as f64,
                    );
                    ours.push(f);
                }
            }
        }
        rows.push((w, Figures::mean(&fio), Figures::mean(&ours)));
    }

    println!();
    println!(
        "| {:<18} | {:>10} | {:>9} | {:>11} | {:>11} | {:>6} | {:<15} | {:>11} | {:>14} |",
        "test",
        "fio IOPS",
        "fio MB/s",
        "basalt IOPS",
        "basalt MB/s",
        "ratio",
        "goal",
        "fio CPU/IO",
        "basalt CPU/IO"
    );
    println!(
        "|{}|{}|{}|{}|{}|{}|{}|{}|{}|",
        "-".repeat(20),
        "-".repeat(12),
        "-".repeat(11),
        "-".repeat(13),
        "-".repeat(13),
        "-".repeat(8),
        "-".repeat(17),
        "-".repeat(13),
        "-".repeat(16)
    );
    for (w, fio, ours) in &rows {
        let ratio = ours.iops / fio.iops.max(f64::MIN_POSITIVE);
        let verdict = if args.skip_fio {
            "no fio run"
        } else if ratio >= GOAL {
            "met"
        } else {
            "MISSED"
        };
        println!(
            "| {:<18} | {:>10.0} | {:>9.1} | {:>11.0} | {:>11.1} | {:>5.2}x | {:<15} | {:>8.1} us | {:>11.1} us |",
            w.name,
            fio.iops,
            fio.mb_per_sec(),
            ours.iops,
            ours.mb_per_sec(),
            ratio,
            format!(">= {GOAL:.1}x {verdict}"),
            fio.cpu_us_per_io,
            ours.cpu_us_per_io,
        );
    }
    if args.remove {
        std::fs::remove_file(&path)?;
    }
    Ok(())
}

/// Creates the test file and writes it in full, unless a fully allocated one of the
/// right size is already there.
async fn prepare(path: &Path, size: u64) -> Result<(), BoxError> {
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.len() == size && meta.blocks() * 512 >= size {
            println!("reusing {}", path.display());
            return Ok(());
        }
        std::fs::remove_file(path)?;
    }
    println!("writing {} ({} MiB)...", path.display(), size >> 20);
    create_sparse_file(path, size)?;
    let file = Arc::new(UringFile::open(
        path,
        &UringOptions {
            block_size: Some(4096),
            ..UringOptions::default()
        },
    )?);
    let chunk = 1usize << 20;
    let data = random_buffer(chunk, 0x9e37_79b9_7f4a_7c15);
    let cursor = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (file, cursor, data) = (file.clone(), cursor.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let off = cursor.fetch_add(chunk as u64, Ordering::Relaxed);
                if off >= size {
                    return Ok::<(), basalt_blockdev::BlockError>(());
                }
                let n = (size - off).min(chunk as u64) as usize;
                file.write(off, data.slice(..n), WriteFlags::default())
                    .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    file.flush().await?;
    Ok(())
}

fn run_fio(w: &Workload, path: &Path, size: u64, runtime: u64) -> Result<Figures, BoxError> {
    let rw = match w.rw {
        Rw::RandRead => "randread",
        Rw::SeqRead => "read",
        Rw::SeqWrite => "write",
    };
    let args = [
        "--name=bench".to_owned(),
        format!("--filename={}", path.display()),
        "--ioengine=io_uring".to_owned(),
        "--direct=1".to_owned(),
        format!("--rw={rw}"),
        format!("--bs={}", w.bs),
        format!("--iodepth={}", w.qd),
        format!("--size={size}"),
        format!("--runtime={runtime}"),
        "--time_based".to_owned(),
        "--norandommap".to_owned(),
        "--randrepeat=0".to_owned(),
        "--numjobs=1".to_owned(),
        "--output-format=json".to_owned(),
    ];
    let out = Command::new("fio").args(&args).output()?;
    if !out.status.success() {
        return Err(format!(
            "fio {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let side = if w.rw == Rw::SeqWrite {
        "write"
    } else {
        "read"
    };
    parse_fio(&String::from_utf8_lossy(&out.stdout), side)
}

/// IOPS, bandwidth and CPU cost of the first job's `side` ("read" or "write") from
/// fio's JSON output, which may be preceded by notes.
fn parse_fio(text: &str, side: &str) -> Result<Figures, BoxError> {
    let json = text
        .find('{')
        .map(|i| &text[i..])
        .ok_or("fio printed no JSON")?;
    let v: serde_json::Value = serde_json::from_str(json)?;
    let job = &v["jobs"][0];
    let iops = job[side]["iops"].as_f64().ok_or("no iops in fio output")?;
    let bw = job[side]["bw_bytes"]
        .as_f64()
        .ok_or("no bw_bytes in fio output")?;
    // usr_cpu and sys_cpu are percentages of one CPU over the job's runtime (ms).
    let ios = job[side]["total_ios"].as_f64().unwrap_or(0.0).max(1.0);
    let runtime_s = job["job_runtime"].as_f64().unwrap_or(0.0) / 1e3;
    let cpu = job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0);
    Ok(Figures {
        iops,
        bytes_per_sec: bw,
        cpu_us_per_io: cpu / 100.0 * runtime_s * 1e6 / ios,
        ctx_per_io: job["ctx"].as_f64().unwrap_or(0.0) / ios,
    })
}

/// CPU time and context switches of this process so far.
fn usage() -> (Duration, u64) {
    // SAFETY: getrusage fills the struct it is given; all zeroes is a valid rusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a pointer to a live rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (
        tv(ru.ru_utime) + tv(ru.ru_stime),
        (ru.ru_nvcsw + ru.ru_nivcsw) as u64,
    )
}

async fn run_basalt(
    w: &Workload,
    path: &Path,
    size: u64,
    runtime: Duration,
    max_submit_batch: Option<u32>,
) -> Result<(Figures, DriverStats), BoxError> {
    let defaults = UringOptions::default();
    let file = Arc::new(UringFile::open(
        path,
        &UringOptions {
            queue_depth: w.qd,
            direct: DirectMode::Require,
            block_size: Some(4096),
            max_submit_batch: max_submit_batch.unwrap_or(defaults.max_submit_batch),
            ..defaults
        },
    )?);
    let blocks = size / w.bs as u64;
    let stop = Arc::new(AtomicBool::new(false));
    let cursor = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..w.qd {
        let (file, stop, cursor) = (file.clone(), stop.clone(), cursor.clone());
        // Random contents, one buffer per task, as fio fills its buffers.
        let data = random_buffer(w.bs, u64::from(t) + 1);
        let (rw, bs) = (w.rw, w.bs);
        tasks.push(tokio::spawn(async move {
            let mut x = 0x2545_f491_4f6c_dd1d ^ (u64::from(t) + 1).wrapping_mul(0x9e37_79b9);
            let mut ops = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let block = match rw {
                    Rw::RandRead => {
                        x = xorshift(x);
                        x % blocks
                    }
                    Rw::SeqRead | Rw::SeqWrite => cursor.fetch_add(1, Ordering::Relaxed) % blocks,
                };
                let offset = block * bs as u64;
                match rw {
                    Rw::RandRead | Rw::SeqRead => {
                        file.read(offset, bs).await?;
                    }
                    Rw::SeqWrite => {
                        file.write(offset, data.clone(), WriteFlags::default())
                            .await?;
                    }
                }
                // Requests completing after the deadline are not counted.
                if !stop.load(Ordering::Relaxed) {
                    ops += 1;
                }
            }
            Ok::<u64, basalt_blockdev::BlockError>(ops)
        }));
    }
    let before = file.driver_stats();
    let (cpu_before, ctx_before) = usage();
    tokio::time::sleep(runtime).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let (cpu_after, ctx_after) = usage();
    let mut ops = 0;
    for t in tasks {
        ops += t.await??;
    }
    let after = file.driver_stats();
    let stats = DriverStats {
        requests: after.requests - before.requests,
        enters: after.enters - before.enters,
        sleeps: after.sleeps - before.sleeps,
        wakeups: after.wakeups - before.wakeups,
        relayed_batches: after.relayed_batches - before.relayed_batches,
        inline_reads: after.inline_reads - before.inline_reads,
        inline_writes: after.inline_writes - before.inline_writes,
        inline_write_pauses: after.inline_write_pauses - before.inline_write_pauses,
        cached_ranges: after.cached_ranges - before.cached_ranges,
    };
    let iops = ops as f64 / elapsed;
    let n = ops.max(1) as f64;
    Ok((
        Figures {
            iops,
            bytes_per_sec: iops * w.bs as f64,
            cpu_us_per_io: (cpu_after - cpu_before).as_secs_f64() * 1e6 / n,
            ctx_per_io: (ctx_after - ctx_before) as f64 / n,
        },
        stats,
    ))
}

/// An aligned buffer of pseudo-random bytes.
fn random_buffer(len: usize, seed: u64) -> Bytes {
    let mut buf = AlignedBuf::zeroed(len);
    let mut x = seed | 1;
    for b in buf.as_mut_slice().chunks_mut(8) {
        x = xorshift(x);
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    buf.freeze()
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

fn command_output(cmd: &str, args: &[&str]) -> Result<String, BoxError> {
    let out = Command::new(cmd).args(args).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

/// The file system type and device of the mount holding `dir`, from /proc/mounts.
fn filesystem_of(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && dir.starts_with(f[1])).then(|| {
                (
                    f[1].len(),
                    format!("{} ({}, mounted at {})", f[2], f[0], f[1]),
                )
            })
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, s)| s)
        .unwrap_or_else(|| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_json_after_notes() {
        let out = r#"note: both iodepth >= 1 and synchronous I/O engine selected
{"fio version": "fio-3.33", "jobs": [{"jobname": "bench",
  "job_runtime": 2000, "usr_cpu": 10.0, "sys_cpu": 40.0, "ctx": 500,
  "read": {"iops": 1234.5, "bw_bytes": 5056512, "total_ios": 2500},
  "write": {"iops": 0.0, "bw_bytes": 0}}]}"#;
        let f = parse_fio(out, "read").unwrap();
        assert_eq!(f.iops, 1234.5);
        assert_eq!(f.bytes_per_sec, 5056512.0);
        // Half a CPU for 2 s over 2500 I/Os.
        assert!((f.cpu_us_per_io - 400.0).abs() < 1e-6, "{f:?}");
        assert!((f.ctx_per_io - 0.2).abs() < 1e-9, "{f:?}");
        assert!(parse_fio("fio: error", "read").is_err());
    }

    #[test]
    fn mean_of_rounds() {
        let m = Figures::mean(&[
            Figures {
                iops: 10.0,
                bytes_per_sec: 100.0,
                ..Figures::default()
            },
            Figures {
                iops: 20.0,
                bytes_per_sec: 300.0,
                ..Figures::default()
            },
        ]);
        assert_eq!(m.iops, 15.0);
        assert_eq!(m.mb_per_sec(), 0.0002);
    }
}
