//! Creating arrays, and assembling them from their disks alone.
//!
//! Assembly reads both superblock slots of every candidate, groups the devices by
//! array UUID (disks of two arrays never mix), and in each group takes the superblock
//! with the highest event count as the truth: its role table says which device holds
//! which role and in what state. A device is trusted only if that table lists it in
//! sync (or rebuilding, up to its recorded position); a device the table marks faulty,
//! or does not list at all, is stale and rejected, whatever its own superblock says. A
//! device whose own superblock is a few events behind but that the newest table still
//! lists in sync is trusted: it only missed a superblock update cut short by a crash
//! (any update that dropped a member is written to the others before a write that
//! skipped the member completes). Then the journal is replayed, and the array starts.

use crate::array::{now_unix, Array, ArrayConfig, Device, Inner, InnerParts, Member, Slot, State};
use crate::journal::{RecordHeader, FLAG_ZERO};
use crate::layout::{Layout, Level};
use crate::superblock::{
    DecodeError, MetaLayout, RoleState, ScrubKind, Superblock, Uuid, BLOCK, FLAG_CHECKSUMS,
    FLAG_CLEAN, FLAG_JOURNAL, MAX_MEMBERS, SB_SLOTS,
};
use crate::RaidError;
use basalt_blockdev::{BlockDev, SharedBlockDev, WriteFlags, ZeroFlags};
use futures_util::future::join_all;
use futures_util::StreamExt;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// Why assembly left a device out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum RejectReason {
    /// Reading the superblocks failed.
    Unreadable(String),
    /// No Basalt superblock.
    NoSuperblock,
    /// A superblock that does not decode (bad checksum, newer version, bad field).
    Corrupt(String),
    /// It belongs to another array than the one asked for.
    Foreign {
        /// The array it belongs to.
        array: Uuid,
    },
    /// The newest superblock of its array marks it faulty or no longer lists it: it
    /// missed updates (lower event count) and its data is not trusted.
    Stale {
        /// Its own event count.
        events: u64,
        /// The array's newest event count.
        newest: u64,
    },
    /// Another device claims the same identity (a copy of a disk); the one with the
    /// higher event count was kept.
    Duplicate {
        /// The identity claimed.
        device: Uuid,
    },
    /// Smaller than the array's member areas.
    TooSmall,
    /// Its superblock disagrees with the newest one about the array's shape.
    Mismatch(String),
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RejectReason::Unreadable(e) => write!(f, "unreadable: {e}"),
            RejectReason::NoSuperblock => f.write_str("no array superblock"),
            RejectReason::Corrupt(e) => write!(f, "corrupt superblock: {e}"),
            RejectReason::Foreign { array } => write!(f, "belongs to another array ({array})"),
            RejectReason::Stale { events, newest } => write!(
                f,
                "stale member (events {events}, array at {newest}): not trusted"
            ),
            RejectReason::Duplicate { device } => {
                write!(f, "duplicate of device {device} (older copy)")
            }
            RejectReason::TooSmall => f.write_str("too small for the array"),
            RejectReason::Mismatch(e) => write!(f, "superblock disagrees with the array: {e}"),
        }
    }
}

/// A device assembly did not use.
#[derive(Debug, Clone, Serialize)]
pub struct Rejected {
    /// The device's label.
    pub label: String,
    /// The array its superblock names, if any.
    pub array: Option<Uuid>,
    /// Why.
    pub reason: RejectReason,
}

/// What [`examine`] finds on a device.
pub type Examined = Result<Superblock, RejectReason>;

/// Options of [`assemble`].
#[derive(Debug, Clone)]
pub struct AssembleOptions {
    /// Assemble only this array; devices of others are rejected as foreign.
    pub array: Option<Uuid>,
    /// Member request timeout.
    pub io_timeout: Duration,
    /// Background job rate limit in bytes per second.
    pub rate_limit: Option<u64>,
    /// See [`ArrayConfig::max_read_errors`](crate::ArrayConfig::max_read_errors).
    pub max_read_errors: u32,
    /// See [`ArrayConfig::read_error_decay`](crate::ArrayConfig::read_error_decay).
    pub read_error_decay: Duration,
}

impl Default for AssembleOptions {
    fn default() -> Self {
        AssembleOptions {
            array: None,
            io_timeout: Duration::from_secs(30),
            rate_limit: None,
            max_read_errors: crate::array::DEFAULT_MAX_READ_ERRORS,
            read_error_decay: crate::array::DEFAULT_READ_ERROR_DECAY,
        }
    }
}

/// The result of [`assemble`].
#[derive(Default)]
pub struct Assembly {
    /// Arrays started.
    pub arrays: Vec<Arc<Array>>,
    /// Arrays found but not started, with the reason.
    pub not_started: Vec<(Uuid, String, RaidError)>,
    /// Devices left out.
    pub rejected: Vec<Rejected>,
}

impl std::fmt::Debug for Assembly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assembly")
            .field(
                "arrays",
                &self
                    .arrays
                    .iter()
                    .map(|a| a.name().to_owned())
                    .collect::<Vec<_>>(),
            )
            .field("not_started", &self.not_started)
            .field("rejected", &self.rejected)
            .finish()
    }
}

/// Reads a device's superblock (the newer of its two slots).
pub async fn examine(dev: &SharedBlockDev) -> Examined {
    let cap = dev.geometry().capacity_bytes();
    if cap < 2 * BLOCK {
        return Err(RejectReason::NoSuperblock);
    }
    let both = dev
        .read(0, 2 * BLOCK as usize)
        .await
        .map_err(|e| RejectReason::Unreadable(e.to_string()))?;
    match Superblock::newest(&both[..BLOCK as usize], &both[BLOCK as usize..]) {
        Ok(sb) => Ok(sb),
        Err(DecodeError::NoMagic) => Err(RejectReason::NoSuperblock),
        Err(e) => Err(RejectReason::Corrupt(e.to_string())),
    }
}

fn layout_of(sb: &Superblock) -> Layout {
    Layout {
        level: sb.level,
        members: sb.members as usize,
        copies: sb.copies as usize,
        chunk: u64::from(sb.chunk),
        stripes: sb.meta.data_size / u64::from(sb.chunk),
    }
}

/// Assembles every array found on `candidates` (in any order).
pub async fn assemble(candidates: Vec<Device>, opts: &AssembleOptions) -> Assembly {
    let mut out = Assembly::default();
    let examined = join_all(candidates.iter().map(|d| examine(&d.dev))).await;
    let mut groups: BTreeMap<Uuid, Vec<(Device, Superblock)>> = BTreeMap::new();
    for (d, e) in candidates.into_iter().zip(examined) {
        match e {
            Err(reason) => out.rejected.push(Rejected {
                label: d.label,
                array: None,
                reason,
            }),
            Ok(sb) if opts.array.is_some_and(|u| u != sb.array_uuid) => {
                out.rejected.push(Rejected {
                    label: d.label,
                    array: Some(sb.array_uuid),
                    reason: RejectReason::Foreign {
                        array: sb.array_uuid,
                    },
                })
            }
            Ok(sb) => groups.entry(sb.array_uuid).or_default().push((d, sb)),
        }
    }
    for (uuid, mut devs) in groups {
        devs.sort_by_key(|d| std::cmp::Reverse(d.1.events));
        let newest = devs[0].1.clone();
        match assemble_one(newest.clone(), devs, opts, &mut out.rejected).await {
            Ok(a) => out.arrays.push(a),
            Err(e) => out.not_started.push((uuid, newest.name, e)),
        }
    }
    out
}

async fn assemble_one(
    newest: Superblock,
    devs: Vec<(Device, Superblock)>,
    opts: &AssembleOptions,
    rejected: &mut Vec<Rejected>,
) -> Result<Arc<Array>, RaidError> {
    let layout = layout_of(&newest);
    let meta = newest.meta;
    let n = layout.members;
    let mut slots: Vec<Slot> = (0..n)
        .map(|_| Slot {
            member: None,
            state: RoleState::Missing,
            recovery: 0,
        })
        .collect();
    let mut spares: Vec<Arc<Member>> = Vec::new();
    let mut seen: HashMap<Uuid, ()> = HashMap::new();
    for (d, sb) in devs {
        let reject = |reason| Rejected {
            label: d.label.clone(),
            array: Some(sb.array_uuid),
            reason,
        };
        if sb.level != newest.level
            || sb.members != newest.members
            || sb.chunk != newest.chunk
            || sb.meta != newest.meta
        {
            rejected.push(reject(RejectReason::Mismatch(
                "level, members, chunk or areas differ".into(),
            )));
            continue;
        }
        if d.dev.geometry().capacity_bytes() < meta.data_offset + meta.data_size {
            rejected.push(reject(RejectReason::TooSmall));
            continue;
        }
        if seen.insert(sb.device_uuid, ()).is_some() {
            rejected.push(reject(RejectReason::Duplicate {
                device: sb.device_uuid,
            }));
            continue;
        }
        let stale = RejectReason::Stale {
            events: sb.events,
            newest: newest.events,
        };
        if let Some(r) = newest.table.iter().position(|e| e.device == sb.device_uuid) {
            let e = newest.table[r];
            match e.state {
                RoleState::InSync | RoleState::Rebuilding => {
                    slots[r] = Slot {
                        member: Some(Member::new(&d, sb.device_uuid, &meta)),
                        state: e.state,
                        recovery: e.recovery,
                    };
                }
                _ => rejected.push(reject(stale)),
            }
        } else if newest.spares.contains(&sb.device_uuid) {
            spares.push(Member::new(&d, sb.device_uuid, &meta));
        } else {
            rejected.push(reject(stale));
        }
    }
    let missing: Vec<bool> = slots
        .iter()
        .map(|s| s.member.is_none() || s.state != RoleState::InSync)
        .collect();
    if !layout.survives(&missing) {
        let lost: Vec<String> = missing
            .iter()
            .enumerate()
            .filter(|(_, m)| **m)
            .map(|(r, _)| r.to_string())
            .collect();
        return Err(RaidError::CannotStart {
            array: newest.name.clone(),
            reason: format!(
                "roles {} are missing, faulty or incompletely rebuilt; {} cannot run without them",
                lost.join(", "),
                layout.level
            ),
        });
    }
    let journal = newest.flags & FLAG_JOURNAL != 0;
    let clean = newest.flags & FLAG_CLEAN != 0;
    let mut resync_offset = newest.resync_offset;
    if !clean && !journal && layout.level.redundant() && resync_offset == u64::MAX {
        resync_offset = 0;
    }
    let state = State {
        slots,
        spares,
        failed: None,
        rebuild_stopped: None,
        stopped: false,
        clean,
        resync_offset,
        scrub: newest.scrub,
        scrub_offset: newest.scrub_offset,
        journal_checkpoint: newest.journal_checkpoint,
        gen: 1,
    };
    let array = Array::build(InnerParts {
        uuid: newest.array_uuid,
        name: newest.name.clone(),
        layout,
        meta,
        ctime: newest.ctime,
        journal,
        checksums: newest.flags & FLAG_CHECKSUMS != 0,
        io_timeout: opts.io_timeout,
        read_error_policy: crate::array::ReadErrorPolicy {
            max: opts.max_read_errors,
            decay: opts.read_error_decay,
        },
        state,
        events: newest.events,
        next_seq: newest.journal_checkpoint,
        rate_limit: opts.rate_limit,
    });
    if journal {
        replay(&array.inner, newest.journal_checkpoint).await?;
    }
    array.inner.persist().await?;
    array.start();
    Ok(Arc::new(array))
}

/// Replays the journal from `checkpoint`; see [`crate::journal`].
async fn replay(inner: &Inner, checkpoint: u64) -> Result<(), RaidError> {
    let meta = inner.meta;
    let slots = meta.journal_size / meta.journal_slot;
    let members = inner.live_members();
    // Every valid header at or after the checkpoint, per member.
    let mut by_seq: BTreeMap<u64, Vec<(usize, u64, RecordHeader)>> = BTreeMap::new();
    let mut max_seq = checkpoint;
    for (role, m) in &members {
        let headers: Vec<(u64, Option<RecordHeader>)> = futures_util::stream::iter(0..slots)
            .map(|i| {
                let off = meta.journal_offset + i * meta.journal_slot;
                async move {
                    let r = inner.mread(m, off, BLOCK as usize).await;
                    (i, r.ok().and_then(|b| RecordHeader::decode(&b)))
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        for (i, h) in headers {
            let Some(h) = h else { continue };
            let sane = h.array_uuid == inner.uuid
                && h.role as usize == *role
                && h.stripe < inner.layout.stripes
                && u64::from(h.offset) % BLOCK == 0
                && u64::from(h.len) % BLOCK == 0
                && h.len > 0
                && u64::from(h.offset) + u64::from(h.len) <= inner.layout.chunk
                && h.participants & (1 << role) != 0;
            if !sane || h.seq < checkpoint {
                continue;
            }
            max_seq = max_seq.max(h.seq + 1);
            by_seq.entry(h.seq).or_default().push((*role, i, h));
        }
    }
    let mut replayed = 0u64;
    for (seq, recs) in by_seq {
        let h0 = recs[0].2;
        let consistent = recs.iter().all(|(_, _, h)| {
            h.stripe == h0.stripe
                && h.offset == h0.offset
                && h.len == h0.len
                && h.participants == h0.participants
        });
        if !consistent {
            continue;
        }
        // Every trusted participant must hold its record, with intact data.
        let needed: Vec<usize> = members
            .iter()
            .map(|(r, _)| *r)
            .filter(|r| h0.participants & (1 << r) != 0)
            .collect();
        let mut payloads: Vec<(usize, Option<bytes::Bytes>)> = Vec::new();
        let mut complete = true;
        for r in &needed {
            let Some((_, slot, h)) = recs.iter().find(|(role, _, _)| role == r) else {
                complete = false;
                break;
            };
            if h.flags & FLAG_ZERO != 0 {
                payloads.push((*r, None));
                continue;
            }
            let Some((_, m)) = members.iter().find(|(role, _)| role == r) else {
                complete = false;
                break;
            };
            let off = meta.journal_offset + slot * meta.journal_slot + BLOCK;
            match inner.mread(m, off, h.len as usize).await {
                Ok(d) if crc32c::crc32c(&d) == h.data_crc => payloads.push((*r, Some(d))),
                _ => {
                    complete = false;
                    break;
                }
            }
        }
        if !complete || payloads.is_empty() {
            tracing::debug!(array = %inner.name, seq, "journal: incomplete transaction dropped");
            continue;
        }
        let view: Vec<Option<Arc<Member>>> = (0..inner.layout.members)
            .map(|r| {
                members
                    .iter()
                    .find(|(role, _)| *role == r)
                    .map(|(_, m)| m.clone())
            })
            .collect();
        let off = inner.data_off(h0.stripe, u64::from(h0.offset));
        for (r, data) in payloads {
            let Some(m) = &view[r] else { continue };
            let res = match &data {
                Some(d) => inner.mwrite(m, off, d.clone(), WriteFlags::default()).await,
                None => {
                    inner
                        .mio(
                            m.dev
                                .write_zeroes(off, u64::from(h0.len), ZeroFlags::default()),
                        )
                        .await
                }
            };
            if let Err(e) = res {
                inner.member_failed(r, m, &e).await;
                continue;
            }
            if inner.checksums {
                let first = (h0.stripe * inner.layout.chunk + u64::from(h0.offset)) / BLOCK;
                let zeroes;
                let d: &[u8] = match &data {
                    Some(d) => d,
                    None => {
                        zeroes = vec![0u8; h0.len as usize];
                        &zeroes
                    }
                };
                if let Err(e) = inner.mio(m.csums.set_data(&m.dev, first, d)).await {
                    inner.member_failed(r, m, &e).await;
                }
            }
        }
        replayed += 1;
    }
    inner.metrics.journal_replayed.store(replayed, Relaxed);
    if replayed > 0 {
        tracing::info!(array = %inner.name, replayed, "journal replayed");
    }
    inner.flush_csums().await;
    inner.flush_members().await?;
    {
        let mut rings = inner
            .rings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        rings.next_seq = max_seq;
    }
    let mut st = inner.state();
    st.journal_checkpoint = max_seq;
    st.gen += 1;
    Ok(())
}

/// Checks a device offered to a running array and clears its metadata areas.
pub(crate) async fn prepare_device(inner: &Inner, d: &Device) -> Result<(), RaidError> {
    let g = d.dev.geometry();
    if g.capacity_bytes() < inner.meta.data_offset + inner.meta.data_size {
        return Err(RaidError::Config(format!(
            "device {} ({} bytes) is smaller than the array's members ({} bytes)",
            d.label,
            g.capacity_bytes(),
            inner.meta.data_offset + inner.meta.data_size
        )));
    }
    check_block_size(d)?;
    if let Ok(sb) = examine(&d.dev).await {
        let st = inner.state();
        let in_use = st
            .slots
            .iter()
            .filter(|s| s.state != RoleState::Faulty)
            .filter_map(|s| s.member.as_ref())
            .chain(st.spares.iter())
            .any(|m| m.uuid == sb.device_uuid || Arc::ptr_eq(&m.dev, &d.dev));
        if sb.array_uuid != inner.uuid {
            return Err(RaidError::InUse {
                device: d.label.clone(),
                array: sb.array_uuid,
            });
        }
        if in_use {
            return Err(RaidError::Busy(format!(
                "device {} is already part of the array",
                d.label
            )));
        }
    }
    clear_metadata(d, &inner.meta).await
}

fn check_block_size(d: &Device) -> Result<(), RaidError> {
    let g = d.dev.geometry();
    if g.block_size as u64 > BLOCK || !BLOCK.is_multiple_of(u64::from(g.block_size)) {
        return Err(RaidError::Config(format!(
            "device {} has {}-byte blocks; members need a block size dividing 4096",
            d.label, g.block_size
        )));
    }
    if g.capabilities.read_only {
        return Err(RaidError::Config(format!(
            "device {} is read-only",
            d.label
        )));
    }
    Ok(())
}

async fn clear_metadata(d: &Device, meta: &MetaLayout) -> Result<(), RaidError> {
    let dev_err = |e| RaidError::Device {
        device: d.label.clone(),
        source: e,
    };
    let zf = ZeroFlags::default();
    for off in SB_SLOTS {
        d.dev.write_zeroes(off, BLOCK, zf).await.map_err(dev_err)?;
    }
    if meta.journal_size > 0 {
        d.dev
            .write_zeroes(meta.journal_offset, meta.journal_size, zf)
            .await
            .map_err(dev_err)?;
    }
    if meta.csum_size > 0 {
        d.dev
            .write_zeroes(meta.csum_offset, meta.csum_size, zf)
            .await
            .map_err(dev_err)?;
    }
    d.dev.flush().await.map_err(dev_err)
}

pub(crate) async fn create(
    config: ArrayConfig,
    members: Vec<Device>,
    spares: Vec<Device>,
) -> Result<Arc<Array>, RaidError> {
    let level = config.level;
    let n = members.len();
    if n < level.min_members() || n > MAX_MEMBERS {
        return Err(RaidError::Config(format!(
            "{level} needs {} to {MAX_MEMBERS} members, got {n}",
            level.min_members()
        )));
    }
    let copies = match level {
        Level::Raid1 => n,
        Level::Raid10 => {
            if config.copies < 2 || !n.is_multiple_of(config.copies) {
                return Err(RaidError::Config(format!(
                    "raid10 with {} copies needs a multiple of {} members, got {n}",
                    config.copies, config.copies
                )));
            }
            config.copies
        }
        _ => 1,
    };
    let chunk = u64::from(config.chunk);
    if !chunk.is_power_of_two() || !(BLOCK..=16 << 20).contains(&chunk) {
        return Err(RaidError::Config(format!(
            "chunk {chunk} must be a power of two from 4 KiB to 16 MiB"
        )));
    }
    if config.name.len() > 64 {
        return Err(RaidError::Config("name longer than 64 bytes".into()));
    }
    if spares.len() > crate::superblock::MAX_SPARES {
        return Err(RaidError::Config("too many spares".into()));
    }
    let all: Vec<&Device> = members.iter().chain(&spares).collect();
    for (i, d) in all.iter().enumerate() {
        check_block_size(d)?;
        if all[..i].iter().any(|o| Arc::ptr_eq(&o.dev, &d.dev)) {
            return Err(RaidError::Config(format!("device {} given twice", d.label)));
        }
        if !config.force {
            if let Ok(sb) = examine(&d.dev).await {
                return Err(RaidError::InUse {
                    device: d.label.clone(),
                    array: sb.array_uuid,
                });
            }
        }
    }
    let journal = config.journal.unwrap_or(true) && level.redundant();
    let checksums = config
        .checksums
        .unwrap_or(matches!(level, Level::Raid1 | Level::Raid10 | Level::Raid5))
        && level.redundant();
    let smallest = members
        .iter()
        .map(|d| d.dev.geometry().capacity_bytes())
        .min()
        .unwrap_or(0);
    let meta = MetaLayout::plan(smallest, chunk, journal, config.journal_bytes, checksums)?;
    let layout = Layout {
        level,
        members: n,
        copies,
        chunk,
        stripes: meta.data_size / chunk,
    };
    for d in &spares {
        if d.dev.geometry().capacity_bytes() < meta.data_offset + meta.data_size {
            return Err(RaidError::Config(format!("spare {} is too small", d.label)));
        }
    }
    let results = join_all(all.iter().map(|d| clear_metadata(d, &meta))).await;
    results
        .into_iter()
        .collect::<Result<Vec<()>, RaidError>>()?;
    // Initial sync: zero the data areas when the members can do it fast (zero data has
    // zero parity and equal mirrors), otherwise resync in the background.
    let mut resync_offset = u64::MAX;
    if level.redundant() && !config.assume_clean {
        let fast = members
            .iter()
            .all(|d| d.dev.geometry().capabilities.fast_zeroes);
        if fast {
            let zf = ZeroFlags {
                may_unmap: true,
                fast_only: true,
            };
            let r = join_all(
                members
                    .iter()
                    .map(|d| d.dev.write_zeroes(meta.data_offset, meta.data_size, zf)),
            )
            .await;
            if r.iter().any(|x| x.is_err()) {
                resync_offset = 0;
            }
        } else {
            resync_offset = 0;
        }
    }
    let slots = members
        .iter()
        .map(|d| Slot {
            member: Some(Member::new(d, Uuid::random(), &meta)),
            state: RoleState::InSync,
            recovery: 0,
        })
        .collect();
    let spares = spares
        .iter()
        .map(|d| Member::new(d, Uuid::random(), &meta))
        .collect();
    let array = Array::build(InnerParts {
        uuid: Uuid::random(),
        name: config.name,
        layout,
        meta,
        ctime: now_unix(),
        journal,
        checksums,
        io_timeout: config.io_timeout,
        read_error_policy: crate::array::ReadErrorPolicy {
            max: config.max_read_errors,
            decay: config.read_error_decay,
        },
        state: State {
            slots,
            spares,
            failed: None,
            rebuild_stopped: None,
            stopped: false,
            clean: true,
            resync_offset,
            scrub: ScrubKind::None,
            scrub_offset: 0,
            journal_checkpoint: 1,
            gen: 1,
        },
        events: 0,
        next_seq: 1,
        rate_limit: config.rate_limit,
    });
    array.inner.persist().await?;
    array.inner.flush_members().await?;
    array.start();
    Ok(Arc::new(array))
}
