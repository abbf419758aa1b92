//! [`Lun`]: a volume of a pool as a [`BlockDev`].
//!
//! # The I/O paths
//!
//! - **Read**: look the chunks up in the volume's map (a shared lock, three indexed
//!   loads per chunk), read the mapped ones from the pool device, zeroes for holes.
//! - **Overwrite** of a chunk the volume owns: the same lookup, then one write to the
//!   device with the caller's flags. No metadata is touched.
//! - **First write** (a hole) or **copy-on-write** (a chunk shared with a snapshot or
//!   clone): under an exclusive range lock, take a free chunk, write the whole chunk
//!   (the caller's data merged into zeroes, or into the shared chunk's contents), and
//!   only after that write completes map it. The mapping is durable at the next
//!   commit: a flush, a FUA write, the background commit, or a management operation.
//!   A FUA write that allocated waits for that commit before it completes.
//! - **Discard / write-zeroes**: whole chunks are unmapped (their space returns after
//!   the next commit) or, for thick volumes and write-zeroes without `may_unmap`,
//!   zeroed in place; partial chunks are zeroed in place or copied-on-write.
//!
//! Every request holds the pool's admin lock shared (management operations take it
//! exclusively, so a snapshot sees no write half done) and the volume's range locks,
//! shared for reads and overwrites, exclusive for anything that changes the map, so
//! that no read can see a chunk that a concurrent discard frees and another volume
//! reuses.

use crate::error::PoolError;
use crate::format::{Op, Provisioning, VolumeKind, VolumeRecord};
use crate::pool::{dev_write, PoolInner, VolumeId, VolumeRuntime};
use crate::state::State;
use crate::stats::{inc, VolumeStats};
use async_trait::async_trait;
use basalt_blockdev::{
    check_range, first_difference, AlignedBuf, BlockDev, BlockError, Capabilities, CompareOutcome,
    Extent, ExtentKind, Geometry, IoKind, Result, WriteFlags, ZeroFlags,
};
use bytes::Bytes;
use futures_util::future::try_join_all;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A volume (LUN, clone or read-only snapshot) of a pool, as a block device. Get one
/// from [`Pool::lun`](crate::Pool::lun). See the [module docs](self).
pub struct Lun {
    pool: Arc<PoolInner>,
    rt: Arc<VolumeRuntime>,
    id: VolumeId,
    kind: VolumeKind,
    provisioning: Provisioning,
    block_size: u32,
}

impl std::fmt::Debug for Lun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lun")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .finish()
    }
}

enum Class {
    Hole,
    Owned(u32),
    Inherited(u32),
}

/// Splits `[offset, offset + len)` at chunk boundaries: (chunk, offset in chunk,
/// length, position in the request).
fn pieces(offset: u64, len: u64, cs: u64) -> impl Iterator<Item = (u64, u64, u64, usize)> {
    let end = offset + len;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let x = at / cs;
        let off = at % cs;
        let n = (cs - off).min(end - at);
        let item = (x, off, n, (at - offset) as usize);
        at += n;
        Some(item)
    })
}

fn gone() -> BlockError {
    BlockError::Offline("the volume was deleted".into())
}

/// The node of `vol` and the class of chunk `x` in it.
fn classify(st: &State, vol: u32, x: u64) -> Result<(u32, Class)> {
    let v = st.vols.get(&vol).ok_or_else(gone)?;
    let n = st.nodes.get(&v.node).ok_or_else(gone)?;
    let val = n.map.get(x);
    let class = if val == 0 {
        Class::Hole
    } else if val == st.parent_val(n, x) {
        Class::Inherited(val - 1)
    } else {
        Class::Owned(val - 1)
    };
    Ok((v.node, class))
}

/// Allocates a chunk for chunk `x` of `node`, writes `piece` at `off` into it (merged
/// into zeroes or into `old`'s contents), and maps it. Returns the record's sequence
/// number and whether the log wants a commit.
async fn alloc_write(
    p: &Arc<PoolInner>,
    rt: &VolumeRuntime,
    node: u32,
    x: u64,
    off: u64,
    piece: Bytes,
    old: Option<u32>,
) -> std::result::Result<(u64, bool), PoolError> {
    let cs = u64::from(p.layout.chunk_size);
    let chunks = match p.alloc(1, rt.vol) {
        Some(c) => c,
        None => {
            // Space freed by discards comes back at the next commit.
            let retry = if p.has_pending_frees() {
                p.commit().await?;
                p.alloc(1, rt.vol)
            } else {
                None
            };
            match retry {
                Some(c) => c,
                None => {
                    inc(&p.counters.nospace_errors_total, 1);
                    inc(&rt.stats.counters.nospace_errors_total, 1);
                    return Err(PoolError::NoSpace("the pool is full".into()));
                }
            }
        }
    };
    let phys = chunks[0];
    let buf = if off == 0 && piece.len() as u64 == cs {
        piece
    } else {
        let mut b = AlignedBuf::zeroed(cs as usize);
        if let Some(o) = old {
            match p.dev.read(p.layout.chunk_off(o), cs as usize).await {
                Ok(d) => b.as_mut_slice().copy_from_slice(&d),
                Err(e) => {
                    p.unalloc(&chunks);
                    return Err(e.into());
                }
            }
        }
        b.as_mut_slice()[off as usize..off as usize + piece.len()].copy_from_slice(&piece);
        b.freeze()
    };
    if old.is_some() {
        inc(&p.counters.cow_copies_total, 1);
        inc(&rt.stats.counters.cow_copies_total, 1);
    }
    if let Err(e) = dev_write(&p.dev, p.layout.chunk_off(phys), buf, WriteFlags::default()).await {
        p.unalloc(&chunks);
        return Err(e.into());
    }
    inc(&rt.stats.counters.chunks_allocated_total, 1);
    p.apply_map(
        Op::Map {
            node,
            x: x as u32,
            phys,
            count: 1,
        },
        1,
    )
}

/// Makes `[offset, offset + len)` of `vol` read zeroes. With `unmap`, whole chunks of
/// a thin volume are unmapped (freed when no other volume reads them); otherwise they
/// stay allocated and are zeroed in place. The caller holds the range exclusively.
pub(crate) async fn zero_range(
    p: &Arc<PoolInner>,
    vol: u32,
    offset: u64,
    len: u64,
    unmap: bool,
) -> std::result::Result<(), PoolError> {
    let rt = p.runtime(vol);
    let cs = u64::from(p.layout.chunk_size);
    let mut full: Option<(u64, u64)> = None;
    let mut partial = Vec::new();
    for (x, off, n, _) in pieces(offset, len, cs) {
        if n == cs {
            full = Some(match full {
                Some((a, _)) => (a, x + 1),
                None => (x, x + 1),
            });
        } else {
            partial.push((x, off, n));
        }
    }
    if let Some((xa, xb)) = full {
        let count = xb - xa;
        let (node, keep_owned, owned_runs, any_inherited, any_mapped, delta, room) = {
            let m = p.meta.read();
            let st = &m.st;
            let v = st.vols.get(&vol).ok_or_else(gone)?;
            let n = st.nodes.get(&v.node).ok_or_else(gone)?;
            let keep_owned = v.provisioning.is_thick() || !unmap;
            let mut runs: Vec<(u32, u64)> = Vec::new();
            let (mut inh, mut mapped) = (false, false);
            n.map.for_each_mapped(xa, xb, |x, val| {
                mapped = true;
                if val == st.parent_val(n, x) {
                    inh = true;
                } else if keep_owned {
                    match runs.last_mut() {
                        Some((ph, c)) if *ph as u64 + *c == u64::from(val - 1) => *c += 1,
                        _ => runs.push((val - 1, 1)),
                    }
                }
            });
            let delta = st.unmap_entry_delta(v.node, xa, count, keep_owned);
            let room = st.layout.max_entries() as i64 - st.entries() as i64;
            (v.node, keep_owned, runs, inh, mapped, delta, room)
        };
        if delta > room {
            inc(&p.counters.nospace_errors_total, 1);
            return Err(PoolError::NoSpace("metadata is full".into()));
        }
        for (ph, c) in owned_runs {
            p.dev
                .write_zeroes(p.layout.chunk_off(ph), c * cs, ZeroFlags::default())
                .await?;
        }
        let op = if keep_owned {
            any_inherited.then_some(Op::Tomb {
                node,
                x: xa as u32,
                count: count as u32,
            })
        } else {
            any_mapped.then_some(Op::Unmap {
                node,
                x: xa as u32,
                count: count as u32,
            })
        };
        if let Some(op) = op {
            p.apply(op)?;
        }
    }
    for (x, off, n) in partial {
        let (node, class) = classify(&p.meta.read().st, vol, x)?;
        match class {
            Class::Hole => {}
            Class::Owned(ph) => {
                p.dev
                    .write_zeroes(p.layout.chunk_off(ph) + off, n, ZeroFlags::default())
                    .await?;
            }
            Class::Inherited(ph) => {
                let zero = Bytes::from(vec![0u8; n as usize]);
                let (_, big) = alloc_write(p, &rt, node, x, off, zero, Some(ph)).await?;
                if big {
                    p.commit().await?;
                }
            }
        }
    }
    Ok(())
}

impl Lun {
    pub(crate) fn new(pool: Arc<PoolInner>, rt: Arc<VolumeRuntime>, rec: &VolumeRecord) -> Self {
        Lun {
            pool,
            rt,
            id: VolumeId(rec.uuid),
            kind: rec.kind,
            provisioning: rec.provisioning,
            block_size: rec.block_size,
        }
    }

    /// The volume's stable identity.
    pub fn id(&self) -> VolumeId {
        self.id
    }

    /// LUN, snapshot or clone.
    pub fn kind(&self) -> VolumeKind {
        self.kind
    }

    /// The volume's current name (None once deleted).
    pub fn name(&self) -> Option<String> {
        self.pool
            .meta
            .read()
            .st
            .vols
            .get(&self.rt.vol)
            .map(|v| v.name.clone())
    }

    /// The volume's counters (the same as [`Pool::volume_stats`](crate::Pool::volume_stats)).
    pub fn stats(&self) -> &Arc<VolumeStats> {
        &self.rt.stats
    }

    /// Where byte `offset` of the volume lives on the pool device, or None for a hole:
    /// one map lookup, as the I/O path does it (the map-lookup benchmark calls this).
    pub fn physical_offset(&self, offset: u64) -> Option<u64> {
        let cs = u64::from(self.pool.layout.chunk_size);
        let m = self.pool.meta.read();
        let v = m.st.vols.get(&self.rt.vol)?;
        let val = m.st.nodes.get(&v.node)?.map.get(offset / cs);
        (val != 0).then(|| self.pool.layout.chunk_off(val - 1) + offset % cs)
    }

    fn check_alive(&self) -> Result<()> {
        if self.rt.deleted.load(Ordering::Acquire) {
            return Err(gone());
        }
        self.pool.check_online().map_err(BlockError::from)
    }

    fn check_writable(&self) -> Result<()> {
        if !self.kind.writable() {
            return Err(BlockError::ReadOnly);
        }
        Ok(())
    }

    fn cs(&self) -> u64 {
        u64::from(self.pool.layout.chunk_size)
    }

    fn count<T>(&self, kind: IoKind, t: std::time::Instant, bytes: u64, r: &Result<T>) {
        self.rt.stats.io.finish(kind, t, bytes, r.is_ok());
    }

    fn start(&self) -> std::time::Instant {
        self.rt.stats.io.start()
    }

    async fn read_unlocked(&self, offset: u64, len: usize) -> Result<Bytes> {
        let cs = self.cs();
        // (position, length, device offset or None for a hole), contiguous runs merged.
        let mut plan: Vec<(usize, usize, Option<u64>)> = Vec::new();
        {
            let m = self.pool.meta.read();
            let v = m.st.vols.get(&self.rt.vol).ok_or_else(gone)?;
            let n = m.st.nodes.get(&v.node).ok_or_else(gone)?;
            for (x, off, cnt, pos) in pieces(offset, len as u64, cs) {
                let val = n.map.get(x);
                let dev = (val != 0).then(|| self.pool.layout.chunk_off(val - 1) + off);
                match plan.last_mut() {
                    Some((p, l, Some(d))) if dev == Some(*d + *l as u64) => {
                        let _ = p;
                        *l += cnt as usize;
                    }
                    Some((_, l, None)) if dev.is_none() => *l += cnt as usize,
                    _ => plan.push((pos, cnt as usize, dev)),
                }
            }
        }
        if let [(_, _, d)] = plan[..] {
            return match d {
                Some(d) => self.pool.dev.read(d, len).await,
                None => Ok(AlignedBuf::zeroed(len).freeze()),
            };
        }
        let dev = &self.pool.dev;
        let parts = try_join_all(plan.iter().filter_map(|&(pos, l, d)| {
            d.map(|d| async move { dev.read(d, l).await.map(|b| (pos, b)) })
        }))
        .await?;
        let mut buf = AlignedBuf::zeroed(len);
        for (pos, b) in parts {
            buf.as_mut_slice()[pos..pos + b.len()].copy_from_slice(&b);
        }
        Ok(buf.freeze())
    }

    /// The device writes for an overwrite of owned chunks only (None if any chunk
    /// needs allocation): (position, length, device offset), contiguous runs merged;
    /// and the chunks written.
    #[allow(clippy::type_complexity)]
    fn inplace_plan(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<(Vec<(usize, usize, u64)>, Vec<u32>)>> {
        let cs = self.cs();
        let m = self.pool.meta.read();
        let mut plan: Vec<(usize, usize, u64)> = Vec::new();
        let mut chunks = Vec::new();
        for (x, off, n, pos) in pieces(offset, len, cs) {
            let (_, class) = classify(&m.st, self.rt.vol, x)?;
            let Class::Owned(ph) = class else {
                return Ok(None);
            };
            chunks.push(ph);
            let d = self.pool.layout.chunk_off(ph) + off;
            match plan.last_mut() {
                Some((_, l, dd)) if *dd + *l as u64 == d => *l += n as usize,
                _ => plan.push((pos, n as usize, d)),
            }
        }
        Ok(Some((plan, chunks)))
    }

    async fn write_plan(
        &self,
        plan: Vec<(usize, usize, u64)>,
        data: Bytes,
        flags: WriteFlags,
    ) -> Result<()> {
        if let [(_, _, d)] = plan[..] {
            return dev_write(&self.pool.dev, d, data, flags).await;
        }
        let dev = &self.pool.dev;
        try_join_all(
            plan.into_iter()
                .map(|(pos, l, d)| dev_write(dev, d, data.slice(pos..pos + l), flags)),
        )
        .await?;
        Ok(())
    }

    /// A FUA overwrite is durable only with its chunk's mapping: wait for the commit of
    /// a mapping made since the last one.
    async fn settle_fua(&self, flags: WriteFlags, chunks: &[u32]) -> Result<()> {
        if flags.fua {
            if let Some(seq) = self.pool.unsettled(chunks) {
                self.pool.commit_until(seq).await?;
            }
        }
        Ok(())
    }

    /// The write path with the range held exclusively.
    async fn write_exclusive(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        let cs = self.cs();
        let p = &self.pool;
        let mut last = None;
        let mut want_commit = false;
        for (x, off, n, pos) in pieces(offset, data.len() as u64, cs) {
            let piece = data.slice(pos..pos + n as usize);
            let (node, class) = classify(&p.meta.read().st, self.rt.vol, x)?;
            let old = match class {
                Class::Owned(ph) => {
                    dev_write(&p.dev, p.layout.chunk_off(ph) + off, piece, flags).await?;
                    self.settle_fua(flags, &[ph]).await?;
                    continue;
                }
                Class::Hole => None,
                Class::Inherited(ph) => Some(ph),
            };
            let (seq, big) = alloc_write(p, &self.rt, node, x, off, piece, old).await?;
            last = Some(seq);
            want_commit |= big;
        }
        if let Some(seq) = last {
            if flags.fua || want_commit {
                p.commit_until(seq).await?;
            }
        }
        Ok(())
    }

    async fn write_impl(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        let len = data.len() as u64;
        {
            let _shared = self.rt.locks.shared(offset, len).await;
            if let Some((plan, chunks)) = self.inplace_plan(offset, len)? {
                self.write_plan(plan, data, flags).await?;
                return self.settle_fua(flags, &chunks).await;
            }
        }
        let _excl = self.rt.locks.exclusive(offset, len).await;
        self.write_exclusive(offset, data, flags).await
    }
}

#[async_trait]
impl BlockDev for Lun {
    fn geometry(&self) -> Geometry {
        let dev = self.pool.dev.geometry();
        let size = self.rt.size.load(Ordering::Acquire);
        Geometry {
            block_size: self.block_size,
            physical_block_size: dev
                .physical_block_size
                .max(self.block_size)
                .min(self.pool.layout.chunk_size),
            blocks: size / u64::from(self.block_size),
            optimal_io_size: self.pool.layout.chunk_size,
            max_io_bytes: 0,
            capabilities: Capabilities {
                discard: true,
                discard_zeroes: true,
                fast_zeroes: true,
                volatile_cache: true,
                read_only: !self.kind.writable(),
            },
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        let t = self.start();
        let r = async {
            check_range(&self.geometry(), offset, len as u64)?;
            let _admin = self.pool.admin.read().await;
            self.check_alive()?;
            let _g = self.rt.locks.shared(offset, len as u64).await;
            self.read_unlocked(offset, len).await
        }
        .await;
        self.count(IoKind::Read, t, len as u64, &r);
        r
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        let len = data.len() as u64;
        let t = self.start();
        let r = async {
            check_range(&self.geometry(), offset, len)?;
            self.check_writable()?;
            let _admin = self.pool.admin.read().await;
            self.check_alive()?;
            self.write_impl(offset, data, flags).await
        }
        .await;
        self.count(IoKind::Write, t, len, &r);
        r
    }

    async fn flush(&self) -> Result<()> {
        let t = self.start();
        let r = async {
            self.check_alive()?;
            self.pool.commit().await.map_err(BlockError::from)
        }
        .await;
        self.count(IoKind::Flush, t, 0, &r);
        r
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let t = self.start();
        let r = async {
            check_range(&self.geometry(), offset, len)?;
            self.check_writable()?;
            let _admin = self.pool.admin.read().await;
            self.check_alive()?;
            let _g = self.rt.locks.exclusive(offset, len).await;
            zero_range(&self.pool, self.rt.vol, offset, len, true)
                .await
                .map_err(BlockError::from)
        }
        .await;
        self.count(IoKind::Discard, t, len, &r);
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let t = self.start();
        let r = async {
            check_range(&self.geometry(), offset, len)?;
            self.check_writable()?;
            let _admin = self.pool.admin.read().await;
            self.check_alive()?;
            let _g = self.rt.locks.exclusive(offset, len).await;
            zero_range(&self.pool, self.rt.vol, offset, len, flags.may_unmap)
                .await
                .map_err(BlockError::from)
        }
        .await;
        self.count(IoKind::WriteZeroes, t, len, &r);
        r
    }

    async fn compare_and_write(
        &self,
        offset: u64,
        compare: Bytes,
        data: Bytes,
        flags: WriteFlags,
    ) -> Result<CompareOutcome> {
        let len = data.len() as u64;
        let t = self.start();
        let r = async {
            if compare.len() != data.len() {
                return Err(BlockError::InvalidRequest(format!(
                    "compare-and-write buffers differ in length: {} and {}",
                    compare.len(),
                    data.len()
                )));
            }
            check_range(&self.geometry(), offset, len)?;
            self.check_writable()?;
            let _admin = self.pool.admin.read().await;
            self.check_alive()?;
            let _g = self.rt.locks.exclusive(offset, len).await;
            let current = self.read_unlocked(offset, data.len()).await?;
            if let Some(at) = first_difference(&current, &compare) {
                return Ok(CompareOutcome::Miscompare { offset: at });
            }
            self.write_exclusive(offset, data, flags).await?;
            Ok(CompareOutcome::Written)
        }
        .await;
        let bytes = match r {
            Ok(CompareOutcome::Written) => len,
            _ => 0,
        };
        self.count(IoKind::CompareAndWrite, t, bytes, &r);
        r
    }

    /// Holes (thin: `Hole`; thick: `Zero`, since their space is reserved) and mapped
    /// chunks (`Data`), at chunk granularity, clipped to the range.
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(&self.geometry(), offset, len)?;
        let _admin = self.pool.admin.read().await;
        self.check_alive()?;
        let cs = self.cs();
        let hole = if self.provisioning.is_thick() {
            ExtentKind::Zero
        } else {
            ExtentKind::Hole
        };
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |kind: ExtentKind, n: u64| {
            if n == 0 {
                return;
            }
            match out.last_mut() {
                Some(e) if e.kind == kind => e.len += n,
                _ => out.push(Extent { len: n, kind }),
            }
        };
        let end = offset + len;
        let mut cursor = offset;
        {
            let m = self.pool.meta.read();
            let v = m.st.vols.get(&self.rt.vol).ok_or_else(gone)?;
            let n = m.st.nodes.get(&v.node).ok_or_else(gone)?;
            n.map
                .for_each_mapped(offset / cs, end.div_ceil(cs), |x, _| {
                    let s = (x * cs).max(offset);
                    let e = ((x + 1) * cs).min(end);
                    push(hole, s - cursor);
                    push(ExtentKind::Data, e - s);
                    cursor = e;
                });
        }
        push(hole, end - cursor);
        Ok(out)
    }
}
