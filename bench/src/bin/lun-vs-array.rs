//! `lun-vs-array`: 4 KiB random writes at QD 32 to the raw pool device ("the array"),
//! to a fully allocated thin LUN, and to a fresh thin LUN (every first write to a chunk
//! allocates it), in one run, with ratios; plus a map-lookup micro-benchmark.
//!
//! Backends: `mem` (a `MemDev`: CPU cost only, the LUN layer's own overhead made
//! visible) and `file` (a `UringFile` on a sparse file, O_DIRECT when the file system
//! allows it). Each workload runs `--qd` tokio tasks keeping one write in flight each,
//! for `--runtime` seconds, over the same `--region-mib` working set. The pool commits
//! in the background every second (the default), as in production; no flushes are
//! issued by the workload, so a fresh LUN's allocations are group-committed.
//!
//! The goal (issue 4): allocated-LUN IOPS >= 0.8 x the array's, and map lookups well
//! above 100k/s.

use basalt_blockdev::uring::create_sparse_file;
use basalt_blockdev::{
    AlignedBuf, BlockDev, DirectMode, MemDev, SharedBlockDev, UringFile, UringOptions, WriteFlags,
};
use basalt_lun::{FormatOptions, LunOptions, Pool};
use bytes::Bytes;
use clap::Parser;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// 4 KiB random writes: raw device vs allocated thin LUN vs fresh thin LUN.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Backends to run: mem, file or both.
    #[arg(long, default_value = "both")]
    backend: String,
    /// Directory for the file backend's image (created if missing).
    #[arg(long, default_value = "/var/tmp/basalt-bench")]
    dir: PathBuf,
    /// Working set (and LUN size) in MiB.
    #[arg(long, default_value_t = 1024)]
    region_mib: u64,
    /// Seconds per workload.
    #[arg(long, default_value_t = 8)]
    runtime: u64,
    /// Writes in flight.
    #[arg(long, default_value_t = 32)]
    qd: usize,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Pool chunk size in KiB.
    #[arg(long, default_value_t = 64)]
    chunk_kib: u32,
    /// Seconds of the map-lookup micro-benchmark.
    #[arg(long, default_value_t = 2)]
    lookup_secs: u64,
    /// Rounds of raw-vs-LUN random writes; the order alternates between rounds (raw,
    /// LUN, LUN, raw, ...) to spread drift, and the table shows the means.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
}

struct Row {
    backend: &'static str,
    name: String,
    iops: f64,
    base: Option<f64>,
    note: String,
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

/// 4 KiB random writes over `[0, region)` of `dev` for `secs`, `qd` in flight.
async fn randwrite(
    dev: SharedBlockDev,
    region: u64,
    qd: usize,
    secs: u64,
) -> Result<f64, BoxError> {
    let ops = Arc::new(AtomicU64::new(0));
    let blocks = region / 4096;
    let mut buf = AlignedBuf::zeroed(4096);
    buf.as_mut_slice().fill(0x5a);
    let data: Bytes = buf.freeze();
    let mut tasks = Vec::new();
    let started = Instant::now();
    // Each task checks the deadline itself: with a memory device a write never
    // suspends, so a stop flag set by a timer would never be seen.
    let deadline = started + Duration::from_secs(secs);
    for t in 0..qd {
        let (dev, ops, data) = (dev.clone(), ops.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            let mut x =
                0x9e37_79b9_7f4a_7c15u64 ^ (t as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            let mut n = 0u64;
            while Instant::now() < deadline {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % blocks) * 4096;
                dev.write(off, data.clone(), WriteFlags::default()).await?;
                n += 1;
                if n.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
            ops.fetch_add(n, Ordering::Relaxed);
            Ok::<(), basalt_blockdev::BlockError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(ops.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// One 4 KiB write into each chunk of `[0, region)`, in a scattered order, `qd` in
/// flight: on a fresh thin LUN every write allocates. Returns (IOPS, writes).
async fn first_writes(
    dev: SharedBlockDev,
    region: u64,
    chunk: u64,
    qd: usize,
) -> Result<(f64, u64), BoxError> {
    let chunks = region / chunk;
    // A fixed permutation: an odd multiplier modulo a power of two.
    let pow = chunks.next_power_of_two();
    let order: Arc<Vec<u64>> = Arc::new(
        (0..pow)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % pow)
            .filter(|&c| c < chunks)
            .collect(),
    );
    let next = Arc::new(AtomicU64::new(0));
    let mut buf = AlignedBuf::zeroed(4096);
    buf.as_mut_slice().fill(0x3c);
    let data: Bytes = buf.freeze();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..qd {
        let (dev, next, data, order) = (dev.clone(), next.clone(), data.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(&c) = order.get(i) else { break };
                let off = c * chunk + (c % (chunk / 4096)) * 4096;
                dev.write(off, data.clone(), WriteFlags::default()).await?;
                n += 1;
                if n.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
            Ok::<(), basalt_blockdev::BlockError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let n = order.len() as u64;
    Ok((n as f64 / started.elapsed().as_secs_f64(), n))
}

/// Fills `[0, len)` with 1 MiB writes, 8 in flight.
async fn fill(dev: SharedBlockDev, len: u64) -> Result<(), BoxError> {
    let mut buf = AlignedBuf::zeroed(1 << 20);
    buf.as_mut_slice().fill(0xa5);
    let data = buf.freeze();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (dev, next, data) = (dev.clone(), next.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let off = next.fetch_add(1 << 20, Ordering::Relaxed);
                if off >= len {
                    break;
                }
                let n = (len - off).min(1 << 20) as usize;
                dev.write(off, data.slice(..n), WriteFlags::default())
                    .await?;
            }
            Ok::<(), basalt_blockdev::BlockError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    dev.flush().await?;
    Ok(())
}

async fn bench_backend(
    backend: &'static str,
    dev: SharedBlockDev,
    raw_dev: SharedBlockDev,
    args: &Args,
    rows: &mut Vec<Row>,
) -> Result<(), BoxError> {
    let region = args.region_mib << 20;
    let cs = u64::from(args.chunk_kib) << 10;
    // Write both devices in full first, so that no workload pays for the file system
    // (or a thin device underneath) allocating blocks: the array is "a real disk".
    // The raw runs use a twin device of the same kind, so raw and LUN runs can
    // alternate.
    eprintln!("[{backend}] preparing the devices ...");
    fill(dev.clone(), dev.geometry().capacity_bytes()).await?;
    fill(raw_dev.clone(), region).await?;

    let pool = Pool::format(
        dev.clone(),
        FormatOptions {
            name: "bench".into(),
            chunk_size: args.chunk_kib << 10,
            force: true,
            // Keep the prepared device as it is (no hole punching).
            discard_data: false,
            ..Default::default()
        },
    )
    .await?;
    pool.create_lun("full", region, LunOptions::default())
        .await?;
    let full = pool.lun("full")?;
    eprintln!(
        "[{backend}] filling the allocated LUN ({} MiB) ...",
        args.region_mib
    );
    let t = Instant::now();
    fill(full.clone(), region).await?;
    let fill_secs = t.elapsed().as_secs_f64();
    let c0 = pool.counters().snapshot();
    let (mut raw_sum, mut lun_sum) = (0.0, 0.0);
    for round in 0..args.rounds {
        let lun_first = round % 2 == 1;
        for step in 0..2 {
            let on_lun = (step == 0) == lun_first;
            eprintln!(
                "[{backend}] round {}: {} 4k randwrite ...",
                round + 1,
                if on_lun {
                    "allocated LUN"
                } else {
                    "raw device"
                }
            );
            let target = if on_lun {
                full.clone()
            } else {
                raw_dev.clone()
            };
            let iops = randwrite(target, region, args.qd, args.runtime).await?;
            if on_lun {
                lun_sum += iops;
            } else {
                raw_sum += iops;
            }
        }
    }
    let c1 = pool.counters().snapshot();
    let raw = raw_sum / f64::from(args.rounds);
    rows.push(Row {
        backend,
        name: "array: 4k randwrite".into(),
        iops: raw,
        base: None,
        note: format!("mean of {} rounds", args.rounds),
    });
    rows.push(Row {
        backend,
        name: "thin LUN, allocated: 4k randwrite".into(),
        iops: lun_sum / f64::from(args.rounds),
        base: Some(raw),
        note: format!(
            "{} metadata commits during the runs; fill at {:.0} MB/s",
            c1.commits_total - c0.commits_total,
            region as f64 / fill_secs / 1e6
        ),
    });
    let (raw_scatter, _) = first_writes(raw_dev.clone(), region, cs, args.qd).await?;
    rows.push(Row {
        backend,
        name: "array: one 4k write per chunk".into(),
        iops: raw_scatter,
        base: None,
        note: "baseline of the next row".into(),
    });

    pool.create_lun("fresh", region, LunOptions::default())
        .await?;
    let fresh = pool.lun("fresh")?;
    eprintln!("[{backend}] fresh thin LUN: one 4k write per chunk (each allocates) ...");
    let c0 = pool.counters().snapshot();
    let (fresh_iops, writes) = first_writes(fresh.clone(), region, cs, args.qd).await?;
    fresh.flush().await?;
    let c1 = pool.counters().snapshot();
    rows.push(Row {
        backend,
        name: "thin LUN, fresh: 4k per chunk".into(),
        iops: fresh_iops,
        base: Some(raw_scatter),
        note: format!(
            "{writes} writes, {} allocations of {} KiB; {} commits, {} journal blocks",
            c1.chunks_allocated_total - c0.chunks_allocated_total,
            args.chunk_kib,
            c1.commits_total - c0.commits_total,
            c1.journal_blocks_total - c0.journal_blocks_total
        ),
    });

    // Map lookups: the same lookup the I/O path does, from 1 and from N threads.
    for threads in [1usize, args.workers.max(2)] {
        let stop = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (lun, stop, n) = (full.clone(), stop.clone(), n.clone());
                std::thread::spawn(move || {
                    let mut x = 0x2545_f491_4f6c_dd1du64 ^ (t as u64 + 7);
                    let mut local = 0u64;
                    let mut sink = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..1024 {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            sink ^= lun
                                .physical_offset((x % (region / 4096)) * 4096)
                                .unwrap_or(1);
                        }
                        local += 1024;
                    }
                    n.fetch_add(local, Ordering::Relaxed);
                    std::hint::black_box(sink);
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(args.lookup_secs));
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            let _ = h.join();
        }
        let rate = n.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
        rows.push(Row {
            backend,
            name: format!("map lookups, {threads} thread(s)"),
            iops: rate,
            base: None,
            note: "lookups/s (Lun::physical_offset)".into(),
        });
    }
    pool.export().await?;
    Ok(())
}

async fn run(args: Args) -> Result<(), BoxError> {
    let region = args.region_mib << 20;
    // Room for both LUNs plus metadata.
    let size = 2 * region + region / 8 + (64 << 20);
    let mut rows = Vec::new();
    if args.backend == "mem" || args.backend == "both" {
        let dev: SharedBlockDev = Arc::new(MemDev::new(size / 4096, 4096));
        let raw: SharedBlockDev = Arc::new(MemDev::new(region / 4096, 4096));
        bench_backend("mem", dev, raw, &args, &mut rows).await?;
    }
    if args.backend == "file" || args.backend == "both" {
        std::fs::create_dir_all(&args.dir)?;
        let path = args.dir.join("lun-vs-array.img");
        let raw_path = args.dir.join("lun-vs-array-raw.img");
        for (p, len) in [(&path, size), (&raw_path, region)] {
            let _ = std::fs::remove_file(p);
            create_sparse_file(p, len)?;
        }
        let opts = UringOptions {
            block_size: Some(4096),
            direct: DirectMode::Auto,
            ..Default::default()
        };
        let file = UringFile::open(&path, &opts)?;
        eprintln!("[file] {} (O_DIRECT: {})", path.display(), file.is_direct());
        let dev: SharedBlockDev = Arc::new(file);
        let raw: SharedBlockDev = Arc::new(UringFile::open(&raw_path, &opts)?);
        let r = bench_backend("file", dev, raw, &args, &mut rows).await;
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&raw_path);
        r?;
    }
    println!();
    println!(
        "4 KiB random writes, QD {}, {} MiB working set, {} s each, {} KiB chunks, {} workers",
        args.qd, args.region_mib, args.runtime, args.chunk_kib, args.workers
    );
    println!(
        "{:<8} {:<32} {:>14} {:>8}  notes",
        "backend", "workload", "IOPS", "ratio"
    );
    for r in &rows {
        let ratio = r
            .base
            .map_or(String::new(), |b| format!("{:.2}", r.iops / b));
        println!(
            "{:<8} {:<32} {:>14.0} {:>8}  {}",
            r.backend, r.name, r.iops, ratio, r.note
        );
    }
    Ok(())
}
