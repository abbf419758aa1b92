//! [`FaultDev`]: a fault injector that wraps any device.
//!
//! Tests wrap a [`MemDev`](crate::MemDev) or a [`UringFile`](crate::UringFile) in a
//! `FaultDev`, hand an `Arc` of it to the layer under test as a
//! [`SharedBlockDev`], and keep another `Arc` to steer the faults
//! while I/O runs: every control method takes `&self`.
//!
//! # What it injects
//!
//! - **Error rules** ([`ErrorRule`], [`FaultDev::add_rule`]): requests of a kind
//!   ([`FaultOp`]) that overlap a byte range fail with [`BlockError::Io`] carrying `EIO`,
//!   once, `n` times or always, each match firing with a probability drawn from the
//!   device's seeded generator. A failed request changes nothing. Matching: `Read` covers
//!   reads and the read half of compare-and-write; `Write` covers writes, discards,
//!   write-zeroes and the write half of compare-and-write; `Flush` covers flushes, which
//!   match whatever the rule's range (a flush covers the whole device); `Any` covers all.
//!   Rules are tried in the order they were added and the first that fires wins.
//!   A rule made with [`ErrorRule::until_rewritten`] models a bad sector the drive
//!   remaps on write: a successful write over part of its range heals that part.
//!   With a fixed seed and the same sequence of requests the same requests fail; with
//!   concurrent requests the sequence depends on scheduling, so reproducible tests issue
//!   the requests they inject into one at a time.
//! - **Latency** ([`FaultDev::set_latency`]): a fixed delay before every request of a kind.
//! - **Torn writes** ([`FaultDev::tear_next_write`], [`TornWrite`]): the next write (plain
//!   or the write half of compare-and-write; not discard or write-zeroes) that overlaps
//!   the armed range persists only its first `keep_blocks` logical blocks. With
//!   [`TornOutcome::Fail`] those blocks are stored as an ordinary write with the request's
//!   flags would store them (into the cache unless FUA) and the write returns `EIO`; the
//!   device stays usable. With [`TornOutcome::Crash`] those blocks reach the inner device
//!   durably (as if the disk had destaged them just before losing power), then the device
//!   crashes as with [`FaultDev::crash`], and the write returns [`BlockError::Offline`].
//!   Either way the rest of the write is never stored. The arming fires once.
//! - **A volatile write cache** (on by default, [`FaultDev::set_write_cache`]): writes
//!   without FUA land in a block-granular overlay, which reads see; [`BlockDev::flush`]
//!   commits the overlay to the inner device and flushes it. FUA writes, discards and
//!   write-zeroes go straight to the inner device (they are durable when they complete)
//!   and replace any cached copy of their blocks. With the cache off every write goes
//!   straight through. The cache is on by default because the point of the injector is
//!   to catch a layer that forgets to flush; the device reports
//!   [`Capabilities::volatile_cache`](crate::Capabilities::volatile_cache) either way.
//! - **Crashes**: [`FaultDev::crash`] loses every unflushed write and makes every later
//!   request fail with [`BlockError::Offline`]; [`FaultDev::crash_keeping_random`]
//!   instead persists a random (seeded) subset of the unflushed blocks first, since a
//!   real disk destages its cache in any order and a write-hole test must survive any
//!   subset. Each block is the unit: a disk guarantees atomic sectors, not atomic
//!   requests. A block written several times since the last flush keeps only its latest
//!   value in the cache (the cache coalesces), so a kept block holds that one. Requests
//!   in flight when the crash happens may or may not reach the inner device, as with a
//!   real power loss. [`FaultDev::recover`] waits for them, then empties the cache and
//!   brings the device back, as a reboot would; [`FaultDev::inner`] gives the surviving
//!   device to wrap afresh.
//! - **Dead disk**: [`FaultDev::fail_device`] makes every request fail with `Offline`
//!   until [`FaultDev::heal`]; the cache survives (think of a pulled cable, not a power
//!   loss; combine with `crash` for both).
//!
//! Compare-and-write is atomic against every request through the `FaultDev` (it takes its
//! own range locks exclusively, plain requests take them shared); it never uses the inner
//! device's compare-and-write, because the current data may sit in the cache.

use crate::rng::SplitMix64;
use crate::{
    check_compare_and_write, check_range, first_difference, AlignedBuf, BlockDev, BlockError,
    CompareOutcome, Extent, ExtentKind, Geometry, RangeLocks, Result, SharedBlockDev, WriteFlags,
    ZeroFlags,
};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Which requests a rule or a latency applies to. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    /// Reads, and the read half of compare-and-write.
    Read,
    /// Writes, discards, write-zeroes, and the write half of compare-and-write.
    Write,
    /// Flushes.
    Flush,
    /// Everything.
    Any,
}

/// How many times an [`ErrorRule`] fires before it retires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Times {
    /// Once.
    Once,
    /// This many times.
    Count(u64),
    /// Forever (until removed).
    Always,
}

/// Fail matching requests with `EIO`. Build with [`ErrorRule::new`] and the setters.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorRule {
    /// Which requests match.
    pub op: FaultOp,
    /// Byte range a request must overlap to match (ignored for flushes).
    pub range: Range<u64>,
    /// How many times the rule fires.
    pub times: Times,
    /// Chance that a matching request fails (1.0: every one).
    pub probability: f64,
    /// Models a bad sector the drive remaps when it is written: a successful write
    /// (or discard, write-zeroes, compare-and-write) over part of the range removes
    /// that part from the rule; the rule retires when nothing is left.
    pub until_rewritten: bool,
}

impl ErrorRule {
    /// A rule failing every `op` request anywhere on the device, forever.
    pub fn new(op: FaultOp) -> Self {
        ErrorRule {
            op,
            range: 0..u64::MAX,
            times: Times::Always,
            probability: 1.0,
            until_rewritten: false,
        }
    }

    /// Only requests overlapping `range` (bytes) match.
    pub fn range(mut self, range: Range<u64>) -> Self {
        self.range = range;
        self
    }

    /// Fires `times` times.
    pub fn times(mut self, times: Times) -> Self {
        self.times = times;
        self
    }

    /// Fires once.
    pub fn once(self) -> Self {
        self.times(Times::Once)
    }

    /// Each matching request fails with probability `p`.
    pub fn probability(mut self, p: f64) -> Self {
        self.probability = p;
        self
    }

    /// Writing part of the range heals that part (a remapped bad sector); see
    /// [`ErrorRule::until_rewritten`](ErrorRule#structfield.until_rewritten).
    pub fn until_rewritten(mut self) -> Self {
        self.until_rewritten = true;
        self
    }
}

/// Identifies a rule for [`FaultDev::remove_rule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RuleId(u64);

/// What a torn write does after persisting its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TornOutcome {
    /// The write fails with `EIO`; the device carries on.
    Fail,
    /// The device crashes (see [`FaultDev::crash`]); the write fails with `Offline`.
    Crash,
}

/// Arms a torn write. See the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornWrite {
    /// The next write overlapping this byte range is torn.
    pub range: Range<u64>,
    /// Logical blocks, from the start of the write, that persist.
    pub keep_blocks: u64,
    /// What happens next.
    pub outcome: TornOutcome,
}

/// The request classes rules match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    Flush,
}

impl FaultOp {
    fn covers(self, access: Access) -> bool {
        matches!(
            (self, access),
            (FaultOp::Any, _)
                | (FaultOp::Read, Access::Read)
                | (FaultOp::Write, Access::Write)
                | (FaultOp::Flush, Access::Flush)
        )
    }
}

fn overlaps(range: &Range<u64>, offset: u64, len: u64) -> bool {
    offset < range.end && range.start < offset.saturating_add(len.max(1))
}

struct ActiveRule {
    id: RuleId,
    rule: ErrorRule,
    /// None: forever. Shared by the pieces of a rule that a rewrite split in two, so
    /// the pieces together fire as often as the rule did.
    remaining: Option<Arc<AtomicU64>>,
}

#[derive(Default)]
struct Latency {
    read: Duration,
    write: Duration,
    flush: Duration,
}

struct State {
    rules: Vec<ActiveRule>,
    next_rule: u64,
    rng: SplitMix64,
    latency: Latency,
    torn: Option<TornWrite>,
    cache: bool,
    /// Unflushed blocks by block index, the newest value of each.
    overlay: BTreeMap<u64, Bytes>,
    /// Blocks a flush is writing to the inner device right now; reads still see them.
    destaging: BTreeMap<u64, Bytes>,
    crashed: bool,
    failed: bool,
    injected: u64,
}

impl State {
    fn online(&self) -> Result<()> {
        if self.crashed {
            return Err(BlockError::Offline(
                "crashed (simulated power loss); call recover()".into(),
            ));
        }
        if self.failed {
            return Err(BlockError::Offline("device failed (simulated)".into()));
        }
        Ok(())
    }
}

/// A fault-injecting wrapper around any device. See the [module docs](self).
pub struct FaultDev {
    inner: SharedBlockDev,
    geometry: Geometry,
    state: Mutex<State>,
    /// Makes compare-and-write atomic against this device's other requests.
    locks: RangeLocks,
    /// Held shared by every request for its whole life; [`FaultDev::recover`] takes it
    /// exclusive to wait for requests in flight at a crash.
    gate: tokio::sync::RwLock<()>,
    /// Held exclusive while a flush writes the cache to the inner device, shared by
    /// requests that write the inner device directly, so that a FUA write issued after a
    /// cached write of the same block cannot be overtaken by that block's destaging.
    destage: tokio::sync::RwLock<()>,
    /// One flush at a time.
    flush_lock: tokio::sync::Mutex<()>,
}

impl FaultDev {
    /// Wraps `inner` with no faults, the write cache on, and seed 0.
    pub fn new(inner: SharedBlockDev) -> Self {
        Self::with_seed(inner, 0)
    }

    /// Wraps `inner` with no faults, the write cache on, and the given seed for
    /// probabilistic rules.
    pub fn with_seed(inner: SharedBlockDev, seed: u64) -> Self {
        let mut geometry = inner.geometry();
        geometry.capabilities.volatile_cache = true;
        FaultDev {
            inner,
            geometry,
            state: Mutex::new(State {
                rules: Vec::new(),
                next_rule: 0,
                rng: SplitMix64::new(seed),
                latency: Latency::default(),
                torn: None,
                cache: true,
                overlay: BTreeMap::new(),
                destaging: BTreeMap::new(),
                crashed: false,
                failed: false,
                injected: 0,
            }),
            locks: RangeLocks::default(),
            gate: tokio::sync::RwLock::new(()),
            destage: tokio::sync::RwLock::new(()),
            flush_lock: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The wrapped device: after a crash, the disk as it survived.
    pub fn inner(&self) -> SharedBlockDev {
        self.inner.clone()
    }

    /// Adds an error rule; it applies from the next request on.
    pub fn add_rule(&self, rule: ErrorRule) -> RuleId {
        let mut st = self.state();
        let id = RuleId(st.next_rule);
        st.next_rule += 1;
        let remaining = match rule.times {
            Times::Once => Some(1),
            Times::Count(n) => Some(n),
            Times::Always => None,
        };
        if remaining != Some(0) {
            st.rules.push(ActiveRule {
                id,
                rule,
                remaining: remaining.map(|n| Arc::new(AtomicU64::new(n))),
            });
        }
        id
    }

    /// Removes a rule; false if it had already retired.
    pub fn remove_rule(&self, id: RuleId) -> bool {
        let mut st = self.state();
        let before = st.rules.len();
        st.rules.retain(|r| r.id != id);
        st.rules.len() != before
    }

    /// Removes every rule and any armed torn write.
    pub fn clear_rules(&self) {
        let mut st = self.state();
        st.rules.clear();
        st.torn = None;
    }

    /// Restarts the generator behind probabilistic rules from `seed`.
    pub fn set_seed(&self, seed: u64) {
        self.state().rng = SplitMix64::new(seed);
    }

    /// Requests failed by rules or torn writes so far.
    pub fn injected_errors(&self) -> u64 {
        self.state().injected
    }

    /// Delays every request of kind `op` by `latency` (zero removes the delay).
    /// Compare-and-write pays the read and the write latency.
    pub fn set_latency(&self, op: FaultOp, latency: Duration) {
        let mut st = self.state();
        let l = &mut st.latency;
        match op {
            FaultOp::Read => l.read = latency,
            FaultOp::Write => l.write = latency,
            FaultOp::Flush => l.flush = latency,
            FaultOp::Any => {
                l.read = latency;
                l.write = latency;
                l.flush = latency;
            }
        }
    }

    /// Arms a torn write, replacing any armed one.
    pub fn tear_next_write(&self, torn: TornWrite) {
        self.state().torn = Some(torn);
    }

    /// Turns the volatile write cache model on or off. Turning it off does not flush:
    /// blocks already cached stay (and reads see them) until the next flush or crash.
    pub fn set_write_cache(&self, enabled: bool) {
        self.state().cache = enabled;
    }

    /// Blocks written but not yet flushed.
    pub fn unflushed_blocks(&self) -> usize {
        let st = self.state();
        st.overlay.len() + st.destaging.len()
    }

    /// Simulates a power loss: every unflushed write is lost, and every request fails
    /// with [`BlockError::Offline`] until [`FaultDev::recover`].
    pub fn crash(&self) {
        let mut st = self.state();
        st.crashed = true;
        st.overlay.clear();
        st.destaging.clear();
    }

    /// Simulates a power loss in which each unflushed block independently reached the
    /// medium with probability `keep_probability`, drawn from `seed`; the others are
    /// lost. Returns how many blocks were kept. Afterwards the device is crashed as with
    /// [`FaultDev::crash`].
    pub async fn crash_keeping_random(&self, seed: u64, keep_probability: f64) -> Result<usize> {
        let cached = {
            let mut st = self.state();
            st.crashed = true;
            let mut all = std::mem::take(&mut st.destaging);
            // The overlay is newer than what a flush was destaging.
            all.append(&mut std::mem::take(&mut st.overlay));
            all
        };
        let mut rng = SplitMix64::new(seed);
        let kept: Vec<(u64, Bytes)> = cached
            .into_iter()
            .filter(|_| rng.chance(keep_probability))
            .collect();
        let n = kept.len();
        let durable = WriteFlags { fua: true };
        for (offset, data) in self.runs(kept) {
            self.inner.write(offset, data, durable).await?;
        }
        Ok(n)
    }

    /// True after a crash, until [`FaultDev::recover`].
    pub fn is_crashed(&self) -> bool {
        self.state().crashed
    }

    /// "Reboots" after a crash: waits until every request in flight has finished, drops
    /// whatever reached the cache meanwhile, and serves requests again. The inner device
    /// holds exactly what survived. Rules, latencies and the cache setting stay; an armed
    /// torn write is disarmed.
    pub async fn recover(&self) {
        let _quiet = self.gate.write().await;
        let mut st = self.state();
        st.crashed = false;
        st.overlay.clear();
        st.destaging.clear();
        st.torn = None;
    }

    /// Simulates a dead disk: every request fails with [`BlockError::Offline`] until
    /// [`FaultDev::heal`]. The cache is kept.
    pub fn fail_device(&self) {
        self.state().failed = true;
    }

    /// Undoes [`FaultDev::fail_device`].
    pub fn heal(&self) {
        self.state().failed = false;
    }

    fn bs(&self) -> u64 {
        u64::from(self.geometry.block_size)
    }

    fn check_writable(&self) -> Result<()> {
        if self.geometry.capabilities.read_only {
            return Err(BlockError::ReadOnly);
        }
        Ok(())
    }

    /// Online check, the latency of `access`, and the online check again (the device may
    /// have died while the request waited).
    async fn enter(&self, access: Access) -> Result<()> {
        let delay = {
            let st = self.state();
            st.online()?;
            match access {
                Access::Read => st.latency.read,
                Access::Write => st.latency.write,
                Access::Flush => st.latency.flush,
            }
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
            self.state().online()?;
        }
        Ok(())
    }

    /// Fails the request if a rule fires for it.
    fn inject(&self, access: Access, op: &'static str, offset: u64, len: u64) -> Result<()> {
        let mut guard = self.state();
        let st = &mut *guard;
        for i in 0..st.rules.len() {
            let r = &st.rules[i];
            let hit_range = access == Access::Flush || overlaps(&r.rule.range, offset, len);
            if !r.rule.op.covers(access) || !hit_range {
                continue;
            }
            if !st.rng.chance(r.rule.probability) {
                continue;
            }
            if let Some(n) = &st.rules[i].remaining {
                // Only ever changed under the state lock.
                if n.fetch_sub(1, Ordering::Relaxed) == 1 {
                    let id = st.rules[i].id;
                    st.rules.retain(|r| r.id != id);
                }
            }
            st.injected += 1;
            return Err(eio(op, offset, len));
        }
        Ok(())
    }

    /// A write of `[offset, offset + len)` succeeded: rules healed by rewriting lose
    /// that part of their range.
    fn rewritten(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let mut st = self.state();
        let mut i = 0;
        while i < st.rules.len() {
            let r = &st.rules[i];
            if !r.rule.until_rewritten || !overlaps(&r.rule.range, offset, len) {
                i += 1;
                continue;
            }
            let range = r.rule.range.clone();
            let left = range.start..offset.min(range.end);
            let right = end.max(range.start)..range.end;
            match (left.is_empty(), right.is_empty()) {
                (true, true) => {
                    st.rules.remove(i);
                    continue;
                }
                (false, true) => st.rules[i].rule.range = left,
                (true, false) => st.rules[i].rule.range = right,
                (false, false) => {
                    let (id, remaining) = (st.rules[i].id, st.rules[i].remaining.clone());
                    let mut rule = st.rules[i].rule.clone();
                    st.rules[i].rule.range = left;
                    rule.range = right;
                    st.rules.insert(
                        i + 1,
                        ActiveRule {
                            id,
                            rule,
                            remaining,
                        },
                    );
                    i += 1;
                }
            }
            i += 1;
        }
    }

    /// Reads through the cache: the inner device's data patched with cached blocks.
    async fn read_through(&self, offset: u64, len: usize) -> Result<Bytes> {
        let bs = self.bs();
        let (first, end) = (offset / bs, (offset + len as u64) / bs);
        // Take the cached blocks before reading the inner device: a flush destaging them
        // meanwhile writes the same values underneath.
        let patch: Vec<(u64, Bytes)> = {
            let st = self.state();
            st.destaging
                .range(first..end)
                .chain(st.overlay.range(first..end))
                .map(|(&b, d)| (b, d.clone()))
                .collect()
        };
        let base = self.inner.read(offset, len).await?;
        if patch.is_empty() {
            return Ok(base);
        }
        let mut buf = AlignedBuf::copy_from(&base);
        let out = buf.as_mut_slice();
        for (block, data) in patch {
            let at = ((block - first) * bs) as usize;
            out[at..at + bs as usize].copy_from_slice(&data);
        }
        Ok(buf.freeze())
    }

    /// Stores a write whose range is already locked: torn if armed, else cached or
    /// written through.
    async fn write_locked(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        let len = data.len() as u64;
        let torn = {
            let mut st = self.state();
            match &st.torn {
                Some(t) if overlaps(&t.range, offset, len) => st.torn.take(),
                _ => None,
            }
        };
        let Some(torn) = torn else {
            return self.store(offset, data, flags).await;
        };
        let keep = torn.keep_blocks.min(len / self.bs()) * self.bs();
        let prefix = data.slice(..keep as usize);
        self.state().injected += 1;
        match torn.outcome {
            TornOutcome::Fail => {
                if keep > 0 {
                    self.store(offset, prefix, flags).await?;
                }
                Err(eio("write (torn)", offset, len))
            }
            TornOutcome::Crash => {
                if keep > 0 {
                    self.write_through(offset, prefix, WriteFlags { fua: true })
                        .await?;
                }
                self.crash();
                Err(BlockError::Offline(
                    "crashed during a torn write (simulated)".into(),
                ))
            }
        }
    }

    async fn store(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        {
            let mut st = self.state();
            st.online()?;
            if st.cache && !flags.fua {
                let bs = self.bs() as usize;
                let first = offset / bs as u64;
                for (i, at) in (0..data.len()).step_by(bs).enumerate() {
                    st.overlay.insert(first + i as u64, data.slice(at..at + bs));
                }
                return Ok(());
            }
        }
        self.write_through(offset, data, flags).await
    }

    async fn write_through(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        let len = data.len() as u64;
        let _no_destage = self.destage.read().await;
        self.inner.write(offset, data, flags).await?;
        self.uncache(offset, len);
        Ok(())
    }

    /// Drops cached copies of blocks just written directly to the inner device. Done
    /// after the inner write so that a read in between sees the cached (older) data
    /// rather than data older still.
    fn uncache(&self, offset: u64, len: u64) {
        let bs = self.bs();
        let mut st = self.state();
        let blocks: Vec<u64> = st
            .overlay
            .range(offset / bs..(offset + len) / bs)
            .map(|(&b, _)| b)
            .collect();
        for b in blocks {
            st.overlay.remove(&b);
        }
    }

    /// Groups blocks into runs of consecutive blocks: (byte offset, data).
    fn runs(&self, blocks: Vec<(u64, Bytes)>) -> Vec<(u64, Bytes)> {
        let bs = self.bs();
        let mut out: Vec<(u64, BytesMut)> = Vec::new();
        for (block, data) in blocks {
            match out.last_mut() {
                Some((off, buf)) if *off + buf.len() as u64 == block * bs => {
                    buf.extend_from_slice(&data);
                }
                _ => out.push((block * bs, BytesMut::from(&data[..]))),
            }
        }
        out.into_iter().map(|(o, b)| (o, b.freeze())).collect()
    }

    async fn flush_cache(&self) -> Result<()> {
        let _one = self.flush_lock.lock().await;
        let _exclusive = self.destage.write().await;
        let blocks: Vec<(u64, Bytes)> = {
            let mut st = self.state();
            st.online()?;
            st.destaging = std::mem::take(&mut st.overlay);
            st.destaging.iter().map(|(&b, d)| (b, d.clone())).collect()
        };
        let mut result = Ok(());
        for (offset, data) in self.runs(blocks) {
            if let Err(e) = self.state().online() {
                result = Err(e);
                break;
            }
            if let Err(e) = self.inner.write(offset, data, WriteFlags::default()).await {
                result = Err(e);
                break;
            }
        }
        if result.is_ok() {
            result = self.inner.flush().await;
        }
        let mut st = self.state();
        let destaged = std::mem::take(&mut st.destaging);
        if result.is_err() && !st.crashed {
            // Not durable: keep the blocks cached, under anything written since.
            for (b, d) in destaged {
                st.overlay.entry(b).or_insert(d);
            }
        }
        result
    }
}

fn eio(op: &'static str, offset: u64, len: u64) -> BlockError {
    BlockError::io(op, offset, len, io::Error::from_raw_os_error(libc::EIO))
}

#[async_trait]
impl BlockDev for FaultDev {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_range(&self.geometry, offset, len as u64)?;
        let _gate = self.gate.read().await;
        self.enter(Access::Read).await?;
        self.inject(Access::Read, "read", offset, len as u64)?;
        let _range = self.locks.shared(offset, len as u64).await;
        self.read_through(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        let len = data.len() as u64;
        check_range(&self.geometry, offset, len)?;
        self.check_writable()?;
        let _gate = self.gate.read().await;
        self.enter(Access::Write).await?;
        self.inject(Access::Write, "write", offset, len)?;
        let _range = self.locks.shared(offset, len).await;
        self.write_locked(offset, data, flags).await?;
        self.rewritten(offset, len);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        let _gate = self.gate.read().await;
        self.enter(Access::Flush).await?;
        self.inject(Access::Flush, "flush", 0, 0)?;
        self.flush_cache().await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(&self.geometry, offset, len)?;
        self.check_writable()?;
        let _gate = self.gate.read().await;
        self.enter(Access::Write).await?;
        self.inject(Access::Write, "discard", offset, len)?;
        let _range = self.locks.shared(offset, len).await;
        let _no_destage = self.destage.read().await;
        self.state().online()?;
        self.inner.discard(offset, len).await?;
        self.uncache(offset, len);
        self.rewritten(offset, len);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        check_range(&self.geometry, offset, len)?;
        self.check_writable()?;
        let _gate = self.gate.read().await;
        self.enter(Access::Write).await?;
        self.inject(Access::Write, "write_zeroes", offset, len)?;
        let _range = self.locks.shared(offset, len).await;
        let _no_destage = self.destage.read().await;
        self.state().online()?;
        self.inner.write_zeroes(offset, len, flags).await?;
        self.uncache(offset, len);
        self.rewritten(offset, len);
        Ok(())
    }

    async fn compare_and_write(
        &self,
        offset: u64,
        compare: Bytes,
        data: Bytes,
        flags: WriteFlags,
    ) -> Result<CompareOutcome> {
        let len = check_compare_and_write(&self.geometry, offset, &compare, &data)?;
        self.check_writable()?;
        let _gate = self.gate.read().await;
        self.enter(Access::Read).await?;
        let _range = self.locks.exclusive(offset, len).await;
        self.inject(Access::Read, "compare_and_write", offset, len)?;
        let current = self.read_through(offset, data.len()).await?;
        if let Some(at) = first_difference(&current, &compare) {
            return Ok(CompareOutcome::Miscompare { offset: at });
        }
        self.enter(Access::Write).await?;
        self.inject(Access::Write, "compare_and_write", offset, len)?;
        self.write_locked(offset, data, flags).await?;
        self.rewritten(offset, len);
        Ok(CompareOutcome::Written)
    }

    /// The inner device's answer, unless cached blocks overlap the range: then "all data"
    /// (always true), since the inner device does not know about them yet.
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(&self.geometry, offset, len)?;
        let _gate = self.gate.read().await;
        self.enter(Access::Read).await?;
        self.inject(Access::Read, "block_status", offset, len)?;
        let bs = self.bs();
        let cached = {
            let st = self.state();
            let r = offset / bs..(offset + len) / bs;
            st.overlay.range(r.clone()).next().is_some() || st.destaging.range(r).next().is_some()
        };
        if cached {
            return Ok(vec![Extent {
                len,
                kind: ExtentKind::Data,
            }]);
        }
        self.inner.block_status(offset, len).await
    }
}

impl std::fmt::Debug for FaultDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state();
        f.debug_struct("FaultDev")
            .field("geometry", &self.geometry)
            .field("rules", &st.rules.len())
            .field("cache", &st.cache)
            .field("unflushed_blocks", &(st.overlay.len() + st.destaging.len()))
            .field("crashed", &st.crashed)
            .field("failed", &st.failed)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{self, assert_reads, pattern};
    use crate::{MemDev, UringFile, UringOptions};
    use std::time::Instant;

    const BS: u64 = 512;
    const NO: WriteFlags = WriteFlags { fua: false };
    const FUA: WriteFlags = WriteFlags { fua: true };

    fn mem(blocks: u64) -> SharedBlockDev {
        Arc::new(MemDev::new(blocks, BS as u32))
    }

    fn is_eio(r: &Result<impl std::fmt::Debug>) -> bool {
        matches!(r, Err(BlockError::Io { source, .. }) if source.raw_os_error() == Some(libc::EIO))
    }

    fn is_offline(r: &Result<impl std::fmt::Debug>) -> bool {
        matches!(r, Err(BlockError::Offline(_)))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_with_cache() {
        conformance::run("FaultDev(MemDev)", || async {
            Arc::new(FaultDev::new(mem(32 << 11))) as SharedBlockDev
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_write_through() {
        conformance::run("FaultDev(MemDev), no cache", || async {
            let dev = FaultDev::new(mem(32 << 11));
            dev.set_write_cache(false);
            Arc::new(dev) as SharedBlockDev
        })
        .await;
    }

    #[tokio::test]
    async fn rule_matches_range_and_kind_and_retires() {
        let dev = FaultDev::new(mem(64));
        let id = dev.add_rule(
            ErrorRule::new(FaultOp::Write)
                .range(4 * BS..8 * BS)
                .times(Times::Count(2)),
        );
        let data = pattern(1, BS as usize);
        // Outside the range, and reads inside it, are untouched.
        dev.write(0, data.clone(), NO).await.unwrap();
        dev.write(8 * BS, data.clone(), NO).await.unwrap();
        dev.read(4 * BS, BS as usize).await.unwrap();
        // A write overlapping the range by one block fails and changes nothing.
        let r = dev.write(3 * BS, pattern(2, 2 * BS as usize), NO).await;
        assert!(is_eio(&r), "{r:?}");
        assert_reads(&dev, 3 * BS, &[0; 2 * BS as usize], "failed write").await;
        assert!(is_eio(&dev.discard(7 * BS, BS).await));
        // Two hits: retired.
        dev.write(4 * BS, data.clone(), NO).await.unwrap();
        assert_eq!(dev.injected_errors(), 2);
        assert!(!dev.remove_rule(id));

        let id = dev.add_rule(ErrorRule::new(FaultOp::Read).once());
        assert!(is_eio(&dev.read(0, BS as usize).await));
        dev.read(0, BS as usize).await.unwrap();
        assert!(!dev.remove_rule(id));

        let id = dev.add_rule(ErrorRule::new(FaultOp::Flush));
        assert!(is_eio(&dev.flush().await));
        assert!(is_eio(&dev.flush().await));
        assert!(dev.remove_rule(id));
        dev.flush().await.unwrap();

        dev.add_rule(ErrorRule::new(FaultOp::Any).range(0..BS));
        assert!(is_eio(&dev.read(0, BS as usize).await));
        let r = dev
            .compare_and_write(0, data.clone(), data.clone(), NO)
            .await;
        assert!(is_eio(&r), "{r:?}");
        assert!(is_eio(&dev.flush().await), "Any covers flushes");
        dev.clear_rules();
        dev.read(0, BS as usize).await.unwrap();
    }

    #[tokio::test]
    async fn rule_until_rewritten_heals_what_is_written() {
        let dev = FaultDev::new(mem(64));
        let id = dev.add_rule(
            ErrorRule::new(FaultOp::Read)
                .range(4 * BS..10 * BS)
                .until_rewritten(),
        );
        assert!(is_eio(&dev.read(4 * BS, BS as usize).await));
        // A failed write heals nothing.
        dev.add_rule(ErrorRule::new(FaultOp::Write).range(6 * BS..7 * BS).once());
        assert!(is_eio(
            &dev.write(6 * BS, pattern(1, BS as usize), NO).await
        ));
        assert!(is_eio(&dev.read(6 * BS, BS as usize).await));
        // Rewriting the middle leaves both ends bad.
        dev.write(6 * BS, pattern(1, 2 * BS as usize), NO)
            .await
            .unwrap();
        assert_reads(&dev, 6 * BS, &pattern(1, 2 * BS as usize), "remapped").await;
        assert!(is_eio(&dev.read(5 * BS, BS as usize).await));
        assert!(is_eio(&dev.read(8 * BS, BS as usize).await));
        dev.write_zeroes(4 * BS, 2 * BS, ZeroFlags::default())
            .await
            .unwrap();
        dev.read(4 * BS, 4 * BS as usize).await.unwrap();
        assert!(is_eio(&dev.read(9 * BS, BS as usize).await));
        dev.write(8 * BS, pattern(2, 2 * BS as usize), FUA)
            .await
            .unwrap();
        dev.read(0, 64 * BS as usize).await.unwrap();
        assert!(!dev.remove_rule(id), "retired once fully rewritten");
    }

    #[tokio::test]
    async fn a_split_rule_fires_as_often_as_the_whole_one() {
        let dev = FaultDev::new(mem(64));
        let id = dev.add_rule(
            ErrorRule::new(FaultOp::Read)
                .range(4 * BS..10 * BS)
                .times(Times::Count(2))
                .until_rewritten(),
        );
        // Rewriting the middle splits the rule in two; the pieces share its count.
        dev.write(6 * BS, pattern(1, 2 * BS as usize), NO)
            .await
            .unwrap();
        assert!(is_eio(&dev.read(4 * BS, BS as usize).await));
        assert!(is_eio(&dev.read(9 * BS, BS as usize).await));
        dev.read(5 * BS, BS as usize).await.unwrap();
        dev.read(8 * BS, BS as usize).await.unwrap();
        assert!(!dev.remove_rule(id), "both pieces retired with the count");
    }

    async fn failure_pattern(seed: u64) -> Vec<bool> {
        let dev = FaultDev::with_seed(mem(64), seed);
        dev.add_rule(ErrorRule::new(FaultOp::Read).probability(0.3));
        let mut out = Vec::new();
        for i in 0..200 {
            out.push(dev.read((i % 64) * BS, BS as usize).await.is_err());
        }
        out
    }

    #[tokio::test]
    async fn probability_is_reproducible_from_the_seed() {
        let a = failure_pattern(42).await;
        assert_eq!(a, failure_pattern(42).await);
        assert_ne!(a, failure_pattern(43).await);
        let failures = a.iter().filter(|&&f| f).count();
        assert!((35..90).contains(&failures), "{failures} of 200 at p=0.3");
        // Reseeding replays.
        let dev = FaultDev::with_seed(mem(64), 7);
        dev.add_rule(ErrorRule::new(FaultOp::Read).probability(0.5));
        let mut first = Vec::new();
        for _ in 0..50 {
            first.push(dev.read(0, BS as usize).await.is_err());
        }
        dev.set_seed(7);
        for (i, expect) in first.into_iter().enumerate() {
            assert_eq!(dev.read(0, BS as usize).await.is_err(), expect, "read {i}");
        }
    }

    #[tokio::test]
    async fn latency_applies_per_kind() {
        // Generous margins: only the read is delayed, by far more than a loaded machine
        // takes to do a memory write.
        let delay = Duration::from_millis(300);
        let dev = FaultDev::new(mem(64));
        dev.set_latency(FaultOp::Read, delay);
        let t = Instant::now();
        dev.write(0, pattern(1, BS as usize), NO).await.unwrap();
        assert!(t.elapsed() < delay);
        let t = Instant::now();
        dev.read(0, BS as usize).await.unwrap();
        assert!(t.elapsed() >= delay);
        dev.set_latency(FaultOp::Any, Duration::ZERO);
        let t = Instant::now();
        dev.read(0, BS as usize).await.unwrap();
        assert!(t.elapsed() < delay);
    }

    #[tokio::test]
    async fn torn_write_fail_keeps_prefix() {
        let dev = FaultDev::new(mem(64));
        let old = pattern(1, 8 * BS as usize);
        dev.write(0, old.clone(), FUA).await.unwrap();
        dev.tear_next_write(TornWrite {
            range: 0..BS,
            keep_blocks: 3,
            outcome: TornOutcome::Fail,
        });
        // Not overlapping the armed range: unaffected.
        dev.write(10 * BS, pattern(9, BS as usize), NO)
            .await
            .unwrap();
        let new = pattern(2, 8 * BS as usize);
        let r = dev.write(0, new.clone(), NO).await;
        assert!(is_eio(&r), "{r:?}");
        let mut expect = old.to_vec();
        expect[..3 * BS as usize].copy_from_slice(&new[..3 * BS as usize]);
        assert_reads(&dev, 0, &expect, "torn write").await;
        // Fires once.
        dev.write(0, new.clone(), NO).await.unwrap();
        assert_reads(&dev, 0, &new, "after torn write").await;
    }

    #[tokio::test]
    async fn torn_write_crash_persists_prefix_only() {
        let inner = mem(64);
        let dev = FaultDev::new(inner.clone());
        let old = pattern(1, 8 * BS as usize);
        dev.write(0, old.clone(), NO).await.unwrap();
        dev.flush().await.unwrap();
        // Unflushed, so lost in the crash.
        dev.write(20 * BS, pattern(3, BS as usize), NO)
            .await
            .unwrap();
        dev.tear_next_write(TornWrite {
            range: 0..u64::MAX,
            keep_blocks: 2,
            outcome: TornOutcome::Crash,
        });
        let new = pattern(2, 8 * BS as usize);
        let r = dev.compare_and_write(0, old.clone(), new.clone(), NO).await;
        assert!(is_offline(&r), "{r:?}");
        assert!(dev.is_crashed());
        assert!(is_offline(&dev.read(0, BS as usize).await));
        dev.recover().await;
        let mut expect = old.to_vec();
        expect[..2 * BS as usize].copy_from_slice(&new[..2 * BS as usize]);
        assert_reads(&dev, 0, &expect, "after torn crash").await;
        assert_reads(&*inner, 0, &expect, "inner after torn crash").await;
        assert_reads(&dev, 20 * BS, &[0; BS as usize], "unflushed").await;
    }

    #[tokio::test]
    async fn cache_holds_writes_until_flush() {
        let inner = mem(64);
        let dev = FaultDev::new(inner.clone());
        let a = pattern(1, 2 * BS as usize);
        dev.write(BS, a.clone(), NO).await.unwrap();
        assert_eq!(dev.unflushed_blocks(), 2);
        assert_reads(&dev, BS, &a, "cached").await;
        assert_reads(&*inner, BS, &[0; 2 * BS as usize], "inner before flush").await;
        dev.flush().await.unwrap();
        assert_eq!(dev.unflushed_blocks(), 0);
        assert_reads(&*inner, BS, &a, "inner after flush").await;
        // FUA goes through and replaces the cached copy.
        dev.write(BS, pattern(2, BS as usize), NO).await.unwrap();
        let b = pattern(3, BS as usize);
        dev.write(BS, b.clone(), FUA).await.unwrap();
        assert_eq!(dev.unflushed_blocks(), 0);
        assert_reads(&*inner, BS, &b, "inner after FUA").await;
        assert_reads(&dev, BS, &b, "after FUA").await;
        // Cache off: straight through.
        dev.set_write_cache(false);
        let c = pattern(4, BS as usize);
        dev.write(0, c.clone(), NO).await.unwrap();
        assert_reads(&*inner, 0, &c, "write-through").await;
    }

    #[tokio::test]
    async fn dead_disk_and_heal() {
        let dev = FaultDev::new(mem(64));
        dev.write(0, pattern(1, BS as usize), NO).await.unwrap();
        dev.fail_device();
        assert!(is_offline(&dev.read(0, BS as usize).await));
        assert!(is_offline(&dev.write(0, pattern(2, BS as usize), NO).await));
        assert!(is_offline(&dev.flush().await));
        dev.heal();
        assert_reads(&dev, 0, &pattern(1, BS as usize), "healed").await;
    }

    /// Write A, flush, write B (unflushed) and a FUA write C, crash: after recovery A and
    /// C are there and B is gone. Then the same through a random-subset crash: every
    /// block holds either its durable value or one of the unflushed writes, never
    /// anything else, and the same seed keeps the same blocks.
    async fn crash_scenario(make: impl Fn() -> SharedBlockDev) {
        let dev = FaultDev::new(make());
        let a = pattern(1, 16 * BS as usize);
        let b = pattern(2, 8 * BS as usize);
        let c = pattern(3, 4 * BS as usize);
        dev.write(0, a.clone(), NO).await.unwrap();
        dev.flush().await.unwrap();
        dev.write(4 * BS, b.clone(), NO).await.unwrap();
        dev.write(32 * BS, c.clone(), FUA).await.unwrap();
        dev.crash();
        assert!(is_offline(&dev.read(0, BS as usize).await));
        assert!(is_offline(&dev.flush().await));
        dev.recover().await;
        assert_reads(&dev, 0, &a, "flushed data after crash").await;
        assert_reads(&dev, 32 * BS, &c, "FUA data after crash").await;
        assert_reads(&*dev.inner(), 0, &a, "inner after crash").await;

        let mut kept_sets = Vec::new();
        for _ in 0..2 {
            let inner = make();
            let dev = FaultDev::new(inner.clone());
            let base = pattern(10, 64 * BS as usize);
            dev.write(0, base.clone(), FUA).await.unwrap();
            // Unflushed: 3 overlapping writes, so blocks 8..12 were written twice.
            let w: Vec<(u64, Bytes)> = vec![
                (4, pattern(11, 8 * BS as usize)),
                (8, pattern(12, 4 * BS as usize)),
                (40, pattern(13, 16 * BS as usize)),
            ];
            for (blk, d) in &w {
                dev.write(blk * BS, d.clone(), NO).await.unwrap();
            }
            let unflushed = dev.unflushed_blocks();
            assert_eq!(unflushed, 8 + 16);
            let kept = dev.crash_keeping_random(99, 0.5).await.unwrap();
            assert!(0 < kept && kept < unflushed, "kept {kept} of {unflushed}");
            drop(dev);
            // "Reboot" on the surviving device.
            let after = inner.read(0, 64 * BS as usize).await.unwrap();
            let mut changed = Vec::new();
            for blk in 0..64u64 {
                let got = &after[(blk * BS) as usize..((blk + 1) * BS) as usize];
                let durable = &base[(blk * BS) as usize..((blk + 1) * BS) as usize];
                if got == durable {
                    continue;
                }
                // The latest unflushed write of this block.
                let latest = w
                    .iter()
                    .rev()
                    .find(|(s, d)| (*s..*s + d.len() as u64 / BS).contains(&blk))
                    .map(|(s, d)| {
                        d.slice(((blk - s) * BS) as usize..((blk - s + 1) * BS) as usize)
                    });
                assert_eq!(Some(got), latest.as_deref(), "block {blk} holds garbage");
                changed.push(blk);
            }
            assert_eq!(changed.len(), kept);
            kept_sets.push(changed);
        }
        assert_eq!(kept_sets[0], kept_sets[1], "same seed, same survivors");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crash_over_memdev() {
        crash_scenario(|| mem(128)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crash_over_uring_file() {
        let dir = tempfile::tempdir().unwrap();
        let n = std::sync::atomic::AtomicU32::new(0);
        crash_scenario(|| {
            let path = dir.path().join(format!(
                "disk{}",
                n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            crate::uring::create_sparse_file(&path, 128 * BS).unwrap();
            Arc::new(UringFile::open(&path, &UringOptions::default()).unwrap()) as SharedBlockDev
        })
        .await;
        // Reopening the file (a real "reboot" of the process) shows the same data.
        let path = dir.path().join("disk0");
        let f = UringFile::open(&path, &UringOptions::default()).unwrap();
        assert_reads(&f, 0, &pattern(1, 16 * BS as usize), "reopened").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flush_racing_writes_loses_nothing() {
        // Cached writes, FUA writes and flushes race; after a final flush the inner
        // device holds the last value written to each block by its (sequential) writer.
        let inner = mem(256);
        let dev = Arc::new(FaultDev::new(inner.clone()));
        let mut set = tokio::task::JoinSet::new();
        for t in 0..4u64 {
            let dev = dev.clone();
            set.spawn(async move {
                for i in 0..50u64 {
                    let blk = t * 64 + (i % 16);
                    let flags = WriteFlags { fua: i % 3 == 0 };
                    dev.write(blk * BS, pattern(t * 1000 + i, BS as usize), flags)
                        .await
                        .unwrap();
                    if i % 7 == 0 {
                        dev.flush().await.unwrap();
                    }
                }
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
        dev.flush().await.unwrap();
        for t in 0..4u64 {
            for j in 0..16u64 {
                let last = (0..50).filter(|i| i % 16 == j).max().unwrap();
                let what = format!("task {t} block {j}");
                let expect = pattern(t * 1000 + last, BS as usize);
                assert_reads(&*inner, (t * 64 + j) * BS, &expect, &what).await;
            }
        }
    }
}
