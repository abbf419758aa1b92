//! Functional tests of pools and LUNs: the blockdev conformance suite on a LUN, pool-full
//! behaviour, import on a "second appliance" from the device alone, snapshots and
//! clones sharing blocks, resize, block status, thick reservations, alerts, and check
//! finding and repairing injected metadata corruption.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use basalt_blockdev::conformance::{self, assert_reads, pattern};
use basalt_blockdev::fault::FaultDev;
use basalt_blockdev::uring::create_sparse_file;
use basalt_blockdev::{
    BlockDev, BlockError, ExtentKind, MemDev, SharedBlockDev, UringFile, UringOptions, WriteFlags,
    ZeroFlags,
};
use basalt_lun::{
    AlertLevel, FormatOptions, ImportOptions, LunOptions, Pool, PoolError, Provisioning,
    Thresholds, VolumeKind,
};
use bytes::Bytes;
use std::sync::Arc;

const NO: WriteFlags = WriteFlags { fua: false };
const FUA: WriteFlags = WriteFlags { fua: true };

fn opts(chunk: u32) -> FormatOptions {
    FormatOptions {
        name: "test".into(),
        chunk_size: chunk,
        max_volumes: 64,
        commit_interval: None,
        ..Default::default()
    }
}

fn mem(bytes: u64) -> Arc<MemDev> {
    Arc::new(MemDev::new(bytes / 4096, 4096))
}

fn noimport() -> ImportOptions {
    ImportOptions {
        commit_interval: None,
    }
}

async fn pool_on(dev: SharedBlockDev, chunk: u32) -> Pool {
    Pool::format(dev, opts(chunk)).await.unwrap()
}

fn clean(pool: &Pool) {
    assert_eq!(pool.verify(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_thin_lun() {
    conformance::run("Lun(thin, 4096)", || async {
        let pool = pool_on(mem(96 << 20), 64 << 10).await;
        pool.create_lun("l", 32 << 20, LunOptions::default())
            .await
            .unwrap();
        pool.lun("l").unwrap() as SharedBlockDev
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_thick_512_over_fault_dev() {
    conformance::run("Lun(thick-eager, 512) on FaultDev", || async {
        let dev = Arc::new(MemDev::new((96 << 20) / 512, 512));
        let fault: SharedBlockDev = Arc::new(FaultDev::new(dev));
        let pool = pool_on(fault, 16 << 10).await;
        let o = LunOptions {
            provisioning: Provisioning::Thick { eager_zero: true },
            block_size: 512,
        };
        pool.create_lun("l", 24 << 20, o).await.unwrap();
        pool.lun("l").unwrap() as SharedBlockDev
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_clone_of_written_lun() {
    // A clone starts out sharing every chunk: every write is a copy-on-write.
    conformance::run("Lun(clone)", || async {
        let pool = pool_on(mem(128 << 20), 32 << 10).await;
        pool.create_lun("l", 24 << 20, LunOptions::default())
            .await
            .unwrap();
        let l = pool.lun("l").unwrap();
        l.write_zeroes(0, 24 << 20, ZeroFlags::default())
            .await
            .unwrap();
        pool.clone_lun("l", "c").await.unwrap();
        pool.lun("c").unwrap() as SharedBlockDev
    })
    .await;
}

/// Pool full: writes needing space fail with NoSpace; reads, overwrites and discards
/// keep working; nothing is corrupted; discarded space comes back; the pool imports
/// with the same contents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_full() {
    let dev = mem(32 << 20);
    let pool = pool_on(dev.clone(), 64 << 10).await;
    let data_bytes = pool.usage().data_bytes;
    pool.create_lun("big", 1 << 30, LunOptions::default())
        .await
        .unwrap();
    pool.create_lun("other", 1 << 30, LunOptions::default())
        .await
        .unwrap();
    let big = pool.lun("big").unwrap();
    let other = pool.lun("other").unwrap();
    let mut alerts = pool.alerts();
    let mut written = Vec::new();
    let mut off = 0u64;
    loop {
        let d = pattern(off, 64 << 10);
        match big.write(off, d.clone(), NO).await {
            Ok(()) => written.push((off, d)),
            Err(BlockError::NoSpace) => break,
            Err(e) => panic!("{e}"),
        }
        off += 64 << 10;
    }
    assert_eq!(written.len() as u64 * (64 << 10), data_bytes);
    assert_eq!(*alerts.borrow_and_update(), AlertLevel::Full);
    assert!(pool
        .usage()
        .alerts
        .iter()
        .any(|a| a.level == AlertLevel::Full));
    assert!(pool.counters().snapshot().nospace_errors_total >= 1);
    // Every kind of write that needs space fails cleanly, on any LUN.
    assert!(matches!(
        other.write(0, pattern(1, 4096), NO).await,
        Err(BlockError::NoSpace)
    ));
    assert!(matches!(
        other.write(0, pattern(1, 4096), FUA).await,
        Err(BlockError::NoSpace)
    ));
    // Reads, overwrites (also FUA), discards and flushes work.
    for (o, d) in written.iter().take(5) {
        assert_reads(&*big, *o, d, "read when full").await;
    }
    let new = pattern(999, 8192);
    big.write(4096, new.clone(), FUA).await.unwrap();
    big.flush().await.unwrap();
    assert_reads(&*big, 4096, &new, "overwrite when full").await;
    // A snapshot shares everything, so overwriting the LUN needs space: refused.
    pool.snapshot("big", "big@1").await.unwrap();
    assert!(matches!(
        big.write(0, pattern(5, 4096), NO).await,
        Err(BlockError::NoSpace)
    ));
    pool.delete("big@1").await.unwrap();
    big.write(0, pattern(5, 4096), NO).await.unwrap();
    // Discard returns space; writes work again.
    big.discard(20 << 16, 10 << 16).await.unwrap();
    other.write(0, pattern(7, 4096), NO).await.unwrap();
    assert_reads(&*big, 20 << 16, &vec![0u8; 10 << 16], "discarded").await;
    big.flush().await.unwrap();
    clean(&pool);
    pool.export().await.unwrap();
    let (pool, report) = Pool::import(dev.clone(), noimport()).await.unwrap();
    assert!(report.problems.is_empty(), "{report:?}");
    clean(&pool);
    let big = pool.lun("big").unwrap();
    assert_reads(&*big, 4096, &new, "after import").await;
    for (o, d) in written.iter().skip(30).step_by(7) {
        assert_reads(&*big, *o, d, "after import").await;
    }
    assert_reads(
        &*big,
        20 << 16,
        &vec![0u8; 10 << 16],
        "discarded, after import",
    )
    .await;
    assert_reads(&*pool.lun("other").unwrap(), 0, &pattern(7, 4096), "other").await;
}

/// The pool moves to a "second appliance": the same file opened afresh (nothing shared
/// in memory), imported from the device alone; ids, names, sizes and data survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_on_second_appliance() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("array.img");
    create_sparse_file(&path, 256 << 20).unwrap();
    let uopts = UringOptions {
        block_size: Some(4096),
        ..Default::default()
    };
    let (infos, uuid) = {
        let dev: SharedBlockDev = Arc::new(UringFile::open(&path, &uopts).unwrap());
        let pool = Pool::format(dev.clone(), opts(64 << 10)).await.unwrap();
        pool.create_lun("a", 64 << 20, LunOptions::default())
            .await
            .unwrap();
        let thick = LunOptions {
            provisioning: Provisioning::Thick { eager_zero: false },
            block_size: 4096,
        };
        pool.create_lun("b", 16 << 20, thick).await.unwrap();
        let a = pool.lun("a").unwrap();
        a.write(0, pattern(1, 1 << 20), NO).await.unwrap();
        a.write(40 << 20, pattern(2, 4096), FUA).await.unwrap();
        pool.snapshot("a", "a@1").await.unwrap();
        a.write(0, pattern(3, 4096), NO).await.unwrap();
        pool.clone_lun("a@1", "c").await.unwrap();
        pool.lun("b")
            .unwrap()
            .write(4096, pattern(4, 4096), NO)
            .await
            .unwrap();
        a.flush().await.unwrap();
        // No export: a crash-free "power off" after a flush is enough.
        (pool.list(), pool.uuid())
    };
    // Appliance 2: a new process would open the file and probe it.
    let dev: SharedBlockDev = Arc::new(UringFile::open(&path, &uopts).unwrap());
    let label = Pool::probe(&dev).await.unwrap().unwrap();
    assert_eq!(label.uuid, uuid);
    assert!(matches!(
        Pool::format(dev.clone(), opts(64 << 10)).await,
        Err(PoolError::AlreadyFormatted { .. })
    ));
    let (pool, report) = Pool::import(dev, noimport()).await.unwrap();
    assert!(report.problems.is_empty(), "{report:?}");
    assert_eq!(pool.uuid(), uuid);
    assert_eq!(pool.list(), infos);
    let a = pool.lun("a").unwrap();
    let mut expect = pattern(1, 1 << 20).to_vec();
    expect[..4096].copy_from_slice(&pattern(3, 4096));
    assert_reads(&*a, 0, &expect, "a").await;
    assert_reads(&*a, 40 << 20, &pattern(2, 4096), "a fua").await;
    assert_reads(
        &*pool.lun("a@1").unwrap(),
        0,
        &pattern(1, 1 << 20),
        "snapshot",
    )
    .await;
    assert_reads(&*pool.lun("c").unwrap(), 0, &pattern(1, 1 << 20), "clone").await;
    assert_reads(&*pool.lun("b").unwrap(), 4096, &pattern(4, 4096), "thick").await;
    clean(&pool);
}

#[tokio::test]
async fn format_refuses_a_pool_unless_forced() {
    let dev = mem(64 << 20);
    let pool = pool_on(dev.clone(), 64 << 10).await;
    pool.create_lun("x", 1 << 20, LunOptions::default())
        .await
        .unwrap();
    let e = Pool::format(dev.clone(), opts(64 << 10)).await.unwrap_err();
    assert!(matches!(e, PoolError::AlreadyFormatted { .. }), "{e}");
    let mut o = opts(64 << 10);
    o.force = true;
    let pool = Pool::format(dev.clone(), o).await.unwrap();
    assert!(pool.list().is_empty());
    assert!(matches!(
        Pool::import(mem(64 << 20), noimport()).await,
        Err(PoolError::NotAPool)
    ));
}

/// Snapshots and clones share unchanged chunks; deleting in any order returns all
/// space (down to the device: MemDev frees discarded chunks).
#[tokio::test]
async fn snapshots_share_and_delete_in_any_order() {
    let dev = mem(64 << 20);
    let pool = pool_on(dev.clone(), 64 << 10).await;
    let base = dev.allocated_bytes();
    pool.create_lun("l", 8 << 20, LunOptions::default())
        .await
        .unwrap();
    let l = pool.lun("l").unwrap();
    l.write(0, pattern(1, 4 << 20), NO).await.unwrap();
    pool.snapshot("l", "s1").await.unwrap();
    let s1 = pool.info("s1").unwrap();
    assert_eq!(s1.kind, VolumeKind::Snapshot);
    assert!(s1.read_only);
    assert_eq!(pool.info("l").unwrap().exclusive_bytes, 0);
    assert_eq!(pool.info("l").unwrap().shared_bytes, 4 << 20);
    l.write(0, pattern(2, 1 << 20), NO).await.unwrap();
    assert_eq!(pool.info("l").unwrap().exclusive_bytes, 1 << 20);
    assert_eq!(pool.info("l").unwrap().snapshot_bytes, 1 << 20);
    pool.clone_lun("s1", "c1").await.unwrap();
    pool.snapshot("c1", "c1@a").await.unwrap();
    let c1 = pool.lun("c1").unwrap();
    c1.write(2 << 20, pattern(3, 1 << 20), NO).await.unwrap();
    assert_eq!(pool.usage().allocated_bytes, 6 << 20);
    let s = pool.lun("s1").unwrap();
    assert!(matches!(
        s.write(0, pattern(1, 4096), NO).await,
        Err(BlockError::ReadOnly)
    ));
    assert_reads(&*s, 0, &pattern(1, 4 << 20), "snapshot").await;
    let mut ce = pattern(1, 4 << 20).to_vec();
    ce[2 << 20..3 << 20].copy_from_slice(&pattern(3, 1 << 20));
    assert_reads(&*c1, 0, &ce, "clone").await;
    pool.delete("s1").await.unwrap();
    clean(&pool);
    assert_reads(&*c1, 0, &ce, "clone after origin snapshot deleted").await;
    pool.delete("l").await.unwrap();
    clean(&pool);
    assert_reads(&*c1, 0, &ce, "clone after LUN deleted").await;
    assert!(matches!(l.read(0, 4096).await, Err(BlockError::Offline(_))));
    pool.delete("c1").await.unwrap();
    clean(&pool);
    assert_reads(
        &*pool.lun("c1@a").unwrap(),
        0,
        &pattern(1, 4 << 20),
        "last snapshot",
    )
    .await;
    pool.delete("c1@a").await.unwrap();
    pool.commit().await.unwrap();
    clean(&pool);
    assert_eq!(pool.usage().allocated_bytes, 0);
    // The frees reached the device: the whole data area is a hole again.
    let l = pool.layout();
    let data = l.data_chunks * u64::from(l.chunk_size);
    let ext = dev.block_status(l.data_off, data).await.unwrap();
    assert_eq!(ext.len(), 1, "{ext:?}");
    assert_eq!(ext[0].kind, ExtentKind::Hole);
    assert!(dev.allocated_bytes() > base);
}

#[tokio::test]
async fn resize_and_rename() {
    let pool = pool_on(mem(64 << 20), 64 << 10).await;
    pool.create_lun("l", 4 << 20, LunOptions::default())
        .await
        .unwrap();
    let l = pool.lun("l").unwrap();
    l.write(3 << 20, pattern(1, 1 << 20), NO).await.unwrap();
    let e = pool.resize("l", 2 << 20, false).await.unwrap_err();
    assert!(matches!(e, PoolError::WouldLoseData { .. }), "{e}");
    // Shrinking past unmapped space is fine without force.
    l.discard(3 << 20, 1 << 20).await.unwrap();
    pool.resize("l", (3 << 20) + 4096, false).await.unwrap();
    l.write(3 << 20, pattern(2, 4096), NO).await.unwrap();
    // Mid-chunk shrink with force: the tail of the chunk reads zero after regrowing.
    pool.resize("l", 2 << 20, true).await.unwrap();
    assert_eq!(l.geometry().capacity_bytes(), 2 << 20);
    assert!(matches!(
        l.read(3 << 20, 4096).await,
        Err(BlockError::OutOfRange { .. })
    ));
    pool.resize("l", 8 << 20, false).await.unwrap();
    assert_reads(&*l, 2 << 20, &vec![0u8; 6 << 20], "grown").await;
    pool.rename("l", "m").await.unwrap();
    assert!(matches!(pool.lun("l"), Err(PoolError::NotFound(_))));
    assert_eq!(l.name().as_deref(), Some("m"));
    l.write(0, pattern(3, 4096), NO).await.unwrap();
    clean(&pool);
}

#[tokio::test]
async fn block_status_reports_holes_zeroes_and_data() {
    let pool = pool_on(mem(64 << 20), 64 << 10).await;
    pool.create_lun("thin", 1 << 20, LunOptions::default())
        .await
        .unwrap();
    let t = pool.lun("thin").unwrap();
    t.write(64 << 10, pattern(1, 4096), NO).await.unwrap();
    let ext = t.block_status(0, 4 << 16).await.unwrap();
    let kinds: Vec<_> = ext.iter().map(|e| (e.kind, e.len)).collect();
    assert_eq!(
        kinds,
        vec![
            (ExtentKind::Hole, 1 << 16),
            (ExtentKind::Data, 1 << 16),
            (ExtentKind::Hole, 2 << 16)
        ]
    );
    t.discard(64 << 10, 64 << 10).await.unwrap();
    assert_eq!(t.block_status(0, 1 << 20).await.unwrap().len(), 1);
    let thick = LunOptions {
        provisioning: Provisioning::Thick { eager_zero: false },
        block_size: 4096,
    };
    pool.create_lun("thick", 1 << 20, thick).await.unwrap();
    let k = pool.lun("thick").unwrap();
    assert_eq!(
        k.block_status(0, 1 << 20).await.unwrap()[0].kind,
        ExtentKind::Zero
    );
}

/// Thick volumes reserve their space: thin volumes cannot take it, and a snapshot of a
/// thick volume is refused unless its copy-on-write space can be reserved too.
#[tokio::test]
async fn thick_reservations() {
    let pool = pool_on(mem(32 << 20), 64 << 10).await;
    let data = pool.usage().data_bytes;
    let thick = LunOptions {
        provisioning: Provisioning::Thick { eager_zero: false },
        block_size: 4096,
    };
    let half = data / 2 / (64 << 10) * (64 << 10);
    pool.create_lun("k", half, thick).await.unwrap();
    assert_eq!(pool.usage().reserved_bytes, half);
    assert!(matches!(
        pool.create_lun("k2", half + (64 << 10) * 2, thick).await,
        Err(PoolError::NoSpace(_))
    ));
    pool.create_lun("t", 1 << 30, LunOptions::default())
        .await
        .unwrap();
    let t = pool.lun("t").unwrap();
    let mut off = 0;
    while t.write(off, pattern(off, 64 << 10), NO).await.is_ok() {
        off += 64 << 10;
    }
    // The thin LUN stopped at the reservation; the thick one still writes everywhere.
    assert_eq!(off, data - half);
    let k = pool.lun("k").unwrap();
    k.write(0, pattern(1, half as usize), NO).await.unwrap();
    assert!(matches!(
        pool.snapshot("k", "k@1").await,
        Err(PoolError::NoSpace(_))
    ));
    t.discard(0, 1 << 30).await.unwrap();
    t.flush().await.unwrap();
    pool.snapshot("k", "k@1").await.unwrap();
    k.write(0, pattern(2, half as usize), NO).await.unwrap();
    assert_reads(
        &*pool.lun("k@1").unwrap(),
        0,
        &pattern(1, half as usize),
        "thick snapshot",
    )
    .await;
    clean(&pool);
}

#[tokio::test]
async fn alerts_follow_thresholds() {
    let pool = pool_on(mem(32 << 20), 64 << 10).await;
    pool.set_thresholds(Thresholds {
        data_warn_pct: 10,
        data_critical_pct: 20,
        meta_warn_pct: 80,
        meta_critical_pct: 90,
    })
    .await
    .unwrap();
    let data = pool.usage().data_bytes;
    let mut rx = pool.alerts();
    pool.create_lun("t", 1 << 30, LunOptions::default())
        .await
        .unwrap();
    let t = pool.lun("t").unwrap();
    t.write(0, pattern(1, (data / 100 * 15) as usize / 4096 * 4096), NO)
        .await
        .unwrap();
    assert_eq!(*rx.borrow_and_update(), AlertLevel::Warning);
    t.write(8 << 20, pattern(2, (data / 10) as usize / 4096 * 4096), NO)
        .await
        .unwrap();
    assert_eq!(*rx.borrow_and_update(), AlertLevel::Critical);
    t.discard(0, 1 << 30).await.unwrap();
    t.flush().await.unwrap();
    assert_eq!(*rx.borrow_and_update(), AlertLevel::Ok);
    assert!(pool.counters().snapshot().alerts_raised_total >= 2);
    assert_eq!(pool.usage().thresholds.data_warn_pct, 10);
}

async fn populated(dev: SharedBlockDev) -> Vec<(String, u64, Bytes)> {
    let pool = pool_on(dev, 16 << 10).await;
    pool.create_lun("a", 4 << 20, LunOptions::default())
        .await
        .unwrap();
    let a = pool.lun("a").unwrap();
    let mut expect = Vec::new();
    for i in 0..20u64 {
        let d = pattern(i, 16 << 10);
        a.write(i * (48 << 10), d.clone(), NO).await.unwrap();
        a.flush().await.unwrap(); // one journal block per flush
        expect.push(("a".to_string(), i * (48 << 10), d));
    }
    pool.snapshot("a", "a@1").await.unwrap();
    expect.push(("a@1".into(), 0, pattern(0, 16 << 10)));
    expect
}

async fn verify_contents(pool: &Pool, expect: &[(String, u64, Bytes)]) {
    for (name, off, d) in expect {
        assert_reads(&*pool.lun(name).unwrap(), *off, d, name).await;
    }
}

/// Flips one bit of the device at `offset`, as bit rot would.
async fn flip(dev: &MemDev, offset: u64) {
    let mut b = dev.read(offset / 4096 * 4096, 4096).await.unwrap().to_vec();
    b[(offset % 4096) as usize] ^= 0x40;
    dev.write(offset / 4096 * 4096, Bytes::from(b), NO)
        .await
        .unwrap();
}

/// Check on a clean pool reports nothing; bit flips in a superblock, a checkpoint or
/// a journal block are found; a damaged superblock or checkpoint loses nothing (the
/// other metadata copy serves) and repair restores both copies.
#[tokio::test]
async fn check_finds_and_repairs_corruption() {
    let dev = mem(64 << 20);
    let sdev: SharedBlockDev = dev.clone();
    let expect = populated(sdev.clone()).await;
    let report = Pool::check(sdev.clone(), false).await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    let layout = Pool::probe(&sdev).await.unwrap().unwrap();
    let gen = layout.generation;
    let l = layout.layout;

    // 1. The newest superblock copy.
    flip(&dev, (gen % 2) * 4096 + 100).await;
    let report = Pool::check(sdev.clone(), false).await.unwrap();
    assert!(!report.is_clean());
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("superblock copy")),
        "{report:?}"
    );
    let report = Pool::check(sdev.clone(), true).await.unwrap();
    assert!(!report.repaired.is_empty());
    let report = Pool::check(sdev.clone(), false).await.unwrap();
    assert!(report.is_clean(), "after repair: {report:?}");
    let (pool, _) = Pool::import(sdev.clone(), noimport()).await.unwrap();
    verify_contents(&pool, &expect).await;
    // Some journal traffic on the new generation, then export (checkpoint).
    pool.lun("a")
        .unwrap()
        .write(0, pattern(100, 4096), NO)
        .await
        .unwrap();
    pool.commit().await.unwrap();
    drop(pool);
    let mut expect = expect;
    expect[0].2 = {
        let mut v = pattern(0, 16 << 10).to_vec();
        v[..4096].copy_from_slice(&pattern(100, 4096));
        Bytes::from(v)
    };

    // 2. The newest checkpoint: import falls back to the previous checkpoint plus both
    // journals, and loses nothing.
    let label = Pool::probe(&sdev).await.unwrap().unwrap();
    assert!(label.generation > gen);
    flip(&dev, l.cp_slot_off(label.generation) + 100).await;
    let report = Pool::check(sdev.clone(), false).await.unwrap();
    assert!(report.fell_back, "{report:?}");
    let (pool, ireport) = Pool::import(sdev.clone(), noimport()).await.unwrap();
    assert!(ireport.fell_back);
    verify_contents(&pool, &expect).await;
    clean(&pool);
    drop(pool);
    assert!(Pool::check(sdev.clone(), false).await.unwrap().is_clean());

    // 3. A journal block in the middle: replay stops there and check says later
    // commits are lost.
    let pool = Pool::import(sdev.clone(), noimport()).await.unwrap().0;
    let a = pool.lun("a").unwrap();
    // Fresh chunks, so each flush commits one journal block.
    for i in 0..4u64 {
        a.write((2 << 20) + i * (16 << 10), pattern(200 + i, 4096), NO)
            .await
            .unwrap();
        a.flush().await.unwrap();
    }
    drop(pool);
    let label = Pool::probe(&sdev).await.unwrap().unwrap();
    flip(&dev, l.journal_block_off(label.generation, 1) + 200).await;
    let report = Pool::check(sdev.clone(), false).await.unwrap();
    assert!(
        report.problems.iter().any(|p| p.contains("later blocks")),
        "{report:?}"
    );
    let report = Pool::check(sdev.clone(), true).await.unwrap();
    assert!(!report.repaired.is_empty());
    let (pool, _) = Pool::import(sdev.clone(), noimport()).await.unwrap();
    clean(&pool);
    // The first commit survived; the rest are gone but the pool is consistent.
    let a = pool.lun("a").unwrap();
    assert_reads(&*a, 2 << 20, &pattern(200, 4096), "first commit").await;
    assert_reads(&*a, (2 << 20) + (16 << 10), &[0; 4096], "lost commit").await;
    verify_contents(&pool, &expect).await;
}
