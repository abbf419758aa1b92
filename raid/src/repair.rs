//! Read error correction, md's `fix_read_error`: a member read that fails with a
//! medium error (EIO and the like, not a device that is gone) does not fail the member.
//! The rows are rebuilt from the stripe's redundancy (another copy, or parity), checked
//! against the member's block checksums where the array keeps them, rewritten on the
//! member (a drive remaps a bad sector when it is written) with FUA and read back.
//! Success counts a corrected read error and the member stays in sync; a failed rewrite
//! or read-back, or more read errors than the array's threshold within its decaying
//! window (md's `max_read_errors`: 20, halving every hour), fails the member as any
//! other error does. When the stripe has no redundancy left for the rows (RAID0, a
//! degraded array) the read fails with a [`BlockError::Io`] naming the member, and the
//! member stays: one bad sector must not take the whole member, and with it possibly
//! the whole array, away. A rebuild that meets such rows stops there rather than fail the
//! member (`jobs`, `rebuild_stopped`).
//!
//! Every caller holds the stripe's lock (shared for a read, exclusive for a write, a
//! scrub or a rebuild window), so no write to the stripe can land between the
//! reconstruction and the rewrite: the rewrite never puts back older data. A foreground
//! read's future may be dropped at any await (a killed connection, an aborted task)
//! while a rewrite it issued is still in flight; its correction therefore runs as a task
//! of its own holding a share of the read's lock ([`Hold`]) until the rewrite and the
//! read-back are done, as writes run detached (writes, jobs and compare-and-write
//! already run in tasks that are never dropped, and correct inline). Two reads
//! correcting the same rows at once rewrite the same bytes. The rewrite bypasses the
//! journal: it writes what the member must already hold (the rows agree with the rest of
//! the stripe and with every journaled transaction since the last checkpoint), so a
//! crash in the middle leaves the sector bad or right, never a stripe inconsistent.
//!
//! One bad region counts once toward the threshold, however many reads meet it at once
//! ([`Corrections`]). Reads share the stripe lock, so two of them can fail on the same
//! rows before either has rewritten them; each correction would count the error. A read
//! that fails therefore claims (member, member byte range) for its correction; a read
//! that then fails on rows overlapping a claim waits for that correction to end and
//! reads again, counting nothing if the rows now read. A read whose failure may predate
//! a correction of the same rows that ended meanwhile (one finished while it was
//! reading; the last 64 that ended are remembered, and a read older than all of them
//! assumes so) reads again too before claiming. After a few such passes (rows that
//! stay unreadable under a stream of reads) a read corrects on its own, so none
//! starves.
//! Only the rows a read itself failed on are claimed; a source member that fails while
//! serving a correction is counted by that correction.

use crate::array::{aligned, recover, Inner, Member, Step};
use crate::csum::block_crc;
use crate::layout::StripeMap;
use crate::parity::Kernel;
use crate::superblock::BLOCK;
use basalt_blockdev::{AlignedBuf, BlockError, OwnedRangeGuard, WriteFlags};
use bytes::Bytes;
use futures_util::future::join_all;
use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// True for a member error that may be a bad sector (`BlockError::Io`, except the
/// errnos that say the device itself is gone), as opposed to a failed device
/// (`Offline`, a timeout). Only these are corrected; the rewrite decides the rest.
pub(crate) fn is_medium_error(e: &BlockError) -> bool {
    const ENXIO: i32 = 6;
    const ENODEV: i32 = 19;
    match e {
        BlockError::Io { source, .. } => {
            !matches!(source.raw_os_error(), Some(ENXIO) | Some(ENODEV))
        }
        _ => false,
    }
}

type Bad = Vec<(usize, BlockError)>;

/// A share of a foreground read's stripe lock; the lock is released when the last
/// share goes.
pub(crate) type Hold = Arc<OwnedRangeGuard>;

/// How many times a read waits for another correction or reads again before it
/// corrects what it finds itself (module docs).
const MAX_DEFERS: u32 = 3;

/// The corrections in flight, so that one bad region counts once (module docs).
#[derive(Default)]
pub(crate) struct Corrections {
    claims: Mutex<Claims>,
    /// Corrections ended so far; bumped under `claims` as a claim is released.
    ended: AtomicU64,
}

#[derive(Default)]
struct Claims {
    next_id: u64,
    list: Vec<Claim>,
    /// The last [`RECENT_ENDED`] corrections that ended: (member, rows, the value of
    /// `ended` they left), so that a read's failure counts as stale only when a
    /// correction of *its* rows ended while it read, not any correction on the array.
    recent: VecDeque<(Arc<Member>, Range<u64>, u64)>,
}

/// How many ended corrections [`Claims::recent`] remembers; a read that started before
/// the oldest of them cannot tell, and reads again.
const RECENT_ENDED: usize = 64;

struct Claim {
    id: u64,
    member: Arc<Member>,
    range: Range<u64>,
    /// Dropped when the correction ends, which wakes the reads waiting for it.
    ended: watch::Sender<()>,
}

/// Why a read may not claim rows for a correction now.
enum Defer {
    /// Another correction of overlapping rows is in flight: wait for it to end.
    Wait(watch::Receiver<()>),
    /// A correction of the same rows ended while the read was reading: its failure may
    /// be old news.
    Stale,
}

/// The rows a correction claimed; released (and waiters woken) when dropped, which is
/// when the correction has ended, rewrite and read-back included.
pub(crate) struct Claimed {
    owner: Arc<Corrections>,
    id: u64,
}

impl Corrections {
    /// A mark to take before reading: [`Corrections::claim`] tells from it whether a
    /// correction ended since.
    fn mark(&self) -> u64 {
        self.ended.load(Acquire)
    }

    /// Claims the rows `range` of each member of `bad` for a correction, unless another
    /// claim overlaps them or a correction of overlapping rows ended since `mark`
    /// (`force` claims anyway).
    fn claim(
        self: &Arc<Self>,
        view: &[Option<Arc<Member>>],
        bad: &Bad,
        range: Range<u64>,
        mark: u64,
        force: bool,
    ) -> Result<Claimed, Defer> {
        let mut c = self.claims.lock().unwrap_or_else(PoisonError::into_inner);
        if !force {
            for (r, _) in bad {
                let Some(m) = &view[*r] else { continue };
                if let Some(other) = c.list.iter().find(|x| {
                    Arc::ptr_eq(&x.member, m)
                        && x.range.start < range.end
                        && range.start < x.range.end
                }) {
                    return Err(Defer::Wait(other.ended.subscribe()));
                }
            }
            if self.ended.load(Relaxed) != mark {
                let forgotten = c.recent.front().is_some_and(|(_, _, seq)| *seq > mark + 1);
                let overlapped = c.recent.iter().any(|(m, rows, seq)| {
                    *seq > mark
                        && rows.start < range.end
                        && range.start < rows.end
                        && bad
                            .iter()
                            .any(|(r, _)| view[*r].as_ref().is_some_and(|b| Arc::ptr_eq(b, m)))
                });
                if forgotten || overlapped {
                    return Err(Defer::Stale);
                }
            }
        }
        c.next_id += 1;
        let id = c.next_id;
        for (r, _) in bad {
            if let Some(m) = &view[*r] {
                c.list.push(Claim {
                    id,
                    member: m.clone(),
                    range: range.clone(),
                    ended: watch::channel(()).0,
                });
            }
        }
        Ok(Claimed {
            owner: self.clone(),
            id,
        })
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        let mut c = self
            .owner
            .claims
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let seq = self.owner.ended.fetch_add(1, Release) + 1;
        let id = self.id;
        let mut ended = Vec::new();
        c.list.retain(|x| {
            if x.id == id {
                ended.push((x.member.clone(), x.range.clone(), seq));
            }
            x.id != id
        });
        for e in ended {
            if c.recent.len() == RECENT_ENDED {
                c.recent.pop_front();
            }
            c.recent.push_back(e);
        }
    }
}

impl Inner {
    /// Applies the decay to a member's read error window.
    fn decay(&self, w: &mut (u64, Instant)) {
        let d = self.read_error_policy.decay.as_nanos();
        if d == 0 {
            return;
        }
        let el = w.1.elapsed().as_nanos();
        let periods = el / d;
        if periods > 0 {
            w.0 = w.0.checked_shr(periods.min(64) as u32).unwrap_or(0);
            let rem = Duration::from_nanos(u64::try_from(el % d).unwrap_or(0));
            w.1 = Instant::now().checked_sub(rem).unwrap_or_else(Instant::now);
        }
    }

    /// Read errors of `m` in the current window (after decay).
    pub(crate) fn recent_read_errors(&self, m: &Member) -> u64 {
        let mut w = m.read_errors.lock().unwrap_or_else(PoisonError::into_inner);
        self.decay(&mut w);
        w.0
    }

    /// Counts a read error on `m`; returns the count in the window and whether it is
    /// over the threshold.
    fn note_read_error(&self, m: &Member) -> (u64, bool) {
        m.errors.fetch_add(1, Relaxed);
        self.metrics.member_errors.fetch_add(1, Relaxed);
        let mut w = m.read_errors.lock().unwrap_or_else(PoisonError::into_inner);
        self.decay(&mut w);
        w.0 += 1;
        (w.0, w.0 > u64::from(self.read_error_policy.max))
    }

    /// Fails `m` for a reason that is not a request error.
    async fn fail_for(&self, role: usize, m: &Arc<Member>, why: &str) {
        if self.mark_faulty(role, m, why) {
            self.wake.notify_one();
        }
        let _ = self.persist().await;
    }

    async fn read_raw(
        &self,
        view: &[Option<Arc<Member>>],
        role: usize,
        off: u64,
        len: usize,
    ) -> Result<Bytes, BlockError> {
        match &view[role] {
            Some(m) => self.mread(m, off, len).await,
            None => Err(BlockError::Offline("member not usable".into())),
        }
    }

    /// Reads rows `[lo, lo + len)` of stripe `s` from `roles` (members of `view`),
    /// correcting medium errors (module docs). `Retry`: a member was failed, take a new
    /// view. `Fatal` with a [`BlockError::Io`]: the rows of a member can be neither read
    /// nor rebuilt; the member is kept. `hold`: the caller's stripe lock, given by a
    /// caller whose future may be dropped (a foreground read); a correction then runs as
    /// its own task that keeps the lock until it ends (module docs).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn read_rows(
        &self,
        s: u64,
        map: &StripeMap,
        view: &[Option<Arc<Member>>],
        roles: &[usize],
        lo: u64,
        len: usize,
        hold: Option<&Hold>,
    ) -> Result<Vec<Bytes>, Step> {
        let off = self.data_off(s, lo);
        let mut defers = 0;
        let (mut known, bad, claimed) = loop {
            let mark = self.corrections.mark();
            let results = match roles {
                [r] => vec![self.read_raw(view, *r, off, len).await],
                _ => join_all(roles.iter().map(|&r| self.read_raw(view, r, off, len))).await,
            };
            // The hot path: every read succeeded, nothing to correct.
            if results.iter().all(Result::is_ok) {
                return Ok(results.into_iter().flatten().collect());
            }
            let (good, bad) = self.sort_reads(view, roles, results).await?;
            let known: HashMap<usize, Bytes> = good.into_iter().collect();
            let force = defers >= MAX_DEFERS;
            match self
                .corrections
                .claim(view, &bad, off..off + len as u64, mark, force)
            {
                Ok(c) => break (known, bad, c),
                Err(Defer::Wait(mut rx)) => {
                    // Err once the other correction has ended: its claim is gone.
                    let _ = rx.changed().await;
                    // It may have failed a member we read (a bad one, or one whose rows
                    // we hold as good): start over with a new view.
                    let now = self.view(s);
                    let same = view.iter().zip(&now).all(|p| match p {
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        (None, None) => true,
                        _ => false,
                    });
                    if !same {
                        return Err(Step::Retry);
                    }
                }
                Err(Defer::Stale) => {}
            }
            defers += 1;
        };
        known = match hold {
            None => {
                let _claimed = claimed;
                self.correct(s, map, view, lo, len, known, bad).await?
            }
            Some(hold) => {
                self.correct_detached(hold, claimed, s, map, view, lo, len, known, bad)
                    .await?
            }
        };
        let mut out = Vec::with_capacity(roles.len());
        for r in roles {
            match known.get(r) {
                Some(b) => out.push(b.clone()),
                None => return Err(Step::Retry),
            }
        }
        Ok(out)
    }

    /// Rebuilds the rows of the members in `bad` and rewrites them there; returns
    /// `known` with the rebuilt rows added.
    #[allow(clippy::too_many_arguments)]
    async fn correct(
        &self,
        s: u64,
        map: &StripeMap,
        view: &[Option<Arc<Member>>],
        lo: u64,
        len: usize,
        mut known: HashMap<usize, Bytes>,
        mut bad: Bad,
    ) -> Result<HashMap<usize, Bytes>, Step> {
        let off = self.data_off(s, lo);
        match self
            .rebuild_rows(s, map, view, lo, len, &mut known, &mut bad)
            .await?
        {
            Some(fixed) => {
                self.rewrite(view, &bad, &fixed, off).await?;
                known.extend(fixed);
                Ok(known)
            }
            None => {
                for (r, _) in &bad {
                    if let Some(m) = &view[*r] {
                        m.errors.fetch_add(1, Relaxed);
                        self.metrics.member_errors.fetch_add(1, Relaxed);
                    }
                }
                Err(Step::Fatal(self.unrecoverable(view, &bad, off, len)))
            }
        }
    }

    /// [`Inner::correct`] as a task of its own holding `hold` and `claimed`: the
    /// rewrite runs to the end and the stripe stays locked (and the rows claimed) until
    /// then, even if the caller is dropped.
    #[allow(clippy::too_many_arguments)]
    async fn correct_detached(
        &self,
        hold: &Hold,
        claimed: Claimed,
        s: u64,
        map: &StripeMap,
        view: &[Option<Arc<Member>>],
        lo: u64,
        len: usize,
        known: HashMap<usize, Bytes>,
        bad: Bad,
    ) -> Result<HashMap<usize, Bytes>, Step> {
        let Some(me) = self.me.upgrade() else {
            return Err(Step::Fatal(self.unavailable()));
        };
        let (hold, map, view) = (hold.clone(), map.clone(), view.to_vec());
        let task = tokio::spawn(async move {
            let _hold = hold;
            let _claimed = claimed;
            me.correct(s, &map, &view, lo, len, known, bad).await
        });
        match task.await {
            Ok(r) => r,
            Err(e) => Err(Step::Fatal(BlockError::Offline(format!(
                "array read correction task failed: {e}"
            )))),
        }
    }

    fn unrecoverable(
        &self,
        view: &[Option<Arc<Member>>],
        bad: &Bad,
        off: u64,
        len: usize,
    ) -> BlockError {
        let who: Vec<String> = bad
            .iter()
            .map(|(r, e)| {
                let label = view[*r].as_ref().map_or("?", |m| m.label.as_str());
                format!("member {label} (role {r}): {e}")
            })
            .collect();
        tracing::error!(array = %self.name, "unrecoverable read error: {}", who.join("; "));
        BlockError::io(
            "read",
            off,
            len as u64,
            std::io::Error::other(format!(
                "array {}: unrecoverable read error (no redundancy left to rebuild the \
                 data; the member is kept): {}",
                self.name,
                who.join("; ")
            )),
        )
    }

    /// True unless a checksum `m` keeps for the rows disagrees with `data`.
    async fn crc_agrees(&self, m: &Member, s: u64, lo: u64, data: &[u8]) -> bool {
        let bs = BLOCK as usize;
        if !self.checksums || !lo.is_multiple_of(BLOCK) || !data.len().is_multiple_of(bs) {
            return true;
        }
        let first = (s * self.layout.chunk + lo) / BLOCK;
        match self
            .mio(m.csums.get(&m.dev, first, (data.len() / bs) as u64))
            .await
        {
            Ok(crcs) => crcs
                .iter()
                .zip(data.chunks(bs))
                .all(|(&c, b)| c == 0 || c == block_crc(b)),
            // The checksum area is unreadable too: nothing to check against.
            Err(_) => true,
        }
    }

    /// Rebuilds the rows of every member in `bad` from the rest of the stripe, reading
    /// what `known` lacks (a medium error there joins `bad`). `None`: not enough
    /// redundancy left, or the result disagrees with the member's checksums.
    #[allow(clippy::too_many_arguments)]
    async fn rebuild_rows(
        &self,
        s: u64,
        map: &StripeMap,
        view: &[Option<Arc<Member>>],
        lo: u64,
        len: usize,
        known: &mut HashMap<usize, Bytes>,
        bad: &mut Bad,
    ) -> Result<Option<HashMap<usize, Bytes>>, Step> {
        let off = self.data_off(s, lo);
        let mut fixed = HashMap::new();
        if map.p.is_none() {
            // Mirrors: the first other copy that reads and agrees with the checksums.
            let mut i = 0;
            while i < bad.len() {
                let r = bad[i].0;
                i += 1;
                let Some(col) = map.columns.iter().find(|c| c.contains(&r)) else {
                    return Ok(None);
                };
                let mut found = None;
                for &c in col {
                    if view[c].is_none() || bad.iter().any(|(x, _)| *x == c) {
                        continue;
                    }
                    let data = match known.get(&c) {
                        Some(d) => d.clone(),
                        None => match self.read_raw(view, c, off, len).await {
                            Ok(d) => {
                                known.insert(c, d.clone());
                                d
                            }
                            Err(e) if is_medium_error(&e) => {
                                bad.push((c, e));
                                continue;
                            }
                            Err(e) => {
                                if let Some(m) = &view[c] {
                                    self.member_failed(c, m, &e).await;
                                }
                                return Err(Step::Retry);
                            }
                        },
                    };
                    let (Some(src), Some(dst)) = (&view[c], &view[r]) else {
                        continue;
                    };
                    if self.crc_agrees(src, s, lo, &data).await
                        && self.crc_agrees(dst, s, lo, &data).await
                    {
                        found = Some(data);
                        break;
                    }
                }
                match found {
                    Some(d) => {
                        fixed.insert(r, d);
                    }
                    None => return Ok(None),
                }
            }
            // A copy that failed while serving as a source is rebuilt from the same
            // column's good copy, found above or on a later pass.
            for (r, _) in bad.iter() {
                if !fixed.contains_key(r) {
                    return Ok(None);
                }
            }
            return Ok(Some(fixed));
        }
        let k = map.columns.len();
        let np = self.layout.level.parity_count();
        for _ in 0..=self.layout.members {
            let is_bad = |r: usize, bad: &Bad| bad.iter().any(|(x, _)| *x == r);
            let unusable = (0..k + np)
                .map(|pos| Self::role_at(map, pos))
                .filter(|&r| view[r].is_none() || is_bad(r, bad))
                .count();
            if unusable > np {
                return Ok(None);
            }
            let need: Vec<usize> = (0..k + np)
                .map(|pos| Self::role_at(map, pos))
                .filter(|&r| view[r].is_some() && !is_bad(r, bad) && !known.contains_key(&r))
                .collect();
            if need.is_empty() {
                break;
            }
            let results = join_all(need.iter().map(|&r| self.read_raw(view, r, off, len))).await;
            for (&r, res) in need.iter().zip(results) {
                match res {
                    Ok(d) => {
                        known.insert(r, d);
                    }
                    Err(e) if is_medium_error(&e) => bad.push((r, e)),
                    Err(e) => {
                        if let Some(m) = &view[r] {
                            self.member_failed(r, m, &e).await;
                        }
                        return Err(Step::Retry);
                    }
                }
            }
        }
        let mut bufs: Vec<Option<Vec<u8>>> = (0..k + np)
            .map(|pos| {
                let r = Self::role_at(map, pos);
                if bad.iter().any(|(x, _)| *x == r) {
                    None
                } else {
                    known.get(&r).map(|b| b.to_vec())
                }
            })
            .collect();
        let unusable = bufs.iter().filter(|b| b.is_none()).count();
        if !recover(k, np, &mut bufs, true) {
            return Ok(None);
        }
        if np == 2 && unusable == 1 && !self.syndromes_agree(k, &bufs) {
            // One block rebuilt, the other syndrome disagrees: something else in the
            // stripe is wrong too, and the rebuilt rows cannot be trusted.
            return Ok(None);
        }
        for (r, _) in bad.iter() {
            let Some(pos) = (0..k + np).find(|&pos| Self::role_at(map, pos) == *r) else {
                return Ok(None);
            };
            let Some(d) = bufs[pos].as_deref() else {
                return Ok(None);
            };
            let Some(m) = &view[*r] else { return Ok(None) };
            if !self.crc_agrees(m, s, lo, d).await {
                return Ok(None);
            }
            fixed.insert(*r, aligned(d));
        }
        Ok(Some(fixed))
    }

    /// RAID6: P and Q recomputed from the data equal the stored (or rebuilt) ones.
    fn syndromes_agree(&self, k: usize, bufs: &[Option<Vec<u8>>]) -> bool {
        let data: Vec<&[u8]> = (0..k).filter_map(|i| bufs[i].as_deref()).collect();
        let (Some(pc), Some(qc)) = (bufs[k].as_deref(), bufs[k + 1].as_deref()) else {
            return false;
        };
        if data.len() != k {
            return false;
        }
        let mut p = vec![0u8; pc.len()];
        let mut q = vec![0u8; qc.len()];
        Kernel::best().gen_pq(&data, &mut p, &mut q);
        p == pc && q == qc
    }

    /// Rewrites the rebuilt rows on each member that failed to read them and reads them
    /// back. `Retry` if a member was failed (rewrite or verify failed, or too many read
    /// errors).
    async fn rewrite(
        &self,
        view: &[Option<Arc<Member>>],
        bad: &Bad,
        fixed: &HashMap<usize, Bytes>,
        off: u64,
    ) -> Result<(), Step> {
        let mut retry = false;
        for (r, err) in bad {
            let (Some(m), Some(data)) = (&view[*r], fixed.get(r)) else {
                continue;
            };
            let (count, over) = self.note_read_error(m);
            if over {
                let why = format!(
                    "{count} read errors within the window, more than the limit of {} \
                     (last: {err})",
                    self.read_error_policy.max
                );
                self.fail_for(*r, m, &why).await;
                retry = true;
                continue;
            }
            let res = async {
                self.mwrite(m, off, data.clone(), WriteFlags { fua: true })
                    .await?;
                let back = self.mread(m, off, data.len()).await?;
                if back != *data {
                    return Err(BlockError::io(
                        "read",
                        off,
                        data.len() as u64,
                        std::io::Error::other("read back after rewrite differs"),
                    ));
                }
                Ok(())
            }
            .await;
            match res {
                Ok(()) => {
                    m.corrected.fetch_add(1, Relaxed);
                    self.metrics.read_errors_corrected.fetch_add(1, Relaxed);
                    tracing::warn!(
                        array = %self.name, role = *r, device = %m.label, offset = off,
                        len = data.len(), "read error corrected: rewrote the rows from redundancy ({err})"
                    );
                }
                Err(e) => {
                    let why = format!("read error ({err}) not correctable: rewrite: {e}");
                    m.errors.fetch_add(1, Relaxed);
                    self.metrics.member_errors.fetch_add(1, Relaxed);
                    self.fail_for(*r, m, &why).await;
                    retry = true;
                }
            }
        }
        if retry {
            return Err(Step::Retry);
        }
        Ok(())
    }

    /// Sorts the results of reading `roles` (in that order): the data read, by role, and
    /// the medium errors (one per role). A member that failed outright is failed here,
    /// and then the caller retries with the new view (`Step::Retry`).
    async fn sort_reads(
        &self,
        view: &[Option<Arc<Member>>],
        roles: &[usize],
        results: Vec<Result<Bytes, BlockError>>,
    ) -> Result<(Vec<(usize, Bytes)>, Bad), Step> {
        let mut good = Vec::with_capacity(roles.len());
        let mut bad: Bad = Vec::new();
        let mut retry = false;
        for (&r, res) in roles.iter().zip(results) {
            match res {
                Ok(b) => good.push((r, b)),
                Err(e) if is_medium_error(&e) => {
                    if !bad.iter().any(|(x, _)| *x == r) {
                        bad.push((r, e));
                    }
                }
                Err(e) => {
                    if let Some(m) = &view[r] {
                        self.member_failed(r, m, &e).await;
                    }
                    retry = true;
                }
            }
        }
        if retry {
            return Err(Step::Retry);
        }
        Ok((good, bad))
    }

    /// Reads stripes `[a, b)` of `roles` with one request per member; if one hits a
    /// medium error, goes stripe by stripe with [`Inner::read_rows`], which corrects
    /// what redundancy allows. A stripe whose rows can be neither read nor rebuilt ends
    /// the window there: the answer then holds the stripes before it, with that stripe
    /// and the error (the unreadable member is kept; see the rebuild in `jobs`).
    pub(crate) async fn read_window(
        &self,
        a: u64,
        b: u64,
        view: &[Option<Arc<Member>>],
        roles: &[usize],
    ) -> Result<(Vec<Bytes>, Option<(u64, BlockError)>), Step> {
        let chunk = self.layout.chunk as usize;
        let len = (b - a) as usize * chunk;
        let off = self.data_off(a, 0);
        let results = join_all(roles.iter().map(|&r| self.read_raw(view, r, off, len))).await;
        let (good, bad) = self.sort_reads(view, roles, results).await?;
        if bad.is_empty() {
            return Ok((good.into_iter().map(|(_, d)| d).collect(), None));
        }
        let mut bufs: Vec<AlignedBuf> = roles.iter().map(|_| AlignedBuf::zeroed(len)).collect();
        let mut stop = None;
        for s in a..b {
            let map = self.layout.stripe_map(s);
            let got = match self.read_rows(s, &map, view, roles, 0, chunk, None).await {
                Ok(g) => g,
                Err(Step::Fatal(e @ BlockError::Io { .. })) => {
                    stop = Some((s, e));
                    break;
                }
                Err(e) => return Err(e),
            };
            let at = (s - a) as usize * chunk;
            for (buf, g) in bufs.iter_mut().zip(got) {
                buf.as_mut_slice()[at..at + chunk].copy_from_slice(&g);
            }
        }
        let done = (stop.as_ref().map_or(b, |x| x.0) - a) as usize * chunk;
        let out = bufs
            .into_iter()
            .map(|buf| buf.freeze().slice(..done))
            .collect();
        Ok((out, stop))
    }
}
