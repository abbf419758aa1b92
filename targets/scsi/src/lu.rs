//! The logical unit: command dispatch, unit attentions, reservation checks, and the
//! block commands (SBC-3).

use crate::cdb::{be, byte, lba_and_len, op, transfer};
use crate::pr::{PrState, PrStore};
use crate::sense::{Sense, Status};
use crate::{spc, xcopy};
use basalt_blockdev::{
    BlockError, CompareOutcome, ExtentKind, SharedBlockDev, WriteFlags, ZeroFlags,
};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The largest data transfer of one command (reported in the Block Limits VPD page);
/// bounds what a transport buffers per command.
pub const MAX_TRANSFER_BYTES: u64 = 32 << 20;
/// Largest COMPARE AND WRITE in blocks.
pub(crate) const MAX_CAW_BLOCKS: u64 = 64;
/// Largest WRITE ATOMIC in blocks.
pub(crate) const MAX_ATOMIC_BYTES: u64 = 1 << 20;
/// Most UNMAP block descriptors in one command.
pub(crate) const MAX_UNMAP_DESCRIPTORS: u64 = 256;
/// Most blocks one UNMAP descriptor (or WRITE SAME with UNMAP) may cover.
pub(crate) const MAX_UNMAP_BLOCKS: u64 = 0xffff_ffff;
/// Chunk in which WRITE SAME with a pattern writes, bytes.
const WRITE_SAME_CHUNK: u64 = 1 << 20;
/// Pending unit attentions kept per nexus.
const MAX_UA: usize = 16;

/// Who sent a command: the I_T nexus (SAM-5), as the transport names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NexusId {
    /// The initiator's name (iSCSI: its IQN), lower-cased by the transport.
    pub initiator: String,
    /// The initiator session id (iSCSI ISID), part of the initiator port name.
    pub isid: [u8; 6],
    /// The target's name (iSCSI: its IQN).
    pub target: String,
    /// Relative target port identifier (iSCSI: the portal group tag).
    pub rel_port: u16,
}

impl NexusId {
    /// The iSCSI initiator port name: `name,i,0xISID`.
    pub fn initiator_port(&self) -> String {
        let mut s = format!("{},i,0x", self.initiator);
        for b in self.isid {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// The iSCSI TransportID (SPC-4 7.6.4.6, format 01: initiator port name).
    pub fn transport_id(&self) -> Vec<u8> {
        let name = self.initiator_port();
        let mut len = name.len() + 1;
        len = len.next_multiple_of(4).max(20);
        let mut t = vec![0x45, 0, (len >> 8) as u8, len as u8];
        t.extend_from_slice(name.as_bytes());
        t.resize(4 + len, 0);
        t
    }
}

/// How a logical unit looks to initiators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunIdentity {
    /// Stable 128-bit identifier; the NAA designator and the unit serial number derive
    /// from it, so they survive restarts as long as the daemon keeps this value.
    pub id: u128,
    /// T10 vendor identification (8 characters, padded).
    pub vendor: String,
    /// Product identification (16 characters, padded).
    pub product: String,
    /// Product revision (4 characters, padded).
    pub revision: String,
    /// Export read-only, whatever the device allows.
    pub read_only: bool,
}

impl LunIdentity {
    /// An identity with Basalt's vendor and product strings.
    pub fn new(id: u128) -> Self {
        LunIdentity {
            id,
            vendor: "BASALT".into(),
            product: "VIRTUAL-DISK".into(),
            revision: "0001".into(),
            read_only: false,
        }
    }

    /// The 16-byte NAA IEEE Registered Extended designator (NAA 6).
    pub fn naa(&self) -> [u8; 16] {
        let mut d = self.id.to_be_bytes();
        d[0] = 0x60 | (d[0] & 0x0f);
        d
    }

    /// The unit serial number (VPD page 0x80): the id in hex.
    pub fn serial(&self) -> String {
        format!("{:032x}", self.id)
    }
}

/// Reset scopes a transport's task management can request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetKind {
    /// LOGICAL UNIT RESET.
    Lun,
    /// TARGET WARM RESET.
    TargetWarm,
    /// TARGET COLD RESET.
    TargetCold,
}

/// Finds the logical units an I_T nexus may access, by their NAA designator.
/// EXTENDED COPY resolves its copy targets only through this.
pub trait LunResolver: Send + Sync {
    /// The unit with this designator (the designator bytes only) if the nexus may
    /// access it.
    fn resolve(&self, designator: &[u8]) -> Option<Arc<LogicalUnit>>;
}

/// The outcome of a command.
#[derive(Debug, Clone)]
pub struct Response {
    /// SCSI status.
    pub status: Status,
    /// Sense data with CHECK CONDITION.
    pub sense: Option<Sense>,
    /// Whether the sense is to be sent in descriptor format (D_SENSE).
    pub descriptor_sense: bool,
    /// Data-In (not yet truncated to the initiator's expected length).
    pub data: Bytes,
}

impl Response {
    /// GOOD with data.
    pub fn good(data: Bytes) -> Self {
        Response {
            status: Status::Good,
            sense: None,
            descriptor_sense: false,
            data,
        }
    }

    /// CHECK CONDITION with sense.
    pub fn check(sense: Sense) -> Self {
        Response {
            status: Status::CheckCondition,
            sense: Some(sense),
            descriptor_sense: false,
            data: Bytes::new(),
        }
    }

    /// A status without sense or data.
    pub fn status(status: Status) -> Self {
        Response {
            status,
            sense: None,
            descriptor_sense: false,
            data: Bytes::new(),
        }
    }

    /// The sense bytes to send (fixed or descriptor format), empty without sense.
    pub fn sense_bytes(&self) -> Bytes {
        match self.sense {
            None => Bytes::new(),
            Some(s) if self.descriptor_sense => Bytes::from(spc::descriptor_sense(&s)),
            Some(s) => s.to_bytes(),
        }
    }
}

type Res = Result<Response, Sense>;

/// Mutable per-unit state outside the data: reservations, attentions, mode settings.
pub(crate) struct LuState {
    pub(crate) pr: PrState,
    pub(crate) legacy: Option<NexusId>,
    pub(crate) ua: HashMap<NexusId, VecDeque<Sense>>,
    pub(crate) known: HashSet<NexusId>,
    pub(crate) prevent: HashSet<NexusId>,
    pub(crate) swp: bool,
    pub(crate) d_sense: bool,
    pub(crate) copies: VecDeque<(NexusId, u8, xcopy::CopyStatus)>,
}

/// A SCSI logical unit (direct-access block device) over a [`SharedBlockDev`].
///
/// Shared by every session that sees it (`Arc`); all methods take `&self`. COMPARE AND
/// WRITE goes to [`BlockDev::compare_and_write`](basalt_blockdev::BlockDev), which the
/// device keeps atomic against every other I/O on it, so it is atomic across sessions.
pub struct LogicalUnit {
    dev: SharedBlockDev,
    ident: LunIdentity,
    state: Mutex<LuState>,
    /// Fast path: no unit attention pending and no reservation of either kind.
    quiet: AtomicBool,
    store: Option<Arc<dyn PrStore>>,
}

impl std::fmt::Debug for LogicalUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogicalUnit")
            .field("ident", &self.ident)
            .finish()
    }
}

impl LogicalUnit {
    /// A unit over `dev` with `ident`; `store` persists APTPL reservations (loaded now).
    pub fn new(dev: SharedBlockDev, ident: LunIdentity, store: Option<Arc<dyn PrStore>>) -> Self {
        let pr = store
            .as_ref()
            .and_then(|s| s.load().ok().flatten())
            .and_then(|b| PrState::decode(&b))
            .unwrap_or_default();
        let quiet = pr.is_empty();
        LogicalUnit {
            dev,
            ident,
            state: Mutex::new(LuState {
                pr,
                legacy: None,
                ua: HashMap::new(),
                known: HashSet::new(),
                prevent: HashSet::new(),
                swp: false,
                d_sense: false,
                copies: VecDeque::new(),
            }),
            quiet: AtomicBool::new(quiet),
            store,
        }
    }

    /// The identity.
    pub fn identity(&self) -> &LunIdentity {
        &self.ident
    }

    /// The device.
    pub fn device(&self) -> &SharedBlockDev {
        &self.dev
    }

    /// Logical block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.dev.geometry().block_size
    }

    /// Whether the unit carries this NAA designator.
    pub fn has_designator(&self, d: &[u8]) -> bool {
        d == self.ident.naa()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, LuState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn refresh_quiet(&self, st: &LuState) {
        let quiet = st.legacy.is_none() && st.pr.is_empty() && st.ua.values().all(|q| q.is_empty());
        self.quiet.store(quiet, Ordering::Release);
    }

    /// Queues a unit attention for every known nexus except `except`.
    pub(crate) fn ua_all(&self, st: &mut LuState, sense: Sense, except: Option<&NexusId>) {
        let known: Vec<NexusId> = st.known.iter().cloned().collect();
        for n in known {
            if Some(&n) != except {
                push_ua(st, &n, sense);
            }
        }
    }

    pub(crate) fn persist(&self, st: &LuState) {
        if let Some(store) = &self.store {
            let blob = if st.pr.aptpl {
                st.pr.encode()
            } else {
                Vec::new()
            };
            if let Err(e) = store.save(&blob) {
                tracing_free_log(&format!("saving reservations failed: {e}"));
            }
        }
    }

    /// The I_T nexus is gone (logout, connection loss): drops its RESERVE(6) and its
    /// PREVENT MEDIUM REMOVAL. Persistent reservations stay (that is their point).
    pub fn nexus_lost(&self, nexus: &NexusId) {
        let mut st = self.lock();
        if st.legacy.as_ref() == Some(nexus) {
            st.legacy = None;
        }
        st.prevent.remove(nexus);
        st.ua.remove(nexus);
        st.known.remove(nexus);
        self.refresh_quiet(&st);
    }

    /// A reset from task management: clears RESERVE(6) reservations and prevents,
    /// queues POWER ON/RESET unit attentions for every other nexus. A cold reset also
    /// clears persistent reservations without APTPL.
    pub fn reset(&self, kind: ResetKind, by: Option<&NexusId>) {
        let mut st = self.lock();
        st.legacy = None;
        st.prevent.clear();
        if kind == ResetKind::TargetCold && !st.pr.aptpl {
            st.pr = PrState::default();
        }
        let sense = match kind {
            ResetKind::Lun => Sense::UA_LUN_RESET,
            _ => Sense::UA_RESET,
        };
        self.ua_all(&mut st, sense, by);
        self.refresh_quiet(&st);
    }

    /// Runs one command. `data_out` is everything the initiator sent for it.
    pub async fn execute(
        &self,
        nexus: &NexusId,
        resolver: &dyn LunResolver,
        cdb: &[u8],
        data_out: Bytes,
    ) -> Response {
        let opc = byte(cdb, 0);
        if !self.quiet.load(Ordering::Acquire) {
            if let Some(r) = self.pre_checks(nexus, cdb) {
                return r;
            }
        }
        let result = self.dispatch(nexus, resolver, opc, cdb, data_out).await;
        let mut r = match result {
            Ok(r) => r,
            Err(s) => Response::check(s),
        };
        if r.sense.is_some() {
            r.descriptor_sense = self.lock().d_sense;
        }
        r
    }

    /// Tells the unit that a nexus can reach it (at login, or when the LUN is mapped),
    /// so that resets and reservation changes queue unit attentions for it.
    pub fn attach(&self, nexus: &NexusId) {
        let mut st = self.lock();
        if st.known.len() < 4096 {
            st.known.insert(nexus.clone());
        }
    }

    /// Unit attentions and reservation conflicts. `None` lets the command run.
    fn pre_checks(&self, nexus: &NexusId, cdb: &[u8]) -> Option<Response> {
        let opc = byte(cdb, 0);
        let mut st = self.lock();
        if !st.known.contains(nexus) && st.known.len() < 4096 {
            st.known.insert(nexus.clone());
        }
        if !matches!(opc, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE) {
            if let Some(q) = st.ua.get_mut(nexus) {
                if let Some(s) = q.pop_front() {
                    self.refresh_quiet(&st);
                    let mut r = Response::check(s);
                    r.descriptor_sense = st.d_sense;
                    return Some(r);
                }
            }
        }
        // RESERVE(6) held by another nexus.
        if let Some(holder) = &st.legacy {
            if holder != nexus {
                let allowed = match opc {
                    op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE | op::RELEASE_6 => true,
                    op::MAINTENANCE_IN => true,
                    op::PREVENT_ALLOW => byte(cdb, 4) & 3 == 0,
                    _ => false,
                };
                if !allowed {
                    return Some(Response::status(Status::ReservationConflict));
                }
            }
        }
        if st.pr.conflicts(nexus, cdb) {
            return Some(Response::status(Status::ReservationConflict));
        }
        None
    }

    async fn dispatch(
        &self,
        nexus: &NexusId,
        resolver: &dyn LunResolver,
        opc: u8,
        cdb: &[u8],
        data_out: Bytes,
    ) -> Res {
        let g = self.dev.geometry();
        let want = transfer(cdb, g.block_size).data_out;
        let mut data_out = data_out;
        if opc == op::COMPARE_AND_WRITE && data_out.len() as u64 != want {
            // LIO's rule, which VMware and libiscsi expect: the Data-Out must be
            // exactly twice the blocks named in the CDB.
            return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 13, None));
        }
        if data_out.len() as u64 > want {
            // The initiator sent more than the CDB asks for (its expected length was
            // larger): use what the CDB defines; the transport reports the residual.
            data_out.truncate(want as usize);
        }
        // Less than the CDB asks for: each command decides after checking its CDB
        // (block writes write the whole blocks that came; others fail with INVALID
        // FIELD IN COMMAND INFORMATION UNIT).
        // Control byte: NACA and LINK are not supported.
        if let Some(n) = crate::cdb::cdb_len(opc) {
            if byte(cdb, n - 1) & 0x05 != 0 {
                return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, (n - 1) as u16, None));
            }
        }
        match opc {
            op::TEST_UNIT_READY => Ok(Response::good(Bytes::new())),
            op::REQUEST_SENSE => Ok(self.request_sense(nexus, cdb)),
            op::INQUIRY => spc::inquiry(self, nexus, cdb),
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => spc::mode_sense(self, cdb),
            op::MODE_SELECT_6 | op::MODE_SELECT_10 => spc::mode_select(self, cdb, &data_out),
            op::MAINTENANCE_IN if byte(cdb, 1) & 0x1f == op::MI_REPORT_SUPPORTED_OPCODES => {
                spc::report_supported_opcodes(cdb)
            }
            op::READ_CAPACITY_10 => Ok(self.read_capacity10(cdb)),
            op::SERVICE_ACTION_IN_16 => match byte(cdb, 1) & 0x1f {
                op::SAI_READ_CAPACITY_16 => Ok(self.read_capacity16()),
                op::SAI_GET_LBA_STATUS => self.get_lba_status(cdb).await,
                _ => Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 1, None)),
            },
            op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => self.read(cdb).await,
            op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => {
                self.write(cdb, data_out, false).await
            }
            op::WRITE_VERIFY_10 | op::WRITE_VERIFY_12 | op::WRITE_VERIFY_16 => {
                self.write(cdb, data_out, true).await
            }
            // The rare commands with large futures are boxed, so that every command's
            // future (which the transport moves and allocates per command) stays small.
            op::WRITE_ATOMIC_16 => Box::pin(self.write_atomic(cdb, data_out)).await,
            op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => self.verify(cdb, data_out).await,
            op::SYNC_CACHE_10 | op::SYNC_CACHE_16 => self.sync_cache(cdb).await,
            op::PREFETCH_10 | op::PREFETCH_16 => {
                let (lba, n) = lba_and_len(cdb).unwrap_or((0, 0));
                self.check_lba(lba, n)?;
                Ok(Response::status(Status::ConditionMet))
            }
            op::UNMAP => self.unmap(cdb, &data_out).await,
            op::WRITE_SAME_10 | op::WRITE_SAME_16 => Box::pin(self.write_same(cdb, data_out)).await,
            op::COMPARE_AND_WRITE => self.compare_and_write(cdb, data_out).await,
            op::ORWRITE_16 => Box::pin(self.orwrite(cdb, data_out)).await,
            op::START_STOP_UNIT => {
                if byte(cdb, 4) & 0xf0 != 0 && byte(cdb, 4) >> 4 > 0x0b {
                    return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 4, Some(4)));
                }
                Ok(Response::good(Bytes::new()))
            }
            op::PREVENT_ALLOW => {
                let mut st = self.lock();
                if byte(cdb, 4) & 3 != 0 {
                    if st.prevent.len() < 4096 {
                        st.prevent.insert(nexus.clone());
                    }
                } else {
                    st.prevent.remove(nexus);
                }
                Ok(Response::good(Bytes::new()))
            }
            op::READ_DEFECT_DATA_10 => {
                let mut d = vec![0u8; 4];
                d[1] = byte(cdb, 2) & 0x1f;
                Ok(Response::good(truncate(d, be(cdb, 7, 2))))
            }
            op::READ_DEFECT_DATA_12 => {
                let mut d = vec![0u8; 8];
                d[1] = byte(cdb, 1) & 0x1f;
                Ok(Response::good(truncate(d, be(cdb, 6, 4))))
            }
            op::RESERVE_6 => self.reserve6(nexus),
            op::RELEASE_6 => {
                let mut st = self.lock();
                if st.legacy.as_ref() == Some(nexus) {
                    st.legacy = None;
                }
                self.refresh_quiet(&st);
                Ok(Response::good(Bytes::new()))
            }
            op::PR_IN => crate::pr::pr_in(self, cdb),
            op::PR_OUT => crate::pr::pr_out(self, nexus, cdb, &data_out),
            op::EXTENDED_COPY => {
                Box::pin(xcopy::extended_copy(self, nexus, resolver, cdb, &data_out)).await
            }
            op::RECEIVE_COPY_RESULTS => xcopy::receive_copy_results(self, nexus, cdb),
            _ => Err(Sense::INVALID_OPCODE.with_field(true, 0, None)),
        }
    }

    fn request_sense(&self, nexus: &NexusId, cdb: &[u8]) -> Response {
        let mut st = self.lock();
        let s = st
            .ua
            .get_mut(nexus)
            .and_then(|q| q.pop_front())
            .unwrap_or(Sense {
                key: 0,
                asc: 0,
                ascq: 0,
                info: None,
                field: None,
            });
        self.refresh_quiet(&st);
        let desc = byte(cdb, 1) & 1 != 0;
        let data = if desc {
            spc::descriptor_sense(&s)
        } else {
            s.to_fixed().to_vec()
        };
        Response::good(truncate(data, u64::from(byte(cdb, 4))))
    }

    fn reserve6(&self, nexus: &NexusId) -> Res {
        let mut st = self.lock();
        if !st.pr.is_empty() && st.pr.reservation_active() {
            return Ok(Response::status(Status::ReservationConflict));
        }
        match &st.legacy {
            Some(h) if h != nexus => Ok(Response::status(Status::ReservationConflict)),
            _ => {
                st.legacy = Some(nexus.clone());
                self.refresh_quiet(&st);
                Ok(Response::good(Bytes::new()))
            }
        }
    }

    /// The sense a write to this unit gets now if it is write-protected (read-only
    /// identity or device, or software write protect set by MODE SELECT).
    pub fn write_protected(&self) -> Option<Sense> {
        let g = self.dev.geometry();
        if self.ident.read_only || g.capabilities.read_only {
            return Some(Sense::WRITE_PROTECTED);
        }
        if self.lock().swp {
            return Some(Sense {
                ascq: 0x02,
                ..Sense::WRITE_PROTECTED
            });
        }
        None
    }

    pub(crate) fn check_lba(&self, lba: u64, n: u64) -> Result<(), Sense> {
        let blocks = self.dev.geometry().blocks;
        match lba.checked_add(n) {
            Some(end) if end <= blocks && lba <= blocks => Ok(()),
            _ => Err(Sense::LBA_OUT_OF_RANGE),
        }
    }

    /// Largest WRITE ATOMIC in blocks.
    pub(crate) fn max_atomic_blocks(&self) -> u64 {
        (MAX_ATOMIC_BYTES / u64::from(self.block_size())).max(256)
    }

    fn max_blocks(&self) -> u64 {
        MAX_TRANSFER_BYTES / u64::from(self.block_size())
    }

    fn read_capacity10(&self, _cdb: &[u8]) -> Response {
        let g = self.dev.geometry();
        let last = g.blocks.saturating_sub(1).min(0xffff_ffff) as u32;
        let mut d = Vec::with_capacity(8);
        d.extend_from_slice(&last.to_be_bytes());
        d.extend_from_slice(&g.block_size.to_be_bytes());
        Response::good(Bytes::from(d))
    }

    fn read_capacity16(&self) -> Response {
        let g = self.dev.geometry();
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&g.blocks.saturating_sub(1).to_be_bytes());
        d[8..12].copy_from_slice(&g.block_size.to_be_bytes());
        let per_phys = (g.physical_block_size / g.block_size.max(1)).max(1);
        d[13] = per_phys.trailing_zeros() as u8 & 0x0f;
        if g.capabilities.discard {
            d[14] |= 0x80;
            if g.capabilities.discard_zeroes {
                d[14] |= 0x40;
            }
        }
        Response::good(Bytes::from(d))
    }

    /// RDPROTECT/WRPROTECT/VRPROTECT/ORPROTECT must be zero: no protection information.
    fn no_protect(cdb: &[u8]) -> Result<(), Sense> {
        if byte(cdb, 0) != op::READ_6 && byte(cdb, 0) != op::WRITE_6 && byte(cdb, 1) & 0xe0 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 1, Some(7)));
        }
        Ok(())
    }

    fn fua(cdb: &[u8]) -> WriteFlags {
        let opc = byte(cdb, 0);
        WriteFlags {
            fua: opc != op::WRITE_6 && byte(cdb, 1) & 0x08 != 0,
        }
    }

    async fn read(&self, cdb: &[u8]) -> Res {
        Self::no_protect(cdb)?;
        let (lba, n) = lba_and_len(cdb).unwrap_or((0, 0));
        self.check_lba(lba, n)?;
        if n > self.max_blocks() {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        if n == 0 {
            return Ok(Response::good(Bytes::new()));
        }
        let bs = u64::from(self.block_size());
        let data = self.read_bytes(lba * bs, n * bs).await?;
        Ok(Response::good(data))
    }

    /// Reads, split at the device's largest request.
    pub(crate) async fn read_bytes(&self, offset: u64, len: u64) -> Result<Bytes, Sense> {
        let max = u64::from(self.dev.geometry().max_io_bytes);
        if max == 0 || len <= max {
            return self
                .dev
                .read(offset, len as usize)
                .await
                .map_err(|e| io_sense(&e, IoDir::Read));
        }
        let mut out = BytesMut::with_capacity(len as usize);
        let mut at = 0;
        while at < len {
            let n = (len - at).min(max);
            let b = self
                .dev
                .read(offset + at, n as usize)
                .await
                .map_err(|e| io_sense(&e, IoDir::Read))?;
            out.extend_from_slice(&b);
            at += n;
        }
        Ok(out.freeze())
    }

    /// Writes, split at the device's largest request.
    pub(crate) async fn write_bytes(
        &self,
        offset: u64,
        data: Bytes,
        flags: WriteFlags,
    ) -> Result<(), Sense> {
        let max = self.dev.geometry().max_io_bytes as usize;
        if max == 0 || data.len() <= max {
            return self
                .dev
                .write(offset, data, flags)
                .await
                .map_err(|e| io_sense(&e, IoDir::Write));
        }
        let mut at = 0;
        while at < data.len() {
            let n = (data.len() - at).min(max);
            self.dev
                .write(offset + at as u64, data.slice(at..at + n), flags)
                .await
                .map_err(|e| io_sense(&e, IoDir::Write))?;
            at += n;
        }
        Ok(())
    }

    async fn write(&self, cdb: &[u8], data: Bytes, verify: bool) -> Res {
        Self::no_protect(cdb)?;
        let (lba, n) = lba_and_len(cdb).unwrap_or((0, 0));
        if verify && (byte(cdb, 1) >> 1) & 3 == 2 {
            return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 1, Some(2)));
        }
        self.check_lba(lba, n)?;
        if n > self.max_blocks() {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        if let Some(s) = self.write_protected() {
            return Err(s);
        }
        let bs = u64::from(self.block_size());
        // A shorter Data-Out than the CDB asks for (the initiator's expected length
        // was smaller): write the whole blocks that came, as LIO does.
        let n = n.min(data.len() as u64 / bs);
        if n == 0 {
            return Ok(Response::good(Bytes::new()));
        }
        let data = data.slice(..(n * bs) as usize);
        let mut flags = Self::fua(cdb);
        if verify {
            flags.fua = true;
        }
        self.write_bytes(lba * bs, data, flags).await?;
        Ok(Response::good(Bytes::new()))
    }

    async fn write_atomic(&self, cdb: &[u8], data: Bytes) -> Res {
        Self::no_protect(cdb)?;
        let (lba, n) = lba_and_len(cdb).unwrap_or((0, 0));
        self.check_lba(lba, n)?;
        if n > self.max_atomic_blocks() {
            return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 12, None));
        }
        if let Some(s) = self.write_protected() {
            return Err(s);
        }
        let bs = u64::from(self.block_size());
        short(&data, n * bs)?;
        if n == 0 {
            return Ok(Response::good(Bytes::new()));
        }
        // Atomic against every other command: compare-and-write with what is there,
        // retried until nothing changed in between.
        self.atomic_update(lba * bs, n * bs, Self::fua(cdb), |_| data.clone())
            .await?;
        Ok(Response::good(Bytes::new()))
    }

    /// Reads the range, computes new contents from it and writes them atomically
    /// (compare-and-write on what was read; retried on interference).
    async fn atomic_update(
        &self,
        offset: u64,
        len: u64,
        flags: WriteFlags,
        f: impl Fn(&Bytes) -> Bytes,
    ) -> Result<(), Sense> {
        for _ in 0..1000 {
            let old = self.read_bytes(offset, len).await?;
            let new = f(&old);
            match self.dev.compare_and_write(offset, old, new, flags).await {
                Ok(CompareOutcome::Written) => return Ok(()),
                Ok(CompareOutcome::Miscompare { .. }) => continue,
                Err(e) => return Err(io_sense(&e, IoDir::Write)),
            }
        }
        Err(Sense::ABORTED)
    }

    async fn verify(&self, cdb: &[u8], data: Bytes) -> Res {
        Self::no_protect(cdb)?;
        let (lba, n) = lba_and_len(cdb).unwrap_or((0, 0));
        let bytchk = (byte(cdb, 1) >> 1) & 3;
        if bytchk == 2 {
            return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 1, Some(2)));
        }
        self.check_lba(lba, n)?;
        if n > self.max_blocks() {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        if n == 0 {
            return Ok(Response::good(Bytes::new()));
        }
        let bs = u64::from(self.block_size());
        short(&data, crate::cdb::transfer(cdb, self.block_size()).data_out)?;
        let on_disk = self.read_bytes(lba * bs, n * bs).await?;
        let expect: Vec<u8> = match bytchk {
            0 => return Ok(Response::good(Bytes::new())),
            1 => data.to_vec(),
            _ => data
                .iter()
                .copied()
                .cycle()
                .take((n * bs) as usize)
                .collect(),
        };
        if let Some(off) = basalt_blockdev::first_difference(&on_disk, &expect) {
            return Err(Sense::MISCOMPARE.with_info(off));
        }
        Ok(Response::good(Bytes::new()))
    }

    async fn sync_cache(&self, cdb: &[u8]) -> Res {
        let (lba, n) = lba_and_len(cdb).unwrap_or((0, 0));
        self.check_lba(lba, n)?;
        self.dev
            .flush()
            .await
            .map_err(|e| io_sense(&e, IoDir::Write))?;
        Ok(Response::good(Bytes::new()))
    }

    async fn unmap(&self, cdb: &[u8], data: &[u8]) -> Res {
        if byte(cdb, 1) & 1 != 0 {
            // ANCHOR: anchored state is not supported (ANC_SUP = 0).
            return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 1, Some(0)));
        }
        let g = self.dev.geometry();
        if !g.capabilities.discard {
            return Err(Sense::INVALID_OPCODE);
        }
        if let Some(s) = self.write_protected() {
            return Err(s);
        }
        if data.is_empty() {
            return Ok(Response::good(Bytes::new()));
        }
        if data.len() < 8 {
            return Err(Sense::PARAM_LIST_LENGTH);
        }
        let desc_len = be(data, 2, 2) as usize;
        let descs = &data[8..];
        if desc_len > descs.len() {
            return Err(Sense::PARAM_LIST_LENGTH);
        }
        let count = desc_len / 16;
        if count as u64 > MAX_UNMAP_DESCRIPTORS {
            return Err(Sense::INVALID_FIELD_IN_PARAM);
        }
        let mut ranges = Vec::with_capacity(count);
        for i in 0..count {
            let d = &descs[i * 16..i * 16 + 16];
            let lba = be(d, 0, 8);
            let n = be(d, 8, 4);
            self.check_lba(lba, n)?;
            if n > MAX_UNMAP_BLOCKS {
                return Err(Sense::INVALID_FIELD_IN_PARAM);
            }
            ranges.push((lba, n));
        }
        let bs = u64::from(g.block_size);
        for (lba, n) in ranges {
            if n == 0 {
                continue;
            }
            self.dev
                .discard(lba * bs, n * bs)
                .await
                .map_err(|e| io_sense(&e, IoDir::Write))?;
        }
        Ok(Response::good(Bytes::new()))
    }

    async fn write_same(&self, cdb: &[u8], data: Bytes) -> Res {
        Self::no_protect(cdb)?;
        let flags = byte(cdb, 1);
        let unmap = flags & 0x08 != 0;
        if flags & 0x10 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 1, Some(4)));
        }
        let ndob = byte(cdb, 0) == op::WRITE_SAME_16 && flags & 1 != 0;
        let (lba, mut n) = lba_and_len(cdb).unwrap_or((0, 0));
        let g = self.dev.geometry();
        if n == 0 {
            // WSNZ = 0: zero blocks means to the end of the medium.
            n = g.blocks.saturating_sub(lba);
        }
        self.check_lba(lba, n)?;
        if let Some(s) = self.write_protected() {
            return Err(s);
        }
        if unmap && !g.capabilities.discard {
            return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 1, Some(3)));
        }
        let bs = u64::from(g.block_size);
        if !ndob {
            short(&data, bs)?;
        }
        // With UNMAP the blocks are deallocated whatever the data (as LIO does); they
        // read back as zeroes when LBPRZ is reported.
        let zero = ndob || unmap || data.iter().all(|&b| b == 0);
        if n == 0 {
            return Ok(Response::good(Bytes::new()));
        }
        if zero {
            self.dev
                .write_zeroes(
                    lba * bs,
                    n * bs,
                    ZeroFlags {
                        may_unmap: unmap,
                        fast_only: false,
                    },
                )
                .await
                .map_err(|e| io_sense(&e, IoDir::Write))?;
            return Ok(Response::good(Bytes::new()));
        }
        let chunk_blocks = (WRITE_SAME_CHUNK / bs).max(1);
        let mut pattern = BytesMut::with_capacity((chunk_blocks.min(n) * bs) as usize);
        for _ in 0..chunk_blocks.min(n) {
            pattern.extend_from_slice(&data);
        }
        let pattern = pattern.freeze();
        let mut at = 0;
        while at < n {
            let k = (n - at).min(chunk_blocks);
            self.write_bytes(
                (lba + at) * bs,
                pattern.slice(..(k * bs) as usize),
                WriteFlags::default(),
            )
            .await?;
            at += k;
        }
        Ok(Response::good(Bytes::new()))
    }

    async fn compare_and_write(&self, cdb: &[u8], data: Bytes) -> Res {
        Self::no_protect(cdb)?;
        let (lba, n) = lba_and_len(cdb).unwrap_or((0, 0));
        if n > MAX_CAW_BLOCKS {
            return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 13, None));
        }
        self.check_lba(lba, n)?;
        if let Some(s) = self.write_protected() {
            return Err(s);
        }
        if n == 0 {
            return Ok(Response::good(Bytes::new()));
        }
        let bs = u64::from(self.block_size());
        short(&data, 2 * n * bs)?;
        let half = (n * bs) as usize;
        let compare = data.slice(..half);
        let new = data.slice(half..);
        match self
            .dev
            .compare_and_write(lba * bs, compare, new, Self::fua(cdb))
            .await
        {
            Ok(CompareOutcome::Written) => Ok(Response::good(Bytes::new())),
            Ok(CompareOutcome::Miscompare { offset }) => Err(Sense::MISCOMPARE.with_info(offset)),
            Err(e) => Err(io_sense(&e, IoDir::Write)),
        }
    }

    async fn orwrite(&self, cdb: &[u8], data: Bytes) -> Res {
        Self::no_protect(cdb)?;
        let (lba, n) = lba_and_len(cdb).unwrap_or((0, 0));
        self.check_lba(lba, n)?;
        if n > self.max_blocks() {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        if let Some(s) = self.write_protected() {
            return Err(s);
        }
        let bs = u64::from(self.block_size());
        short(&data, n * bs)?;
        if n == 0 {
            return Ok(Response::good(Bytes::new()));
        }
        self.atomic_update(lba * bs, n * bs, Self::fua(cdb), |old| {
            Bytes::from(
                old.iter()
                    .zip(data.iter())
                    .map(|(a, b)| a | b)
                    .collect::<Vec<u8>>(),
            )
        })
        .await?;
        Ok(Response::good(Bytes::new()))
    }

    async fn get_lba_status(&self, cdb: &[u8]) -> Res {
        let lba = be(cdb, 2, 8);
        let alloc = be(cdb, 10, 4);
        let g = self.dev.geometry();
        if lba >= g.blocks {
            return Err(Sense::LBA_OUT_OF_RANGE);
        }
        let bs = u64::from(g.block_size);
        // Describe at most this many blocks per command; the initiator asks again.
        let span = (g.blocks - lba).min((1 << 30) / bs).max(1);
        let max_desc = alloc.saturating_sub(8) / 16;
        let extents = if g.capabilities.discard {
            self.dev
                .block_status(lba * bs, span * bs)
                .await
                .map_err(|e| io_sense(&e, IoDir::Read))?
        } else {
            vec![basalt_blockdev::Extent {
                len: span * bs,
                kind: ExtentKind::Data,
            }]
        };
        let mut descs: Vec<(u64, u64, u8)> = Vec::new();
        let mut at = lba;
        for e in extents {
            let blocks = e.len / bs;
            let st = if e.kind == ExtentKind::Hole { 1 } else { 0 };
            match descs.last_mut() {
                Some(last) if last.2 == st && last.1 + blocks <= 0xffff_ffff => last.1 += blocks,
                _ => descs.push((at, blocks, st)),
            }
            at += blocks;
        }
        descs.truncate(max_desc.max(1) as usize);
        let mut d = Vec::with_capacity(8 + 16 * descs.len());
        d.extend_from_slice(&((4 + 16 * descs.len()) as u32).to_be_bytes());
        d.extend_from_slice(&[0; 4]);
        for (l, n, st) in descs {
            d.extend_from_slice(&l.to_be_bytes());
            d.extend_from_slice(&(n.min(0xffff_ffff) as u32).to_be_bytes());
            d.extend_from_slice(&[st, 0, 0, 0]);
        }
        Ok(Response::good(truncate(d, alloc)))
    }
}

/// Fails with INVALID FIELD IN COMMAND INFORMATION UNIT when fewer than `want` bytes
/// of Data-Out came.
fn short(data: &Bytes, want: u64) -> Result<(), Sense> {
    if (data.len() as u64) < want {
        return Err(Sense::INVALID_FIELD_IN_IU);
    }
    Ok(())
}

fn push_ua(st: &mut LuState, n: &NexusId, s: Sense) {
    let q = st.ua.entry(n.clone()).or_default();
    if q.len() < MAX_UA && !q.contains(&s) {
        q.push_back(s);
    }
}

pub(crate) fn push_ua_for(st: &mut LuState, n: &NexusId, s: Sense) {
    push_ua(st, n, s)
}

fn tracing_free_log(msg: &str) {
    // The core has no logging dependency; the daemon sees failures in its store.
    let _ = msg;
}

/// Truncates `d` to the allocation length.
pub(crate) fn truncate(mut d: Vec<u8>, alloc: u64) -> Bytes {
    if (d.len() as u64) > alloc {
        d.truncate(alloc as usize);
    }
    Bytes::from(d)
}

#[derive(Clone, Copy)]
pub(crate) enum IoDir {
    Read,
    Write,
}

/// Maps a device error to sense data.
pub(crate) fn io_sense(e: &BlockError, dir: IoDir) -> Sense {
    match e {
        BlockError::Misaligned { .. } | BlockError::InvalidRequest(_) => {
            Sense::INVALID_FIELD_IN_CDB
        }
        BlockError::OutOfRange { .. } => Sense::LBA_OUT_OF_RANGE,
        BlockError::ReadOnly => Sense::WRITE_PROTECTED,
        BlockError::Unsupported(_) => Sense::INVALID_FIELD_IN_CDB,
        BlockError::NoSpace => Sense::SPACE_ALLOCATION_FAILED,
        BlockError::Offline(_) => Sense::LU_COMMUNICATION_FAILURE,
        BlockError::Io { .. } => match dir {
            IoDir::Read => Sense::UNRECOVERED_READ,
            IoDir::Write => Sense::WRITE_ERROR,
        },
        _ => Sense::INTERNAL_FAILURE,
    }
}

/// REPORT LUNS (SPC-4 6.29) for the LUNs a nexus may see, whatever LUN it was sent to.
pub fn report_luns(luns: &[u64], cdb: &[u8]) -> Response {
    let alloc = be(cdb, 6, 4);
    let select = byte(cdb, 2);
    if !matches!(select, 0 | 1 | 2 | 0x10 | 0x11 | 0x12) {
        return Response::check(Sense::INVALID_FIELD_IN_CDB.with_field(true, 2, None));
    }
    if alloc < 16 {
        return Response::check(Sense::INVALID_FIELD_IN_CDB.with_field(true, 6, None));
    }
    let list: Vec<u64> = if select == 1 {
        Vec::new()
    } else {
        luns.to_vec()
    };
    let mut d = Vec::with_capacity(8 + 8 * list.len());
    d.extend_from_slice(&((8 * list.len()) as u32).to_be_bytes());
    d.extend_from_slice(&[0; 4]);
    for l in list {
        d.extend_from_slice(&encode_lun(l));
    }
    Response::good(truncate(d, alloc))
}

/// The 8-byte SAM LUN for a LUN number (peripheral addressing below 256, flat above).
pub fn encode_lun(lun: u64) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else {
        b[0] = 0x40 | ((lun >> 8) & 0x3f) as u8;
        b[1] = lun as u8;
    }
    b
}

/// The answer for a command to a LUN the nexus may not see (SPC-4 6.6.2: INQUIRY
/// reports peripheral qualifier 3; REQUEST SENSE reports the error; everything else
/// gets LOGICAL UNIT NOT SUPPORTED).
pub fn no_such_lun(cdb: &[u8]) -> Response {
    match byte(cdb, 0) {
        op::INQUIRY if byte(cdb, 1) & 1 == 0 => {
            let mut d = vec![0u8; 36];
            d[0] = 0x7f;
            d[2] = 0x06;
            d[3] = 0x12;
            d[4] = 31;
            Response::good(truncate(d, be(cdb, 3, 2)))
        }
        op::REQUEST_SENSE => Response::good(truncate(
            Sense::LUN_NOT_SUPPORTED.to_fixed().to_vec(),
            u64::from(byte(cdb, 4)),
        )),
        _ => Response::check(Sense::LUN_NOT_SUPPORTED),
    }
}
