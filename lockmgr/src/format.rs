//! The on-disk format: header, heartbeat slots and lock records.
//!
//! Every record is exactly one logical block (a *sector*) of the device, so that every
//! update is a single-sector COMPARE AND WRITE, the unit every SCSI array implements
//! (VMware's ATS is one sector too). Integers are little-endian. Every record ends with a
//! CRC-32C of the bytes before it; a sector of all zeroes is a valid "never used" record
//! (a free slot of generation 0, an unbound lock record), so formatting is a
//! write-zeroes of the regions plus one header.
//!
//! The byte layouts are tabled in `lockmgr/DESIGN.md`; the constants below are the
//! single source of truth and the tests pin them.
//!
//! Decoding never panics and never trusts a length from the device: every decoder takes
//! the raw sector and returns [`FormatError`] for anything it does not like (the fuzz
//! target `lockmgr_records` checks exactly that).

use serde::Serialize;

/// Magic of the header sector.
pub const HEADER_MAGIC: [u8; 8] = *b"BSLTLKSP";
/// Magic of a heartbeat slot.
pub const SLOT_MAGIC: [u8; 8] = *b"BSLTSLOT";
/// Magic of a lock record.
pub const LOCK_MAGIC: [u8; 8] = *b"BSLTLOCK";
/// The format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Smallest supported sector (logical block) size.
pub const MIN_SECTOR: u32 = 512;
/// Largest supported sector size.
pub const MAX_SECTOR: u32 = 65536;
/// Bytes of a lock record's value block (the CAW-guarded payload, like a DLM LVB).
pub const PAYLOAD_LEN: usize = 48;
/// Offset of the payload in a lock record.
const PAYLOAD_OFF: usize = 64;
/// Offset of the holder table in a lock record.
const HOLDERS_OFF: usize = PAYLOAD_OFF + PAYLOAD_LEN;
/// Bytes of one holder entry: slot (u16) and generation (u32).
const HOLDER_LEN: usize = 6;
/// Bytes of the host name field of a slot (UTF-8, zero padded, display only).
pub const HOSTNAME_LEN: usize = 64;
/// The most lock records a lockspace may have.
pub const MAX_LOCKS: u32 = 1 << 20;
/// "No slot" in a 16-bit slot field.
pub const NO_SLOT: u16 = u16::MAX;

/// Why a sector did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The sector is not the size the format expects.
    #[error("record is {got} bytes, expected {expected}")]
    Size {
        /// Bytes given.
        got: usize,
        /// Bytes expected (the sector size).
        expected: usize,
    },
    /// The magic number is wrong: not a record of this kind.
    #[error("bad magic")]
    Magic,
    /// The checksum does not match: a torn or corrupted sector.
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// CRC stored in the sector.
        stored: u32,
        /// CRC of the sector's contents.
        computed: u32,
    },
    /// A version this code does not know.
    #[error("unsupported format version {0}")]
    Version(u16),
    /// A field holds a value outside its domain.
    #[error("invalid field {field}: {value}")]
    Field {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A record found at the wrong position (a misdirected write).
    #[error("record says index {stored}, found at {at}")]
    Misplaced {
        /// Index stored in the record.
        stored: u32,
        /// Index it was read from.
        at: u32,
    },
}

fn crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Checks size, magic-or-zero and checksum. Returns Ok(false) for an all-zero sector.
fn check_sector(buf: &[u8], sector: usize, magic: &[u8; 8]) -> Result<bool, FormatError> {
    if buf.len() != sector || sector < MIN_SECTOR as usize {
        return Err(FormatError::Size {
            got: buf.len(),
            expected: sector,
        });
    }
    if buf.iter().all(|&b| b == 0) {
        return Ok(false);
    }
    let body = sector - 4;
    let stored = u32::from_le_bytes([buf[body], buf[body + 1], buf[body + 2], buf[body + 3]]);
    let computed = crc(&buf[..body]);
    if stored != computed {
        return Err(FormatError::Checksum { stored, computed });
    }
    if &buf[..8] != magic {
        return Err(FormatError::Magic);
    }
    let version = u16le(buf, 8);
    if version != VERSION {
        return Err(FormatError::Version(version));
    }
    Ok(true)
}

fn seal(buf: &mut [u8]) {
    let body = buf.len() - 4;
    let c = crc(&buf[..body]);
    buf[body..].copy_from_slice(&c.to_le_bytes());
}

fn u16le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32le(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn u64le(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// The most hosts a lockspace with this sector size can have: every host must fit in a
/// lock record's holder table (66 at 512-byte sectors, 663 at 4 KiB).
pub fn max_hosts_for_sector(sector: u32) -> u32 {
    let cap = (sector as usize).saturating_sub(HOLDERS_OFF + 4) / HOLDER_LEN;
    cap.min(NO_SLOT as usize) as u32
}

/// The lockspace header (sector 0 of the lockspace).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Header {
    /// Sector size the lockspace was formatted with; must equal the device's block size.
    pub sector_size: u32,
    /// Identity of this lockspace (random at format time).
    pub lockspace_id: [u8; 16],
    /// Number of heartbeat slots.
    pub max_hosts: u32,
    /// Number of lock records.
    pub max_locks: u32,
    /// Heartbeat period, milliseconds.
    pub heartbeat_ms: u32,
    /// A host whose slot is unchanged this long is dead, milliseconds.
    pub dead_after_ms: u32,
}

impl Header {
    /// Byte offset (from the lockspace start) of slot 0.
    pub fn slots_offset(&self) -> u64 {
        u64::from(self.sector_size)
    }
    /// Byte offset of lock record 0.
    pub fn locks_offset(&self) -> u64 {
        self.slots_offset() + u64::from(self.max_hosts) * u64::from(self.sector_size)
    }
    /// Bytes the whole lockspace occupies.
    pub fn total_bytes(&self) -> u64 {
        self.locks_offset() + u64::from(self.max_locks) * u64::from(self.sector_size)
    }

    /// Checks the fields' domains (also applied on decode).
    pub fn validate(&self) -> Result<(), FormatError> {
        let s = self.sector_size;
        if !s.is_power_of_two() || !(MIN_SECTOR..=MAX_SECTOR).contains(&s) {
            return Err(FormatError::Field {
                field: "sector_size",
                value: s.into(),
            });
        }
        if self.max_hosts == 0 || self.max_hosts > max_hosts_for_sector(s) {
            return Err(FormatError::Field {
                field: "max_hosts",
                value: self.max_hosts.into(),
            });
        }
        if self.max_locks == 0 || self.max_locks > MAX_LOCKS {
            return Err(FormatError::Field {
                field: "max_locks",
                value: self.max_locks.into(),
            });
        }
        if self.heartbeat_ms == 0 {
            return Err(FormatError::Field {
                field: "heartbeat_ms",
                value: 0,
            });
        }
        // dead_after >= 3 heartbeats: the lease (dead_after - heartbeat) then spans at
        // least two renewals, so one slow renewal does not fence a healthy host.
        if u64::from(self.dead_after_ms) < 3 * u64::from(self.heartbeat_ms) {
            return Err(FormatError::Field {
                field: "dead_after_ms",
                value: self.dead_after_ms.into(),
            });
        }
        Ok(())
    }

    /// Encodes into one sector.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.sector_size as usize];
        b[..8].copy_from_slice(&HEADER_MAGIC);
        put16(&mut b, 8, VERSION);
        put32(&mut b, 12, self.sector_size);
        b[16..32].copy_from_slice(&self.lockspace_id);
        put32(&mut b, 32, self.max_hosts);
        put32(&mut b, 36, self.max_locks);
        put32(&mut b, 40, self.heartbeat_ms);
        put32(&mut b, 44, self.dead_after_ms);
        put64(&mut b, 48, self.slots_offset());
        put64(&mut b, 56, self.locks_offset());
        put64(&mut b, 64, self.total_bytes());
        seal(&mut b);
        b
    }

    /// Decodes a header sector read from a device of `sector` bytes per block.
    pub fn decode(buf: &[u8], sector: usize) -> Result<Header, FormatError> {
        if !check_sector(buf, sector, &HEADER_MAGIC)? {
            return Err(FormatError::Magic);
        }
        if buf[10..12] != [0, 0] || buf[72..sector - 4].iter().any(|&b| b != 0) {
            return Err(FormatError::Field {
                field: "header reserved bytes",
                value: 0,
            });
        }
        let h = Header {
            sector_size: u32le(buf, 12),
            lockspace_id: buf[16..32].try_into().map_err(|_| FormatError::Magic)?,
            max_hosts: u32le(buf, 32),
            max_locks: u32le(buf, 36),
            heartbeat_ms: u32le(buf, 40),
            dead_after_ms: u32le(buf, 44),
        };
        if h.sector_size as usize != sector {
            return Err(FormatError::Field {
                field: "sector_size",
                value: h.sector_size.into(),
            });
        }
        h.validate()?;
        let stored = (u64le(buf, 48), u64le(buf, 56), u64le(buf, 64));
        if stored != (h.slots_offset(), h.locks_offset(), h.total_bytes()) {
            return Err(FormatError::Field {
                field: "region offsets",
                value: stored.0,
            });
        }
        Ok(h)
    }
}

/// The state of a heartbeat slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    /// Nobody owns the slot; a joining host may claim it.
    Free,
    /// A host owns the slot and renews it.
    Live,
    /// Another host took the slot over from a dead owner and is recovering it.
    Recovering,
}

impl SlotState {
    fn code(self) -> u8 {
        match self {
            SlotState::Free => 1,
            SlotState::Live => 2,
            SlotState::Recovering => 3,
        }
    }
    fn from_code(c: u8) -> Result<Self, FormatError> {
        Ok(match c {
            1 => SlotState::Free,
            2 => SlotState::Live,
            3 => SlotState::Recovering,
            v => {
                return Err(FormatError::Field {
                    field: "slot state",
                    value: v.into(),
                })
            }
        })
    }
}

/// One heartbeat slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Slot {
    /// Position of the slot (stored, to catch misdirected writes).
    pub index: u32,
    /// Free, live or recovering.
    pub state: SlotState,
    /// The owner's host id (for a recovering slot: the dead owner's).
    pub host: [u8; 16],
    /// Bumped by every claim and every takeover; lock entries carry it.
    pub generation: u32,
    /// Bumped by every renewal.
    pub counter: u64,
    /// Random per claim or takeover: tells a host its own image from another's.
    pub incarnation: u64,
    /// Where the owner's journal lives (opaque to the lock manager).
    pub journal_offset: u64,
    /// Length of the journal.
    pub journal_len: u64,
    /// For a recovering slot: the recovering host's slot, else [`NO_SLOT`].
    pub recoverer_slot: u16,
    /// For a recovering slot: the recovering host's generation.
    pub recoverer_generation: u32,
    /// Host name, display only.
    pub hostname: String,
}

impl Slot {
    /// The never-used slot `index`: free, generation 0 (an all-zero sector).
    pub fn never_used(index: u32) -> Slot {
        Slot {
            index,
            state: SlotState::Free,
            host: [0; 16],
            generation: 0,
            counter: 0,
            incarnation: 0,
            journal_offset: 0,
            journal_len: 0,
            recoverer_slot: NO_SLOT,
            recoverer_generation: 0,
            hostname: String::new(),
        }
    }

    /// Encodes into one sector of `sector` bytes.
    pub fn encode(&self, sector: usize) -> Vec<u8> {
        let mut b = vec![0u8; sector];
        b[..8].copy_from_slice(&SLOT_MAGIC);
        put16(&mut b, 8, VERSION);
        b[10] = self.state.code();
        put32(&mut b, 12, self.index);
        b[16..32].copy_from_slice(&self.host);
        put32(&mut b, 32, self.generation);
        put64(&mut b, 40, self.counter);
        put64(&mut b, 48, self.incarnation);
        put64(&mut b, 56, self.journal_offset);
        put64(&mut b, 64, self.journal_len);
        put16(&mut b, 72, self.recoverer_slot);
        put32(&mut b, 76, self.recoverer_generation);
        let name = truncate_utf8(&self.hostname, HOSTNAME_LEN);
        b[80..80 + name.len()].copy_from_slice(name.as_bytes());
        seal(&mut b);
        b
    }

    /// Decodes the slot read from position `index`.
    pub fn decode(buf: &[u8], sector: usize, index: u32) -> Result<Slot, FormatError> {
        if !check_sector(buf, sector, &SLOT_MAGIC)? {
            return Ok(Slot::never_used(index));
        }
        let stored = u32le(buf, 12);
        if stored != index {
            return Err(FormatError::Misplaced { stored, at: index });
        }
        let name = &buf[80..80 + HOSTNAME_LEN];
        let end = name.iter().position(|&c| c == 0).unwrap_or(HOSTNAME_LEN);
        Ok(Slot {
            index,
            state: SlotState::from_code(buf[10])?,
            host: buf[16..32].try_into().map_err(|_| FormatError::Magic)?,
            generation: u32le(buf, 32),
            counter: u64le(buf, 40),
            incarnation: u64le(buf, 48),
            journal_offset: u64le(buf, 56),
            journal_len: u64le(buf, 64),
            recoverer_slot: u16le(buf, 72),
            recoverer_generation: u32le(buf, 76),
            hostname: String::from_utf8_lossy(&name[..end]).into_owned(),
        })
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// How a lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LockMode {
    /// One holder.
    Exclusive,
    /// Any number of readers, no writer.
    SharedRead,
    /// Any number of writers that coordinate among themselves (VMFS multi-writer,
    /// for clustered guests sharing a disk).
    MultiWriter,
}

impl LockMode {
    fn code(self) -> u8 {
        match self {
            LockMode::Exclusive => 1,
            LockMode::SharedRead => 2,
            LockMode::MultiWriter => 3,
        }
    }
    fn from_code(c: u8) -> Result<Option<Self>, FormatError> {
        Ok(match c {
            0 => None,
            1 => Some(LockMode::Exclusive),
            2 => Some(LockMode::SharedRead),
            3 => Some(LockMode::MultiWriter),
            v => {
                return Err(FormatError::Field {
                    field: "lock mode",
                    value: v.into(),
                })
            }
        })
    }

    /// True when a holder in `self` mode may join holders in `other` mode.
    pub fn compatible(self, other: LockMode) -> bool {
        self == other && self != LockMode::Exclusive
    }
}

/// A holder of a lock: the slot and the slot generation it held it under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Holder {
    /// Heartbeat slot of the holder.
    pub slot: u16,
    /// The holder's slot generation when it acquired.
    pub generation: u32,
}

/// A resource's identity: 32 bytes chosen by the caller (a name, an inode number...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceId(pub [u8; 32]);

impl ResourceId {
    /// The id of a name of at most 32 bytes, zero padded; None when longer or empty.
    pub fn from_name(name: &str) -> Option<ResourceId> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() > 32 {
            return None;
        }
        let mut id = [0u8; 32];
        id[..b.len()].copy_from_slice(b);
        Some(ResourceId(id))
    }

    /// True for the all-zero id, which is not a valid resource.
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|&b| b == 0)
    }

    /// Home record of this id in a table of `n` records (FNV-1a, the same on every
    /// host and every platform).
    pub fn home(&self, n: u32) -> u32 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in &self.0 {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        (h % u64::from(n.max(1))) as u32
    }
}

impl std::fmt::Display for ResourceId {
    /// Printable names as text, anything else as hex.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let end = self.0.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
        let body = &self.0[..end];
        if !body.is_empty() && body.iter().all(|&b| b.is_ascii_graphic() || b == b' ') {
            f.write_str(&String::from_utf8_lossy(body))
        } else {
            for b in &self.0 {
                write!(f, "{b:02x}")?;
            }
            Ok(())
        }
    }
}

impl Serialize for ResourceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A lock record. An unbound record (all zeroes) decodes to `None` from
/// [`LockRecord::decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockRecord {
    /// Position in the lock region.
    pub index: u32,
    /// The resource the record is bound to (for good).
    pub resource: ResourceId,
    /// Mode of the current holders, `None` when nobody holds it.
    pub mode: Option<LockMode>,
    /// Bumped by every grant: a fencing token, monotonic per resource.
    pub epoch: u64,
    /// The holders, at most the lockspace's `max_hosts`.
    pub holders: Vec<Holder>,
    /// The value block, written only with a CAW that also checks the holder.
    pub payload: [u8; PAYLOAD_LEN],
}

impl LockRecord {
    /// A freshly bound record with no holders.
    pub fn bound(index: u32, resource: ResourceId) -> LockRecord {
        LockRecord {
            index,
            resource,
            mode: None,
            epoch: 0,
            holders: Vec::new(),
            payload: [0; PAYLOAD_LEN],
        }
    }

    /// Encodes into one sector.
    ///
    /// # Panics
    /// If there are more holders than the sector can hold (a caller bug: the lockspace
    /// never has more hosts than [`max_hosts_for_sector`]).
    pub fn encode(&self, sector: usize) -> Vec<u8> {
        assert!(
            self.holders.len() <= max_hosts_for_sector(sector as u32) as usize,
            "too many holders"
        );
        let mut b = vec![0u8; sector];
        b[..8].copy_from_slice(&LOCK_MAGIC);
        put16(&mut b, 8, VERSION);
        b[10] = self.mode.map_or(0, LockMode::code);
        put32(&mut b, 12, self.index);
        b[16..48].copy_from_slice(&self.resource.0);
        put64(&mut b, 48, self.epoch);
        put16(&mut b, 56, self.holders.len() as u16);
        b[PAYLOAD_OFF..PAYLOAD_OFF + PAYLOAD_LEN].copy_from_slice(&self.payload);
        for (i, h) in self.holders.iter().enumerate() {
            let at = HOLDERS_OFF + i * HOLDER_LEN;
            put16(&mut b, at, h.slot);
            put32(&mut b, at + 2, h.generation);
        }
        seal(&mut b);
        b
    }

    /// Decodes the record read from position `index`; `Ok(None)` for an unbound
    /// (all-zero) record.
    pub fn decode(
        buf: &[u8],
        sector: usize,
        index: u32,
    ) -> Result<Option<LockRecord>, FormatError> {
        if !check_sector(buf, sector, &LOCK_MAGIC)? {
            return Ok(None);
        }
        let stored = u32le(buf, 12);
        if stored != index {
            return Err(FormatError::Misplaced { stored, at: index });
        }
        let mode = LockMode::from_code(buf[10])?;
        let count = usize::from(u16le(buf, 56));
        if count > max_hosts_for_sector(sector as u32) as usize {
            return Err(FormatError::Field {
                field: "holder count",
                value: count as u64,
            });
        }
        if (count == 0) != mode.is_none() || (mode == Some(LockMode::Exclusive) && count != 1) {
            return Err(FormatError::Field {
                field: "holder count for mode",
                value: count as u64,
            });
        }
        let used = HOLDERS_OFF + count * HOLDER_LEN;
        if buf[11] != 0
            || buf[58..64].iter().any(|&b| b != 0)
            || buf[used..sector - 4].iter().any(|&b| b != 0)
        {
            return Err(FormatError::Field {
                field: "lock record reserved bytes",
                value: 0,
            });
        }
        let mut holders = Vec::with_capacity(count);
        for i in 0..count {
            let at = HOLDERS_OFF + i * HOLDER_LEN;
            holders.push(Holder {
                slot: u16le(buf, at),
                generation: u32le(buf, at + 2),
            });
        }
        let mut resource = [0u8; 32];
        resource.copy_from_slice(&buf[16..48]);
        let mut payload = [0u8; PAYLOAD_LEN];
        payload.copy_from_slice(&buf[PAYLOAD_OFF..PAYLOAD_OFF + PAYLOAD_LEN]);
        Ok(Some(LockRecord {
            index,
            resource: ResourceId(resource),
            mode,
            epoch: u64le(buf, 48),
            holders,
            payload,
        }))
    }
}

/// True when every byte of `current` equals the byte at the same position in `old` or
/// in `new`, and it is neither: the signature of a write of `new` over `old` that tore
/// (a disk persists a prefix of the sector, or a sector's 512-byte pieces in any order).
pub fn is_tear_of(current: &[u8], old: &[u8], new: &[u8]) -> bool {
    current.len() == old.len()
        && current.len() == new.len()
        && current != old
        && current != new
        && current
            .iter()
            .zip(old.iter().zip(new))
            .all(|(c, (o, n))| c == o || c == n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            sector_size: 512,
            lockspace_id: [7; 16],
            max_hosts: 64,
            max_locks: 1024,
            heartbeat_ms: 3000,
            dead_after_ms: 9000,
        }
    }

    #[test]
    fn limits() {
        assert_eq!(max_hosts_for_sector(512), 66);
        assert_eq!(max_hosts_for_sector(4096), 663);
        let h = header();
        assert_eq!(h.total_bytes(), 512 * (1 + 64 + 1024));
    }

    #[test]
    fn header_round_trip_and_validation() {
        let h = header();
        let b = h.encode();
        assert_eq!(Header::decode(&b, 512), Ok(h.clone()));
        assert!(Header::decode(&b, 4096).is_err());
        let mut bad = h.clone();
        bad.dead_after_ms = 8999;
        assert!(bad.validate().is_err());
        bad = h.clone();
        bad.max_hosts = 67;
        assert!(bad.validate().is_err());
        let mut torn = b.clone();
        torn[40] ^= 1;
        assert!(matches!(
            Header::decode(&torn, 512),
            Err(FormatError::Checksum { .. })
        ));
        assert_eq!(Header::decode(&[0; 512], 512), Err(FormatError::Magic));
    }

    #[test]
    fn slot_round_trip() {
        let s = Slot {
            index: 5,
            state: SlotState::Recovering,
            host: [3; 16],
            generation: 9,
            counter: 1 << 40,
            incarnation: 77,
            journal_offset: 4096,
            journal_len: 1 << 20,
            recoverer_slot: 2,
            recoverer_generation: 4,
            hostname: "esx-01.example".into(),
        };
        let b = s.encode(512);
        assert_eq!(Slot::decode(&b, 512, 5), Ok(s));
        assert!(matches!(
            Slot::decode(&b, 512, 6),
            Err(FormatError::Misplaced { .. })
        ));
        assert_eq!(Slot::decode(&[0; 512], 512, 3), Ok(Slot::never_used(3)));
        assert_eq!(
            Slot::decode(
                &LockRecord::bound(5, ResourceId([1; 32])).encode(512),
                512,
                5
            ),
            Err(FormatError::Magic)
        );
    }

    #[test]
    fn lock_round_trip_and_full_table() {
        let mut r = LockRecord::bound(3, ResourceId::from_name("vm1.vmdk").unwrap());
        r.mode = Some(LockMode::SharedRead);
        r.epoch = 12;
        r.payload[0] = 9;
        r.holders = (0..66)
            .map(|i| Holder {
                slot: i,
                generation: u32::from(i) * 3,
            })
            .collect();
        let b = r.encode(512);
        assert_eq!(LockRecord::decode(&b, 512, 3), Ok(Some(r.clone())));
        assert_eq!(LockRecord::decode(&[0; 512], 512, 3), Ok(None));
        // Exclusive with two holders is invalid.
        r.mode = Some(LockMode::Exclusive);
        r.holders.truncate(2);
        assert!(LockRecord::decode(&r.encode(512), 512, 3).is_err());
    }

    #[test]
    fn tear_detection() {
        let old = vec![1u8; 512];
        let mut new = vec![2u8; 512];
        new[0] = 1;
        let mut cur = old.clone();
        cur[256..].copy_from_slice(&new[256..]);
        assert!(is_tear_of(&cur, &old, &new));
        assert!(!is_tear_of(&old, &old, &new));
        assert!(!is_tear_of(&new, &old, &new));
        cur[300] = 3;
        assert!(!is_tear_of(&cur, &old, &new));
    }

    /// The fuzz target's property (`fuzz/fuzz_targets/lockmgr_records.rs`) on random and
    /// mutated sectors: decoding never panics, and a record that decodes re-encodes to
    /// the same bytes.
    #[test]
    fn decoders_on_random_and_mutated_sectors() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut r = LockRecord::bound(3, ResourceId([5; 32]));
        r.mode = Some(LockMode::MultiWriter);
        r.holders = vec![
            Holder {
                slot: 1,
                generation: 2,
            },
            Holder {
                slot: 4,
                generation: 9,
            },
        ];
        let seeds = [
            header().encode(),
            r.encode(512),
            Slot::never_used(3).encode(512),
            vec![0; 512],
        ];
        for i in 0..20_000 {
            let mut b = seeds[i % seeds.len()].clone();
            for _ in 0..(next() % 4) {
                let at = (next() % 512) as usize;
                b[at] = next() as u8;
            }
            if next() % 3 == 0 {
                // Re-seal so the mutation gets past the checksum.
                let c = crc32c::crc32c(&b[..508]);
                b[508..].copy_from_slice(&c.to_le_bytes());
            }
            if let Ok(h) = Header::decode(&b, 512) {
                assert_eq!(h.encode(), b);
            }
            let _ = Slot::decode(&b, 512, 3);
            if let Ok(Some(r)) = LockRecord::decode(&b, 512, 3) {
                assert_eq!(r.encode(512), b);
            }
        }
    }

    #[test]
    fn resource_names() {
        let id = ResourceId::from_name("datastore1/vm.vmdk").unwrap();
        assert_eq!(id.to_string(), "datastore1/vm.vmdk");
        assert!(ResourceId::from_name("").is_none());
        assert!(ResourceId::from_name(&"x".repeat(33)).is_none());
        assert!(ResourceId([0xff; 32]).to_string().starts_with("ffff"));
        assert!(id.home(1000) < 1000);
    }
}
