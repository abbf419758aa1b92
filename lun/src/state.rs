//! The pool's metadata state in memory, and the one function that changes it:
//! [`State::apply`], used alike by live operations and by journal replay.
//!
//! # Model
//!
//! Every volume (LUN, snapshot, clone) has a *node*: a [`ChunkMap`] of what the volume
//! reads, plus a parent. Nodes form a tree. A writable volume's node is a leaf; taking a
//! snapshot freezes the node (it becomes the snapshot's) and gives the LUN a fresh
//! child whose map starts as a copy-on-write copy of it. A node *owns* the chunks in its
//! map that differ from its parent's map at the same place. Each physical chunk is owned
//! by exactly one node, so there are no reference counts to get wrong: the free space is
//! exactly the chunks no node owns, and deleting a volume frees exactly what its node
//! owns and nobody still sees.
//!
//! Nodes without a volume (*hidden* nodes: a deleted snapshot's node that still has
//! children, or the frozen source of a clone of a writable LUN) are kept only while at
//! least two children hang off them: with none they are dropped, with one they are
//! merged into it. An entry of a hidden node that no descendant volume still sees is
//! *dead* and is reclaimed at once (when the last volume that saw it overwrites,
//! discards or deletes it). So deleting in any order returns all space that no volume
//! can read.

use crate::format::{
    CheckpointBody, Layout, NewVolume, NodeRecord, Op, Provisioning, Run, Thresholds, VolumeKind,
    VolumeRecord, MAX_NAME, NODE_RECORD_MAX, NONE, RUN_BYTES, VOL_RECORD_MAX,
};
use crate::map::ChunkMap;
use std::collections::{BTreeMap, HashMap};

/// An invalid operation (a bug when live, corruption when replayed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StateError(pub String);

fn bad<T>(msg: impl Into<String>) -> Result<T, StateError> {
    Err(StateError(msg.into()))
}

/// Whether frees go to the pending list (live: reusable after the next commit) or are
/// released at once (replay: the state is already durable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Live,
    Replay,
}

/// One node of the tree. See the [module docs](self).
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub parent: Option<u32>,
    pub children: Vec<u32>,
    pub frozen: bool,
    pub vol: Option<u32>,
    pub map: ChunkMap,
    /// Chunks this node owns.
    pub owned: u64,
    /// Holes where the parent has a chunk (entries in the checkpoint, like owned ones).
    pub tombs: u64,
    /// Non-hole entries.
    pub mapped: u64,
}

/// A set of chunk numbers.
#[derive(Debug, Clone, Default)]
pub(crate) struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    fn new(bits: u64) -> Self {
        Bitmap {
            words: vec![0; bits.div_ceil(64) as usize],
        }
    }
    pub fn get(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    fn set(&mut self, i: u64, v: bool) {
        if let Some(w) = self.words.get_mut((i / 64) as usize) {
            if v {
                *w |= 1 << (i % 64);
            } else {
                *w &= !(1 << (i % 64));
            }
        }
    }
    /// First clear bit at or after `from`, wrapping, below `limit`.
    fn find_clear(&self, from: u64, limit: u64) -> Option<u64> {
        let scan = |start: u64, end: u64| -> Option<u64> {
            let mut i = start;
            while i < end {
                let w = self.words[(i / 64) as usize] | ((1u64 << (i % 64)) - 1);
                if w != u64::MAX {
                    let bit = (i / 64) * 64 + u64::from((!w).trailing_zeros());
                    return (bit < end).then_some(bit);
                }
                i = (i / 64 + 1) * 64;
            }
            None
        };
        scan(from.min(limit), limit).or_else(|| scan(0, from.min(limit)))
    }
}

/// The metadata of a pool. See the [module docs](self).
#[derive(Debug, Clone)]
pub(crate) struct State {
    pub layout: Layout,
    pub thresholds: Thresholds,
    pub next_vol: u32,
    pub next_node: u32,
    pub vols: BTreeMap<u32, VolumeRecord>,
    pub names: HashMap<String, u32>,
    pub nodes: HashMap<u32, Node>,
    /// Chunks not free: owned, freed but not yet committed, or allocated for a write in
    /// flight.
    pub used: Bitmap,
    pub used_count: u64,
    pub owned_total: u64,
    pub tombs_total: u64,
    /// Chunks promised to thick volumes and not yet allocated.
    pub reserved_total: u64,
    cursor: u64,
    /// Freed by applied operations, reusable once a commit makes the free durable.
    pub pending_free: Vec<u32>,
}

/// Checks a volume or pool name.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!("name must be 1 to {MAX_NAME} bytes"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-:@+".contains(&b))
    {
        return Err(format!(
            "name {name:?} may hold only letters, digits and . _ - : @ +"
        ));
    }
    Ok(())
}

impl State {
    /// An empty pool.
    pub fn new(layout: Layout, thresholds: Thresholds) -> Self {
        State {
            layout,
            thresholds,
            next_vol: 1,
            next_node: 1,
            vols: BTreeMap::new(),
            names: HashMap::new(),
            nodes: HashMap::new(),
            used: Bitmap::new(layout.data_chunks),
            used_count: 0,
            owned_total: 0,
            tombs_total: 0,
            reserved_total: 0,
            cursor: 0,
            pending_free: Vec::new(),
        }
    }

    pub fn chunk_size(&self) -> u64 {
        u64::from(self.layout.chunk_size)
    }

    pub fn chunks_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.chunk_size())
    }

    pub fn free_chunks(&self) -> u64 {
        self.layout.data_chunks - self.used_count
    }

    fn node(&self, id: u32) -> Result<&Node, StateError> {
        match self.nodes.get(&id) {
            Some(n) => Ok(n),
            None => bad(format!("node {id} does not exist")),
        }
    }

    fn node_mut(&mut self, id: u32) -> &mut Node {
        // Callers validated the id; a missing node here is a logic error, which we turn
        // into an inert dummy rather than a panic.
        self.nodes.entry(id).or_insert_with(|| Node {
            parent: None,
            children: Vec::new(),
            frozen: true,
            vol: None,
            map: ChunkMap::default(),
            owned: 0,
            tombs: 0,
            mapped: 0,
        })
    }

    /// The value the parent of `node` has at `x` (0 for roots and holes).
    pub fn parent_val(&self, node: &Node, x: u64) -> u32 {
        node.parent
            .and_then(|p| self.nodes.get(&p))
            .map_or(0, |p| p.map.get(x))
    }

    pub fn val(&self, node: u32, x: u64) -> u32 {
        self.nodes.get(&node).map_or(0, |n| n.map.get(x))
    }

    /// The volume record of `vol`.
    pub fn vol(&self, vol: u32) -> Result<&VolumeRecord, StateError> {
        match self.vols.get(&vol) {
            Some(v) => Ok(v),
            None => bad(format!("volume {vol} does not exist")),
        }
    }

    /// Entries a checkpoint holds: owned chunks plus tombstones.
    pub fn entries(&self) -> u64 {
        self.owned_total + self.tombs_total
    }

    /// An upper bound of the checkpoint body size now.
    pub fn metadata_bytes(&self) -> u64 {
        64 + self.vols.len() as u64 * VOL_RECORD_MAX
            + self.nodes.len() as u64 * NODE_RECORD_MAX
            + self.entries() * RUN_BYTES
    }

    fn free_chunk(&mut self, phys: u32, mode: Mode) {
        self.owned_total = self.owned_total.saturating_sub(1);
        match mode {
            Mode::Live => self.pending_free.push(phys),
            Mode::Replay => {
                if self.used.get(u64::from(phys)) {
                    self.used.set(u64::from(phys), false);
                    self.used_count -= 1;
                }
            }
        }
    }

    /// Returns chunks to the free set (after the commit that freed them).
    pub fn release(&mut self, chunks: &[u32]) {
        for &p in chunks {
            if self.used.get(u64::from(p)) {
                self.used.set(u64::from(p), false);
                self.used_count -= 1;
            }
        }
    }

    /// Chunks `vol` may still allocate from its own reservation.
    pub fn reserved_of(&self, vol: &VolumeRecord) -> u64 {
        if !vol.provisioning.is_thick() || !vol.kind.writable() {
            return 0;
        }
        let owned = self.nodes.get(&vol.node).map_or(0, |n| n.owned);
        self.chunks_for(vol.size).saturating_sub(owned)
    }

    fn refresh_reserved(&mut self) {
        self.reserved_total = self.vols.values().map(|v| self.reserved_of(v)).sum();
    }

    /// Chunks that `vol` (None: a thin allocation) may allocate now.
    pub fn available_for(&self, vol: Option<&VolumeRecord>) -> u64 {
        let own = vol.map_or(0, |v| self.reserved_of(v));
        self.free_chunks()
            .saturating_sub(self.reserved_total.saturating_sub(own))
    }

    /// Takes `n` free chunks for a write in flight, contiguous when possible. They are
    /// owned once a `Map` is applied, or must be given back with [`State::release`].
    pub fn alloc(&mut self, n: u64, vol: Option<&VolumeRecord>) -> Option<Vec<u32>> {
        if self.available_for(vol) < n {
            return None;
        }
        let limit = self.layout.data_chunks;
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let i = self.used.find_clear(self.cursor, limit)?;
            self.used.set(i, true);
            self.used_count += 1;
            self.cursor = (i + 1) % limit;
            out.push(i as u32);
        }
        Some(out)
    }

    /// Tombstones an unmap of `[x, x + count)` in `node` would add (net entries).
    pub fn unmap_entry_delta(&self, node: u32, x: u64, count: u64, keep_owned: bool) -> i64 {
        let Some(n) = self.nodes.get(&node) else {
            return 0;
        };
        let mut delta = 0i64;
        n.map.for_each_mapped(x, x + count, |y, v| {
            let pv = self.parent_val(n, y);
            if v == pv {
                delta += 1; // inherited: becomes a tombstone
            } else if !keep_owned && pv == 0 {
                delta -= 1; // owned entry goes away without a tombstone
            }
        });
        delta
    }

    /// Applies one operation. On error nothing changed.
    pub fn apply(&mut self, op: &Op, mode: Mode) -> Result<(), StateError> {
        match op {
            Op::Create(rec) => self.create(rec),
            Op::Map {
                node,
                x,
                phys,
                count,
            } => self.map(*node, u64::from(*x), *phys, u64::from(*count), mode),
            Op::Unmap { node, x, count } => {
                self.unmap(*node, u64::from(*x), u64::from(*count), false, mode)
            }
            Op::Tomb { node, x, count } => {
                self.unmap(*node, u64::from(*x), u64::from(*count), true, mode)
            }
            Op::Snapshot {
                src,
                new_node,
                snap,
            } => self.snapshot(*src, *new_node, snap),
            Op::Clone {
                src,
                src_node,
                node,
                clone,
            } => self.clone_op(*src, *src_node, *node, clone),
            Op::Delete { vol } => self.delete(*vol, mode),
            Op::Resize { vol, size } => self.resize(*vol, *size, mode),
            Op::Rename { vol, name } => {
                self.vol(*vol)?;
                self.check_new_name(name)?;
                if let Some(v) = self.vols.get_mut(vol) {
                    let old = std::mem::replace(&mut v.name, name.clone());
                    self.names.remove(&old);
                    self.names.insert(name.clone(), *vol);
                }
                Ok(())
            }
            Op::Thresholds(t) => {
                t.validate().map_err(StateError)?;
                self.thresholds = *t;
                Ok(())
            }
        }
    }

    fn check_new_name(&self, name: &str) -> Result<(), StateError> {
        check_name(name).map_err(StateError)?;
        if self.names.contains_key(name) {
            return bad(format!("a volume named {name:?} exists"));
        }
        Ok(())
    }

    fn check_new_vol(&self, vol: u32, name: &str) -> Result<(), StateError> {
        if vol == NONE || self.vols.contains_key(&vol) {
            return bad(format!("volume id {vol} is taken"));
        }
        if self.vols.len() >= self.layout.max_volumes as usize {
            return bad(format!(
                "the pool holds its maximum of {} volumes",
                self.layout.max_volumes
            ));
        }
        self.check_new_name(name)
    }

    fn check_new_node(&self, node: u32) -> Result<(), StateError> {
        if node == NONE || self.nodes.contains_key(&node) {
            return bad(format!("node id {node} is taken"));
        }
        Ok(())
    }

    /// Checks a size and block size for a writable volume; returns its length in chunks.
    pub fn check_size(&self, size: u64, block_size: u32) -> Result<u64, StateError> {
        if !block_size.is_power_of_two() || block_size < 512 || block_size > self.layout.chunk_size
        {
            return bad(format!(
                "block size {block_size} must be a power of two from 512 to the {}-byte chunk",
                self.layout.chunk_size
            ));
        }
        if size == 0 || !size.is_multiple_of(u64::from(block_size)) {
            return bad(format!(
                "size {size} must be a positive multiple of the {block_size}-byte block"
            ));
        }
        let len = self.chunks_for(size);
        if len > u64::from(u32::MAX) {
            return bad(format!("size {size} is beyond the 2^32-chunk limit"));
        }
        Ok(len)
    }

    fn bump_ids(&mut self, vol: u32, node: u32) {
        if vol != NONE {
            self.next_vol = self.next_vol.max(vol.saturating_add(1));
        }
        if node != NONE {
            self.next_node = self.next_node.max(node.saturating_add(1));
        }
    }

    fn create(&mut self, rec: &VolumeRecord) -> Result<(), StateError> {
        self.check_new_vol(rec.id, &rec.name)?;
        self.check_new_node(rec.node)?;
        if rec.kind != VolumeKind::Lun {
            return bad("create makes LUNs only");
        }
        let len = self.check_size(rec.size, rec.block_size)?;
        self.nodes.insert(
            rec.node,
            Node {
                parent: None,
                children: Vec::new(),
                frozen: false,
                vol: Some(rec.id),
                map: ChunkMap::new(len),
                owned: 0,
                tombs: 0,
                mapped: 0,
            },
        );
        self.names.insert(rec.name.clone(), rec.id);
        self.vols.insert(rec.id, rec.clone());
        self.bump_ids(rec.id, rec.node);
        self.refresh_reserved();
        Ok(())
    }

    fn writable_node(&self, node: u32) -> Result<&Node, StateError> {
        let n = self.node(node)?;
        if n.frozen || n.vol.is_none() || !n.children.is_empty() {
            return bad(format!("node {node} is not a writable volume's"));
        }
        Ok(n)
    }

    fn map(
        &mut self,
        node: u32,
        x0: u64,
        phys0: u32,
        count: u64,
        mode: Mode,
    ) -> Result<(), StateError> {
        let n = self.writable_node(node)?;
        if count == 0 || x0.checked_add(count).is_none_or(|e| e > n.map.len()) {
            return bad(format!(
                "map of {count} chunks at {x0} is outside node {node}"
            ));
        }
        let pend = u64::from(phys0) + count;
        if pend > self.layout.data_chunks {
            return bad(format!(
                "map to chunks {phys0}+{count} is outside the data area"
            ));
        }
        for i in 0..count {
            let p = u64::from(phys0) + i;
            let in_use = self.used.get(p);
            let ok = match mode {
                // Allocated for this write and not yet owned by anyone.
                Mode::Live => in_use,
                Mode::Replay => !in_use,
            };
            if !ok {
                return bad(format!("chunk {p} mapped by node {node} is already in use"));
            }
        }
        for i in 0..count {
            let x = x0 + i;
            let phys = phys0 + i as u32;
            if mode == Mode::Replay {
                self.used.set(u64::from(phys), true);
                self.used_count += 1;
            }
            let (old, pv) = {
                let n = &self.nodes[&node];
                (n.map.get(x), self.parent_val(n, x))
            };
            let parent = self.nodes[&node].parent;
            {
                let n = self.node_mut(node);
                n.map.set(x, phys + 1);
                n.owned += 1;
                if old == 0 {
                    n.mapped += 1;
                    if pv != 0 {
                        n.tombs -= 1;
                    }
                }
            }
            self.owned_total += 1;
            if old != 0 {
                if old != pv {
                    self.node_mut(node).owned -= 1;
                    self.free_chunk(old - 1, mode);
                } else if let Some(p) = parent {
                    self.reclaim_check(p, x, old, mode);
                }
            } else if pv != 0 {
                self.tombs_total -= 1;
            }
        }
        if self.nodes[&node]
            .vol
            .is_some_and(|v| self.vols.get(&v).is_some_and(|r| r.provisioning.is_thick()))
        {
            self.refresh_reserved();
        }
        Ok(())
    }

    fn unmap(
        &mut self,
        node: u32,
        x0: u64,
        count: u64,
        keep_owned: bool,
        mode: Mode,
    ) -> Result<(), StateError> {
        let n = self.writable_node(node)?;
        if x0.checked_add(count).is_none_or(|e| e > n.map.len()) {
            return bad(format!(
                "unmap of {count} chunks at {x0} is outside node {node}"
            ));
        }
        let mut changes = Vec::new();
        n.map.for_each_mapped(x0, x0 + count, |x, v| {
            let pv = self.parent_val(n, x);
            if !(keep_owned && v != pv) {
                changes.push((x, v, pv));
            }
        });
        let parent = n.parent;
        for (x, v, pv) in changes {
            {
                let n = self.node_mut(node);
                n.map.set(x, 0);
                n.mapped -= 1;
                if pv != 0 {
                    n.tombs += 1;
                }
            }
            if pv != 0 {
                self.tombs_total += 1;
            }
            if v != pv {
                self.node_mut(node).owned -= 1;
                self.free_chunk(v - 1, mode);
            } else if let Some(p) = parent {
                self.reclaim_check(p, x, v, mode);
            }
        }
        self.refresh_reserved();
        Ok(())
    }

    /// True when a volume at or below `node` (excluding `node` itself) reads `v` at `x`.
    fn visible_below(&self, node: u32, x: u64, v: u32) -> bool {
        let mut stack: Vec<u32> = self
            .nodes
            .get(&node)
            .map_or(Vec::new(), |n| n.children.clone());
        while let Some(c) = stack.pop() {
            let Some(cn) = self.nodes.get(&c) else {
                continue;
            };
            if cn.map.get(x) != v {
                continue;
            }
            if cn.vol.is_some() {
                return true;
            }
            stack.extend(cn.children.iter().copied());
        }
        false
    }

    /// `v` at `x` was just dropped by a descendant of `start` (inclusive): if the node
    /// owning it is hidden and no volume sees it any more, reclaim it (and so on up).
    fn reclaim_check(&mut self, start: u32, x: u64, v: u32, mode: Mode) {
        let mut owner = start;
        loop {
            let Some(n) = self.nodes.get(&owner) else {
                return;
            };
            if n.map.get(x) != v {
                return;
            }
            match n.parent {
                Some(p) if self.val(p, x) == v => owner = p,
                _ => break,
            }
        }
        let Some(n) = self.nodes.get(&owner) else {
            return;
        };
        if n.vol.is_some() || self.visible_below(owner, x, v) {
            return;
        }
        self.reclaim(owner, x, mode);
    }

    /// Drops the dead entry at `x` that hidden `node` owns, from it and from every
    /// (hidden) descendant that inherited it without any volume reading it.
    fn reclaim(&mut self, node: u32, x: u64, mode: Mode) {
        let (v, pv, parent) = {
            let n = &self.nodes[&node];
            (n.map.get(x), self.parent_val(n, x), n.parent)
        };
        if v == 0 || v == pv {
            return;
        }
        let mut stack = vec![node];
        while let Some(d) = stack.pop() {
            let children = self
                .nodes
                .get(&d)
                .map_or(Vec::new(), |n| n.children.clone());
            for c in children {
                let Some(cn) = self.nodes.get(&c) else {
                    continue;
                };
                let cv = cn.map.get(x);
                if cv == v {
                    stack.push(c);
                } else if cv == 0 && x < cn.map.len() {
                    // Was a tombstone against `v`; against a hole it is nothing.
                    self.node_mut(c).tombs -= 1;
                    self.tombs_total -= 1;
                }
            }
            let n = self.node_mut(d);
            n.map.set(x, 0);
            n.mapped -= 1;
        }
        {
            let n = self.node_mut(node);
            n.owned -= 1;
            if pv != 0 {
                n.tombs += 1;
            }
        }
        if pv != 0 {
            self.tombs_total += 1;
        }
        self.free_chunk(v - 1, mode);
        if pv != 0 {
            if let Some(p) = parent {
                self.reclaim_check(p, x, pv, mode);
            }
        }
    }

    /// Recomputes a node's counters from its map and its parent's.
    fn recount(&mut self, node: u32) {
        let Some(n) = self.nodes.get(&node) else {
            return;
        };
        let parent = n.parent.and_then(|p| self.nodes.get(&p));
        let (mut owned, mut tombs) = (0u64, 0u64);
        let len = n.map.len();
        n.map.for_each_diff(parent.map(|p| &p.map), |x, mine, _| {
            if x < len {
                if mine == 0 {
                    tombs += 1;
                } else {
                    owned += 1;
                }
            }
        });
        let mapped = n.map.count_mapped();
        let n = self.node_mut(node);
        let (o, t) = (n.owned, n.tombs);
        n.owned = owned;
        n.tombs = tombs;
        n.mapped = mapped;
        self.owned_total = self.owned_total + owned - o;
        self.tombs_total = self.tombs_total + tombs - t;
    }

    /// Chunks `node` owns that no child reads: what deleting it frees (for a writable
    /// volume, everything it owns).
    pub fn exclusive(&self, node: u32) -> u64 {
        let Some(n) = self.nodes.get(&node) else {
            return 0;
        };
        if n.children.is_empty() {
            return n.owned;
        }
        self.owned_entries(node)
            .into_iter()
            .filter(|&(x, v)| n.children.iter().all(|c| self.val(*c, x) != v))
            .count() as u64
    }

    /// The chunks `node` owns, as (x, value) pairs.
    fn owned_entries(&self, node: u32) -> Vec<(u64, u32)> {
        let Some(n) = self.nodes.get(&node) else {
            return Vec::new();
        };
        let parent = n.parent.and_then(|p| self.nodes.get(&p));
        let mut out = Vec::new();
        let len = n.map.len();
        n.map.for_each_diff(parent.map(|p| &p.map), |x, mine, _| {
            if x < len && mine != 0 {
                out.push((x, mine));
            }
        });
        out
    }

    fn new_child(&mut self, parent: u32, id: u32, vol: Option<u32>) {
        let (map, mapped) = {
            let p = &self.nodes[&parent];
            (p.map.clone(), p.mapped)
        };
        self.nodes.insert(
            id,
            Node {
                parent: Some(parent),
                children: Vec::new(),
                frozen: false,
                vol,
                map,
                owned: 0,
                tombs: 0,
                mapped,
            },
        );
        self.node_mut(parent).children.push(id);
    }

    fn snapshot(&mut self, src: u32, new_node: u32, snap: &NewVolume) -> Result<(), StateError> {
        let s = self.vol(src)?.clone();
        if !s.kind.writable() {
            return bad("only writable volumes are snapshotted this way");
        }
        self.writable_node(s.node)?;
        self.check_new_vol(snap.vol, &snap.name)?;
        self.check_new_node(new_node)?;
        let h = s.node;
        {
            let n = self.node_mut(h);
            n.frozen = true;
            n.vol = Some(snap.vol);
        }
        self.new_child(h, new_node, Some(src));
        if let Some(v) = self.vols.get_mut(&src) {
            v.node = new_node;
        }
        self.vols.insert(
            snap.vol,
            VolumeRecord {
                id: snap.vol,
                node: h,
                kind: VolumeKind::Snapshot,
                provisioning: Provisioning::Thin,
                block_size: s.block_size,
                size: s.size,
                uuid: snap.uuid,
                created: snap.created,
                origin: src,
                name: snap.name.clone(),
            },
        );
        self.names.insert(snap.name.clone(), snap.vol);
        self.bump_ids(snap.vol, new_node);
        self.refresh_reserved();
        Ok(())
    }

    fn clone_op(
        &mut self,
        src: u32,
        src_node: u32,
        node: u32,
        c: &NewVolume,
    ) -> Result<(), StateError> {
        let s = self.vol(src)?.clone();
        self.check_new_vol(c.vol, &c.name)?;
        self.check_new_node(node)?;
        let base = if s.kind.writable() {
            self.writable_node(s.node)?;
            self.check_new_node(src_node)?;
            if src_node == node {
                return bad("clone needs two distinct new nodes");
            }
            let h = s.node;
            {
                let n = self.node_mut(h);
                n.frozen = true;
                n.vol = None;
            }
            self.new_child(h, src_node, Some(src));
            if let Some(v) = self.vols.get_mut(&src) {
                v.node = src_node;
            }
            h
        } else {
            if src_node != NONE {
                return bad("a clone of a snapshot moves no source node");
            }
            s.node
        };
        self.new_child(base, node, Some(c.vol));
        self.vols.insert(
            c.vol,
            VolumeRecord {
                id: c.vol,
                node,
                kind: VolumeKind::Clone,
                provisioning: Provisioning::Thin,
                block_size: s.block_size,
                size: s.size,
                uuid: c.uuid,
                created: c.created,
                origin: src,
                name: c.name.clone(),
            },
        );
        self.names.insert(c.name.clone(), c.vol);
        self.bump_ids(c.vol, node.max(if src_node == NONE { 0 } else { src_node }));
        self.refresh_reserved();
        Ok(())
    }

    fn delete(&mut self, vol: u32, mode: Mode) -> Result<(), StateError> {
        let v = self.vol(vol)?.clone();
        self.vols.remove(&vol);
        self.names.remove(&v.name);
        if let Some(n) = self.nodes.get_mut(&v.node) {
            n.vol = None;
        }
        self.gc(v.node, mode);
        self.refresh_reserved();
        Ok(())
    }

    /// Normalises hidden nodes from `start` upwards: drops childless ones, merges
    /// single-child ones, reclaims dead entries of the rest.
    fn gc(&mut self, start: u32, mode: Mode) {
        let mut work = vec![start];
        while let Some(id) = work.pop() {
            let Some(n) = self.nodes.get(&id) else {
                continue;
            };
            if n.vol.is_some() {
                continue;
            }
            match n.children.len() {
                0 => {
                    let parent = n.parent;
                    for (_, v) in self.owned_entries(id) {
                        self.free_chunk(v - 1, mode);
                    }
                    if let Some(n) = self.nodes.remove(&id) {
                        self.tombs_total -= n.tombs;
                    }
                    if let Some(p) = parent {
                        self.node_mut(p).children.retain(|&c| c != id);
                        work.push(p);
                    }
                }
                1 => {
                    let child = n.children[0];
                    let parent = n.parent;
                    for (x, v) in self.owned_entries(id) {
                        if self.val(child, x) != v {
                            self.free_chunk(v - 1, mode);
                        }
                    }
                    if let Some(n) = self.nodes.remove(&id) {
                        // Counters of the merged pair are recomputed below.
                        self.tombs_total -= n.tombs;
                    }
                    self.node_mut(child).parent = parent;
                    if let Some(p) = parent {
                        for c in &mut self.node_mut(p).children {
                            if *c == id {
                                *c = child;
                            }
                        }
                    }
                    // Entries of `id` that `child` keeps now count as the child's.
                    let before = self.nodes.get(&child).map_or(0, |c| c.owned);
                    self.recount(child);
                    // owned_total: the freed entries left through free_chunk; the moved
                    // ones were counted for `id` and now are for `child`.
                    let after = self.nodes.get(&child).map_or(0, |c| c.owned);
                    self.owned_total -= after - before;
                    work.push(child);
                    // Entries of hidden ancestors that only the deleted volume read are
                    // dead now too.
                    if let Some(p) = parent {
                        work.push(p);
                    }
                }
                _ => {
                    let parent = n.parent;
                    for (x, v) in self.owned_entries(id) {
                        if self.val(id, x) == v && !self.visible_below(id, x, v) {
                            self.reclaim(id, x, mode);
                        }
                    }
                    if let Some(p) = parent {
                        work.push(p);
                    }
                }
            }
        }
    }

    fn resize(&mut self, vol: u32, size: u64, mode: Mode) -> Result<(), StateError> {
        let v = self.vol(vol)?.clone();
        if !v.kind.writable() {
            return bad("snapshots cannot be resized");
        }
        let node = v.node;
        let n = self.writable_node(node)?;
        let len = self.check_size(size, v.block_size)?;
        let parent = n.parent;
        if len < n.map.len() {
            let mut dropped = Vec::new();
            n.map.for_each_mapped(len, u64::MAX, |x, val| {
                dropped.push((x, val, self.parent_val(n, x)));
            });
            // Truncate first, so that reclaiming what only this volume read sees the
            // volume's final shape.
            self.node_mut(node).map.resize(len);
            for (x, val, pv) in dropped {
                if val != pv {
                    self.free_chunk(val - 1, mode);
                    self.owned_total += 1; // recount below subtracts it again
                } else if let Some(p) = parent {
                    self.reclaim_check(p, x, val, mode);
                }
            }
        }
        self.node_mut(node).map.resize(len);
        self.recount(node);
        if let Some(v) = self.vols.get_mut(&vol) {
            v.size = size;
        }
        self.refresh_reserved();
        Ok(())
    }

    /// The checkpoint body of this state.
    pub fn to_body(&self) -> CheckpointBody {
        let mut nodes = Vec::with_capacity(self.nodes.len());
        let mut roots: Vec<u32> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.parent.is_none())
            .map(|(&id, _)| id)
            .collect();
        roots.sort_unstable();
        let mut stack: Vec<u32> = roots.into_iter().rev().collect();
        while let Some(id) = stack.pop() {
            let Some(n) = self.nodes.get(&id) else {
                continue;
            };
            let parent = n.parent.and_then(|p| self.nodes.get(&p));
            let mut runs: Vec<Run> = Vec::new();
            let len = n.map.len();
            n.map.for_each_diff(parent.map(|p| &p.map), |x, mine, _| {
                if x >= len {
                    return;
                }
                let x = x as u32;
                let phys = if mine == 0 { NONE } else { mine - 1 };
                if let Some(r) = runs.last_mut() {
                    let next_phys = if phys == NONE {
                        NONE
                    } else {
                        r.phys.wrapping_add(r.count)
                    };
                    if r.x + r.count == x && (r.phys == NONE) == (phys == NONE) && next_phys == phys
                    {
                        r.count += 1;
                        return;
                    }
                }
                runs.push(Run { x, phys, count: 1 });
            });
            nodes.push(NodeRecord {
                id,
                parent: n.parent.unwrap_or(NONE),
                frozen: n.frozen,
                len,
                runs,
            });
            let mut kids = n.children.clone();
            kids.sort_unstable();
            stack.extend(kids.into_iter().rev());
        }
        CheckpointBody {
            thresholds: self.thresholds,
            next_vol: self.next_vol,
            next_node: self.next_node,
            volumes: self.vols.values().cloned().collect(),
            nodes,
        }
    }

    /// Builds the state a checkpoint body describes. In strict mode any inconsistency is
    /// an error; in lenient mode (check and repair) what is wrong is dropped and listed.
    pub fn from_body(
        layout: Layout,
        body: &CheckpointBody,
        lenient: bool,
    ) -> Result<(State, Vec<String>), StateError> {
        let mut st = State::new(layout, body.thresholds);
        let mut problems = Vec::new();
        let mut problem = |msg: String| -> Result<(), StateError> {
            if lenient {
                problems.push(msg);
                Ok(())
            } else {
                Err(StateError(msg))
            }
        };
        for nr in &body.nodes {
            if nr.id == NONE || st.nodes.contains_key(&nr.id) {
                problem(format!("node {} appears twice", nr.id))?;
                continue;
            }
            if nr.len > u64::from(u32::MAX) {
                problem(format!("node {} is {} chunks long", nr.id, nr.len))?;
                continue;
            }
            let parent = if nr.parent == NONE {
                None
            } else if st.nodes.contains_key(&nr.parent) {
                Some(nr.parent)
            } else {
                problem(format!(
                    "node {} has a missing parent {}; its inherited data is lost",
                    nr.id, nr.parent
                ))?;
                None
            };
            let mut map = match parent {
                Some(p) => st.nodes[&p].map.clone(),
                None => ChunkMap::new(nr.len),
            };
            map.resize(nr.len);
            for r in &nr.runs {
                let end = u64::from(r.x) + u64::from(r.count);
                if r.count == 0 || end > nr.len {
                    problem(format!("node {}: run {r:?} is outside its map", nr.id))?;
                    continue;
                }
                if r.phys == NONE {
                    for i in 0..r.count {
                        map.set(u64::from(r.x + i), 0);
                    }
                    continue;
                }
                for i in 0..r.count {
                    let p = u64::from(r.phys) + u64::from(i);
                    if p >= layout.data_chunks {
                        problem(format!(
                            "node {}: chunk {p} is outside the data area",
                            nr.id
                        ))?;
                        continue;
                    }
                    if st.used.get(p) {
                        problem(format!("node {}: chunk {p} is owned twice", nr.id))?;
                        continue;
                    }
                    st.used.set(p, true);
                    st.used_count += 1;
                    map.set(u64::from(r.x + i), p as u32 + 1);
                }
            }
            st.nodes.insert(
                nr.id,
                Node {
                    parent,
                    children: Vec::new(),
                    frozen: nr.frozen,
                    vol: None,
                    map,
                    owned: 0,
                    tombs: 0,
                    mapped: 0,
                },
            );
            if let Some(p) = parent {
                st.node_mut(p).children.push(nr.id);
            }
            st.next_node = st.next_node.max(nr.id.saturating_add(1));
        }
        for v in &body.volumes {
            let ok = (|| {
                if v.id == NONE || st.vols.contains_key(&v.id) {
                    return Err(format!("volume {} appears twice", v.id));
                }
                check_name(&v.name)?;
                if st.names.contains_key(&v.name) {
                    return Err(format!("volume name {:?} appears twice", v.name));
                }
                let Some(n) = st.nodes.get(&v.node) else {
                    return Err(format!("volume {:?} has no node {}", v.name, v.node));
                };
                if n.vol.is_some() {
                    return Err(format!("volume {:?} shares node {}", v.name, v.node));
                }
                if v.kind.writable() == n.frozen || (v.kind.writable() && !n.children.is_empty()) {
                    return Err(format!(
                        "volume {:?} and its node disagree on writability",
                        v.name
                    ));
                }
                let len = st.check_size(v.size, v.block_size).map_err(|e| e.0)?;
                if len != n.map.len() {
                    return Err(format!("volume {:?} size disagrees with its map", v.name));
                }
                Ok(())
            })();
            match ok {
                Ok(()) => {
                    st.node_mut(v.node).vol = Some(v.id);
                    st.names.insert(v.name.clone(), v.id);
                    st.vols.insert(v.id, v.clone());
                    st.next_vol = st.next_vol.max(v.id.saturating_add(1));
                }
                Err(e) => problem(e)?,
            }
        }
        // Writable nodes must be leaves; frozen nodes keep their children.
        let ids: Vec<u32> = st.nodes.keys().copied().collect();
        for id in &ids {
            let n = &st.nodes[id];
            if !n.frozen && !n.children.is_empty() {
                problem(format!("node {id} has children but is not frozen"))?;
                st.node_mut(*id).frozen = true;
            }
        }
        for id in &ids {
            st.recount(*id);
        }
        st.next_vol = st.next_vol.max(body.next_vol);
        st.next_node = st.next_node.max(body.next_node);
        // Normalise: hidden nodes with fewer than two children, dead entries.
        let hidden: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|id| st.nodes.get(id).is_some_and(|n| n.vol.is_none()))
            .collect();
        let before = st.used_count;
        for id in hidden {
            st.gc(id, Mode::Replay);
        }
        if st.used_count != before {
            problem(format!(
                "{} chunks were held by deleted volumes nobody reads (reclaimed)",
                before - st.used_count
            ))?;
        }
        st.refresh_reserved();
        Ok((st, problems))
    }

    /// Checks every invariant from scratch; returns what is wrong (empty when sound).
    /// `in_flight` chunks are allocated for writes not yet mapped.
    pub fn verify(&self, in_flight: u64) -> Vec<String> {
        let mut out = Vec::new();
        let mut owners: HashMap<u32, u32> = HashMap::new();
        let (mut owned_total, mut tombs_total) = (0u64, 0u64);
        for (&id, n) in &self.nodes {
            let parent = n.parent.and_then(|p| self.nodes.get(&p));
            if n.parent.is_some() && parent.is_none() {
                out.push(format!("node {id}: missing parent"));
            }
            if let Some(p) = parent {
                if !p.children.contains(&id) {
                    out.push(format!("node {id}: parent does not list it"));
                }
                if !p.frozen {
                    out.push(format!("node {id}: parent is not frozen"));
                }
            }
            let (mut owned, mut tombs) = (0, 0);
            let len = n.map.len();
            n.map.for_each_diff(parent.map(|p| &p.map), |x, mine, _| {
                if x >= len {
                    return;
                }
                if mine == 0 {
                    tombs += 1;
                } else {
                    owned += 1;
                    if let Some(o) = owners.insert(mine - 1, id) {
                        out.push(format!("chunk {} owned by nodes {o} and {id}", mine - 1));
                    }
                    if u64::from(mine - 1) >= self.layout.data_chunks {
                        out.push(format!("node {id}: chunk {} out of range", mine - 1));
                    }
                }
            });
            if owned != n.owned || tombs != n.tombs || n.map.count_mapped() != n.mapped {
                out.push(format!(
                    "node {id}: counters owned {}/{owned} tombs {}/{tombs} mapped {}",
                    n.owned, n.tombs, n.mapped
                ));
            }
            owned_total += owned;
            tombs_total += tombs;
            match n.vol {
                Some(v) => match self.vols.get(&v) {
                    Some(r) if r.node == id => {}
                    _ => out.push(format!("node {id}: volume {v} does not point back")),
                },
                None => {
                    if n.children.len() < 2 {
                        out.push(format!(
                            "hidden node {id} has {} children (orphan)",
                            n.children.len()
                        ));
                    }
                    n.map.for_each_diff(parent.map(|p| &p.map), |x, mine, _| {
                        if x < len && mine != 0 && !self.visible_below(id, x, mine) {
                            out.push(format!("hidden node {id}: dead chunk {} at {x}", mine - 1));
                        }
                    });
                }
            }
        }
        if owned_total != self.owned_total || tombs_total != self.tombs_total {
            out.push(format!(
                "totals: owned {}/{owned_total} tombs {}/{tombs_total}",
                self.owned_total, self.tombs_total
            ));
        }
        let pending = self.pending_free.len() as u64;
        if self.used_count != owned_total + pending + in_flight {
            out.push(format!(
                "used chunks {} != owned {owned_total} + pending {pending} + in flight {in_flight}",
                self.used_count
            ));
        }
        for p in owners.keys() {
            if !self.used.get(u64::from(*p)) {
                out.push(format!("owned chunk {p} is marked free"));
            }
        }
        for (name, id) in &self.names {
            if self.vols.get(id).is_none_or(|v| &v.name != name) {
                out.push(format!("name {name:?} points to the wrong volume"));
            }
        }
        for (id, v) in &self.vols {
            match self.nodes.get(&v.node) {
                Some(n) if n.vol == Some(*id) => {}
                _ => out.push(format!("volume {id} points to a node that is not its")),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st() -> State {
        State::new(
            Layout::compute(64 << 20, 8192, 64).unwrap(),
            Thresholds::default(),
        )
    }

    fn lun(id: u32, node: u32, name: &str, chunks: u64) -> Op {
        Op::Create(VolumeRecord {
            id,
            node,
            kind: VolumeKind::Lun,
            provisioning: Provisioning::Thin,
            block_size: 4096,
            size: chunks * 8192,
            uuid: [id as u8; 16],
            created: 0,
            origin: NONE,
            name: name.into(),
        })
    }

    fn nv(vol: u32, name: &str) -> NewVolume {
        NewVolume {
            vol,
            name: name.into(),
            uuid: [vol as u8; 16],
            created: 0,
        }
    }

    fn write(s: &mut State, vol: u32, x: u32) {
        let node = s.vols[&vol].node;
        let p = s.alloc(1, None).unwrap()[0];
        s.apply(
            &Op::Map {
                node,
                x,
                phys: p,
                count: 1,
            },
            Mode::Live,
        )
        .unwrap();
    }

    fn settle(s: &mut State) {
        let p = std::mem::take(&mut s.pending_free);
        s.release(&p);
        assert_eq!(s.verify(0), Vec::<String>::new());
    }

    #[test]
    fn delete_in_any_order_returns_everything() {
        for order in [[1u32, 2, 3], [2, 1, 3], [3, 2, 1], [1, 3, 2]] {
            let mut s = st();
            s.apply(&lun(1, 1, "a", 16), Mode::Live).unwrap();
            for x in 0..8 {
                write(&mut s, 1, x);
            }
            s.apply(
                &Op::Snapshot {
                    src: 1,
                    new_node: 2,
                    snap: nv(2, "a@1"),
                },
                Mode::Live,
            )
            .unwrap();
            for x in 4..12 {
                write(&mut s, 1, x);
            }
            s.apply(
                &Op::Clone {
                    src: 2,
                    src_node: NONE,
                    node: 3,
                    clone: nv(3, "c"),
                },
                Mode::Live,
            )
            .unwrap();
            for x in 0..2 {
                write(&mut s, 3, x);
            }
            settle(&mut s);
            assert_eq!(s.used_count, 8 + 8 + 2);
            for v in order {
                s.apply(&Op::Delete { vol: v }, Mode::Live).unwrap();
                settle(&mut s);
            }
            assert_eq!(s.used_count, 0, "order {order:?}");
            assert!(s.nodes.is_empty());
        }
    }

    #[test]
    fn overwrite_in_both_children_reclaims_hidden_chunk() {
        let mut s = st();
        s.apply(&lun(1, 1, "a", 16), Mode::Live).unwrap();
        write(&mut s, 1, 0);
        // Clone of a writable LUN: hidden node 1 with children 2 (a) and 3 (c).
        s.apply(
            &Op::Clone {
                src: 1,
                src_node: 2,
                node: 3,
                clone: nv(2, "c"),
            },
            Mode::Live,
        )
        .unwrap();
        settle(&mut s);
        assert_eq!(s.used_count, 1);
        write(&mut s, 1, 0);
        settle(&mut s);
        assert_eq!(s.used_count, 2);
        write(&mut s, 2, 0);
        settle(&mut s);
        // Nobody reads the original chunk any more.
        assert_eq!(s.used_count, 2);
        s.apply(
            &Op::Unmap {
                node: s.vols[&1].node,
                x: 0,
                count: 16,
            },
            Mode::Live,
        )
        .unwrap();
        settle(&mut s);
        assert_eq!(s.used_count, 1);
    }

    /// Regression (found by the model test): deleting a snapshot that sat between a
    /// hidden node and a LUN left the hidden node's chunk, which only the snapshot
    /// read, allocated forever: GC looked at the deleted node's own chunks only.
    #[test]
    fn deleting_a_middle_snapshot_reclaims_hidden_ancestor_chunks() {
        let mut s = st();
        s.apply(&lun(1, 1, "a", 1), Mode::Live).unwrap();
        write(&mut s, 1, 0);
        s.apply(
            &Op::Clone {
                src: 1,
                src_node: 2,
                node: 3,
                clone: nv(2, "c"),
            },
            Mode::Live,
        )
        .unwrap();
        write(&mut s, 2, 0); // the clone copies-on-write
        s.apply(
            &Op::Snapshot {
                src: 1,
                new_node: 4,
                snap: nv(3, "a@1"),
            },
            Mode::Live,
        )
        .unwrap();
        write(&mut s, 1, 0); // the LUN too: only the snapshot reads chunk 0 now
        settle(&mut s);
        assert_eq!(s.used_count, 3);
        s.apply(&Op::Delete { vol: 3 }, Mode::Live).unwrap();
        settle(&mut s);
        assert_eq!(s.used_count, 2);
    }

    #[test]
    fn checkpoint_roundtrip_preserves_state() {
        let mut s = st();
        s.apply(&lun(1, 1, "a", 40), Mode::Live).unwrap();
        for x in [0, 1, 2, 7, 39] {
            write(&mut s, 1, x);
        }
        s.apply(
            &Op::Snapshot {
                src: 1,
                new_node: 2,
                snap: nv(2, "s"),
            },
            Mode::Live,
        )
        .unwrap();
        write(&mut s, 1, 1);
        s.apply(
            &Op::Unmap {
                node: 2,
                x: 7,
                count: 1,
            },
            Mode::Live,
        )
        .unwrap();
        s.apply(
            &Op::Clone {
                src: 1,
                src_node: 3,
                node: 4,
                clone: nv(3, "c"),
            },
            Mode::Live,
        )
        .unwrap();
        settle(&mut s);
        let body = s.to_body();
        let (t, problems) = State::from_body(s.layout, &body, false).unwrap();
        assert!(problems.is_empty());
        assert_eq!(t.verify(0), Vec::<String>::new());
        for (id, v) in &s.vols {
            let (a, b) = (&s.nodes[&v.node].map, &t.nodes[&t.vols[id].node].map);
            for x in 0..40 {
                assert_eq!(a.get(x), b.get(x), "vol {id} x {x}");
            }
        }
        assert_eq!(t.used_count, s.used_count);
        assert_eq!(t.to_body(), body);
    }
}
