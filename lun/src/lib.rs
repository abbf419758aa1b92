//! Pools and LUNs: a thin allocator on one block device (a RAID array, in the
//! appliance), and thin or thick volumes carved from it, with snapshots, clones,
//! resize, UNMAP and block status.
//!
//! The pool's metadata (volume table, block maps, free space) lives on the pool device
//! itself, journaled and crash-consistent, so a pool imports from its disks alone on
//! another appliance. `DESIGN.md` beside this crate describes the on-disk format, the
//! commit protocol and why it is crash-safe, and what the design avoids of dm-thin's
//! and ZFS's known failure modes.
//!
//! # Layers
//!
//! - [`format`]: byte layouts of superblocks, journal blocks, checkpoints and records,
//!   with panic-free decoders (fuzzed).
//! - `map`: a volume's chunk map in memory (a copy-on-write radix).
//! - `state`: the metadata state and [`format::Op`]s applied to it, live or replayed.
//! - [`Pool`] (`pool`): format, import, commit and checkpoint, management operations,
//!   usage, alerts, counters; [`Pool::check`] (`check`) verifies and repairs offline.
//! - [`Lun`] (`lun`): a volume as a [`BlockDev`](basalt_blockdev::BlockDev).
//!
//! # Example: what the daemon does
//!
//! ```
//! use basalt_blockdev::{BlockDev, MemDev, SharedBlockDev, WriteFlags};
//! use basalt_lun::{FormatOptions, ImportOptions, LunOptions, Pool, Provisioning};
//! use std::sync::Arc;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The array the pool sits on (any BlockDev).
//! let array: SharedBlockDev = Arc::new(MemDev::new((256 << 20) / 512, 512));
//! let pool = Pool::format(array.clone(), FormatOptions { name: "tank".into(), ..Default::default() }).await?;
//!
//! // Volumes: thin, thick, snapshots and clones.
//! pool.create_lun("vm1", 1 << 40, LunOptions::default()).await?; // 1 TiB, thin
//! pool.create_lun("db", 16 << 20, LunOptions {
//!     provisioning: Provisioning::Thick { eager_zero: false },
//!     block_size: 512,
//! }).await?;
//! let vm1 = pool.lun("vm1")?; // Arc<Lun>: a BlockDev to export over iSCSI or NBD
//! vm1.write(0, bytes::Bytes::from(vec![7u8; 4096]), WriteFlags::default()).await?;
//! vm1.flush().await?; // the write and its allocation are durable
//! pool.snapshot("vm1", "vm1@monday").await?;
//! pool.clone_lun("vm1@monday", "vm1-test").await?;
//!
//! // Listing, usage, alerts and counters, for the API and /metrics.
//! for v in pool.list() {
//!     println!("{} {} {:?} mapped {} exclusive {}", v.id, v.name, v.kind, v.mapped_bytes, v.exclusive_bytes);
//! }
//! let usage = pool.usage();
//! assert!(usage.alerts.is_empty());
//! let _commits = pool.counters().snapshot().commits_total;
//! let _io = pool.volume_stats("vm1")?.io.snapshot();
//!
//! // Moving the disks to another appliance: export, then import from the device alone.
//! pool.export().await?;
//! let (pool2, report) = Pool::import(array.clone(), ImportOptions::default()).await?;
//! assert_eq!(report.volumes, 4);
//! assert_eq!(pool2.lun("vm1")?.read(0, 4096).await?[0], 7);
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

mod check;
mod error;
pub mod format;
mod lun;
mod map;
mod pool;
mod state;
mod stats;

pub use check::CheckReport;
pub use error::PoolError;
pub use format::{Layout, Provisioning, Thresholds, VolumeKind};
pub use lun::Lun;
pub use map::ChunkMap;
pub use pool::{
    Alert, AlertLevel, FormatOptions, ImportOptions, ImportReport, LunOptions, Pool, PoolLabel,
    Resource, Usage, VolumeId, VolumeInfo,
};
pub use stats::{
    LunCounters, LunCountersSnapshot, PoolCounters, PoolCountersSnapshot, VolumeStats,
};

/// Decodes every metadata structure in `data` the way import does, for the fuzz
/// target: superblock, journal block and records, checkpoint body and the state built
/// from it. Never panics, whatever the bytes.
#[doc(hidden)]
pub fn fuzz_decode(data: &[u8]) {
    use format::*;
    let _ = Op::decode_all(data);
    if let Ok(body) = CheckpointBody::decode(data) {
        if let Ok(layout) = Layout::compute(64 << 20, 8192, 64) {
            let _ = state::State::from_body(layout, &body, true);
            if let Ok((mut st, _)) = state::State::from_body(layout, &body, false) {
                // Replay the same bytes as records on top.
                if let Ok(ops) = Op::decode_all(data) {
                    for op in ops {
                        let _ = st.apply(&op, state::Mode::Replay);
                    }
                }
                let _ = st.verify(0);
                let _ = st.to_body();
            }
        }
    }
    let mut block = data.to_vec();
    block.resize(META_BLOCK as usize, 0);
    if let Ok(Some(sb)) = Superblock::decode(&block) {
        let _ = decode_checkpoint(data, &sb);
    }
    if let JournalBlock::Valid(_, payload) = decode_journal_block(&block, &[0; 16]) {
        let _ = Op::decode_all(payload);
    }
}
