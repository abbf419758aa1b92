//! Offline verification and repair of a pool's metadata ([`Pool::check`]).
//!
//! What is checked, from the device alone:
//! - both superblock copies (checksum, version, layout, that they name the same pool);
//! - the checkpoint of every valid superblock (checksum, structure, meaning: chunks in
//!   range and owned once, parents present, volumes and nodes agreeing);
//! - the journal: where replay stops and why, and whether valid blocks follow a bad
//!   one (corruption in the middle rather than a torn tail);
//! - that the two metadata copies agree: checkpoint `g` must equal checkpoint `g - 1`
//!   plus journal `g - 1` (when the journal says it extends it);
//! - every invariant of the resulting state: ownership, counters, orphaned hidden
//!   nodes, dead chunks that nobody can read.
//!
//! Repair keeps what verifies, drops what does not (listing it), reclaims orphans, and
//! writes the result as two fresh generations so that both superblock copies and both
//! checkpoint slots are good again. Check is O(metadata): it never reads data chunks.

use crate::error::PoolError;
use crate::format::{decode_journal_block, JournalBlock, Superblock, META_BLOCK};
use crate::pool::{dev_read, load, read_superblocks, write_checkpoint, Pool, VolumeId};
use basalt_blockdev::SharedBlockDev;

/// What [`Pool::check`] found and did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    /// The pool's id.
    pub pool: Option<VolumeId>,
    /// Generation of the metadata checked.
    pub generation: u64,
    /// True when the newest metadata was unreadable and an older copy was used.
    pub fell_back: bool,
    /// Why journal replay stopped.
    pub journal_end: String,
    /// Journal records replayed.
    pub records_replayed: u64,
    /// Volumes found.
    pub volumes: usize,
    /// Chunks allocated.
    pub allocated_chunks: u64,
    /// Chunks free.
    pub free_chunks: u64,
    /// Everything found wrong (empty for a clean pool).
    pub problems: Vec<String>,
    /// What repair changed.
    pub repaired: Vec<String>,
}

impl CheckReport {
    /// True when nothing was wrong.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Valid journal blocks of generation `gen` after position `from`.
async fn later_blocks(
    dev: &SharedBlockDev,
    sb: &Superblock,
    gen: u64,
    from: u64,
) -> Result<u64, PoolError> {
    let l = sb.layout;
    let total = l.journal_blocks();
    let mut n = 0;
    let mut seq = from;
    while seq < total {
        let batch = 256.min(total - seq);
        let buf = dev_read(
            dev,
            l.journal_block_off(gen, seq),
            (batch * META_BLOCK) as usize,
        )
        .await?;
        for i in 0..batch {
            let b = &buf[(i * META_BLOCK) as usize..((i + 1) * META_BLOCK) as usize];
            if let JournalBlock::Valid(h, _) = decode_journal_block(b, &sb.pool_uuid) {
                if h.gen == gen && h.seq == seq + i {
                    n += 1;
                }
            }
        }
        seq += batch;
    }
    Ok(n)
}

impl Pool {
    /// Verifies the pool on `dev` offline (the pool must not be imported anywhere) and,
    /// with `repair`, fixes what it can. See the [module docs](crate::check).
    pub async fn check(dev: SharedBlockDev, repair: bool) -> Result<CheckReport, PoolError> {
        let loaded = load(&dev, true).await?;
        let mut report = CheckReport {
            pool: Some(VolumeId(loaded.sb.pool_uuid)),
            generation: loaded.max_gen,
            fell_back: loaded.report.fell_back,
            journal_end: loaded.report.journal_end.clone(),
            records_replayed: loaded.report.records_replayed,
            volumes: loaded.state.vols.len(),
            allocated_chunks: loaded.state.used_count,
            free_chunks: loaded.state.free_chunks(),
            problems: loaded.report.problems.clone(),
            repaired: Vec::new(),
        };
        for (copy, why) in &loaded.bad_copies {
            let msg = format!("superblock copy {copy}: {why}");
            if !report.problems.contains(&msg) {
                report.problems.push(msg);
            }
        }
        if loaded.report.fell_back {
            report
                .problems
                .push("the newest checkpoint is unreadable; an older copy was used".into());
        }
        // Valid blocks after the point where replay stopped mean corruption inside the
        // journal, not a torn tail: the commits after it are lost.
        let stop = loaded.report.blocks_replayed;
        let sb = &loaded.sb;
        let last_gen = loaded.max_gen;
        if last_gen == sb.gen {
            let later = later_blocks(&dev, sb, sb.gen, stop + 1).await?;
            if later > 0 {
                report.problems.push(format!(
                    "journal generation {} is damaged at block {stop}: {later} later blocks cannot be replayed",
                    sb.gen
                ));
            }
        }
        // The two metadata copies must agree: the newest checkpoint against the one
        // before plus its journal.
        let (sbs, _) = read_superblocks(&dev).await?;
        if sbs.len() == 2 && !loaded.report.fell_back {
            let (newer, older) = if sbs[0].gen > sbs[1].gen {
                (&sbs[0], &sbs[1])
            } else {
                (&sbs[1], &sbs[0])
            };
            if older.gen + 1 == newer.gen && newer.pool_uuid == older.pool_uuid && newer.chained {
                if let (Ok((a, _, _)), Ok(b)) = (
                    crate::pool::load_checkpoint_only(&dev, newer).await,
                    crate::pool::load_own_journal(&dev, older).await,
                ) {
                    if a.to_body() != b.to_body() {
                        report.problems.push(format!(
                            "checkpoint {} differs from checkpoint {} plus its journal",
                            newer.gen, older.gen
                        ));
                    }
                }
            }
        }
        let mut problems = loaded.state.verify(0);
        report.problems.append(&mut problems);
        if repair && !report.problems.is_empty() {
            let body = loaded.state.to_body();
            for gen in [last_gen + 1, last_gen + 2] {
                let mut nonce = [0u8; 8];
                let _ = getrandom::fill(&mut nonce);
                write_checkpoint(&dev, sb, gen, u64::from_le_bytes(nonce), false, &body).await?;
            }
            dev.flush().await?;
            report.repaired.push(format!(
                "rewrote the metadata as generations {} and {} ({} volumes, {} chunks allocated)",
                last_gen + 1,
                last_gen + 2,
                loaded.state.vols.len(),
                loaded.state.used_count
            ));
            report.generation = last_gen + 2;
        }
        Ok(report)
    }
}
