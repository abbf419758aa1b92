//! Read errors on members (bad sectors): served from redundancy, rewritten on the
//! member and read back (md's `fix_read_error`), the member kept in sync; a failed
//! rewrite or too many errors fail the member; without redundancy the read fails and the
//! member stays.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use basalt_blockdev::fault::{ErrorRule, FaultDev, FaultOp};
use basalt_blockdev::{BlockDev, BlockError, SharedBlockDev, WriteFlags};
use basalt_raid::{examine, Array, ArrayConfig, Device, Level, RoleState};
use bytes::Bytes;
use common::*;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

const CHUNK: u64 = 16384;
const SIZE: u64 = 8 << 20;

struct Fixture {
    fs: Vec<Arc<FaultDev>>,
    a: Arc<Array>,
    data: Vec<u8>,
    data_offset: u64,
}

async fn fixture_with(level: Level, cfg: impl FnOnce(ArrayConfig) -> ArrayConfig) -> Fixture {
    let fs = fault_members(members_for(level), SIZE, false);
    let devs = devices(&fs);
    fixture_over(level, cfg, fs, devs).await
}

/// An array over `devs` (devices over the fault members `fs`, possibly wrapped),
/// filled with a pattern.
async fn fixture_over(
    level: Level,
    cfg: impl FnOnce(ArrayConfig) -> ArrayConfig,
    fs: Vec<Arc<FaultDev>>,
    devs: Vec<Device>,
) -> Fixture {
    let a = Array::create(
        cfg(ArrayConfig::new("t", level).chunk(CHUNK as u32)),
        devs,
        vec![],
    )
    .await
    .expect("create");
    let cap = a.geometry().capacity_bytes();
    let data = pattern(level.number() as u64 + 11, cap as usize);
    a.write(0, Bytes::from(data.clone()), WriteFlags::default())
        .await
        .unwrap();
    a.flush().await.unwrap();
    let data_offset = examine(&(fs[0].clone() as SharedBlockDev))
        .await
        .unwrap()
        .meta
        .data_offset;
    Fixture {
        fs,
        a,
        data,
        data_offset,
    }
}

async fn fixture(level: Level) -> Fixture {
    fixture_with(level, |c| c).await
}

impl Fixture {
    /// The role a foreground read of data column `c` of stripe `s` goes to with every
    /// member in sync, and the array offset of that column.
    fn reader(&self, s: u64, c: usize) -> (usize, u64) {
        let l = self.a.layout();
        let col = &l.stripe_map(s).columns[c];
        let role = col[(s as usize + c) % col.len()];
        (role, s * l.stripe_bytes() + c as u64 * l.chunk)
    }

    /// Member offset of block `blk` of stripe `s`'s chunk.
    fn member_off(&self, s: u64, blk: u64) -> u64 {
        self.data_offset + s * CHUNK + blk * 4096
    }

    /// After a write of `new` at array offset `at` raced a repair of member `victim`
    /// (member offset `off`): the array reads it back, and the repaired member holds it.
    async fn newer_data_everywhere(
        &self,
        level: Level,
        victim: usize,
        at: u64,
        off: u64,
        new: &[u8],
    ) {
        let back = self.a.read(at, 4096).await.unwrap();
        assert_eq!(diff(&back[..], new), None, "{level}: read after the write");
        let raw = self.fs[victim].read(off, 4096).await.unwrap();
        assert_eq!(
            diff(&raw[..], new),
            None,
            "{level}: the repaired member holds the new data"
        );
    }

    /// A bad sector, until rewritten, under the first row of stripe `s` on the member
    /// that serves it: (that member, the row's array offset, its member offset, the
    /// member's status before).
    fn bad_sector_until_rewritten(&self, s: u64) -> (usize, u64, u64, basalt_raid::MemberStatus) {
        let (victim, at) = self.reader(s, 0);
        let off = self.member_off(s, 0);
        self.fs[victim].add_rule(
            ErrorRule::new(FaultOp::Read)
                .range(off..off + 4096)
                .until_rewritten(),
        );
        (victim, at, off, self.member(victim))
    }

    /// After reads of the 4 KiB at `at` met the bad sector: each returned the right
    /// data, and the sector counted once (member errors, read error window,
    /// corrections), the member still in sync. Then the array is checked and stopped.
    async fn counted_once(
        &self,
        level: Level,
        victim: usize,
        before: &basalt_raid::MemberStatus,
        at: u64,
        reads: [&Bytes; 2],
    ) {
        let want = &self.data[at as usize..at as usize + 4096];
        for (i, r) in reads.iter().enumerate() {
            assert_eq!(diff(&r[..], want), None, "{level}: read {i}");
        }
        let m = self.member(victim);
        assert_eq!(m.state, RoleState::InSync, "{level}");
        assert_eq!(m.errors - before.errors, 1, "{level}: errors");
        assert_eq!(
            m.recent_read_errors - before.recent_read_errors,
            1,
            "{level}: read error window"
        );
        assert_eq!(m.read_errors_corrected, 1, "{level}: corrections");
        self.check_all(&format!("{level}")).await;
        self.a.stop().await.unwrap();
    }

    fn member(&self, role: usize) -> basalt_raid::MemberStatus {
        self.a.status().members[role].clone()
    }

    /// Fails member `gone`, gives `victim` a bad block (block 1 of stripe `s`'s chunk,
    /// healed by rewriting), and adds a spare (write cache off), which starts a rebuild. Returns the rule.
    async fn bad_sector_then_spare(
        &self,
        gone: usize,
        victim: usize,
        s: u64,
    ) -> basalt_blockdev::fault::RuleId {
        self.a.fail_member(gone).await.unwrap();
        let off = self.member_off(s, 1);
        let id = self.fs[victim].add_rule(
            ErrorRule::new(FaultOp::Read)
                .range(off..off + 4096)
                .until_rewritten(),
        );
        let spare = Arc::new(FaultDev::new(mem(SIZE)));
        spare.set_write_cache(false);
        self.a
            .add_spare(Device::new("spare", spare as SharedBlockDev))
            .await
            .unwrap();
        id
    }

    /// Runs a check-only scrub to its end and returns what it found.
    async fn scrub(&self) -> basalt_raid::ScrubReport {
        self.a.start_scrub(false).await.unwrap();
        self.a.wait_idle().await;
        self.a.jobs()[0].report.clone().expect("report")
    }

    fn all_in_sync(&self) -> bool {
        self.a
            .status()
            .members
            .iter()
            .all(|m| m.state == RoleState::InSync)
    }

    async fn check_all(&self, what: &str) {
        let got = read_all(&*self.a).await;
        assert_eq!(diff(&got, &self.data), None, "{what}: contents differ");
    }
}

/// A bad range (2 blocks, healed by rewriting: a remapping sector) on the member a read
/// goes to: the read returns the right data, the member stays in sync, the range was
/// rewritten, the counters moved; a scrub then finds nothing.
async fn bad_range_corrected(level: Level) {
    let f = fixture(level).await;
    let s = 5;
    let (victim, at) = f.reader(s, 0);
    let off = f.member_off(s, 1);
    let rule = f.fs[victim].add_rule(
        ErrorRule::new(FaultOp::Read)
            .range(off..off + 2 * 4096)
            .until_rewritten(),
    );
    let got = f.a.read(at, CHUNK as usize).await.expect("read");
    assert_eq!(
        diff(&got, &f.data[at as usize..(at + CHUNK) as usize]),
        None,
        "{level}: read over the bad range"
    );
    assert_eq!(
        f.fs[victim].injected_errors(),
        1,
        "{level}: the bad range was read"
    );
    assert!(
        !f.fs[victim].remove_rule(rule),
        "{level}: the range was rewritten"
    );
    let m = f.member(victim);
    assert_eq!(m.state, RoleState::InSync, "{level}");
    assert_eq!(m.read_errors_corrected, 1, "{level}");
    assert_eq!(m.recent_read_errors, 1, "{level}");
    assert!(m.errors >= 1);
    assert_eq!(f.a.metrics().read_errors_corrected_total, 1);
    // The member holds the right rows again, read straight from it.
    let raw = f.fs[victim].read(off, 2 * 4096).await.unwrap();
    let expect = &f.data[(at + 4096) as usize..(at + 3 * 4096) as usize];
    assert_eq!(diff(&raw, expect), None, "{level}: member rows");
    f.check_all(&format!("{level}")).await;
    let rep = f.scrub().await;
    assert_eq!(rep.mismatches, 0, "{level}: scrub after correction {rep:?}");
    assert_eq!(
        f.a.metrics().read_errors_corrected_total,
        1,
        "{level}: nothing new"
    );
    assert!(f.all_in_sync());
    f.a.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid1_bad_range_corrected() {
    bad_range_corrected(Level::Raid1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid10_bad_range_corrected() {
    bad_range_corrected(Level::Raid10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid5_bad_range_corrected() {
    bad_range_corrected(Level::Raid5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid6_bad_range_corrected() {
    bad_range_corrected(Level::Raid6).await;
}

/// A bad block read by a partial-stripe write (reconstruct-write reads the columns it
/// does not write) is corrected too, under the write's own stripe lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid5_bad_block_under_a_partial_write() {
    let mut f = fixture(Level::Raid5).await;
    let s = 3;
    let map = f.a.layout().stripe_map(s);
    // 4 members, 3 data columns: writing one column reads the other two.
    let p = map.columns[1][0];
    let off = f.member_off(s, 0);
    f.fs[p].add_rule(
        ErrorRule::new(FaultOp::Read)
            .range(off..off + 4096)
            .until_rewritten(),
    );
    // One block of column 0.
    let at = s * f.a.layout().stripe_bytes();
    let new = pattern(99, 4096);
    f.a.write(at, Bytes::from(new.clone()), WriteFlags::default())
        .await
        .unwrap();
    f.data[at as usize..at as usize + 4096].copy_from_slice(&new);
    assert_eq!(f.fs[p].injected_errors(), 1, "column 1 was read");
    assert_eq!(f.member(p).state, RoleState::InSync);
    assert_eq!(f.member(p).read_errors_corrected, 1);
    f.check_all("after the write").await;
    let rep = f.scrub().await;
    assert_eq!(rep.mismatches, 0, "{rep:?}");
    f.a.stop().await.unwrap();
}

/// The rewrite fails (a write error on the range) or the read-back fails (the sector
/// stays bad): the member is failed; the caller still gets the right data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_rewrite_fails_the_member() {
    for level in [Level::Raid1, Level::Raid10, Level::Raid5, Level::Raid6] {
        for write_fails in [true, false] {
            let f = fixture(level).await;
            let s = 2;
            let (victim, at) = f.reader(s, 0);
            let off = f.member_off(s, 0);
            // Not healed by writing: the read-back fails.
            f.fs[victim].add_rule(ErrorRule::new(FaultOp::Read).range(off..off + 4096));
            if write_fails {
                f.fs[victim].add_rule(ErrorRule::new(FaultOp::Write).range(off..off + 4096));
            }
            let got = f.a.read(at, 4096).await.expect("read");
            assert_eq!(
                diff(&got[..], &f.data[at as usize..at as usize + 4096]),
                None,
                "{level}"
            );
            let m = f.member(victim);
            assert_eq!(
                m.state,
                RoleState::Faulty,
                "{level} write_fails={write_fails}"
            );
            assert_eq!(m.read_errors_corrected, 0);
            assert_eq!(f.a.metrics().read_errors_corrected_total, 0);
            f.check_all(&format!("{level} degraded")).await;
            f.a.stop().await.unwrap();
        }
    }
}

/// More than `max_read_errors` within the window fail the member; with the window
/// decaying faster than the errors come, the member stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_error_threshold() {
    for level in [Level::Raid1, Level::Raid5] {
        let f = fixture_with(level, |c| c.read_errors(3, Duration::from_secs(3600))).await;
        let n = f.fs.len();
        // Stripes the same role is read from.
        let (victim, _) = f.reader(0, 0);
        let stripes: Vec<u64> = (0..200)
            .filter(|&s| f.reader(s, 0).0 == victim)
            .take(4)
            .collect();
        assert_eq!(stripes.len(), 4);
        for (i, &s) in stripes.iter().enumerate() {
            let off = f.member_off(s, 0);
            f.fs[victim].add_rule(
                ErrorRule::new(FaultOp::Read)
                    .range(off..off + 4096)
                    .until_rewritten(),
            );
            let at = f.reader(s, 0).1;
            let got = f.a.read(at, 4096).await.expect("read");
            assert_eq!(
                diff(&got[..], &f.data[at as usize..at as usize + 4096]),
                None
            );
            let m = f.member(victim);
            if i < 3 {
                assert_eq!(m.state, RoleState::InSync, "{level}: error {}", i + 1);
                assert_eq!(m.read_errors_corrected, i as u64 + 1);
            } else {
                assert_eq!(m.state, RoleState::Faulty, "{level}: 4th error, limit 3");
            }
        }
        assert_eq!(
            f.a.status()
                .members
                .iter()
                .filter(|m| m.state == RoleState::InSync)
                .count(),
            n - 1
        );
        f.check_all(&format!("{level}")).await;
        f.a.stop().await.unwrap();
    }

    // Decay: the count halves every 40 ms; errors 100 ms apart never pile up.
    let f = fixture_with(Level::Raid1, |c| {
        c.read_errors(1, Duration::from_millis(40))
    })
    .await;
    let (victim, _) = f.reader(0, 0);
    let stripes: Vec<u64> = (0..200)
        .filter(|&s| f.reader(s, 0).0 == victim)
        .take(5)
        .collect();
    for &s in &stripes {
        let off = f.member_off(s, 0);
        f.fs[victim].add_rule(
            ErrorRule::new(FaultOp::Read)
                .range(off..off + 4096)
                .until_rewritten(),
        );
        let at = f.reader(s, 0).1;
        f.a.read(at, 4096).await.expect("read");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = f.member(victim);
    assert_eq!(m.state, RoleState::InSync);
    assert_eq!(m.read_errors_corrected, 5);
    assert_eq!(m.recent_read_errors, 0, "decayed");
    f.a.stop().await.unwrap();
}

/// RAID6 with one member gone and a bad sector on another: P and Q still cover both;
/// the data is right and the bad sector is rewritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid6_failed_member_plus_bad_sector() {
    for s in [1u64, 4, 7] {
        let f = fixture(Level::Raid6).await;
        let map = f.a.layout().stripe_map(s);
        // Fail the first data column's member, put a bad sector on the second's.
        let gone = map.columns[0][0];
        let victim = map.columns[1][0];
        f.a.fail_member(gone).await.unwrap();
        let off = f.member_off(s, 2);
        f.fs[victim].add_rule(
            ErrorRule::new(FaultOp::Read)
                .range(off..off + 4096)
                .until_rewritten(),
        );
        let at = s * f.a.layout().stripe_bytes();
        let len = f.a.layout().stripe_bytes() as usize;
        let got = f.a.read(at, len).await.expect("read");
        assert_eq!(
            diff(&got, &f.data[at as usize..at as usize + len]),
            None,
            "stripe {s}"
        );
        // Two pieces of the read need the sector (its own column, and the gone column
        // rebuilt from it). Each correction runs as its own task, so the second piece may
        // read the sector before the first's rewrite lands; it then waits for that
        // correction and reads again: the sector is corrected and counted once.
        let injected = f.fs[victim].injected_errors();
        assert!(
            (1..=2).contains(&injected),
            "stripe {s}: bad sector read {injected} times"
        );
        assert_eq!(f.member(victim).state, RoleState::InSync);
        assert_eq!(f.member(victim).read_errors_corrected, 1);
        assert_eq!(f.member(victim).recent_read_errors, 1);
        assert_eq!(f.member(gone).state, RoleState::Faulty);
        f.check_all("raid6 degraded").await;
        f.a.stop().await.unwrap();
    }
}

fn is_io(r: &Result<Bytes, BlockError>) -> bool {
    matches!(r, Err(BlockError::Io { .. }))
}

/// No redundancy for the rows (RAID0; RAID5 with a member gone): the read fails with an
/// I/O error, never wrong data; the member is not failed for one bad sector and the rest
/// of the array reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_redundancy_returns_the_error() {
    let f = fixture(Level::Raid0).await;
    let s = 3;
    let (victim, at) = f.reader(s, 1);
    let off = f.member_off(s, 0);
    f.fs[victim].add_rule(ErrorRule::new(FaultOp::Read).range(off..off + 4096));
    let r = f.a.read(at, 8192).await;
    assert!(is_io(&r), "raid0: {r:?}");
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("unrecoverable read error"), "{msg}");
    assert!(msg.contains(&format!("d{victim}")), "{msg}");
    let st = f.a.status();
    assert!(
        st.members.iter().all(|m| m.state == RoleState::InSync),
        "{}",
        st.md_text()
    );
    assert!(st.failed_reason.is_none());
    assert!(st.members[victim].errors >= 1);
    // Everything else reads; once the sector is fixed, it reads too.
    let other = f.a.read(at + 8192, 8192).await.unwrap();
    assert_eq!(
        diff(&other[..], &f.data[at as usize + 8192..at as usize + 16384]),
        None
    );
    f.fs[victim].clear_rules();
    f.check_all("raid0").await;
    f.a.stop().await.unwrap();

    let f = fixture(Level::Raid5).await;
    let s = 6;
    let map = f.a.layout().stripe_map(s);
    let (gone, victim) = (map.columns[0][0], map.columns[1][0]);
    f.a.fail_member(gone).await.unwrap();
    let off = f.member_off(s, 0);
    f.fs[victim].add_rule(
        ErrorRule::new(FaultOp::Read)
            .range(off..off + 4096)
            .until_rewritten(),
    );
    let at = s * f.a.layout().stripe_bytes();
    // Column 0 (gone) needs column 1's block to be rebuilt; column 1 itself is bad.
    for (what, a_at) in [
        ("rebuild of the gone column", at),
        ("bad column", at + CHUNK),
    ] {
        let r = f.a.read(a_at, 4096).await;
        assert!(is_io(&r), "raid5 degraded, {what}: {r:?}");
    }
    let st = f.a.status();
    assert_eq!(
        st.members[victim].state,
        RoleState::InSync,
        "{}",
        st.md_text()
    );
    assert!(st.failed_reason.is_none());
    // Other rows of the stripe read (and rebuild) fine.
    let got = f.a.read(at + 4096, 4096).await.unwrap();
    assert_eq!(
        diff(&got[..], &f.data[at as usize + 4096..at as usize + 8192]),
        None
    );
    // A full-stripe write needs no read and remaps the sector.
    let sb = f.a.layout().stripe_bytes() as usize;
    let new = pattern(5, sb);
    f.a.write(at, Bytes::from(new.clone()), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(diff(&f.a.read(at, sb).await.unwrap(), &new), None);
    f.a.stop().await.unwrap();
}

/// A write to the stripe while a read corrects an error there waits for the correction
/// (stripe lock): the correction never puts the older data back over the newer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_write_during_repair_keeps_the_newer_data() {
    for level in [Level::Raid1, Level::Raid5] {
        let f = fixture(level).await;
        let s = 4;
        let (victim, at, off, _) = f.bad_sector_until_rewritten(s);
        // Slow every other member's reads: the reconstruction takes 300 ms, and the
        // write comes in meanwhile.
        for (r, d) in f.fs.iter().enumerate() {
            if r != victim {
                d.set_latency(FaultOp::Read, Duration::from_millis(300));
            }
        }
        let reader = {
            let a = f.a.clone();
            tokio::spawn(async move { a.read(at, 4096).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let new = pattern(77, 4096);
        let writer = {
            let a = f.a.clone();
            let new = Bytes::from(new.clone());
            tokio::spawn(async move { a.write(at, new, WriteFlags::default()).await })
        };
        let got = reader.await.unwrap().expect("read");
        writer.await.unwrap().expect("write");
        for d in &f.fs {
            d.set_latency(FaultOp::Read, Duration::ZERO);
        }
        // The read saw the stripe before the write, whole.
        assert_eq!(
            diff(&got[..], &f.data[at as usize..at as usize + 4096]),
            None,
            "{level}"
        );
        assert_eq!(f.member(victim).read_errors_corrected, 1, "{level}");
        // The newer data is on the member that was repaired, and everywhere else.
        f.newer_data_everywhere(level, victim, at, off, &new).await;
        let rep = f.scrub().await;
        assert_eq!(rep.mismatches, 0, "{level}: {rep:?}");
        assert!(f.all_in_sync());
        f.a.stop().await.unwrap();
    }
}

/// A scrub (check only) that meets an unreadable block rewrites it from redundancy, on
/// data and parity members alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_corrects_unreadable_blocks() {
    for level in [Level::Raid1, Level::Raid10, Level::Raid5, Level::Raid6] {
        let f = fixture(level).await;
        let n = f.fs.len();
        let mut rules = Vec::new();
        for role in 0..n {
            let s = 2 * role as u64 + 1;
            let off = f.member_off(s, 3);
            rules.push(
                f.fs[role].add_rule(
                    ErrorRule::new(FaultOp::Read)
                        .range(off..off + 4096)
                        .until_rewritten(),
                ),
            );
        }
        let rep = f.scrub().await;
        assert_eq!(rep.mismatches, 0, "{level}: {rep:?}");
        assert_eq!(rep.uncorrectable, 0, "{level}: {rep:?}");
        for (role, id) in rules.into_iter().enumerate() {
            assert!(
                !f.fs[role].remove_rule(id),
                "{level}: role {role} rewritten"
            );
            let m = f.member(role);
            assert_eq!(m.state, RoleState::InSync, "{level}");
            assert_eq!(m.read_errors_corrected, 1, "{level} role {role}");
        }
        assert_eq!(f.a.metrics().read_errors_corrected_total, n as u64);
        f.check_all(&format!("{level}")).await;
        f.a.stop().await.unwrap();
    }
}

/// A rebuild that meets a bad sector on a survivor corrects it when redundancy is left
/// (RAID6 rebuilding one member) and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_corrects_a_bad_sector_on_a_survivor() {
    let f = fixture(Level::Raid6).await;
    let id = f.bad_sector_then_spare(0, 2, 9).await;
    f.a.wait_idle().await;
    let st = f.a.status();
    assert!(
        st.members.iter().all(|m| m.state == RoleState::InSync),
        "{}",
        st.md_text()
    );
    assert!(!f.fs[2].remove_rule(id), "rewritten");
    assert_eq!(st.members[2].read_errors_corrected, 1);
    f.check_all("after rebuild").await;
    let rep = f.scrub().await;
    assert_eq!(rep.mismatches, 0, "{rep:?}");
    f.a.stop().await.unwrap();
}

/// A bad sector plus silent corruption of another block of the same row: the rebuilt
/// rows would be wrong. RAID5 catches it with the bad member's checksums, RAID6 with
/// its second syndrome; the read fails rather than return wrong data, and nothing is
/// rewritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilt_rows_are_verified() {
    for level in [Level::Raid5, Level::Raid6] {
        let f = fixture(level).await;
        let s = 2;
        let map = f.a.layout().stripe_map(s);
        let (victim, rotten) = (map.columns[0][0], map.columns[1][0]);
        let off = f.member_off(s, 1);
        let inner = f.fs[rotten].inner();
        let mut blk = inner.read(off, 4096).await.unwrap().to_vec();
        blk[100] ^= 0x10;
        inner
            .write(off, Bytes::from(blk), WriteFlags::default())
            .await
            .unwrap();
        let id = f.fs[victim].add_rule(
            ErrorRule::new(FaultOp::Read)
                .range(off..off + 4096)
                .until_rewritten(),
        );
        let at = s * f.a.layout().stripe_bytes() + 4096;
        let r = f.a.read(at, 4096).await;
        assert!(is_io(&r), "{level}: {r:?}");
        assert!(f.fs[victim].remove_rule(id), "{level}: not rewritten");
        let st = f.a.status();
        assert!(
            st.members.iter().all(|m| m.state == RoleState::InSync),
            "{level}: {}",
            st.md_text()
        );
        assert_eq!(f.a.metrics().read_errors_corrected_total, 0);
        f.a.stop().await.unwrap();
    }
}

/// A member as the kernel serves it: a write, once issued, runs to the end even if its
/// issuer goes away (dropping an io_uring request's future does not cancel it). It can
/// hold back the next write overlapping a range until the test releases it, and hold
/// the answer of the next read overlapping a range (the read itself done) likewise.
struct Submitted {
    inner: Arc<FaultDev>,
    armed: Mutex<Option<(Range<u64>, Held)>>,
    armed_read: Mutex<Option<(Range<u64>, Held)>>,
}

/// The test's side of a held write.
struct HoldHandle {
    /// Fires when the held write is issued.
    issued: oneshot::Receiver<()>,
    /// Lets the held write go on to the device.
    release: oneshot::Sender<()>,
    /// Fires when the held write has reached the device.
    done: oneshot::Receiver<()>,
}

struct Held {
    issued: oneshot::Sender<()>,
    release: oneshot::Receiver<()>,
    done: oneshot::Sender<()>,
}

impl Submitted {
    fn new(inner: Arc<FaultDev>) -> Self {
        Submitted {
            inner,
            armed: Mutex::new(None),
            armed_read: Mutex::new(None),
        }
    }

    fn hold_next_write(&self, range: Range<u64>) -> HoldHandle {
        Self::arm(&self.armed, range)
    }

    /// `issued` fires once the read is done on the device, `done` once its answer
    /// went back.
    fn hold_next_read(&self, range: Range<u64>) -> HoldHandle {
        Self::arm(&self.armed_read, range)
    }

    fn arm(slot: &Mutex<Option<(Range<u64>, Held)>>, range: Range<u64>) -> HoldHandle {
        let (issued_tx, issued) = oneshot::channel();
        let (release, release_rx) = oneshot::channel();
        let (done_tx, done) = oneshot::channel();
        *slot.lock().unwrap() = Some((
            range,
            Held {
                issued: issued_tx,
                release: release_rx,
                done: done_tx,
            },
        ));
        HoldHandle {
            issued,
            release,
            done,
        }
    }

    fn take(slot: &Mutex<Option<(Range<u64>, Held)>>, offset: u64, len: usize) -> Option<Held> {
        let mut armed = slot.lock().unwrap();
        match &*armed {
            Some((r, _)) if r.start < offset + len as u64 && offset < r.end => {
                armed.take().map(|(_, h)| h)
            }
            _ => None,
        }
    }
}

/// An array over [`Submitted`] members (write cache off), filled with a pattern.
async fn submitted_fixture(level: Level) -> (Fixture, Vec<Arc<Submitted>>) {
    let fs = fault_members(members_for(level), SIZE, false);
    let subs: Vec<Arc<Submitted>> = fs
        .iter()
        .map(|f| Arc::new(Submitted::new(f.clone())))
        .collect();
    let devs = subs
        .iter()
        .enumerate()
        .map(|(i, d)| Device::new(format!("d{i}"), d.clone() as SharedBlockDev))
        .collect();
    let f = fixture_over(level, |c| c, fs, devs).await;
    f.a.wait_idle().await;
    (f, subs)
}

#[async_trait::async_trait]
impl BlockDev for Submitted {
    fn geometry(&self) -> basalt_blockdev::Geometry {
        self.inner.geometry()
    }
    async fn read(&self, offset: u64, len: usize) -> basalt_blockdev::Result<Bytes> {
        let held = Self::take(&self.armed_read, offset, len);
        let r = self.inner.read(offset, len).await;
        if let Some(h) = held {
            let _ = h.issued.send(());
            let _ = h.release.await;
            let _ = h.done.send(());
        }
        r
    }
    async fn write(
        &self,
        offset: u64,
        data: Bytes,
        flags: WriteFlags,
    ) -> basalt_blockdev::Result<()> {
        let held = Self::take(&self.armed, offset, data.len());
        let dev = self.inner.clone();
        tokio::spawn(async move {
            let Some(h) = held else {
                return dev.write(offset, data, flags).await;
            };
            let _ = h.issued.send(());
            let _ = h.release.await;
            let r = dev.write(offset, data, flags).await;
            let _ = h.done.send(());
            r
        })
        .await
        .unwrap()
    }
    async fn flush(&self) -> basalt_blockdev::Result<()> {
        self.inner.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> basalt_blockdev::Result<()> {
        self.inner.discard(offset, len).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: basalt_blockdev::ZeroFlags,
    ) -> basalt_blockdev::Result<()> {
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn compare_and_write(
        &self,
        offset: u64,
        compare: Bytes,
        data: Bytes,
        flags: WriteFlags,
    ) -> basalt_blockdev::Result<basalt_blockdev::CompareOutcome> {
        self.inner
            .compare_and_write(offset, compare, data, flags)
            .await
    }
}

/// A read that corrects a bad sector and is dropped (a killed connection, an aborted
/// task) while its rewrite is in flight: the correction runs on and keeps the stripe
/// locked until the rewrite is done, so a write to the same rows that comes next is not
/// overwritten by the older rebuilt rows.
///
/// The clock is paused on a single-threaded runtime: the safety timeout on the write
/// fires only once every task is blocked, so it tells "the write waits for the
/// correction" from "the write went through" without racing anything.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn dropped_read_keeps_the_stripe_locked_until_its_rewrite_is_done() {
    for level in [Level::Raid1, Level::Raid5] {
        let (f, subs) = submitted_fixture(level).await;

        let s = 4;

        let (victim, at, off, _) = f.bad_sector_until_rewritten(s);
        let mut held = subs[victim].hold_next_write(off..off + 4096);
        // The read meets the bad sector, rebuilds the rows and issues the rewrite; it is
        // dropped there.
        {
            let read = f.a.read(at, 4096);
            tokio::select! {
                r = read => panic!("{level}: the read finished with its rewrite held: {r:?}"),
                r = &mut held.issued => r.unwrap(),
            }
        }
        let new = pattern(77, 4096);
        let mut writer = {
            let a = f.a.clone();
            let new = Bytes::from(new.clone());
            tokio::spawn(async move { a.write(at, new, WriteFlags::default()).await })
        };
        let early = tokio::time::timeout(Duration::from_secs(5), &mut writer)
            .await
            .ok();
        let wrote_early = early.is_some();
        held.release.send(()).unwrap();
        held.done.await.unwrap();
        match early {
            Some(r) => r.unwrap().expect("write"),
            None => writer.await.unwrap().expect("write"),
        }

        // The newer data is what reads back, and what the repaired member holds.
        f.newer_data_everywhere(level, victim, at, off, &new).await;
        assert!(
            !wrote_early,
            "{level}: the write went through while the rewrite was in flight"
        );
        let m = f.member(victim);
        assert_eq!(m.state, RoleState::InSync, "{level}");
        assert_eq!(
            m.read_errors_corrected, 1,
            "{level}: the correction ran to the end"
        );
        let rep = f.scrub().await;
        assert_eq!(rep.mismatches, 0, "{level}: {rep:?}");
        assert_eq!(rep.uncorrectable, 0, "{level}: {rep:?}");
        assert!(f.all_in_sync());
        f.a.stop().await.unwrap();
    }
}

/// Two reads of the same bad rows at once: the second meets the bad sector while the
/// first's correction is in flight (its rewrite held back), waits for it and reads the
/// rewritten rows. The bad sector counts once (member errors, read error window,
/// corrections) and both reads return the right data. Clock paused as above: the
/// timeout tells "the second read waits" from "it corrected on its own".
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn concurrent_reads_of_a_bad_sector_count_it_once() {
    for level in [Level::Raid1, Level::Raid5] {
        let (f, subs) = submitted_fixture(level).await;
        let (victim, at, off, before) = f.bad_sector_until_rewritten(4);
        let mut held = subs[victim].hold_next_write(off..off + 4096);
        let read = || {
            let a = f.a.clone();
            tokio::spawn(async move { a.read(at, 4096).await })
        };
        let first = read();
        (&mut held.issued).await.unwrap();
        let mut second = read();
        let early = tokio::time::timeout(Duration::from_secs(5), &mut second)
            .await
            .ok();
        let second_waited = early.is_none();
        held.release.send(()).unwrap();
        let r1 = first.await.unwrap().expect("first read");
        let r2 = match early {
            Some(r) => r,
            None => second.await,
        }
        .unwrap()
        .expect("second read");
        assert!(second_waited, "{level}: the second read did not wait");
        f.counted_once(level, victim, &before, at, [&r1, &r2]).await;
    }
}

/// The same race the other way round: a read's member read fails, but its answer comes
/// back only after another read has corrected the rows and finished. The late failure
/// is old news: the rows are read again (now good), not counted a second time.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_read_failing_across_a_correction_does_not_count_it_again() {
    for level in [Level::Raid1, Level::Raid5] {
        let (f, subs) = submitted_fixture(level).await;
        let (victim, at, off, before) = f.bad_sector_until_rewritten(4);
        let mut held = subs[victim].hold_next_read(off..off + 4096);
        let late = {
            let a = f.a.clone();
            tokio::spawn(async move { a.read(at, 4096).await })
        };
        // Its member read has failed; the answer is held back.
        (&mut held.issued).await.unwrap();
        let want = &f.data[at as usize..at as usize + 4096];
        let r1 = f.a.read(at, 4096).await.expect("other read");
        assert_eq!(diff(&r1[..], want), None, "{level}: other read");
        assert_eq!(f.member(victim).read_errors_corrected, 1, "{level}");
        held.release.send(()).unwrap();
        let r2 = late.await.unwrap().expect("late read");
        f.counted_once(level, victim, &before, at, [&r1, &r2]).await;
    }
}

/// A correction of *other* rows that ends while a read's failure is on its way back
/// does not make that failure stale: the read corrects and counts its own bad sector
/// (it is not read again, which here would succeed, the sector failing only once, and
/// hide it). Two distinct bad sectors count twice.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_correction_of_other_rows_does_not_make_a_failure_stale() {
    for level in [Level::Raid1, Level::Raid5] {
        let (f, subs) = submitted_fixture(level).await;
        let (victim, at) = f.reader(4, 0);
        let off = f.member_off(4, 0);
        f.fs[victim].add_rule(ErrorRule::new(FaultOp::Read).range(off..off + 4096).once());
        let (other, other_at, _, _) = f.bad_sector_until_rewritten(6);
        let errors = |f: &Fixture| (0..f.fs.len()).map(|r| f.member(r).errors).sum::<u64>();
        let before = errors(&f);
        let mut held = subs[victim].hold_next_read(off..off + 4096);
        let late = {
            let a = f.a.clone();
            tokio::spawn(async move { a.read(at, 4096).await })
        };
        (&mut held.issued).await.unwrap();
        let r1 = f.a.read(other_at, 4096).await.expect("other rows");
        let want1 = &f.data[other_at as usize..other_at as usize + 4096];
        assert_eq!(diff(&r1[..], want1), None, "{level}: other rows");
        assert_eq!(f.member(other).read_errors_corrected, 1, "{level}");
        held.release.send(()).unwrap();
        let r2 = late.await.unwrap().expect("late read");
        let want2 = &f.data[at as usize..at as usize + 4096];
        assert_eq!(diff(&r2[..], want2), None, "{level}: late read");
        assert_eq!(errors(&f) - before, 2, "{level}: two bad sectors");
        assert_eq!(f.a.metrics().read_errors_corrected_total, 2, "{level}");
        f.check_all(&format!("{level}")).await;
        f.a.stop().await.unwrap();
    }
}

/// A rebuild that meets rows unreadable on the only member that could supply them (RAID5
/// with one member gone) stops there, as md does without a bad-block log: the member
/// with the bad sector stays in, the array runs degraded, the rebuilt member stays out of
/// sync with the stripes before the bad one rebuilt, reads of the rows fail with a medium
/// error, and the rebuild does not start over by itself. Once the rows are rewritten,
/// adding a device lets it finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_stops_at_an_unrebuildable_sector() {
    let mut f = fixture(Level::Raid5).await;
    f.a.wait_idle().await;
    let l = f.a.layout();
    let sb = l.stripe_bytes();
    let s = 9;
    let map = l.stripe_map(s);
    let (gone, victim) = (map.columns[0][0], map.columns[1][0]);
    f.bad_sector_then_spare(gone, victim, s).await;
    // Returns: the rebuild stopped and is not due again.
    f.a.wait_idle().await;

    let job = f.a.jobs()[0].clone();
    assert_eq!(job.kind, basalt_raid::JobKind::Rebuild);
    assert_eq!(job.state, basalt_raid::JobState::Failed, "{job:?}");
    let msg = job.message.clone().unwrap_or_default();
    assert!(msg.contains(&format!("stopped at stripe {s}")), "{msg}");
    assert!(msg.contains(&format!("d{victim}")), "{msg}");
    let st = f.a.status();
    assert!(st.failed_reason.is_none(), "{}", st.md_text());
    // The administrator sees why in the status, not only in the job history.
    assert_eq!(st.rebuild_stopped.as_deref(), Some(msg.as_str()));
    assert!(
        st.md_text().contains(&format!("REBUILD STOPPED: {msg}")),
        "{}",
        st.md_text()
    );
    assert_eq!(
        st.members[victim].state,
        RoleState::InSync,
        "{}",
        st.md_text()
    );
    assert_eq!(
        st.members[gone].state,
        RoleState::Rebuilding,
        "{}",
        st.md_text()
    );
    assert_eq!(
        st.members[gone].rebuilt_bytes,
        Some(s * CHUNK),
        "rebuilt up to the bad stripe"
    );
    // Row 1 of the bad column and of the missing one (rebuilt from it) fail with a
    // medium error; everything else reads right.
    let stripe_at = s * sb;
    for c in 0..map.columns.len() as u64 {
        for row in 0..CHUNK / 4096 {
            let at = stripe_at + c * CHUNK + row * 4096;
            let r = f.a.read(at, 4096).await;
            if row == 1 && c < 2 {
                assert!(is_io(&r), "column {c} row {row}: {r:?}");
            } else {
                let got = r.unwrap_or_else(|e| panic!("column {c} row {row}: {e}"));
                assert_eq!(diff(&got, &f.data[at as usize..at as usize + 4096]), None);
            }
        }
    }
    for (lo, hi) in [(0, stripe_at), (stripe_at + sb, f.data.len() as u64)] {
        let mut at = lo;
        while at < hi {
            let n = (hi - at).min(4 << 20);
            let got = f.a.read(at, n as usize).await.unwrap();
            assert_eq!(
                diff(&got, &f.data[at as usize..(at + n) as usize]),
                None,
                "at {at}"
            );
            at += n;
        }
    }

    // A full-stripe write needs no read and remaps the sector; a new device lets the
    // rebuild try again, from where it stopped.
    let new = pattern(5, sb as usize);
    f.a.write(stripe_at, Bytes::from(new.clone()), WriteFlags::default())
        .await
        .unwrap();
    f.data[stripe_at as usize..(stripe_at + sb) as usize].copy_from_slice(&new);
    let spare2 = Arc::new(FaultDev::new(mem(SIZE)));
    f.a.add_spare(Device::new("spare2", spare2 as SharedBlockDev))
        .await
        .unwrap();
    // Cleared with the device added, as the rebuild may start again.
    let st = f.a.status();
    assert_eq!(st.rebuild_stopped, None, "{}", st.md_text());
    f.a.wait_idle().await;
    let st = f.a.status();
    assert_eq!(st.rebuild_stopped, None, "{}", st.md_text());
    assert!(
        st.members.iter().all(|m| m.state == RoleState::InSync),
        "{}",
        st.md_text()
    );
    assert_eq!(f.a.jobs()[0].state, basalt_raid::JobState::Completed);
    f.check_all("after the rebuild").await;
    let rep = f.scrub().await;
    assert_eq!(rep.mismatches, 0, "{rep:?}");
    f.a.stop().await.unwrap();
}
