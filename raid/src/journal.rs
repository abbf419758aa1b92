//! The write journal that closes the write hole.
//!
//! Every update of a stripe is a transaction with a sequence number. Before any block of
//! the stripe is written in place, each member that takes part writes its own new
//! blocks, behind a header, into a slot of its own journal area, with FUA. Only when
//! every record is durable do the in-place writes start. A transaction's records name
//! all its participants (a role bitmask), so at assembly a transaction is replayed when
//! every participant that is still trusted holds a valid record (header and data
//! CRC32C match); if a trusted participant lacks its record, the in-place writes never
//! started and the stripe still holds its old, consistent contents, so the transaction
//! is dropped. A participant that failed is not needed: its new contents follow from
//! the others (its record was only ever a copy of them). Replay runs in sequence order,
//! which is the order of the updates of any one stripe, since a stripe is locked from
//! the first journal write to the last in-place write.
//!
//! Journal space is a ring of fixed slots (one header block plus one chunk) per member.
//! A checkpoint waits until every transaction below a sequence number has finished in
//! place, flushes the members (and the checksum blocks), then records that number in
//! the superblocks, which frees the slots below it. The journal therefore lives on the
//! members themselves: an array assembles from its disks alone, on any appliance, and
//! the journal survives the loss of any member the level tolerates.

use crate::superblock::{Uuid, BLOCK};
use std::collections::{BTreeSet, VecDeque};

/// Journal record magic.
pub const MAGIC: [u8; 8] = *b"BSLTJRNL";
/// Record flag: no payload, the range becomes zeroes.
pub const FLAG_ZERO: u32 = 1;

/// The header block of a journal record. Layout (little-endian): magic (8), header
/// CRC32C with its own field zero (4), data CRC32C (4), array UUID (16), sequence (8),
/// stripe (8), offset in chunk (4), length (4), role (4), flags (4), participants (8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// The array.
    pub array_uuid: Uuid,
    /// Transaction sequence number.
    pub seq: u64,
    /// The stripe updated.
    pub stripe: u64,
    /// Byte offset of the range inside the member's chunk.
    pub offset: u32,
    /// Length of the range.
    pub len: u32,
    /// The member role this record belongs to.
    pub role: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Bit r set: role r takes part in the transaction.
    pub participants: u64,
    /// CRC32C of the payload (0 for zero records).
    pub data_crc: u32,
}

impl RecordHeader {
    /// Encodes into one block.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[12..16].copy_from_slice(&self.data_crc.to_le_bytes());
        b[16..32].copy_from_slice(&self.array_uuid.0);
        b[32..40].copy_from_slice(&self.seq.to_le_bytes());
        b[40..48].copy_from_slice(&self.stripe.to_le_bytes());
        b[48..52].copy_from_slice(&self.offset.to_le_bytes());
        b[52..56].copy_from_slice(&self.len.to_le_bytes());
        b[56..60].copy_from_slice(&self.role.to_le_bytes());
        b[60..64].copy_from_slice(&self.flags.to_le_bytes());
        b[64..72].copy_from_slice(&self.participants.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b[8..12].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a header block; `None` unless the magic and CRC match.
    pub fn decode(b: &[u8]) -> Option<RecordHeader> {
        if b.len() < BLOCK as usize || b[0..8] != MAGIC {
            return None;
        }
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(x)
        };
        let mut copy = b[..BLOCK as usize].to_vec();
        copy[8..12].fill(0);
        if crc32c::crc32c(&copy) != u32_at(8) {
            return None;
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        Some(RecordHeader {
            array_uuid: Uuid(uuid),
            seq: u64_at(32),
            stripe: u64_at(40),
            offset: u32_at(48),
            len: u32_at(52),
            role: u32_at(56),
            flags: u32_at(60),
            participants: u64_at(64),
            data_crc: u32_at(12),
        })
    }
}

/// Slot bookkeeping of every member's ring.
#[derive(Debug)]
pub(crate) struct Rings {
    /// Slots per member.
    pub slots: u64,
    next: Vec<u64>,
    used: Vec<VecDeque<u64>>,
    /// The next sequence number.
    pub next_seq: u64,
    inflight: BTreeSet<u64>,
}

impl Rings {
    pub(crate) fn new(members: usize, slots: u64, next_seq: u64) -> Self {
        Rings {
            slots,
            next: vec![0; members],
            used: vec![VecDeque::new(); members],
            next_seq,
            inflight: BTreeSet::new(),
        }
    }

    /// A sequence number and one slot per role, or `None` when some role's ring is
    /// full.
    pub(crate) fn try_alloc(&mut self, roles: &[usize]) -> Option<(u64, Vec<u64>)> {
        if roles
            .iter()
            .any(|&r| self.used[r].len() as u64 >= self.slots)
        {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let slots = roles
            .iter()
            .map(|&r| {
                let s = self.next[r] % self.slots;
                self.next[r] += 1;
                self.used[r].push_back(seq);
                s
            })
            .collect();
        self.inflight.insert(seq);
        Some((seq, slots))
    }

    /// The transaction finished in place.
    pub(crate) fn complete(&mut self, seq: u64) {
        self.inflight.remove(&seq);
    }

    /// True while a transaction below `seq` has not finished in place.
    pub(crate) fn busy_below(&self, seq: u64) -> bool {
        self.inflight.first().is_some_and(|&s| s < seq)
    }

    /// Frees the slots of transactions below `checkpoint`.
    pub(crate) fn release_below(&mut self, checkpoint: u64) {
        for q in &mut self.used {
            while q.front().is_some_and(|&s| s < checkpoint) {
                q.pop_front();
            }
        }
    }

    /// The fullest ring's use, from 0 to 1.
    pub(crate) fn usage(&self) -> f64 {
        self.used
            .iter()
            .map(|q| q.len() as f64 / self.slots as f64)
            .fold(0.0, f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_round_trip() {
        let h = RecordHeader {
            array_uuid: Uuid::random(),
            seq: 99,
            stripe: 12345,
            offset: 8192,
            len: 4096,
            role: 3,
            flags: FLAG_ZERO,
            participants: 0b1011,
            data_crc: 77,
        };
        let b = h.encode();
        assert_eq!(RecordHeader::decode(&b), Some(h));
        let mut bad = b.clone();
        bad[70] ^= 4;
        assert_eq!(RecordHeader::decode(&bad), None);
    }

    #[test]
    fn rings_fill_and_release_in_order() {
        let mut r = Rings::new(3, 4, 10);
        let (s1, slots) = r.try_alloc(&[0, 2]).unwrap();
        assert_eq!((s1, slots), (10, vec![0, 0]));
        for _ in 0..3 {
            r.try_alloc(&[0]).unwrap();
        }
        assert!(r.try_alloc(&[0, 1]).is_none(), "role 0 is full");
        assert_eq!(r.try_alloc(&[1]).map(|x| x.1), Some(vec![0]));
        assert!(r.busy_below(11));
        r.complete(10);
        assert!(!r.busy_below(11));
        r.release_below(12);
        assert_eq!(r.try_alloc(&[0]).map(|x| x.1), Some(vec![0]));
        assert_eq!(r.try_alloc(&[0]).map(|x| x.1), Some(vec![1]));
        assert!(r.try_alloc(&[0]).is_none());
    }

    proptest! {
        #[test]
        fn decode_arbitrary(bytes in proptest::collection::vec(any::<u8>(), 4096), magic: bool) {
            let mut bytes = bytes;
            if magic {
                bytes[0..8].copy_from_slice(&MAGIC);
            }
            if let Some(h) = RecordHeader::decode(&bytes) {
                prop_assert_eq!(RecordHeader::decode(&h.encode()), Some(h));
            }
        }
    }
}
