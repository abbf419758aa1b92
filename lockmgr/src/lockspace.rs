//! [`Lockspace`]: one host's membership of a lockspace on a shared device, its
//! heartbeat task, and its locks. The protocol is argued in `lockmgr/DESIGN.md`; the
//! comments here point at the rule each step implements.

use crate::cas::{self, Cas, Trips};
use crate::clock::{BootClock, Clock, SystemWallClock, WallClock};
use crate::error::{FenceReason, LockError, LostReason};
use crate::fence::{Fence, LeaseCell};
use crate::format::{
    FormatError, Header, Holder, LockMode, LockRecord, ResourceId, Slot, SlotState, PAYLOAD_LEN,
};
use crate::metrics::{Metrics, MetricsSnapshot};
use async_trait::async_trait;
use basalt_blockdev::{SharedBlockDev, ZeroFlags};
use bytes::Bytes;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // Incarnations need only differ between incarnations of a slot; fall back to
        // the address of a fresh allocation mixed with the boot clock.
        let x = Box::new(0u8);
        let p = &*x as *const u8 as u64;
        return p ^ (BootClock.now().as_nanos() as u64).rotate_left(17);
    }
    u64::from_le_bytes(b)
}

/// Marks a header sector claimed by a [`Lockspace::format`] in progress; the rest of
/// the sector is a random nonce, so two hosts' claims differ.
const FORMAT_CLAIM_MAGIC: [u8; 8] = *b"BSLTFMT\0";

pub(crate) fn format_claim(sector: usize) -> Bytes {
    let mut b = vec![0u8; sector];
    b[..8].copy_from_slice(&FORMAT_CLAIM_MAGIC);
    for chunk in b[8..].chunks_mut(8).take(4) {
        let n = chunk.len();
        chunk.copy_from_slice(&random_u64().to_le_bytes()[..n]);
    }
    Bytes::from(b)
}

fn is_format_claim(sector: &[u8]) -> bool {
    sector.starts_with(&FORMAT_CLAIM_MAGIC)
}

/// Parameters of [`Lockspace::format`].
#[derive(Debug, Clone)]
pub struct FormatOptions {
    /// Heartbeat slots (default 64).
    pub max_hosts: u32,
    /// Lock records: the number of distinct resources ever locked (default 4096).
    pub max_locks: u32,
    /// Heartbeat period (default 3 s).
    pub heartbeat: Duration,
    /// A host whose slot is unchanged this long is dead (default 9 s; at least three
    /// heartbeat periods).
    pub dead_after: Duration,
    /// Overwrite an existing lockspace.
    pub force: bool,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            max_hosts: 64,
            max_locks: 4096,
            heartbeat: Duration::from_secs(3),
            dead_after: Duration::from_secs(9),
            force: false,
        }
    }
}

/// Host-local knobs (not on disk; may differ between hosts).
#[derive(Debug, Clone)]
pub struct Tuning {
    /// How often the heartbeat region is read to watch the other hosts. Takeover
    /// happens at most this long after `dead_after` (default 500 ms).
    pub scan_interval: Duration,
    /// Timeout of one lock-manager request (default: half the heartbeat period).
    pub io_timeout: Option<Duration>,
    /// Longest pause between polls of a contended lock (default 500 ms; it starts at
    /// 5 ms and doubles).
    pub poll_max: Duration,
    /// How long `join` waits for a previous incarnation's slot to be recovered before
    /// giving up with [`LockError::RecoveryPending`] (default: 3 × dead_after).
    pub join_wait: Option<Duration>,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            scan_interval: Duration::from_millis(500),
            io_timeout: None,
            poll_max: Duration::from_millis(500),
            join_wait: None,
        }
    }
}

/// What the recovery callback gets about a dead host.
#[derive(Debug, Clone)]
pub struct RecoveryInfo {
    /// The dead host's slot.
    pub slot: u16,
    /// The dead host's id.
    pub host: [u8; 16],
    /// Its host name as it recorded it.
    pub hostname: String,
    /// The generation it (or its last recoverer) had.
    pub dead_generation: u32,
    /// The generation the slot has now.
    pub generation: u32,
    /// Its journal location (from its slot).
    pub journal_offset: u64,
    /// Its journal length.
    pub journal_len: u64,
    /// Token for the recovery's writes: valid while this host's lease and its hold on
    /// the dead slot are. Check it (or write through a `FencedDev`) as for any lock.
    pub fence: Fence,
}

/// Replays a dead host's journal. Called on the host that took the slot over, after the
/// dead host's locks were transferred to the recovering generation (so nobody else can
/// take them) and before they are released. Must be idempotent: if this host dies
/// mid-way, another one takes over and runs it again.
#[async_trait]
pub trait Recovery: Send + Sync + 'static {
    /// Recovers; an error abandons the slot, which is taken over again after the dead-host
    /// timeout.
    async fn recover(&self, info: RecoveryInfo) -> Result<(), String>;
}

/// Parameters of [`Lockspace::join`].
#[derive(Clone)]
pub struct JoinOptions {
    /// This host's unique id (stable across restarts).
    pub host_id: [u8; 16],
    /// Host name for status displays (at most 64 bytes are stored).
    pub hostname: String,
    /// Where this host's journal lives, recorded in its slot for recovery.
    pub journal_offset: u64,
    /// Journal length.
    pub journal_len: u64,
    /// Clock for leases and liveness (default [`BootClock`]).
    pub clock: Arc<dyn Clock>,
    /// Wall clock, for display only (default the system's).
    pub wall: Arc<dyn WallClock>,
    /// Called to recover a dead host's slot; `None`: nothing to replay.
    pub recovery: Option<Arc<dyn Recovery>>,
    /// Host-local knobs.
    pub tuning: Tuning,
}

impl JoinOptions {
    /// Options with defaults for everything but the id.
    pub fn new(host_id: [u8; 16], hostname: impl Into<String>) -> Self {
        JoinOptions {
            host_id,
            hostname: hostname.into(),
            journal_offset: 0,
            journal_len: 0,
            clock: Arc::new(BootClock),
            wall: Arc::new(SystemWallClock),
            recovery: None,
            tuning: Tuning::default(),
        }
    }
}

/// This host's state in the lockspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Renewing its slot; locks and fences valid.
    Live,
    /// Fenced itself: no protected write may be issued; rejoin to continue.
    Lost(LostReason),
    /// Left cleanly.
    Left,
}

/// Timing derived from the header.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timing {
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// Dead-host timeout.
    pub dead_after: Duration,
    /// Lease: how long after the issue of its last acknowledged renewal a host stays
    /// entitled to write (`dead_after - heartbeat`).
    pub lease: Duration,
}

impl Timing {
    fn from_header(h: &Header) -> Timing {
        let heartbeat = Duration::from_millis(h.heartbeat_ms.into());
        let dead_after = Duration::from_millis(h.dead_after_ms.into());
        Timing {
            heartbeat,
            dead_after,
            lease: dead_after - heartbeat,
        }
    }
}

/// How this host sees a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Presumed {
    /// Free.
    Free,
    /// Changing (or unchanged for less than the dead-host timeout).
    Alive,
    /// Unchanged for the dead-host timeout: may be taken over.
    Dead,
    /// This host's own slot.
    Mine,
    /// Being recovered by this host.
    RecoveringByMe,
    /// Failed its checksum.
    Corrupt,
}

/// One slot in a status report.
#[derive(Debug, Clone, Serialize)]
pub struct SlotStatus {
    /// Slot index.
    pub slot: u16,
    /// Decoded slot, if it decodes.
    pub state: Option<SlotState>,
    /// Host id (hex).
    pub host: String,
    /// Host name.
    pub hostname: String,
    /// Generation.
    pub generation: u32,
    /// Heartbeat counter.
    pub counter: u64,
    /// How this host judges it.
    pub presumed: Presumed,
    /// Since when (this host's monotonic clock) the slot has been unchanged.
    pub unchanged_for: Duration,
    /// Wall-clock time this host last saw it change (display only).
    pub last_change: SystemTime,
}

/// A lock this host holds.
#[derive(Debug, Clone, Serialize)]
pub struct HeldStatus {
    /// Resource.
    pub resource: ResourceId,
    /// Record index.
    pub index: u32,
    /// Mode.
    pub mode: LockMode,
    /// Epoch of the grant.
    pub epoch: u64,
}

/// Plain-data status of this host (in memory, no I/O).
#[derive(Debug, Clone, Serialize)]
pub struct LockspaceStatus {
    /// The lockspace id (hex).
    pub lockspace: String,
    /// Timing in force.
    pub timing: Timing,
    /// This host's slot.
    pub slot: u16,
    /// This host's generation.
    pub generation: u32,
    /// This host's state.
    pub state: HostState,
    /// Lease time left, zero when expired.
    pub lease_remaining: Duration,
    /// Every slot.
    pub slots: Vec<SlotStatus>,
    /// Locks held here.
    pub held: Vec<HeldStatus>,
    /// The last takeovers this host made (at most 16, oldest first).
    pub takeovers: Vec<TakeoverStatus>,
}

/// A takeover this host made, for status displays and for checking the dead-host
/// timeout from this host's own clock.
#[derive(Debug, Clone, Serialize)]
pub struct TakeoverStatus {
    /// The dead host's slot.
    pub slot: u16,
    /// The dead host's name.
    pub hostname: String,
    /// Generation of the image taken over.
    pub dead_generation: u32,
    /// Heartbeat counter of the image taken over (the dead host's last renewal that
    /// landed).
    pub dead_counter: u64,
    /// How long this host had seen that image unchanged when it decided (at least the
    /// dead-host timeout).
    pub unchanged_for: Duration,
    /// How long ago it decided.
    pub decided_ago: Duration,
}

/// A holder in [`LockInfo`].
#[derive(Debug, Clone, Serialize)]
pub struct HolderInfo {
    /// Slot.
    pub slot: u16,
    /// Generation of the entry.
    pub generation: u32,
    /// Host name of the slot's current owner.
    pub hostname: String,
    /// Whether the entry is current (its generation is the slot's).
    pub current: bool,
}

/// One bound lock record as read from disk (`basalt lock list`).
#[derive(Debug, Clone, Serialize)]
pub struct LockInfo {
    /// Record index.
    pub index: u32,
    /// Resource.
    pub resource: ResourceId,
    /// Mode, when held.
    pub mode: Option<LockMode>,
    /// Epoch.
    pub epoch: u64,
    /// Holders.
    pub holders: Vec<HolderInfo>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What this host knows about another slot.
struct Obs {
    image: Bytes,
    first_seen: Duration,
    changed_wall: SystemTime,
    taking_over: bool,
}

/// A slot this host decided to take over: when it first saw the image, and when it
/// decided (both on this host's clock).
#[derive(Clone)]
struct Dead {
    slot: u16,
    image: Bytes,
    seen: Duration,
    decided: Duration,
}

/// A takeover this host made (see [`TakeoverStatus`]).
struct TakeoverRecord {
    slot: u16,
    hostname: String,
    dead_generation: u32,
    dead_counter: u64,
    seen: Duration,
    decided: Duration,
}

/// A slot this host took over and is recovering.
struct Recovering {
    image: tokio::sync::Mutex<Bytes>,
    cell: Arc<LeaseCell>,
    pending_since: Mutex<Option<Duration>>,
}

/// A lock held here.
struct Held {
    index: u32,
    mode: LockMode,
    epoch: u64,
    image: Bytes,
    alive: Arc<AtomicBool>,
}

struct Own {
    image: Bytes,
    /// Issue time of the first attempt of the renewal in progress.
    pending_since: Option<Duration>,
}

pub(crate) struct Inner {
    dev: SharedBlockDev,
    base: u64,
    hdr: Header,
    sector: usize,
    timing: Timing,
    io_timeout: Duration,
    tuning: Tuning,
    clock: Arc<dyn Clock>,
    wall: Arc<dyn WallClock>,
    opts: JoinOptions,
    slot: u16,
    generation: u32,
    own: tokio::sync::Mutex<Own>,
    /// A copy of `own.image` for status reports, which must not wait for (or miss the
    /// image during) a renewal in flight.
    own_view: Mutex<Bytes>,
    cell: Arc<LeaseCell>,
    obs: Mutex<Vec<Obs>>,
    recovering: Mutex<HashMap<u16, Arc<Recovering>>>,
    takeovers: Mutex<std::collections::VecDeque<TakeoverRecord>>,
    held: Mutex<HashMap<ResourceId, Held>>,
    bindings: Mutex<HashMap<ResourceId, u32>>,
    cached: Mutex<HashMap<u32, Bytes>>,
    state: watch::Sender<HostState>,
    metrics: Arc<Metrics>,
}

/// One host's membership of a lockspace. See the [crate docs](crate).
pub struct Lockspace {
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
    watchdog: tokio::task::JoinHandle<()>,
}

impl Drop for Lockspace {
    fn drop(&mut self) {
        // Dropping without `leave` stops heartbeating: the slot goes stale and is taken
        // over after the dead-host timeout, as if the host had crashed.
        self.task.abort();
        self.watchdog.abort();
        self.inner.cell.revoke();
    }
}

async fn read_header(
    dev: &SharedBlockDev,
    base: u64,
    io_timeout: Duration,
) -> Result<Header, LockError> {
    let g = dev.geometry();
    let bs = g.block_size as usize;
    let b = cas::read(&**dev, base, bs, io_timeout, &mut Trips::default()).await?;
    let h = Header::decode(&b, bs).map_err(LockError::NotFormatted)?;
    if h.sector_size != g.block_size {
        return Err(LockError::SectorMismatch {
            lockspace: h.sector_size,
            device: g.block_size,
        });
    }
    let end = base.saturating_add(h.total_bytes());
    if end > g.capacity_bytes() {
        return Err(LockError::TooSmall {
            needed: h.total_bytes(),
            offset: base,
            capacity: g.capacity_bytes(),
        });
    }
    Ok(h)
}

/// A new header (fresh random lockspace id) for `opts`, checked.
fn new_header(sector_size: u32, opts: &FormatOptions) -> Result<Header, LockError> {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&random_u64().to_le_bytes());
    id[8..].copy_from_slice(&random_u64().to_le_bytes());
    let h = Header {
        sector_size,
        lockspace_id: id,
        max_hosts: opts.max_hosts,
        max_locks: opts.max_locks,
        heartbeat_ms: u32::try_from(opts.heartbeat.as_millis()).unwrap_or(u32::MAX),
        dead_after_ms: u32::try_from(opts.dead_after.as_millis()).unwrap_or(u32::MAX),
    };
    h.validate().map_err(LockError::InvalidFormat)?;
    Ok(h)
}

/// The header a new lockspace at byte `base` of `dev` gets, once the range is known to
/// fit on the device and to start on a block boundary.
fn header_for(dev: &SharedBlockDev, base: u64, opts: &FormatOptions) -> Result<Header, LockError> {
    let g = dev.geometry();
    let h = new_header(g.block_size, opts)?;
    let end = base.saturating_add(h.total_bytes());
    if end > g.capacity_bytes() || !base.is_multiple_of(u64::from(g.block_size)) {
        return Err(LockError::TooSmall {
            needed: h.total_bytes(),
            offset: base,
            capacity: g.capacity_bytes(),
        });
    }
    Ok(h)
}

impl Lockspace {
    /// Writes an empty lockspace at byte `base` of `dev` (an administrative step, like
    /// mkfs: no host may be using the range). Refuses to overwrite a valid lockspace
    /// unless `force`.
    ///
    /// Hosts may run this at once on a shared LUN (two admins, or two hosts' configs
    /// applied together), so the range is claimed first: the header sector is swapped
    /// with COMPARE AND WRITE from what was read to a claim of this format, the regions
    /// are zeroed, and the header replaces the claim with COMPARE AND WRITE again. Of
    /// two formats at once, one claims and the other gets
    /// [`LockError::FormatInProgress`] and writes nothing: without the claim, the
    /// loser's zeroing could wipe the slot of a host that had already joined the
    /// winner's lockspace. A claim left by a format that died is taken over with
    /// `force`.
    pub async fn format(
        dev: &SharedBlockDev,
        base: u64,
        opts: &FormatOptions,
    ) -> Result<Header, LockError> {
        let h = header_for(dev, base, opts)?;
        let t = Duration::from_secs(30);
        let sector = h.sector_size as usize;
        let current = cas::read(&**dev, base, sector, t, &mut Trips::default()).await?;
        if !opts.force {
            if read_header(dev, base, t).await.is_ok() {
                return Err(LockError::AlreadyFormatted);
            }
            if is_format_claim(&current) {
                return Err(LockError::FormatInProgress);
            }
        }
        let claim = format_claim(sector);
        let fua = basalt_blockdev::WriteFlags { fua: true };
        let swap = |old: Bytes, new: Bytes, what: &'static str| async move {
            match tokio::time::timeout(t, dev.compare_and_write(base, old, new.clone(), fua))
                .await
                .map_err(|_| LockError::IoTimeout(what))??
            {
                basalt_blockdev::CompareOutcome::Written => Ok(()),
                // Our own write, retried underneath after a lost answer, reads back as it.
                basalt_blockdev::CompareOutcome::Miscompare { .. } => {
                    let now = cas::read(&**dev, base, sector, t, &mut Trips::default()).await?;
                    if now == new {
                        Ok(())
                    } else {
                        Err(LockError::FormatInProgress)
                    }
                }
            }
        };
        swap(current, claim.clone(), "format claim compare-and-write").await?;
        let regions = h.total_bytes() - u64::from(h.sector_size);
        dev.write_zeroes(
            base + u64::from(h.sector_size),
            regions,
            ZeroFlags::default(),
        )
        .await?;
        dev.flush().await?;
        swap(claim, Bytes::from(h.encode()), "header compare-and-write").await?;
        Ok(h)
    }

    /// Formats a blank range (`format = true` on a fresh device): checks that the
    /// whole range the lockspace takes reads zero, then writes the header with
    /// COMPARE AND WRITE against a zeroed sector, and writes nothing else (the regions
    /// read zero already, which is their empty state). Of hosts formatting the same
    /// blank range at once, exactly one writes its header; the others get
    /// [`LockError::AlreadyFormatted`] and join the winner's lockspace. Writing
    /// nothing but the header is what makes that safe: the winner may already have
    /// joined (written its slot) when a loser gets there.
    ///
    /// A range that does not read zero is [`LockError::NotBlank`] (or
    /// [`LockError::AlreadyFormatted`] when it holds a lockspace).
    pub async fn format_if_blank(
        dev: &SharedBlockDev,
        base: u64,
        opts: &FormatOptions,
    ) -> Result<Header, LockError> {
        let h = header_for(dev, base, opts)?;
        let t = Duration::from_secs(30);
        if read_header(dev, base, t).await.is_ok() {
            return Err(LockError::AlreadyFormatted);
        }
        let g = dev.geometry();
        let step = u64::from(g.max_io_bytes.clamp(g.block_size.max(4096), 1 << 20));
        let mut at = 0;
        while at < h.total_bytes() {
            let n = step.min(h.total_bytes() - at);
            let len = usize::try_from(n).unwrap_or(usize::MAX);
            let b = cas::read(&**dev, base + at, len, t, &mut Trips::default()).await?;
            if b.iter().any(|&x| x != 0) {
                return Err(if at == 0 && read_header(dev, base, t).await.is_ok() {
                    LockError::AlreadyFormatted
                } else {
                    LockError::NotBlank {
                        offset: base + at + b.iter().position(|&x| x != 0).unwrap_or(0) as u64,
                    }
                });
            }
            at += n;
        }
        let sector = h.sector_size as usize;
        let new = Bytes::from(h.encode());
        let zero = Bytes::from(vec![0u8; sector]);
        let fua = basalt_blockdev::WriteFlags { fua: true };
        let r = tokio::time::timeout(t, dev.compare_and_write(base, zero, new.clone(), fua))
            .await
            .map_err(|_| LockError::IoTimeout("header compare-and-write"))??;
        match r {
            basalt_blockdev::CompareOutcome::Written => Ok(h),
            basalt_blockdev::CompareOutcome::Miscompare { .. } => {
                // Lost the race (or this host's own write, retried underneath).
                let cur = cas::read(&**dev, base, sector, t, &mut Trips::default()).await?;
                if cur == new {
                    Ok(h)
                } else if read_header(dev, base, t).await.is_ok() {
                    Err(LockError::AlreadyFormatted)
                } else {
                    Err(LockError::NotBlank { offset: base })
                }
            }
        }
    }

    /// Reads and checks the header at `base`.
    pub async fn read_header(dev: &SharedBlockDev, base: u64) -> Result<Header, LockError> {
        read_header(dev, base, Duration::from_secs(30)).await
    }

    /// Joins the lockspace at `base` of `dev`: claims a free slot with CAW and starts
    /// the heartbeat task (on the current tokio runtime).
    ///
    /// Refuses a host id that a live slot already uses ([`LockError::DuplicateHost`]).
    /// If a slot with this id exists but is stale (this host crashed and restarted),
    /// `join` first watches it for the dead-host timeout to be sure, then claims a new
    /// slot and takes the old one over like any dead host's (recovering its journal).
    pub async fn join(
        dev: SharedBlockDev,
        base: u64,
        opts: JoinOptions,
    ) -> Result<Lockspace, LockError> {
        let provisional = Duration::from_secs(5);
        let hdr = read_header(&dev, base, opts.tuning.io_timeout.unwrap_or(provisional)).await?;
        let timing = Timing::from_header(&hdr);
        let io_timeout = opts.tuning.io_timeout.unwrap_or(timing.heartbeat / 2);
        let sector = hdr.sector_size as usize;
        let clock = opts.clock.clone();
        let metrics = Arc::new(Metrics::default());
        let slots_at = base + hdr.slots_offset();
        let region_len = hdr.max_hosts as usize * sector;
        let mut trips = Trips::default();

        let read_slots = |dev: SharedBlockDev| async move {
            cas::read_region(
                &*dev,
                slots_at,
                region_len,
                io_timeout,
                &mut Trips::default(),
            )
            .await
        };

        // 1. Duplicate check: slots not free with our id.
        let mut region = read_slots(dev.clone()).await?;
        let mut seen_at = clock.now();
        let mine = |region: &[u8]| -> Vec<(u16, Vec<u8>)> {
            region
                .chunks(sector)
                .enumerate()
                .filter_map(|(i, img)| {
                    let s = Slot::decode(img, sector, i as u32).ok()?;
                    (s.state != SlotState::Free && s.host == opts.host_id)
                        .then(|| (i as u16, img.to_vec()))
                })
                .collect()
        };
        let old = mine(&region);
        let join_wait = opts.tuning.join_wait.unwrap_or(timing.dead_after * 3);
        let give_up = clock.now() + join_wait;
        let mut stale_since = seen_at;
        if !old.is_empty() {
            loop {
                tokio::time::sleep(opts.tuning.scan_interval).await;
                let now_region = read_slots(dev.clone()).await?;
                let now = clock.now();
                let mut changed = false;
                for (i, img) in &old {
                    let at = usize::from(*i) * sector;
                    let cur = &now_region[at..at + sector];
                    if cur != img.as_slice() {
                        changed = true;
                        match Slot::decode(cur, sector, u32::from(*i)) {
                            Ok(s) if s.state == SlotState::Live && s.host == opts.host_id => {
                                return Err(LockError::DuplicateHost { slot: *i })
                            }
                            Ok(s) if s.state == SlotState::Free => {}
                            _ if now >= give_up => {
                                return Err(LockError::RecoveryPending { slot: *i })
                            }
                            _ => {}
                        }
                    }
                }
                if changed {
                    // Something moved (freed, or a recovery renewing it): look again.
                    region = now_region;
                    let again = mine(&region);
                    if again.is_empty() {
                        seen_at = now;
                        break;
                    }
                    if now >= give_up {
                        return Err(LockError::RecoveryPending { slot: again[0].0 });
                    }
                    stale_since = now;
                    continue;
                }
                if now.saturating_sub(stale_since) >= timing.dead_after {
                    // Our previous incarnation is dead: claim a slot, then the scanner
                    // takes the old one over at once (its observation is old enough).
                    region = now_region;
                    seen_at = now;
                    break;
                }
            }
        }

        // 2. Claim a free slot.
        let mut claimed = None;
        for (i, img) in region.chunks(sector).enumerate() {
            let Ok(s) = Slot::decode(img, sector, i as u32) else {
                continue;
            };
            if s.state != SlotState::Free {
                continue;
            }
            let generation = s
                .generation
                .checked_add(1)
                .ok_or(LockError::GenerationOverflow(i as u16))?;
            let new = Slot {
                index: i as u32,
                state: SlotState::Live,
                host: opts.host_id,
                generation,
                counter: 0,
                incarnation: random_u64(),
                journal_offset: opts.journal_offset,
                journal_len: opts.journal_len,
                recoverer_slot: crate::format::NO_SLOT,
                recoverer_generation: 0,
                hostname: opts.hostname.clone(),
            };
            let new_img = Bytes::from(new.encode(sector));
            let t0 = clock.now();
            match cas::cas(
                &*dev,
                &*clock,
                &metrics,
                slots_at + (i * sector) as u64,
                Bytes::copy_from_slice(img),
                new_img.clone(),
                io_timeout,
                t0 + cas::step_window(io_timeout),
                &mut trips,
            )
            .await?
            {
                Cas::Applied => {
                    claimed = Some((i as u16, generation, new_img, t0));
                    break;
                }
                Cas::Conflict(_) => continue,
            }
        }
        let Some((slot, generation, image, t0)) = claimed else {
            return Err(LockError::NoFreeSlot);
        };

        // 3. Post-claim duplicate check (two processes joining with one id at once):
        // any other non-free slot with our id that was not there before wins nothing;
        // both back off.
        let after = read_slots(dev.clone()).await?;
        for (i, img) in after.chunks(sector).enumerate() {
            if i == usize::from(slot) {
                continue;
            }
            if let Ok(s) = Slot::decode(img, sector, i as u32) {
                let before = &region[i * sector..(i + 1) * sector];
                if s.state == SlotState::Live && s.host == opts.host_id && img != before {
                    let mut free = Slot::never_used(u32::from(slot));
                    free.generation = generation;
                    let _ = cas::cas(
                        &*dev,
                        &*clock,
                        &metrics,
                        slots_at + u64::from(slot) * sector as u64,
                        image.clone(),
                        Bytes::from(free.encode(sector)),
                        io_timeout,
                        clock.now() + cas::step_window(io_timeout),
                        &mut trips,
                    )
                    .await;
                    return Err(LockError::DuplicateHost { slot: i as u16 });
                }
            }
        }

        let wall_now = opts.wall.now();
        let obs = region
            .chunks(sector)
            .map(|img| Obs {
                image: Bytes::copy_from_slice(img),
                first_seen: seen_at,
                changed_wall: wall_now,
                taking_over: false,
            })
            .collect();
        let (state, _) = watch::channel(HostState::Live);
        let inner = Arc::new(Inner {
            cell: LeaseCell::new(t0 + timing.lease),
            dev,
            base,
            hdr,
            sector,
            timing,
            io_timeout,
            tuning: opts.tuning.clone(),
            clock,
            wall: opts.wall.clone(),
            opts,
            slot,
            generation,
            own_view: Mutex::new(image.clone()),
            own: tokio::sync::Mutex::new(Own {
                image,
                pending_since: None,
            }),
            obs: Mutex::new(obs),
            recovering: Mutex::new(HashMap::new()),
            takeovers: Mutex::new(std::collections::VecDeque::new()),
            held: Mutex::new(HashMap::new()),
            bindings: Mutex::new(HashMap::new()),
            cached: Mutex::new(HashMap::new()),
            state,
            metrics,
        });
        let task = tokio::spawn(heartbeat_loop(inner.clone(), t0));
        let watchdog = tokio::spawn(lease_watchdog(inner.clone()));
        Ok(Lockspace {
            inner,
            task,
            watchdog,
        })
    }

    /// This host's slot.
    pub fn slot(&self) -> u16 {
        self.inner.slot
    }

    /// This host's slot generation.
    pub fn generation(&self) -> u32 {
        self.inner.generation
    }

    /// The lockspace header.
    pub fn header(&self) -> &Header {
        &self.inner.hdr
    }

    /// Timing in force.
    pub fn timing(&self) -> Timing {
        self.inner.timing
    }

    /// The current state.
    pub fn state(&self) -> HostState {
        *self.inner.state.borrow()
    }

    /// A receiver that sees every state change (the "lost" notification).
    pub fn subscribe(&self) -> watch::Receiver<HostState> {
        self.inner.state.subscribe()
    }

    /// Waits until this host is lost and says why. On return, every [`Fence`] of this
    /// host already fails: stop issuing protected writes and rejoin.
    pub async fn lost(&self) -> LostReason {
        let mut rx = self.subscribe();
        loop {
            if let HostState::Lost(r) = *rx.borrow_and_update() {
                return r;
            }
            if rx.changed().await.is_err() {
                return LostReason::LeaseExpired;
            }
        }
    }

    /// A token for writes protected by this host's membership alone (not by a lock).
    pub fn fence(&self) -> Fence {
        self.inner.fence(None, 0, vec![self.inner.cell.clone()])
    }

    /// Acquires `resource` in `mode`, waiting while others hold it incompatibly.
    pub async fn lock(&self, resource: ResourceId, mode: LockMode) -> Result<LockGuard, LockError> {
        Inner::acquire(&self.inner, resource, mode, Wait::Forever).await
    }

    /// As [`lock`](Self::lock), giving up with [`LockError::Timeout`] after `timeout`.
    pub async fn lock_timeout(
        &self,
        resource: ResourceId,
        mode: LockMode,
        timeout: Duration,
    ) -> Result<LockGuard, LockError> {
        let until = self.inner.clock.now() + timeout;
        Inner::acquire(&self.inner, resource, mode, Wait::Until(until)).await
    }

    /// Acquires `resource` in `mode` if nobody holds it incompatibly, else fails with
    /// [`LockError::WouldBlock`] at once.
    pub async fn try_lock(
        &self,
        resource: ResourceId,
        mode: LockMode,
    ) -> Result<LockGuard, LockError> {
        Inner::acquire(&self.inner, resource, mode, Wait::No).await
    }

    /// Releases every lock held and frees the slot (keeping its generation), then stops
    /// heartbeating. Locks still guarded elsewhere become invalid.
    pub async fn leave(self) -> Result<(), LockError> {
        let held: Vec<ResourceId> = lock(&self.inner.held).keys().copied().collect();
        for r in held {
            Inner::release(&self.inner, r).await?;
        }
        self.inner.check_live()?;
        let mut own = self.inner.own.lock().await;
        let mut free = Slot::never_used(u32::from(self.inner.slot));
        free.generation = self.inner.generation;
        let now = self.inner.clock.now();
        match self
            .inner
            .cas(
                self.inner.slot_offset(self.inner.slot),
                own.image.clone(),
                Bytes::from(free.encode(self.inner.sector)),
                now + cas::step_window(self.inner.io_timeout),
                &mut Trips::default(),
            )
            .await?
        {
            Cas::Applied => {}
            Cas::Conflict(_) => {
                drop(own);
                self.inner.go_lost(LostReason::TakenOver);
                return Err(LockError::Lost(LostReason::TakenOver));
            }
        }
        own.image = Bytes::new();
        *lock(&self.inner.own_view) = Bytes::new();
        self.task.abort();
        self.watchdog.abort();
        self.inner.cell.revoke();
        self.inner.state.send_replace(HostState::Left);
        Ok(())
    }

    /// Counters and histograms.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.inner.metrics.snapshot()
    }

    /// Slots, this host's state and its locks, from memory.
    pub fn status(&self) -> LockspaceStatus {
        self.inner.status()
    }

    /// Every bound lock record, read from disk, with holders named (`basalt lock list`).
    pub async fn list_locks(&self) -> Result<Vec<LockInfo>, LockError> {
        self.inner.list_locks().await
    }
}

enum Wait {
    No,
    Forever,
    Until(Duration),
}

/// How an acquirer judges a holder entry against the slot table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// The holder's incarnation owns its slot (or a recovery holds it for it).
    Valid,
    /// Its slot is being recovered and the entry not yet transferred: wait.
    Pending,
    /// Its incarnation is gone and recovered: the entry may be dropped.
    Stale,
}

fn classify(h: &Holder, slots: &[Result<Slot, FormatError>]) -> Class {
    match slots.get(usize::from(h.slot)) {
        None => Class::Stale,
        Some(Err(_)) => Class::Pending,
        Some(Ok(s)) => match s.state {
            SlotState::Free => Class::Stale,
            SlotState::Live if s.generation == h.generation => Class::Valid,
            SlotState::Live => Class::Stale,
            SlotState::Recovering if s.generation == h.generation => Class::Valid,
            SlotState::Recovering => Class::Pending,
        },
    }
}

/// A granted lock. Release with [`unlock`](Self::unlock); dropping it releases in the
/// background (best effort).
pub struct LockGuard {
    inner: Arc<Inner>,
    resource: ResourceId,
    mode: LockMode,
    index: u32,
    fence: Fence,
    done: bool,
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("resource", &self.resource)
            .field("mode", &self.mode)
            .field("index", &self.index)
            .field("fence", &self.fence)
            .finish()
    }
}

impl LockGuard {
    /// The fencing token: check it before every protected write.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// The resource.
    pub fn resource(&self) -> ResourceId {
        self.resource
    }

    /// The mode.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// The epoch of this grant (see [`Fence::epoch`]).
    pub fn epoch(&self) -> u64 {
        self.fence.epoch
    }

    /// Releases the lock. Fails with [`LockError::Fenced`] if it had been broken or this
    /// host was lost (the entry then stays for the recovering host).
    pub async fn unlock(mut self) -> Result<(), LockError> {
        self.done = true;
        Inner::release(&self.inner, self.resource).await
    }

    /// Reads the lock's value block.
    pub async fn read_payload(&self) -> Result<[u8; PAYLOAD_LEN], LockError> {
        let img = self
            .inner
            .read_record(self.index, &mut Trips::default())
            .await?;
        match self.inner.decode_record(self.index, &img)? {
            Some(r) => Ok(r.payload),
            None => Err(LockError::Fenced(FenceReason::Broken)),
        }
    }

    /// Writes the lock's value block with a CAW of the whole record, which refuses the
    /// write unless this host's entry (slot, generation) is still there: the strongest
    /// fence (see [`crate::fence`]). At most [`PAYLOAD_LEN`] bytes; the rest is zeroed.
    pub async fn write_payload(&self, data: &[u8]) -> Result<(), LockError> {
        if data.len() > PAYLOAD_LEN {
            return Err(LockError::Invalid("payload longer than the value block"));
        }
        let me = self.fence.holder;
        let mut img = match lock(&self.inner.held).get(&self.resource) {
            Some(h) => h.image.clone(),
            None => return Err(LockError::Fenced(FenceReason::Released)),
        };
        loop {
            self.fence.check_for(self.inner.io_timeout)?;
            let Some(mut rec) = self.inner.decode_record(self.index, &img)? else {
                return Err(LockError::Fenced(FenceReason::Broken));
            };
            if !rec.holders.contains(&me) {
                self.inner.metrics.fenced_writes_refused.inc();
                return Err(LockError::Fenced(FenceReason::Broken));
            }
            rec.payload = [0; PAYLOAD_LEN];
            rec.payload[..data.len()].copy_from_slice(data);
            let new = Bytes::from(rec.encode(self.inner.sector));
            let deadline = self.inner.clock.now() + cas::step_window(self.inner.io_timeout);
            match self
                .inner
                .cas(
                    self.inner.record_offset(self.index),
                    img,
                    new.clone(),
                    deadline,
                    &mut Trips::default(),
                )
                .await?
            {
                Cas::Applied => {
                    if let Some(h) = lock(&self.inner.held).get_mut(&self.resource) {
                        h.image = new;
                    }
                    return Ok(());
                }
                Cas::Conflict(cur) => img = cur,
            }
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let inner = self.inner.clone();
        let r = self.resource;
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                let _ = Inner::release(&inner, r).await;
            });
        }
    }
}

impl Inner {
    fn slot_offset(&self, slot: u16) -> u64 {
        self.base + self.hdr.slots_offset() + u64::from(slot) * self.sector as u64
    }

    fn record_offset(&self, index: u32) -> u64 {
        self.base + self.hdr.locks_offset() + u64::from(index) * self.sector as u64
    }

    fn me(&self) -> Holder {
        Holder {
            slot: self.slot,
            generation: self.generation,
        }
    }

    fn fence(
        &self,
        held: Option<Arc<AtomicBool>>,
        epoch: u64,
        cells: Vec<Arc<LeaseCell>>,
    ) -> Fence {
        Fence {
            cells,
            held,
            clock: self.clock.clone(),
            holder: self.me(),
            epoch,
            metrics: self.metrics.clone(),
        }
    }

    /// Fails unless this host is live with lease left for one more request.
    fn check_live(&self) -> Result<Duration, LockError> {
        if let HostState::Lost(r) = *self.state.borrow() {
            return Err(LockError::Lost(r));
        }
        match self.cell.remaining(self.clock.now()) {
            Ok(left) if left > self.io_timeout => Ok(left),
            Ok(_) | Err(FenceReason::LeaseExpired) => {
                Err(LockError::Fenced(FenceReason::LeaseExpired))
            }
            Err(r) => Err(LockError::Fenced(r)),
        }
    }

    async fn cas(
        &self,
        offset: u64,
        old: Bytes,
        new: Bytes,
        deadline: Duration,
        trips: &mut Trips,
    ) -> Result<Cas, LockError> {
        cas::cas(
            &*self.dev,
            &*self.clock,
            &self.metrics,
            offset,
            old,
            new,
            self.io_timeout,
            deadline,
            trips,
        )
        .await
    }

    async fn read_record(&self, index: u32, trips: &mut Trips) -> Result<Bytes, LockError> {
        cas::read(
            &*self.dev,
            self.record_offset(index),
            self.sector,
            self.io_timeout,
            trips,
        )
        .await
    }

    async fn read_slots(&self, trips: &mut Trips) -> Result<Vec<u8>, LockError> {
        cas::read_region(
            &*self.dev,
            self.base + self.hdr.slots_offset(),
            self.hdr.max_hosts as usize * self.sector,
            self.io_timeout,
            trips,
        )
        .await
    }

    fn decode_slots(&self, region: &[u8]) -> Vec<Result<Slot, FormatError>> {
        region
            .chunks(self.sector)
            .enumerate()
            .map(|(i, img)| Slot::decode(img, self.sector, i as u32))
            .collect()
    }

    fn decode_record(&self, index: u32, img: &[u8]) -> Result<Option<LockRecord>, LockError> {
        LockRecord::decode(img, self.sector, index).map_err(|source| {
            self.metrics.checksum_errors.inc();
            LockError::Corrupt { index, source }
        })
    }

    fn go_lost(&self, reason: LostReason) {
        let first = !matches!(*self.state.borrow(), HostState::Lost(_) | HostState::Left);
        self.cell.revoke();
        for r in lock(&self.recovering).values() {
            r.cell.revoke();
        }
        for h in lock(&self.held).values() {
            h.alive.store(false, Ordering::Release);
        }
        if first {
            self.metrics.fencing_events.inc();
            tracing::error!(
                slot = self.slot,
                ?reason,
                "lock manager lost its lease: fenced"
            );
            self.state.send_replace(HostState::Lost(reason));
        }
    }

    /// Finds or binds the record of `res`: linear probing from its home record; a
    /// record once bound stays bound, so every host probes the same path to the same
    /// record.
    async fn bind(&self, res: ResourceId, trips: &mut Trips) -> Result<(u32, Bytes), LockError> {
        let bound = lock(&self.bindings).get(&res).copied();
        if let Some(idx) = bound {
            let cached = lock(&self.cached).get(&idx).cloned();
            if let Some(img) = cached {
                return Ok((idx, img));
            }
            return Ok((idx, self.read_record(idx, trips).await?));
        }
        let n = self.hdr.max_locks;
        let home = res.home(n);
        for p in 0..n {
            let idx = (home + p) % n;
            let mut img = self.read_record(idx, trips).await?;
            loop {
                match self.decode_record(idx, &img)? {
                    None => {
                        self.check_live()?;
                        let new = Bytes::from(LockRecord::bound(idx, res).encode(self.sector));
                        let deadline = self.clock.now() + cas::step_window(self.io_timeout);
                        match self
                            .cas(self.record_offset(idx), img, new.clone(), deadline, trips)
                            .await?
                        {
                            Cas::Applied => {
                                lock(&self.bindings).insert(res, idx);
                                return Ok((idx, new));
                            }
                            Cas::Conflict(cur) => img = cur,
                        }
                    }
                    Some(r) if r.resource == res => {
                        lock(&self.bindings).insert(res, idx);
                        return Ok((idx, img));
                    }
                    Some(_) => break,
                }
            }
        }
        Err(LockError::TableFull)
    }

    async fn acquire(
        self: &Arc<Self>,
        res: ResourceId,
        mode: LockMode,
        wait: Wait,
    ) -> Result<LockGuard, LockError> {
        if res.is_zero() {
            return Err(LockError::Invalid("all-zero resource id"));
        }
        self.check_live()?;
        if lock(&self.held).contains_key(&res) {
            return Err(LockError::AlreadyHeld);
        }
        let started = self.clock.now();
        let mut trips = Trips::default();
        let (idx, mut img) = self.bind(res, &mut trips).await?;
        let me = self.me();
        let mut backoff = Duration::from_millis(5);
        let mut counted_contention = false;
        loop {
            let rec = match self.decode_record(idx, &img)? {
                Some(r) if r.resource == res => r,
                _ => {
                    return Err(LockError::Corrupt {
                        index: idx,
                        source: FormatError::Field {
                            field: "resource binding",
                            value: u64::from(idx),
                        },
                    })
                }
            };
            let others = rec.holders.iter().any(|h| h.slot != me.slot);
            let slots = if others {
                self.read_slots(&mut trips)
                    .await
                    .map(|r| self.decode_slots(&r))?
            } else {
                Vec::new()
            };
            let mut keep = Vec::new();
            let mut stale = 0u64;
            for h in &rec.holders {
                if h.slot == me.slot {
                    // A leftover of ours (an acquire whose answer we lost); re-added below.
                    continue;
                }
                match classify(h, &slots) {
                    Class::Valid | Class::Pending => keep.push(*h),
                    Class::Stale => stale += 1,
                }
            }
            let compatible = keep.is_empty() || rec.mode.is_some_and(|m| m.compatible(mode));
            if compatible {
                let mut new = rec.clone();
                new.holders = keep;
                new.holders.push(me);
                new.mode = Some(mode);
                new.epoch = rec.epoch.wrapping_add(1);
                let new_img = Bytes::from(new.encode(self.sector));
                self.check_live()?;
                let deadline = self.clock.now() + cas::step_window(self.io_timeout);
                match self
                    .cas(
                        self.record_offset(idx),
                        img,
                        new_img.clone(),
                        deadline,
                        &mut trips,
                    )
                    .await?
                {
                    Cas::Applied => {
                        // The grant counts only if the lease still holds at the answer:
                        // a CAW that landed late may have landed after a takeover.
                        self.check_live()?;
                        self.metrics.stale_cleaned.add(stale);
                        let alive = Arc::new(AtomicBool::new(true));
                        lock(&self.held).insert(
                            res,
                            Held {
                                index: idx,
                                mode,
                                epoch: new.epoch,
                                image: new_img,
                                alive: alive.clone(),
                            },
                        );
                        lock(&self.cached).remove(&idx);
                        self.metrics.acquires.inc();
                        self.metrics.acquire_round_trips.add(trips.0.into());
                        self.metrics
                            .acquire_latency
                            .observe(self.clock.now().saturating_sub(started));
                        let fence = self.fence(Some(alive), new.epoch, vec![self.cell.clone()]);
                        return Ok(LockGuard {
                            inner: self.clone(),
                            resource: res,
                            mode,
                            index: idx,
                            fence,
                            done: false,
                        });
                    }
                    Cas::Conflict(cur) => {
                        img = cur;
                        continue;
                    }
                }
            }
            if !counted_contention {
                self.metrics.contended.inc();
                counted_contention = true;
            }
            match wait {
                Wait::No => return Err(LockError::WouldBlock { holders: keep }),
                Wait::Until(t) if self.clock.now() >= t => return Err(LockError::Timeout),
                _ => {}
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.tuning.poll_max);
            self.check_live()?;
            img = self.read_record(idx, &mut trips).await?;
        }
    }

    async fn release(self: &Arc<Self>, res: ResourceId) -> Result<(), LockError> {
        let Some(held) = lock(&self.held).remove(&res) else {
            return Err(LockError::Fenced(FenceReason::Released));
        };
        held.alive.store(false, Ordering::Release);
        // A lost host leaves its entries for the host that recovers it: releasing them
        // here could hand the resource out before its journal is replayed.
        self.check_live()?;
        let me = self.me();
        let mut img = held.image;
        let mut trips = Trips::default();
        loop {
            let Some(mut rec) = self.decode_record(held.index, &img)? else {
                return Err(LockError::Fenced(FenceReason::Broken));
            };
            if !rec.holders.contains(&me) {
                return Err(LockError::Fenced(FenceReason::Broken));
            }
            rec.holders.retain(|h| *h != me);
            if rec.holders.is_empty() {
                rec.mode = None;
            }
            let new = Bytes::from(rec.encode(self.sector));
            self.check_live()?;
            let deadline = self.clock.now() + cas::step_window(self.io_timeout);
            match self
                .cas(
                    self.record_offset(held.index),
                    img,
                    new.clone(),
                    deadline,
                    &mut trips,
                )
                .await?
            {
                Cas::Applied => {
                    lock(&self.cached).insert(held.index, new);
                    self.metrics.releases.inc();
                    let _ = held.mode;
                    return Ok(());
                }
                Cas::Conflict(cur) => img = cur,
            }
        }
    }

    /// Rewrites, in every bound record, the entries `f` maps (None: remove). Returns the
    /// number of entries changed. Every write is checked against `fence` first.
    async fn rewrite_entries(
        &self,
        f: impl Fn(&Holder) -> Option<Option<Holder>>,
        fence: &Fence,
    ) -> Result<u64, LockError> {
        let n = self.hdr.max_locks as usize;
        let chunk = 256usize;
        let mut changed = 0u64;
        let mut trips = Trips::default();
        let mut start = 0usize;
        while start < n {
            let count = chunk.min(n - start);
            let region = cas::read_region(
                &*self.dev,
                self.record_offset(start as u32),
                count * self.sector,
                self.io_timeout,
                &mut trips,
            )
            .await?;
            for (k, img) in region.chunks(self.sector).enumerate() {
                let idx = (start + k) as u32;
                let mut img = Bytes::copy_from_slice(img);
                loop {
                    let rec = match LockRecord::decode(&img, self.sector, idx) {
                        Ok(Some(r)) => r,
                        Ok(None) => break,
                        Err(e) => {
                            self.metrics.checksum_errors.inc();
                            tracing::warn!(idx, %e, "skipping corrupt lock record during recovery");
                            break;
                        }
                    };
                    let mut new = rec.clone();
                    let mut n_changed = 0u64;
                    new.holders = rec
                        .holders
                        .iter()
                        .filter_map(|h| match f(h) {
                            None => Some(*h),
                            Some(x) => {
                                n_changed += 1;
                                x
                            }
                        })
                        .collect();
                    if n_changed == 0 {
                        break;
                    }
                    if new.holders.is_empty() {
                        new.mode = None;
                    }
                    fence.check_for(self.io_timeout)?;
                    let deadline = self.clock.now() + cas::step_window(self.io_timeout);
                    match self
                        .cas(
                            self.record_offset(idx),
                            img,
                            Bytes::from(new.encode(self.sector)),
                            deadline,
                            &mut trips,
                        )
                        .await?
                    {
                        Cas::Applied => {
                            changed += n_changed;
                            lock(&self.cached).remove(&idx);
                            break;
                        }
                        Cas::Conflict(cur) => img = cur,
                    }
                }
            }
            start += count;
        }
        Ok(changed)
    }

    /// Renews this host's slot once (retrying the same image until the lease would
    /// expire). Err(Some(reason)): lost; Err(None): failed this time.
    async fn renew_own(&self) -> Result<(), Option<LostReason>> {
        let mut own = self.own.lock().await;
        let old = own.image.clone();
        let Ok(mut s) = Slot::decode(&old, self.sector, u32::from(self.slot)) else {
            return Err(Some(LostReason::TakenOver));
        };
        s.counter = s.counter.wrapping_add(1);
        let new = Bytes::from(s.encode(self.sector));
        let now = self.clock.now();
        let t0 = *own.pending_since.get_or_insert(now);
        let deadline = self.cell.expiry().min(now + self.timing.heartbeat);
        let r = self
            .cas(
                self.slot_offset(self.slot),
                old,
                new.clone(),
                deadline,
                &mut Trips::default(),
            )
            .await;
        match r {
            Ok(Cas::Applied) => {
                own.image = new.clone();
                *lock(&self.own_view) = new;
                own.pending_since = None;
                self.cell.extend(t0 + self.timing.lease);
                self.metrics.heartbeats.inc();
                self.metrics
                    .heartbeat_latency
                    .observe(self.clock.now().saturating_sub(now));
                Ok(())
            }
            Ok(Cas::Conflict(_)) => Err(Some(LostReason::TakenOver)),
            Err(_) => {
                self.metrics.heartbeat_failures.inc();
                Err(None)
            }
        }
    }

    /// Renews a slot this host is recovering. Returns false when it must be abandoned.
    async fn renew_recovering(&self, slot: u16, rec: &Recovering) -> bool {
        let mut img = rec.image.lock().await;
        let Ok(mut s) = Slot::decode(&img, self.sector, u32::from(slot)) else {
            return false;
        };
        s.counter = s.counter.wrapping_add(1);
        let new = Bytes::from(s.encode(self.sector));
        let now = self.clock.now();
        let t0 = *lock(&rec.pending_since).get_or_insert(now);
        let deadline = rec.cell.expiry().min(now + self.timing.heartbeat);
        match self
            .cas(
                self.slot_offset(slot),
                img.clone(),
                new.clone(),
                deadline,
                &mut Trips::default(),
            )
            .await
        {
            Ok(Cas::Applied) => {
                *img = new;
                *lock(&rec.pending_since) = None;
                rec.cell.extend(t0 + self.timing.lease);
                true
            }
            Ok(Cas::Conflict(_)) => false,
            Err(_) => rec.cell.remaining(self.clock.now()).is_ok(),
        }
    }

    /// Reads the heartbeat region and updates the observations; returns slots to take
    /// over (unchanged for the dead-host timeout since their first sighting).
    async fn scan(&self) -> Result<Vec<Dead>, LockError> {
        let region = self.read_slots(&mut Trips::default()).await?;
        // Completion time: the write of any image seen here happened before it.
        let now = self.clock.now();
        let wall = self.wall.now();
        let own_img = self.own.lock().await.image.clone();
        let recovering: Vec<u16> = lock(&self.recovering).keys().copied().collect();
        let mut dead = Vec::new();
        let mut taken = false;
        {
            let mut obs = lock(&self.obs);
            for (i, img) in region.chunks(self.sector).enumerate() {
                let slot = i as u16;
                if slot == self.slot {
                    if img != own_img.as_ref() {
                        // Ours changed under us: a takeover (decodes with a higher
                        // generation or another incarnation). A torn image of our own
                        // renewal is repaired by the next renewal instead.
                        if let Ok(s) = Slot::decode(img, self.sector, i as u32) {
                            let own = Slot::decode(&own_img, self.sector, i as u32).ok();
                            let ours = own.is_some_and(|o| {
                                o.incarnation == s.incarnation && o.generation == s.generation
                            });
                            if !ours {
                                taken = true;
                            }
                        }
                    }
                    continue;
                }
                let Some(o) = obs.get_mut(i) else { continue };
                if o.image.as_ref() != img {
                    o.image = Bytes::copy_from_slice(img);
                    o.first_seen = now;
                    o.changed_wall = wall;
                    continue;
                }
                if recovering.contains(&slot) || o.taking_over {
                    continue;
                }
                let Ok(s) = Slot::decode(img, self.sector, i as u32) else {
                    continue;
                };
                if s.state != SlotState::Free
                    && now.saturating_sub(o.first_seen) >= self.timing.dead_after
                {
                    o.taking_over = true;
                    dead.push(Dead {
                        slot,
                        image: o.image.clone(),
                        seen: o.first_seen,
                        decided: now,
                    });
                }
            }
        }
        if taken {
            self.go_lost(LostReason::TakenOver);
        }
        Ok(dead)
    }

    /// Takes a dead host's slot over, transfers its locks to the new generation,
    /// recovers, breaks the locks and frees the slot. DESIGN.md, "Takeover".
    async fn take_over(self: Arc<Self>, d: Dead) {
        let slot = d.slot;
        let done = |inner: &Inner| {
            if let Some(o) = lock(&inner.obs).get_mut(usize::from(slot)) {
                o.taking_over = false;
            }
        };
        let r = self.clone().take_over_inner(d).await;
        if let Err(e) = &r {
            tracing::warn!(slot, %e, "takeover of a dead host's slot did not complete");
        }
        lock(&self.recovering).remove(&slot);
        done(&self);
    }

    async fn take_over_inner(self: Arc<Self>, d: Dead) -> Result<(), LockError> {
        let slot = d.slot;
        let dead_img = d.image.clone();
        let dead = Slot::decode(&dead_img, self.sector, u32::from(slot)).map_err(|source| {
            LockError::Corrupt {
                index: u32::from(slot),
                source,
            }
        })?;
        let generation = dead
            .generation
            .checked_add(1)
            .ok_or(LockError::GenerationOverflow(slot))?;
        let new = Slot {
            index: u32::from(slot),
            state: SlotState::Recovering,
            host: dead.host,
            generation,
            counter: 0,
            incarnation: random_u64(),
            journal_offset: dead.journal_offset,
            journal_len: dead.journal_len,
            recoverer_slot: self.slot,
            recoverer_generation: self.generation,
            hostname: dead.hostname.clone(),
        };
        let new_img = Bytes::from(new.encode(self.sector));
        self.check_live()?;
        let t0 = self.clock.now();
        match self
            .cas(
                self.slot_offset(slot),
                dead_img,
                new_img.clone(),
                t0 + cas::step_window(self.io_timeout),
                &mut Trips::default(),
            )
            .await?
        {
            Cas::Applied => {}
            Cas::Conflict(_) => return Ok(()),
        }
        let rec = Arc::new(Recovering {
            image: tokio::sync::Mutex::new(new_img),
            cell: LeaseCell::new(t0 + self.timing.lease),
            pending_since: Mutex::new(None),
        });
        lock(&self.recovering).insert(slot, rec.clone());
        self.metrics.takeovers.inc();
        {
            let mut t = lock(&self.takeovers);
            if t.len() >= 16 {
                t.pop_front();
            }
            t.push_back(TakeoverRecord {
                slot,
                hostname: dead.hostname.clone(),
                dead_generation: dead.generation,
                dead_counter: dead.counter,
                seen: d.seen,
                decided: d.decided,
            });
        }
        tracing::warn!(slot, dead_generation = dead.generation, host = %dead.hostname, "took over a dead host's slot");
        let fence = Fence {
            cells: vec![self.cell.clone(), rec.cell.clone()],
            held: None,
            clock: self.clock.clone(),
            holder: Holder { slot, generation },
            epoch: 0,
            metrics: self.metrics.clone(),
        };
        // 1. Fence the dead incarnation: its entries now name the new generation, so a
        //    stale write of it (CAW of the record) miscompares from here on.
        self.rewrite_entries(
            |h| {
                (h.slot == slot && h.generation != generation)
                    .then_some(Some(Holder { slot, generation }))
            },
            &fence,
        )
        .await?;
        // 2. Recover (replay its journal) while holding its locks.
        if let Some(r) = &self.opts.recovery {
            let info = RecoveryInfo {
                slot,
                host: dead.host,
                hostname: dead.hostname.clone(),
                dead_generation: dead.generation,
                generation,
                journal_offset: dead.journal_offset,
                journal_len: dead.journal_len,
                fence: fence.clone(),
            };
            if let Err(e) = r.recover(info).await {
                self.metrics.recoveries_failed.inc();
                tracing::error!(slot, %e, "recovery failed; the slot will be taken over again");
                // Abandon: stop renewing; it goes stale and is retaken after dead_after.
                return Ok(());
            }
        }
        // 3. Break its locks.
        let broken = self
            .rewrite_entries(|h| (h.slot == slot).then_some(None), &fence)
            .await?;
        self.metrics.breaks.add(broken);
        // 4. Free the slot (keeping the generation), under the renewal lock.
        fence.check_for(self.io_timeout)?;
        let mut img = rec.image.lock().await;
        let mut free = Slot::never_used(u32::from(slot));
        free.generation = generation;
        let free_img = Bytes::from(free.encode(self.sector));
        match self
            .cas(
                self.slot_offset(slot),
                img.clone(),
                free_img.clone(),
                self.clock.now() + cas::step_window(self.io_timeout),
                &mut Trips::default(),
            )
            .await?
        {
            Cas::Applied => {
                *img = free_img;
                self.metrics.recoveries.inc();
                tracing::info!(slot, broken, "recovered a dead host");
                Ok(())
            }
            Cas::Conflict(_) => {
                self.metrics.recoveries_failed.inc();
                Ok(())
            }
        }
    }

    fn status(&self) -> LockspaceStatus {
        let now = self.clock.now();
        let own_img = Some(lock(&self.own_view).clone()).filter(|b| !b.is_empty());
        let recovering: Vec<u16> = lock(&self.recovering).keys().copied().collect();
        let obs = lock(&self.obs);
        let slots = obs
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let slot = i as u16;
                let img = if slot == self.slot {
                    own_img.clone().unwrap_or_else(|| o.image.clone())
                } else {
                    o.image.clone()
                };
                let decoded = Slot::decode(&img, self.sector, i as u32);
                let unchanged_for = now.saturating_sub(o.first_seen);
                let presumed = match &decoded {
                    _ if slot == self.slot => Presumed::Mine,
                    _ if recovering.contains(&slot) => Presumed::RecoveringByMe,
                    Err(_) => Presumed::Corrupt,
                    Ok(s) if s.state == SlotState::Free => Presumed::Free,
                    Ok(_) if unchanged_for >= self.timing.dead_after => Presumed::Dead,
                    Ok(_) => Presumed::Alive,
                };
                let d = decoded.ok();
                SlotStatus {
                    slot,
                    state: d.as_ref().map(|s| s.state),
                    host: d.as_ref().map(|s| hex(&s.host)).unwrap_or_default(),
                    hostname: d.as_ref().map(|s| s.hostname.clone()).unwrap_or_default(),
                    generation: d.as_ref().map_or(0, |s| s.generation),
                    counter: d.as_ref().map_or(0, |s| s.counter),
                    presumed,
                    unchanged_for,
                    last_change: o.changed_wall,
                }
            })
            .collect();
        let held = lock(&self.held)
            .iter()
            .map(|(r, h)| HeldStatus {
                resource: *r,
                index: h.index,
                mode: h.mode,
                epoch: h.epoch,
            })
            .collect();
        LockspaceStatus {
            lockspace: hex(&self.hdr.lockspace_id),
            timing: self.timing,
            slot: self.slot,
            generation: self.generation,
            state: *self.state.borrow(),
            lease_remaining: self.cell.remaining(now).unwrap_or_default(),
            slots,
            held,
            takeovers: lock(&self.takeovers)
                .iter()
                .map(|t| TakeoverStatus {
                    slot: t.slot,
                    hostname: t.hostname.clone(),
                    dead_generation: t.dead_generation,
                    dead_counter: t.dead_counter,
                    unchanged_for: t.decided.saturating_sub(t.seen),
                    decided_ago: now.saturating_sub(t.decided),
                })
                .collect(),
        }
    }

    async fn list_locks(&self) -> Result<Vec<LockInfo>, LockError> {
        let mut trips = Trips::default();
        let slots = self
            .read_slots(&mut trips)
            .await
            .map(|r| self.decode_slots(&r))?;
        let region = cas::read_region(
            &*self.dev,
            self.record_offset(0),
            self.hdr.max_locks as usize * self.sector,
            self.io_timeout,
            &mut trips,
        )
        .await?;
        let mut out = Vec::new();
        for (i, img) in region.chunks(self.sector).enumerate() {
            if let Some(r) = self.decode_record(i as u32, img)? {
                out.push(LockInfo {
                    index: i as u32,
                    resource: r.resource,
                    mode: r.mode,
                    epoch: r.epoch,
                    holders: r
                        .holders
                        .iter()
                        .map(|h| HolderInfo {
                            slot: h.slot,
                            generation: h.generation,
                            hostname: slots
                                .get(usize::from(h.slot))
                                .and_then(|s| s.as_ref().ok())
                                .map(|s| s.hostname.clone())
                                .unwrap_or_default(),
                            current: classify(h, &slots) == Class::Valid,
                        })
                        .collect(),
                });
            }
        }
        Ok(out)
    }
}

/// The heartbeat task: renews the slot every period (and the slots being recovered),
/// scans the heartbeat region, starts takeovers, and fences the host when the lease
/// runs out. `last_issue` is the issue time of the claim, which counts as renewal 0.
async fn heartbeat_loop(inner: Arc<Inner>, last_issue: Duration) {
    let period = inner.timing.heartbeat;
    let mut next_renew = last_issue + period;
    let mut next_scan = inner.clock.now();
    loop {
        if matches!(*inner.state.borrow(), HostState::Lost(_) | HostState::Left) {
            return;
        }
        let now = inner.clock.now();
        if inner.cell.remaining(now).is_err() {
            inner.go_lost(LostReason::LeaseExpired);
            return;
        }
        if now >= next_renew {
            match inner.renew_own().await {
                Ok(()) => next_renew = now + period,
                Err(Some(reason)) => {
                    inner.go_lost(reason);
                    return;
                }
                Err(None) => {
                    next_renew = inner.clock.now() + inner.tuning.scan_interval.min(period / 4)
                }
            }
            let recs: Vec<(u16, Arc<Recovering>)> = lock(&inner.recovering)
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect();
            for (slot, rec) in recs {
                if !inner.renew_recovering(slot, &rec).await {
                    rec.cell.revoke();
                }
            }
        }
        if inner.clock.now() >= next_scan {
            match inner.scan().await {
                Ok(dead) => {
                    for d in dead {
                        tokio::spawn(inner.clone().take_over(d));
                    }
                }
                Err(e) => tracing::debug!(%e, "heartbeat scan failed"),
            }
            next_scan = inner.clock.now() + inner.tuning.scan_interval;
        }
        let now = inner.clock.now();
        let wake = next_renew.min(next_scan).min(inner.cell.expiry());
        tokio::time::sleep(wake.saturating_sub(now).max(Duration::from_millis(1))).await;
    }
}

/// Declares the host lost the moment its lease ends, whatever the heartbeat task is
/// doing: that task may be inside a renewal or a scan that waits up to a request
/// timeout (or two, with a retry) for a device that no longer answers, and the `lost`
/// notification must not wait for it. (Fences do not depend on this: every check
/// compares the clock with the lease expiry itself.)
async fn lease_watchdog(inner: Arc<Inner>) {
    loop {
        if matches!(*inner.state.borrow(), HostState::Lost(_) | HostState::Left) {
            return;
        }
        let now = inner.clock.now();
        let expiry = inner.cell.expiry();
        if now >= expiry {
            inner.go_lost(LostReason::LeaseExpired);
            return;
        }
        // The expiry only moves forward: sleep until the current one, then look again.
        tokio::time::sleep(expiry - now).await;
    }
}
