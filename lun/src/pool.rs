//! [`Pool`]: format, import, the commit protocol, and the management operations.
//!
//! # Commit protocol (see `DESIGN.md` for the argument)
//!
//! Operations change the in-memory [`State`] and append a record to the in-memory log,
//! in one critical section, so the log order is the order of application. Data is
//! always on the device (written and completed) before the record that maps it is
//! applied. A commit then:
//!
//! 1. takes the log (and the chunks its records freed) under the state lock;
//! 2. flushes the device: every data write the log refers to is durable;
//! 3. writes the log as journal blocks of the current generation with FUA;
//! 4. only now returns the freed chunks to the free set (after a discard), so no chunk a
//!    durable map still points to is ever overwritten.
//!
//! When the journal half is three-quarters full a checkpoint follows: the log is first
//! committed into the old journal (so checkpoint `g + 1` equals checkpoint `g` plus
//! journal `g`), then the whole state is written to the other checkpoint slot, flushed,
//! and superblock `g + 1` is written with FUA into the other copy. Import takes the
//! newest superblock whose checkpoint verifies, replays its journal up to the first
//! block that does not verify, and, when the superblock after it was lost, the next
//! journal too.

use crate::error::PoolError;
use crate::format::{
    decode_checkpoint, decode_journal_block, encode_checkpoint, encode_journal_block,
    CheckpointBody, CheckpointHeader, JournalBlock, JournalHeader, Layout, NewVolume, Op,
    Provisioning, Superblock, Thresholds, VolumeKind, VolumeRecord, CP_HEADER, JB_PAYLOAD,
    META_BLOCK, NONE,
};
use crate::lun::{self, Lun};
use crate::state::{check_name, Mode, State};
use crate::stats::{inc, PoolCounters, VolumeStats};
use basalt_blockdev::{RangeLocks, SharedBlockDev, WriteFlags, ZeroFlags};
use bytes::{Bytes, BytesMut};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Largest single metadata request.
const IO_CAP: usize = 4 << 20;
/// Commit on its own once the log holds this many journal blocks.
const LOG_AUTOCOMMIT_BLOCKS: usize = 64;

/// How to format a pool.
#[derive(Debug, Clone)]
pub struct FormatOptions {
    /// A label stored in the superblock.
    pub name: String,
    /// Allocation unit: a power of two from 4 KiB to 1 MiB (default 64 KiB).
    pub chunk_size: u32,
    /// Most volumes the pool holds (sizes the checkpoint; default 1024).
    pub max_volumes: u32,
    /// Alert thresholds.
    pub thresholds: Thresholds,
    /// Overwrite a device that already holds a pool.
    pub force: bool,
    /// Commit pending allocations at least this often (None: only on flush, FUA and
    /// when the log is large). Default 1 s.
    pub commit_interval: Option<Duration>,
    /// Discard the data area at format (lets a thin or flash device reclaim it).
    /// Default true.
    pub discard_data: bool,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            name: "pool".into(),
            chunk_size: 64 << 10,
            max_volumes: 1024,
            thresholds: Thresholds::default(),
            force: false,
            commit_interval: Some(Duration::from_secs(1)),
            discard_data: true,
        }
    }
}

/// How to import a pool.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// As in [`FormatOptions::commit_interval`].
    pub commit_interval: Option<Duration>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            commit_interval: Some(Duration::from_secs(1)),
        }
    }
}

/// How to create a LUN.
#[derive(Debug, Clone, Copy)]
pub struct LunOptions {
    /// Thin or thick.
    pub provisioning: Provisioning,
    /// Logical block size: 512 or 4096 (at least the pool device's block size).
    pub block_size: u32,
}

impl Default for LunOptions {
    fn default() -> Self {
        LunOptions {
            provisioning: Provisioning::Thin,
            block_size: 4096,
        }
    }
}

/// A volume's stable 128-bit identity (random at creation, kept across import). The
/// SCSI layer derives NAA identifiers from it. Displays and serialises as a UUID.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId(pub [u8; 16]);

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VolumeId({self})")
    }
}

impl serde::Serialize for VolumeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if getrandom::fill(&mut id).is_err() {
        // No entropy source: fall back to time and a counter (still unique here).
        static N: AtomicU64 = AtomicU64::new(0);
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        id[..8].copy_from_slice(&t.to_le_bytes());
        id[8..].copy_from_slice(&N.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    }
    // RFC 4122 version 4, variant 1.
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One volume as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VolumeInfo {
    /// Stable identity.
    pub id: VolumeId,
    /// Name, unique in the pool.
    pub name: String,
    /// LUN, snapshot or clone.
    pub kind: VolumeKind,
    /// Thin or thick.
    pub provisioning: Provisioning,
    /// Virtual size in bytes.
    pub size_bytes: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Unix seconds.
    pub created: u64,
    /// The volume it was taken from, if that still exists.
    pub origin: Option<String>,
    /// Bytes the volume reads from allocated chunks (its own or shared).
    pub mapped_bytes: u64,
    /// Bytes only this volume holds: what deleting it frees at least.
    pub exclusive_bytes: u64,
    /// Mapped bytes shared with snapshots, clones or its origin.
    pub shared_bytes: u64,
    /// Bytes reserved for a thick volume and not yet allocated.
    pub reserved_bytes: u64,
    /// Bytes held exclusively by snapshots taken of this volume.
    pub snapshot_bytes: u64,
    /// Snapshots are read-only.
    pub read_only: bool,
}

/// How full a resource is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertLevel {
    /// Below the warning threshold.
    Ok,
    /// At or above the warning threshold.
    Warning,
    /// At or above the critical threshold.
    Critical,
    /// No space left: writes that need new space fail.
    Full,
}

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    /// Data chunks (allocated plus reserved for thick volumes).
    Data,
    /// Checkpoint space (map entries).
    Metadata,
}

/// A threshold that is crossed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Alert {
    /// Which resource.
    pub resource: Resource,
    /// How bad.
    pub level: AlertLevel,
    /// Percent used.
    pub used_pct: f64,
}

/// Space in a pool.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Usage {
    /// Data area in bytes.
    pub data_bytes: u64,
    /// Bytes in allocated chunks (including ones freed but not yet committed).
    pub allocated_bytes: u64,
    /// Bytes reserved for thick volumes and not yet allocated.
    pub reserved_bytes: u64,
    /// Bytes thin volumes can still take.
    pub free_bytes: u64,
    /// Sum of the virtual sizes of the writable volumes.
    pub provisioned_bytes: u64,
    /// Bytes only snapshots hold (what deleting every snapshot would free, at least).
    pub snapshot_bytes: u64,
    /// Checkpoint bytes the metadata needs now (an upper bound).
    pub metadata_used_bytes: u64,
    /// Checkpoint slot size.
    pub metadata_total_bytes: u64,
    /// Data usage in percent (allocated plus reserved).
    pub data_used_pct: f64,
    /// Metadata usage in percent.
    pub metadata_used_pct: f64,
    /// Volumes.
    pub volumes: usize,
    /// The thresholds in force.
    pub thresholds: Thresholds,
    /// Thresholds crossed now.
    pub alerts: Vec<Alert>,
}

/// What import found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ImportReport {
    /// Generation of the checkpoint loaded.
    pub checkpoint_generation: u64,
    /// Generation the pool continues at (a new checkpoint was written).
    pub generation: u64,
    /// Journal records replayed.
    pub records_replayed: u64,
    /// Journal blocks replayed.
    pub blocks_replayed: u64,
    /// Why the journal replay stopped (normally: an unwritten or torn block).
    pub journal_end: String,
    /// True when the newest metadata was unreadable and an older copy was used.
    pub fell_back: bool,
    /// What was wrong on the way (damaged superblock copy, bad checkpoint...).
    pub problems: Vec<String>,
    /// Volumes found.
    pub volumes: usize,
}

/// A pool's identity as found on a device, without importing it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PoolLabel {
    /// The pool's id.
    pub uuid: VolumeId,
    /// Its name.
    pub name: String,
    /// Newest superblock generation.
    pub generation: u64,
    /// Its layout.
    pub layout: Layout,
    /// Unix seconds at format.
    pub created: u64,
}

/// The in-memory log: records applied but not yet committed.
#[derive(Default)]
pub(crate) struct LogBuf {
    payloads: Vec<Vec<u8>>,
    /// Records applied since the pool was opened.
    pub seq: u64,
}

impl LogBuf {
    fn push(&mut self, op: &Op) {
        let mut rec = Vec::new();
        op.encode(&mut rec);
        match self.payloads.last_mut() {
            Some(p) if p.len() + rec.len() <= JB_PAYLOAD => p.extend_from_slice(&rec),
            _ => self.payloads.push(rec),
        }
        self.seq += 1;
    }
}

/// State and log under one lock.
pub(crate) struct Meta {
    pub st: State,
    pub log: LogBuf,
    /// Chunks allocated for writes in flight.
    pub in_flight: u64,
    /// Chunks mapped since the last commit, with the record that mapped them: a FUA
    /// overwrite of one of them must wait for that record to be durable.
    pub unsettled: HashMap<u32, u64>,
}

impl Meta {
    /// Applies a live operation to the state and logs it.
    fn apply_live(&mut self, op: &Op) -> Result<(), PoolError> {
        self.st
            .apply(op, Mode::Live)
            .map_err(|e| PoolError::Invalid(e.0))?;
        self.log.push(op);
        Ok(())
    }

    /// Room for a new volume named `name`: the name is free and the table has a slot.
    fn check_room(&self, name: &str) -> Result<(), PoolError> {
        if self.st.names.contains_key(name) {
            return Err(PoolError::Exists(name.into()));
        }
        if self.st.vols.len() >= self.st.layout.max_volumes as usize {
            return Err(PoolError::TooManyVolumes(self.st.layout.max_volumes));
        }
        Ok(())
    }
}

struct CommitCtx {
    gen: u64,
    nonce: u64,
    /// Next journal block of this generation.
    jpos: u64,
    chained: bool,
}

/// Per-volume runtime state shared by all handles of a volume.
pub(crate) struct VolumeRuntime {
    pub vol: u32,
    pub locks: RangeLocks,
    pub size: AtomicU64,
    pub deleted: AtomicBool,
    pub stats: Arc<VolumeStats>,
}

pub(crate) struct PoolInner {
    pub dev: SharedBlockDev,
    pub layout: Layout,
    pub uuid: [u8; 16],
    pub name: String,
    pub created: u64,
    pub meta: RwLock<Meta>,
    pub durable_seq: AtomicU64,
    commit: tokio::sync::Mutex<CommitCtx>,
    /// Management operations hold it exclusively, I/O shared.
    pub admin: tokio::sync::RwLock<()>,
    failed: Mutex<Option<String>>,
    pub failed_flag: AtomicBool,
    closed: AtomicBool,
    pub counters: PoolCounters,
    runtimes: Mutex<HashMap<u32, Arc<VolumeRuntime>>>,
    alert_level: AtomicU8,
    alerts: watch::Sender<AlertLevel>,
}

/// A thin pool on one block device. Cheap to clone (a handle). See the
/// [crate docs](crate) for an example.
#[derive(Clone)]
pub struct Pool {
    pub(crate) inner: Arc<PoolInner>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.inner.name)
            .field("uuid", &VolumeId(self.inner.uuid))
            .finish()
    }
}

/// Reads `len` bytes in requests of at most [`IO_CAP`].
pub(crate) async fn dev_read(
    dev: &SharedBlockDev,
    off: u64,
    len: usize,
) -> Result<Bytes, PoolError> {
    if len <= IO_CAP {
        return Ok(dev.read(off, len).await?);
    }
    let mut out = BytesMut::with_capacity(len);
    let mut at = 0;
    while at < len {
        let n = (len - at).min(IO_CAP);
        out.extend_from_slice(&dev.read(off + at as u64, n).await?);
        at += n;
    }
    Ok(out.freeze())
}

/// Writes in requests of at most [`IO_CAP`] (and the device's limit).
pub(crate) async fn dev_write(
    dev: &SharedBlockDev,
    off: u64,
    data: Bytes,
    flags: WriteFlags,
) -> Result<(), basalt_blockdev::BlockError> {
    let max = dev.geometry().max_io_bytes as usize;
    let cap = if max == 0 { IO_CAP } else { max.min(IO_CAP) };
    if data.len() <= cap {
        return dev.write(off, data, flags).await;
    }
    let mut at = 0;
    while at < data.len() {
        let n = (data.len() - at).min(cap);
        dev.write(off + at as u64, data.slice(at..at + n), flags)
            .await?;
        at += n;
    }
    Ok(())
}

/// What [`load`] found on a device.
pub(crate) struct Loaded {
    pub sb: Superblock,
    pub state: State,
    pub max_gen: u64,
    pub report: ImportReport,
    /// Superblock copies that did not verify (index, reason).
    pub bad_copies: Vec<(u64, String)>,
}

pub(crate) async fn read_superblocks(
    dev: &SharedBlockDev,
) -> Result<(Vec<Superblock>, Vec<(u64, String)>), PoolError> {
    let g = dev.geometry();
    if g.block_size as u64 > META_BLOCK || g.capacity_bytes() < 2 * META_BLOCK {
        return Err(PoolError::Invalid(format!(
            "a pool device needs blocks of at most 4 KiB and some capacity: {} x {}",
            g.blocks, g.block_size
        )));
    }
    let buf = dev.read(0, 2 * META_BLOCK as usize).await?;
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for copy in 0..2u64 {
        let b = &buf[(copy * META_BLOCK) as usize..((copy + 1) * META_BLOCK) as usize];
        match Superblock::decode(b) {
            Ok(Some(sb)) if sb.gen % 2 == copy => good.push(sb),
            Ok(Some(sb)) => bad.push((
                copy,
                format!("holds generation {} of the other copy", sb.gen),
            )),
            Ok(None) => bad.push((copy, "no superblock".into())),
            Err(e) => bad.push((copy, e.0)),
        }
    }
    Ok((good, bad))
}

/// Loads the newest consistent metadata from a device. `lenient` (check) keeps going
/// past problems and lists them.
pub(crate) async fn load(dev: &SharedBlockDev, lenient: bool) -> Result<Loaded, PoolError> {
    let (mut sbs, bad_copies) = read_superblocks(dev).await?;
    if sbs.is_empty() {
        if bad_copies.iter().all(|(_, r)| r == "no superblock") {
            return Err(PoolError::NotAPool);
        }
        return Err(PoolError::Corrupt(format!(
            "no superblock copy verifies: {bad_copies:?}"
        )));
    }
    sbs.sort_by_key(|s| std::cmp::Reverse(s.gen));
    let mut problems: Vec<String> = bad_copies
        .iter()
        .filter(|(_, r)| r != "no superblock")
        .map(|(c, r)| format!("superblock copy {c}: {r}"))
        .collect();
    if sbs.len() == 2 && sbs[0].pool_uuid != sbs[1].pool_uuid {
        problems.push("the superblock copies belong to different pools; using the newer".into());
        sbs.truncate(1);
    }
    if sbs.len() == 2 && sbs[0].layout != sbs[1].layout {
        problems.push("the superblock copies disagree on the layout; using the newer".into());
        sbs.truncate(1);
    }
    if dev.geometry().capacity_bytes() < sbs[0].layout.device_bytes {
        return Err(PoolError::Corrupt(format!(
            "the device has {} bytes but the pool was formatted on {}",
            dev.geometry().capacity_bytes(),
            sbs[0].layout.device_bytes
        )));
    }
    let newest = sbs[0].gen;
    for (i, sb) in sbs.iter().enumerate() {
        match load_generation(dev, sb, lenient, true).await {
            Ok((state, mut report, max_gen)) => {
                report.fell_back = i > 0;
                problems.append(&mut report.problems);
                report.problems = problems;
                report.volumes = state.vols.len();
                return Ok(Loaded {
                    sb: sb.clone(),
                    state,
                    max_gen: max_gen.max(newest),
                    report,
                    bad_copies,
                });
            }
            Err(e) => problems.push(format!("generation {}: {e}", sb.gen)),
        }
    }
    Err(PoolError::Corrupt(problems.join("; ")))
}

/// Loads the checkpoint of `sb` alone (no journal).
pub(crate) async fn load_checkpoint_only(
    dev: &SharedBlockDev,
    sb: &Superblock,
) -> Result<(State, Vec<String>, u64), PoolError> {
    let l = sb.layout;
    let len = (CP_HEADER as u64 + sb.cp_len).div_ceil(META_BLOCK) * META_BLOCK;
    let buf = dev_read(dev, l.cp_slot_off(sb.gen), len as usize).await?;
    let body = decode_checkpoint(&buf, sb).map_err(|e| PoolError::Corrupt(e.0))?;
    let body = CheckpointBody::decode(body).map_err(|e| PoolError::Corrupt(e.0))?;
    let (state, problems) =
        State::from_body(l, &body, false).map_err(|e| PoolError::Corrupt(e.0))?;
    Ok((state, problems, sb.gen))
}

/// Loads the checkpoint of `sb` and replays its own journal only.
pub(crate) async fn load_own_journal(
    dev: &SharedBlockDev,
    sb: &Superblock,
) -> Result<State, PoolError> {
    Ok(load_generation(dev, sb, false, false).await?.0)
}

async fn load_generation(
    dev: &SharedBlockDev,
    sb: &Superblock,
    lenient: bool,
    chain: bool,
) -> Result<(State, ImportReport, u64), PoolError> {
    let l = sb.layout;
    let len = (CP_HEADER as u64 + sb.cp_len).div_ceil(META_BLOCK) * META_BLOCK;
    let buf = dev_read(dev, l.cp_slot_off(sb.gen), len as usize).await?;
    let body = decode_checkpoint(&buf, sb).map_err(|e| PoolError::Corrupt(e.0))?;
    let body = CheckpointBody::decode(body).map_err(|e| PoolError::Corrupt(e.0))?;
    let (mut state, problems) =
        State::from_body(l, &body, lenient).map_err(|e| PoolError::Corrupt(e.0))?;
    let mut report = ImportReport {
        checkpoint_generation: sb.gen,
        problems,
        ..Default::default()
    };
    let end = replay(
        dev,
        sb,
        sb.gen,
        sb.journal_nonce,
        &mut state,
        &mut report,
        lenient,
    )
    .await?;
    report.journal_end = end;
    let mut max_gen = sb.gen;
    if !chain {
        return Ok((state, report, max_gen));
    }
    // The superblock of the next generation may have been lost: its journal, if it
    // says it extends this one, carries on.
    let next = sb.gen + 1;
    let first = dev_read(dev, l.journal_block_off(next, 0), META_BLOCK as usize).await?;
    if let JournalBlock::Valid(h, _) = decode_journal_block(&first, &sb.pool_uuid) {
        if h.gen == next && h.seq == 0 && h.chained {
            report.problems.push(format!(
                "superblock of generation {next} is missing; replaying its journal"
            ));
            report.journal_end =
                replay(dev, sb, next, h.nonce, &mut state, &mut report, lenient).await?;
            max_gen = next;
        }
    }
    Ok((state, report, max_gen))
}

/// Replays journal generation `gen` onto `state`; returns why it stopped.
async fn replay(
    dev: &SharedBlockDev,
    sb: &Superblock,
    gen: u64,
    nonce: u64,
    state: &mut State,
    report: &mut ImportReport,
    lenient: bool,
) -> Result<String, PoolError> {
    let l = sb.layout;
    let total = l.journal_blocks();
    let batch = 256u64;
    let mut seq = 0u64;
    while seq < total {
        let n = batch.min(total - seq);
        let buf = dev_read(
            dev,
            l.journal_block_off(gen, seq),
            (n * META_BLOCK) as usize,
        )
        .await?;
        for i in 0..n {
            let b = &buf[(i * META_BLOCK) as usize..((i + 1) * META_BLOCK) as usize];
            let (h, payload) = match decode_journal_block(b, &sb.pool_uuid) {
                JournalBlock::Valid(h, p) if h.gen == gen && h.seq == seq && h.nonce == nonce => {
                    (h, p)
                }
                JournalBlock::Valid(h, _) => {
                    return Ok(format!(
                        "block {seq}: from generation {} position {} (older)",
                        h.gen, h.seq
                    ))
                }
                JournalBlock::Invalid(why) => return Ok(format!("block {seq}: {why}")),
            };
            let _ = h;
            let ops = match crate::format::Op::decode_all(payload) {
                Ok(ops) => ops,
                Err(e) => {
                    let msg = format!("journal {gen} block {seq}: undecodable record: {e}");
                    if lenient {
                        report.problems.push(msg.clone());
                        return Ok(msg);
                    }
                    return Err(PoolError::Corrupt(msg));
                }
            };
            for op in &ops {
                if let Err(e) = state.apply(op, Mode::Replay) {
                    let msg =
                        format!("journal {gen} block {seq}: record {op:?} does not apply: {e}");
                    if lenient {
                        report.problems.push(msg.clone());
                        return Ok(msg);
                    }
                    return Err(PoolError::Corrupt(msg));
                }
                report.records_replayed += 1;
            }
            report.blocks_replayed += 1;
            seq += 1;
        }
    }
    Ok("journal half full".into())
}

/// Writes checkpoint `gen` of `state` and its superblock (flushing in between).
/// `label` supplies the pool's identity, layout, name and creation time.
pub(crate) async fn write_checkpoint(
    dev: &SharedBlockDev,
    label: &Superblock,
    gen: u64,
    nonce: u64,
    chained: bool,
    body: &CheckpointBody,
) -> Result<(), PoolError> {
    let layout = &label.layout;
    let uuid = label.pool_uuid;
    let enc = body.encode();
    if (CP_HEADER + enc.len()) as u64 > layout.cp_slot {
        // Cannot happen while metadata limits hold; refuse rather than overflow.
        return Err(PoolError::NoSpace(format!(
            "checkpoint of {} bytes exceeds its {}-byte slot",
            enc.len(),
            layout.cp_slot
        )));
    }
    let (bytes, crc) = encode_checkpoint(
        &CheckpointHeader {
            pool_uuid: uuid,
            gen,
            body_len: enc.len() as u64,
        },
        &enc,
    );
    dev_write(
        dev,
        layout.cp_slot_off(gen),
        Bytes::from(bytes),
        WriteFlags::default(),
    )
    .await?;
    dev.flush().await?;
    let sb = Superblock {
        pool_uuid: uuid,
        gen,
        layout: *layout,
        cp_len: enc.len() as u64,
        cp_crc: crc,
        journal_nonce: nonce,
        chained,
        created: label.created,
        name: label.name.clone(),
    };
    dev.write(
        (gen % 2) * META_BLOCK,
        Bytes::from(sb.encode()),
        WriteFlags { fua: true },
    )
    .await?;
    Ok(())
}

impl PoolInner {
    fn label(&self) -> Superblock {
        Superblock {
            pool_uuid: self.uuid,
            gen: 0,
            layout: self.layout,
            cp_len: 0,
            cp_crc: 0,
            journal_nonce: 0,
            chained: false,
            created: self.created,
            name: self.name.clone(),
        }
    }

    pub(crate) fn check_online(&self) -> Result<(), PoolError> {
        if self.failed_flag.load(Ordering::Acquire) {
            let why = self.failed.lock().clone().unwrap_or_default();
            return Err(PoolError::Offline(why));
        }
        Ok(())
    }

    fn fail(&self, why: String) {
        tracing::error!(pool = %self.name, "pool failed, re-import needed: {why}");
        self.take_offline(why);
    }

    /// Every handle fails from now on with `why` (the first reason is kept). Also the
    /// normal end of an export, which is not an error worth logging as one.
    fn take_offline(&self, why: String) {
        let mut f = self.failed.lock();
        if f.is_none() {
            *f = Some(why);
        }
        self.failed_flag.store(true, Ordering::Release);
    }

    /// The API view of volume `vol` now.
    fn volume_info(&self, vol: u32) -> Result<VolumeInfo, PoolError> {
        let m = self.meta.read();
        let rec = m.st.vol(vol).map_err(|e| PoolError::Invalid(e.0))?;
        Ok(self.info(&m.st, rec))
    }

    /// Applies a live operation and logs it; returns its sequence number.
    pub(crate) fn apply(&self, op: Op) -> Result<u64, PoolError> {
        let mut m = self.meta.write();
        m.apply_live(&op)?;
        Ok(m.log.seq)
    }

    /// Applies a `Map` for chunks allocated for a write in flight. Returns its sequence
    /// number, and true when the log has grown large enough that the caller should
    /// commit.
    pub(crate) fn apply_map(&self, op: Op, chunks: u64) -> Result<(u64, bool), PoolError> {
        let mut m = self.meta.write();
        m.apply_live(&op)?;
        m.in_flight -= chunks;
        let big = m.log.payloads.len() >= LOG_AUTOCOMMIT_BLOCKS;
        let seq = m.log.seq;
        if let Op::Map { phys, count, .. } = op {
            for p in phys..phys.saturating_add(count) {
                m.unsettled.insert(p, seq);
            }
        }
        drop(m);
        inc(&self.counters.chunks_allocated_total, chunks);
        Ok((seq, big))
    }

    /// Allocates `n` chunks for a write by `vol` (None: thin).
    pub(crate) fn alloc(&self, n: u64, vol: u32) -> Option<Vec<u32>> {
        let mut m = self.meta.write();
        let rec = m.st.vols.get(&vol).cloned();
        let thick = rec.as_ref().filter(|r| r.provisioning.is_thick());
        let got = m.st.alloc(n, thick);
        if got.is_some() {
            m.in_flight += n;
        }
        drop(m);
        self.refresh_alerts();
        got
    }

    /// Gives back chunks allocated for a write that failed.
    pub(crate) fn unalloc(&self, chunks: &[u32]) {
        let mut m = self.meta.write();
        m.st.release(chunks);
        m.in_flight -= chunks.len() as u64;
    }

    /// The record that mapped the newest of `chunks` if it is not yet durable.
    pub(crate) fn unsettled(&self, chunks: &[u32]) -> Option<u64> {
        let m = self.meta.read();
        if m.unsettled.is_empty() {
            return None;
        }
        chunks
            .iter()
            .filter_map(|p| m.unsettled.get(p))
            .max()
            .copied()
    }

    pub(crate) fn has_pending_frees(&self) -> bool {
        !self.meta.read().st.pending_free.is_empty()
    }

    /// Commits everything applied so far (or just flushes the device when nothing is
    /// pending, which makes in-place writes durable).
    pub(crate) async fn commit(&self) -> Result<(), PoolError> {
        self.check_online()?;
        let mut ctx = self.commit.lock().await;
        self.commit_locked(&mut ctx).await
    }

    /// Waits until record `seq` is durable, committing if needed (group commit: one
    /// commit covers every record applied before it started).
    pub(crate) async fn commit_until(&self, seq: u64) -> Result<(), PoolError> {
        if self.durable_seq.load(Ordering::Acquire) >= seq {
            return Ok(());
        }
        self.check_online()?;
        let mut ctx = self.commit.lock().await;
        if self.durable_seq.load(Ordering::Acquire) >= seq {
            return Ok(());
        }
        self.commit_locked(&mut ctx).await
    }

    async fn commit_locked(&self, ctx: &mut CommitCtx) -> Result<(), PoolError> {
        self.check_online()?;
        let started = Instant::now();
        let r = self.commit_inner(ctx).await;
        inc(
            &self.counters.commit_nanoseconds_total,
            started.elapsed().as_nanos() as u64,
        );
        if let Err(e) = &r {
            self.fail(format!("commit failed: {e}"));
        }
        r
    }

    async fn commit_inner(&self, ctx: &mut CommitCtx) -> Result<(), PoolError> {
        let fits = {
            let m = self.meta.read();
            if m.log.payloads.is_empty() {
                None
            } else {
                Some(ctx.jpos + m.log.payloads.len() as u64 <= self.layout.journal_blocks())
            }
        };
        match fits {
            None => {
                self.dev.flush().await?;
                Ok(())
            }
            Some(false) => self.checkpoint_locked(ctx).await,
            Some(true) => {
                let (payloads, seq, frees) = {
                    let mut m = self.meta.write();
                    m.unsettled.clear();
                    (
                        std::mem::take(&mut m.log.payloads),
                        m.log.seq,
                        std::mem::take(&mut m.st.pending_free),
                    )
                };
                self.dev.flush().await?;
                self.write_journal(ctx, &payloads).await?;
                self.durable_seq.store(seq, Ordering::Release);
                inc(&self.counters.commits_total, 1);
                self.release(frees).await;
                if ctx.jpos * 4 >= self.layout.journal_blocks() * 3 {
                    self.checkpoint_locked(ctx).await?;
                }
                Ok(())
            }
        }
    }

    async fn write_journal(
        &self,
        ctx: &mut CommitCtx,
        payloads: &[Vec<u8>],
    ) -> Result<(), PoolError> {
        if payloads.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(payloads.len() * META_BLOCK as usize);
        for (i, p) in payloads.iter().enumerate() {
            let h = JournalHeader {
                pool_uuid: self.uuid,
                gen: ctx.gen,
                seq: ctx.jpos + i as u64,
                nonce: ctx.nonce,
                chained: ctx.chained,
            };
            buf.extend_from_slice(&encode_journal_block(&h, p));
        }
        dev_write(
            &self.dev,
            self.layout.journal_block_off(ctx.gen, ctx.jpos),
            Bytes::from(buf),
            WriteFlags { fua: true },
        )
        .await?;
        ctx.jpos += payloads.len() as u64;
        inc(&self.counters.journal_blocks_total, payloads.len() as u64);
        Ok(())
    }

    /// Writes a new checkpoint generation holding everything applied so far.
    async fn checkpoint_locked(&self, ctx: &mut CommitCtx) -> Result<(), PoolError> {
        let (payloads, seq, frees, body) = {
            let mut m = self.meta.write();
            m.unsettled.clear();
            let payloads = std::mem::take(&mut m.log.payloads);
            let frees = std::mem::take(&mut m.st.pending_free);
            let seq = m.log.seq;
            let m = parking_lot::RwLockWriteGuard::downgrade(m);
            (payloads, seq, frees, m.st.to_body())
        };
        self.dev.flush().await?;
        // Keep checkpoint g+1 == checkpoint g + journal g whenever the log fits, so
        // that import can fall back a generation without losing anything.
        let chained = ctx.jpos + payloads.len() as u64 <= self.layout.journal_blocks();
        if chained {
            self.write_journal(ctx, &payloads).await?;
        }
        let gen = ctx.gen + 1;
        let nonce = u64::from_le_bytes(random_id()[..8].try_into().unwrap_or_default());
        write_checkpoint(&self.dev, &self.label(), gen, nonce, chained, &body).await?;
        ctx.gen = gen;
        ctx.nonce = nonce;
        ctx.jpos = 0;
        ctx.chained = chained;
        self.durable_seq.store(seq, Ordering::Release);
        inc(&self.counters.checkpoints_total, 1);
        inc(&self.counters.commits_total, 1);
        self.release(frees).await;
        Ok(())
    }

    /// Returns committed frees to the free set, discarding them on the device first
    /// (so a discard can never land on a chunk that was reallocated meanwhile).
    async fn release(&self, mut frees: Vec<u32>) {
        if frees.is_empty() {
            return;
        }
        inc(&self.counters.chunks_freed_total, frees.len() as u64);
        if self.dev.geometry().capabilities.discard {
            frees.sort_unstable();
            let cs = u64::from(self.layout.chunk_size);
            let mut i = 0;
            while i < frees.len() {
                let mut j = i + 1;
                while j < frees.len() && frees[j] == frees[j - 1] + 1 {
                    j += 1;
                }
                let off = self.layout.chunk_off(frees[i]);
                // Best effort: the chunk is free whether or not the device reclaims it.
                let _ = self.dev.discard(off, (j - i) as u64 * cs).await;
                i = j;
            }
        }
        self.meta.write().st.release(&frees);
        self.refresh_alerts();
    }

    pub(crate) fn runtime(&self, vol: u32) -> Arc<VolumeRuntime> {
        let mut r = self.runtimes.lock();
        r.entry(vol)
            .or_insert_with(|| {
                let size = self.meta.read().st.vols.get(&vol).map_or(0, |v| v.size);
                let cs = u64::from(self.layout.chunk_size);
                Arc::new(VolumeRuntime {
                    vol,
                    locks: RangeLocks::new(256, cs),
                    size: AtomicU64::new(size),
                    deleted: AtomicBool::new(false),
                    stats: Arc::new(VolumeStats::default()),
                })
            })
            .clone()
    }

    fn levels(&self, st: &State) -> (AlertLevel, f64, AlertLevel, f64) {
        let t = st.thresholds;
        let level = |pct: f64, warn: u8, crit: u8, full: bool| {
            if full {
                AlertLevel::Full
            } else if pct >= f64::from(crit) {
                AlertLevel::Critical
            } else if pct >= f64::from(warn) {
                AlertLevel::Warning
            } else {
                AlertLevel::Ok
            }
        };
        let total = st.layout.data_chunks as f64;
        let data_pct = (st.used_count + st.reserved_total) as f64 * 100.0 / total;
        let data = level(
            data_pct,
            t.data_warn_pct,
            t.data_critical_pct,
            st.available_for(None) == 0,
        );
        let meta_pct = st.metadata_bytes() as f64 * 100.0 / self.layout.cp_slot as f64;
        let meta = level(
            meta_pct,
            t.meta_warn_pct,
            t.meta_critical_pct,
            st.entries() >= st.layout.max_entries(),
        );
        (data, data_pct, meta, meta_pct)
    }

    pub(crate) fn refresh_alerts(&self) {
        let (d, _, m, _) = self.levels(&self.meta.read().st);
        let level = d.max(m);
        let code = level as u8;
        let old = self.alert_level.swap(code, Ordering::AcqRel);
        if old != code {
            if code > old {
                inc(&self.counters.alerts_raised_total, 1);
                tracing::warn!(pool = %self.name, ?level, "pool space alert");
            }
            self.alerts.send_replace(level);
        }
    }

    fn info(&self, st: &State, vol: &VolumeRecord) -> VolumeInfo {
        let cs = u64::from(self.layout.chunk_size);
        let mapped = st.nodes.get(&vol.node).map_or(0, |n| n.mapped);
        let owned = st.exclusive(vol.node);
        let snapshot_chunks: u64 = st
            .vols
            .values()
            .filter(|v| v.kind == VolumeKind::Snapshot && v.origin == vol.id)
            .map(|v| st.exclusive(v.node))
            .sum();
        VolumeInfo {
            id: VolumeId(vol.uuid),
            name: vol.name.clone(),
            kind: vol.kind,
            provisioning: vol.provisioning,
            size_bytes: vol.size,
            block_size: vol.block_size,
            created: vol.created,
            origin: st.vols.get(&vol.origin).map(|o| o.name.clone()),
            mapped_bytes: mapped * cs,
            exclusive_bytes: owned * cs,
            shared_bytes: (mapped.saturating_sub(owned)) * cs,
            reserved_bytes: st.reserved_of(vol) * cs,
            snapshot_bytes: snapshot_chunks * cs,
            read_only: !vol.kind.writable(),
        }
    }

    fn lookup(&self, st: &State, name: &str) -> Result<VolumeRecord, PoolError> {
        st.names
            .get(name)
            .and_then(|id| st.vols.get(id))
            .cloned()
            .ok_or_else(|| PoolError::NotFound(name.to_owned()))
    }

    /// Allocates, zeroes and maps chunks `[from, to)` of eager-thick `vol`.
    async fn eager_fill(&self, vol: u32, from: u64, to: u64) -> Result<(), PoolError> {
        let cs = u64::from(self.layout.chunk_size);
        let mut x = from;
        while x < to {
            let n = (to - x).min(1024);
            let node = self.meta.read().st.vols.get(&vol).map_or(NONE, |v| v.node);
            let chunks = self
                .alloc(n, vol)
                .ok_or_else(|| PoolError::NoSpace("no space to zero a thick volume".into()))?;
            let mut i = 0usize;
            while i < chunks.len() {
                let mut j = i + 1;
                while j < chunks.len() && chunks[j] == chunks[j - 1] + 1 {
                    j += 1;
                }
                let count = (j - i) as u64;
                let zero = self
                    .dev
                    .write_zeroes(
                        self.layout.chunk_off(chunks[i]),
                        count * cs,
                        ZeroFlags::default(),
                    )
                    .await;
                if let Err(e) = zero {
                    self.unalloc(&chunks[i..]);
                    return Err(e.into());
                }
                self.apply_map(
                    Op::Map {
                        node,
                        x: (x + i as u64) as u32,
                        phys: chunks[i],
                        count: count as u32,
                    },
                    count,
                )?;
                i = j;
            }
            x += n;
        }
        Ok(())
    }
}

impl Pool {
    fn start(
        dev: SharedBlockDev,
        sb: &Superblock,
        state: State,
        gen: u64,
        commit_interval: Option<Duration>,
    ) -> Pool {
        let (alerts, _) = watch::channel(AlertLevel::Ok);
        let inner = Arc::new(PoolInner {
            dev,
            layout: sb.layout,
            uuid: sb.pool_uuid,
            name: sb.name.clone(),
            created: sb.created,
            meta: RwLock::new(Meta {
                st: state,
                log: LogBuf::default(),
                in_flight: 0,
                unsettled: HashMap::new(),
            }),
            durable_seq: AtomicU64::new(0),
            commit: tokio::sync::Mutex::new(CommitCtx {
                gen,
                nonce: sb.journal_nonce,
                jpos: 0,
                chained: true,
            }),
            admin: tokio::sync::RwLock::new(()),
            failed: Mutex::new(None),
            failed_flag: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            counters: PoolCounters::default(),
            runtimes: Mutex::new(HashMap::new()),
            alert_level: AtomicU8::new(AlertLevel::Ok as u8),
            alerts,
        });
        inner.refresh_alerts();
        if let (Some(every), Ok(rt)) = (commit_interval, tokio::runtime::Handle::try_current()) {
            let weak = Arc::downgrade(&inner);
            rt.spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(p) = weak.upgrade() else { break };
                    if p.closed.load(Ordering::Acquire) || p.failed_flag.load(Ordering::Acquire) {
                        break;
                    }
                    let pending = p.meta.read().log.seq > p.durable_seq.load(Ordering::Acquire);
                    if pending {
                        let _ = p.commit().await;
                    }
                }
            });
        }
        Pool { inner }
    }

    /// Reads the pool label on a device without importing it: `Ok(None)` for a device
    /// that holds no pool.
    pub async fn probe(dev: &SharedBlockDev) -> Result<Option<PoolLabel>, PoolError> {
        let (mut sbs, bad) = read_superblocks(dev).await?;
        sbs.sort_by_key(|s| std::cmp::Reverse(s.gen));
        match sbs.first() {
            Some(sb) => Ok(Some(PoolLabel {
                uuid: VolumeId(sb.pool_uuid),
                name: sb.name.clone(),
                generation: sb.gen,
                layout: sb.layout,
                created: sb.created,
            })),
            None if bad.iter().all(|(_, r)| r == "no superblock") => Ok(None),
            None => Err(PoolError::Corrupt(format!("{bad:?}"))),
        }
    }

    /// Writes a fresh, empty pool on `dev`. Refuses a device that holds a pool (even a
    /// damaged one) unless `options.force`.
    pub async fn format(dev: SharedBlockDev, options: FormatOptions) -> Result<Pool, PoolError> {
        check_name(&options.name).map_err(PoolError::Invalid)?;
        options.thresholds.validate().map_err(PoolError::Invalid)?;
        let g = dev.geometry();
        if g.capabilities.read_only {
            return Err(PoolError::Invalid("the device is read-only".into()));
        }
        if !options.force {
            let (sbs, bad) = read_superblocks(&dev).await?;
            if let Some(sb) = sbs.first() {
                return Err(PoolError::AlreadyFormatted {
                    name: sb.name.clone(),
                    uuid: VolumeId(sb.pool_uuid).to_string(),
                });
            }
            if bad.iter().any(|(_, r)| r != "no superblock") {
                return Err(PoolError::AlreadyFormatted {
                    name: "(damaged)".into(),
                    uuid: format!("{bad:?}"),
                });
            }
        }
        let layout = Layout::compute(g.capacity_bytes(), options.chunk_size, options.max_volumes)
            .map_err(PoolError::Invalid)?;
        let uuid = random_id();
        let created = now_secs();
        let nonce = u64::from_le_bytes(random_id()[..8].try_into().unwrap_or_default());
        let state = State::new(layout, options.thresholds);
        let body = state.to_body();
        let label = Superblock {
            pool_uuid: uuid,
            gen: 1,
            layout,
            cp_len: 0,
            cp_crc: 0,
            journal_nonce: nonce,
            chained: true,
            created,
            name: options.name.clone(),
        };
        // Both generations 0 and 1 describe the empty pool, so either copy can serve.
        for gen in 0..2 {
            write_checkpoint(&dev, &label, gen, nonce, true, &body).await?;
        }
        if g.capabilities.discard && options.discard_data {
            // Best effort: lets a thin or flash device reclaim the old contents.
            let len = layout.data_chunks * u64::from(layout.chunk_size);
            let _ = dev.discard(layout.data_off, len).await;
        }
        dev.flush().await?;
        let sb = label;
        tracing::info!(pool = %sb.name, uuid = %VolumeId(uuid), "formatted pool");
        Ok(Pool::start(dev, &sb, state, 1, options.commit_interval))
    }

    /// Imports the pool on `dev` from the device alone: loads the newest checkpoint
    /// that verifies, replays its journal up to the first torn or unwritten block, and
    /// writes a new checkpoint so the pool continues cleanly. The report says what was
    /// found.
    pub async fn import(
        dev: SharedBlockDev,
        options: ImportOptions,
    ) -> Result<(Pool, ImportReport), PoolError> {
        let loaded = load(&dev, false).await?;
        let mut report = loaded.report;
        let gen = loaded.max_gen;
        let pool = Pool::start(dev, &loaded.sb, loaded.state, gen, options.commit_interval);
        {
            let mut ctx = pool.inner.commit.lock().await;
            // Nothing is appended to the replayed journal: a fresh generation starts.
            ctx.jpos = pool.inner.layout.journal_blocks();
            pool.inner.checkpoint_locked(&mut ctx).await?;
            ctx.chained = true;
            report.generation = ctx.gen;
        }
        for v in pool.inner.meta.read().st.vols.keys() {
            pool.inner.runtime(*v);
        }
        tracing::info!(pool = %pool.inner.name, ?report, "imported pool");
        Ok((pool, report))
    }

    /// The pool's id.
    pub fn uuid(&self) -> VolumeId {
        VolumeId(self.inner.uuid)
    }

    /// The pool's label.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Where everything lives on the device.
    pub fn layout(&self) -> Layout {
        self.inner.layout
    }

    /// Creates a LUN of `size` bytes.
    pub async fn create_lun(
        &self,
        name: &str,
        size: u64,
        options: LunOptions,
    ) -> Result<VolumeInfo, PoolError> {
        let p = &self.inner;
        let _admin = p.admin.write().await;
        p.check_online()?;
        check_name(name).map_err(PoolError::Invalid)?;
        if options.block_size < p.dev.geometry().block_size {
            return Err(PoolError::Invalid(format!(
                "block size {} is below the device's {}",
                options.block_size,
                p.dev.geometry().block_size
            )));
        }
        let (vol, len) = {
            let mut m = p.meta.write();
            m.check_room(name)?;
            let st = &m.st;
            let len = st
                .check_size(size, options.block_size)
                .map_err(|e| PoolError::Invalid(e.0))?;
            if options.provisioning.is_thick() && st.available_for(None) < len {
                return Err(PoolError::NoSpace(format!(
                    "a thick volume of {size} bytes needs {len} chunks; {} are available",
                    st.available_for(None)
                )));
            }
            let rec = VolumeRecord {
                id: st.next_vol,
                node: st.next_node,
                kind: VolumeKind::Lun,
                provisioning: options.provisioning,
                block_size: options.block_size,
                size,
                uuid: random_id(),
                created: now_secs(),
                origin: NONE,
                name: name.into(),
            };
            let op = Op::Create(rec.clone());
            m.apply_live(&op)?;
            (rec.id, len)
        };
        p.runtime(vol);
        if options.provisioning == (Provisioning::Thick { eager_zero: true }) {
            p.eager_fill(vol, 0, len).await?;
        }
        p.commit().await?;
        p.refresh_alerts();
        p.volume_info(vol)
    }

    /// A handle to the volume `name` (a LUN, clone or snapshot) as a block device.
    pub fn lun(&self, name: &str) -> Result<Arc<Lun>, PoolError> {
        let p = &self.inner;
        let rec = p.lookup(&p.meta.read().st, name)?;
        Ok(Arc::new(Lun::new(p.clone(), p.runtime(rec.id), &rec)))
    }

    /// A handle to the volume with this id.
    pub fn lun_by_id(&self, id: VolumeId) -> Result<Arc<Lun>, PoolError> {
        let p = &self.inner;
        let rec = {
            let m = p.meta.read();
            m.st.vols
                .values()
                .find(|v| v.uuid == id.0)
                .cloned()
                .ok_or_else(|| PoolError::NotFound(id.to_string()))?
        };
        Ok(Arc::new(Lun::new(p.clone(), p.runtime(rec.id), &rec)))
    }

    /// Every volume.
    pub fn list(&self) -> Vec<VolumeInfo> {
        let p = &self.inner;
        let m = p.meta.read();
        m.st.vols.values().map(|v| p.info(&m.st, v)).collect()
    }

    /// One volume.
    pub fn info(&self, name: &str) -> Result<VolumeInfo, PoolError> {
        let p = &self.inner;
        let m = p.meta.read();
        let rec = p.lookup(&m.st, name)?;
        Ok(p.info(&m.st, &rec))
    }

    /// Counters of the volume `name` (they follow the volume across snapshots and
    /// renames, and start at zero on import).
    pub fn volume_stats(&self, name: &str) -> Result<Arc<VolumeStats>, PoolError> {
        let p = &self.inner;
        let rec = p.lookup(&p.meta.read().st, name)?;
        Ok(p.runtime(rec.id).stats.clone())
    }

    /// Resizes a writable volume. Shrinking past mapped data is refused unless `force`.
    pub async fn resize(
        &self,
        name: &str,
        size: u64,
        force: bool,
    ) -> Result<VolumeInfo, PoolError> {
        let p = &self.inner;
        let _admin = p.admin.write().await;
        p.check_online()?;
        let (rec, old_len, new_len, tail_mapped) = {
            let m = p.meta.read();
            let rec = p.lookup(&m.st, name)?;
            if !rec.kind.writable() {
                return Err(PoolError::ReadOnly(name.into()));
            }
            let new_len =
                m.st.check_size(size, rec.block_size)
                    .map_err(|e| PoolError::Invalid(e.0))?;
            let cs = u64::from(p.layout.chunk_size);
            let old_len = m.st.chunks_for(rec.size);
            let node = m.st.nodes.get(&rec.node);
            if size < rec.size {
                let mut mapped = 0u64;
                if let Some(n) = node {
                    n.map
                        .for_each_mapped(size / cs, u64::MAX, |_, _| mapped += 1);
                }
                if mapped > 0 && !force {
                    return Err(PoolError::WouldLoseData {
                        name: name.into(),
                        size,
                        mapped_bytes: mapped * cs,
                    });
                }
            }
            if rec.provisioning.is_thick()
                && new_len > old_len
                && m.st.available_for(None) < new_len - old_len
            {
                return Err(PoolError::NoSpace(format!(
                    "growing thick {name:?} needs {} more chunks",
                    new_len - old_len
                )));
            }
            // Growing from a size inside a mapped chunk: the blocks past the old end
            // in that chunk may hold data from before an earlier shrink.
            let tail_mapped = size > rec.size
                && !rec.size.is_multiple_of(cs)
                && node.is_some_and(|n| n.map.get(rec.size / cs) != 0);
            (rec, old_len, new_len, tail_mapped)
        };
        if tail_mapped {
            // Those blocks are out of range until the grow is durable, so zeroing them
            // first is safe whatever happens next. (A shrink never touches data: a
            // crash before its record is durable must leave the volume intact.)
            let cs = u64::from(p.layout.chunk_size);
            let end = (rec.size / cs + 1) * cs;
            lun::zero_range(p, rec.id, rec.size, end.min(size) - rec.size, false).await?;
        }
        p.apply(Op::Resize { vol: rec.id, size })?;
        p.runtime(rec.id).size.store(size, Ordering::Release);
        if rec.provisioning == (Provisioning::Thick { eager_zero: true }) && new_len > old_len {
            p.eager_fill(rec.id, old_len, new_len).await?;
        }
        p.commit().await?;
        p.refresh_alerts();
        p.volume_info(rec.id)
    }

    /// Renames a volume.
    pub async fn rename(&self, name: &str, new_name: &str) -> Result<VolumeInfo, PoolError> {
        let p = &self.inner;
        let _admin = p.admin.write().await;
        p.check_online()?;
        check_name(new_name).map_err(PoolError::Invalid)?;
        let rec = {
            let m = p.meta.read();
            if m.st.names.contains_key(new_name) {
                return Err(PoolError::Exists(new_name.into()));
            }
            p.lookup(&m.st, name)?
        };
        p.apply(Op::Rename {
            vol: rec.id,
            name: new_name.into(),
        })?;
        p.commit().await?;
        self.info(new_name)
    }

    /// Deletes a volume. Works in any order with snapshots and clones: the chunks no
    /// other volume reads are freed (reusable once this commit is durable).
    pub async fn delete(&self, name: &str) -> Result<(), PoolError> {
        let p = &self.inner;
        let _admin = p.admin.write().await;
        p.check_online()?;
        let rec = p.lookup(&p.meta.read().st, name)?;
        p.apply(Op::Delete { vol: rec.id })?;
        if let Some(rt) = p.runtimes.lock().remove(&rec.id) {
            rt.deleted.store(true, Ordering::Release);
        }
        p.commit().await?;
        p.refresh_alerts();
        Ok(())
    }

    fn thick_cow_check(st: &State, src: &VolumeRecord) -> Result<(), PoolError> {
        if src.provisioning.is_thick() && src.kind.writable() {
            // After the snapshot the source owns nothing: its reservation grows back to
            // its whole size.
            let extra = st.nodes.get(&src.node).map_or(0, |n| n.owned);
            if st.available_for(None) < extra {
                return Err(PoolError::NoSpace(format!(
                    "thick {:?} needs {extra} chunks reserved for copy-on-write",
                    src.name
                )));
            }
        }
        Ok(())
    }

    /// Takes a read-only snapshot `snap_name` of the writable volume `lun`.
    pub async fn snapshot(&self, lun: &str, snap_name: &str) -> Result<VolumeInfo, PoolError> {
        let p = &self.inner;
        let _admin = p.admin.write().await;
        p.check_online()?;
        check_name(snap_name).map_err(PoolError::Invalid)?;
        let vol = {
            let mut m = p.meta.write();
            let src = p.lookup(&m.st, lun)?;
            if !src.kind.writable() {
                return Err(PoolError::ReadOnly(lun.into()));
            }
            m.check_room(snap_name)?;
            Self::thick_cow_check(&m.st, &src)?;
            let snap = NewVolume {
                vol: m.st.next_vol,
                name: snap_name.into(),
                uuid: random_id(),
                created: now_secs(),
            };
            let op = Op::Snapshot {
                src: src.id,
                new_node: m.st.next_node,
                snap: snap.clone(),
            };
            m.apply_live(&op)?;
            snap.vol
        };
        p.runtime(vol);
        p.commit().await?;
        p.refresh_alerts();
        p.volume_info(vol)
    }

    /// Creates a writable thin clone `new_name` of `source` (a snapshot or a writable
    /// volume; cloning a writable volume freezes its current contents as a hidden
    /// layer both share).
    pub async fn clone_lun(&self, source: &str, new_name: &str) -> Result<VolumeInfo, PoolError> {
        let p = &self.inner;
        let _admin = p.admin.write().await;
        p.check_online()?;
        check_name(new_name).map_err(PoolError::Invalid)?;
        let vol = {
            let mut m = p.meta.write();
            let src = p.lookup(&m.st, source)?;
            m.check_room(new_name)?;
            Self::thick_cow_check(&m.st, &src)?;
            let clone = NewVolume {
                vol: m.st.next_vol,
                name: new_name.into(),
                uuid: random_id(),
                created: now_secs(),
            };
            let n = m.st.next_node;
            let (src_node, node) = if src.kind.writable() {
                (n, n + 1)
            } else {
                (NONE, n)
            };
            let op = Op::Clone {
                src: src.id,
                src_node,
                node,
                clone: clone.clone(),
            };
            m.apply_live(&op)?;
            clone.vol
        };
        p.runtime(vol);
        p.commit().await?;
        p.refresh_alerts();
        p.volume_info(vol)
    }

    /// Sets the alert thresholds (stored in the pool).
    pub async fn set_thresholds(&self, thresholds: Thresholds) -> Result<(), PoolError> {
        thresholds.validate().map_err(PoolError::Invalid)?;
        let p = &self.inner;
        let _admin = p.admin.write().await;
        p.check_online()?;
        p.apply(Op::Thresholds(thresholds))?;
        p.commit().await?;
        p.refresh_alerts();
        Ok(())
    }

    /// Space, metadata use and the alerts in force.
    pub fn usage(&self) -> Usage {
        let p = &self.inner;
        let m = p.meta.read();
        let st = &m.st;
        let cs = u64::from(p.layout.chunk_size);
        let (d, dpct, mt, mpct) = p.levels(st);
        let mut alerts = Vec::new();
        if d != AlertLevel::Ok {
            alerts.push(Alert {
                resource: Resource::Data,
                level: d,
                used_pct: dpct,
            });
        }
        if mt != AlertLevel::Ok {
            alerts.push(Alert {
                resource: Resource::Metadata,
                level: mt,
                used_pct: mpct,
            });
        }
        let snapshot_chunks: u64 = st
            .vols
            .values()
            .filter(|v| v.kind == VolumeKind::Snapshot)
            .map(|v| st.exclusive(v.node))
            .sum();
        Usage {
            data_bytes: p.layout.data_chunks * cs,
            allocated_bytes: st.used_count * cs,
            reserved_bytes: st.reserved_total * cs,
            free_bytes: st.available_for(None) * cs,
            provisioned_bytes: st
                .vols
                .values()
                .filter(|v| v.kind.writable())
                .map(|v| v.size)
                .sum(),
            snapshot_bytes: snapshot_chunks * cs,
            metadata_used_bytes: st.metadata_bytes(),
            metadata_total_bytes: p.layout.cp_slot,
            data_used_pct: dpct,
            metadata_used_pct: mpct,
            volumes: st.vols.len(),
            thresholds: st.thresholds,
            alerts,
        }
    }

    /// The overall alert level, updated as space is taken and returned.
    pub fn alerts(&self) -> watch::Receiver<AlertLevel> {
        self.inner.alerts.subscribe()
    }

    /// Pool counters.
    pub fn counters(&self) -> &PoolCounters {
        &self.inner.counters
    }

    /// Makes every completed write and every allocation durable.
    pub async fn commit(&self) -> Result<(), PoolError> {
        self.inner.commit().await
    }

    /// Writes a final checkpoint and takes the pool offline, so that it can be
    /// imported elsewhere. Every handle fails afterwards.
    pub async fn export(&self) -> Result<(), PoolError> {
        let p = &self.inner;
        let _admin = p.admin.write().await;
        p.check_online()?;
        {
            let mut ctx = p.commit.lock().await;
            let r = p.checkpoint_locked(&mut ctx).await;
            if let Err(e) = r {
                p.fail(format!("export failed: {e}"));
                return Err(e);
            }
        }
        p.closed.store(true, Ordering::Release);
        tracing::info!(pool = %p.name, "pool exported");
        p.take_offline("exported".into());
        Ok(())
    }

    /// Checks the in-memory metadata's invariants from scratch (for tests and the
    /// `check` command's live mode); returns what is wrong.
    pub fn verify(&self) -> Vec<String> {
        let m = self.inner.meta.read();
        m.st.verify(m.in_flight)
    }
}
