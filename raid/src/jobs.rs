//! Background jobs: rebuild (onto a spare or a replacement), resync (after an unclean
//! shutdown without journal, or at creation), and scrub (check, or check and repair).
//!
//! One worker task per array runs at most one job at a time, chosen by priority:
//! rebuild, then resync, then a requested scrub. A job walks the stripes in windows
//! (about 4 MiB per member), holding the window's stripes locked while it works, so
//! foreground I/O on other stripes goes on. After each window it publishes progress,
//! obeys the rate limit, and every second records its position in the superblocks (a
//! rebuild first flushes the rebuilt member, so a recorded position is always durable):
//! after a restart the job resumes there. A higher-priority job (a rebuild after a
//! failure during a scrub) pre-empts a lower one at the next window.
//!
//! A rebuild that meets rows it can neither read nor rebuild (a bad sector on the only
//! member that could supply them) stops at that stripe, as md does when it has no
//! bad-block log to record them in: the member keeps its role, the array runs degraded,
//! the target stays out of sync, and no rebuild starts until a device is added. md with a
//! bad-block log instead records the rows as bad on the target and goes on; Basalt keeps
//! no such log, and going on without one would mark the target in sync over rows that
//! hold nothing right.

use crate::array::{now_unix, Inner, Member, Step};
use crate::csum::block_crc;
use crate::gf;
use crate::parity::Kernel;
use crate::superblock::{RoleState, ScrubKind, BLOCK};
use crate::RaidError;
use futures_util::future::join_all;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum JobKind {
    /// Rebuilds members onto spares or replacements ("recovery" in md).
    Rebuild,
    /// Makes redundancy consistent after an unclean shutdown or at creation.
    Resync,
    /// Scrub that only reports.
    Check,
    /// Scrub that repairs what it finds.
    Repair,
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum JobState {
    /// Running.
    Running,
    /// Finished the whole array.
    Completed,
    /// Stopped before the end (cancelled, pre-empted, or the array stopped); it
    /// resumes from its checkpoint when due again.
    Interrupted,
    /// Could not go on (the array failed, or every target member failed).
    Failed,
}

/// What a scrub found and fixed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ScrubReport {
    /// Stripes examined.
    pub stripes: u64,
    /// Blocks (4 KiB, per member) examined.
    pub blocks_checked: u64,
    /// Rows (4 KiB across a stripe) whose copies or parity disagreed, or whose
    /// checksum did not match.
    pub mismatches: u64,
    /// Rows repaired.
    pub repaired: u64,
    /// Rows found wrong that could not be repaired (more bad blocks than redundancy).
    pub uncorrectable: u64,
    /// Rows whose copies or parity disagreed but where nothing said which block was
    /// wrong (no checksum); repaired md-style (first copy wins, parity recomputed).
    pub unverifiable: u64,
    /// Stripes skipped because a member was missing.
    pub skipped_stripes: u64,
    /// Blocks found wrong, by member role: the member the scrub named.
    pub bad_blocks_by_role: Vec<u64>,
}

impl ScrubReport {
    fn merge(&mut self, o: &ScrubReport) {
        self.stripes += o.stripes;
        self.blocks_checked += o.blocks_checked;
        self.mismatches += o.mismatches;
        self.repaired += o.repaired;
        self.uncorrectable += o.uncorrectable;
        self.unverifiable += o.unverifiable;
        self.skipped_stripes += o.skipped_stripes;
        if self.bad_blocks_by_role.len() < o.bad_blocks_by_role.len() {
            self.bad_blocks_by_role
                .resize(o.bad_blocks_by_role.len(), 0);
        }
        for (a, b) in self
            .bad_blocks_by_role
            .iter_mut()
            .zip(&o.bad_blocks_by_role)
        {
            *a += b;
        }
    }
}

/// A job's progress, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobSnapshot {
    /// Identifier, unique per array handle.
    pub id: u64,
    /// What it does.
    pub kind: JobKind,
    /// Where it stands.
    pub state: JobState,
    /// Member roles being rebuilt (rebuild only).
    pub roles: Vec<usize>,
    /// Array bytes done (position, so a resumed job starts where it left off).
    pub done_bytes: u64,
    /// Array bytes in all.
    pub total_bytes: u64,
    /// Bytes per second since this run of the job started.
    pub rate_bytes_per_sec: f64,
    /// Seconds to go at that rate.
    pub eta_seconds: Option<f64>,
    /// Start, Unix seconds.
    pub started_unix: u64,
    /// End, Unix seconds.
    pub finished_unix: Option<u64>,
    /// What a scrub or resync found so far.
    pub report: Option<ScrubReport>,
    /// Why it failed or stopped.
    pub message: Option<String>,
}

struct JobsInner {
    current: Option<JobSnapshot>,
    history: VecDeque<JobSnapshot>,
    next_id: u64,
    run_start: Instant,
    run_start_done: u64,
}

/// The jobs of one array.
pub(crate) struct Jobs {
    inner: Mutex<JobsInner>,
    rate: AtomicU64,
    cancel_scrub: AtomicBool,
    stop: AtomicBool,
    running: AtomicBool,
}

impl Jobs {
    pub(crate) fn new(rate: Option<u64>) -> Self {
        Jobs {
            inner: Mutex::new(JobsInner {
                current: None,
                history: VecDeque::new(),
                next_id: 1,
                run_start: Instant::now(),
                run_start_done: 0,
            }),
            rate: AtomicU64::new(rate.unwrap_or(0)),
            cancel_scrub: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            running: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, JobsInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn set_rate_limit(&self, r: Option<u64>) {
        self.rate.store(r.unwrap_or(0), Relaxed);
    }

    pub(crate) fn cancel_all(&self) {
        self.stop.store(true, Relaxed);
    }

    pub(crate) fn running(&self) -> bool {
        self.running.load(Relaxed)
    }

    pub(crate) fn snapshots(&self) -> Vec<JobSnapshot> {
        let j = self.lock();
        j.current.iter().chain(j.history.iter()).cloned().collect()
    }

    pub(crate) fn current(&self) -> Option<JobSnapshot> {
        self.lock().current.clone()
    }

    pub(crate) fn last_report(&self) -> Option<ScrubReport> {
        let j = self.lock();
        j.history
            .iter()
            .find(|h| matches!(h.kind, JobKind::Check | JobKind::Repair))
            .and_then(|h| h.report.clone())
    }

    fn begin(&self, kind: JobKind, roles: Vec<usize>, done: u64, total: u64) {
        let mut j = self.lock();
        let id = j.next_id;
        j.next_id += 1;
        j.run_start = Instant::now();
        j.run_start_done = done;
        j.current = Some(JobSnapshot {
            id,
            kind,
            state: JobState::Running,
            roles,
            done_bytes: done,
            total_bytes: total,
            rate_bytes_per_sec: 0.0,
            eta_seconds: None,
            started_unix: now_unix(),
            finished_unix: None,
            report: None,
            message: None,
        });
    }

    fn progress(&self, done: u64, report: Option<&ScrubReport>) {
        let mut j = self.lock();
        let el = j.run_start.elapsed().as_secs_f64();
        let since = done.saturating_sub(j.run_start_done);
        if let Some(c) = &mut j.current {
            c.done_bytes = done;
            c.rate_bytes_per_sec = if el > 0.0 { since as f64 / el } else { 0.0 };
            c.eta_seconds = (c.rate_bytes_per_sec > 0.0)
                .then(|| c.total_bytes.saturating_sub(done) as f64 / c.rate_bytes_per_sec);
            if let Some(r) = report {
                c.report = Some(r.clone());
            }
        }
    }

    fn finish(&self, state: JobState, message: Option<String>) {
        let mut j = self.lock();
        if let Some(mut c) = j.current.take() {
            c.state = state;
            c.finished_unix = Some(now_unix());
            c.message = message;
            if state == JobState::Completed {
                c.done_bytes = c.total_bytes;
                c.eta_seconds = Some(0.0);
            }
            j.history.push_front(c);
            j.history.truncate(8);
        }
    }

    /// Sleeps as long as needed to keep `bytes` done since `start` under the limit.
    async fn pace(&self, start: Instant, bytes: u64) {
        let rate = self.rate.load(Relaxed);
        if rate == 0 {
            return;
        }
        let want = Duration::from_secs_f64(bytes as f64 / rate as f64);
        let el = start.elapsed();
        if want > el {
            tokio::time::sleep(want - el).await;
        }
    }
}

/// The per-array worker task.
pub(crate) async fn worker(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if inner.state().stopped || inner.jobs.stop.load(Relaxed) {
            return;
        }
        inner.takeover_spares().await;
        if let Some(kind) = inner.next_job() {
            inner.jobs.running.store(true, Relaxed);
            inner.run_job(kind).await;
            inner.jobs.running.store(false, Relaxed);
            continue;
        }
        let idle = inner
            .last_write
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed();
        if !inner.clean_flag.load(Relaxed) && idle > Duration::from_secs(1) {
            let _ = inner.mark_clean().await;
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), inner.wake.notified()).await;
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Check,
    Repair,
    Resync,
}

impl Inner {
    /// The job due now, by priority.
    pub(crate) fn next_job(&self) -> Option<JobKind> {
        let st = self.state();
        if st.failed.is_some() || st.stopped {
            return None;
        }
        if st.rebuild_stopped.is_none()
            && st
                .slots
                .iter()
                .any(|s| s.state == RoleState::Rebuilding && s.member.is_some())
        {
            return Some(JobKind::Rebuild);
        }
        if st.resync_offset != u64::MAX {
            return Some(JobKind::Resync);
        }
        match st.scrub {
            ScrubKind::Check => Some(JobKind::Check),
            ScrubKind::Repair => Some(JobKind::Repair),
            ScrubKind::None => None,
        }
    }

    /// True when a job is due or a spare is about to take over.
    pub(crate) fn job_due(&self) -> bool {
        if self.next_job().is_some() {
            return true;
        }
        let st = self.state();
        st.failed.is_none()
            && !st.stopped
            && !st.spares.is_empty()
            && st
                .slots
                .iter()
                .any(|s| s.member.is_none() || s.state == RoleState::Faulty)
    }

    /// Hands faulty or missing roles to spares.
    pub(crate) async fn takeover_spares(&self) {
        loop {
            let pick = {
                let st = self.state();
                if st.failed.is_some() || st.stopped || st.spares.is_empty() {
                    return;
                }
                let Some(role) = st
                    .slots
                    .iter()
                    .position(|s| s.member.is_none() || s.state == RoleState::Faulty)
                else {
                    return;
                };
                // It stays listed until `take_role` moves it into the role, so that
                // `job_due` (and `wait_idle`) sees the takeover coming meanwhile.
                (role, st.spares[0].clone())
            };
            tracing::info!(array = %self.name, role = pick.0, device = %pick.1.label, "spare takes over");
            match self.take_role(pick.0, pick.1, true).await {
                // Taken, or the pick went stale meanwhile: pick again.
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }

    /// Puts `m` into `role` as a rebuilding member. All stripes are locked and the
    /// journal checkpointed first, so that no transaction still to be replayed names
    /// the role's previous device. With `spare`, `m` is a listed spare taking over a
    /// vacant or faulty role: if, by the time the lock is held, it is no longer listed
    /// (dropped after a failed superblock write) or the role was filled meanwhile
    /// (`replace_member`), nothing changes and the answer is false.
    pub(crate) async fn take_role(
        &self,
        role: usize,
        m: Arc<Member>,
        spare: bool,
    ) -> Result<bool, RaidError> {
        {
            let _all = self.locks.exclusive(0, self.layout.stripes.max(1)).await;
            self.checkpoint().await?;
            let mut st = self.state();
            if spare {
                let listed = st.spares.iter().any(|s| Arc::ptr_eq(s, &m));
                let slot = &st.slots[role];
                if !listed || (slot.member.is_some() && slot.state != RoleState::Faulty) {
                    return Ok(false);
                }
            }
            m.csums.clear();
            st.spares.retain(|s| !Arc::ptr_eq(s, &m));
            let slot = &mut st.slots[role];
            slot.member = Some(m);
            slot.state = RoleState::Rebuilding;
            slot.recovery = 0;
            // A new device: a stopped rebuild may try again (md).
            st.rebuild_stopped = None;
            st.gen += 1;
        }
        self.persist().await?;
        self.wake.notify_one();
        Ok(true)
    }

    pub(crate) async fn request_scrub(&self, repair: bool) -> Result<(), RaidError> {
        {
            let mut st = self.state();
            if let Some(f) = &st.failed {
                return Err(RaidError::Unavailable(f.clone()));
            }
            if st.scrub != ScrubKind::None {
                return Err(RaidError::Busy("a scrub is already running".into()));
            }
            st.scrub = if repair {
                ScrubKind::Repair
            } else {
                ScrubKind::Check
            };
            st.scrub_offset = 0;
            st.gen += 1;
        }
        self.jobs.cancel_scrub.store(false, Relaxed);
        self.persist().await?;
        self.wake.notify_one();
        Ok(())
    }

    pub(crate) async fn cancel_scrub(&self) -> Result<(), RaidError> {
        {
            let mut st = self.state();
            if st.scrub == ScrubKind::None {
                return Ok(());
            }
            st.scrub = ScrubKind::None;
            st.scrub_offset = 0;
            st.gen += 1;
        }
        self.jobs.cancel_scrub.store(true, Relaxed);
        self.persist().await?;
        Ok(())
    }

    fn window(&self) -> u64 {
        ((4 << 20) / self.layout.chunk).clamp(1, 64)
    }

    async fn run_job(&self, kind: JobKind) {
        let total = self.layout.capacity();
        let sb = self.layout.stripe_bytes();
        let (start, roles) = {
            let st = self.state();
            match kind {
                JobKind::Rebuild => {
                    let reb: Vec<(usize, u64)> = st
                        .slots
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| s.state == RoleState::Rebuilding && s.member.is_some())
                        .map(|(r, s)| (r, s.recovery))
                        .collect();
                    (
                        reb.iter().map(|x| x.1).min().unwrap_or(0),
                        reb.iter().map(|x| x.0).collect(),
                    )
                }
                JobKind::Resync => (st.resync_offset, vec![]),
                _ => (st.scrub_offset, vec![]),
            }
        };
        self.jobs
            .begin(kind, roles, start.min(self.layout.stripes) * sb, total);
        let (state, msg) = match kind {
            JobKind::Rebuild => self.rebuild_pass().await,
            JobKind::Resync => self.sync_pass(Mode::Resync).await,
            JobKind::Check => self.sync_pass(Mode::Check).await,
            JobKind::Repair => self.sync_pass(Mode::Repair).await,
        };
        if let Some(m) = &msg {
            tracing::info!(array = %self.name, ?kind, ?state, "{m}");
        }
        self.jobs.finish(state, msg);
    }

    fn rebuilding(&self) -> Vec<(usize, Arc<Member>, u64)> {
        self.state()
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state == RoleState::Rebuilding)
            .filter_map(|(r, s)| s.member.clone().map(|m| (r, m, s.recovery)))
            .collect()
    }

    /// Flushes the rebuilding members, then records their positions.
    async fn save_rebuild(&self, targets: &[(usize, Arc<Member>, u64)]) {
        for (r, m, _) in targets {
            if let Err(e) = self.mio(m.dev.flush()).await {
                self.member_failed(*r, m, &e).await;
            }
            if self.checksums {
                if let Err(e) = self.mio(m.csums.write_back(&m.dev, false)).await {
                    self.member_failed(*r, m, &e).await;
                }
            }
        }
        let _ = self.persist().await;
    }

    async fn rebuild_pass(&self) -> (JobState, Option<String>) {
        let stripes = self.layout.stripes;
        let w = self.window();
        let sb = self.layout.stripe_bytes();
        let run_start = Instant::now();
        let mut done_bytes = 0u64;
        let mut last_save = Instant::now();
        loop {
            let targets = self.rebuilding();
            if self.jobs.stop.load(Relaxed) || self.state().stopped {
                self.save_rebuild(&targets).await;
                return (JobState::Interrupted, Some("array stopping".into()));
            }
            if self.check_usable().is_err() {
                return (JobState::Failed, Some(self.unavailable().to_string()));
            }
            if targets.is_empty() {
                return (
                    JobState::Failed,
                    Some("every member being rebuilt failed".into()),
                );
            }
            let a = targets.iter().map(|t| t.2).min().unwrap_or(stripes);
            if a >= stripes {
                self.save_rebuild(&targets).await;
                {
                    let mut st = self.state();
                    for (r, m, _) in &targets {
                        let slot = &mut st.slots[*r];
                        if slot.member.as_ref().is_some_and(|x| Arc::ptr_eq(x, m))
                            && slot.state == RoleState::Rebuilding
                        {
                            slot.state = RoleState::InSync;
                            slot.recovery = 0;
                        }
                    }
                    st.gen += 1;
                }
                let _ = self.persist().await;
                tracing::info!(array = %self.name, "rebuild complete");
                return (JobState::Completed, None);
            }
            // Stop the window where another target's rebuilt region starts, so that
            // every member is either rebuilt or not over the whole window.
            let b = targets
                .iter()
                .map(|t| t.2)
                .filter(|&r| r > a)
                .fold((a + w).min(stripes), u64::min);
            let stop = {
                let _g = self.locks.exclusive(a, b - a).await;
                let stop = match self.rebuild_window(a, b, &targets).await {
                    Ok(stop) => stop,
                    Err(e) => return (JobState::Failed, Some(e.to_string())),
                };
                let stop = stop.map(|(s, e)| (s, self.stop_message(&targets, s, &e)));
                let end = stop.as_ref().map_or(b, |x| x.0);
                let mut st = self.state();
                for (r, m, _) in &targets {
                    let slot = &mut st.slots[*r];
                    if slot.member.as_ref().is_some_and(|x| Arc::ptr_eq(x, m))
                        && slot.state == RoleState::Rebuilding
                    {
                        slot.recovery = slot.recovery.max(end);
                    }
                }
                // Set with the positions, under the window's lock: a device added once
                // the lock is gone (while the positions are saved) must find it set, so
                // that its clearing the flag lets the next rebuild start.
                if let Some((_, msg)) = &stop {
                    st.rebuild_stopped = Some(msg.clone());
                }
                st.gen += 1;
                stop
            };
            let end = stop.as_ref().map_or(b, |x| x.0);
            done_bytes += (end - a) * sb;
            self.metrics.sync_bytes.fetch_add((end - a) * sb, Relaxed);
            self.jobs.progress(end * sb, None);
            if let Some((s, msg)) = stop {
                return self.rebuild_stopped(&targets, s, msg).await;
            }
            if last_save.elapsed() > Duration::from_secs(1) {
                self.save_rebuild(&targets).await;
                last_save = Instant::now();
            }
            self.jobs.pace(run_start, done_bytes).await;
        }
    }

    /// Stops the rebuild at stripe `s`, whose rows are unreadable on a member and cannot
    /// be rebuilt from the others (`e`). Linux md, when it cannot record the rows in a
    /// bad-block log (Basalt keeps none), does the same: it does not fail the member
    /// (that would fail the array over one sector), interrupts the recovery and starts it
    /// again only when a device is added (`recovery_disabled`). Skipping the rows and
    /// going on, as md does when it can log them as bad, would leave the target in sync
    /// with rows that hold nothing right and nothing to say so. The targets keep their
    /// position (rebuilt up to `s`) and stay out of sync; the array runs degraded and a
    /// read of the rows fails with a medium error.
    async fn rebuild_stopped(
        &self,
        targets: &[(usize, Arc<Member>, u64)],
        s: u64,
        msg: String,
    ) -> (JobState, Option<String>) {
        self.save_rebuild(targets).await;
        tracing::error!(array = %self.name, stripe = s, "{msg}");
        (JobState::Failed, Some(msg))
    }

    /// What a rebuild stopped at stripe `s` by `e` tells the admin.
    fn stop_message(
        &self,
        targets: &[(usize, Arc<Member>, u64)],
        s: u64,
        e: &basalt_blockdev::BlockError,
    ) -> String {
        let sb = self.layout.stripe_bytes();
        let roles: Vec<String> = targets.iter().map(|t| t.0.to_string()).collect();
        let msg = format!(
            "rebuild of role {} stopped at stripe {s} (array bytes {}..{}): its rows can be \
             neither read nor rebuilt ({e}); the array stays degraded, the rebuilt member \
             stays out of sync, reads of those rows fail; rewrite them or replace the \
             member, then add a device to retry",
            roles.join(", "),
            s * sb,
            (s + 1) * sb,
        );
        msg
    }

    /// Rebuilds stripes `[a, b)` on every target whose position is at or below `a`,
    /// with one request per member for the whole window (the window's chunks are
    /// contiguous on every member), so a rebuild streams like a sequential copy. If the
    /// rows of a stripe can be neither read nor rebuilt, only the stripes before it are
    /// rebuilt, and that stripe and the error are returned.
    async fn rebuild_window(
        &self,
        a: u64,
        b: u64,
        targets: &[(usize, Arc<Member>, u64)],
    ) -> Result<Option<(u64, basalt_blockdev::BlockError)>, basalt_blockdev::BlockError> {
        let chunk = self.layout.chunk as usize;
        let off = self.data_off(a, 0);
        let np = self.layout.level.parity_count();
        for _ in 0..=self.layout.members {
            self.check_usable()?;
            let view = self.view(a);
            let tgts: Vec<&(usize, Arc<Member>, u64)> =
                targets.iter().filter(|t| t.2 <= a).collect();
            let mut outs: Vec<(usize, bytes::Bytes)> = Vec::new();
            let stop;
            if np == 0 {
                // Mirrors: every stripe maps columns to the same roles; copy from a
                // live copy of the target's column.
                let map = self.layout.stripe_map(a);
                let mut srcs = Vec::new();
                for (role, _, _) in &tgts {
                    let Some(col) = map.columns.iter().find(|c| c.contains(role)) else {
                        continue;
                    };
                    let Some(src) = col.iter().copied().find(|&r| view[r].is_some()) else {
                        return Err(self.unavailable());
                    };
                    srcs.push((*role, src));
                }
                let roles: Vec<usize> = srcs.iter().map(|x| x.1).collect();
                match self.read_window(a, b, &view, &roles).await {
                    Ok((got, st)) => {
                        for ((role, _), d) in srcs.iter().zip(got) {
                            outs.push((*role, d));
                        }
                        stop = st;
                    }
                    Err(Step::Retry) => continue,
                    Err(Step::Fatal(e)) => return Err(e),
                }
            } else {
                let roles: Vec<usize> = (0..self.layout.members)
                    .filter(|&r| view[r].is_some())
                    .collect();
                let got = match self.read_window(a, b, &view, &roles).await {
                    Ok((g, st)) => {
                        stop = st;
                        g
                    }
                    Err(Step::Retry) => continue,
                    Err(Step::Fatal(e)) => return Err(e),
                };
                let end = stop.as_ref().map_or(b, |x| x.0);
                let len = (end - a) as usize * chunk;
                let mut bufs_out: Vec<basalt_blockdev::AlignedBuf> = (0..tgts.len())
                    .map(|_| basalt_blockdev::AlignedBuf::zeroed(len))
                    .collect();
                for i in 0..(end - a) as usize {
                    let map = self.layout.stripe_map(a + i as u64);
                    let k = map.columns.len();
                    let at = i * chunk;
                    let mut bufs: Vec<Option<Vec<u8>>> = (0..k + np)
                        .map(|pos| {
                            let r = Inner::role_at(&map, pos);
                            roles
                                .iter()
                                .position(|&x| x == r)
                                .map(|j| got[j][at..at + chunk].to_vec())
                        })
                        .collect();
                    if !crate::array::recover(k, np, &mut bufs, true) {
                        return Err(self.unavailable());
                    }
                    for (t, (role, _, _)) in tgts.iter().enumerate() {
                        if let Some(pos) = (0..k + np).find(|&p| Inner::role_at(&map, p) == *role) {
                            if let Some(d) = &bufs[pos] {
                                bufs_out[t].as_mut_slice()[at..at + chunk].copy_from_slice(d);
                            }
                        }
                    }
                }
                for ((role, _, _), d) in tgts.iter().zip(bufs_out) {
                    outs.push((*role, d.freeze()));
                }
            }
            // Nothing rebuilt when the first stripe of the window is the bad one.
            outs.retain(|(_, d)| !d.is_empty());
            let writes = join_all(outs.iter().map(|(role, data)| {
                let m = tgts.iter().find(|t| t.0 == *role).map(|t| t.1.clone());
                let data = data.clone();
                async move {
                    let Some(m) = m else { return Ok(()) };
                    self.mwrite(&m, off, data, basalt_blockdev::WriteFlags::default())
                        .await
                }
            }))
            .await;
            for ((role, data), r) in outs.iter().zip(writes) {
                let Some((_, m, _)) = tgts.iter().find(|t| t.0 == *role) else {
                    continue;
                };
                match r {
                    Err(e) => self.member_failed(*role, m, &e).await,
                    Ok(()) if self.checksums => {
                        let first = a * self.layout.chunk / BLOCK;
                        if let Err(e) = self.mio(m.csums.set_data(&m.dev, first, data)).await {
                            self.member_failed(*role, m, &e).await;
                        }
                    }
                    Ok(()) => {}
                }
            }
            return Ok(stop);
        }
        Err(self.unavailable())
    }

    async fn sync_pass(&self, mode: Mode) -> (JobState, Option<String>) {
        let stripes = self.layout.stripes;
        let w = self.window();
        let sb = self.layout.stripe_bytes();
        let run_start = Instant::now();
        let mut done_bytes = 0u64;
        let mut last_save = Instant::now();
        let mut report = ScrubReport {
            bad_blocks_by_role: vec![0; self.layout.members],
            ..Default::default()
        };
        loop {
            let a = {
                let st = self.state();
                match mode {
                    Mode::Resync => st.resync_offset,
                    _ => st.scrub_offset,
                }
            };
            let pre_empted = mode != Mode::Resync
                && self
                    .next_job()
                    .is_some_and(|j| matches!(j, JobKind::Rebuild | JobKind::Resync));
            let cancelled = mode != Mode::Resync && self.jobs.cancel_scrub.swap(false, Relaxed);
            if self.jobs.stop.load(Relaxed) || self.state().stopped || pre_empted || cancelled {
                let _ = self.flush_members().await;
                let _ = self.persist().await;
                self.jobs.progress(a.min(stripes) * sb, Some(&report));
                return (JobState::Interrupted, Some("interrupted".into()));
            }
            if self.check_usable().is_err() {
                return (JobState::Failed, Some(self.unavailable().to_string()));
            }
            if a >= stripes {
                self.flush_csums().await;
                let _ = self.flush_members().await;
                {
                    let mut st = self.state();
                    match mode {
                        Mode::Resync => st.resync_offset = u64::MAX,
                        _ => {
                            st.scrub = ScrubKind::None;
                            st.scrub_offset = 0;
                        }
                    }
                    st.gen += 1;
                }
                let _ = self.persist().await;
                self.jobs.progress(stripes * sb, Some(&report));
                let msg = format!(
                    "{} mismatches, {} repaired, {} uncorrectable, {} unverifiable",
                    report.mismatches, report.repaired, report.uncorrectable, report.unverifiable
                );
                return (JobState::Completed, Some(msg));
            }
            let b = (a + w).min(stripes);
            {
                let _g = self.locks.exclusive(a, b - a).await;
                let res = join_all((a..b).map(|s| self.check_stripe(s, mode))).await;
                for r in res {
                    match r {
                        Ok(r) => report.merge(&r),
                        Err(e) => return (JobState::Failed, Some(e.to_string())),
                    }
                }
                let mut st = self.state();
                match mode {
                    Mode::Resync => st.resync_offset = b,
                    _ => st.scrub_offset = b,
                }
                st.gen += 1;
            }
            self.metrics
                .scrub_mismatches
                .store(report.mismatches, Relaxed);
            done_bytes += (b - a) * sb;
            self.metrics.sync_bytes.fetch_add((b - a) * sb, Relaxed);
            self.jobs.progress(b * sb, Some(&report));
            if last_save.elapsed() > Duration::from_secs(1) {
                let _ = self.flush_members().await;
                let _ = self.persist().await;
                last_save = Instant::now();
            }
            self.jobs.pace(run_start, done_bytes).await;
        }
    }

    /// Checks (and repairs) one stripe, 4 KiB row by row.
    async fn check_stripe(
        &self,
        s: u64,
        mode: Mode,
    ) -> Result<ScrubReport, basalt_blockdev::BlockError> {
        let mut rep = ScrubReport {
            bad_blocks_by_role: vec![0; self.layout.members],
            ..Default::default()
        };
        let map = self.layout.stripe_map(s);
        let chunk = self.layout.chunk as usize;
        let off = self.data_off(s, 0);
        let first_block = s * self.layout.chunk / BLOCK;
        let nblocks = chunk / BLOCK as usize;
        let roles: Vec<usize> = map.roles().collect();
        let (view, got) = loop {
            self.check_usable()?;
            let view = self.view(s);
            if roles.iter().any(|&r| view[r].is_none()) {
                rep.skipped_stripes = 1;
                return Ok(rep);
            }
            // A medium error is corrected here as on any read (check mode too, as md).
            match self.read_rows(s, &map, &view, &roles, 0, chunk, None).await {
                Ok(g) => break (view, g),
                Err(Step::Retry) => continue,
                Err(Step::Fatal(e @ basalt_blockdev::BlockError::Io { .. })) => {
                    // Unreadable and not rebuildable (more bad rows than redundancy):
                    // nothing to compare; the error is logged, the scrub goes on.
                    tracing::warn!(array = %self.name, stripe = s, "scrub: {e}");
                    rep.stripes = 1;
                    rep.uncorrectable = 1;
                    return Ok(rep);
                }
                Err(Step::Fatal(e)) => return Err(e),
            }
        };
        rep.stripes = 1;
        rep.blocks_checked = (nblocks * roles.len()) as u64;
        let mut blocks: Vec<Vec<u8>> = got.iter().map(|b| b.to_vec()).collect();
        let idx = |role: usize| roles.iter().position(|&r| r == role).unwrap_or(0);
        let mut stored: Vec<Vec<u32>> = vec![vec![0; nblocks]; roles.len()];
        if self.checksums {
            for (i, &r) in roles.iter().enumerate() {
                if let Some(m) = &view[r] {
                    match self
                        .mio(m.csums.get(&m.dev, first_block, nblocks as u64))
                        .await
                    {
                        Ok(v) => stored[i] = v,
                        Err(e) => self.member_failed(r, m, &e).await,
                    }
                }
            }
        }
        let bs = BLOCK as usize;
        let mut dirty: Vec<Vec<usize>> = vec![Vec::new(); roles.len()];
        let repair = mode != Mode::Check;
        let kern = Kernel::best();
        let k = map.columns.len();
        let crc_ok = |i: usize, row: usize, data: &[u8]| -> Option<bool> {
            let c = stored[i][row];
            (c != 0).then(|| block_crc(data) == c)
        };
        for row in 0..nblocks {
            let at = row * bs;
            match self.layout.level {
                crate::layout::Level::Raid0 => {}
                crate::layout::Level::Raid1 | crate::layout::Level::Raid10 => {
                    for col in &map.columns {
                        let ids: Vec<usize> = col.iter().map(|&r| idx(r)).collect();
                        let first = &blocks[ids[0]][at..at + bs];
                        let same = ids.iter().all(|&i| &blocks[i][at..at + bs] == first);
                        let verdict: Vec<Option<bool>> = ids
                            .iter()
                            .map(|&i| crc_ok(i, row, &blocks[i][at..at + bs]))
                            .collect();
                        if same && verdict.iter().all(|v| *v != Some(false)) {
                            continue;
                        }
                        rep.mismatches += 1;
                        let good = ids.iter().zip(&verdict).find(|(_, v)| **v == Some(true));
                        match good {
                            Some((&g, _)) => {
                                let src = blocks[g][at..at + bs].to_vec();
                                for (&i, v) in ids.iter().zip(&verdict) {
                                    if *v == Some(true) {
                                        continue;
                                    }
                                    if blocks[i][at..at + bs] != src[..] || *v == Some(false) {
                                        rep.bad_blocks_by_role[roles[i]] += 1;
                                        if repair {
                                            blocks[i][at..at + bs].copy_from_slice(&src);
                                            dirty[i].push(row);
                                        }
                                    }
                                }
                                if repair {
                                    rep.repaired += 1;
                                }
                            }
                            None if same => {
                                // Identical copies that all fail their checksums: the
                                // checksums are what rotted.
                                for &i in &ids {
                                    rep.bad_blocks_by_role[roles[i]] += 1;
                                    if repair {
                                        dirty[i].push(row);
                                    }
                                }
                                if repair {
                                    rep.repaired += 1;
                                }
                            }
                            None => {
                                rep.unverifiable += 1;
                                if repair {
                                    let src = blocks[ids[0]][at..at + bs].to_vec();
                                    for &i in &ids[1..] {
                                        blocks[i][at..at + bs].copy_from_slice(&src);
                                        dirty[i].push(row);
                                    }
                                    dirty[ids[0]].push(row);
                                    rep.repaired += 1;
                                }
                            }
                        }
                    }
                }
                crate::layout::Level::Raid5 | crate::layout::Level::Raid6 => {
                    let np = self.layout.level.parity_count();
                    let pos_ids: Vec<usize> =
                        (0..k + np).map(|p| idx(Inner::role_at(&map, p))).collect();
                    let mut p = vec![0u8; bs];
                    let mut q = vec![0u8; bs];
                    {
                        let data: Vec<&[u8]> =
                            (0..k).map(|c| &blocks[pos_ids[c]][at..at + bs]).collect();
                        if np == 2 {
                            kern.gen_pq(&data, &mut p, &mut q);
                        } else {
                            kern.gen_p(&data, &mut p);
                        }
                    }
                    let p_ok = blocks[pos_ids[k]][at..at + bs] == p[..];
                    let q_ok = np < 2 || blocks[pos_ids[k + 1]][at..at + bs] == q[..];
                    let verdict: Vec<Option<bool>> = (0..k + np)
                        .map(|pos| crc_ok(pos_ids[pos], row, &blocks[pos_ids[pos]][at..at + bs]))
                        .collect();
                    let bad: Vec<usize> = (0..k + np)
                        .filter(|&pos| verdict[pos] == Some(false))
                        .collect();
                    if p_ok && q_ok && bad.is_empty() {
                        continue;
                    }
                    rep.mismatches += 1;
                    // Which position is wrong?
                    let culprit: Result<Option<usize>, ()> = if mode == Mode::Resync {
                        Ok(None)
                    } else if np == 2 {
                        let pc = &blocks[pos_ids[k]][at..at + bs];
                        let qc = &blocks[pos_ids[k + 1]][at..at + bs];
                        locate_raid6(k, pc, qc, &p, &q)
                    } else if p_ok {
                        // Parity agrees: a checksum (or checksum block) rotted.
                        Ok(bad.first().copied().filter(|_| bad.len() == 1))
                    } else {
                        match bad.len() {
                            1 => Ok(Some(bad[0])),
                            0 => {
                                let unknown: Vec<usize> =
                                    (0..=k).filter(|&pos| verdict[pos].is_none()).collect();
                                match unknown[..] {
                                    [u] => Ok(Some(u)),
                                    _ => Ok(None),
                                }
                            }
                            _ => Err(()),
                        }
                    };
                    match culprit {
                        Err(()) => {
                            rep.uncorrectable += 1;
                            for &pos in &bad {
                                rep.bad_blocks_by_role[roles[pos_ids[pos]]] += 1;
                            }
                        }
                        Ok(Some(pos)) => {
                            let i = pos_ids[pos];
                            rep.bad_blocks_by_role[roles[i]] += 1;
                            if repair {
                                let mut bufs: Vec<Option<Vec<u8>>> = (0..k + np)
                                    .map(|x| {
                                        (x != pos).then(|| blocks[pos_ids[x]][at..at + bs].to_vec())
                                    })
                                    .collect();
                                if crate::array::recover(k, np, &mut bufs, true) {
                                    if let Some(fixed) = &bufs[pos] {
                                        blocks[i][at..at + bs].copy_from_slice(fixed);
                                        dirty[i].push(row);
                                        rep.repaired += 1;
                                    }
                                }
                            }
                        }
                        Ok(None) => {
                            if mode != Mode::Resync {
                                rep.unverifiable += 1;
                            }
                            if repair {
                                // md's rule: the data is right, parity is recomputed.
                                blocks[pos_ids[k]][at..at + bs].copy_from_slice(&p);
                                dirty[pos_ids[k]].push(row);
                                if np == 2 {
                                    blocks[pos_ids[k + 1]][at..at + bs].copy_from_slice(&q);
                                    dirty[pos_ids[k + 1]].push(row);
                                }
                                for &pos in &bad {
                                    dirty[pos_ids[pos]].push(row);
                                }
                                rep.repaired += 1;
                            }
                        }
                    }
                }
            }
        }
        if !repair {
            return Ok(rep);
        }
        // Write back repaired blocks and refresh checksums (all of them on a resync,
        // unknown ones otherwise).
        for (i, &r) in roles.iter().enumerate() {
            let Some(m) = &view[r] else { continue };
            let mut rows = std::mem::take(&mut dirty[i]);
            rows.sort_unstable();
            rows.dedup();
            for &row in &rows {
                let at = row * bs;
                let data = crate::array::aligned(&blocks[i][at..at + bs]);
                let res = self
                    .mwrite(
                        m,
                        off + at as u64,
                        data,
                        basalt_blockdev::WriteFlags::default(),
                    )
                    .await;
                if let Err(e) = res {
                    self.member_failed(r, m, &e).await;
                    break;
                }
            }
            if self.checksums {
                let mut changed = false;
                let crcs: Vec<u32> = (0..nblocks)
                    .map(|row| {
                        let c = block_crc(&blocks[i][row * bs..(row + 1) * bs]);
                        if stored[i][row] != c {
                            changed = true;
                        }
                        c
                    })
                    .collect();
                if changed {
                    if let Err(e) = self.mio(m.csums.set(&m.dev, first_block, &crcs)).await {
                        self.member_failed(r, m, &e).await;
                    }
                }
            }
        }
        self.metrics.scrub_repaired.fetch_add(rep.repaired, Relaxed);
        Ok(rep)
    }
}

/// Uses the two syndromes to name the single wrong block of a RAID6 row: position
/// `0..k` (data), `k` (P) or `k + 1` (Q); `Err` when the difference is not explained by
/// one bad block. `pc`/`qc` are the stored parities, `p`/`q` the ones recomputed from
/// the data.
pub(crate) fn locate_raid6(
    k: usize,
    pc: &[u8],
    qc: &[u8],
    p: &[u8],
    q: &[u8],
) -> Result<Option<usize>, ()> {
    let mut z: Option<usize> = None;
    let mut p_diff = false;
    let mut q_diff = false;
    for i in 0..p.len() {
        let dp = pc[i] ^ p[i];
        let dq = qc[i] ^ q[i];
        p_diff |= dp != 0;
        q_diff |= dq != 0;
        if dp != 0 && dq != 0 {
            // D_z changed by e: dP = e, dQ = 2^z e, so z = log dQ - log dP.
            let zi = (gf::LOG[dq as usize] as usize + 255 - gf::LOG[dp as usize] as usize) % 255;
            match z {
                None => z = Some(zi),
                Some(x) if x == zi => {}
                Some(_) => return Err(()),
            }
        } else if dp != 0 || dq != 0 {
            // One syndrome alone differs at this byte: only a bad P or Q explains it,
            // which must then hold for the whole block.
            if z.is_some() {
                return Err(());
            }
        }
    }
    match (p_diff, q_diff, z) {
        (false, false, _) => Ok(None),
        (true, false, None) => Ok(Some(k)),
        (false, true, None) => Ok(Some(k + 1)),
        (true, true, Some(z)) if z < k => {
            // Every differing byte must have had both syndromes differ.
            for i in 0..p.len() {
                if (pc[i] ^ p[i] == 0) != (qc[i] ^ q[i] == 0) {
                    return Err(());
                }
            }
            Ok(Some(z))
        }
        _ => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raid6_locates_every_position() {
        let k = 5;
        let data: Vec<Vec<u8>> = (0..k)
            .map(|i| (0..64).map(|b| (b * 7 + i * 13) as u8).collect())
            .collect();
        let refs: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
        let mut p = vec![0u8; 64];
        let mut q = vec![0u8; 64];
        Kernel::Scalar.gen_pq(&refs, &mut p, &mut q);
        assert_eq!(locate_raid6(k, &p, &q, &p, &q), Ok(None));
        for bad in 0..k {
            let mut d = data.clone();
            d[bad][3] ^= 0x40;
            d[bad][40] ^= 0x01;
            let r: Vec<&[u8]> = d.iter().map(|x| &x[..]).collect();
            let (mut p2, mut q2) = (vec![0u8; 64], vec![0u8; 64]);
            Kernel::Scalar.gen_pq(&r, &mut p2, &mut q2);
            assert_eq!(locate_raid6(k, &p, &q, &p2, &q2), Ok(Some(bad)));
        }
        let mut pbad = p.clone();
        pbad[9] ^= 0xff;
        assert_eq!(locate_raid6(k, &pbad, &q, &p, &q), Ok(Some(k)));
        let mut qbad = q.clone();
        qbad[9] ^= 0xff;
        assert_eq!(locate_raid6(k, &p, &qbad, &p, &q), Ok(Some(k + 1)));
        // Two bad data blocks: not explained by one.
        let mut d = data.clone();
        d[0][3] ^= 1;
        d[1][5] ^= 1;
        let r: Vec<&[u8]> = d.iter().map(|x| &x[..]).collect();
        let (mut p2, mut q2) = (vec![0u8; 64], vec![0u8; 64]);
        Kernel::Scalar.gen_pq(&r, &mut p2, &mut q2);
        assert_eq!(locate_raid6(k, &p, &q, &p2, &q2), Err(()));
    }
}
