//! Crash-point tests: writes in flight, every member loses power at once (dropping its
//! unflushed writes, or keeping a random subset of them, as a disk destaging its cache
//! in any order would), then one disk is lost for good, and the array assembles from
//! the others in shuffled order. Every block outside the writes in flight must read
//! back exactly as before; a block that was being written must hold its old value or
//! one of the values written to it, never anything else.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use basalt_blockdev::fault::{FaultOp, TornOutcome, TornWrite};
use basalt_blockdev::{BlockDev, SharedBlockDev, WriteFlags};
use basalt_raid::{assemble, Array, ArrayConfig, AssembleOptions, Device, Level};
use bytes::Bytes;
use common::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SIZE: u64 = 6 << 20;
const BS: usize = 4096;

struct Outcome {
    /// Blocks outside any in-flight write that read back wrong.
    damaged: usize,
    /// In-flight blocks holding neither their old value nor a written one.
    garbage: usize,
}

/// One scenario; `seed` picks the writes, the crash moment, the crash mode and the
/// disk lost.
async fn scenario(level: Level, journal: bool, seed: u64, torn: bool) -> Outcome {
    let n = members_for(level);
    let fs = fault_members(n, SIZE, true);
    let cfg = ArrayConfig::new("c", level).chunk(8192).journal(journal);
    let a = Array::create(cfg, devices(&fs), vec![])
        .await
        .expect("create");
    let cap = a.geometry().capacity_bytes() as usize;
    let base = pattern(seed, cap);
    a.write(0, Bytes::from(base.clone()), WriteFlags::default())
        .await
        .unwrap();
    a.flush().await.unwrap();
    // Writes from here on are in flight until the crash (none is flushed).
    let mut rng = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for f in &fs {
        f.set_latency(FaultOp::Write, Duration::from_micros(100 + next() % 300));
    }
    if torn {
        let victim = (next() % n as u64) as usize;
        fs[victim].tear_next_write(TornWrite {
            range: 0..u64::MAX,
            keep_blocks: next() % 3,
            outcome: TornOutcome::Crash,
        });
    }
    // Written values per block.
    let written: Arc<Mutex<HashMap<usize, Vec<Vec<u8>>>>> = Arc::default();
    // Writes clustered in a small region so they share stripes (RMW).
    let region = (cap / BS).min(256);
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let a = a.clone();
        let written = written.clone();
        let plan: Vec<(usize, usize, u64)> = (0..6)
            .map(|i| {
                let b = (next() as usize) % (region - 4);
                (b, 1 + (next() as usize) % 3, seed * 1000 + t * 100 + i)
            })
            .collect();
        tasks.push(tokio::spawn(async move {
            for (b, len, s) in plan {
                let d = pattern(s, len * BS);
                {
                    let mut w = written.lock().unwrap();
                    for k in 0..len {
                        w.entry(b + k)
                            .or_default()
                            .push(d[k * BS..(k + 1) * BS].to_vec());
                    }
                }
                if a.write((b * BS) as u64, Bytes::from(d), WriteFlags::default())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_micros(next() % 3000)).await;
    // Power loss on every member at once (no await in between on this runtime).
    let keep = next() % 2 == 0;
    let crash_seed = next();
    for f in &fs {
        if keep {
            f.crash_keeping_random(crash_seed, 0.5).await.unwrap();
        } else {
            f.crash();
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    drop(a);
    for f in &fs {
        f.recover().await;
        f.clear_rules();
        f.set_latency(FaultOp::Any, Duration::ZERO);
    }
    // One disk is gone for good; the others come back in another order.
    let lost = (next() % n as u64) as usize;
    let mut cands: Vec<Device> = fs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != lost)
        .map(|(i, f)| Device::new(format!("d{i}"), f.clone() as SharedBlockDev))
        .collect();
    let rot = (next() % cands.len() as u64) as usize;
    cands.rotate_left(rot);
    let asm = assemble(cands, &AssembleOptions::default()).await;
    assert!(
        asm.arrays.len() == 1,
        "{level} seed {seed}: assembly failed: {asm:?}"
    );
    let a = asm.arrays[0].clone();
    let got = read_all(&*a).await;
    let w = written.lock().unwrap().clone();
    let mut out = Outcome {
        damaged: 0,
        garbage: 0,
    };
    for b in 0..cap / BS {
        let blk = &got[b * BS..(b + 1) * BS];
        let old = &base[b * BS..(b + 1) * BS];
        if blk == old {
            continue;
        }
        match w.get(&b) {
            None => out.damaged += 1,
            Some(vals) if vals.iter().any(|v| v == blk) => {}
            Some(_) => out.garbage += 1,
        }
    }
    a.stop().await.unwrap();
    out
}

fn run(level: Level, journal: bool, seeds: std::ops::Range<u64>, torn: bool) -> (usize, usize) {
    let mut total = (0, 0);
    for seed in seeds {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let o = rt.block_on(scenario(level, journal, seed, torn));
        if journal {
            assert_eq!(
                (o.damaged, o.garbage),
                (0, 0),
                "{level} seed {seed}: {} blocks outside in-flight writes damaged, {} in-flight blocks garbage",
                o.damaged,
                o.garbage
            );
        }
        total.0 += o.damaged;
        total.1 += o.garbage;
    }
    total
}

#[test]
fn raid5_crash_then_disk_loss() {
    run(Level::Raid5, true, 0..25, false);
}

#[test]
fn raid6_crash_then_disk_loss() {
    run(Level::Raid6, true, 0..25, false);
}

#[test]
fn raid6_torn_write_crash_then_disk_loss() {
    run(Level::Raid6, true, 100..120, true);
}

#[test]
fn raid1_and_raid10_crash_then_disk_loss() {
    run(Level::Raid1, true, 0..12, false);
    run(Level::Raid10, true, 0..12, false);
}

/// The hole the journal closes: the same scenarios without it damage blocks that were
/// not being written (printed, not asserted: it depends on timing).
#[test]
fn raid5_without_journal_shows_the_write_hole() {
    let (damaged, garbage) = run(Level::Raid5, false, 0..25, false);
    println!("raid5 without journal: {damaged} blocks outside in-flight writes damaged, {garbage} garbage");
}
