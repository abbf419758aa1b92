//! Clocks. Liveness and leases are timed with a local monotonic clock only; wall-clock
//! time never enters the protocol (nothing time-like is stored on disk: slots carry a
//! counter, not a timestamp), so a wall-clock jump on any host changes nothing.
//!
//! - [`BootClock`] (production): `CLOCK_BOOTTIME`, which is monotonic *and* counts time
//!   spent in system suspend. `std::time::Instant` is `CLOCK_MONOTONIC`, which stops
//!   during suspend: a host suspended past its lease would wake up believing its lease
//!   still valid. With `CLOCK_BOOTTIME` it wakes up fenced.
//! - [`TokioClock`] (tests, simulation): follows tokio's clock, so tests that pause and
//!   advance tokio time drive the lease arithmetic deterministically.
//! - [`WallClock`]: used only to put human-readable timestamps into status reports.

use std::time::{Duration, SystemTime};

/// A monotonic clock: `now` never goes backwards.
pub trait Clock: Send + Sync + 'static {
    /// Time since an arbitrary, fixed origin.
    fn now(&self) -> Duration;
}

/// `CLOCK_BOOTTIME`: monotonic, counts suspend. The production clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct BootClock;

impl Clock for BootClock {
    fn now(&self) -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME exists on every
        // Linux since 2.6.39, and clock_gettime only writes through the pointer.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        if rc != 0 {
            // Cannot happen on Linux; fall back to CLOCK_MONOTONIC via Instant's origin.
            return fallback_now();
        }
        Duration::new(
            ts.tv_sec.max(0) as u64,
            ts.tv_nsec.clamp(0, 999_999_999) as u32,
        )
    }
}

fn fallback_now() -> Duration {
    use std::sync::OnceLock;
    static ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();
    ORIGIN.get_or_init(std::time::Instant::now).elapsed()
}

/// Tokio's clock (honours `tokio::time::pause` and `advance`). For tests and simulation.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        TokioClock {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.origin)
    }
}

/// Wall-clock time, for display in status reports only.
pub trait WallClock: Send + Sync + 'static {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemWallClock;

impl WallClock for SystemWallClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_clock_is_monotonic() {
        let c = BootClock;
        let a = c.now();
        std::thread::sleep(Duration::from_millis(5));
        let b = c.now();
        assert!(b >= a + Duration::from_millis(5), "{a:?} {b:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let c = TokioClock::new();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(c.now(), Duration::from_secs(10));
    }

    /// Wall-clock time is used for display only: no protocol module reads it. This pins
    /// the property the wall-clock-jump test relies on.
    #[test]
    fn protocol_never_reads_wall_clock() {
        for (name, src) in [
            ("lockspace.rs", include_str!("lockspace.rs")),
            ("fence.rs", include_str!("fence.rs")),
            ("format.rs", include_str!("format.rs")),
            ("cas.rs", include_str!("cas.rs")),
        ] {
            assert!(
                !src.contains("SystemTime::now"),
                "{name} reads the wall clock"
            );
            assert!(!src.contains("Instant::now"), "{name} bypasses the Clock");
        }
    }
}
