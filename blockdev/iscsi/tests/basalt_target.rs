//! The iSCSI initiator against Basalt's own iSCSI target (`basalt-iscsi`, started in
//! process on loopback, port 0): the one target we have that implements COMPARE AND
//! WRITE (tgt does not, see `tgt.rs`). Checks the success and MISCOMPARE paths (the
//! offset comes from the sense data's INFORMATION field), the limits the target
//! reports, and that CAW stays atomic when two sessions (two initiators, as two hosts of
//! the lock manager would be) race on the same blocks, on a memory LUN and on a file
//! LUN (io_uring). The whole `BlockDev` conformance suite also runs over the wire.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step is a failed test

use basalt_blockdev::{
    conformance, BlockDev, BlockError, CompareOutcome, MemDev, SharedBlockDev, UringFile,
    UringOptions, WriteFlags,
};
use basalt_blockdev_iscsi::{IscsiDev, IscsiOptions};
use basalt_iscsi::{ConnConfig, IscsiConfig, IscsiServer, LunHandle, LunMapping, TargetConfig};
use basalt_scsi::LunIdentity;
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const IQN: &str = "iqn.2026-11.org.basalt:caw-test";

/// A running target with its LUNs: 0 writable (the device given), 1 read-only.
struct Target {
    server: IscsiServer,
    addr: SocketAddr,
    _dir: Option<tempfile::TempDir>,
}

impl Target {
    fn url(&self, lun: u16) -> String {
        format!("iscsi://{}/{IQN}/{lun}", self.addr)
    }
}

async fn serve(dev: SharedBlockDev, dir: Option<tempfile::TempDir>) -> Target {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let id = u128::from(NEXT.fetch_add(1, Ordering::Relaxed));
    let mut units = HashMap::new();
    units.insert(
        "rw".to_string(),
        LunHandle {
            dev,
            identity: LunIdentity::new(0x5ca1_ab1e_0000_0000 + id),
            pr_store: None,
        },
    );
    let mut ro = LunIdentity::new(0x5ca1_ab1e_1000_0000 + id);
    ro.read_only = true;
    units.insert(
        "ro".to_string(),
        LunHandle {
            dev: Arc::new(MemDev::new(16 * 2048, 512)),
            identity: ro,
            pr_store: None,
        },
    );
    let portal: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let cfg = IscsiConfig {
        targets: vec![TargetConfig {
            iqn: IQN.into(),
            portals: vec![portal],
            tpgt: 1,
            luns: vec![
                LunMapping {
                    lun: 0,
                    name: "rw".into(),
                },
                LunMapping {
                    lun: 1,
                    name: "ro".into(),
                },
            ],
            acls: Vec::new(),
            allow_any_initiator: true,
            chap: None,
        }],
        discovery_chap: None,
    };
    let server = IscsiServer::start(cfg, units, ConnConfig::default())
        .await
        .unwrap();
    let addr = server.bound_portals()[&portal];
    Target {
        server,
        addr,
        _dir: dir,
    }
}

async fn mem_target(mib: u64) -> Target {
    serve(Arc::new(MemDev::new(mib * 2048, 512)), None).await
}

async fn file_target(mib: u64) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lun.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    let dev = UringFile::open(&path, &UringOptions::default()).unwrap();
    serve(Arc::new(dev), Some(dir)).await
}

fn opts(initiator: &str) -> IscsiOptions {
    IscsiOptions {
        initiator: format!("iqn.2026-11.org.basalt:{initiator}"),
        io_timeout: Duration::from_secs(10),
        reconnect_interval: Duration::from_millis(200),
        ..IscsiOptions::default()
    }
}

async fn connect(t: &Target, lun: u16, initiator: &str) -> IscsiDev {
    IscsiDev::connect(&t.url(lun), &opts(initiator))
        .await
        .unwrap()
}

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect::<Vec<u8>>(),
    )
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<u64> {
    a.iter().zip(b).position(|(x, y)| x != y).map(|p| p as u64)
}

/// Every `BlockDev` contract, through the initiator and our target, each check on a
/// fresh memory LUN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_over_basalt_target() {
    let targets = Arc::new(std::sync::Mutex::new(Vec::new()));
    conformance::run("IscsiDev->basalt-iscsi", || {
        let targets = targets.clone();
        async move {
            let t = mem_target(64).await;
            let n = targets.lock().unwrap().len();
            let dev: SharedBlockDev = Arc::new(connect(&t, 0, &format!("conf{n}")).await);
            targets.lock().unwrap().push(t);
            dev
        }
    })
    .await;
    let all: Vec<Target> = std::mem::take(&mut *targets.lock().unwrap());
    for t in all {
        t.server.stop().await;
    }
}

/// Written, and MISCOMPARE with the offset of the first differing byte taken from the
/// sense INFORMATION field, for one block and several, at the start, inside the first
/// block, inside a later block and at the last byte; nothing is written on a
/// miscompare. The target's MAXIMUM COMPARE AND WRITE LENGTH is honoured (one past it
/// is refused before the wire), and a read-only LUN answers DATA PROTECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_write_success_and_miscompare_offsets() {
    for (kind, t) in [
        ("mem", mem_target(64).await),
        ("file", file_target(64).await),
    ] {
        let dev = connect(&t, 0, &format!("single-{kind}")).await;
        let max = u64::from(dev.limits().max_compare_and_write_blocks);
        assert!(
            max >= 1,
            "{kind}: target reports no COMPARE AND WRITE: {max}"
        );
        let bs = u64::from(dev.geometry().block_size);
        let fua = WriteFlags { fua: true };
        for blocks in [1u64, 2, 8, max] {
            let len = (blocks * bs) as usize;
            let off = 100 * bs;
            let a = pattern(blocks as u8, len);
            let b = pattern(blocks as u8 + 100, len);
            dev.write(off, a.clone(), WriteFlags::default())
                .await
                .unwrap();
            // Match: written.
            let r = dev.compare_and_write(off, a.clone(), b.clone(), fua).await;
            assert_eq!(r.unwrap(), CompareOutcome::Written, "{kind} {blocks}");
            assert_eq!(dev.read(off, len).await.unwrap(), b, "{kind} {blocks}");
            // Mismatch at several places: the offset is the first difference.
            let mut spots = vec![0usize, bs as usize - 1, len - 1];
            if blocks > 1 {
                spots.push(bs as usize + 7);
                spots.push(len - bs as usize / 2);
            }
            for at in spots {
                let mut wrong = b.to_vec();
                wrong[at] ^= 0x80;
                // A second difference further on must not be the one reported.
                if at + 3 < len {
                    wrong[at + 3] ^= 0x01;
                }
                let r = dev
                    .compare_and_write(off, Bytes::from(wrong), a.clone(), fua)
                    .await;
                assert_eq!(
                    r.unwrap(),
                    CompareOutcome::Miscompare { offset: at as u64 },
                    "{kind}: {blocks} blocks, difference at {at}"
                );
                assert_eq!(
                    dev.read(off, len).await.unwrap(),
                    b,
                    "{kind}: miscompare wrote"
                );
            }
        }
        // One past the reported maximum never reaches the wire.
        let len = ((max + 1) * bs) as usize;
        let r = dev
            .compare_and_write(0, Bytes::from(vec![0; len]), Bytes::from(vec![1; len]), fua)
            .await;
        assert!(matches!(r, Err(BlockError::InvalidRequest(_))), "{r:?}");
        // Read-only LUN: DATA PROTECT, nothing written.
        let ro = connect(&t, 1, &format!("ro-{kind}")).await;
        let z = Bytes::from(vec![0u8; bs as usize]);
        let r = ro
            .compare_and_write(0, z.clone(), pattern(9, bs as usize), fua)
            .await;
        assert!(matches!(r, Err(BlockError::ReadOnly)), "{kind}: {r:?}");
        assert_eq!(ro.read(0, bs as usize).await.unwrap(), z);
        t.server.stop().await;
    }
}

/// Two sessions (two initiators) increment a counter with CAW, many requests in flight
/// each. The counter is copied into every block of a 4-block range, so a CAW applied
/// non-atomically (torn across blocks, or interleaved with the other session's) shows
/// as copies that disagree; a lost or doubled increment shows in the totals. A third
/// session reads the range throughout and checks the copies agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_write_is_atomic_across_sessions() {
    const TASKS: u64 = 4;
    const INCREMENTS: u64 = 150;
    const BLOCKS: usize = 4;
    for (kind, t) in [
        ("mem", mem_target(64).await),
        ("file", file_target(64).await),
    ] {
        let a: SharedBlockDev = Arc::new(connect(&t, 0, &format!("race-a-{kind}")).await);
        let b: SharedBlockDev = Arc::new(connect(&t, 0, &format!("race-b-{kind}")).await);
        let watcher: SharedBlockDev = Arc::new(connect(&t, 0, &format!("race-w-{kind}")).await);
        let bs = a.geometry().block_size as usize;
        let base = 4096 * bs as u64;
        let image = move |value: u64, who: u8| -> Bytes {
            let mut v = vec![0u8; BLOCKS * bs];
            for blk in v.chunks_mut(bs) {
                blk[..8].copy_from_slice(&value.to_le_bytes());
                blk[8] = who;
            }
            Bytes::from(v)
        };
        a.write(base, image(0, 0), WriteFlags::default())
            .await
            .unwrap();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watch = {
            let done = done.clone();
            let w = watcher.clone();
            tokio::spawn(async move {
                let mut reads = 0u64;
                while !done.load(Ordering::Relaxed) {
                    let img = w.read(base, BLOCKS * bs).await.unwrap();
                    let first = &img[..bs];
                    for (i, blk) in img.chunks(bs).enumerate() {
                        assert_eq!(blk, first, "block {i} of the CAW range disagrees: torn");
                    }
                    reads += 1;
                }
                reads
            })
        };
        let mut set = tokio::task::JoinSet::new();
        for (who, dev) in [(1u8, a.clone()), (2u8, b.clone())] {
            for _ in 0..TASKS {
                let dev = dev.clone();
                set.spawn(async move {
                    let mut seen = Vec::new();
                    let mut miscompares = 0u64;
                    for _ in 0..INCREMENTS {
                        loop {
                            let cur = dev.read(base, BLOCKS * bs).await.unwrap();
                            let v = u64::from_le_bytes(cur[..8].try_into().unwrap());
                            let next = image(v + 1, who);
                            match dev
                                .compare_and_write(
                                    base,
                                    cur.clone(),
                                    next.clone(),
                                    WriteFlags::default(),
                                )
                                .await
                                .unwrap()
                            {
                                CompareOutcome::Written => {
                                    seen.push(v + 1);
                                    break;
                                }
                                CompareOutcome::Miscompare { offset } => {
                                    // The reported offset is a real difference between
                                    // what we compared and what is there now (or was,
                                    // when the target compared).
                                    assert!(offset < (BLOCKS * bs) as u64, "{offset}");
                                    miscompares += 1;
                                }
                            }
                        }
                    }
                    (seen, miscompares)
                });
            }
        }
        let mut all = Vec::new();
        let mut miscompares = 0;
        while let Some(r) = set.join_next().await {
            let (s, m) = r.unwrap();
            all.extend(s);
            miscompares += m;
        }
        done.store(true, Ordering::Relaxed);
        let reads = watch.await.unwrap();
        all.sort_unstable();
        let n = 2 * TASKS * INCREMENTS;
        assert_eq!(
            all,
            (1..=n).collect::<Vec<_>>(),
            "{kind}: increments lost or doubled"
        );
        let fin = a.read(base, BLOCKS * bs).await.unwrap();
        assert_eq!(u64::from_le_bytes(fin[..8].try_into().unwrap()), n);
        println!("{kind}: {n} increments over two sessions, {miscompares} miscompares, {reads} consistent reads");
        assert!(miscompares > 0, "{kind}: the sessions never raced");
        t.server.stop().await;
    }
}

/// Two sessions race the same CAW from one image to their own: per round exactly one
/// wins, and the loser's MISCOMPARE offset is the first byte where the winner's image
/// differs from the common one (the target compares against what the winner wrote).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_caws_one_winner_and_exact_offsets() {
    let t = file_target(64).await;
    let a = Arc::new(connect(&t, 0, "duel-a").await);
    let b = Arc::new(connect(&t, 0, "duel-b").await);
    let bs = a.geometry().block_size as usize;
    let off = 77 * bs as u64;
    let mut wins = [0u32; 2];
    for round in 0..300u32 {
        let base = pattern(round as u8, bs);
        a.write(off, base.clone(), WriteFlags::default())
            .await
            .unwrap();
        // The images differ from the base first at a round-dependent byte.
        let mk = |who: u8| {
            let mut v = base.to_vec();
            let at = (round as usize * 13 + usize::from(who) * 101) % bs;
            for x in &mut v[at..] {
                *x = x.wrapping_add(who);
            }
            (Bytes::from(v), at as u64)
        };
        let (ia, at_a) = mk(1);
        let (ib, at_b) = mk(2);
        let (ra, rb) = tokio::join!(
            a.compare_and_write(off, base.clone(), ia.clone(), WriteFlags::default()),
            b.compare_and_write(off, base.clone(), ib.clone(), WriteFlags::default()),
        );
        let now = a.read(off, bs).await.unwrap();
        match (ra.unwrap(), rb.unwrap()) {
            (CompareOutcome::Written, CompareOutcome::Miscompare { offset }) => {
                assert_eq!(now, ia);
                assert_eq!(offset, at_a, "round {round}");
                assert_eq!(Some(offset), first_difference(&base, &ia));
                wins[0] += 1;
            }
            (CompareOutcome::Miscompare { offset }, CompareOutcome::Written) => {
                assert_eq!(now, ib);
                assert_eq!(offset, at_b, "round {round}");
                wins[1] += 1;
            }
            other => panic!("round {round}: not exactly one winner: {other:?}"),
        }
    }
    println!("wins: a {} b {}", wins[0], wins[1]);
    t.server.stop().await;
}
