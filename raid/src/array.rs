//! The array: state, the I/O paths (read, reconstruct, full-stripe, read-modify-write,
//! reconstruct-write, degraded), member failure, superblock persistence and the
//! journal's I/O.

use crate::csum::{block_crc, Csums};
use crate::journal::{RecordHeader, Rings, FLAG_ZERO};
use crate::layout::{Layout, Level, StripeMap};
use crate::parity::{two_data_coefficients, Kernel};
use crate::repair::{Corrections, Hold};
use crate::status::ArrayMetrics;
use crate::superblock::{
    MetaLayout, RoleEntry, RoleState, ScrubKind, Superblock, Uuid, BLOCK, FLAG_CHECKSUMS,
    FLAG_CLEAN, FLAG_JOURNAL, ROLE_SPARE,
};
use crate::{gf, jobs, RaidError};
use async_trait::async_trait;
use basalt_blockdev::{
    check_range, first_difference, AlignedBuf, BlockDev, BlockError, Capabilities, CompareOutcome,
    Geometry, RangeLocks, Result, SharedBlockDev, WriteFlags, ZeroFlags,
};
use bytes::Bytes;
use futures_util::future::join_all;
use futures_util::StreamExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How long [`Array::stop`] waits for I/O in flight (detached writes, read corrections).
const STOP_DRAIN: Duration = Duration::from_secs(30);

/// A member device offered to [`Array::create`], [`crate::assemble`] or an operation.
#[derive(Clone)]
pub struct Device {
    /// A name for reports (a path, a serial number).
    pub label: String,
    /// The device.
    pub dev: SharedBlockDev,
}

impl Device {
    /// A device with a label.
    pub fn new(label: impl Into<String>, dev: SharedBlockDev) -> Self {
        Device {
            label: label.into(),
            dev,
        }
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("label", &self.label)
            .finish()
    }
}

/// How to create an array. [`ArrayConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct ArrayConfig {
    /// Name (at most 64 bytes), shown in status.
    pub name: String,
    /// RAID level.
    pub level: Level,
    /// Chunk size in bytes: a power of two from 4 KiB to 16 MiB (default 64 KiB).
    pub chunk: u32,
    /// Copies per mirror group for RAID10 (default 2).
    pub copies: usize,
    /// Journal writes to close the write hole. Default: on for every redundant level.
    pub journal: Option<bool>,
    /// Journal size per member (default 1/64 of the member, at most 64 MiB).
    pub journal_bytes: Option<u64>,
    /// Keep per-block checksums for scrub. Default: on for RAID 1, 10 and 5 (RAID6
    /// locates bad blocks from its two syndromes).
    pub checksums: Option<bool>,
    /// Overwrite devices that already carry an array superblock.
    pub force: bool,
    /// Skip the initial sync (the caller promises the members are zeroed).
    pub assume_clean: bool,
    /// A member request taking longer than this fails the member (default 30 s).
    pub io_timeout: Duration,
    /// Background job rate limit in bytes per second (default none).
    pub rate_limit: Option<u64>,
    /// Read errors a member may have (corrected from redundancy) before it is failed,
    /// counted over a decaying window (md's `max_read_errors`, default 20).
    pub max_read_errors: u32,
    /// The read error count halves every this long (default one hour, as md).
    pub read_error_decay: Duration,
}

/// When corrected read errors fail a member: more than `max` within the decaying
/// window (the count halves every `decay`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadErrorPolicy {
    pub max: u32,
    pub decay: Duration,
}

/// The default of [`ArrayConfig::max_read_errors`] (md's).
pub(crate) const DEFAULT_MAX_READ_ERRORS: u32 = 20;
/// The default of [`ArrayConfig::read_error_decay`] (md's).
pub(crate) const DEFAULT_READ_ERROR_DECAY: Duration = Duration::from_secs(3600);

impl ArrayConfig {
    /// Defaults for `name` at `level`.
    pub fn new(name: impl Into<String>, level: Level) -> Self {
        ArrayConfig {
            name: name.into(),
            level,
            chunk: 64 << 10,
            copies: 2,
            journal: None,
            journal_bytes: None,
            checksums: None,
            force: false,
            assume_clean: false,
            io_timeout: Duration::from_secs(30),
            rate_limit: None,
            max_read_errors: DEFAULT_MAX_READ_ERRORS,
            read_error_decay: DEFAULT_READ_ERROR_DECAY,
        }
    }

    /// Sets the read error threshold: more than `max` read errors on a member within
    /// the window (the count halves every `decay`) fail it.
    pub fn read_errors(mut self, max: u32, decay: Duration) -> Self {
        self.max_read_errors = max;
        self.read_error_decay = decay;
        self
    }

    /// Sets the chunk size.
    pub fn chunk(mut self, bytes: u32) -> Self {
        self.chunk = bytes;
        self
    }

    /// Turns the journal on or off.
    pub fn journal(mut self, on: bool) -> Self {
        self.journal = Some(on);
        self
    }

    /// Turns checksums on or off.
    pub fn checksums(mut self, on: bool) -> Self {
        self.checksums = Some(on);
        self
    }
}

/// One member device in use.
pub(crate) struct Member {
    pub dev: SharedBlockDev,
    pub uuid: Uuid,
    pub label: String,
    pub errors: AtomicU64,
    pub csums: Csums,
    /// Read errors in the decaying window: (count, start of the current period).
    pub read_errors: Mutex<(u64, Instant)>,
    /// Read errors corrected by rewriting from redundancy.
    pub corrected: AtomicU64,
}

impl Member {
    pub(crate) fn new(d: &Device, uuid: Uuid, meta: &MetaLayout) -> Arc<Member> {
        Arc::new(Member {
            dev: d.dev.clone(),
            uuid,
            label: d.label.clone(),
            errors: AtomicU64::new(0),
            csums: Csums::new(meta.csum_offset),
            read_errors: Mutex::new((0, Instant::now())),
            corrected: AtomicU64::new(0),
        })
    }
}

/// A role and what holds it.
#[derive(Clone)]
pub(crate) struct Slot {
    pub member: Option<Arc<Member>>,
    pub state: RoleState,
    pub recovery: u64,
}

/// The mutable state of an array; every change that must survive a restart bumps
/// `gen`, and [`Inner::persist`] writes it to the superblocks.
pub(crate) struct State {
    pub slots: Vec<Slot>,
    pub spares: Vec<Arc<Member>>,
    pub failed: Option<String>,
    /// Why the last rebuild stopped short (rows it could not rebuild); no rebuild
    /// starts again until a device is added (md's `recovery_disabled`). Not persisted:
    /// an assembly tries again.
    pub rebuild_stopped: Option<String>,
    pub stopped: bool,
    pub clean: bool,
    pub resync_offset: u64,
    pub scrub: ScrubKind,
    pub scrub_offset: u64,
    pub journal_checkpoint: u64,
    pub gen: u64,
}

pub(crate) struct SbWriter {
    pub events: u64,
    pub persisted_gen: u64,
}

/// Outcome of a step that may have to start over because a member failed under it.
pub(crate) enum Step {
    Retry,
    Fatal(BlockError),
}

pub(crate) struct Inner {
    pub me: Weak<Inner>,
    pub uuid: Uuid,
    pub name: String,
    pub layout: Layout,
    pub meta: MetaLayout,
    pub ctime: u64,
    pub journal: bool,
    pub checksums: bool,
    pub geometry: Geometry,
    pub io_timeout: Duration,
    pub read_error_policy: ReadErrorPolicy,
    /// Read corrections in flight, so that one bad region counts once.
    pub corrections: Arc<Corrections>,
    pub state: Mutex<State>,
    pub sb: tokio::sync::Mutex<SbWriter>,
    pub locks: RangeLocks,
    pub rings: Mutex<Rings>,
    pub ring_space: Notify,
    pub checkpointing: AtomicBool,
    pub cp_lock: tokio::sync::Mutex<()>,
    pub write_gate: tokio::sync::RwLock<()>,
    pub clean_flag: AtomicBool,
    pub last_write: Mutex<Instant>,
    pub metrics: ArrayMetrics,
    pub events: AtomicU64,
    pub jobs: jobs::Jobs,
    pub wake: Notify,
}

/// A RAID array. It is a [`BlockDev`]; hold it in an `Arc` and hand it to the layer
/// above. Dropping the last handle stops its background work without a clean
/// shutdown (like a crash); call [`Array::stop`] first for a clean one.
pub struct Array {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Array {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Array")
            .field("name", &self.inner.name)
            .field("uuid", &self.inner.uuid)
            .field("level", &self.inner.layout.level)
            .finish()
    }
}

impl Drop for Array {
    fn drop(&mut self) {
        self.inner.state().stopped = true;
        self.inner.jobs.cancel_all();
        self.inner.wake.notify_waiters();
    }
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Byte-wise copy into a fresh aligned buffer.
pub(crate) fn aligned(data: &[u8]) -> Bytes {
    AlignedBuf::copy_from(data).freeze()
}

fn zero_crc() -> u32 {
    static Z: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *Z.get_or_init(|| block_crc(&[0u8; BLOCK as usize]))
}

/// Fills every `None` of a stripe's blocks (positions `0..k` data, `k` P, `k + 1` Q)
/// from the others. False when more are missing than the parity covers.
pub(crate) fn recover(
    k: usize,
    nparity: usize,
    bufs: &mut [Option<Vec<u8>>],
    regen_parity: bool,
) -> bool {
    let len = match bufs.iter().flatten().next() {
        Some(b) => b.len(),
        None => return false,
    };
    let kern = Kernel::best();
    let missing_data: Vec<usize> = (0..k).filter(|&i| bufs[i].is_none()).collect();
    let p_missing = bufs[k].is_none();
    let q_missing = nparity == 2 && bufs[k + 1].is_none();
    if missing_data.len() + usize::from(p_missing) + usize::from(q_missing) > nparity {
        return false;
    }
    match missing_data[..] {
        [] => {}
        [x] if !p_missing => {
            let mut out = vec![0u8; len];
            {
                let srcs: Vec<&[u8]> = (0..=k).filter_map(|i| bufs[i].as_deref()).collect();
                kern.gen_p(&srcs, &mut out);
            }
            bufs[x] = Some(out);
        }
        [x] => {
            // P is gone too: D_x = 2^-x (Q + sum of 2^i D_i).
            let inv = gf::inv(gf::pow2(x));
            let mut coeffs = vec![inv];
            let mut srcs: Vec<&[u8]> = vec![bufs[k + 1].as_deref().unwrap_or(&[])];
            for i in (0..k).filter(|&i| i != x) {
                coeffs.push(gf::mul(inv, gf::pow2(i)));
                srcs.push(bufs[i].as_deref().unwrap_or(&[]));
            }
            let mut out = vec![0u8; len];
            kern.lincomb(&coeffs, &srcs, &mut [&mut out], false);
            bufs[x] = Some(out);
        }
        [x, y] => {
            let coeffs = two_data_coefficients(k, x, y);
            let mut dx = vec![0u8; len];
            let mut dy = vec![0u8; len];
            {
                let mut srcs: Vec<&[u8]> = vec![
                    bufs[k].as_deref().unwrap_or(&[]),
                    bufs[k + 1].as_deref().unwrap_or(&[]),
                ];
                for i in (0..k).filter(|&i| i != x && i != y) {
                    srcs.push(bufs[i].as_deref().unwrap_or(&[]));
                }
                kern.lincomb(&coeffs, &srcs, &mut [&mut dx, &mut dy], false);
            }
            bufs[x] = Some(dx);
            bufs[y] = Some(dy);
        }
        _ => return false,
    }
    if regen_parity && (p_missing || q_missing) {
        let mut p = vec![0u8; len];
        let mut q = vec![0u8; len];
        {
            let data: Vec<&[u8]> = (0..k).filter_map(|i| bufs[i].as_deref()).collect();
            if nparity == 2 {
                kern.gen_pq(&data, &mut p, &mut q);
            } else {
                kern.gen_p(&data, &mut p);
            }
        }
        bufs[k] = Some(p);
        if nparity == 2 {
            bufs[k + 1] = Some(q);
        }
    }
    true
}

impl Inner {
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn rings(&self) -> MutexGuard<'_, Rings> {
        self.rings.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn data_off(&self, stripe: u64, in_chunk: u64) -> u64 {
        self.meta.data_offset + stripe * self.layout.chunk + in_chunk
    }

    /// The role at stripe position `pos` (`0..k` data, `k` P, `k + 1` Q).
    pub(crate) fn role_at(map: &StripeMap, pos: usize) -> usize {
        let k = map.columns.len();
        if pos < k {
            map.columns[pos][0]
        } else if pos == k {
            map.p.unwrap_or(0)
        } else {
            map.q.unwrap_or(0)
        }
    }

    /// The members usable for stripe `s`, by role.
    pub(crate) fn view(&self, s: u64) -> Vec<Option<Arc<Member>>> {
        self.state()
            .slots
            .iter()
            .map(|sl| match sl.state {
                RoleState::InSync => sl.member.clone(),
                RoleState::Rebuilding if s < sl.recovery => sl.member.clone(),
                _ => None,
            })
            .collect()
    }

    pub(crate) fn check_usable(&self) -> Result<()> {
        let st = self.state();
        if st.stopped {
            return Err(BlockError::Offline(format!(
                "array {} is stopped",
                self.name
            )));
        }
        if let Some(f) = &st.failed {
            return Err(BlockError::Offline(f.clone()));
        }
        Ok(())
    }

    pub(crate) fn unavailable(&self) -> BlockError {
        match self.check_usable() {
            Err(e) => e,
            Ok(()) => BlockError::Offline(format!(
                "array {}: data unavailable (too many members lost)",
                self.name
            )),
        }
    }

    /// Recomputes whether the array has failed. Rebuilding roles count as missing.
    pub(crate) fn update_failed(&self, st: &mut State) {
        let missing: Vec<bool> = st
            .slots
            .iter()
            .map(|s| s.state != RoleState::InSync || s.member.is_none())
            .collect();
        if st.failed.is_none() && !self.layout.survives(&missing) {
            let lost = missing.iter().filter(|&&m| m).count();
            st.failed = Some(format!(
                "array {} failed: {lost} of {} members unavailable, beyond what {} tolerates; \
                 refusing I/O rather than returning wrong data",
                self.name, self.layout.members, self.layout.level
            ));
            tracing::error!(array = %self.name, "{}", st.failed.as_deref().unwrap_or(""));
        }
    }

    /// Marks `role` faulty if `m` still holds it. True if that changed anything.
    pub(crate) fn mark_faulty(&self, role: usize, m: &Arc<Member>, why: &str) -> bool {
        let mut st = self.state();
        let slot = &mut st.slots[role];
        if !slot.member.as_ref().is_some_and(|x| Arc::ptr_eq(x, m))
            || slot.state == RoleState::Faulty
        {
            return false;
        }
        slot.state = RoleState::Faulty;
        st.gen += 1;
        tracing::warn!(array = %self.name, role, device = %m.label, "member faulty: {why}");
        self.update_failed(&mut st);
        true
    }

    /// A member request failed: the member is marked faulty and the state persisted
    /// before the caller goes on (so that no acknowledged write depends on a member
    /// the superblocks still trust).
    pub(crate) async fn member_failed(&self, role: usize, m: &Arc<Member>, err: &BlockError) {
        m.errors.fetch_add(1, Relaxed);
        self.metrics.member_errors.fetch_add(1, Relaxed);
        if self.mark_faulty(role, m, &err.to_string()) {
            self.wake.notify_one();
        }
        let _ = self.persist().await;
    }

    pub(crate) async fn mio<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.io_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(BlockError::Offline(format!(
                "member request timed out after {:?}",
                self.io_timeout
            ))),
        }
    }

    pub(crate) async fn mread(&self, m: &Member, off: u64, len: usize) -> Result<Bytes> {
        self.mio(m.dev.read(off, len)).await
    }

    pub(crate) async fn mwrite(&self, m: &Member, off: u64, d: Bytes, f: WriteFlags) -> Result<()> {
        self.mio(m.dev.write(off, d, f)).await
    }

    /// The superblock describing the current state.
    pub(crate) fn build_sb(&self, st: &State, events: u64) -> Superblock {
        let mut flags = 0;
        if st.clean {
            flags |= FLAG_CLEAN;
        }
        if self.journal {
            flags |= FLAG_JOURNAL;
        }
        if self.checksums {
            flags |= FLAG_CHECKSUMS;
        }
        Superblock {
            array_uuid: self.uuid,
            device_uuid: Uuid::default(),
            name: self.name.clone(),
            level: self.layout.level,
            members: self.layout.members as u32,
            copies: self.layout.copies as u32,
            chunk: self.layout.chunk as u32,
            ctime: self.ctime,
            utime: now_unix(),
            events,
            flags,
            meta: self.meta,
            journal_checkpoint: st.journal_checkpoint,
            resync_offset: st.resync_offset,
            scrub: st.scrub,
            scrub_offset: st.scrub_offset,
            role: ROLE_SPARE,
            table: st
                .slots
                .iter()
                .map(|s| RoleEntry {
                    device: s.member.as_ref().map(|m| m.uuid).unwrap_or_default(),
                    state: if s.member.is_none() && s.state != RoleState::Faulty {
                        RoleState::Missing
                    } else {
                        s.state
                    },
                    recovery: s.recovery,
                })
                .collect(),
            spares: st.spares.iter().map(|m| m.uuid).collect(),
        }
    }

    /// Writes the current state to every live member and spare, unless it is already
    /// written. A member that fails the write is marked faulty and the write repeated.
    pub(crate) async fn persist(&self) -> Result<()> {
        let mut w = self.sb.lock().await;
        loop {
            let (gen, targets, template) = {
                let st = self.state();
                if w.persisted_gen >= st.gen {
                    return Ok(());
                }
                let mut targets: Vec<(Option<usize>, Arc<Member>)> = st
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.state != RoleState::Faulty)
                    .filter_map(|(r, s)| s.member.clone().map(|m| (Some(r), m)))
                    .collect();
                targets.extend(st.spares.iter().map(|m| (None, m.clone())));
                (st.gen, targets, self.build_sb(&st, w.events + 1))
            };
            w.events += 1;
            self.events.store(w.events, Relaxed);
            let results = join_all(targets.iter().map(|(role, m)| {
                let mut sb = template.clone();
                sb.device_uuid = m.uuid;
                sb.role = role.map_or(ROLE_SPARE, |r| r as u32);
                let off = sb.slot_offset();
                let data = aligned(&sb.encode());
                async move {
                    self.mio(m.dev.write(off, data, WriteFlags { fua: true }))
                        .await
                }
            }))
            .await;
            w.persisted_gen = gen;
            let mut again = false;
            for ((role, m), r) in targets.iter().zip(results) {
                if let Err(e) = r {
                    m.errors.fetch_add(1, Relaxed);
                    match role {
                        Some(r) => again |= self.mark_faulty(*r, m, &e.to_string()),
                        None => {
                            let mut st = self.state();
                            st.spares.retain(|s| !Arc::ptr_eq(s, m));
                            st.gen += 1;
                            again = true;
                        }
                    }
                }
            }
            if !again {
                return Ok(());
            }
        }
    }

    /// Live members (in sync or rebuilding) by role.
    pub(crate) fn live_members(&self) -> Vec<(usize, Arc<Member>)> {
        self.state()
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.state, RoleState::InSync | RoleState::Rebuilding))
            .filter_map(|(r, s)| s.member.clone().map(|m| (r, m)))
            .collect()
    }

    pub(crate) async fn flush_members(&self) -> Result<()> {
        let members = self.live_members();
        let results = join_all(members.iter().map(|(_, m)| self.mio(m.dev.flush()))).await;
        for ((r, m), res) in members.iter().zip(results) {
            if let Err(e) = res {
                self.member_failed(*r, m, &e).await;
            }
        }
        self.check_usable()
    }

    pub(crate) async fn flush_csums(&self) {
        if !self.checksums {
            return;
        }
        for (r, m) in self.live_members() {
            if let Err(e) = self.mio(m.csums.write_back(&m.dev, false)).await {
                self.member_failed(r, &m, &e).await;
            }
        }
    }

    // ---- the journal ----

    fn trigger_checkpoint(&self) {
        if self.checkpointing.swap(true, Relaxed) {
            return;
        }
        let Some(me) = self.me.upgrade() else { return };
        tokio::spawn(async move {
            let _ = me.checkpoint().await;
            me.checkpointing.store(false, Relaxed);
            me.ring_space.notify_waiters();
        });
    }

    /// Makes every journaled transaction so far durable in place and frees its slots.
    pub(crate) async fn checkpoint(&self) -> Result<()> {
        if !self.journal {
            return Ok(());
        }
        let _one = self.cp_lock.lock().await;
        let target = self.rings().next_seq;
        while self.rings().busy_below(target) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.flush_csums().await;
        self.flush_members().await?;
        {
            let mut st = self.state();
            st.journal_checkpoint = target;
            st.gen += 1;
        }
        self.persist().await?;
        self.rings().release_below(target);
        self.metrics.journal_checkpoints.fetch_add(1, Relaxed);
        self.ring_space.notify_waiters();
        Ok(())
    }

    async fn alloc_slots(&self, roles: &[usize]) -> Result<(u64, Vec<u64>)> {
        loop {
            let waiter = self.ring_space.notified();
            tokio::pin!(waiter);
            waiter.as_mut().enable();
            {
                let mut rings = self.rings();
                if let Some(x) = rings.try_alloc(roles) {
                    if rings.usage() >= 0.5 {
                        drop(rings);
                        self.trigger_checkpoint();
                    }
                    return Ok(x);
                }
            }
            self.check_usable()?;
            self.trigger_checkpoint();
            // Bounded wait, in case the checkpoint failed.
            let _ = tokio::time::timeout(Duration::from_millis(100), waiter).await;
        }
    }

    /// Writes one record per output with FUA. Returns the sequence number and the
    /// roles whose record failed (now faulty).
    async fn journal_write(
        &self,
        s: u64,
        lo: u64,
        len: u64,
        view: &[Option<Arc<Member>>],
        outs: &[(usize, Option<Bytes>)],
    ) -> Result<(u64, Vec<usize>)> {
        let roles: Vec<usize> = outs.iter().map(|(r, _)| *r).collect();
        let participants = roles.iter().fold(0u64, |a, r| a | (1 << r));
        let (seq, slots) = self.alloc_slots(&roles).await?;
        let results = join_all(outs.iter().zip(&slots).map(|((role, data), slot)| {
            let m = view[*role].clone();
            let header = RecordHeader {
                array_uuid: self.uuid,
                seq,
                stripe: s,
                offset: lo as u32,
                len: len as u32,
                role: *role as u32,
                flags: if data.is_none() { FLAG_ZERO } else { 0 },
                participants,
                data_crc: data.as_ref().map_or(0, |d| crc32c::crc32c(d)),
            };
            let off = self.meta.journal_offset + slot * self.meta.journal_slot;
            async move {
                let Some(m) = m else { return Ok(()) };
                let h = header.encode();
                let mut buf = AlignedBuf::zeroed(h.len() + data.as_ref().map_or(0, |d| d.len()));
                buf.as_mut_slice()[..h.len()].copy_from_slice(&h);
                if let Some(d) = data {
                    buf.as_mut_slice()[h.len()..].copy_from_slice(d);
                }
                self.metrics
                    .journal_bytes
                    .fetch_add(buf.len() as u64, Relaxed);
                self.mio(m.dev.write(off, buf.freeze(), WriteFlags { fua: true }))
                    .await
            }
        }))
        .await;
        let mut failed = Vec::new();
        for ((role, _), r) in outs.iter().zip(results) {
            if let Err(e) = r {
                if let Some(m) = &view[*role] {
                    self.member_failed(*role, m, &e).await;
                }
                failed.push(*role);
            }
        }
        self.metrics.journal_writes.fetch_add(1, Relaxed);
        Ok((seq, failed))
    }

    fn journal_done(&self, seq: u64) {
        self.rings().complete(seq);
    }

    // ---- writes ----

    /// Writes `outs` (role, new bytes or `None` for zeroes) at stripe `s`, chunk bytes
    /// `[lo, lo + len)`: journal first (when on), then in place, then checksums.
    pub(crate) async fn commit(
        &self,
        s: u64,
        lo: u64,
        len: u64,
        view: &[Option<Arc<Member>>],
        outs: Vec<(usize, Option<Bytes>)>,
        fua: bool,
    ) -> Result<()> {
        let (tx, skip) = if self.journal && self.layout.level.redundant() {
            let (seq, failed) = self.journal_write(s, lo, len, view, &outs).await?;
            (Some(seq), failed)
        } else {
            (None, Vec::new())
        };
        let off = self.data_off(s, lo);
        let flags = WriteFlags {
            fua: fua && tx.is_none(),
        };
        let live: Vec<&(usize, Option<Bytes>)> =
            outs.iter().filter(|(r, _)| !skip.contains(r)).collect();
        let results = join_all(live.iter().map(|(role, data)| {
            let m = view[*role].clone();
            async move {
                let Some(m) = m else { return Ok(()) };
                match data {
                    Some(d) => self.mwrite(&m, off, d.clone(), flags).await,
                    None => {
                        let zf = ZeroFlags {
                            may_unmap: true,
                            fast_only: false,
                        };
                        let r = self.mio(m.dev.write_zeroes(off, len, zf)).await;
                        if r.is_ok() && flags.fua {
                            self.mio(m.dev.flush()).await
                        } else {
                            r
                        }
                    }
                }
            }
        }))
        .await;
        let first_block = (s * self.layout.chunk + lo) / BLOCK;
        for ((role, data), r) in live.iter().zip(results) {
            let Some(m) = &view[*role] else { continue };
            if let Err(e) = r {
                self.member_failed(*role, m, &e).await;
                continue;
            }
            if self.checksums {
                let res = match data {
                    Some(d) => self.mio(m.csums.set_data(&m.dev, first_block, d)).await,
                    None => {
                        let crcs = vec![zero_crc(); (len / BLOCK) as usize];
                        self.mio(m.csums.set(&m.dev, first_block, &crcs)).await
                    }
                };
                if let Err(e) = res {
                    self.member_failed(*role, m, &e).await;
                }
            }
        }
        if let Some(seq) = tx {
            self.journal_done(seq);
        }
        Ok(())
    }

    /// New parity (and the data to write) for a partial or full update of rows
    /// `[lo, lo + len)` of stripe `s`: full-stripe, read-modify-write, reconstruct-write
    /// (whichever reads less), or the degraded path.
    async fn parity_outputs(
        &self,
        s: u64,
        map: &StripeMap,
        view: &[Option<Arc<Member>>],
        lo: u64,
        len: usize,
        new: &[Option<Bytes>],
    ) -> std::result::Result<Vec<(usize, Option<Bytes>)>, Step> {
        let k = map.columns.len();
        let np = self.layout.level.parity_count();
        let kern = Kernel::best();
        let alive = |pos: usize| view[Self::role_at(map, pos)].is_some();
        let written: Vec<usize> = (0..k).filter(|&c| new[c].is_some()).collect();
        let all_alive = (0..k + np).all(alive);
        let mut p = AlignedBuf::zeroed(len);
        let mut q = AlignedBuf::zeroed(if np == 2 { len } else { 0 });
        let gen = |data: &[&[u8]], p: &mut AlignedBuf, q: &mut AlignedBuf| {
            if np == 2 {
                kern.gen_pq(data, p.as_mut_slice(), q.as_mut_slice());
            } else {
                kern.gen_p(data, p.as_mut_slice());
            }
        };
        if written.len() == k {
            self.metrics.full_stripe_writes.fetch_add(1, Relaxed);
            let data: Vec<&[u8]> = new.iter().map(|d| d.as_deref().unwrap_or(&[])).collect();
            gen(&data, &mut p, &mut q);
        } else if all_alive && written.len() + np < k - written.len() {
            // Read-modify-write: old data of the written columns and old parity.
            self.metrics.rmw_writes.fetch_add(1, Relaxed);
            let mut roles: Vec<usize> = written.iter().map(|&c| map.columns[c][0]).collect();
            roles.extend(map.p);
            roles.extend(map.q);
            let old = self.read_rows(s, map, view, &roles, lo, len, None).await?;
            let w = written.len();
            p.as_mut_slice().copy_from_slice(&old[w]);
            if np == 2 {
                q.as_mut_slice().copy_from_slice(&old[w + 1]);
            }
            let mut delta = vec![0u8; len];
            for (i, &c) in written.iter().enumerate() {
                delta.copy_from_slice(&old[i]);
                kern.xor_into(&mut delta, new[c].as_deref().unwrap_or(&[]));
                kern.xor_into(p.as_mut_slice(), &delta);
                if np == 2 {
                    kern.mul_xor(gf::pow2(c), &delta, q.as_mut_slice());
                }
            }
        } else if all_alive {
            // Reconstruct-write: read the columns not written.
            self.metrics.rcw_writes.fetch_add(1, Relaxed);
            let unwritten: Vec<usize> = (0..k).filter(|c| new[*c].is_none()).collect();
            let roles: Vec<usize> = unwritten.iter().map(|&c| map.columns[c][0]).collect();
            let old = self.read_rows(s, map, view, &roles, lo, len, None).await?;
            let mut it = old.iter();
            let data: Vec<&[u8]> = (0..k)
                .map(|c| match &new[c] {
                    Some(d) => &d[..],
                    None => it.next().map(|b| &b[..]).unwrap_or(&[]),
                })
                .collect();
            gen(&data, &mut p, &mut q);
        } else {
            // Degraded: rebuild the old stripe, apply the new data, recompute parity.
            self.metrics.degraded_writes.fetch_add(1, Relaxed);
            let positions: Vec<usize> = (0..k + np).filter(|&i| alive(i)).collect();
            let roles: Vec<usize> = positions.iter().map(|&i| Self::role_at(map, i)).collect();
            let old = self.read_rows(s, map, view, &roles, lo, len, None).await?;
            let mut bufs: Vec<Option<Vec<u8>>> = vec![None; k + np];
            for (&i, b) in positions.iter().zip(&old) {
                bufs[i] = Some(b.to_vec());
            }
            if !recover(k, np, &mut bufs, false) {
                return Err(Step::Fatal(self.unavailable()));
            }
            for &c in &written {
                bufs[c] = new[c].as_ref().map(|d| d.to_vec());
            }
            let data: Vec<&[u8]> = (0..k).map(|c| bufs[c].as_deref().unwrap_or(&[])).collect();
            gen(&data, &mut p, &mut q);
        }
        let mut outs: Vec<(usize, Option<Bytes>)> = Vec::new();
        for &c in &written {
            let r = map.columns[c][0];
            if view[r].is_some() {
                outs.push((r, new[c].clone()));
            }
        }
        if let Some(r) = map.p.filter(|&r| view[r].is_some()) {
            outs.push((r, Some(p.freeze())));
        }
        if let Some(r) = map.q.filter(|&r| view[r].is_some()) {
            outs.push((r, Some(q.freeze())));
        }
        Ok(outs)
    }

    /// Writes rows `[lo, lo + len)` of stripe `s`: `new[c]` is the new data of column
    /// `c` for those rows, or `None` if the column is not written.
    async fn write_segment(
        &self,
        s: u64,
        map: &StripeMap,
        lo: u64,
        len: u64,
        new: &[Option<Bytes>],
        fua: bool,
    ) -> Result<()> {
        loop {
            self.check_usable()?;
            let view = self.view(s);
            let outs: Vec<(usize, Option<Bytes>)> = if map.p.is_none() {
                let mut outs = Vec::new();
                for (c, d) in new.iter().enumerate() {
                    let Some(d) = d else { continue };
                    for &r in &map.columns[c] {
                        if view[r].is_some() {
                            outs.push((r, Some(d.clone())));
                        }
                    }
                }
                outs
            } else {
                match self
                    .parity_outputs(s, map, &view, lo, len as usize, new)
                    .await
                {
                    Ok(o) => o,
                    Err(Step::Retry) => continue,
                    Err(Step::Fatal(e)) => return Err(e),
                }
            };
            if outs.is_empty() {
                return Err(self.unavailable());
            }
            self.commit(s, lo, len, &view, outs, fua).await?;
            return self.check_usable();
        }
    }

    /// Writes the pieces of one stripe, row segment by row segment.
    async fn write_stripe(
        &self,
        s: u64,
        pieces: &[crate::layout::Piece],
        data: &Bytes,
        fua: bool,
    ) -> Result<()> {
        let map = self.layout.stripe_map(s);
        let k = map.columns.len();
        if map.p.is_none() {
            for p in pieces {
                let mut new = vec![None; k];
                let at = p.buf_offset as usize;
                new[p.column] = Some(data.slice(at..at + p.len as usize));
                self.write_segment(s, &map, p.chunk_offset, p.len, &new, fua)
                    .await?;
            }
            return Ok(());
        }
        let mut bounds: Vec<u64> = pieces
            .iter()
            .flat_map(|p| [p.chunk_offset, p.chunk_offset + p.len])
            .collect();
        bounds.sort_unstable();
        bounds.dedup();
        for w in bounds.windows(2) {
            let (lo, hi) = (w[0], w[1]);
            let mut new: Vec<Option<Bytes>> = vec![None; k];
            for p in pieces {
                if p.chunk_offset <= lo && hi <= p.chunk_offset + p.len {
                    let at = (p.buf_offset + lo - p.chunk_offset) as usize;
                    new[p.column] = Some(data.slice(at..at + (hi - lo) as usize));
                }
            }
            if new.iter().any(|n| n.is_some()) {
                self.write_segment(s, &map, lo, hi - lo, &new, fua).await?;
            }
        }
        Ok(())
    }

    pub(crate) async fn write_locked(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.ensure_dirty().await?;
        *self
            .last_write
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.metrics.writes.fetch_add(1, Relaxed);
        self.metrics
            .write_bytes
            .fetch_add(data.len() as u64, Relaxed);
        let pieces = self.layout.pieces(offset, data.len() as u64);
        let mut by_stripe: Vec<(u64, Vec<crate::layout::Piece>)> = Vec::new();
        for p in pieces {
            match by_stripe.last_mut() {
                Some((s, v)) if *s == p.stripe => v.push(p),
                _ => by_stripe.push((p.stripe, vec![p])),
            }
        }
        let results = join_all(
            by_stripe
                .iter()
                .map(|(s, ps)| self.write_stripe(*s, ps, &data, fua)),
        )
        .await;
        results.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(())
    }

    /// Zeroes whole stripes `[first, last)` (every role, parity included: zero parity
    /// is the parity of zero data).
    async fn zero_stripes(&self, first: u64, last: u64, fua: bool) -> Result<()> {
        let results: Vec<Result<()>> = futures_util::stream::iter(first..last)
            .map(|s| async move {
                self.check_usable()?;
                let view = self.view(s);
                let map = self.layout.stripe_map(s);
                let outs: Vec<(usize, Option<Bytes>)> = map
                    .roles()
                    .filter(|&r| view[r].is_some())
                    .map(|r| (r, None))
                    .collect();
                if outs.is_empty() {
                    return Err(self.unavailable());
                }
                self.commit(s, 0, self.layout.chunk, &view, outs, fua)
                    .await?;
                self.check_usable()
            })
            .buffer_unordered(16)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(())
    }

    async fn zero_locked(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        let sb = self.layout.stripe_bytes();
        let end = offset + len;
        let first = offset.div_ceil(sb);
        let last = end / sb;
        if first >= last {
            return self.write_zero_bytes(offset, len, fua).await;
        }
        if offset < first * sb {
            self.write_zero_bytes(offset, first * sb - offset, fua)
                .await?;
        }
        self.ensure_dirty().await?;
        self.zero_stripes(first, last, fua).await?;
        if last * sb < end {
            self.write_zero_bytes(last * sb, end - last * sb, fua)
                .await?;
        }
        Ok(())
    }

    async fn write_zero_bytes(&self, mut offset: u64, len: u64, fua: bool) -> Result<()> {
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(4 << 20);
            self.write_locked(offset, Bytes::from(vec![0u8; n as usize]), fua)
                .await?;
            offset += n;
        }
        Ok(())
    }

    /// Before the first write after a clean shutdown mark (no journal): record "dirty"
    /// so that a crash leads to a resync.
    async fn ensure_dirty(&self) -> Result<()> {
        if self.journal || !self.layout.level.redundant() || !self.clean_flag.load(Relaxed) {
            return Ok(());
        }
        {
            let mut st = self.state();
            if st.clean {
                st.clean = false;
                st.gen += 1;
            }
        }
        self.clean_flag.store(false, Relaxed);
        self.persist().await
    }

    /// Makes everything durable and marks the array clean.
    pub(crate) async fn mark_clean(&self) -> Result<()> {
        let _gate = self.write_gate.write().await;
        self.flush_csums().await;
        self.flush_members().await?;
        if self.journal {
            self.checkpoint().await?;
        }
        {
            let mut st = self.state();
            if st.clean {
                return Ok(());
            }
            st.clean = true;
            st.gen += 1;
        }
        self.clean_flag.store(true, Relaxed);
        self.persist().await
    }

    // ---- reads ----

    /// Rebuilds the given data columns of rows `[lo, lo + len)` of stripe `s` from the
    /// other members.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn reconstruct(
        &self,
        s: u64,
        map: &StripeMap,
        view: &[Option<Arc<Member>>],
        lo: u64,
        len: usize,
        want: &[usize],
        hold: Option<&Hold>,
    ) -> std::result::Result<Vec<Bytes>, Step> {
        let k = map.columns.len();
        let np = self.layout.level.parity_count();
        let alive = |pos: usize| view[Self::role_at(map, pos)].is_some() && !want.contains(&pos);
        let data_missing = (0..k).filter(|&i| !alive(i)).count();
        let mut positions: Vec<usize> = (0..k).filter(|&i| alive(i)).collect();
        if alive(k) {
            positions.push(k);
        }
        if np == 2 && alive(k + 1) && (data_missing > 1 || !alive(k)) {
            positions.push(k + 1);
        }
        let roles: Vec<usize> = positions.iter().map(|&i| Self::role_at(map, i)).collect();
        let got = self.read_rows(s, map, view, &roles, lo, len, hold).await?;
        let mut bufs: Vec<Option<Vec<u8>>> = vec![None; k + np];
        for (&i, b) in positions.iter().zip(&got) {
            bufs[i] = Some(b.to_vec());
        }
        // Q may be alive but unread (P sufficed): `recover` counts it as missing, which
        // the parity still covers, and does not recompute it.
        if !recover(k, np, &mut bufs, false) {
            return Err(Step::Fatal(self.unavailable()));
        }
        self.metrics.degraded_reads.fetch_add(1, Relaxed);
        Ok(want
            .iter()
            .map(|&c| aligned(bufs[c].as_deref().unwrap_or(&[])))
            .collect())
    }

    async fn read_piece(&self, p: crate::layout::Piece, hold: Option<&Hold>) -> Result<Bytes> {
        let map = self.layout.stripe_map(p.stripe);
        loop {
            self.check_usable()?;
            let view = self.view(p.stripe);
            let copies: Vec<usize> = map.columns[p.column]
                .iter()
                .copied()
                .filter(|&r| view[r].is_some())
                .collect();
            if !copies.is_empty() {
                let role = copies[(p.stripe as usize + p.column) % copies.len()];
                match self
                    .read_rows(
                        p.stripe,
                        &map,
                        &view,
                        &[role],
                        p.chunk_offset,
                        p.len as usize,
                        hold,
                    )
                    .await
                {
                    Ok(mut v) => match v.pop() {
                        Some(b) => return Ok(b),
                        None => continue,
                    },
                    Err(Step::Retry) => continue,
                    Err(Step::Fatal(e)) => return Err(e),
                }
            }
            if map.p.is_none() {
                return Err(self.unavailable());
            }
            match self
                .reconstruct(
                    p.stripe,
                    &map,
                    &view,
                    p.chunk_offset,
                    p.len as usize,
                    &[p.column],
                    hold,
                )
                .await
            {
                Ok(mut v) => return Ok(v.remove(0)),
                Err(Step::Retry) => continue,
                Err(Step::Fatal(e)) => return Err(e),
            }
        }
    }

    /// Reads under the stripe lock; `hold` as for [`Inner::read_rows`].
    pub(crate) async fn read_locked(
        &self,
        offset: u64,
        len: usize,
        hold: Option<&Hold>,
    ) -> Result<Bytes> {
        self.metrics.reads.fetch_add(1, Relaxed);
        self.metrics.read_bytes.fetch_add(len as u64, Relaxed);
        let pieces = self.layout.pieces(offset, len as u64);
        if let [p] = pieces[..] {
            return self.read_piece(p, hold).await;
        }
        let parts = join_all(pieces.iter().map(|p| self.read_piece(*p, hold))).await;
        let mut buf = AlignedBuf::zeroed(len);
        for (p, r) in pieces.iter().zip(parts) {
            let b = r?;
            let at = p.buf_offset as usize;
            buf.as_mut_slice()[at..at + p.len as usize].copy_from_slice(&b);
        }
        Ok(buf.freeze())
    }

    /// The stripes `[first, first + n)` a byte range touches.
    pub(crate) fn stripes_of(&self, offset: u64, len: u64) -> (u64, u64) {
        let sb = self.layout.stripe_bytes();
        let first = offset / sb;
        let last = (offset + len.max(1) - 1) / sb;
        (first, last - first + 1)
    }
}

#[async_trait]
impl BlockDev for Array {
    fn geometry(&self) -> Geometry {
        self.inner.geometry
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        let i = &self.inner;
        check_range(&i.geometry, offset, len as u64)?;
        i.check_usable()?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let (first, n) = i.stripes_of(offset, len as u64);
        // Shared with a correction the read may start (a bad sector rewritten from
        // redundancy), which runs as its own task and keeps the stripes locked until its
        // rewrite is done even if this future is dropped: a write let in earlier could be
        // overwritten by the older rebuilt rows.
        let hold: Hold = Arc::new(i.locks.shared_owned(first, n).await);
        i.read_locked(offset, len, Some(&hold)).await
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        let i = &self.inner;
        check_range(&i.geometry, offset, data.len() as u64)?;
        i.check_usable()?;
        if data.is_empty() {
            return Ok(());
        }
        // A stripe update runs to the end even if the caller gives up on it: a dropped
        // future must not leave a stripe half written with its lock released.
        let inner = i.clone();
        detached(async move {
            let _gate = inner.write_gate.read().await;
            let (first, n) = inner.stripes_of(offset, data.len() as u64);
            let _g = inner.locks.exclusive(first, n).await;
            inner.write_locked(offset, data, flags.fua).await
        })
        .await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.check_usable()?;
        self.inner.flush_members().await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(
            offset,
            len,
            ZeroFlags {
                may_unmap: true,
                fast_only: false,
            },
        )
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let i = &self.inner;
        check_range(&i.geometry, offset, len)?;
        i.check_usable()?;
        if flags.fast_only && !i.geometry.capabilities.fast_zeroes {
            return Err(BlockError::Unsupported("fast write-zeroes"));
        }
        if len == 0 {
            return Ok(());
        }
        let inner = i.clone();
        detached(async move {
            let _gate = inner.write_gate.read().await;
            let (first, n) = inner.stripes_of(offset, len);
            let _g = inner.locks.exclusive(first, n).await;
            inner.zero_locked(offset, len, false).await
        })
        .await
    }

    async fn compare_and_write(
        &self,
        offset: u64,
        compare: Bytes,
        data: Bytes,
        flags: WriteFlags,
    ) -> Result<CompareOutcome> {
        let i = &self.inner;
        if compare.len() != data.len() {
            return Err(BlockError::InvalidRequest(format!(
                "compare-and-write buffers differ in length: {} and {}",
                compare.len(),
                data.len()
            )));
        }
        check_range(&i.geometry, offset, data.len() as u64)?;
        i.check_usable()?;
        let inner = i.clone();
        detached(async move {
            let _gate = inner.write_gate.read().await;
            let (first, n) = inner.stripes_of(offset, data.len() as u64);
            let _g = inner.locks.exclusive(first, n).await;
            let current = inner.read_locked(offset, compare.len(), None).await?;
            if let Some(at) = first_difference(&current, &compare) {
                return Ok(CompareOutcome::Miscompare { offset: at });
            }
            inner.write_locked(offset, data, flags.fua).await?;
            Ok(CompareOutcome::Written)
        })
        .await
    }
}

/// Runs `fut` as its own task and waits for it; the task finishes even if the waiter
/// is dropped.
async fn detached<T: Send + 'static>(
    fut: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    match tokio::spawn(fut).await {
        Ok(r) => r,
        Err(e) => Err(BlockError::Offline(format!("array write task failed: {e}"))),
    }
}

/// The geometry an array presents.
pub(crate) fn array_geometry(layout: &Layout, members: &[SharedBlockDev]) -> Geometry {
    let fast = members
        .iter()
        .all(|d| d.geometry().capabilities.fast_zeroes);
    Geometry {
        block_size: BLOCK as u32,
        physical_block_size: BLOCK as u32,
        blocks: layout.capacity() / BLOCK,
        optimal_io_size: u32::try_from(layout.stripe_bytes()).unwrap_or(0),
        max_io_bytes: 0,
        capabilities: Capabilities {
            discard: true,
            discard_zeroes: true,
            fast_zeroes: fast,
            volatile_cache: true,
            read_only: false,
        },
    }
}

/// Everything needed to build an [`Inner`].
pub(crate) struct InnerParts {
    pub uuid: Uuid,
    pub name: String,
    pub layout: Layout,
    pub meta: MetaLayout,
    pub ctime: u64,
    pub journal: bool,
    pub checksums: bool,
    pub io_timeout: Duration,
    pub read_error_policy: ReadErrorPolicy,
    pub state: State,
    pub events: u64,
    pub next_seq: u64,
    pub rate_limit: Option<u64>,
}

impl Array {
    pub(crate) fn build(p: InnerParts) -> Array {
        let devs: Vec<SharedBlockDev> = p
            .state
            .slots
            .iter()
            .filter_map(|s| s.member.as_ref().map(|m| m.dev.clone()))
            .collect();
        let geometry = array_geometry(&p.layout, &devs);
        let slots = p
            .meta
            .journal_size
            .checked_div(p.meta.journal_slot)
            .unwrap_or(1)
            .max(1);
        let clean = p.state.clean;
        let inner = Arc::new_cyclic(|me| Inner {
            me: me.clone(),
            uuid: p.uuid,
            name: p.name,
            layout: p.layout,
            meta: p.meta,
            ctime: p.ctime,
            journal: p.journal,
            checksums: p.checksums,
            geometry,
            io_timeout: p.io_timeout,
            read_error_policy: p.read_error_policy,
            corrections: Arc::default(),
            state: Mutex::new(p.state),
            sb: tokio::sync::Mutex::new(SbWriter {
                events: p.events,
                persisted_gen: 0,
            }),
            locks: RangeLocks::new(1024, 1),
            rings: Mutex::new(Rings::new(p.layout.members, slots, p.next_seq)),
            ring_space: Notify::new(),
            checkpointing: AtomicBool::new(false),
            cp_lock: tokio::sync::Mutex::new(()),
            write_gate: tokio::sync::RwLock::new(()),
            clean_flag: AtomicBool::new(clean),
            last_write: Mutex::new(
                Instant::now()
                    .checked_sub(Duration::from_secs(3600))
                    .unwrap_or_else(Instant::now),
            ),
            metrics: ArrayMetrics::default(),
            events: AtomicU64::new(p.events),
            jobs: jobs::Jobs::new(p.rate_limit),
            wake: Notify::new(),
        });
        Array { inner }
    }

    /// Starts the background worker (jobs, spares, idle clean marking).
    pub(crate) fn start(&self) {
        tokio::spawn(jobs::worker(Arc::downgrade(&self.inner)));
    }

    /// Creates an array on `members` (role = position in the vector) with `spares`,
    /// writing a superblock on each. Fails if a device already carries a superblock
    /// (unless `config.force`), is too small, or has a block size above 4 KiB. Must be
    /// called inside a tokio runtime: background work runs as tasks.
    pub async fn create(
        config: ArrayConfig,
        members: Vec<Device>,
        spares: Vec<Device>,
    ) -> std::result::Result<Arc<Array>, RaidError> {
        crate::assemble::create(config, members, spares).await
    }

    /// The array's UUID.
    pub fn uuid(&self) -> Uuid {
        self.inner.uuid
    }

    /// The array's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The array's layout.
    pub fn layout(&self) -> Layout {
        self.inner.layout
    }

    /// Marks member `role` faulty, as if it had failed (`basalt disk fail`). A spare,
    /// if any, takes over.
    pub async fn fail_member(&self, role: usize) -> std::result::Result<(), RaidError> {
        let i = &self.inner;
        let m = {
            let st = i.state();
            let slot = st.slots.get(role).ok_or(RaidError::NoSuchRole(role))?;
            slot.member.clone()
        };
        if let Some(m) = m {
            m.errors.fetch_add(0, Relaxed);
            if i.mark_faulty(role, &m, "failed by the administrator") {
                i.wake.notify_one();
            }
        }
        i.persist().await?;
        Ok(())
    }

    /// Adds a hot spare (`basalt disk spare`). If a role is faulty or missing, the
    /// spare takes it over at once and a rebuild starts.
    pub async fn add_spare(&self, dev: Device) -> std::result::Result<(), RaidError> {
        let i = &self.inner;
        crate::assemble::prepare_device(i, &dev).await?;
        let m = Member::new(&dev, Uuid::random(), &i.meta);
        {
            let mut st = i.state();
            if st.spares.len() >= crate::superblock::MAX_SPARES {
                return Err(RaidError::Busy("too many spares".into()));
            }
            st.spares.push(m);
            // A new device: a stopped rebuild may try again (md).
            st.rebuild_stopped = None;
            st.gen += 1;
        }
        i.persist().await?;
        i.wake.notify_one();
        Ok(())
    }

    /// Replaces member `role` with `dev` (`basalt disk replace`): the new device takes
    /// the role and is rebuilt from the others; the old one is released (it keeps its
    /// stale superblock, which assembly rejects).
    pub async fn replace_member(
        &self,
        role: usize,
        dev: Device,
    ) -> std::result::Result<(), RaidError> {
        let i = &self.inner;
        if role >= i.layout.members {
            return Err(RaidError::NoSuchRole(role));
        }
        crate::assemble::prepare_device(i, &dev).await?;
        let m = Member::new(&dev, Uuid::random(), &i.meta);
        i.take_role(role, m, false).await?;
        Ok(())
    }

    /// Starts a scrub: `repair` false only checks and reports, true also repairs.
    pub async fn start_scrub(&self, repair: bool) -> std::result::Result<(), RaidError> {
        self.inner.request_scrub(repair).await
    }

    /// Cancels a running or requested scrub (rebuilds and resyncs cannot be cancelled).
    pub async fn cancel_scrub(&self) -> std::result::Result<(), RaidError> {
        self.inner.cancel_scrub().await
    }

    /// Limits background jobs to `bytes_per_sec` of array data (None: no limit).
    pub fn set_rate_limit(&self, bytes_per_sec: Option<u64>) {
        self.inner.jobs.set_rate_limit(bytes_per_sec);
    }

    /// The running job and the last finished ones, newest first.
    pub fn jobs(&self) -> Vec<jobs::JobSnapshot> {
        self.inner.jobs.snapshots()
    }

    /// Waits until no job runs or is due (tests, the CLI's `--wait`).
    pub async fn wait_idle(&self) {
        loop {
            if !self.inner.job_due() && !self.inner.jobs.running() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Shuts the array down cleanly: stops jobs at a checkpoint, makes the journal and
    /// checksums durable, marks the superblocks clean. I/O fails afterwards.
    pub async fn stop(&self) -> std::result::Result<(), RaidError> {
        let i = &self.inner;
        i.jobs.cancel_all();
        i.wake.notify_waiters();
        while i.jobs.running() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let r = if i.state().failed.is_none() {
            i.mark_clean().await
        } else {
            Ok(())
        };
        i.state().stopped = true;
        i.wake.notify_waiters();
        // A read's correction runs as a task of its own holding a share of the read's
        // stripe lock (`repair::Hold`): wait until none is left, so that no rewrite of
        // this instance lands after the array was stopped (or assembled again). Taken
        // only now: a write waiting for its stripes holds `write_gate`, which
        // `mark_clean` needs; from here on new I/O fails. Bounded: a member that never
        // answers must not hang the stop.
        let all = i.locks.exclusive(0, i.layout.stripes.max(1));
        if tokio::time::timeout(STOP_DRAIN, all).await.is_err() {
            tracing::warn!(array = %i.name, "stopped with member I/O still in flight after {STOP_DRAIN:?}");
        }
        r.map_err(RaidError::from)
    }
}
