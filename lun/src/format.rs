//! The on-disk format: superblocks, journal blocks, checkpoints and the records they
//! carry, as byte layouts with their encoders and (panic-free) decoders.
//!
//! Everything is little-endian and protected by CRC-32C. `DESIGN.md` beside the crate
//! has the same layouts as tables; the tests here pin them. Decoders take untrusted
//! bytes (a disk from another appliance, a corrupted sector) and return
//! [`DecodeError`] rather than panic; the fuzz target `lun_metadata` holds them to it.

use std::fmt;

/// Metadata I/O unit: superblocks, journal blocks and checkpoint padding.
pub const META_BLOCK: u64 = 4096;
/// Format version written by this build.
pub const VERSION: u32 = 1;
/// "No id" in id fields (no parent, no origin).
pub const NONE: u32 = u32::MAX;
/// Longest volume or pool name in bytes.
pub const MAX_NAME: usize = 128;

/// Superblock magic.
pub const SB_MAGIC: [u8; 8] = *b"BSLTPOOL";
/// Journal block magic.
pub const JB_MAGIC: [u8; 8] = *b"BSLTJRNL";
/// Checkpoint magic.
pub const CP_MAGIC: [u8; 8] = *b"BSLTCKPT";

/// Bytes of a superblock covered by its checksum (the rest of its block is zero).
pub const SB_BYTES: usize = 512;
/// Journal block header size.
pub const JB_HEADER: usize = 64;
/// Record bytes per journal block.
pub const JB_PAYLOAD: usize = META_BLOCK as usize - JB_HEADER;
/// Checkpoint header size.
pub const CP_HEADER: usize = 64;
/// Upper bound of one encoded volume record (used for sizing).
pub const VOL_RECORD_MAX: u64 = 64 + MAX_NAME as u64;
/// Upper bound of one encoded node record without its runs.
pub const NODE_RECORD_MAX: u64 = 24;
/// Encoded size of one run of map entries.
pub const RUN_BYTES: u64 = 12;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(msg.into()))
}

/// A bounds-checked little-endian reader.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return err(format!(
                "truncated: need {n} bytes at {}, have {}",
                self.pos,
                self.remaining()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.bytes(1)?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.bytes(4)?);
        Ok(u32::from_le_bytes(a))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.bytes(8)?);
        Ok(u64::from_le_bytes(a))
    }

    pub(crate) fn arr16(&mut self) -> Result<[u8; 16], DecodeError> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.bytes(16)?);
        Ok(a)
    }

    pub(crate) fn name(&mut self) -> Result<String, DecodeError> {
        let n = self.u8()? as usize;
        let b = self.bytes(n)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => err("name is not UTF-8"),
        }
    }
}

/// A little-endian writer.
#[derive(Default)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    /// Names are at most [`MAX_NAME`] bytes (checked by callers); longer ones are cut.
    pub(crate) fn name(&mut self, s: &str) {
        let b = &s.as_bytes()[..s.len().min(MAX_NAME)];
        self.u8(b.len() as u8);
        self.bytes(b);
    }
}

/// Where everything lives on the pool device. Fixed at format time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Layout {
    /// Allocation unit in bytes (a power of two, 4 KiB to 1 MiB).
    pub chunk_size: u32,
    /// Device size at format time.
    pub device_bytes: u64,
    /// Start of the journal (two halves, one per generation parity).
    pub journal_off: u64,
    /// Bytes of one journal half.
    pub journal_half: u64,
    /// Start of checkpoint slot 0 (slot 1 follows).
    pub cp_off: u64,
    /// Bytes of one checkpoint slot.
    pub cp_slot: u64,
    /// Start of the data area (chunk-aligned).
    pub data_off: u64,
    /// Number of data chunks.
    pub data_chunks: u64,
    /// Most volumes (LUNs, snapshots, clones) the pool holds.
    pub max_volumes: u32,
}

impl Layout {
    /// Computes the layout of a device of `device_bytes`.
    pub fn compute(device_bytes: u64, chunk_size: u32, max_volumes: u32) -> Result<Layout, String> {
        if !chunk_size.is_power_of_two() || !(4096..=(1 << 20)).contains(&chunk_size) {
            return Err(format!(
                "chunk size {chunk_size} must be a power of two from 4 KiB to 1 MiB"
            ));
        }
        if !(1..=65536).contains(&max_volumes) {
            return Err(format!("max volumes {max_volumes} must be 1 to 65536"));
        }
        let cs = u64::from(chunk_size);
        let round = |v: u64| v.div_ceil(META_BLOCK) * META_BLOCK;
        let est_chunks = device_bytes / cs;
        let journal_off = 1 << 20;
        let journal_half = round((device_bytes / 2048).clamp(256 << 10, 64 << 20));
        // Nodes <= 2 x volumes (a hidden node has at least two children); entries <= 2 x
        // chunks (one per owned chunk, plus as many tombstones, which are capped).
        let cp_slot = round(
            CP_HEADER as u64
                + 64
                + u64::from(max_volumes) * VOL_RECORD_MAX
                + 2 * u64::from(max_volumes) * NODE_RECORD_MAX
                + 2 * est_chunks * RUN_BYTES
                + META_BLOCK,
        );
        let cp_off = journal_off + 2 * journal_half;
        let meta_end = cp_off + 2 * cp_slot;
        let data_off = meta_end.div_ceil(cs.max(1 << 20)) * cs.max(1 << 20);
        if data_off >= device_bytes {
            return Err(format!(
                "device of {device_bytes} bytes is too small: metadata alone needs {data_off}"
            ));
        }
        let data_chunks = (device_bytes - data_off) / cs;
        if data_chunks < 16 {
            return Err(format!(
                "device of {device_bytes} bytes leaves only {data_chunks} data chunks"
            ));
        }
        if data_chunks > u64::from(u32::MAX) - 2 {
            return Err(format!(
                "{data_chunks} chunks exceed the 2^32 - 2 limit; use a larger chunk size"
            ));
        }
        Ok(Layout {
            chunk_size,
            device_bytes,
            journal_off,
            journal_half,
            cp_off,
            cp_slot,
            data_off,
            data_chunks,
            max_volumes,
        })
    }

    /// Byte offset of checkpoint slot `slot` (0 or 1).
    pub fn cp_slot_off(&self, slot: u64) -> u64 {
        self.cp_off + (slot % 2) * self.cp_slot
    }

    /// Byte offset of journal block `seq` of generation `gen`.
    pub fn journal_block_off(&self, gen: u64, seq: u64) -> u64 {
        self.journal_off + (gen % 2) * self.journal_half + seq * META_BLOCK
    }

    /// Journal blocks per half.
    pub fn journal_blocks(&self) -> u64 {
        self.journal_half / META_BLOCK
    }

    /// Byte offset of data chunk `phys`.
    pub fn chunk_off(&self, phys: u32) -> u64 {
        self.data_off + u64::from(phys) * u64::from(self.chunk_size)
    }

    /// The most map entries (owned chunks plus tombstones) a checkpoint holds.
    pub fn max_entries(&self) -> u64 {
        2 * self.data_chunks
    }

    fn validate(&self) -> Result<(), DecodeError> {
        let again = Layout::compute(self.device_bytes, self.chunk_size, self.max_volumes)
            .map_err(DecodeError)?;
        if again != *self {
            return err(format!(
                "layout fields are inconsistent: stored {self:?}, computed {again:?}"
            ));
        }
        Ok(())
    }
}

/// Alert thresholds, in percent of capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Thresholds {
    /// Data usage (allocated plus reserved) that raises a warning.
    pub data_warn_pct: u8,
    /// Data usage that raises a critical alert.
    pub data_critical_pct: u8,
    /// Metadata usage that raises a warning.
    pub meta_warn_pct: u8,
    /// Metadata usage that raises a critical alert.
    pub meta_critical_pct: u8,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            data_warn_pct: 80,
            data_critical_pct: 90,
            meta_warn_pct: 80,
            meta_critical_pct: 90,
        }
    }
}

impl Thresholds {
    /// Checks that each warning is below its critical level and all are 1..=100.
    pub fn validate(&self) -> Result<(), String> {
        let ok = |w: u8, c: u8| (1..=100).contains(&w) && (1..=100).contains(&c) && w <= c;
        if !ok(self.data_warn_pct, self.data_critical_pct)
            || !ok(self.meta_warn_pct, self.meta_critical_pct)
        {
            return Err(format!(
                "thresholds must be 1-100% with warning <= critical: {self:?}"
            ));
        }
        Ok(())
    }

    fn encode(&self, w: &mut Writer) {
        w.u8(self.data_warn_pct);
        w.u8(self.data_critical_pct);
        w.u8(self.meta_warn_pct);
        w.u8(self.meta_critical_pct);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let t = Thresholds {
            data_warn_pct: r.u8()?,
            data_critical_pct: r.u8()?,
            meta_warn_pct: r.u8()?,
            meta_critical_pct: r.u8()?,
        };
        t.validate().map_err(DecodeError)?;
        Ok(t)
    }
}

/// One of the two superblock copies (copy `gen % 2`, at byte `copy * 4096`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// The pool's identity.
    pub pool_uuid: [u8; 16],
    /// Generation: bumped by each checkpoint.
    pub gen: u64,
    /// Where everything is.
    pub layout: Layout,
    /// Length of this generation's checkpoint body.
    pub cp_len: u64,
    /// CRC-32C of this generation's checkpoint (header and body).
    pub cp_crc: u32,
    /// Random value every journal block of this generation carries, so that blocks
    /// left by an earlier use of the same generation number never replay.
    pub journal_nonce: u64,
    /// True when this checkpoint equals the previous generation's checkpoint plus its
    /// whole journal (so the two metadata copies can be cross-checked).
    pub chained: bool,
    /// Unix seconds at format.
    pub created: u64,
    /// The pool's name (a label; the daemon's store is the authority).
    pub name: String,
}

impl Superblock {
    /// Encodes into one metadata block.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.bytes(&SB_MAGIC);
        w.u32(VERSION);
        w.u32(u32::from(self.chained)); // flags
        w.bytes(&self.pool_uuid);
        w.u64(self.gen);
        let l = &self.layout;
        w.u32(l.chunk_size);
        w.u32(l.max_volumes);
        w.u64(l.device_bytes);
        w.u64(l.journal_off);
        w.u64(l.journal_half);
        w.u64(l.cp_off);
        w.u64(l.cp_slot);
        w.u64(l.data_off);
        w.u64(l.data_chunks);
        w.u64(self.cp_len);
        w.u32(self.cp_crc);
        w.u64(self.journal_nonce);
        w.u64(self.created);
        w.name(&self.name);
        let mut buf = w.buf;
        buf.resize(SB_BYTES - 4, 0);
        let crc = crc32c::crc32c(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        buf.resize(META_BLOCK as usize, 0);
        buf
    }

    /// Decodes and verifies a superblock block. `Ok(None)` when the block holds no
    /// superblock at all (wrong magic), an error when it holds a damaged or foreign one.
    pub fn decode(buf: &[u8]) -> Result<Option<Superblock>, DecodeError> {
        if buf.len() < SB_BYTES {
            return err("superblock block too short");
        }
        if buf[..8] != SB_MAGIC {
            return Ok(None);
        }
        let mut crc_bytes = [0u8; 4];
        crc_bytes.copy_from_slice(&buf[SB_BYTES - 4..SB_BYTES]);
        if crc32c::crc32c(&buf[..SB_BYTES - 4]) != u32::from_le_bytes(crc_bytes) {
            return err("superblock checksum mismatch");
        }
        let mut r = Reader::new(&buf[8..SB_BYTES - 4]);
        let version = r.u32()?;
        if version != VERSION {
            return err(format!(
                "superblock version {version} is not supported (this build reads {VERSION})"
            ));
        }
        let flags = r.u32()?;
        let pool_uuid = r.arr16()?;
        let gen = r.u64()?;
        let chunk_size = r.u32()?;
        let max_volumes = r.u32()?;
        let layout = Layout {
            chunk_size,
            max_volumes,
            device_bytes: r.u64()?,
            journal_off: r.u64()?,
            journal_half: r.u64()?,
            cp_off: r.u64()?,
            cp_slot: r.u64()?,
            data_off: r.u64()?,
            data_chunks: r.u64()?,
        };
        layout.validate()?;
        let cp_len = r.u64()?;
        if cp_len > layout.cp_slot - CP_HEADER as u64 {
            return err("checkpoint length exceeds its slot");
        }
        let cp_crc = r.u32()?;
        let journal_nonce = r.u64()?;
        let created = r.u64()?;
        let name = r.name()?;
        Ok(Some(Superblock {
            pool_uuid,
            gen,
            layout,
            cp_len,
            cp_crc,
            journal_nonce,
            chained: flags & 1 != 0,
            created,
            name,
        }))
    }
}

/// The header of a journal block. Records fill the rest of the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalHeader {
    /// Pool identity: blocks of an earlier pool on the same device never match.
    pub pool_uuid: [u8; 16],
    /// Generation (the checkpoint this journal extends).
    pub gen: u64,
    /// Position in the generation's half, from 0.
    pub seq: u64,
    /// The generation's journal nonce (see [`Superblock::journal_nonce`]).
    pub nonce: u64,
    /// True when this generation's checkpoint equals the previous checkpoint plus the
    /// whole previous journal (so import may fall back across it).
    pub chained: bool,
}

/// Encodes a journal block holding `payload` (at most [`JB_PAYLOAD`] bytes).
pub fn encode_journal_block(h: &JournalHeader, payload: &[u8]) -> Vec<u8> {
    debug_assert!(payload.len() <= JB_PAYLOAD);
    let mut w = Writer::default();
    w.bytes(&JB_MAGIC);
    w.bytes(&h.pool_uuid);
    w.u64(h.gen);
    w.u64(h.seq);
    w.u64(h.nonce);
    w.u32(payload.len() as u32);
    w.u8(u8::from(h.chained));
    let mut buf = w.buf;
    buf.resize(JB_HEADER - 4, 0);
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(payload);
    buf.resize(META_BLOCK as usize, 0);
    let crc = crc32c::crc32c(&buf);
    buf[JB_HEADER - 4..JB_HEADER].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// What a journal slot holds.
#[derive(Debug, PartialEq, Eq)]
pub enum JournalBlock<'a> {
    /// A valid block of the pool: its header and its record bytes.
    Valid(JournalHeader, &'a [u8]),
    /// No journal block, one of another pool, or a damaged one (the message says which).
    Invalid(String),
}

/// Decodes a journal block of the pool `pool_uuid`.
pub fn decode_journal_block<'a>(buf: &'a [u8], pool_uuid: &[u8; 16]) -> JournalBlock<'a> {
    match try_decode_journal_block(buf, pool_uuid) {
        Ok(v) => v,
        Err(e) => JournalBlock::Invalid(e.0),
    }
}

fn try_decode_journal_block<'a>(
    buf: &'a [u8],
    pool_uuid: &[u8; 16],
) -> Result<JournalBlock<'a>, DecodeError> {
    if buf.len() != META_BLOCK as usize {
        return err("journal block has the wrong size");
    }
    if buf[..8] != JB_MAGIC {
        return err("no journal block");
    }
    let mut r = Reader::new(&buf[8..]);
    let uuid = r.arr16()?;
    if &uuid != pool_uuid {
        return err("journal block of another pool");
    }
    let gen = r.u64()?;
    let seq = r.u64()?;
    let nonce = r.u64()?;
    let len = r.u32()? as usize;
    let chained = r.u8()? != 0;
    if len > JB_PAYLOAD {
        return err("journal block length out of range");
    }
    let mut crc_bytes = [0u8; 4];
    crc_bytes.copy_from_slice(&buf[JB_HEADER - 4..JB_HEADER]);
    let mut crc = crc32c::crc32c(&buf[..JB_HEADER - 4]);
    crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc = crc32c::crc32c_append(crc, &buf[JB_HEADER..]);
    if crc != u32::from_le_bytes(crc_bytes) {
        return err("journal block checksum mismatch");
    }
    Ok(JournalBlock::Valid(
        JournalHeader {
            pool_uuid: uuid,
            gen,
            seq,
            nonce,
            chained,
        },
        &buf[JB_HEADER..JB_HEADER + len],
    ))
}

/// How a volume's space is provisioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provisioning {
    /// Space is taken on first write; the virtual size may exceed the free space.
    Thin,
    /// Space for the whole volume is reserved at create time.
    Thick {
        /// Also allocate and zero every chunk at create time, so that no write ever
        /// allocates (no metadata work on the write path); otherwise chunks are taken
        /// from the reservation on first write.
        eager_zero: bool,
    },
}

impl Provisioning {
    fn code(self) -> u8 {
        match self {
            Provisioning::Thin => 0,
            Provisioning::Thick { eager_zero: false } => 1,
            Provisioning::Thick { eager_zero: true } => 2,
        }
    }

    fn from_code(c: u8) -> Result<Self, DecodeError> {
        Ok(match c {
            0 => Provisioning::Thin,
            1 => Provisioning::Thick { eager_zero: false },
            2 => Provisioning::Thick { eager_zero: true },
            _ => return err(format!("unknown provisioning {c}")),
        })
    }

    /// True for thick volumes.
    pub fn is_thick(self) -> bool {
        matches!(self, Provisioning::Thick { .. })
    }
}

/// What a volume is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeKind {
    /// A writable LUN created empty.
    Lun,
    /// A read-only point-in-time image of a LUN, clone or snapshot.
    Snapshot,
    /// A writable LUN created from a snapshot or a LUN, sharing its blocks.
    Clone,
}

impl VolumeKind {
    fn code(self) -> u8 {
        match self {
            VolumeKind::Lun => 0,
            VolumeKind::Snapshot => 1,
            VolumeKind::Clone => 2,
        }
    }

    fn from_code(c: u8) -> Result<Self, DecodeError> {
        Ok(match c {
            0 => VolumeKind::Lun,
            1 => VolumeKind::Snapshot,
            2 => VolumeKind::Clone,
            _ => return err(format!("unknown volume kind {c}")),
        })
    }

    /// True for kinds that take writes.
    pub fn writable(self) -> bool {
        !matches!(self, VolumeKind::Snapshot)
    }
}

/// A volume as stored in checkpoints and create records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    /// Pool-local id (stable for the volume's life).
    pub id: u32,
    /// The node holding its map.
    pub node: u32,
    /// What it is.
    pub kind: VolumeKind,
    /// How it is provisioned.
    pub provisioning: Provisioning,
    /// Logical block size.
    pub block_size: u32,
    /// Size in bytes.
    pub size: u64,
    /// 128-bit identity (NAA identifiers derive from it).
    pub uuid: [u8; 16],
    /// Unix seconds.
    pub created: u64,
    /// The volume it was taken from ([`NONE`] if none).
    pub origin: u32,
    /// Its name, unique in the pool.
    pub name: String,
}

impl VolumeRecord {
    fn encode(&self, w: &mut Writer) {
        w.u32(self.id);
        w.u32(self.node);
        w.u8(self.kind.code());
        w.u8(self.provisioning.code());
        w.u32(self.block_size);
        w.u64(self.size);
        w.bytes(&self.uuid);
        w.u64(self.created);
        w.u32(self.origin);
        w.name(&self.name);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(VolumeRecord {
            id: r.u32()?,
            node: r.u32()?,
            kind: VolumeKind::from_code(r.u8()?)?,
            provisioning: Provisioning::from_code(r.u8()?)?,
            block_size: r.u32()?,
            size: r.u64()?,
            uuid: r.arr16()?,
            created: r.u64()?,
            origin: r.u32()?,
            name: r.name()?,
        })
    }
}

/// Identity fields of a volume made by a snapshot or clone record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewVolume {
    /// Its id.
    pub vol: u32,
    /// Its name.
    pub name: String,
    /// Its 128-bit identity.
    pub uuid: [u8; 16],
    /// Unix seconds.
    pub created: u64,
}

impl NewVolume {
    fn encode(&self, w: &mut Writer) {
        w.u32(self.vol);
        w.bytes(&self.uuid);
        w.u64(self.created);
        w.name(&self.name);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(NewVolume {
            vol: r.u32()?,
            uuid: r.arr16()?,
            created: r.u64()?,
            name: r.name()?,
        })
    }
}

/// A journal record: one logical change to the pool's metadata. Replaying the same
/// records on the same checkpoint always gives the same state (every choice, such as
/// which chunk was allocated or which node id was taken, is in the record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A new, empty LUN (`record.kind` is [`VolumeKind::Lun`]).
    Create(VolumeRecord),
    /// Map `count` chunks from `x` of writable `node` to `phys..phys+count`.
    Map {
        /// Node.
        node: u32,
        /// First virtual chunk.
        x: u32,
        /// First physical chunk.
        phys: u32,
        /// Chunks.
        count: u32,
    },
    /// Make `count` chunks from `x` of `node` holes, freeing the ones it owns.
    Unmap {
        /// Node.
        node: u32,
        /// First virtual chunk.
        x: u32,
        /// Chunks.
        count: u32,
    },
    /// Make the inherited chunks among `count` from `x` of `node` holes; chunks it owns
    /// stay (the caller zeroed them in place).
    Tomb {
        /// Node.
        node: u32,
        /// First virtual chunk.
        x: u32,
        /// Chunks.
        count: u32,
    },
    /// Freeze writable volume `src` as the new snapshot `snap`; `src` continues on the
    /// new node `new_node`.
    Snapshot {
        /// The volume snapshotted.
        src: u32,
        /// Its new head node.
        new_node: u32,
        /// The snapshot.
        snap: NewVolume,
    },
    /// A writable clone of `src` on node `node`. When `src` is writable it is first
    /// frozen into a hidden node and continues on `src_node`.
    Clone {
        /// The source volume.
        src: u32,
        /// The source's new head node ([`NONE`] when the source is a snapshot).
        src_node: u32,
        /// The clone's node.
        node: u32,
        /// The clone.
        clone: NewVolume,
    },
    /// Delete volume `vol`, returning the space no other volume shares.
    Delete {
        /// Volume.
        vol: u32,
    },
    /// Change a writable volume's size; shrinking drops the chunks beyond it.
    Resize {
        /// Volume.
        vol: u32,
        /// New size in bytes.
        size: u64,
    },
    /// Rename a volume.
    Rename {
        /// Volume.
        vol: u32,
        /// New name.
        name: String,
    },
    /// New alert thresholds.
    Thresholds(Thresholds),
}

impl Op {
    /// Appends the encoding of the record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer {
            buf: std::mem::take(out),
        };
        match self {
            Op::Create(v) => {
                w.u8(1);
                v.encode(&mut w);
            }
            Op::Map {
                node,
                x,
                phys,
                count,
            } => {
                w.u8(2);
                w.u32(*node);
                w.u32(*x);
                w.u32(*phys);
                w.u32(*count);
            }
            Op::Unmap { node, x, count } => {
                w.u8(3);
                w.u32(*node);
                w.u32(*x);
                w.u32(*count);
            }
            Op::Tomb { node, x, count } => {
                w.u8(4);
                w.u32(*node);
                w.u32(*x);
                w.u32(*count);
            }
            Op::Snapshot {
                src,
                new_node,
                snap,
            } => {
                w.u8(5);
                w.u32(*src);
                w.u32(*new_node);
                snap.encode(&mut w);
            }
            Op::Clone {
                src,
                src_node,
                node,
                clone,
            } => {
                w.u8(6);
                w.u32(*src);
                w.u32(*src_node);
                w.u32(*node);
                clone.encode(&mut w);
            }
            Op::Delete { vol } => {
                w.u8(7);
                w.u32(*vol);
            }
            Op::Resize { vol, size } => {
                w.u8(8);
                w.u32(*vol);
                w.u64(*size);
            }
            Op::Rename { vol, name } => {
                w.u8(9);
                w.u32(*vol);
                w.name(name);
            }
            Op::Thresholds(t) => {
                w.u8(10);
                t.encode(&mut w);
            }
        }
        *out = w.buf;
    }

    /// Decodes one record.
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Op, DecodeError> {
        Ok(match r.u8()? {
            1 => Op::Create(VolumeRecord::decode(r)?),
            2 => Op::Map {
                node: r.u32()?,
                x: r.u32()?,
                phys: r.u32()?,
                count: r.u32()?,
            },
            3 => Op::Unmap {
                node: r.u32()?,
                x: r.u32()?,
                count: r.u32()?,
            },
            4 => Op::Tomb {
                node: r.u32()?,
                x: r.u32()?,
                count: r.u32()?,
            },
            5 => Op::Snapshot {
                src: r.u32()?,
                new_node: r.u32()?,
                snap: NewVolume::decode(r)?,
            },
            6 => Op::Clone {
                src: r.u32()?,
                src_node: r.u32()?,
                node: r.u32()?,
                clone: NewVolume::decode(r)?,
            },
            7 => Op::Delete { vol: r.u32()? },
            8 => Op::Resize {
                vol: r.u32()?,
                size: r.u64()?,
            },
            9 => Op::Rename {
                vol: r.u32()?,
                name: r.name()?,
            },
            10 => Op::Thresholds(Thresholds::decode(r)?),
            t => return err(format!("unknown record type {t}")),
        })
    }

    /// Decodes every record of a journal block's payload.
    pub fn decode_all(payload: &[u8]) -> Result<Vec<Op>, DecodeError> {
        let mut r = Reader::new(payload);
        let mut ops = Vec::new();
        while r.remaining() > 0 {
            ops.push(Op::decode(&mut r)?);
        }
        Ok(ops)
    }
}

/// A run of map entries in a checkpoint: `count` chunks from virtual chunk `x` map to
/// `phys..phys+count` (or are tombstones when `phys` is [`NONE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First virtual chunk.
    pub x: u32,
    /// First physical chunk, or [`NONE`] for tombstones.
    pub phys: u32,
    /// Length.
    pub count: u32,
}

/// A node (a map layer) as stored in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Id.
    pub id: u32,
    /// Parent ([`NONE`] for a root).
    pub parent: u32,
    /// Frozen (read-only; it has or had children).
    pub frozen: bool,
    /// Length of the map in chunks.
    pub len: u64,
    /// The entries that differ from the parent, in address order.
    pub runs: Vec<Run>,
}

/// The decoded body of a checkpoint: the whole metadata state of a generation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckpointBody {
    /// Alert thresholds.
    pub thresholds: Thresholds,
    /// Next volume id to hand out.
    pub next_vol: u32,
    /// Next node id to hand out.
    pub next_node: u32,
    /// Volumes.
    pub volumes: Vec<VolumeRecord>,
    /// Nodes, parents before children.
    pub nodes: Vec<NodeRecord>,
}

impl CheckpointBody {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        self.thresholds.encode(&mut w);
        w.u32(self.next_vol);
        w.u32(self.next_node);
        w.u32(self.volumes.len() as u32);
        for v in &self.volumes {
            v.encode(&mut w);
        }
        w.u32(self.nodes.len() as u32);
        for n in &self.nodes {
            w.u32(n.id);
            w.u32(n.parent);
            w.u32(u32::from(n.frozen));
            w.u64(n.len);
            w.u32(n.runs.len() as u32);
            for r in &n.runs {
                w.u32(r.x);
                w.u32(r.phys);
                w.u32(r.count);
            }
        }
        w.buf
    }

    /// Decodes a body (structure only; the state loader checks meaning).
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let thresholds = Thresholds::decode(&mut r)?;
        let next_vol = r.u32()?;
        let next_node = r.u32()?;
        let nvols = r.u32()? as usize;
        // Each record is at least 50 bytes: bound the allocation by what is there.
        if nvols > r.remaining() / 50 {
            return err("volume count exceeds the checkpoint");
        }
        let mut volumes = Vec::with_capacity(nvols);
        for _ in 0..nvols {
            volumes.push(VolumeRecord::decode(&mut r)?);
        }
        let nnodes = r.u32()? as usize;
        if nnodes > r.remaining() / 24 {
            return err("node count exceeds the checkpoint");
        }
        let mut nodes = Vec::with_capacity(nnodes);
        for _ in 0..nnodes {
            let id = r.u32()?;
            let parent = r.u32()?;
            let flags = r.u32()?;
            let len = r.u64()?;
            let nruns = r.u32()? as usize;
            if nruns > r.remaining() / RUN_BYTES as usize {
                return err("run count exceeds the checkpoint");
            }
            let mut runs = Vec::with_capacity(nruns);
            for _ in 0..nruns {
                runs.push(Run {
                    x: r.u32()?,
                    phys: r.u32()?,
                    count: r.u32()?,
                });
            }
            nodes.push(NodeRecord {
                id,
                parent,
                frozen: flags & 1 != 0,
                len,
                runs,
            });
        }
        if r.remaining() != 0 {
            return err("trailing bytes after the checkpoint body");
        }
        Ok(CheckpointBody {
            thresholds,
            next_vol,
            next_node,
            volumes,
            nodes,
        })
    }
}

/// A checkpoint's header, at the start of its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointHeader {
    /// Pool identity.
    pub pool_uuid: [u8; 16],
    /// Generation.
    pub gen: u64,
    /// Body length.
    pub body_len: u64,
}

/// Encodes a whole checkpoint (header and body), padded to metadata blocks. Returns
/// the bytes and the CRC the superblock records.
pub fn encode_checkpoint(h: &CheckpointHeader, body: &[u8]) -> (Vec<u8>, u32) {
    let mut w = Writer::default();
    w.bytes(&CP_MAGIC);
    w.u32(VERSION);
    w.bytes(&h.pool_uuid);
    w.u64(h.gen);
    w.u64(body.len() as u64);
    w.u32(crc32c::crc32c(body));
    let mut buf = w.buf;
    buf.resize(CP_HEADER, 0);
    buf.extend_from_slice(body);
    let crc = crc32c::crc32c(&buf);
    let padded = (buf.len() as u64).div_ceil(META_BLOCK) * META_BLOCK;
    buf.resize(padded as usize, 0);
    (buf, crc)
}

/// Verifies a checkpoint read from its slot against its superblock, and returns the
/// body bytes.
pub fn decode_checkpoint<'a>(buf: &'a [u8], sb: &Superblock) -> Result<&'a [u8], DecodeError> {
    let total = CP_HEADER + sb.cp_len as usize;
    if buf.len() < total {
        return err("checkpoint shorter than recorded");
    }
    if buf[..8] != CP_MAGIC {
        return err("no checkpoint at the slot");
    }
    if crc32c::crc32c(&buf[..total]) != sb.cp_crc {
        return err("checkpoint checksum mismatch");
    }
    let mut r = Reader::new(&buf[8..CP_HEADER]);
    let version = r.u32()?;
    if version != VERSION {
        return err(format!("checkpoint version {version} is not supported"));
    }
    let uuid = r.arr16()?;
    let gen = r.u64()?;
    let body_len = r.u64()?;
    let body_crc = r.u32()?;
    if uuid != sb.pool_uuid || gen != sb.gen || body_len != sb.cp_len {
        return err("checkpoint header does not match its superblock");
    }
    let body = &buf[CP_HEADER..total];
    if crc32c::crc32c(body) != body_crc {
        return err("checkpoint body checksum mismatch");
    }
    Ok(body)
}

impl fmt::Display for Provisioning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Provisioning::Thin => f.write_str("thin"),
            Provisioning::Thick { eager_zero: false } => f.write_str("thick"),
            Provisioning::Thick { eager_zero: true } => f.write_str("thick-eager"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn layout() -> Layout {
        Layout::compute(1 << 30, 65536, 256).unwrap()
    }

    fn sb() -> Superblock {
        Superblock {
            pool_uuid: [7; 16],
            gen: 42,
            layout: layout(),
            cp_len: 100,
            cp_crc: 0xdead_beef,
            journal_nonce: 77,
            chained: true,
            created: 1_700_000_000,
            name: "tank".into(),
        }
    }

    #[test]
    fn layout_is_ordered_and_aligned() {
        for (size, cs) in [(64u64 << 20, 8192u32), (1 << 30, 65536), (1 << 40, 65536)] {
            let l = Layout::compute(size, cs, 1024).unwrap();
            assert!(l.journal_off >= 2 * META_BLOCK);
            assert!(l.cp_off >= l.journal_off + 2 * l.journal_half);
            assert!(l.data_off >= l.cp_off + 2 * l.cp_slot);
            assert_eq!(l.data_off % u64::from(cs), 0);
            assert!(l.data_off + l.data_chunks * u64::from(cs) <= size);
            // Metadata overhead stays small for real sizes.
            if size >= 1 << 30 {
                assert!(l.data_off * 100 / size < 2, "{l:?}");
            }
        }
        assert!(Layout::compute(1 << 20, 65536, 16).is_err());
        assert!(Layout::compute(1 << 30, 3000, 16).is_err());
    }

    #[test]
    fn superblock_roundtrip_and_damage() {
        let s = sb();
        let buf = s.encode();
        assert_eq!(buf.len(), 4096);
        assert_eq!(Superblock::decode(&buf).unwrap(), Some(s));
        assert_eq!(Superblock::decode(&[0u8; 4096]).unwrap(), None);
        for bit in [70 * 8, 100 * 8 + 3, 508 * 8] {
            let mut b = buf.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(Superblock::decode(&b).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn journal_block_roundtrip_and_damage() {
        let h = JournalHeader {
            pool_uuid: [3; 16],
            gen: 5,
            seq: 9,
            nonce: 11,
            chained: true,
        };
        let mut payload = Vec::new();
        Op::Map {
            node: 1,
            x: 2,
            phys: 3,
            count: 4,
        }
        .encode(&mut payload);
        let b = encode_journal_block(&h, &payload);
        assert_eq!(
            decode_journal_block(&b, &[3; 16]),
            JournalBlock::Valid(h, &payload[..])
        );
        assert!(matches!(
            decode_journal_block(&b, &[4; 16]),
            JournalBlock::Invalid(_)
        ));
        let mut bad = b.clone();
        bad[JB_HEADER + 1] ^= 0x10;
        assert!(matches!(
            decode_journal_block(&bad, &[3; 16]),
            JournalBlock::Invalid(_)
        ));
    }

    fn any_name() -> BoxedStrategy<String> {
        "[a-z0-9@._-]{1,20}".boxed()
    }

    fn any_op() -> impl Strategy<Value = Op> {
        let newvol = (any::<u32>(), any_name(), any::<[u8; 16]>(), any::<u64>())
            .prop_map(|(vol, name, uuid, created)| NewVolume {
                vol,
                name,
                uuid,
                created,
            })
            .boxed();
        prop_oneof![
            (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
                |(node, x, phys, count)| Op::Map {
                    node,
                    x,
                    phys,
                    count
                }
            ),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(node, x, count)| Op::Unmap {
                node,
                x,
                count
            }),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(node, x, count)| Op::Tomb {
                node,
                x,
                count
            }),
            (any::<u32>(), any::<u32>(), newvol.clone()).prop_map(|(src, new_node, snap)| {
                Op::Snapshot {
                    src,
                    new_node,
                    snap,
                }
            }),
            (any::<u32>(), any::<u32>(), any::<u32>(), newvol).prop_map(
                |(src, src_node, node, clone)| Op::Clone {
                    src,
                    src_node,
                    node,
                    clone
                }
            ),
            any::<u32>().prop_map(|vol| Op::Delete { vol }),
            (any::<u32>(), any::<u64>()).prop_map(|(vol, size)| Op::Resize { vol, size }),
            (any::<u32>(), any_name()).prop_map(|(vol, name)| Op::Rename { vol, name }),
            (any::<u32>(), any_name(), any::<u64>(), any::<bool>()).prop_map(
                |(id, name, size, thick)| Op::Create(VolumeRecord {
                    id,
                    node: id ^ 1,
                    kind: VolumeKind::Lun,
                    provisioning: if thick {
                        Provisioning::Thick { eager_zero: true }
                    } else {
                        Provisioning::Thin
                    },
                    block_size: 4096,
                    size,
                    uuid: [1; 16],
                    created: 9,
                    origin: NONE,
                    name,
                })
            ),
        ]
    }

    proptest! {
        #[test]
        fn ops_roundtrip(ops in proptest::collection::vec(any_op(), 0..20)) {
            let mut buf = Vec::new();
            for op in &ops {
                op.encode(&mut buf);
            }
            prop_assert_eq!(Op::decode_all(&buf).unwrap(), ops);
        }

        /// The same property as the `lun_metadata` fuzz target: no decoder panics on
        /// arbitrary bytes.
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Op::decode_all(&bytes);
            let _ = CheckpointBody::decode(&bytes);
            let mut block = bytes.clone();
            block.resize(4096, 0);
            let _ = Superblock::decode(&block);
            let _ = decode_journal_block(&block, &[0; 16]);
            let _ = decode_checkpoint(&block, &sb());
        }
    }

    #[test]
    fn checkpoint_roundtrip() {
        let body = CheckpointBody {
            thresholds: Thresholds::default(),
            next_vol: 3,
            next_node: 4,
            volumes: vec![VolumeRecord {
                id: 1,
                node: 2,
                kind: VolumeKind::Lun,
                provisioning: Provisioning::Thin,
                block_size: 4096,
                size: 1 << 30,
                uuid: [9; 16],
                created: 5,
                origin: NONE,
                name: "a".into(),
            }],
            nodes: vec![NodeRecord {
                id: 2,
                parent: NONE,
                frozen: false,
                len: 16384,
                runs: vec![Run {
                    x: 0,
                    phys: 10,
                    count: 5,
                }],
            }],
        };
        let enc = body.encode();
        assert_eq!(CheckpointBody::decode(&enc).unwrap(), body);
        let mut s = sb();
        let (bytes, crc) = encode_checkpoint(
            &CheckpointHeader {
                pool_uuid: s.pool_uuid,
                gen: s.gen,
                body_len: enc.len() as u64,
            },
            &enc,
        );
        s.cp_len = enc.len() as u64;
        s.cp_crc = crc;
        assert_eq!(decode_checkpoint(&bytes, &s).unwrap(), &enc[..]);
        let mut bad = bytes.clone();
        bad[CP_HEADER + 3] ^= 1;
        assert!(decode_checkpoint(&bad, &s).is_err());
    }
}
