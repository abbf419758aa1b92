//! `raid-array`: a 6-disk RAID6 against its own members, side by side, in one run.
//!
//! 1. The members alone: every member written, then read, sequentially at once (1 MiB
//!    requests, 4 in flight per member): the aggregate bandwidth, and the slowest member.
//! 2. The array over the same members (chunk 64 KiB): sequential write and read (1 MiB
//!    requests, 8 in flight) and random 4 KiB writes (32 in flight), with the write
//!    journal on (the default) and off, to measure what closing the write hole costs.
//!    Sequential writes are full-stripe writes; the ideal is (n - 2) / n of the
//!    aggregate without journal (parity takes 2 of n members' bandwidth) and half that
//!    with it (every block is written twice).
//! 3. Rebuild: a member fails, a spare takes over; the rebuild rate in member bytes per
//!    second against the slowest member's sequential write (goal >= 0.8).
//!
//! Members are files on `--dir` opened with O_DIRECT through io_uring (`--backend
//! file`, the default), or memory (`--backend mem`, which shows the CPU cost alone).

use basalt_blockdev::uring::create_sparse_file;
use basalt_blockdev::{
    AlignedBuf, BlockDev, DirectMode, MemDev, SharedBlockDev, UringFile, UringOptions, WriteFlags,
};
use basalt_raid::{Array, ArrayConfig, Device, Level};
use clap::Parser;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A 6-disk RAID6 against its members' aggregate bandwidth.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// `file` (O_DIRECT files in --dir) or `mem`.
    #[arg(long, default_value = "file")]
    backend: String,
    /// Directory for the member files.
    #[arg(long, default_value = "/var/tmp/basalt-bench-raid")]
    dir: PathBuf,
    /// Member size in MiB.
    #[arg(long, default_value_t = 512)]
    member_mib: u64,
    /// Members.
    #[arg(long, default_value_t = 6)]
    members: usize,
    /// Chunk in KiB.
    #[arg(long, default_value_t = 64)]
    chunk_kib: u32,
    /// Seconds per timed run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Delete the member files at the end.
    #[arg(long)]
    remove: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Pattern {
    SeqWrite,
    SeqRead,
    RandWrite,
}

/// Runs `qd` workers doing `bs`-byte requests of `pattern` on `dev` for `dur` (or one
/// pass over the device for a sequential pass with `once`); returns bytes per second.
async fn run(
    dev: SharedBlockDev,
    pattern: Pattern,
    bs: usize,
    qd: usize,
    dur: Duration,
    once: bool,
) -> Result<f64, BoxError> {
    let cap = dev.geometry().capacity_bytes() / bs as u64 * bs as u64;
    let slots = cap / bs as u64;
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut payload = AlignedBuf::zeroed(bs);
    for (i, b) in payload.as_mut_slice().iter_mut().enumerate() {
        *b = (i * 31 + 7) as u8;
    }
    let payload = payload.freeze();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..qd {
        let (dev, next, done, payload) = (dev.clone(), next.clone(), done.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (w as u64 + 1);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if (once && i >= slots) || (!once && start.elapsed() >= dur) {
                    return Ok::<(), basalt_blockdev::BlockError>(());
                }
                let slot = match pattern {
                    Pattern::RandWrite => {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng % slots
                    }
                    _ => i % slots,
                };
                let off = slot * bs as u64;
                match pattern {
                    Pattern::SeqRead => {
                        dev.read(off, bs).await?;
                    }
                    _ => {
                        dev.write(off, payload.clone(), WriteFlags::default())
                            .await?
                    }
                }
                done.fetch_add(bs as u64, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    dev.flush().await?;
    Ok(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

/// Every member at once; returns (aggregate, slowest member) bytes per second.
async fn members_at_once(
    devs: &[SharedBlockDev],
    pattern: Pattern,
    dur: Duration,
    once: bool,
) -> Result<(f64, f64), BoxError> {
    let mut tasks = Vec::new();
    for d in devs {
        tasks.push(tokio::spawn(run(d.clone(), pattern, 1 << 20, 4, dur, once)));
    }
    let mut sum = 0.0;
    let mut min = f64::MAX;
    for t in tasks {
        let r = t.await??;
        sum += r;
        min = min.min(r);
    }
    Ok((sum, min))
}

fn open_members(args: &Args, n: usize, first: usize) -> Result<Vec<SharedBlockDev>, BoxError> {
    let bytes = args.member_mib << 20;
    let mut out = Vec::new();
    for i in first..first + n {
        if args.backend == "mem" {
            out.push(Arc::new(MemDev::new(bytes / 4096, 4096)) as SharedBlockDev);
            continue;
        }
        std::fs::create_dir_all(&args.dir)?;
        let path = args.dir.join(format!("member{i}"));
        let _ = std::fs::remove_file(&path);
        create_sparse_file(&path, bytes)?;
        let opts = UringOptions {
            direct: DirectMode::Require,
            block_size: Some(4096),
            ..UringOptions::default()
        };
        out.push(Arc::new(UringFile::open(&path, &opts)?) as SharedBlockDev);
    }
    Ok(out)
}

fn mbs(x: f64) -> String {
    format!("{:.0}", x / 1e6)
}

async fn main_async(args: Args) -> Result<(), BoxError> {
    let n = args.members;
    let dur = Duration::from_secs(args.seconds);
    let devs = open_members(&args, n + 1, 0)?;
    let (members, spare) = devs.split_at(n);
    println!(
        "members: {n} x {} MiB ({}), chunk {} KiB",
        args.member_mib, args.backend, args.chunk_kib
    );
    // Fill every member (so reads hit data, not holes), measuring the writes.
    let (agg_w, min_w) = members_at_once(&devs, Pattern::SeqWrite, dur, true).await?;
    let (agg_r, min_r) = members_at_once(members, Pattern::SeqRead, dur, false).await?;
    let agg_w = agg_w * n as f64 / (n + 1) as f64;
    // One member alone: what a rebuild needs from each (a sequential read of every
    // survivor, a sequential write of the spare).
    let solo_r = run(members[0].clone(), Pattern::SeqRead, 1 << 20, 4, dur, false).await?;
    let solo_w = run(spare[0].clone(), Pattern::SeqWrite, 1 << 20, 4, dur, false).await?;
    let slowest = solo_r.min(solo_w);
    let mk = |journal: bool| {
        let mut c = ArrayConfig::new("bench", Level::Raid6)
            .chunk(args.chunk_kib << 10)
            .journal(journal);
        c.force = true;
        c.assume_clean = true;
        c
    };
    let devices = |ds: &[SharedBlockDev]| {
        ds.iter()
            .enumerate()
            .map(|(i, d)| Device::new(format!("m{i}"), d.clone()))
            .collect::<Vec<_>>()
    };
    let mut rows: Vec<(String, f64, f64, String)> = Vec::new();
    let ideal_w = (n - 2) as f64 / n as f64;
    for journal in [true, false] {
        let a = Array::create(mk(journal), devices(members), vec![]).await?;
        let dev = a.clone() as SharedBlockDev;
        let tag = if journal { "journal on" } else { "journal off" };
        let w = run(dev.clone(), Pattern::SeqWrite, 1 << 20, 8, dur, false).await?;
        rows.push((
            format!("seq write 1M qd8, {tag}"),
            w,
            agg_w,
            format!("ideal {:.2}", if journal { ideal_w / 2.0 } else { ideal_w }),
        ));
        if journal {
            let r = run(dev.clone(), Pattern::SeqRead, 1 << 20, 8, dur, false).await?;
            rows.push((
                "seq read 1M qd8".into(),
                r,
                agg_r,
                format!("ideal {ideal_w:.2}"),
            ));
        }
        let rw = run(dev.clone(), Pattern::RandWrite, 4096, 32, dur, false).await?;
        rows.push((
            format!("rand write 4k qd32, {tag}"),
            rw,
            agg_w,
            format!("{:.0} IOPS", rw / 4096.0),
        ));
        let m = a.metrics();
        println!(
            "{tag}: full-stripe {} rmw {} rcw {} journal {} MB",
            m.full_stripe_writes_total,
            m.rmw_writes_total,
            m.rcw_writes_total,
            m.journal_bytes_total >> 20
        );
        a.stop().await?;
    }
    // Rebuild onto the spare.
    let a = Array::create(mk(true), devices(members), devices(spare)).await?;
    let member_data = a.layout().stripes * a.layout().chunk;
    a.fail_member(0).await?;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    a.wait_idle().await;
    let rebuild = member_data as f64 / t.elapsed().as_secs_f64();
    println!("{}", a.status().md_text());
    a.stop().await?;

    println!(
        "\n{:<34} {:>10} {:>14} {:>7}  note",
        "workload", "MB/s", "baseline MB/s", "ratio"
    );
    println!(
        "{:<34} {:>10} {:>14} {:>7}",
        "members: aggregate seq write",
        mbs(agg_w),
        "-",
        "-"
    );
    println!(
        "{:<34} {:>10} {:>14} {:>7}",
        "members: aggregate seq read",
        mbs(agg_r),
        "-",
        "-"
    );
    for (name, v, base, note) in rows {
        println!(
            "{:<34} {:>10} {:>14} {:>6.2}x  {note}",
            name,
            mbs(v),
            mbs(base),
            v / base
        );
    }
    println!(
        "{:<34} {:>10} {:>14} {:>6.2}x  vs one member alone: min(seq read {}, seq write {}); goal 0.80",
        "rebuild (member bytes/s)",
        mbs(rebuild),
        mbs(slowest),
        rebuild / slowest,
        mbs(solo_r),
        mbs(solo_w)
    );
    println!(
        "{:<34} {:>10} {:>14} {:>6.2}x  vs the slowest member while all run at once (read {} MB/s)",
        "",
        "",
        mbs(min_w.min(min_r)),
        rebuild / min_w.min(min_r),
        mbs(min_r)
    );
    if args.remove && args.backend != "mem" {
        std::fs::remove_dir_all(&args.dir)?;
    }
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers)
        .enable_all()
        .build()?;
    rt.block_on(main_async(args))
}
