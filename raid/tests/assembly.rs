//! Assembly from disks alone: shuffled order, two arrays mixed, stale members,
//! duplicates, blank and corrupt disks, too few members; jobs that resume after a
//! restart; a dead or hung member that must not hang anything.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use basalt_blockdev::fault::{FaultDev, FaultOp};
use basalt_blockdev::{BlockDev, MemDev, SharedBlockDev, WriteFlags};
use basalt_raid::Array;
use basalt_raid::{
    assemble, ArrayConfig, AssembleOptions, Device, JobKind, Level, RejectReason, RoleState,
};
use bytes::Bytes;
use common::*;
use std::sync::Arc;
use std::time::Duration;

fn cands(fs: &[Arc<FaultDev>], order: &[usize]) -> Vec<Device> {
    order
        .iter()
        .map(|&i| Device::new(format!("d{i}"), fs[i].clone() as SharedBlockDev))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shuffled_members_and_spare_reassemble() {
    let fs = fault_members(7, MEMBER, false);
    let a = Array::create(
        ArrayConfig::new("six", Level::Raid6),
        devices(&fs[..6]),
        devices(&fs[6..]),
    )
    .await
    .unwrap();
    let data = pattern(5, 3 << 20);
    a.write(1 << 20, Bytes::from(data.clone()), WriteFlags::default())
        .await
        .unwrap();
    let before = a.status();
    a.stop().await.unwrap();
    drop(a);
    let asm = assemble(
        cands(&fs, &[4, 6, 0, 5, 2, 1, 3]),
        &AssembleOptions::default(),
    )
    .await;
    assert!(asm.rejected.is_empty(), "{asm:?}");
    let a = asm.arrays[0].clone();
    let st = a.status();
    assert_eq!(st.uuid, before.uuid);
    for (m, b) in st.members.iter().zip(&before.members) {
        assert_eq!((m.role, m.device), (b.role, b.device), "roles kept");
    }
    assert_eq!(st.spares.len(), 1);
    assert_eq!(format!("{:?}", st.state), "Clean");
    let got = a.read(1 << 20, data.len()).await.unwrap();
    assert_eq!(diff(&got, &data), None);
    a.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_arrays_never_mix() {
    let fs = fault_members(5, MEMBER, false);
    let a = Array::create(
        ArrayConfig::new("a", Level::Raid5),
        devices(&fs[..3]),
        vec![],
    )
    .await
    .unwrap();
    let b = Array::create(
        ArrayConfig::new("b", Level::Raid1),
        devices(&fs[3..]),
        vec![],
    )
    .await
    .unwrap();
    let (da, db) = (pattern(1, 1 << 20), pattern(2, 1 << 20));
    a.write(0, Bytes::from(da.clone()), WriteFlags::default())
        .await
        .unwrap();
    b.write(0, Bytes::from(db.clone()), WriteFlags::default())
        .await
        .unwrap();
    let (ua, ub) = (a.uuid(), b.uuid());
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    drop((a, b));
    let asm = assemble(cands(&fs, &[3, 0, 4, 2, 1]), &AssembleOptions::default()).await;
    assert_eq!(asm.arrays.len(), 2, "{asm:?}");
    for arr in &asm.arrays {
        let want = if arr.uuid() == ua { &da } else { &db };
        assert!(arr.uuid() == ua || arr.uuid() == ub);
        assert_eq!(diff(&arr.read(0, 1 << 20).await.unwrap(), want), None);
        assert_eq!(
            arr.status()
                .members
                .iter()
                .filter(|m| m.state == RoleState::InSync)
                .count(),
            if arr.uuid() == ua { 3 } else { 2 }
        );
        arr.stop().await.unwrap();
    }
    drop(asm);
    // Asking for one array only: the other's disks are foreign.
    let opts = AssembleOptions {
        array: Some(ub),
        ..Default::default()
    };
    let asm = assemble(cands(&fs, &[0, 1, 2, 3, 4]), &opts).await;
    assert_eq!(asm.arrays.len(), 1);
    assert_eq!(asm.rejected.len(), 3);
    assert!(asm
        .rejected
        .iter()
        .all(|r| r.reason == RejectReason::Foreign { array: ua }));
    asm.arrays[0].stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_and_duplicate_members_are_not_trusted() {
    let fs = fault_members(4, MEMBER, false);
    let a = make(Level::Raid5, 65536, &fs).await;
    let old = pattern(1, 2 << 20);
    a.write(0, Bytes::from(old.clone()), WriteFlags::default())
        .await
        .unwrap();
    a.flush().await.unwrap();
    // A copy of member 1 as it is now: later it will be an out-of-date duplicate.
    let snapshot = Arc::new(MemDev::new(MEMBER / 512, 512));
    let img = fs[1].read(0, MEMBER as usize).await.unwrap();
    snapshot.write(0, img, WriteFlags::default()).await.unwrap();
    // Member 2 dies; the array goes on and writes new data.
    fs[2].fail_device();
    let new = pattern(2, 2 << 20);
    a.write(0, Bytes::from(new.clone()), WriteFlags::default())
        .await
        .unwrap();
    a.stop().await.unwrap();
    drop(a);
    fs[2].heal();
    let mut c = cands(&fs, &[3, 2, 1, 0]);
    c.push(Device::new("copy-of-d1", snapshot as SharedBlockDev));
    let asm = assemble(c, &AssembleOptions::default()).await;
    assert_eq!(asm.arrays.len(), 1, "{asm:?}");
    let reasons: Vec<(&str, &RejectReason)> = asm
        .rejected
        .iter()
        .map(|r| (r.label.as_str(), &r.reason))
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons
        .iter()
        .any(|(l, r)| *l == "d2" && matches!(r, RejectReason::Stale { .. })));
    assert!(reasons
        .iter()
        .any(|(l, r)| *l == "copy-of-d1" && matches!(r, RejectReason::Duplicate { .. })));
    let a = asm.arrays[0].clone();
    assert_eq!(
        diff(&a.read(0, 2 << 20).await.unwrap(), &new),
        None,
        "stale data served"
    );
    assert_eq!(format!("{:?}", a.status().state), "Degraded");
    a.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blank_corrupt_and_too_few() {
    let fs = fault_members(4, MEMBER, false);
    let a = make(Level::Raid5, 65536, &fs).await;
    a.stop().await.unwrap();
    drop(a);
    // Corrupt both superblock slots of member 3.
    for off in [0u64, 4096] {
        let mut b = fs[3].read(off, 4096).await.unwrap().to_vec();
        b[200] ^= 0xff;
        fs[3]
            .write(off, Bytes::from(b), WriteFlags::default())
            .await
            .unwrap();
    }
    let blank = Arc::new(MemDev::new(MEMBER / 512, 512)) as SharedBlockDev;
    let mut c = cands(&fs, &[0, 3]);
    c.push(Device::new("blank", blank));
    let asm = assemble(c, &AssembleOptions::default()).await;
    assert!(asm.arrays.is_empty());
    assert_eq!(asm.not_started.len(), 1, "{asm:?}");
    let msg = asm.not_started[0].2.to_string();
    assert!(msg.contains("cannot start"), "{msg}");
    let reasons: Vec<&RejectReason> = asm.rejected.iter().map(|r| &r.reason).collect();
    assert!(reasons.contains(&&RejectReason::NoSuperblock));
    assert!(reasons
        .iter()
        .any(|r| matches!(r, RejectReason::Corrupt(_))));
    // Creating over a member without force is refused.
    let again = Array::create(
        ArrayConfig::new("x", Level::Raid1),
        devices(&fs[..2]),
        vec![],
    )
    .await;
    assert!(
        matches!(again, Err(basalt_raid::RaidError::InUse { .. })),
        "{again:?}"
    );
}

/// A rebuild interrupted by a restart resumes from its checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_resumes_after_restart() {
    let fs = fault_members(5, MEMBER, false);
    let a = Array::create(
        ArrayConfig::new("r", Level::Raid5).chunk(16384),
        devices(&fs[..4]),
        devices(&fs[4..]),
    )
    .await
    .unwrap();
    let cap = a.geometry().capacity_bytes() as usize;
    let data = pattern(9, cap);
    a.write(0, Bytes::from(data.clone()), WriteFlags::default())
        .await
        .unwrap();
    a.set_rate_limit(Some(16 << 20));
    fs[1].fail_device();
    a.fail_member(1).await.unwrap();
    // Wait for the rebuild to pass a checkpoint (saved every second).
    let mut seen = 0;
    for _ in 0..400 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if let Some(m) = a.status().members.get(1) {
            seen = m.rebuilt_bytes.unwrap_or(0);
        }
        if a.jobs()
            .first()
            .is_some_and(|j| j.kind == JobKind::Rebuild && j.done_bytes > 20 << 20)
        {
            break;
        }
    }
    assert!(seen > 0, "rebuild did not start");
    // Restart without a clean stop (the process dies).
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asm = assemble(cands(&fs, &[4, 0, 2, 3, 1]), &AssembleOptions::default()).await;
    let a = asm
        .arrays
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("{asm:?}"));
    let resumed_at = a.status().members[1].rebuilt_bytes.unwrap_or(0);
    assert!(
        resumed_at > 0,
        "rebuild restarted from 0: {}",
        a.status().md_text()
    );
    a.wait_idle().await;
    let st = a.status();
    assert!(
        st.members.iter().all(|m| m.state == RoleState::InSync),
        "{}",
        st.md_text()
    );
    let first = &a.jobs()[0];
    assert_eq!(first.kind, JobKind::Rebuild);
    // The resumed run started past zero.
    fs[0].fail_device();
    assert_eq!(
        diff(&read_all(&*a).await, &data),
        None,
        "data after resumed rebuild"
    );
    drop(a);
}

/// A member that answers nothing (a hung disk) is timed out and failed; the array
/// serves from redundancy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_member_times_out() {
    let fs = fault_members(3, MEMBER, false);
    let mut cfg = ArrayConfig::new("h", Level::Raid5);
    cfg.io_timeout = Duration::from_millis(200);
    let a = Array::create(cfg, devices(&fs), vec![]).await.unwrap();
    let data = pattern(3, 1 << 20);
    a.write(0, Bytes::from(data.clone()), WriteFlags::default())
        .await
        .unwrap();
    fs[0].set_latency(FaultOp::Any, Duration::from_secs(3600));
    let t = std::time::Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(10), a.read(0, 1 << 20))
        .await
        .expect("hung read")
        .unwrap();
    assert_eq!(diff(&got, &data), None);
    tokio::time::timeout(
        Duration::from_secs(10),
        a.write(0, Bytes::from(data.clone()), WriteFlags::default()),
    )
    .await
    .expect("hung write")
    .unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(a.status().members[0].state, RoleState::Faulty);
    // Beyond tolerance: clear errors, never wrong data.
    fs[1].fail_device();
    let r = tokio::time::timeout(Duration::from_secs(10), a.read(0, 4096))
        .await
        .expect("hung read 2");
    assert!(
        matches!(r, Err(basalt_blockdev::BlockError::Offline(ref m)) if m.contains("failed")),
        "{r:?}"
    );
    assert!(a
        .write(0, Bytes::from(vec![1u8; 4096]), WriteFlags::default())
        .await
        .is_err());
}

/// Checksums survive a restart: a scrub after reassembly finds nothing wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksums_persist_across_restart() {
    for level in [Level::Raid1, Level::Raid10, Level::Raid5] {
        let fs = fault_members(members_for(level), MEMBER, true);
        let a = make(level, 8192, &fs).await;
        let cap = a.geometry().capacity_bytes() as usize;
        a.write(0, Bytes::from(pattern(4, cap)), WriteFlags::default())
            .await
            .unwrap();
        for i in 0..50u64 {
            a.write(
                i * 40960 % (cap as u64 - 8192),
                Bytes::from(pattern(i, 8192)),
                WriteFlags::default(),
            )
            .await
            .unwrap();
        }
        a.flush().await.unwrap();
        // Crash without a clean stop: the journal replays and rewrites checksums.
        drop(a);
        for f in &fs {
            f.crash();
            f.recover().await;
        }
        let n = fs.len();
        let asm = assemble(
            cands(&fs, &(0..n).rev().collect::<Vec<_>>()),
            &AssembleOptions::default(),
        )
        .await;
        let a = asm.arrays[0].clone();
        a.start_scrub(false).await.unwrap();
        a.wait_idle().await;
        let r = a.jobs()[0].report.clone().unwrap();
        assert_eq!((r.mismatches, r.unverifiable), (0, 0), "{level}: {r:?}");
        a.stop().await.unwrap();
    }
}
