//! Model-based crash-consistency tests, in the manner of redb's `fuzz_redb` and
//! `crash_consistency.rs`.
//!
//! Random sequences of write, read, discard, write-zeroes, snapshot, clone, resize,
//! create, delete, flush, crash and re-import run against a pool on a `FaultDev` with a
//! volatile write cache, and against an in-memory model of every volume's bytes. The
//! model keeps the live image and, per block, the set of values the block may hold
//! after a crash: its value at the last durable point (a completed flush or management
//! operation) plus every value written since. Crashes come in three kinds: `crash()`
//! (every unflushed write lost), `crash_keeping_random()` (a random subset of unflushed
//! blocks survives, as a disk destages its cache in any order), and a torn write armed
//! on the device, which crashes in the middle of whatever operation writes next (a
//! data write, a journal commit, a checkpoint, a superblock update). After each crash
//! the pool is imported from the surviving device alone and must:
//! - import without error and pass its own invariant check (no orphaned or doubly
//!   owned chunk, counters exact);
//! - hold exactly the volumes of the last durable point (or, when the crash interrupted
//!   a management operation, exactly the state after it, in which case every byte is
//!   exactly as the model says, since that operation's commit flushed everything);
//! - have every block hold one of its allowed values, never anything else.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use basalt_blockdev::conformance::pattern;
use basalt_blockdev::fault::{FaultDev, TornOutcome, TornWrite};
use basalt_blockdev::{BlockDev, BlockError, MemDev, SharedBlockDev, WriteFlags, ZeroFlags};
use basalt_lun::{FormatOptions, ImportOptions, LunOptions, Pool, PoolError, Provisioning};
use bytes::Bytes;
use proptest::prelude::*;
use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

const BS: u64 = 4096;
const CHUNK: u32 = 8192;
const MAX_VOLS: usize = 10;

#[derive(Debug, Clone)]
enum Act {
    Create {
        blocks: u64,
        prov: u8,
    },
    Write {
        vol: usize,
        block: u64,
        n: u64,
        seed: u64,
        fua: bool,
    },
    Read {
        vol: usize,
        block: u64,
        n: u64,
    },
    Discard {
        vol: usize,
        block: u64,
        n: u64,
    },
    Zero {
        vol: usize,
        block: u64,
        n: u64,
        unmap: bool,
    },
    Snapshot {
        vol: usize,
    },
    Clone {
        vol: usize,
    },
    Resize {
        vol: usize,
        blocks: u64,
        force: bool,
    },
    Delete {
        vol: usize,
    },
    Flush,
    Crash {
        keep: bool,
        seed: u64,
    },
    TearNext {
        keep_blocks: u64,
        fail_only: bool,
    },
    Reimport,
}

fn act() -> impl Strategy<Value = Act> {
    let v = 0usize..16;
    let b = 0u64..64;
    let n = 1u64..10;
    prop_oneof![
        4 => (4u64..48, 0u8..4).prop_map(|(blocks, prov)| Act::Create { blocks, prov }),
        30 => (v.clone(), b.clone(), n.clone(), any::<u64>(), prop::bool::weighted(0.15))
            .prop_map(|(vol, block, n, seed, fua)| Act::Write { vol, block, n, seed, fua }),
        8 => (v.clone(), b.clone(), n.clone()).prop_map(|(vol, block, n)| Act::Read { vol, block, n }),
        6 => (v.clone(), b.clone(), n.clone()).prop_map(|(vol, block, n)| Act::Discard { vol, block, n }),
        4 => (v.clone(), b.clone(), n.clone(), any::<bool>())
            .prop_map(|(vol, block, n, unmap)| Act::Zero { vol, block, n, unmap }),
        5 => v.clone().prop_map(|vol| Act::Snapshot { vol }),
        4 => v.clone().prop_map(|vol| Act::Clone { vol }),
        3 => (v.clone(), 2u64..56, any::<bool>())
            .prop_map(|(vol, blocks, force)| Act::Resize { vol, blocks, force }),
        4 => v.prop_map(|vol| Act::Delete { vol }),
        8 => Just(Act::Flush),
        3 => (any::<bool>(), any::<u64>()).prop_map(|(keep, seed)| Act::Crash { keep, seed }),
        3 => (0u64..3, prop::bool::weighted(0.2))
            .prop_map(|(keep_blocks, fail_only)| Act::TearNext { keep_blocks, fail_only }),
        1 => Just(Act::Reimport),
    ]
}

fn h(b: &[u8]) -> u64 {
    let mut s = DefaultHasher::new();
    b.hash(&mut s);
    s.finish()
}

#[derive(Debug, Clone, PartialEq)]
struct MVol {
    data: Vec<u8>,
    writable: bool,
}

/// The model: live images, and per block the values allowed after a crash.
#[derive(Default)]
struct Model {
    live: BTreeMap<String, MVol>,
    durable: BTreeMap<String, MVol>,
    cands: BTreeMap<String, Vec<Vec<u64>>>,
}

impl Model {
    fn durable_point(&mut self) {
        self.durable = self.live.clone();
        self.cands = self
            .live
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.data.chunks(BS as usize).map(|b| vec![h(b)]).collect(),
                )
            })
            .collect();
    }

    fn set(&mut self, name: &str, off: u64, bytes: &[u8], fua: bool) {
        let v = self.live.get_mut(name).expect("volume");
        v.data[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
        if let Some(c) = self.cands.get_mut(name) {
            for (i, b) in bytes.chunks(BS as usize).enumerate() {
                let blk = (off / BS) as usize + i;
                if let Some(set) = c.get_mut(blk) {
                    if fua {
                        *set = vec![h(b)];
                    } else {
                        set.push(h(b));
                    }
                }
            }
        }
    }

    fn pick(&self, i: usize, writable: bool) -> Option<String> {
        let names: Vec<&String> = self
            .live
            .iter()
            .filter(|(_, v)| v.writable || !writable)
            .map(|(k, _)| k)
            .collect();
        if names.is_empty() {
            None
        } else {
            Some(names[i % names.len()].clone())
        }
    }
}

struct Harness {
    fault: Arc<FaultDev>,
    pool: Pool,
    model: Model,
    next_name: u32,
    log: Vec<String>,
}

fn format_opts() -> FormatOptions {
    FormatOptions {
        name: "model".into(),
        chunk_size: CHUNK,
        max_volumes: 32,
        commit_interval: None,
        ..Default::default()
    }
}

fn import_opts() -> ImportOptions {
    ImportOptions {
        commit_interval: None,
    }
}

/// The device crashed or failed a request (an injected fault), as opposed to a bug.
fn crashed(e: &BlockError) -> bool {
    matches!(e, BlockError::Offline(_) | BlockError::Io { .. })
}

fn pool_crashed(e: &PoolError) -> bool {
    match e {
        PoolError::Offline(_) => true,
        PoolError::Device(e) => crashed(e),
        _ => false,
    }
}

impl Harness {
    async fn new() -> Self {
        let mem: SharedBlockDev = Arc::new(MemDev::new((48 << 20) / BS, BS as u32));
        let fault = Arc::new(FaultDev::new(mem));
        let pool = Pool::format(fault.clone(), format_opts()).await.unwrap();
        Harness {
            fault,
            pool,
            model: Model::default(),
            next_name: 0,
            log: Vec::new(),
        }
    }

    fn check_invariants(&self) {
        let v = self.pool.verify();
        assert!(v.is_empty(), "invariants: {v:?}");
    }

    /// After a crash: import from the surviving device and compare with the model.
    /// `post`: the model as it would be had the interrupted management operation
    /// completed.
    async fn recover(&mut self, post: Option<BTreeMap<String, MVol>>) {
        self.fault.recover().await;
        let (pool, report) = Pool::import(self.fault.clone(), import_opts())
            .await
            .unwrap_or_else(|e| panic!("import after crash: {e}"));
        self.pool = pool;
        assert!(report.problems.is_empty(), "{report:?}");
        self.check_invariants();
        let list = self.pool.list();
        let found: BTreeMap<String, u64> = list
            .iter()
            .map(|v| (v.name.clone(), v.size_bytes))
            .collect();
        let sizes = |m: &BTreeMap<String, MVol>| -> BTreeMap<String, u64> {
            m.iter()
                .map(|(k, v)| (k.clone(), v.data.len() as u64))
                .collect()
        };
        let exact = match &post {
            Some(p) if sizes(p) == found => Some(p.clone()),
            _ => None,
        };
        if exact.is_none() {
            assert_eq!(found, sizes(&self.model.durable), "volumes after crash");
        }
        let mut live = BTreeMap::new();
        for (name, size) in &found {
            let lun = self.pool.lun(name).unwrap();
            let got = lun.read(0, *size as usize).await.unwrap();
            match &exact {
                Some(p) => assert!(
                    p[name].data == got[..],
                    "{name}: content after an interrupted management op"
                ),
                None => {
                    let c = &self.model.cands[name];
                    for (i, b) in got.chunks(BS as usize).enumerate() {
                        assert!(
                            c[i].contains(&h(b)),
                            "{name} block {i}: holds a value never written there since the last flush"
                        );
                    }
                }
            }
            let writable = !list.iter().any(|v| &v.name == name && v.read_only);
            live.insert(
                name.clone(),
                MVol {
                    data: got.to_vec(),
                    writable,
                },
            );
        }
        self.model.live = live;
        self.model.durable_point();
    }

    /// Runs one action; returns false when it was skipped.
    async fn step(&mut self, a: &Act) {
        self.log.push(format!("{a:?}"));
        let pre_live = self.model.live.clone();
        let mut post: Option<BTreeMap<String, MVol>> = None;
        let res: Result<(), String> = match a.clone() {
            Act::Create { blocks, prov } => {
                if self.model.live.len() >= MAX_VOLS {
                    return;
                }
                let name = format!("v{}", self.next_name);
                self.next_name += 1;
                let provisioning = match prov {
                    0 | 1 => Provisioning::Thin,
                    2 => Provisioning::Thick { eager_zero: false },
                    _ => Provisioning::Thick { eager_zero: true },
                };
                let mut p = pre_live.clone();
                p.insert(
                    name.clone(),
                    MVol {
                        data: vec![0; (blocks * BS) as usize],
                        writable: true,
                    },
                );
                post = Some(p.clone());
                let o = LunOptions {
                    provisioning,
                    block_size: BS as u32,
                };
                match self.pool.create_lun(&name, blocks * BS, o).await {
                    Ok(_) => {
                        self.model.live = p;
                        self.model.durable_point();
                        Ok(())
                    }
                    Err(e) if pool_crashed(&e) => Err(e.to_string()),
                    Err(e) => panic!("create: {e}"),
                }
            }
            Act::Write {
                vol,
                block,
                n,
                seed,
                fua,
            } => {
                let Some(name) = self.model.pick(vol, true) else {
                    return;
                };
                let size = self.model.live[&name].data.len() as u64 / BS;
                let block = block % size;
                let n = n.min(size - block);
                let data = pattern(seed, (n * BS) as usize);
                // The values may land whether or not the write completes.
                self.model.set(&name, block * BS, &data, false);
                let lun = self.pool.lun(&name).unwrap();
                match lun
                    .write(block * BS, data.clone(), WriteFlags { fua })
                    .await
                {
                    Ok(()) => {
                        if fua {
                            self.model.set(&name, block * BS, &data, true);
                        }
                        Ok(())
                    }
                    Err(e) if crashed(&e) => Err(e.to_string()),
                    Err(e) => panic!("write: {e}"),
                }
            }
            Act::Read { vol, block, n } => {
                let Some(name) = self.model.pick(vol, false) else {
                    return;
                };
                let m = &self.model.live[&name];
                let size = m.data.len() as u64 / BS;
                let block = block % size;
                let n = n.min(size - block);
                let lun = self.pool.lun(&name).unwrap();
                let got = lun.read(block * BS, (n * BS) as usize).await.unwrap();
                let want = &m.data[(block * BS) as usize..((block + n) * BS) as usize];
                assert!(got[..] == *want, "read {name} {block}+{n}");
                Ok(())
            }
            Act::Discard { vol, block, n } | Act::Zero { vol, block, n, .. } => {
                let Some(name) = self.model.pick(vol, true) else {
                    return;
                };
                let size = self.model.live[&name].data.len() as u64 / BS;
                let block = block % size;
                let n = n.min(size - block);
                self.model
                    .set(&name, block * BS, &vec![0; (n * BS) as usize], false);
                let lun = self.pool.lun(&name).unwrap();
                let r = match a {
                    Act::Zero { unmap, .. } => {
                        let f = ZeroFlags {
                            may_unmap: *unmap,
                            fast_only: false,
                        };
                        lun.write_zeroes(block * BS, n * BS, f).await
                    }
                    _ => lun.discard(block * BS, n * BS).await,
                };
                match r {
                    Ok(()) => Ok(()),
                    Err(e) if crashed(&e) => Err(e.to_string()),
                    Err(e) => panic!("discard/zero: {e}"),
                }
            }
            Act::Snapshot { vol } | Act::Clone { vol } => {
                if self.model.live.len() >= MAX_VOLS {
                    return;
                }
                let is_snap = matches!(a, Act::Snapshot { .. });
                let Some(src) = self.model.pick(vol, is_snap) else {
                    return;
                };
                let name = format!("v{}", self.next_name);
                self.next_name += 1;
                let mut p = pre_live.clone();
                let data = p[&src].data.clone();
                p.insert(
                    name.clone(),
                    MVol {
                        data,
                        writable: !is_snap,
                    },
                );
                post = Some(p.clone());
                let r = if is_snap {
                    self.pool.snapshot(&src, &name).await
                } else {
                    self.pool.clone_lun(&src, &name).await
                };
                match r {
                    Ok(_) => {
                        self.model.live = p;
                        self.model.durable_point();
                        Ok(())
                    }
                    Err(e) if pool_crashed(&e) => Err(e.to_string()),
                    Err(PoolError::NoSpace(_)) => Ok(()), // a thick source's reservation
                    Err(e) => panic!("snapshot/clone: {e}"),
                }
            }
            Act::Resize { vol, blocks, force } => {
                let Some(name) = self.model.pick(vol, true) else {
                    return;
                };
                let mut p = pre_live.clone();
                p.get_mut(&name)
                    .expect("vol")
                    .data
                    .resize((blocks * BS) as usize, 0);
                post = Some(p.clone());
                match self.pool.resize(&name, blocks * BS, force).await {
                    Ok(_) => {
                        self.model.live = p;
                        self.model.durable_point();
                        Ok(())
                    }
                    Err(PoolError::WouldLoseData { .. }) if !force => Ok(()),
                    Err(PoolError::NoSpace(_)) => Ok(()),
                    Err(e) if pool_crashed(&e) => Err(e.to_string()),
                    Err(e) => panic!("resize: {e}"),
                }
            }
            Act::Delete { vol } => {
                let Some(name) = self.model.pick(vol, false) else {
                    return;
                };
                let mut p = pre_live.clone();
                p.remove(&name);
                post = Some(p.clone());
                match self.pool.delete(&name).await {
                    Ok(()) => {
                        self.model.live = p;
                        self.model.durable_point();
                        Ok(())
                    }
                    Err(e) if pool_crashed(&e) => Err(e.to_string()),
                    Err(e) => panic!("delete: {e}"),
                }
            }
            Act::Flush => match self.pool.commit().await {
                Ok(()) => {
                    self.model.durable_point();
                    Ok(())
                }
                Err(e) if pool_crashed(&e) => Err(e.to_string()),
                Err(e) => panic!("flush: {e}"),
            },
            Act::Crash { keep, seed } => {
                if keep {
                    let _ = self.fault.crash_keeping_random(seed, 0.5).await;
                } else {
                    self.fault.crash();
                }
                self.recover(None).await;
                return;
            }
            Act::TearNext {
                keep_blocks,
                fail_only,
            } => {
                self.fault.tear_next_write(TornWrite {
                    range: 0..u64::MAX,
                    keep_blocks,
                    outcome: if fail_only {
                        TornOutcome::Fail
                    } else {
                        TornOutcome::Crash
                    },
                });
                return;
            }
            Act::Reimport => {
                if let Err(e) = self.pool.export().await {
                    assert!(pool_crashed(&e), "export: {e}");
                    // The final checkpoint may or may not have landed.
                    self.fault.crash();
                    self.recover(None).await;
                    return;
                }
                let (pool, report) = Pool::import(self.fault.clone(), import_opts())
                    .await
                    .unwrap();
                assert!(report.problems.is_empty());
                self.pool = pool;
                self.model.durable_point();
                self.check_invariants();
                return;
            }
        };
        match res {
            Ok(()) => self.check_invariants(),
            Err(why) => {
                if self.fault.is_crashed() {
                    self.log.push(format!("  -> crashed: {why}"));
                    self.recover(post).await;
                } else {
                    // A torn write that failed without crashing (TornOutcome::Fail) or
                    // any other I/O error: the pool is offline until re-imported, like
                    // after a power loss without losing the cache.
                    self.log.push(format!("  -> failed: {why}"));
                    self.fault.crash();
                    self.recover(post).await;
                }
            }
        }
    }
}

fn run(acts: Vec<Act>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut h = Harness::new().await;
        h.step(&Act::Create {
            blocks: 32,
            prov: 0,
        })
        .await;
        for a in &acts {
            h.step(a).await;
        }
        // Finally: flush, crash, import: exactly the live model.
        h.fault.clear_rules();
        if h.pool.commit().await.is_ok() {
            h.model.durable_point();
        }
        h.fault.crash();
        h.recover(None).await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(96),
        max_shrink_iters: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn model_with_crashes(acts in prop::collection::vec(act(), 1..70)) {
        run(acts);
    }
}

/// Regression-style fixed sequence: a snapshot taken while allocations are pending,
/// then a crash in the middle of the next commit; the snapshot and the LUN must both
/// be exact or both be as before.
#[test]
fn crash_during_snapshot_commit() {
    for keep in 0..4 {
        run(vec![
            Act::Write {
                vol: 0,
                block: 0,
                n: 9,
                seed: 1,
                fua: false,
            },
            Act::Flush,
            Act::Write {
                vol: 0,
                block: 3,
                n: 5,
                seed: 2,
                fua: false,
            },
            Act::TearNext {
                keep_blocks: keep,
                fail_only: false,
            },
            Act::Snapshot { vol: 0 },
            Act::Write {
                vol: 0,
                block: 4,
                n: 1,
                seed: 3,
                fua: true,
            },
            Act::Clone { vol: 1 },
            Act::Delete { vol: 0 },
        ]);
    }
}

/// Many concurrent writers, readers and snapshotters on several LUNs; afterwards every
/// LUN and snapshot holds exactly what the last writer of each block wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_io_and_snapshots() {
    let mem: SharedBlockDev = Arc::new(MemDev::new((128 << 20) / BS, BS as u32));
    let pool = Pool::format(mem.clone(), format_opts()).await.unwrap();
    for i in 0..3 {
        pool.create_lun(&format!("l{i}"), 4 << 20, LunOptions::default())
            .await
            .unwrap();
    }
    let mut set = tokio::task::JoinSet::new();
    for t in 0..6u64 {
        let lun = pool.lun(&format!("l{}", t % 3)).unwrap();
        set.spawn(async move {
            // Each task owns every other 8-block group of its LUN's half.
            let mut last = BTreeMap::new();
            for i in 0..200u64 {
                let group = (i * 7 + t) % 64 * 2 + (t / 3);
                let d = pattern(t * 10_000 + i, 8 * BS as usize);
                lun.write(group * 8 * BS, d.clone(), WriteFlags { fua: i % 17 == 0 })
                    .await
                    .unwrap();
                last.insert(group, d);
                if i % 13 == 0 {
                    lun.discard(group * 8 * BS, 8 * BS).await.unwrap();
                    last.insert(group, Bytes::from(vec![0u8; 8 * BS as usize]));
                }
            }
            (t, last)
        });
    }
    let snapper = {
        let pool = pool.clone();
        tokio::spawn(async move {
            for i in 0..10 {
                pool.snapshot(&format!("l{}", i % 3), &format!("s{i}"))
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
                if i % 3 == 2 {
                    pool.delete(&format!("s{}", i - 1)).await.unwrap();
                }
            }
        })
    };
    let mut results = Vec::new();
    while let Some(r) = set.join_next().await {
        results.push(r.unwrap());
    }
    snapper.await.unwrap();
    assert_eq!(pool.verify(), Vec::<String>::new());
    for (t, last) in results {
        let lun = pool.lun(&format!("l{}", t % 3)).unwrap();
        for (group, d) in last {
            let got = lun.read(group * 8 * BS, 8 * BS as usize).await.unwrap();
            assert!(got == d, "task {t} group {group}");
        }
    }
    // And the same after an export and import.
    pool.export().await.unwrap();
    let (pool2, _) = Pool::import(mem, import_opts()).await.unwrap();
    assert_eq!(pool2.verify(), Vec::<String>::new());
    assert_eq!(pool2.list().len(), 3 + 10 - 3);
}

/// Regression (found by the soak): a crash in the commit of a forced shrink. The
/// shrink is not durable, so the blocks past the new end must still hold their data.
#[test]
fn crash_during_forced_shrink() {
    run(vec![
        Act::Write {
            vol: 0,
            block: 50,
            n: 8,
            seed: 0,
            fua: false,
        },
        Act::Flush,
        Act::TearNext {
            keep_blocks: 0,
            fail_only: false,
        },
        Act::Resize {
            vol: 0,
            blocks: 19,
            force: true,
        },
    ]);
}
