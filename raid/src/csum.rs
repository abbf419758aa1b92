//! Per-block checksums of each member's data area, so that a scrub of RAID 1, 10 and 5
//! knows which copy (or which block of a stripe) is wrong, not only that they differ.
//!
//! Each member keeps the CRC32C of every 4 KiB block of its own data area (data or
//! parity alike) in its own checksum area: 4 bytes per block, block `b` at byte `4 b`.
//! A stored 0 means "unknown" (freshly created, or zeroed): a real CRC of 0 is stored as
//! 1, which costs one value in 2^32 of detection. Keeping a member's checksums on the
//! member itself means they travel with it, fail with it and are rebuilt with it.
//!
//! Checksum blocks are cached in memory and written back lazily: at a journal
//! checkpoint, on a clean shutdown, and when the cache grows past its bound. That is
//! safe because checksums never need to be more durable than the journal: every write
//! since the last checkpoint is replayed from the journal at assembly, and replay
//! recomputes the checksums of the blocks it writes. Without a journal an unclean
//! shutdown triggers a full resync, which recomputes them too.

use crate::superblock::BLOCK;
use basalt_blockdev::{BlockError, SharedBlockDev, WriteFlags};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Checksum blocks cached per member before a write-back.
const CACHE_BLOCKS: usize = 2048;
/// Entries per checksum block.
const PER_BLOCK: u64 = BLOCK / 4;

/// The stored form of a block's checksum (never 0, which means unknown).
pub fn block_crc(block: &[u8]) -> u32 {
    match crc32c::crc32c(block) {
        0 => 1,
        c => c,
    }
}

struct Entry {
    data: Box<[u8]>,
    dirty: bool,
}

/// The cached checksum area of one member.
pub(crate) struct Csums {
    /// Member offset of the area.
    offset: u64,
    blocks: Mutex<HashMap<u64, Entry>>,
}

impl Csums {
    pub(crate) fn new(offset: u64) -> Self {
        Csums {
            offset,
            blocks: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.blocks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn load(&self, dev: &SharedBlockDev, cb: u64) -> Result<(), BlockError> {
        if self.lock().contains_key(&cb) {
            return Ok(());
        }
        let data = dev.read(self.offset + cb * BLOCK, BLOCK as usize).await?;
        self.lock().entry(cb).or_insert_with(|| Entry {
            data: data.to_vec().into_boxed_slice(),
            dirty: false,
        });
        Ok(())
    }

    /// The stored checksums of member data blocks `first..first + n` (0 = unknown).
    pub(crate) async fn get(
        &self,
        dev: &SharedBlockDev,
        first: u64,
        n: u64,
    ) -> Result<Vec<u32>, BlockError> {
        for cb in first / PER_BLOCK..=(first + n.max(1) - 1) / PER_BLOCK {
            self.load(dev, cb).await?;
        }
        let map = self.lock();
        let mut out = Vec::with_capacity(n as usize);
        for b in first..first + n {
            let e = map.get(&(b / PER_BLOCK));
            let at = (b % PER_BLOCK * 4) as usize;
            out.push(e.map_or(0, |e| {
                u32::from_le_bytes([e.data[at], e.data[at + 1], e.data[at + 2], e.data[at + 3]])
            }));
        }
        Ok(out)
    }

    /// Stores checksums for member data blocks `first..first + crcs.len()`.
    pub(crate) async fn set(
        &self,
        dev: &SharedBlockDev,
        first: u64,
        crcs: &[u32],
    ) -> Result<(), BlockError> {
        let n = crcs.len() as u64;
        if n == 0 {
            return Ok(());
        }
        let range = first / PER_BLOCK..=(first + n - 1) / PER_BLOCK;
        let over = loop {
            for cb in range.clone() {
                self.load(dev, cb).await?;
            }
            let mut map = self.lock();
            // A concurrent write-back may have evicted a block just loaded: load again.
            if !range.clone().all(|cb| map.contains_key(&cb)) {
                continue;
            }
            for (i, c) in crcs.iter().enumerate() {
                let b = first + i as u64;
                if let Some(e) = map.get_mut(&(b / PER_BLOCK)) {
                    let at = (b % PER_BLOCK * 4) as usize;
                    e.data[at..at + 4].copy_from_slice(&c.to_le_bytes());
                    e.dirty = true;
                }
            }
            break map.len() > CACHE_BLOCKS;
        };
        if over {
            self.write_back(dev, true).await?;
        }
        Ok(())
    }

    /// Checksums of `data` (whole blocks) stored for member data blocks from `first`.
    pub(crate) async fn set_data(
        &self,
        dev: &SharedBlockDev,
        first: u64,
        data: &[u8],
    ) -> Result<(), BlockError> {
        let crcs: Vec<u32> = data.chunks(BLOCK as usize).map(block_crc).collect();
        self.set(dev, first, &crcs).await
    }

    /// Writes every dirty block; with `evict`, drops the clean ones afterwards.
    pub(crate) async fn write_back(
        &self,
        dev: &SharedBlockDev,
        evict: bool,
    ) -> Result<(), BlockError> {
        let dirty: Vec<(u64, Bytes)> = {
            let mut map = self.lock();
            map.iter_mut()
                .filter(|(_, e)| e.dirty)
                .map(|(cb, e)| {
                    e.dirty = false;
                    (*cb, Bytes::copy_from_slice(&e.data))
                })
                .collect()
        };
        let mut result = Ok(());
        for (cb, data) in dirty {
            if let Err(e) = dev
                .write(self.offset + cb * BLOCK, data, WriteFlags::default())
                .await
            {
                // Keep it dirty for the next attempt (the member is failing anyway).
                if let Some(en) = self.lock().get_mut(&cb) {
                    en.dirty = true;
                }
                result = Err(e);
                break;
            }
        }
        if evict && result.is_ok() {
            self.lock().retain(|_, e| e.dirty);
        }
        result
    }

    /// Forgets every cached block (after the area was rewritten underneath).
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }
}
