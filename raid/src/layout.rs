//! Where array bytes live: levels, stripes, and the roles (member positions) that hold
//! each column of a stripe.
//!
//! Every level is described the same way. The array is cut into stripes; a stripe holds
//! one chunk on every member, at member data offset `stripe * chunk`. Its data is split
//! into `k` columns of one chunk each, column `j` holding array bytes
//! `[stripe * k * chunk + j * chunk, ... + chunk)`. Each column is stored on one or more
//! roles (copies), and parity levels add a P (and Q) role:
//!
//! | level | columns `k` | copies of a column | parity |
//! |---|---|---|---|
//! | 0 | n | 1 (role j) | none |
//! | 1 | 1 | n (every role) | none |
//! | 10 | n / c | c (roles j*c .. j*c + c) | none |
//! | 5 | n - 1 | 1 | P |
//! | 6 | n - 2 | 1 | P, Q |
//!
//! RAID 5 and 6 rotate parity with md's left-symmetric layout (md's default, algorithm
//! 2): in stripe `s`, P is on role `n - 1 - s % n`, Q on the role after it, and data
//! column `j` on the `j`-th role after P (RAID5) or Q (RAID6), wrapping. Q gives data
//! column `j` the coefficient 2^j, as md does.

use serde::{Deserialize, Serialize};

/// A RAID level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Level {
    /// Striping, no redundancy.
    Raid0,
    /// Mirroring over every member.
    Raid1,
    /// Striping over mirror groups.
    Raid10,
    /// Striping with rotating XOR parity.
    Raid5,
    /// Striping with rotating P (XOR) and Q (GF(2^8)) parity.
    Raid6,
}

impl Level {
    /// The md-style name ("raid6").
    pub fn name(self) -> &'static str {
        match self {
            Level::Raid0 => "raid0",
            Level::Raid1 => "raid1",
            Level::Raid10 => "raid10",
            Level::Raid5 => "raid5",
            Level::Raid6 => "raid6",
        }
    }

    /// From the number used on the command line (0, 1, 10, 5, 6).
    pub fn from_number(n: u32) -> Option<Level> {
        Some(match n {
            0 => Level::Raid0,
            1 => Level::Raid1,
            10 => Level::Raid10,
            5 => Level::Raid5,
            6 => Level::Raid6,
            _ => return None,
        })
    }

    /// The number (0, 1, 10, 5, 6).
    pub fn number(self) -> u32 {
        match self {
            Level::Raid0 => 0,
            Level::Raid1 => 1,
            Level::Raid10 => 10,
            Level::Raid5 => 5,
            Level::Raid6 => 6,
        }
    }

    /// Parity roles per stripe.
    pub fn parity_count(self) -> usize {
        match self {
            Level::Raid5 => 1,
            Level::Raid6 => 2,
            _ => 0,
        }
    }

    /// True when data survives the loss of at least one member.
    pub fn redundant(self) -> bool {
        self != Level::Raid0
    }

    /// The smallest member count.
    pub fn min_members(self) -> usize {
        match self {
            Level::Raid0 => 1,
            Level::Raid1 => 2,
            Level::Raid10 => 2,
            Level::Raid5 => 3,
            Level::Raid6 => 4,
        }
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The roles holding one stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeMap {
    /// For each data column, the roles holding a copy of it (one for 0/5/6).
    pub columns: Vec<Vec<usize>>,
    /// The P role (RAID 5/6).
    pub p: Option<usize>,
    /// The Q role (RAID 6).
    pub q: Option<usize>,
}

impl StripeMap {
    /// Every role of the stripe: data copies, then P, then Q.
    pub fn roles(&self) -> impl Iterator<Item = usize> + '_ {
        self.columns
            .iter()
            .flatten()
            .copied()
            .chain(self.p)
            .chain(self.q)
    }
}

/// The geometry of an array: level, members, chunk, and the size of each member's data
/// area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The level.
    pub level: Level,
    /// Number of member roles (`raid_disks`).
    pub members: usize,
    /// Copies per mirror group (RAID10; `members` for RAID1, 1 otherwise).
    pub copies: usize,
    /// Chunk size in bytes (a power of two, at least 4 KiB).
    pub chunk: u64,
    /// Stripes in the array (member data area / chunk).
    pub stripes: u64,
}

impl Layout {
    /// Data columns per stripe.
    pub fn data_columns(&self) -> usize {
        match self.level {
            Level::Raid0 => self.members,
            Level::Raid1 => 1,
            Level::Raid10 => self.members / self.copies,
            Level::Raid5 => self.members - 1,
            Level::Raid6 => self.members - 2,
        }
    }

    /// Array bytes per stripe.
    pub fn stripe_bytes(&self) -> u64 {
        self.chunk * self.data_columns() as u64
    }

    /// Array capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.stripe_bytes() * self.stripes
    }

    /// How many members may be lost without losing data, in the best case of where
    /// they are (RAID10: one per mirror group, `copies - 1` each).
    pub fn tolerance(&self) -> usize {
        match self.level {
            Level::Raid0 => 0,
            Level::Raid1 => self.members - 1,
            Level::Raid10 => (self.copies - 1) * (self.members / self.copies),
            Level::Raid5 => 1,
            Level::Raid6 => 2,
        }
    }

    /// Whether the data survives with exactly the roles in `missing` gone.
    pub fn survives(&self, missing: &[bool]) -> bool {
        match self.level {
            Level::Raid0 => !missing.iter().any(|&m| m),
            Level::Raid1 | Level::Raid10 => missing
                .chunks(self.copies)
                .all(|group| group.iter().any(|&m| !m)),
            Level::Raid5 | Level::Raid6 => {
                missing.iter().filter(|&&m| m).count() <= self.level.parity_count()
            }
        }
    }

    /// The roles of stripe `s`.
    pub fn stripe_map(&self, s: u64) -> StripeMap {
        let n = self.members;
        match self.level {
            Level::Raid0 => StripeMap {
                columns: (0..n).map(|r| vec![r]).collect(),
                p: None,
                q: None,
            },
            Level::Raid1 => StripeMap {
                columns: vec![(0..n).collect()],
                p: None,
                q: None,
            },
            Level::Raid10 => StripeMap {
                columns: (0..n / self.copies)
                    .map(|g| (g * self.copies..(g + 1) * self.copies).collect())
                    .collect(),
                p: None,
                q: None,
            },
            Level::Raid5 => {
                let pd = n - 1 - (s % n as u64) as usize;
                StripeMap {
                    columns: (0..n - 1).map(|j| vec![(pd + 1 + j) % n]).collect(),
                    p: Some(pd),
                    q: None,
                }
            }
            Level::Raid6 => {
                let pd = n - 1 - (s % n as u64) as usize;
                StripeMap {
                    columns: (0..n - 2).map(|j| vec![(pd + 2 + j) % n]).collect(),
                    p: Some(pd),
                    q: Some((pd + 1) % n),
                }
            }
        }
    }

    /// Splits array range `[offset, offset + len)` into pieces that each lie in one
    /// column of one stripe: `(stripe, column, offset in chunk, length, offset in the
    /// request)`.
    pub fn pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut at = offset;
        let end = offset + len;
        let sb = self.stripe_bytes();
        while at < end {
            let stripe = at / sb;
            let in_stripe = at % sb;
            let column = (in_stripe / self.chunk) as usize;
            let in_chunk = in_stripe % self.chunk;
            let n = (self.chunk - in_chunk).min(end - at);
            out.push(Piece {
                stripe,
                column,
                chunk_offset: in_chunk,
                len: n,
                buf_offset: at - offset,
            });
            at += n;
        }
        out
    }
}

/// Part of a request inside one column of one stripe. See [`Layout::pieces`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// The stripe.
    pub stripe: u64,
    /// The data column.
    pub column: usize,
    /// Byte offset inside the chunk.
    pub chunk_offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Byte offset inside the request.
    pub buf_offset: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(level: Level, members: usize) -> Layout {
        Layout {
            level,
            members,
            copies: if level == Level::Raid10 { 2 } else { 1 },
            chunk: 64 << 10,
            stripes: 100,
        }
    }

    #[test]
    fn left_symmetric_matches_md() {
        // md raid5, 4 disks, left-symmetric: stripe 0 parity on disk 3, data on 0,1,2;
        // stripe 1 parity on 2, data 3,0,1; stripe 2 parity 1, data 2,3,0.
        let l = layout(Level::Raid5, 4);
        let m = l.stripe_map(0);
        assert_eq!((m.p, m.columns.concat()), (Some(3), vec![0, 1, 2]));
        let m = l.stripe_map(1);
        assert_eq!((m.p, m.columns.concat()), (Some(2), vec![3, 0, 1]));
        let m = l.stripe_map(2);
        assert_eq!((m.p, m.columns.concat()), (Some(1), vec![2, 3, 0]));
        // md raid6, 5 disks: stripe 0 P on 4, Q on 0, data 1,2,3.
        let l = layout(Level::Raid6, 5);
        let m = l.stripe_map(0);
        assert_eq!(
            (m.p, m.q, m.columns.concat()),
            (Some(4), Some(0), vec![1, 2, 3])
        );
        let m = l.stripe_map(1);
        assert_eq!(
            (m.p, m.q, m.columns.concat()),
            (Some(3), Some(4), vec![0, 1, 2])
        );
    }

    #[test]
    fn every_role_once_per_stripe() {
        for (level, n) in [
            (Level::Raid0, 3),
            (Level::Raid1, 3),
            (Level::Raid10, 6),
            (Level::Raid5, 5),
            (Level::Raid6, 6),
        ] {
            let l = layout(level, n);
            for s in 0..20 {
                let mut roles: Vec<usize> = l.stripe_map(s).roles().collect();
                roles.sort_unstable();
                assert_eq!(roles, (0..n).collect::<Vec<_>>(), "{level} stripe {s}");
            }
        }
    }

    #[test]
    fn pieces_cover_the_range() {
        let l = layout(Level::Raid6, 6);
        let sb = l.stripe_bytes();
        let p = l.pieces(sb - 4096, 3 * l.chunk + 8192);
        assert_eq!(p[0].stripe, 0);
        assert_eq!(p[0].column, 3);
        assert_eq!(p[0].len, 4096);
        assert_eq!(p.iter().map(|x| x.len).sum::<u64>(), 3 * l.chunk + 8192);
        assert_eq!(
            p.last().map(|x| (x.stripe, x.column, x.len)),
            Some((1, 3, 4096))
        );
    }

    #[test]
    fn survival() {
        let l = layout(Level::Raid10, 4);
        assert!(l.survives(&[true, false, false, true]));
        assert!(!l.survives(&[true, true, false, false]));
        let l = layout(Level::Raid6, 5);
        assert!(l.survives(&[true, false, true, false, false]));
        assert!(!l.survives(&[true, true, true, false, false]));
    }
}
