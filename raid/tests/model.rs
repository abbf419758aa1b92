//! Model-based tests: random reads, writes, zeroes and flushes against a flat byte
//! vector, while members fail (dead disk or I/O error) up to the level's tolerance,
//! spares are added and rebuilt in the background, and members grow bad sectors
//! (read errors until the range is rewritten) where the array has redundancy for them.
//! Every read must equal the model: 0 bytes may differ.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use basalt_blockdev::fault::{ErrorRule, FaultDev, FaultOp, RuleId};
use basalt_blockdev::{BlockDev, SharedBlockDev, WriteFlags, ZeroFlags};
use basalt_raid::{examine, Array, ArrayConfig, Device, Level, RoleState};
use bytes::Bytes;
use common::*;
use proptest::prelude::*;
use std::sync::Arc;

const SMALL: u64 = 4 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { at: u64, blocks: u64, seed: u64 },
    Read { at: u64, blocks: u64 },
    Zero { at: u64, blocks: u64 },
    Flush,
    KillMember { who: usize },
    ErrorMember { who: usize, write: bool },
    BadSector { who: usize, at: u64, blocks: u64 },
    AddSpare,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<u64>(), 1u64..40, any::<u64>()).prop_map(|(at, blocks, seed)| Op::Write { at, blocks, seed }),
        4 => (any::<u64>(), 1u64..40).prop_map(|(at, blocks)| Op::Read { at, blocks }),
        1 => (any::<u64>(), 1u64..80).prop_map(|(at, blocks)| Op::Zero { at, blocks }),
        1 => Just(Op::Flush),
        1 => (0usize..16).prop_map(|who| Op::KillMember { who }),
        1 => (0usize..16, any::<bool>()).prop_map(|(who, write)| Op::ErrorMember { who, write }),
        2 => (0usize..16, any::<u64>(), 1u64..8).prop_map(|(who, at, blocks)| Op::BadSector { who, at, blocks }),
        1 => Just(Op::AddSpare),
    ]
}

fn missing_after(a: &Array, dead: &[bool], extra: usize) -> Vec<bool> {
    a.status()
        .members
        .iter()
        .enumerate()
        .map(|(r, m)| r == extra || dead[r] || m.state != RoleState::InSync)
        .collect()
}

async fn run(level: Level, chunk: u32, journal: bool, ops: Vec<Op>) {
    let n = members_for(level);
    let fs = fault_members(n, SMALL, false);
    let cfg = ArrayConfig::new("m", level).chunk(chunk).journal(journal);
    let a = Array::create(cfg, devices(&fs), vec![])
        .await
        .expect("create");
    let cap = a.geometry().capacity_bytes();
    let blocks_total = cap / 4096;
    let mut model = vec![0u8; cap as usize];
    // Role -> the fault injector currently holding it.
    let mut holders: Vec<Arc<FaultDev>> = fs.clone();
    let mut spares = 0;
    // Roles whose current holder was broken by the test (the array may not know yet).
    let mut dead = vec![false; n];
    let meta = examine(&(fs[0].clone() as SharedBlockDev))
        .await
        .unwrap()
        .meta;
    let member_data = a.layout().stripes * a.layout().chunk;
    // Bad sectors not rewritten yet: at most one at a time, so that a stripe never has
    // more bad or missing blocks than redundancy.
    let mut bad_sectors: Vec<(Arc<FaultDev>, RuleId)> = Vec::new();
    for (i, op) in ops.into_iter().enumerate() {
        match op {
            Op::Write { at, blocks, seed } => {
                let b = at % blocks_total;
                let blocks = blocks.min(blocks_total - b);
                let data = pattern(seed, (blocks * 4096) as usize);
                a.write(b * 4096, Bytes::from(data.clone()), WriteFlags::default())
                    .await
                    .unwrap_or_else(|e| panic!("op {i}: write: {e}"));
                model[(b * 4096) as usize..((b + blocks) * 4096) as usize].copy_from_slice(&data);
            }
            Op::Read { at, blocks } => {
                let b = at % blocks_total;
                let blocks = blocks.min(blocks_total - b);
                let got = a
                    .read(b * 4096, (blocks * 4096) as usize)
                    .await
                    .unwrap_or_else(|e| panic!("op {i}: read: {e}"));
                let want = &model[(b * 4096) as usize..((b + blocks) * 4096) as usize];
                assert_eq!(diff(&got, want), None, "op {i}: read at block {b} differs");
            }
            Op::Zero { at, blocks } => {
                let b = at % blocks_total;
                let blocks = blocks.min(blocks_total - b);
                a.write_zeroes(b * 4096, blocks * 4096, ZeroFlags::default())
                    .await
                    .unwrap_or_else(|e| panic!("op {i}: zero: {e}"));
                model[(b * 4096) as usize..((b + blocks) * 4096) as usize].fill(0);
            }
            Op::Flush => a
                .flush()
                .await
                .unwrap_or_else(|e| panic!("op {i}: flush: {e}")),
            Op::BadSector { who, at, blocks } => {
                let who = who % n;
                if !level.redundant() || !a.layout().survives(&missing_after(&a, &dead, who)) {
                    continue;
                }
                for (d, id) in bad_sectors.drain(..) {
                    d.remove_rule(id);
                }
                let first = at % (member_data / 4096);
                let start = meta.data_offset + first * 4096;
                let end = (start + blocks * 4096).min(meta.data_offset + member_data);
                let id = holders[who].add_rule(
                    ErrorRule::new(FaultOp::Read)
                        .range(start..end)
                        .until_rewritten(),
                );
                bad_sectors.push((holders[who].clone(), id));
            }
            Op::KillMember { who } | Op::ErrorMember { who, .. } => {
                let who = who % n;
                // A bad sector plus a lost member may be more than the level covers.
                for (d, id) in bad_sectors.drain(..) {
                    d.remove_rule(id);
                }
                if !level.redundant() || !a.layout().survives(&missing_after(&a, &dead, who)) {
                    continue;
                }
                dead[who] = true;
                match op {
                    Op::KillMember { .. } => holders[who].fail_device(),
                    Op::ErrorMember { write, .. } => {
                        let kind = if write { FaultOp::Write } else { FaultOp::Read };
                        holders[who].add_rule(ErrorRule::new(kind));
                        // Make sure the member is noticed: touch every stripe's row 0.
                        if !write {
                            a.fail_member(who).await.unwrap();
                        }
                    }
                    _ => {}
                }
            }
            Op::AddSpare => {
                if !level.redundant() || spares >= 2 {
                    continue;
                }
                spares += 1;
                let f = Arc::new(FaultDev::with_seed(mem(SMALL), 100 + spares));
                f.set_write_cache(false);
                a.add_spare(Device::new(
                    format!("s{spares}"),
                    f.clone() as SharedBlockDev,
                ))
                .await
                .unwrap();
                // Remember who holds which role once a spare takes over.
                tokio::task::yield_now().await;
                let _ = &f;
                holders.push(f);
            }
        }
        // Track role holders by label for later kills.
        let st = a.status();
        for m in &st.members {
            if let Some(r) = m.role {
                if let Some(idx) = m
                    .label
                    .strip_prefix('s')
                    .and_then(|s| s.parse::<usize>().ok())
                {
                    if !Arc::ptr_eq(&holders[r], &holders[n + idx - 1]) {
                        holders[r] = holders[n + idx - 1].clone();
                        dead[r] = false;
                    }
                }
            }
        }
    }
    a.wait_idle().await;
    let all = read_all(&*a).await;
    assert_eq!(
        diff(&all, &model),
        None,
        "final contents differ ({})",
        a.status().md_text()
    );
    a.stop().await.unwrap();
}

fn check(level: Level, chunk: u32, journal: bool, ops: Vec<Op>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(level, chunk, journal, ops));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn raid0(ops in proptest::collection::vec(op(), 1..60)) { check(Level::Raid0, 4096, false, ops) }
    #[test]
    fn raid1(ops in proptest::collection::vec(op(), 1..60), j: bool) { check(Level::Raid1, 8192, j, ops) }
    #[test]
    fn raid10(ops in proptest::collection::vec(op(), 1..60), j: bool) { check(Level::Raid10, 4096, j, ops) }
    #[test]
    fn raid5(ops in proptest::collection::vec(op(), 1..60), j: bool) { check(Level::Raid5, 8192, j, ops) }
    #[test]
    fn raid6(ops in proptest::collection::vec(op(), 1..60), j: bool) { check(Level::Raid6, 4096, j, ops) }
}

/// Every member position, and for RAID6 every pair: fail them, then random writes
/// and reads (degraded RMW/RCW/full-stripe paths) must all match the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_position_degraded() {
    for level in LEVELS.into_iter().filter(|l| l.redundant()) {
        let n = members_for(level);
        let mut sets: Vec<Vec<usize>> = (0..n).map(|i| vec![i]).collect();
        if level == Level::Raid6 {
            for i in 0..n {
                for j in i + 1..n {
                    sets.push(vec![i, j]);
                }
            }
        }
        if level == Level::Raid10 {
            sets.push(vec![0, 2]);
            sets.push(vec![1, 3]);
        }
        for set in sets {
            let fs = fault_members(n, SMALL, false);
            let a = make(level, 8192, &fs).await;
            let cap = a.geometry().capacity_bytes();
            let mut model = vec![0u8; cap as usize];
            let base = pattern(7, cap as usize);
            a.write(0, Bytes::from(base.clone()), WriteFlags::default())
                .await
                .unwrap();
            model.copy_from_slice(&base);
            for &m in &set {
                fs[m].fail_device();
            }
            for i in 0..60u64 {
                let b = (i * 7919) % (cap / 4096 - 40);
                let len = 4096 * (1 + (i % 37));
                let d = pattern(100 + i, len as usize);
                a.write(b * 4096, Bytes::from(d.clone()), WriteFlags::default())
                    .await
                    .unwrap();
                model[(b * 4096) as usize..(b * 4096 + len) as usize].copy_from_slice(&d);
            }
            let all = read_all(&*a).await;
            assert_eq!(diff(&all, &model), None, "{level} failed {set:?}");
            drop(a);
        }
    }
}
