//! Sector I/O with the retry rules that make the protocol robust against an uncertain
//! transport.
//!
//! [`cas`] is a single-sector compare-and-write that tells three outcomes apart:
//! applied, conflict (someone else's image is there, which it returns), and failure.
//! After a miscompare it reads the sector and **recognises its own image**: a CAW that
//! timed out (or whose connection broke) may still have been applied by the target, in
//! which case the retry miscompares against the very image it wanted to write. VMware
//! hosts that did not check this declared "ATS miscompare" and dropped their heartbeat;
//! here that case is `Applied`. A sector that is a byte-wise mix of the old and new
//! images is the tear of this very write (or of a rival's write of an identical prefix,
//! which did not succeed either): it is repaired by a CAW from the torn image.
//!
//! Deadlines are in [`Clock`] time; every request also gets the tokio timeout
//! `io_timeout`, after which it counts as failed (it may still land later; callers
//! treat every write they issue as possibly landing until the protocol's margins say
//! otherwise).

use crate::clock::Clock;
use crate::error::LockError;
use crate::format::is_tear_of;
use crate::metrics::Metrics;
use basalt_blockdev::{BlockDev, BlockError, CompareOutcome, WriteFlags};
use bytes::Bytes;
use std::time::Duration;

/// The outcome of [`cas`].
#[derive(Debug)]
pub(crate) enum Cas {
    /// Our image is on disk (written now, or by an earlier attempt that looked failed).
    Applied,
    /// Another image is on disk; here it is.
    Conflict(Bytes),
}

/// Counts device round trips of one operation (for the acquire metrics and bench).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Trips(pub u32);

const FUA: WriteFlags = WriteFlags { fua: true };

/// Pause between retries of a failed request.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// How long a one-shot step (claim, bind, acquire, release, value-block write, takeover
/// step, leave) may retry: long enough for one retry after a request that timed out.
/// A CAW whose answer is lost or late was often applied; only a retry, which then
/// miscompares against our own image, can tell (and it must: an acquisition that gives
/// up there leaves its holder entry on disk while the host believes it failed).
pub(crate) fn step_window(io_timeout: Duration) -> Duration {
    io_timeout * 2 + RETRY_PAUSE * 2
}

/// Reads `len` bytes at `offset` with a timeout.
pub(crate) async fn read(
    dev: &dyn BlockDev,
    offset: u64,
    len: usize,
    io_timeout: Duration,
    trips: &mut Trips,
) -> Result<Bytes, LockError> {
    trips.0 += 1;
    match tokio::time::timeout(io_timeout, dev.read(offset, len)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(LockError::IoTimeout("read")),
    }
}

/// Reads a region of whole sectors, splitting at the device's request size limit.
pub(crate) async fn read_region(
    dev: &dyn BlockDev,
    offset: u64,
    len: usize,
    io_timeout: Duration,
    trips: &mut Trips,
) -> Result<Vec<u8>, LockError> {
    let g = dev.geometry();
    let bs = g.block_size as usize;
    let max = if g.max_io_bytes == 0 {
        1 << 20
    } else {
        (g.max_io_bytes as usize).clamp(bs, 1 << 20) / bs * bs
    };
    let mut out = Vec::with_capacity(len);
    let mut at = 0usize;
    while at < len {
        let n = (len - at).min(max);
        let chunk = read(dev, offset + at as u64, n, io_timeout, trips).await?;
        out.extend_from_slice(&chunk);
        at += n;
    }
    Ok(out)
}

/// Compare-and-write of one sector from `old` to `new`, retried on failure until
/// `deadline` (clock time). See the [module docs](self).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn cas(
    dev: &dyn BlockDev,
    clock: &dyn Clock,
    metrics: &Metrics,
    offset: u64,
    old: Bytes,
    new: Bytes,
    io_timeout: Duration,
    deadline: Duration,
    trips: &mut Trips,
) -> Result<Cas, LockError> {
    let mut old = old;
    let mut failed_before = false;
    loop {
        trips.0 += 1;
        let r = tokio::time::timeout(
            io_timeout,
            dev.compare_and_write(offset, old.clone(), new.clone(), FUA),
        )
        .await;
        let err = match r {
            Ok(Ok(CompareOutcome::Written)) => return Ok(Cas::Applied),
            Ok(Ok(CompareOutcome::Miscompare { .. })) => {
                match read(dev, offset, new.len(), io_timeout, trips).await {
                    Ok(cur) if cur == new => {
                        if failed_before {
                            metrics.own_image_recognized.inc();
                        }
                        return Ok(Cas::Applied);
                    }
                    Ok(cur) if is_tear_of(&cur, &old, &new) => {
                        metrics.torn_repairs.inc();
                        tracing::warn!(offset, "repairing a torn lock-manager sector");
                        old = cur;
                        continue;
                    }
                    Ok(cur) => return Ok(Cas::Conflict(cur)),
                    Err(e) => e,
                }
            }
            Ok(Err(BlockError::Unsupported(what))) => {
                return Err(LockError::Io(BlockError::Unsupported(what)))
            }
            Ok(Err(e)) if !retryable(&e) => return Err(e.into()),
            Ok(Err(e)) => e.into(),
            Err(_) => LockError::IoTimeout("compare-and-write"),
        };
        failed_before = true;
        if clock.now() + RETRY_PAUSE >= deadline {
            return Err(err);
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

fn retryable(e: &BlockError) -> bool {
    e.is_device_failure()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TokioClock;
    use basalt_blockdev::MemDev;

    #[tokio::test(start_paused = true)]
    async fn applied_conflict_and_own_image() {
        let dev = MemDev::new(16, 512);
        let clock = TokioClock::new();
        let m = Metrics::default();
        let z = Bytes::from(vec![0u8; 512]);
        let a = Bytes::from(vec![1u8; 512]);
        let b = Bytes::from(vec![2u8; 512]);
        let t = Duration::from_secs(1);
        let mut trips = Trips::default();
        let r = cas(&dev, &clock, &m, 0, z.clone(), a.clone(), t, t, &mut trips).await;
        assert!(matches!(r, Ok(Cas::Applied)));
        // The same CAW again: miscompare, but the image is ours.
        let r = cas(&dev, &clock, &m, 0, z.clone(), a.clone(), t, t, &mut trips).await;
        assert!(matches!(r, Ok(Cas::Applied)));
        let r = cas(&dev, &clock, &m, 0, z.clone(), b.clone(), t, t, &mut trips).await;
        assert!(matches!(r, Ok(Cas::Conflict(c)) if c == a));
        assert_eq!(trips.0, 5);
    }
}
