//! [`MemDev`]: a sparse in-memory block device for tests.
//!
//! Data lives in 64 KiB chunks allocated on the first write that puts a non-zero byte in
//! them, so a 1 TiB device costs nothing until it is written, and a test can make as many
//! devices as it likes. Discard and write-zeroes free whole chunks and zero the partial
//! ones at the edges, so [`MemDev::allocated_bytes`] shows whether a layer above really
//! passed its discards down.
//!
//! One `RwLock` covers all the data: reads share it, every modification takes it
//! exclusively. That makes compare-and-write trivially atomic, and it is fast enough for
//! tests (the lock is never held across an `.await`; each call is a memory copy). Writes
//! are durable on completion (there is no cache), so [`Capabilities::volatile_cache`] is
//! false; wrap the device in [`FaultDev`](crate::FaultDev) to model a volatile cache and
//! crashes.

use crate::{
    check_compare_and_write, check_range, first_difference, AlignedBuf, BlockDev, BlockError,
    Capabilities, CompareOutcome, Extent, ExtentKind, Geometry, Result, WriteFlags, ZeroFlags,
};
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Size of an allocation unit.
const CHUNK: u64 = 64 * 1024;

/// A sparse in-memory block device. See the [module docs](self).
pub struct MemDev {
    geometry: Geometry,
    chunks: RwLock<HashMap<u64, Box<[u8]>>>,
}

impl MemDev {
    /// A device of `blocks` logical blocks of `block_size` bytes, reading as zeroes, with
    /// discard (which zeroes) and fast write-zeroes.
    ///
    /// # Panics
    /// If `block_size` is not a power of two between 512 and 64 KiB.
    pub fn new(blocks: u64, block_size: u32) -> Self {
        Self::with_geometry(Geometry {
            block_size,
            physical_block_size: block_size,
            blocks,
            optimal_io_size: 0,
            max_io_bytes: 0,
            capabilities: Capabilities {
                discard: true,
                discard_zeroes: true,
                fast_zeroes: true,
                volatile_cache: false,
                read_only: false,
            },
        })
    }

    /// A device with exactly this geometry, for tests of front ends that must cope with
    /// what a device cannot do: with `discard` unset, discard fails with
    /// [`BlockError::Unsupported`]; with `read_only` set, every modification fails with
    /// [`BlockError::ReadOnly`]; with `fast_zeroes` unset, write-zeroes with
    /// [`ZeroFlags::fast_only`] fails with `Unsupported`. `discard_zeroes` is reported as
    /// given, but discarded blocks read as zeroes either way (which the contract allows).
    ///
    /// # Panics
    /// If the block size is not a power of two between 512 and 64 KiB, or the physical
    /// block size is not a multiple of it.
    pub fn with_geometry(geometry: Geometry) -> Self {
        let bs = geometry.block_size;
        assert!(
            bs.is_power_of_two() && (512..=CHUNK as u32).contains(&bs),
            "block size {bs} must be a power of two from 512 to {CHUNK}"
        );
        assert!(
            geometry.physical_block_size >= bs && geometry.physical_block_size.is_multiple_of(bs),
            "physical block size {} must be a multiple of the block size {bs}",
            geometry.physical_block_size
        );
        assert!(
            geometry.blocks.checked_mul(u64::from(bs)).is_some(),
            "capacity overflows"
        );
        MemDev {
            geometry,
            chunks: RwLock::new(HashMap::new()),
        }
    }

    /// Bytes of memory holding data (whole chunks).
    pub fn allocated_bytes(&self) -> u64 {
        self.chunks_read().len() as u64 * CHUNK
    }

    fn chunks_read(&self) -> RwLockReadGuard<'_, HashMap<u64, Box<[u8]>>> {
        // A panic while holding the lock leaves the data as consistent as a crash would;
        // keep serving.
        self.chunks.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn chunks_write(&self) -> RwLockWriteGuard<'_, HashMap<u64, Box<[u8]>>> {
        self.chunks.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_writable(&self) -> Result<()> {
        if self.geometry.capabilities.read_only {
            return Err(BlockError::ReadOnly);
        }
        Ok(())
    }

    fn read_into(chunks: &HashMap<u64, Box<[u8]>>, offset: u64, out: &mut [u8]) {
        for (pos, chunk, start, n) in pieces(offset, out.len() as u64) {
            if let Some(c) = chunks.get(&chunk) {
                out[pos..pos + n].copy_from_slice(&c[start..start + n]);
            }
        }
    }

    fn write_from(chunks: &mut HashMap<u64, Box<[u8]>>, offset: u64, data: &[u8]) {
        for (pos, chunk, start, n) in pieces(offset, data.len() as u64) {
            let src = &data[pos..pos + n];
            match chunks.get_mut(&chunk) {
                Some(c) => c[start..start + n].copy_from_slice(src),
                // Writing zeroes into an unallocated chunk changes nothing.
                None if src.iter().all(|&b| b == 0) => {}
                None => {
                    let mut c = vec![0u8; CHUNK as usize].into_boxed_slice();
                    c[start..start + n].copy_from_slice(src);
                    chunks.insert(chunk, c);
                }
            }
        }
    }

    fn zero(chunks: &mut HashMap<u64, Box<[u8]>>, offset: u64, len: u64) {
        for (_, chunk, start, n) in pieces(offset, len) {
            if n as u64 == CHUNK {
                chunks.remove(&chunk);
            } else if let Some(c) = chunks.get_mut(&chunk) {
                c[start..start + n].fill(0);
            }
        }
    }
}

/// Splits `[offset, offset + len)` at chunk boundaries: yields (position in the request,
/// chunk index, start within the chunk, length).
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (usize, u64, usize, usize)> {
    let end = offset + len;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let chunk = at / CHUNK;
        let start = at % CHUNK;
        let n = (CHUNK - start).min(end - at);
        let item = ((at - offset) as usize, chunk, start as usize, n as usize);
        at += n;
        Some(item)
    })
}

#[async_trait]
impl BlockDev for MemDev {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_range(&self.geometry, offset, len as u64)?;
        let mut buf = AlignedBuf::zeroed(len);
        Self::read_into(&self.chunks_read(), offset, buf.as_mut_slice());
        Ok(buf.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, _flags: WriteFlags) -> Result<()> {
        check_range(&self.geometry, offset, data.len() as u64)?;
        self.check_writable()?;
        Self::write_from(&mut self.chunks_write(), offset, &data);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(&self.geometry, offset, len)?;
        self.check_writable()?;
        if !self.geometry.capabilities.discard {
            return Err(BlockError::Unsupported("discard"));
        }
        Self::zero(&mut self.chunks_write(), offset, len);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        check_range(&self.geometry, offset, len)?;
        self.check_writable()?;
        if flags.fast_only && !self.geometry.capabilities.fast_zeroes {
            return Err(BlockError::Unsupported("fast write-zeroes"));
        }
        Self::zero(&mut self.chunks_write(), offset, len);
        Ok(())
    }

    async fn compare_and_write(
        &self,
        offset: u64,
        compare: Bytes,
        data: Bytes,
        _flags: WriteFlags,
    ) -> Result<CompareOutcome> {
        check_compare_and_write(&self.geometry, offset, &compare, &data)?;
        self.check_writable()?;
        let mut chunks = self.chunks_write();
        let mut current = vec![0u8; compare.len()];
        Self::read_into(&chunks, offset, &mut current);
        if let Some(at) = first_difference(&current, &compare) {
            return Ok(CompareOutcome::Miscompare { offset: at });
        }
        Self::write_from(&mut chunks, offset, &data);
        Ok(CompareOutcome::Written)
    }

    /// Unallocated chunks are holes, allocated ones data (at chunk granularity).
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(&self.geometry, offset, len)?;
        let chunks = self.chunks_read();
        let mut out: Vec<Extent> = Vec::new();
        for (_, chunk, _, n) in pieces(offset, len) {
            let kind = if chunks.contains_key(&chunk) {
                ExtentKind::Data
            } else {
                ExtentKind::Hole
            };
            match out.last_mut() {
                Some(e) if e.kind == kind => e.len += n as u64,
                _ => out.push(Extent {
                    len: n as u64,
                    kind,
                }),
            }
        }
        Ok(out)
    }
}

impl std::fmt::Debug for MemDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemDev")
            .field("geometry", &self.geometry)
            .field("allocated_bytes", &self.allocated_bytes())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;
    use crate::SharedBlockDev;
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_512() {
        conformance::run("MemDev/512", || async {
            Arc::new(MemDev::new(64 << 11, 512)) as SharedBlockDev
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_4096() {
        conformance::run("MemDev/4096", || async {
            Arc::new(MemDev::new(64 << 8, 4096)) as SharedBlockDev
        })
        .await;
    }

    #[tokio::test]
    async fn terabyte_device_is_sparse() {
        let dev = MemDev::new((1u64 << 40) / 4096, 4096);
        assert_eq!(dev.allocated_bytes(), 0);
        let last = dev.geometry().capacity_bytes() - 4096;
        dev.write(last, Bytes::from(vec![7u8; 4096]), WriteFlags::default())
            .await
            .unwrap();
        assert_eq!(dev.allocated_bytes(), CHUNK);
        assert_eq!(dev.read(last, 4096).await.unwrap()[0], 7);
        // Zeroes into unallocated space allocate nothing.
        dev.write(0, Bytes::from(vec![0u8; 1 << 20]), WriteFlags::default())
            .await
            .unwrap();
        assert_eq!(dev.allocated_bytes(), CHUNK);
    }

    #[tokio::test]
    async fn discard_frees_whole_chunks_and_zeroes_edges() {
        let dev = MemDev::new(1024, 512); // 512 KiB = 8 chunks
        dev.write(0, Bytes::from(vec![1u8; 512 * 1024]), WriteFlags::default())
            .await
            .unwrap();
        assert_eq!(dev.allocated_bytes(), 8 * CHUNK);
        // From the middle of chunk 0 to the middle of chunk 3: frees chunks 1 and 2.
        dev.discard(CHUNK / 2, 3 * CHUNK).await.unwrap();
        assert_eq!(dev.allocated_bytes(), 6 * CHUNK);
        let data = dev.read(0, 4 * CHUNK as usize).await.unwrap();
        let half = (CHUNK / 2) as usize;
        assert!(data[..half].iter().all(|&b| b == 1));
        assert!(data[half..half + 3 * CHUNK as usize]
            .iter()
            .all(|&b| b == 0));
        assert!(data[half + 3 * CHUNK as usize..].iter().all(|&b| b == 1));
    }

    #[tokio::test]
    async fn geometry_limits_are_honoured() {
        let mut g = MemDev::new(16, 512).geometry();
        g.capabilities.discard = false;
        g.capabilities.fast_zeroes = false;
        let dev = MemDev::with_geometry(g);
        assert!(matches!(
            dev.discard(0, 512).await,
            Err(BlockError::Unsupported(_))
        ));
        let fast = ZeroFlags {
            fast_only: true,
            may_unmap: false,
        };
        assert!(matches!(
            dev.write_zeroes(0, 512, fast).await,
            Err(BlockError::Unsupported(_))
        ));
        g.capabilities.read_only = true;
        let ro = MemDev::with_geometry(g);
        assert!(matches!(
            ro.write(0, Bytes::from(vec![1u8; 512]), WriteFlags::default())
                .await,
            Err(BlockError::ReadOnly)
        ));
    }

    #[tokio::test]
    async fn block_status_reports_holes() {
        let dev = MemDev::new(1024, 512); // 8 chunks
        dev.write(CHUNK, Bytes::from(vec![1u8; 512]), WriteFlags::default())
            .await
            .unwrap();
        let ext = dev.block_status(0, 4 * CHUNK).await.unwrap();
        let kinds: Vec<_> = ext.iter().map(|e| (e.kind, e.len)).collect();
        assert_eq!(
            kinds,
            vec![
                (ExtentKind::Hole, CHUNK),
                (ExtentKind::Data, CHUNK),
                (ExtentKind::Hole, 2 * CHUNK)
            ]
        );
        // A range starting inside a chunk is cut at the range's edges.
        let ext = dev.block_status(CHUNK + 512, 1024).await.unwrap();
        assert_eq!(
            ext,
            vec![Extent {
                len: 1024,
                kind: ExtentKind::Data
            }]
        );
    }

    #[test]
    #[should_panic(expected = "power of two")]
    fn rejects_odd_block_size() {
        MemDev::new(10, 1000);
    }
}
