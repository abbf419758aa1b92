//! Status and metrics snapshots: plain data the daemon turns into API responses, the
//! CLI's md-style `pool status`, and node_md-style Prometheus series.
//!
//! Counters are monotonic atomics updated on the I/O path ([`ArrayMetrics`]); a
//! [`MetricsSnapshot`] copies them together with gauges derived from the state. A
//! suggested rendering (names as the daemon would expose them):
//!
//! ```text
//! basalt_md_state{array="pool0",state="active|degraded|recovering|resync|check|failed|clean"} 1
//! basalt_md_disks{array="pool0",state="active|rebuilding|faulty|missing|spare"} N
//! basalt_md_blocks{array="pool0"}                      size_bytes / 1024 (md's 1 KiB blocks)
//! basalt_md_blocks_synced{array="pool0"}               sync_done_bytes / 1024
//! basalt_md_io_bytes_total{array="pool0",op="read|write|journal"}
//! basalt_md_stripe_writes_total{array="pool0",kind="full|rmw|rcw|degraded"}
//! basalt_md_degraded_reads_total, basalt_md_member_errors_total,
//! basalt_md_member_read_errors_corrected_total,
//! basalt_md_scrub_mismatches, basalt_md_scrub_repaired_total
//! ```

use crate::array::Array;
use crate::jobs::{JobKind, JobSnapshot, JobState, ScrubReport};
use crate::layout::Level;
use crate::superblock::{RoleState, Uuid};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The array's overall state (md's `array_state` plus the sync action).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ArrayState {
    /// Every member in sync, nothing running, marked clean.
    Clean,
    /// Every member in sync.
    Active,
    /// Members missing or faulty, serving from redundancy.
    Degraded,
    /// Rebuilding onto a spare or replacement.
    Recovering,
    /// Resynchronising redundancy.
    Resyncing,
    /// Scrubbing.
    Checking,
    /// Beyond the level's tolerance: refuses I/O.
    Failed,
    /// Stopped.
    Stopped,
}

impl ArrayState {
    /// The lower-case name used in metrics labels.
    pub fn label(self) -> &'static str {
        match self {
            ArrayState::Clean => "clean",
            ArrayState::Active => "active",
            ArrayState::Degraded => "degraded",
            ArrayState::Recovering => "recovering",
            ArrayState::Resyncing => "resync",
            ArrayState::Checking => "check",
            ArrayState::Failed => "failed",
            ArrayState::Stopped => "stopped",
        }
    }
}

/// One member device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemberStatus {
    /// Its role, `None` for a spare.
    pub role: Option<usize>,
    /// Device UUID (nil when the role has no device).
    pub device: Uuid,
    /// The label it was given.
    pub label: String,
    /// In sync, rebuilding, faulty or missing; spares show `InSync`.
    pub state: RoleState,
    /// True for a spare.
    pub spare: bool,
    /// I/O errors seen on it (corrected read errors included).
    pub errors: u64,
    /// Read errors corrected by rewriting the rows from redundancy (this run).
    pub read_errors_corrected: u64,
    /// Read errors in the current decaying window; above the array's limit
    /// (`ArrayConfig::max_read_errors`) the member is failed.
    pub recent_read_errors: u64,
    /// Bytes of its data area rebuilt so far (while rebuilding).
    pub rebuilt_bytes: Option<u64>,
}

/// A snapshot of an array.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArrayStatus {
    /// Array UUID.
    pub uuid: Uuid,
    /// Name.
    pub name: String,
    /// Level.
    pub level: Level,
    /// Layout name (md's words: "left-symmetric", "near-2").
    pub layout: String,
    /// Chunk size in bytes.
    pub chunk_bytes: u64,
    /// Member roles.
    pub raid_disks: usize,
    /// Capacity in bytes.
    pub size_bytes: u64,
    /// Overall state.
    pub state: ArrayState,
    /// Why the array failed, when it has.
    pub failed_reason: Option<String>,
    /// Why the last rebuild stopped short, while it stays stopped: rows of a survivor
    /// that can be neither read nor rebuilt, with the stripe, the array byte range and
    /// the member (md's `recovery_disabled`). The array runs degraded and no rebuild
    /// starts again until a device is added (a spare, a replacement), which clears it.
    /// Not kept across a restart: an assembly tries the rebuild again, as md does.
    pub rebuild_stopped: Option<String>,
    /// Superblock event counter.
    pub events: u64,
    /// Write journal on.
    pub journal: bool,
    /// Block checksums on.
    pub checksums: bool,
    /// Members by role.
    pub members: Vec<MemberStatus>,
    /// Spares.
    pub spares: Vec<MemberStatus>,
    /// The running job.
    pub job: Option<JobSnapshot>,
    /// The last finished scrub's findings.
    pub last_scrub: Option<ScrubReport>,
}

impl ArrayStatus {
    /// Status in the shape of `/proc/mdstat`, for `basalt pool status`:
    ///
    /// ```text
    /// pool0 : active raid6 disk0[0] disk1[1] disk2[2](F) disk3[3] disk4[4](S)
    ///       393216 blocks level 6, 64k chunk, algorithm 2 [4/3] [UU_U]
    ///       [====>................]  recovery = 21.4% (84160/393216) finish=0.3min speed=10240K/sec
    /// ```
    pub fn md_text(&self) -> String {
        let mut s = format!("{} : {} {}", self.name, self.state.label(), self.level);
        for m in &self.members {
            let role = m.role.unwrap_or(0);
            let label = if m.label.is_empty() {
                "(none)"
            } else {
                &m.label
            };
            s.push_str(&format!(" {label}[{role}]"));
            if m.state == RoleState::Faulty {
                s.push_str("(F)");
            }
        }
        for (i, m) in self.spares.iter().enumerate() {
            s.push_str(&format!(" {}[{}](S)", m.label, self.raid_disks + i));
        }
        let up: String = self
            .members
            .iter()
            .map(|m| {
                if m.state == RoleState::InSync {
                    'U'
                } else {
                    '_'
                }
            })
            .collect();
        let n_up = up.chars().filter(|&c| c == 'U').count();
        let detail = match self.level {
            Level::Raid5 | Level::Raid6 => format!(
                " level {}, {}k chunk, algorithm 2",
                self.level.number(),
                self.chunk_bytes / 1024
            ),
            Level::Raid10 => format!(" {}k chunk, {}", self.chunk_bytes / 1024, self.layout),
            Level::Raid0 => format!(" {}k chunk", self.chunk_bytes / 1024),
            Level::Raid1 => String::new(),
        };
        s.push_str(&format!(
            "\n      {} blocks{detail} [{}/{n_up}] [{up}]",
            self.size_bytes / 1024,
            self.raid_disks
        ));
        if let Some(j) = &self.job {
            let word = match j.kind {
                JobKind::Rebuild => "recovery",
                JobKind::Resync => "resync",
                JobKind::Check => "check",
                JobKind::Repair => "repair",
            };
            let frac = if j.total_bytes > 0 {
                j.done_bytes as f64 / j.total_bytes as f64
            } else {
                0.0
            };
            let width = 20;
            let filled = ((frac * width as f64) as usize).min(width);
            let bar: String = std::iter::repeat_n('=', filled.saturating_sub(1))
                .chain((filled > 0).then_some('>'))
                .chain(std::iter::repeat_n('.', width - filled))
                .collect();
            let finish = j
                .eta_seconds
                .map_or("?".into(), |e| format!("{:.1}min", e / 60.0));
            s.push_str(&format!(
                "\n      [{bar}]  {word} = {:.1}% ({}/{}) finish={finish} speed={}K/sec",
                frac * 100.0,
                j.done_bytes / 1024,
                j.total_bytes / 1024,
                (j.rate_bytes_per_sec / 1024.0) as u64
            ));
        }
        if let Some(r) = &self.failed_reason {
            s.push_str(&format!("\n      FAILED: {r}"));
        }
        if let Some(r) = &self.rebuild_stopped {
            s.push_str(&format!("\n      REBUILD STOPPED: {r}"));
        }
        s
    }
}

/// Monotonic counters of one array, updated on the I/O path.
#[derive(Debug, Default)]
pub struct ArrayMetrics {
    /// Read requests.
    pub reads: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Write requests.
    pub writes: AtomicU64,
    /// Bytes written by callers.
    pub write_bytes: AtomicU64,
    /// Stripe segments written as full stripes (no reads).
    pub full_stripe_writes: AtomicU64,
    /// Stripe segments written by read-modify-write.
    pub rmw_writes: AtomicU64,
    /// Stripe segments written by reconstruct-write.
    pub rcw_writes: AtomicU64,
    /// Stripe segments written while a member was missing.
    pub degraded_writes: AtomicU64,
    /// Reads served by reconstruction.
    pub degraded_reads: AtomicU64,
    /// Journal transactions.
    pub journal_writes: AtomicU64,
    /// Bytes written to the journal (headers included).
    pub journal_bytes: AtomicU64,
    /// Journal checkpoints.
    pub journal_checkpoints: AtomicU64,
    /// Transactions replayed at assembly.
    pub journal_replayed: AtomicU64,
    /// Member I/O errors.
    pub member_errors: AtomicU64,
    /// Member read errors corrected by rewriting from redundancy.
    pub read_errors_corrected: AtomicU64,
    /// Bytes processed by rebuild, resync and scrub.
    pub sync_bytes: AtomicU64,
    /// Mismatches found by the running or last scrub.
    pub scrub_mismatches: AtomicU64,
    /// Rows repaired by scrubs.
    pub scrub_repaired: AtomicU64,
}

/// A copy of the counters plus gauges from the state. Field names follow the
/// suggested series in the [module docs](self).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[allow(missing_docs)]
pub struct MetricsSnapshot {
    pub state: String,
    pub size_bytes: u64,
    pub sync_done_bytes: u64,
    pub sync_total_bytes: u64,
    pub disks_active: u64,
    pub disks_rebuilding: u64,
    pub disks_faulty: u64,
    pub disks_missing: u64,
    pub disks_spare: u64,
    pub reads_total: u64,
    pub read_bytes_total: u64,
    pub writes_total: u64,
    pub write_bytes_total: u64,
    pub full_stripe_writes_total: u64,
    pub rmw_writes_total: u64,
    pub rcw_writes_total: u64,
    pub degraded_writes_total: u64,
    pub degraded_reads_total: u64,
    pub journal_writes_total: u64,
    pub journal_bytes_total: u64,
    pub journal_checkpoints_total: u64,
    pub journal_replayed_total: u64,
    pub member_errors_total: u64,
    pub read_errors_corrected_total: u64,
    pub sync_bytes_total: u64,
    pub scrub_mismatches: u64,
    pub scrub_repaired_total: u64,
}

impl Array {
    /// A snapshot of the array's state.
    pub fn status(&self) -> ArrayStatus {
        let i = &self.inner;
        let job = i.jobs.current();
        let st = i.state();
        let members: Vec<MemberStatus> = st
            .slots
            .iter()
            .enumerate()
            .map(|(r, s)| MemberStatus {
                role: Some(r),
                device: s.member.as_ref().map(|m| m.uuid).unwrap_or_default(),
                label: s
                    .member
                    .as_ref()
                    .map(|m| m.label.clone())
                    .unwrap_or_default(),
                state: if s.member.is_none() && s.state != RoleState::Faulty {
                    RoleState::Missing
                } else {
                    s.state
                },
                spare: false,
                errors: s.member.as_ref().map_or(0, |m| m.errors.load(Relaxed)),
                read_errors_corrected: s.member.as_ref().map_or(0, |m| m.corrected.load(Relaxed)),
                recent_read_errors: s.member.as_ref().map_or(0, |m| i.recent_read_errors(m)),
                rebuilt_bytes: (s.state == RoleState::Rebuilding)
                    .then(|| s.recovery * i.layout.chunk),
            })
            .collect();
        let spares = st
            .spares
            .iter()
            .map(|m| MemberStatus {
                role: None,
                device: m.uuid,
                label: m.label.clone(),
                state: RoleState::InSync,
                spare: true,
                errors: m.errors.load(Relaxed),
                read_errors_corrected: m.corrected.load(Relaxed),
                recent_read_errors: i.recent_read_errors(m),
                rebuilt_bytes: None,
            })
            .collect();
        let degraded = members.iter().any(|m| m.state != RoleState::InSync);
        let state = if st.stopped {
            ArrayState::Stopped
        } else if st.failed.is_some() {
            ArrayState::Failed
        } else if let Some(j) = job.as_ref().filter(|j| j.state == JobState::Running) {
            match j.kind {
                JobKind::Rebuild => ArrayState::Recovering,
                JobKind::Resync => ArrayState::Resyncing,
                _ if degraded => ArrayState::Degraded,
                _ => ArrayState::Checking,
            }
        } else if degraded {
            ArrayState::Degraded
        } else if st.clean
            && i.last_write
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .elapsed()
                > std::time::Duration::from_secs(2)
        {
            ArrayState::Clean
        } else {
            ArrayState::Active
        };
        let layout = match i.layout.level {
            Level::Raid5 | Level::Raid6 => "left-symmetric".to_string(),
            Level::Raid10 => format!("near-{}", i.layout.copies),
            _ => String::new(),
        };
        let failed_reason = st.failed.clone();
        // Read under the same lock as the roles and the state: it is set and cleared
        // together with them (`jobs`, `take_role`, `add_spare`).
        let rebuild_stopped = st.rebuild_stopped.clone();
        drop(st);
        let events = i.events.load(Relaxed);
        ArrayStatus {
            uuid: i.uuid,
            name: i.name.clone(),
            level: i.layout.level,
            layout,
            chunk_bytes: i.layout.chunk,
            raid_disks: i.layout.members,
            size_bytes: i.layout.capacity(),
            state,
            failed_reason,
            rebuild_stopped,
            events,
            journal: i.journal,
            checksums: i.checksums,
            members,
            spares,
            job,
            last_scrub: i.jobs.last_report(),
        }
    }

    /// The counters and gauges.
    pub fn metrics(&self) -> MetricsSnapshot {
        let status = self.status();
        let m = &self.inner.metrics;
        let count = |s: RoleState| status.members.iter().filter(|x| x.state == s).count() as u64;
        let (done, total) = status
            .job
            .as_ref()
            .map_or((status.size_bytes, status.size_bytes), |j| {
                (j.done_bytes, j.total_bytes)
            });
        MetricsSnapshot {
            state: status.state.label().to_string(),
            size_bytes: status.size_bytes,
            sync_done_bytes: done,
            sync_total_bytes: total,
            disks_active: count(RoleState::InSync),
            disks_rebuilding: count(RoleState::Rebuilding),
            disks_faulty: count(RoleState::Faulty),
            disks_missing: count(RoleState::Missing),
            disks_spare: status.spares.len() as u64,
            reads_total: m.reads.load(Relaxed),
            read_bytes_total: m.read_bytes.load(Relaxed),
            writes_total: m.writes.load(Relaxed),
            write_bytes_total: m.write_bytes.load(Relaxed),
            full_stripe_writes_total: m.full_stripe_writes.load(Relaxed),
            rmw_writes_total: m.rmw_writes.load(Relaxed),
            rcw_writes_total: m.rcw_writes.load(Relaxed),
            degraded_writes_total: m.degraded_writes.load(Relaxed),
            degraded_reads_total: m.degraded_reads.load(Relaxed),
            journal_writes_total: m.journal_writes.load(Relaxed),
            journal_bytes_total: m.journal_bytes.load(Relaxed),
            journal_checkpoints_total: m.journal_checkpoints.load(Relaxed),
            journal_replayed_total: m.journal_replayed.load(Relaxed),
            member_errors_total: m.member_errors.load(Relaxed),
            read_errors_corrected_total: m.read_errors_corrected.load(Relaxed),
            sync_bytes_total: m.sync_bytes.load(Relaxed),
            scrub_mismatches: m.scrub_mismatches.load(Relaxed),
            scrub_repaired_total: m.scrub_repaired.load(Relaxed),
        }
    }
}
