//! The member superblock: the on-disk record from which an array assembles.
//!
//! Every member (and every spare) carries the whole array description, so any one
//! recent member is enough to know the array, and the newest one (highest event count)
//! decides who belongs to it. Format version 1, little-endian, one 4 KiB block, written
//! alternately to two slots at member offsets 0 and 4096 (slot = events % 2) so that a
//! torn superblock write leaves the previous one intact:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `BSLTRAID` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | CRC32C of the 4096 bytes with this field zero |
//! | 16 | 16 | array UUID |
//! | 32 | 16 | this device's UUID |
//! | 48 | 64 | array name, UTF-8, zero padded |
//! | 112 | 4+4+4+4 | level (0/1/10/5/6), members, copies, chunk bytes |
//! | 128 | 8+8+8+8 | created, updated (Unix seconds), events, flags (1 clean, 2 journal, 4 checksums) |
//! | 160 | 7 x 8 | data offset, data size (per member), journal offset, journal size, journal slot size, checksum offset, checksum size |
//! | 216 | 4 x 8 | journal checkpoint (first sequence number not yet known durable in place), resync position (stripe, `u64::MAX` for none), scrub job (0 none, 1 check, 2 repair), scrub position (stripe) |
//! | 248 | 4+4 | this device's role (`u32::MAX` for a spare), number of spares |
//! | 256 | 64 x 32 | role table: device UUID, state (1 in sync, 2 rebuilding, 3 faulty, 4 missing), 4 reserved, rebuilt stripes |
//! | 2304 | 16 x 16 | spare device UUIDs |
//!
//! Member layout: superblocks in the first MiB, then the write journal, then the block
//! checksums, then the data area from `data_offset` (aligned to 1 MiB or the chunk).

use crate::layout::Level;
use crate::RaidError;
use serde::{Deserialize, Serialize};

/// Superblock magic.
pub const MAGIC: [u8; 8] = *b"BSLTRAID";
/// Current format version.
pub const VERSION: u32 = 1;
/// Size of one superblock.
pub const SB_SIZE: usize = 4096;
/// Member offsets of the two superblock slots.
pub const SB_SLOTS: [u64; 2] = [0, 4096];
/// Most member roles an array can have.
pub const MAX_MEMBERS: usize = 64;
/// Most spares an array can list.
pub const MAX_SPARES: usize = 16;
/// Role number of a spare.
pub const ROLE_SPARE: u32 = u32::MAX;
/// Flag: shut down cleanly (no resync needed).
pub const FLAG_CLEAN: u64 = 1;
/// Flag: the write journal is on.
pub const FLAG_JOURNAL: u64 = 2;
/// Flag: per-block checksums are kept.
pub const FLAG_CHECKSUMS: u64 = 4;
/// Unit of checksums and of the array's logical blocks.
pub const BLOCK: u64 = 4096;
/// Reserved at the start of each member for the superblocks.
pub const HEADER_BYTES: u64 = 1 << 20;

/// A 128-bit identifier.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// A random (version 4) UUID.
    pub fn random() -> Uuid {
        let mut b = [0u8; 16];
        if getrandom::fill(&mut b).is_err() {
            // No OS randomness: fall back to time and address entropy, still unique
            // enough to keep two arrays apart.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            b = (t ^ (&b as *const _ as usize as u128)).to_le_bytes();
        }
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Uuid(b)
    }

    /// True for the all-zero UUID (an empty table entry).
    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl std::fmt::Display for Uuid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = &self.0;
        for (i, x) in b.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{x:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Uuid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl Serialize for Uuid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Uuid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        if hex.len() != 32 {
            return Err(serde::de::Error::custom("a UUID has 32 hex digits"));
        }
        let mut b = [0u8; 16];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| serde::de::Error::custom("bad hex digit in UUID"))?;
        }
        Ok(Uuid(b))
    }
}

/// The state of a role in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoleState {
    /// Holds current data.
    InSync,
    /// Being rebuilt; stripes below the entry's `recovery` are current.
    Rebuilding,
    /// Failed; its device is not trusted.
    Faulty,
    /// No device.
    Missing,
}

impl RoleState {
    fn code(self) -> u32 {
        match self {
            RoleState::InSync => 1,
            RoleState::Rebuilding => 2,
            RoleState::Faulty => 3,
            RoleState::Missing => 4,
        }
    }

    fn from_code(c: u32) -> Option<Self> {
        Some(match c {
            1 => RoleState::InSync,
            2 => RoleState::Rebuilding,
            3 => RoleState::Faulty,
            4 => RoleState::Missing,
            _ => return None,
        })
    }
}

/// One role of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleEntry {
    /// The device holding the role (nil when missing).
    pub device: Uuid,
    /// Its state.
    pub state: RoleState,
    /// For a rebuilding role: stripes rebuilt so far.
    pub recovery: u64,
}

/// The background job recorded for resumption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScrubKind {
    /// No scrub in progress.
    None,
    /// Check only.
    Check,
    /// Check and repair.
    Repair,
}

/// Where the metadata areas and the data area lie on each member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaLayout {
    /// Start of the data area.
    pub data_offset: u64,
    /// Bytes of data area used (a multiple of the chunk).
    pub data_size: u64,
    /// Start of the journal.
    pub journal_offset: u64,
    /// Journal bytes (a multiple of the slot size; 0 without a journal).
    pub journal_size: u64,
    /// Journal slot size: one header block plus one chunk.
    pub journal_slot: u64,
    /// Start of the checksum area.
    pub csum_offset: u64,
    /// Checksum bytes (0 without checksums).
    pub csum_size: u64,
}

impl MetaLayout {
    /// Plans the areas of a member of `member_bytes` for a chunk of `chunk` bytes.
    /// `journal_bytes` overrides the journal's default size (1/64 of the member, at
    /// least 8 slots, at most 64 MiB, or 0 when off).
    pub fn plan(
        member_bytes: u64,
        chunk: u64,
        journal: bool,
        journal_bytes: Option<u64>,
        checksums: bool,
    ) -> Result<MetaLayout, RaidError> {
        let slot = chunk + BLOCK;
        let journal_size = if journal {
            let want = journal_bytes.unwrap_or((member_bytes / 64).min(64 << 20));
            (want / slot).max(8) * slot
        } else {
            0
        };
        let journal_offset = HEADER_BYTES;
        let csum_offset = (journal_offset + journal_size).next_multiple_of(BLOCK);
        let align = chunk.max(1 << 20);
        let too_small = || {
            RaidError::Config(format!(
                "a member of {member_bytes} bytes is too small for chunk {chunk} with its metadata"
            ))
        };
        // Data size d (a multiple of the chunk) such that the checksums of d fit
        // before the aligned data offset and the data fits after it.
        let fixed = csum_offset;
        let room = member_bytes.checked_sub(fixed).ok_or_else(too_small)?;
        let mut data_size = if checksums {
            room / (BLOCK + 4) * BLOCK
        } else {
            room
        } / chunk
            * chunk;
        loop {
            let csum_size = if checksums {
                (data_size / BLOCK * 4).next_multiple_of(BLOCK)
            } else {
                0
            };
            let data_offset = (csum_offset + csum_size).next_multiple_of(align);
            if data_offset + data_size <= member_bytes {
                if data_size == 0 {
                    return Err(too_small());
                }
                return Ok(MetaLayout {
                    data_offset,
                    data_size,
                    journal_offset,
                    journal_size,
                    journal_slot: slot,
                    csum_offset,
                    csum_size,
                });
            }
            data_size = data_size.checked_sub(chunk).ok_or_else(too_small)?;
        }
    }
}

/// A decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// The array.
    pub array_uuid: Uuid,
    /// This device.
    pub device_uuid: Uuid,
    /// The array's name.
    pub name: String,
    /// RAID level.
    pub level: Level,
    /// Member roles.
    pub members: u32,
    /// Copies per mirror group (RAID10).
    pub copies: u32,
    /// Chunk size in bytes.
    pub chunk: u32,
    /// Creation time, Unix seconds.
    pub ctime: u64,
    /// Last update time, Unix seconds.
    pub utime: u64,
    /// Event counter: every update of the array's state increments it.
    pub events: u64,
    /// `FLAG_*` bits.
    pub flags: u64,
    /// The member areas.
    pub meta: MetaLayout,
    /// First journal sequence number whose in-place writes are not known durable.
    pub journal_checkpoint: u64,
    /// Resync position in stripes, `u64::MAX` when no resync is due.
    pub resync_offset: u64,
    /// Scrub in progress.
    pub scrub: ScrubKind,
    /// Scrub position in stripes.
    pub scrub_offset: u64,
    /// This device's role, [`ROLE_SPARE`] for a spare.
    pub role: u32,
    /// The role table (`members` entries).
    pub table: Vec<RoleEntry>,
    /// Spares.
    pub spares: Vec<Uuid>,
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn get_uuid(b: &[u8], at: usize) -> Uuid {
    let mut x = [0u8; 16];
    x.copy_from_slice(&b[at..at + 16]);
    Uuid(x)
}

/// Why a block is not a valid superblock.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not ours (or never written).
    #[error("no superblock (bad magic)")]
    NoMagic,
    /// A newer format.
    #[error("superblock version {0} is newer than this build understands")]
    Version(u32),
    /// The checksum does not match.
    #[error("superblock checksum mismatch")]
    Checksum,
    /// A field is out of range.
    #[error("invalid superblock: {0}")]
    Invalid(&'static str),
}

impl Superblock {
    /// Encodes into one 4 KiB block.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SB_SIZE];
        b[0..8].copy_from_slice(&MAGIC);
        put_u32(&mut b, 8, VERSION);
        b[16..32].copy_from_slice(&self.array_uuid.0);
        b[32..48].copy_from_slice(&self.device_uuid.0);
        let name = self.name.as_bytes();
        let n = name.len().min(64);
        b[48..48 + n].copy_from_slice(&name[..n]);
        put_u32(&mut b, 112, self.level.number());
        put_u32(&mut b, 116, self.members);
        put_u32(&mut b, 120, self.copies);
        put_u32(&mut b, 124, self.chunk);
        put_u64(&mut b, 128, self.ctime);
        put_u64(&mut b, 136, self.utime);
        put_u64(&mut b, 144, self.events);
        put_u64(&mut b, 152, self.flags);
        let m = &self.meta;
        for (i, v) in [
            m.data_offset,
            m.data_size,
            m.journal_offset,
            m.journal_size,
            m.journal_slot,
            m.csum_offset,
            m.csum_size,
        ]
        .into_iter()
        .enumerate()
        {
            put_u64(&mut b, 160 + 8 * i, v);
        }
        put_u64(&mut b, 216, self.journal_checkpoint);
        put_u64(&mut b, 224, self.resync_offset);
        put_u64(
            &mut b,
            232,
            match self.scrub {
                ScrubKind::None => 0,
                ScrubKind::Check => 1,
                ScrubKind::Repair => 2,
            },
        );
        put_u64(&mut b, 240, self.scrub_offset);
        put_u32(&mut b, 248, self.role);
        put_u32(&mut b, 252, self.spares.len().min(MAX_SPARES) as u32);
        for (i, e) in self.table.iter().take(MAX_MEMBERS).enumerate() {
            let at = 256 + 32 * i;
            b[at..at + 16].copy_from_slice(&e.device.0);
            put_u32(&mut b, at + 16, e.state.code());
            put_u64(&mut b, at + 24, e.recovery);
        }
        for (i, s) in self.spares.iter().take(MAX_SPARES).enumerate() {
            let at = 2304 + 16 * i;
            b[at..at + 16].copy_from_slice(&s.0);
        }
        let crc = crc32c::crc32c(&b);
        put_u32(&mut b, 12, crc);
        b
    }

    /// Decodes and validates one block.
    pub fn decode(b: &[u8]) -> Result<Superblock, DecodeError> {
        use DecodeError::Invalid;
        if b.len() < SB_SIZE || b[0..8] != MAGIC {
            return Err(DecodeError::NoMagic);
        }
        let version = get_u32(b, 8);
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let mut copy = b[..SB_SIZE].to_vec();
        put_u32(&mut copy, 12, 0);
        if crc32c::crc32c(&copy) != get_u32(b, 12) {
            return Err(DecodeError::Checksum);
        }
        let level = Level::from_number(get_u32(b, 112)).ok_or(Invalid("level"))?;
        let members = get_u32(b, 116);
        let copies = get_u32(b, 120);
        let chunk = get_u32(b, 124);
        if members == 0
            || members as usize > MAX_MEMBERS
            || (members as usize) < level.min_members()
        {
            return Err(Invalid("member count"));
        }
        let copies_ok = match level {
            Level::Raid10 => copies >= 2 && members.is_multiple_of(copies),
            Level::Raid1 => copies == members,
            _ => copies == 1,
        };
        if !copies_ok {
            return Err(Invalid("copies"));
        }
        if !chunk.is_power_of_two() || u64::from(chunk) < BLOCK || chunk > (16 << 20) {
            return Err(Invalid("chunk size"));
        }
        let name_raw = &b[48..112];
        let end = name_raw.iter().position(|&c| c == 0).unwrap_or(64);
        let name = std::str::from_utf8(&name_raw[..end])
            .map_err(|_| Invalid("name is not UTF-8"))?
            .to_owned();
        let g = |i: usize| get_u64(b, 160 + 8 * i);
        let meta = MetaLayout {
            data_offset: g(0),
            data_size: g(1),
            journal_offset: g(2),
            journal_size: g(3),
            journal_slot: g(4),
            csum_offset: g(5),
            csum_size: g(6),
        };
        let c = u64::from(chunk);
        let aligned = |v: u64| v.is_multiple_of(BLOCK);
        let ends_ok = meta.journal_offset >= HEADER_BYTES
            && meta
                .journal_offset
                .checked_add(meta.journal_size)
                .is_some_and(|e| e <= meta.csum_offset)
            && meta
                .csum_offset
                .checked_add(meta.csum_size)
                .is_some_and(|e| e <= meta.data_offset)
            && meta.data_offset.checked_add(meta.data_size).is_some()
            && [
                meta.data_offset,
                meta.journal_offset,
                meta.csum_offset,
                meta.csum_size,
            ]
            .into_iter()
            .all(aligned)
            && meta.data_size.is_multiple_of(c)
            && meta.data_size > 0
            && meta.journal_slot == c + BLOCK
            && meta.journal_size.is_multiple_of(meta.journal_slot)
            && (meta.csum_size == 0 || meta.csum_size >= meta.data_size / BLOCK * 4);
        if !ends_ok {
            return Err(Invalid("member areas"));
        }
        let scrub = match get_u64(b, 232) {
            0 => ScrubKind::None,
            1 => ScrubKind::Check,
            2 => ScrubKind::Repair,
            _ => return Err(Invalid("scrub kind")),
        };
        let role = get_u32(b, 248);
        if role != ROLE_SPARE && role >= members {
            return Err(Invalid("role"));
        }
        let n_spares = get_u32(b, 252) as usize;
        if n_spares > MAX_SPARES {
            return Err(Invalid("spare count"));
        }
        let mut table = Vec::with_capacity(members as usize);
        for i in 0..members as usize {
            let at = 256 + 32 * i;
            table.push(RoleEntry {
                device: get_uuid(b, at),
                state: RoleState::from_code(get_u32(b, at + 16)).ok_or(Invalid("role state"))?,
                recovery: get_u64(b, at + 24),
            });
        }
        let spares = (0..n_spares).map(|i| get_uuid(b, 2304 + 16 * i)).collect();
        Ok(Superblock {
            array_uuid: get_uuid(b, 16),
            device_uuid: get_uuid(b, 32),
            name,
            level,
            members,
            copies,
            chunk,
            ctime: get_u64(b, 128),
            utime: get_u64(b, 136),
            events: get_u64(b, 144),
            flags: get_u64(b, 152),
            meta,
            journal_checkpoint: get_u64(b, 216),
            resync_offset: get_u64(b, 224),
            scrub,
            scrub_offset: get_u64(b, 240),
            role,
            table,
            spares,
        })
    }

    /// The newest valid superblock of the two slots read from a member (`a` at offset
    /// 0, `b` at 4096), and why neither is valid otherwise.
    pub fn newest(a: &[u8], b: &[u8]) -> Result<Superblock, DecodeError> {
        match (Superblock::decode(a), Superblock::decode(b)) {
            (Ok(x), Ok(y)) => Ok(if y.events > x.events { y } else { x }),
            (Ok(x), Err(_)) | (Err(_), Ok(x)) => Ok(x),
            (Err(e), Err(DecodeError::NoMagic)) | (Err(DecodeError::NoMagic), Err(e)) => Err(e),
            (Err(e), Err(_)) => Err(e),
        }
    }

    /// The member offset this superblock is written to.
    pub fn slot_offset(&self) -> u64 {
        SB_SLOTS[(self.events % 2) as usize]
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample() -> Superblock {
        let meta = MetaLayout::plan(64 << 20, 64 << 10, true, None, true).unwrap();
        Superblock {
            array_uuid: Uuid::random(),
            device_uuid: Uuid::random(),
            name: "pool0".into(),
            level: Level::Raid6,
            members: 5,
            copies: 1,
            chunk: 64 << 10,
            ctime: 1,
            utime: 2,
            events: 7,
            flags: FLAG_JOURNAL,
            meta,
            journal_checkpoint: 42,
            resync_offset: u64::MAX,
            scrub: ScrubKind::Repair,
            scrub_offset: 9,
            role: 3,
            table: (0..5)
                .map(|i| RoleEntry {
                    device: Uuid::random(),
                    state: if i == 2 {
                        RoleState::Rebuilding
                    } else {
                        RoleState::InSync
                    },
                    recovery: i,
                })
                .collect(),
            spares: vec![Uuid::random()],
        }
    }

    #[test]
    fn round_trip_and_checksum() {
        let sb = sample();
        let b = sb.encode();
        assert_eq!(Superblock::decode(&b).unwrap(), sb);
        let mut bad = b.clone();
        bad[3000] ^= 1;
        assert_eq!(Superblock::decode(&bad), Err(DecodeError::Checksum));
        assert_eq!(Superblock::decode(&[0u8; 4096]), Err(DecodeError::NoMagic));
        let mut newer = sb.clone();
        newer.events += 1;
        let nb = newer.encode();
        assert_eq!(Superblock::newest(&b, &nb).unwrap().events, 8);
        assert_eq!(Superblock::newest(&nb, &bad).unwrap().events, 8);
        assert_eq!(Superblock::newest(&bad, &b).unwrap().events, 7);
    }

    #[test]
    fn plan_fits_and_aligns() {
        for (size, chunk) in [
            (16u64 << 20, 4096u64),
            (64 << 20, 64 << 10),
            (1 << 40, 512 << 10),
        ] {
            for (j, c) in [(true, true), (false, false), (true, false)] {
                let m = MetaLayout::plan(size, chunk, j, None, c).unwrap();
                assert!(m.data_offset + m.data_size <= size);
                assert_eq!(m.data_size % chunk, 0);
                assert!(m.csum_size >= m.data_size / BLOCK * 4 || !c);
                assert!(m.journal_offset + m.journal_size <= m.csum_offset);
                // Not wasteful: less than a chunk plus alignment left over.
                assert!(size - m.data_offset - m.data_size < chunk + (1 << 20) + chunk);
            }
        }
        assert!(MetaLayout::plan(1 << 20, 4096, true, None, true).is_err());
    }

    proptest! {
        /// Any bytes: decode never panics, and whatever decodes re-encodes to a block
        /// that decodes the same (the fuzz target's property).
        #[test]
        fn decode_arbitrary(mut bytes in proptest::collection::vec(any::<u8>(), 4096),
                            keep_magic: bool, fix_crc: bool) {
            if keep_magic {
                bytes[0..8].copy_from_slice(&MAGIC);
                bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
            }
            if fix_crc {
                bytes[12..16].fill(0);
                let c = crc32c::crc32c(&bytes);
                bytes[12..16].copy_from_slice(&c.to_le_bytes());
            }
            if let Ok(sb) = Superblock::decode(&bytes) {
                prop_assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
            }
        }
    }
}
