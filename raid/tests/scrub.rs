//! Bit rot on members, then scrub: every flipped block is found, the member holding it
//! is named, and repair restores it (RAID 1/10/5 by their block checksums, RAID6 by its
//! two syndromes).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use basalt_blockdev::{BlockDev, WriteFlags};
use basalt_raid::{examine, Level};
use bytes::Bytes;
use common::*;
use std::collections::HashSet;

async fn rot_and_scrub(level: Level, flips: usize, seed: u64) {
    let n = members_for(level);
    let fs = fault_members(n, 8 << 20, false);
    let chunk = 16384u64;
    let a = make(level, chunk as u32, &fs).await;
    let cap = a.geometry().capacity_bytes();
    let data = pattern(seed, cap as usize);
    a.write(0, Bytes::from(data.clone()), WriteFlags::default())
        .await
        .unwrap();
    a.flush().await.unwrap();
    let layout = a.layout();
    let meta = examine(&(fs[0].clone() as basalt_blockdev::SharedBlockDev))
        .await
        .unwrap()
        .meta;
    // Distinct rows (stripe, block in chunk), one random member each.
    let rows_per_chunk = chunk / 4096;
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut used = HashSet::new();
    let mut expect_by_role = vec![0u64; n];
    let mut originals = Vec::new();
    while used.len() < flips {
        let s = next() % layout.stripes;
        let row = next() % rows_per_chunk;
        if !used.insert((s, row)) {
            continue;
        }
        let role = (next() % n as u64) as usize;
        let off = meta.data_offset + s * chunk + row * 4096;
        let inner = fs[role].inner();
        let orig = inner.read(off, 4096).await.unwrap();
        let mut bad = orig.to_vec();
        let at = (next() % 4096) as usize;
        bad[at] ^= 1 << (next() % 8);
        inner
            .write(off, Bytes::from(bad), WriteFlags::default())
            .await
            .unwrap();
        expect_by_role[role] += 1;
        originals.push((role, off, orig));
    }
    a.start_scrub(false).await.unwrap();
    a.wait_idle().await;
    let jobs = a.jobs();
    let check = jobs[0].report.clone().expect("report");
    assert_eq!(
        check.mismatches, flips as u64,
        "{level}: check found {check:?}"
    );
    assert_eq!(
        check.bad_blocks_by_role, expect_by_role,
        "{level}: members named"
    );
    assert_eq!(check.repaired, 0);
    a.start_scrub(true).await.unwrap();
    a.wait_idle().await;
    let rep = a.jobs()[0].report.clone().expect("report");
    assert_eq!(rep.repaired, flips as u64, "{level}: repair {rep:?}");
    assert_eq!(rep.bad_blocks_by_role, expect_by_role);
    assert_eq!(rep.uncorrectable, 0);
    for (role, off, orig) in originals {
        let now = fs[role].inner().read(off, 4096).await.unwrap();
        assert_eq!(now, orig, "{level}: member {role} at {off} not repaired");
    }
    a.start_scrub(false).await.unwrap();
    a.wait_idle().await;
    let again = a.jobs()[0].report.clone().expect("report");
    assert_eq!(again.mismatches, 0, "{level}: after repair {again:?}");
    let got = read_all(&*a).await;
    assert_eq!(diff(&got, &data), None);
    println!(
        "{level}: {} flips found, named and repaired; status:\n{}",
        flips,
        a.status().md_text()
    );
    a.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid1_bitrot() {
    rot_and_scrub(Level::Raid1, 40, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid10_bitrot() {
    rot_and_scrub(Level::Raid10, 40, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid5_bitrot() {
    rot_and_scrub(Level::Raid5, 40, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid6_bitrot() {
    rot_and_scrub(Level::Raid6, 40, 4).await;
}
