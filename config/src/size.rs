//! Human byte sizes, with the conventions of coreutils (`truncate -s`, `dd`): a bare
//! suffix or an `iB` suffix is binary (`10G` = `10GiB` = 10 × 2^30), a `B` suffix is
//! decimal (`10GB` = 10 × 10^9). Storage administrators type `10G` and mean GiB; crates
//! that parse sizes disagree on this, so the rule is written down here.

use std::fmt;
use std::str::FromStr;

/// A size in bytes that parses from and prints as human units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// Why a size did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}: {reason} (examples: 4096, 512K, 10G, 1.5TiB, 20GB)")]
pub struct SizeError {
    input: String,
    reason: &'static str,
}

const UNITS: [&str; 6] = ["", "K", "M", "G", "T", "P"];

impl FromStr for ByteSize {
    type Err = SizeError;

    fn from_str(input: &str) -> Result<Self, SizeError> {
        let err = |reason| SizeError {
            input: input.to_string(),
            reason,
        };
        let s = input.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let unit = unit.trim();
        if number.is_empty() {
            return Err(err("no number"));
        }
        let upper = unit.to_ascii_uppercase();
        let (prefix, decimal) = if let Some(p) = upper.strip_suffix("IB") {
            (p, false)
        } else if let Some(p) = upper.strip_suffix('B') {
            (p, !p.is_empty())
        } else {
            (upper.as_str(), false)
        };
        let power = UNITS
            .iter()
            .position(|u| *u == prefix)
            .ok_or_else(|| err("unknown unit"))? as u32;
        let base: u64 = if decimal { 1000 } else { 1024 };
        let multiplier = base.pow(power);
        let bytes = if let Some((whole, frac)) = number.split_once('.') {
            let whole: u64 = if whole.is_empty() {
                0
            } else {
                whole.parse().map_err(|_| err("bad number"))?
            };
            if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err("bad number"));
            }
            let frac_value: u128 = frac.parse().map_err(|_| err("bad number"))?;
            let scale = 10u128.pow(frac.len() as u32);
            let frac_bytes = frac_value * u128::from(multiplier);
            if !frac_bytes.is_multiple_of(scale) {
                return Err(err("not a whole number of bytes"));
            }
            u128::from(whole) * u128::from(multiplier) + frac_bytes / scale
        } else {
            let n: u64 = number.parse().map_err(|_| err("bad number"))?;
            u128::from(n) * u128::from(multiplier)
        };
        u64::try_from(bytes)
            .map(ByteSize)
            .map_err(|_| err("too large"))
    }
}

impl fmt::Display for ByteSize {
    /// Prints the largest binary unit that divides the size exactly (`10GiB`), so that
    /// printing and parsing round-trip; falls back to plain bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for power in (1..UNITS.len()).rev() {
            let m = 1024u64.pow(power as u32);
            if n != 0 && n.is_multiple_of(m) {
                return write!(f, "{}{}iB", n / m, UNITS[power]);
            }
        }
        write!(f, "{n}")
    }
}

impl ByteSize {
    /// A short, rounded rendering for tables (`1.5 GiB`); does not round-trip.
    pub fn human(&self) -> String {
        let n = self.0 as f64;
        for power in (1..UNITS.len()).rev() {
            let m = 1024f64.powi(power as i32);
            if n >= m {
                return format!("{:.1} {}iB", n / m, UNITS[power]);
            }
        }
        format!("{} B", self.0)
    }
}

impl serde::Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 10G, 512MiB or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> u64 {
        s.parse::<ByteSize>().unwrap().0
    }

    #[test]
    fn parses_binary_and_decimal_units() {
        assert_eq!(p("4096"), 4096);
        assert_eq!(p("512K"), 512 << 10);
        assert_eq!(p("10G"), 10 << 30);
        assert_eq!(p("10 GiB"), 10 << 30);
        assert_eq!(p("10gib"), 10 << 30);
        assert_eq!(p("20GB"), 20_000_000_000);
        assert_eq!(p("1.5T"), 3 << 39);
        assert_eq!(p("100B"), 100);
    }

    #[test]
    fn rejects_nonsense() {
        for bad in ["", "G", "10X", "1.2.3G", "-5G", "0.3B", "99999999999P"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn display_round_trips() {
        for n in [0, 1, 512, 4096, 10 << 30, 3 << 39, 1_000_000_007] {
            let s = ByteSize(n).to_string();
            assert_eq!(p(&s), n, "{s}");
        }
        assert_eq!(ByteSize(10 << 30).to_string(), "10GiB");
        assert_eq!(ByteSize(1536 << 20).human(), "1.5 GiB");
    }
}
