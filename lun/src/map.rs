//! [`ChunkMap`]: a volume's virtual-chunk to physical-chunk map in memory.
//!
//! A three-level radix: a vector of mids, each of 512 leaves of 1024 entries (4 KiB).
//! Mids and leaves are reference-counted and copied on write, so a snapshot or clone
//! copies only the top vector and shares every leaf with its parent until one of them
//! writes into it. A lookup is three indexed loads; a 1 TiB volume of 64 KiB chunks
//! fully mapped costs 64 MiB, and its snapshot nothing until the two diverge.
//!
//! Entries are `phys + 1`, with 0 for a hole, so a fresh (or absent) leaf reads as all
//! holes and never needs initialising.

use std::sync::Arc;

const LEAF_BITS: u32 = 10;
const MID_BITS: u32 = 9;
/// Entries per leaf.
pub const LEAF: u64 = 1 << LEAF_BITS;
const MID: u64 = 1 << MID_BITS;
const MID_SPAN: u64 = LEAF * MID;

type Leaf = [u32; LEAF as usize];

#[derive(Clone)]
struct Mid {
    leaves: [Option<Arc<Leaf>>; MID as usize],
}

impl Mid {
    fn new() -> Self {
        Mid {
            leaves: std::array::from_fn(|_| None),
        }
    }
}

/// A copy-on-write map from virtual chunk to `phys + 1` (0: hole). See the
/// [module docs](self).
#[derive(Clone, Default)]
pub struct ChunkMap {
    len: u64,
    mids: Vec<Option<Arc<Mid>>>,
}

impl std::fmt::Debug for ChunkMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkMap").field("len", &self.len).finish()
    }
}

fn split(x: u64) -> (usize, usize, usize) {
    (
        (x / MID_SPAN) as usize,
        ((x / LEAF) % MID) as usize,
        (x % LEAF) as usize,
    )
}

impl ChunkMap {
    /// An all-hole map of `len` chunks.
    pub fn new(len: u64) -> Self {
        ChunkMap {
            len,
            mids: vec![None; len.div_ceil(MID_SPAN) as usize],
        }
    }

    /// Length in chunks.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a map of no chunks.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entry for chunk `x` (0 when `x` is a hole or past the end).
    #[inline]
    pub fn get(&self, x: u64) -> u32 {
        if x >= self.len {
            return 0;
        }
        let (m, l, e) = split(x);
        match &self.mids[m] {
            Some(mid) => match &mid.leaves[l] {
                Some(leaf) => leaf[e],
                None => 0,
            },
            None => 0,
        }
    }

    /// Sets chunk `x` (which must be inside the map) to `v`.
    pub fn set(&mut self, x: u64, v: u32) {
        debug_assert!(x < self.len);
        if x >= self.len {
            return;
        }
        let (m, l, e) = split(x);
        if v == 0 {
            // Clearing never creates leaves.
            let Some(mid) = &self.mids[m] else { return };
            let Some(leaf) = &mid.leaves[l] else { return };
            if leaf[e] == 0 {
                return;
            }
        }
        let mid = Arc::make_mut(self.mids[m].get_or_insert_with(|| Arc::new(Mid::new())));
        let leaf =
            Arc::make_mut(mid.leaves[l].get_or_insert_with(|| Arc::new([0u32; LEAF as usize])));
        leaf[e] = v;
    }

    /// Changes the length; entries past a shorter length are dropped, and a longer map
    /// reads holes in its new part.
    pub fn resize(&mut self, len: u64) {
        if len < self.len {
            // Clear the tail of the last partial leaf, then drop what lies beyond.
            let end_leaf = len.div_ceil(LEAF) * LEAF;
            for x in len..end_leaf.min(self.len) {
                self.set(x, 0);
            }
            let (m, l, _) = split(end_leaf);
            if end_leaf < self.len {
                if let Some(Some(mid)) = self.mids.get_mut(m) {
                    let mid = Arc::make_mut(mid);
                    for slot in &mut mid.leaves[l..] {
                        *slot = None;
                    }
                }
            }
        }
        self.len = len;
        self.mids.resize(len.div_ceil(MID_SPAN) as usize, None);
        // A mid that is now wholly past the end was truncated away by the resize above;
        // leaves past the end inside the last mid were cleared.
    }

    /// Calls `f(x, v)` for every non-hole entry in `[start, end)`, in order.
    pub fn for_each_mapped(&self, start: u64, end: u64, mut f: impl FnMut(u64, u32)) {
        let end = end.min(self.len);
        let mut x = start;
        while x < end {
            let (m, l, e) = split(x);
            let leaf_start = x - e as u64;
            let next = (leaf_start + LEAF).min(end);
            let Some(mid) = &self.mids[m] else {
                x = ((m as u64) + 1) * MID_SPAN;
                continue;
            };
            if let Some(leaf) = &mid.leaves[l] {
                for y in x..next {
                    let v = leaf[(y - leaf_start) as usize];
                    if v != 0 {
                        f(y, v);
                    }
                }
            }
            x = next;
        }
    }

    /// Calls `f(x, mine, theirs)` for every chunk below `max(len)` where this map and
    /// `other` (None: all holes) differ, skipping shared leaves without reading them.
    pub fn for_each_diff(&self, other: Option<&ChunkMap>, mut f: impl FnMut(u64, u32, u32)) {
        let empty = ChunkMap::default();
        let other = other.unwrap_or(&empty);
        let len = self.len.max(other.len);
        let nmids = len.div_ceil(MID_SPAN) as usize;
        for m in 0..nmids {
            let a = self.mids.get(m).and_then(|x| x.as_ref());
            let b = other.mids.get(m).and_then(|x| x.as_ref());
            match (a, b) {
                (None, None) => continue,
                (Some(a), Some(b)) if Arc::ptr_eq(a, b) => continue,
                _ => {}
            }
            for l in 0..MID as usize {
                let la = a.and_then(|mid| mid.leaves[l].as_ref());
                let lb = b.and_then(|mid| mid.leaves[l].as_ref());
                let base = m as u64 * MID_SPAN + l as u64 * LEAF;
                match (la, lb) {
                    (None, None) => {}
                    (Some(x), Some(y)) if Arc::ptr_eq(x, y) => {}
                    _ => {
                        for e in 0..LEAF as usize {
                            let va = la.map_or(0, |v| v[e]);
                            let vb = lb.map_or(0, |v| v[e]);
                            if va != vb {
                                let x = base + e as u64;
                                // Entries past a map's end read as holes.
                                let va = if x < self.len { va } else { 0 };
                                let vb = if x < other.len { vb } else { 0 };
                                if va != vb {
                                    f(x, va, vb);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Number of non-hole entries.
    pub fn count_mapped(&self) -> u64 {
        let mut n = 0;
        self.for_each_mapped(0, self.len, |_, _| n += 1);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn holes_set_get_share() {
        let mut a = ChunkMap::new(3 * MID_SPAN + 5);
        assert_eq!(a.get(0), 0);
        assert_eq!(a.get(a.len() - 1), 0);
        a.set(7, 9);
        a.set(MID_SPAN * 2 + 3, 11);
        let mut b = a.clone();
        b.set(7, 10);
        assert_eq!(a.get(7), 9);
        assert_eq!(b.get(7), 10);
        let mut diffs = Vec::new();
        b.for_each_diff(Some(&a), |x, m, t| diffs.push((x, m, t)));
        assert_eq!(diffs, vec![(7, 10, 9)]);
        let mut all = Vec::new();
        a.for_each_diff(None, |x, m, _| all.push((x, m)));
        assert_eq!(all, vec![(7, 9), (MID_SPAN * 2 + 3, 11)]);
    }

    proptest! {
        #[test]
        fn behaves_like_a_btreemap(
            ops in proptest::collection::vec((0u64..5000, 0u32..4, any::<bool>()), 1..200),
            newlen in 0u64..6000,
        ) {
            let mut m = ChunkMap::new(4000);
            let mut model = BTreeMap::new();
            let snap = m.clone();
            for (x, v, _) in &ops {
                if *x < 4000 {
                    m.set(*x, *v);
                    if *v == 0 { model.remove(x); } else { model.insert(*x, *v); }
                }
            }
            for x in 0..4000 {
                prop_assert_eq!(m.get(x), model.get(&x).copied().unwrap_or(0));
            }
            prop_assert_eq!(snap.count_mapped(), 0);
            m.resize(newlen);
            model.retain(|x, _| *x < newlen);
            let mut seen = BTreeMap::new();
            m.for_each_mapped(0, u64::MAX, |x, v| { seen.insert(x, v); });
            prop_assert_eq!(&seen, &model);
            m.resize(6000);
            let mut seen = BTreeMap::new();
            m.for_each_mapped(0, u64::MAX, |x, v| { seen.insert(x, v); });
            prop_assert_eq!(&seen, &model);
        }
    }
}
