//! Persistent reservations (SPC-4 5.13): PERSISTENT RESERVE IN/OUT, the conflict rules
//! that gate other commands, and APTPL persistence through [`PrStore`].

use crate::cdb::{be, byte, op};
use crate::lu::{push_ua_for, truncate, LogicalUnit, NexusId, Response};
use crate::sense::{Sense, Status};
use bytes::Bytes;
use std::path::PathBuf;
use std::sync::Mutex;

type Res = Result<Response, Sense>;

/// Saves and loads one unit's persistent reservation state (an opaque blob) across
/// restarts, for reservations registered with APTPL. The daemon implements it on its
/// store; `save` with an empty blob means "nothing persisted".
pub trait PrStore: Send + Sync {
    /// Persists `blob` (replacing what was saved). Called with the unit's state lock
    /// held: keep it quick.
    fn save(&self, blob: &[u8]) -> std::io::Result<()>;
    /// The last saved blob, if any.
    fn load(&self) -> std::io::Result<Option<Vec<u8>>>;
}

/// A [`PrStore`] in memory (tests; survives re-creating the unit, not the process).
#[derive(Debug, Default)]
pub struct MemPrStore(Mutex<Option<Vec<u8>>>);

impl PrStore for MemPrStore {
    fn save(&self, blob: &[u8]) -> std::io::Result<()> {
        let mut g = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *g = if blob.is_empty() {
            None
        } else {
            Some(blob.to_vec())
        };
        Ok(())
    }
    fn load(&self) -> std::io::Result<Option<Vec<u8>>> {
        Ok(self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone())
    }
}

/// A [`PrStore`] in a file (written to a temporary name, then renamed).
#[derive(Debug, Clone)]
pub struct FilePrStore(pub PathBuf);

impl PrStore for FilePrStore {
    fn save(&self, blob: &[u8]) -> std::io::Result<()> {
        if blob.is_empty() {
            return match std::fs::remove_file(&self.0) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, blob)?;
        std::fs::rename(tmp, &self.0)
    }
    fn load(&self) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(&self.0) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Reservation types.
const WE: u8 = 1;
const EA: u8 = 3;
const WE_RO: u8 = 5;
const EA_RO: u8 = 6;
const WE_AR: u8 = 7;
const EA_AR: u8 = 8;
/// Most registrations per unit.
const MAX_REGISTRATIONS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Registration {
    key: u64,
    nexus: NexusId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Reservation {
    /// The holder (for all-registrants types: the one that reserved).
    holder: NexusId,
    typ: u8,
}

/// The persistent reservation state of a unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PrState {
    generation: u32,
    regs: Vec<Registration>,
    res: Option<Reservation>,
    pub(crate) aptpl: bool,
}

fn all_registrants(t: u8) -> bool {
    t == WE_AR || t == EA_AR
}

impl PrState {
    pub(crate) fn is_empty(&self) -> bool {
        self.regs.is_empty() && self.res.is_none()
    }

    pub(crate) fn reservation_active(&self) -> bool {
        self.res.is_some()
    }

    fn reg(&self, n: &NexusId) -> Option<&Registration> {
        self.regs.iter().find(|r| &r.nexus == n)
    }

    fn is_holder(&self, n: &NexusId) -> bool {
        match &self.res {
            None => false,
            Some(r) if all_registrants(r.typ) => self.reg(n).is_some(),
            Some(r) => &r.holder == n,
        }
    }

    /// SPC-4 table 45: does `cdb` from `n` conflict with the reservation?
    pub(crate) fn conflicts(&self, n: &NexusId, cdb: &[u8]) -> bool {
        let Some(res) = &self.res else { return false };
        if self.is_holder(n) {
            return false;
        }
        let registered = self.reg(n).is_some();
        let opc = byte(cdb, 0);
        let class = match opc {
            op::INQUIRY
            | op::REPORT_LUNS
            | op::REQUEST_SENSE
            | op::MAINTENANCE_IN
            | op::PR_IN
            | op::PR_OUT
            | op::READ_CAPACITY_10
            | op::TEST_UNIT_READY => return false,
            op::SERVICE_ACTION_IN_16 if byte(cdb, 1) & 0x1f == op::SAI_READ_CAPACITY_16 => {
                return false
            }
            op::PREVENT_ALLOW if byte(cdb, 4) & 3 == 0 => return false,
            op::RESERVE_6 | op::RELEASE_6 => return true,
            op::READ_6
            | op::READ_10
            | op::READ_12
            | op::READ_16
            | op::VERIFY_10
            | op::VERIFY_12
            | op::VERIFY_16
            | op::PREFETCH_10
            | op::PREFETCH_16
            | op::MODE_SENSE_6
            | op::MODE_SENSE_10
            | op::READ_DEFECT_DATA_10
            | op::READ_DEFECT_DATA_12
            | op::SERVICE_ACTION_IN_16
            | op::RECEIVE_COPY_RESULTS => Access::Read,
            _ => Access::Write,
        };
        match res.typ {
            WE => class == Access::Write,
            EA => true,
            WE_RO | WE_AR => class == Access::Write && !registered,
            EA_RO | EA_AR => !registered,
            _ => true,
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = vec![1u8];
        b.extend_from_slice(&self.generation.to_be_bytes());
        b.extend_from_slice(&(self.regs.len() as u32).to_be_bytes());
        let put_nexus = |b: &mut Vec<u8>, n: &NexusId| {
            for s in [&n.initiator, &n.target] {
                b.extend_from_slice(&(s.len() as u16).to_be_bytes());
                b.extend_from_slice(s.as_bytes());
            }
            b.extend_from_slice(&n.isid);
            b.extend_from_slice(&n.rel_port.to_be_bytes());
        };
        for r in &self.regs {
            b.extend_from_slice(&r.key.to_be_bytes());
            put_nexus(&mut b, &r.nexus);
        }
        match &self.res {
            None => b.push(0),
            Some(r) => {
                b.push(r.typ);
                put_nexus(&mut b, &r.holder);
            }
        }
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Option<PrState> {
        struct R<'a>(&'a [u8]);
        impl R<'_> {
            fn take(&mut self, n: usize) -> Option<&[u8]> {
                if self.0.len() < n {
                    return None;
                }
                let (a, rest) = self.0.split_at(n);
                self.0 = rest;
                Some(a)
            }
            fn u(&mut self, n: usize) -> Option<u64> {
                Some(be(self.take(n)?, 0, n))
            }
            fn nexus(&mut self) -> Option<NexusId> {
                let l = self.u(2)? as usize;
                let initiator = String::from_utf8(self.take(l)?.to_vec()).ok()?;
                let l = self.u(2)? as usize;
                let target = String::from_utf8(self.take(l)?.to_vec()).ok()?;
                let isid: [u8; 6] = self.take(6)?.try_into().ok()?;
                let rel_port = self.u(2)? as u16;
                Some(NexusId {
                    initiator,
                    isid,
                    target,
                    rel_port,
                })
            }
        }
        let mut r = R(b);
        if r.u(1)? != 1 {
            return None;
        }
        let generation = r.u(4)? as u32;
        let n = (r.u(4)? as usize).min(MAX_REGISTRATIONS);
        let mut regs = Vec::with_capacity(n);
        for _ in 0..n {
            let key = r.u(8)?;
            regs.push(Registration {
                key,
                nexus: r.nexus()?,
            });
        }
        let typ = r.u(1)? as u8;
        let res = if typ == 0 {
            None
        } else {
            Some(Reservation {
                holder: r.nexus()?,
                typ,
            })
        };
        Some(PrState {
            generation,
            regs,
            res,
            aptpl: true,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

pub(crate) fn pr_in(lu: &LogicalUnit, cdb: &[u8]) -> Res {
    let sa = byte(cdb, 1) & 0x1f;
    let alloc = be(cdb, 7, 2);
    let st = lu.lock();
    let pr = &st.pr;
    let mut d = Vec::new();
    match sa {
        0 => {
            d.extend_from_slice(&pr.generation.to_be_bytes());
            d.extend_from_slice(&((pr.regs.len() * 8) as u32).to_be_bytes());
            for r in &pr.regs {
                d.extend_from_slice(&r.key.to_be_bytes());
            }
        }
        1 => {
            d.extend_from_slice(&pr.generation.to_be_bytes());
            match &pr.res {
                None => d.extend_from_slice(&0u32.to_be_bytes()),
                Some(res) => {
                    d.extend_from_slice(&16u32.to_be_bytes());
                    let key = if all_registrants(res.typ) {
                        0
                    } else {
                        pr.reg(&res.holder).map(|r| r.key).unwrap_or(0)
                    };
                    d.extend_from_slice(&key.to_be_bytes());
                    d.extend_from_slice(&[0, 0, 0, 0, 0, res.typ & 0x0f, 0, 0]);
                }
            }
        }
        2 => {
            d = vec![0u8; 8];
            d[1] = 8;
            d[2] = 0x10 | 0x01; // CRH, PTPL_C
            d[3] = 0x80 | if pr.aptpl { 1 } else { 0 }; // TMV, PTPL_A
            d[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02;
            d[5] = 0x01;
        }
        3 => {
            let mut body = Vec::new();
            for r in &pr.regs {
                let tid = r.nexus.transport_id();
                body.extend_from_slice(&r.key.to_be_bytes());
                body.extend_from_slice(&[0; 4]);
                let holder = pr.is_holder(&r.nexus);
                body.push(if holder { 0x01 } else { 0 });
                body.push(match (&pr.res, holder) {
                    (Some(res), true) => res.typ & 0x0f,
                    _ => 0,
                });
                body.extend_from_slice(&[0; 4]);
                body.extend_from_slice(&r.nexus.rel_port.to_be_bytes());
                body.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                body.extend_from_slice(&tid);
            }
            d.extend_from_slice(&pr.generation.to_be_bytes());
            d.extend_from_slice(&(body.len() as u32).to_be_bytes());
            d.extend_from_slice(&body);
        }
        _ => return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 1, None)),
    }
    Ok(Response::good(truncate(d, alloc)))
}

pub(crate) fn pr_out(lu: &LogicalUnit, n: &NexusId, cdb: &[u8], data: &[u8]) -> Res {
    let sa = byte(cdb, 1) & 0x1f;
    let scope = byte(cdb, 2) >> 4;
    let typ = byte(cdb, 2) & 0x0f;
    let conflict = Ok(Response::status(Status::ReservationConflict));
    let good = Ok(Response::good(Bytes::new()));
    if sa == 7 {
        return register_and_move(lu, n, data);
    }
    // REPLACE LOST RESERVATION (8) has nothing to do: a reservation here is never lost
    // (it is persisted with APTPL, or deliberately dropped at restart without it).
    if sa > 6 {
        return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 1, None));
    }
    if data.len() != 24 {
        return Err(Sense::PARAM_LIST_LENGTH);
    }
    let key = be(data, 0, 8);
    let sa_key = be(data, 8, 8);
    let flags = data[20];
    let spec_i_pt = flags & 0x08 != 0;
    let all_tg_pt = flags & 0x04 != 0;
    let aptpl = flags & 0x01 != 0;
    if spec_i_pt || all_tg_pt {
        return Err(Sense::INVALID_FIELD_IN_PARAM.with_field(false, 20, None));
    }
    let typed = matches!(sa, 1 | 2 | 4 | 5);
    if typed
        && (!matches!(typ, WE | EA | WE_RO | EA_RO | WE_AR | EA_AR) || scope != 0)
        && (matches!(sa, 1 | 2) || (matches!(sa, 4 | 5) && typ != 0))
    {
        return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 2, None));
    }
    let mut st = lu.lock();
    // RESERVE(6) by another nexus conflicts with PR OUT except registering.
    if let Some(h) = &st.legacy {
        if h != n && !matches!(sa, 0 | 6) {
            return conflict;
        }
    }
    let registered = st.pr.reg(n).map(|r| r.key);
    let result: Res = match sa {
        0 | 6 => {
            let ignore = sa == 6;
            match registered {
                None => {
                    if !ignore && key != 0 {
                        return conflict;
                    }
                    if sa_key == 0 {
                        return good;
                    }
                    if st.pr.regs.len() >= MAX_REGISTRATIONS {
                        return Err(Sense::INSUFFICIENT_REGISTRATION);
                    }
                    st.pr.regs.push(Registration {
                        key: sa_key,
                        nexus: n.clone(),
                    });
                }
                Some(k) => {
                    if !ignore && k != key {
                        return conflict;
                    }
                    if sa_key == 0 {
                        unregister(lu, &mut st, n);
                    } else if let Some(r) = st.pr.regs.iter_mut().find(|r| &r.nexus == n) {
                        r.key = sa_key;
                    }
                }
            }
            st.pr.aptpl = aptpl;
            st.pr.generation = st.pr.generation.wrapping_add(1);
            good
        }
        1 => {
            if registered != Some(key) {
                return conflict;
            }
            if aptpl {
                return Err(Sense::INVALID_FIELD_IN_PARAM.with_field(false, 20, Some(0)));
            }
            match &st.pr.res {
                Some(res) if st.pr.is_holder(n) => {
                    if res.typ != typ {
                        return conflict;
                    }
                }
                Some(_) => return conflict,
                None => {
                    st.pr.res = Some(Reservation {
                        holder: n.clone(),
                        typ,
                    })
                }
            }
            good
        }
        2 => {
            if registered != Some(key) {
                return conflict;
            }
            let Some(res) = st.pr.res.clone() else {
                return good;
            };
            if !st.pr.is_holder(n) {
                return good;
            }
            if res.typ != typ {
                return Err(Sense {
                    asc: 0x26,
                    ascq: 0x04,
                    ..Sense::INVALID_FIELD_IN_PARAM
                });
            }
            st.pr.res = None;
            if res.typ != WE && res.typ != EA {
                let others: Vec<NexusId> = st
                    .pr
                    .regs
                    .iter()
                    .map(|r| r.nexus.clone())
                    .filter(|x| x != n)
                    .collect();
                for o in others {
                    push_ua_for(&mut st, &o, Sense::UA_RESERVATIONS_RELEASED);
                }
            }
            good
        }
        3 => {
            if registered != Some(key) {
                return conflict;
            }
            let others: Vec<NexusId> = st
                .pr
                .regs
                .iter()
                .map(|r| r.nexus.clone())
                .filter(|x| x != n)
                .collect();
            st.pr.regs.clear();
            st.pr.res = None;
            st.pr.generation = st.pr.generation.wrapping_add(1);
            for o in others {
                push_ua_for(&mut st, &o, Sense::UA_RESERVATIONS_PREEMPTED);
            }
            good
        }
        4 | 5 => {
            if registered != Some(key) {
                return conflict;
            }
            preempt(&mut st, n, sa_key, typ)
        }
        _ => Err(Sense::INVALID_FIELD_IN_CDB),
    };
    if result.is_ok() {
        lu.persist(&st);
    }
    lu.refresh_quiet(&st);
    result
}

/// The I_T nexus an iSCSI TransportID names (SPC-4 7.6.4.6) on `target` through relative
/// port `rel_port`. Format 01 gives the initiator port (`name,i,0xISID`); format 00 only
/// the name, which must then match exactly one registered port on that relative port.
fn nexus_of_transport_id(
    tid: &[u8],
    target: &str,
    rel_port: u16,
    regs: &[Registration],
) -> Option<NexusId> {
    const ISCSI: u8 = 5;
    let &b0 = tid.first()?;
    if b0 & 0x0f != ISCSI || tid.len() < 4 {
        return None;
    }
    let len = be(tid, 2, 2) as usize;
    let body = tid.get(4..4 + len)?;
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    let text = std::str::from_utf8(&body[..end]).ok()?.to_ascii_lowercase();
    match b0 >> 6 {
        0 => {
            let mut found = regs.iter().filter(|r| {
                r.nexus.initiator == text
                    && r.nexus.target == target
                    && r.nexus.rel_port == rel_port
            });
            let one = found.next()?;
            found.next().is_none().then(|| one.nexus.clone())
        }
        1 => {
            let (name, isid_hex) = text.split_once(",i,0x")?;
            if isid_hex.len() != 12 {
                return None;
            }
            let mut isid = [0u8; 6];
            for (i, b) in isid.iter_mut().enumerate() {
                *b = u8::from_str_radix(isid_hex.get(2 * i..2 * i + 2)?, 16).ok()?;
            }
            Some(NexusId {
                initiator: name.to_string(),
                isid,
                target: target.to_string(),
                rel_port,
            })
        }
        _ => None,
    }
}

/// PERSISTENT RESERVE OUT, REGISTER AND MOVE (SPC-4 5.13.8): the reservation holder
/// registers another I_T nexus (named by a TransportID) with the service action key and
/// hands it the reservation, with the same type; with UNREG it unregisters itself.
fn register_and_move(lu: &LogicalUnit, n: &NexusId, data: &[u8]) -> Res {
    let conflict = Ok(Response::status(Status::ReservationConflict));
    if data.len() < 24 {
        return Err(Sense::PARAM_LIST_LENGTH);
    }
    let key = be(data, 0, 8);
    let sa_key = be(data, 8, 8);
    let unreg = data[17] & 0x02 != 0;
    let aptpl = data[17] & 0x01 != 0;
    let rel_port = be(data, 18, 2) as u16;
    let tid_len = be(data, 20, 4) as usize;
    if data.len() < 24 + tid_len {
        return Err(Sense::PARAM_LIST_LENGTH);
    }
    let mut st = lu.lock();
    if st.legacy.as_ref().is_some_and(|h| h != n) {
        return conflict;
    }
    if st.pr.reg(n).map(|r| r.key) != Some(key) {
        return conflict;
    }
    let Some(res) = st.pr.res.clone() else {
        return conflict;
    };
    // Only a single holder can hand its reservation over: an all-registrants
    // reservation belongs to every registrant.
    if !st.pr.is_holder(n) || all_registrants(res.typ) {
        return conflict;
    }
    if sa_key == 0 {
        return Err(Sense::INVALID_FIELD_IN_PARAM.with_field(false, 8, None));
    }
    // A target has one portal group (its TPGT is the relative port id of every nexus
    // through it), so the only target port a reservation can move to is the one this
    // command came through; any other names no port of ours (SPC-4 5.13.8).
    if rel_port != n.rel_port {
        return Err(Sense::INVALID_FIELD_IN_PARAM.with_field(false, 18, None));
    }
    let Some(dest) =
        nexus_of_transport_id(&data[24..24 + tid_len], &n.target, rel_port, &st.pr.regs)
    else {
        return Err(Sense::INVALID_FIELD_IN_PARAM.with_field(false, 24, None));
    };
    if &dest == n {
        return Err(Sense::INVALID_FIELD_IN_PARAM.with_field(false, 24, None));
    }
    match st.pr.regs.iter_mut().find(|r| r.nexus == dest) {
        Some(r) => r.key = sa_key,
        None => {
            if st.pr.regs.len() >= MAX_REGISTRATIONS {
                return Err(Sense::INSUFFICIENT_REGISTRATION);
            }
            st.pr.regs.push(Registration {
                key: sa_key,
                nexus: dest.clone(),
            });
        }
    }
    st.pr.res = Some(Reservation {
        holder: dest,
        typ: res.typ,
    });
    if unreg {
        st.pr.regs.retain(|r| &r.nexus != n);
    }
    st.pr.aptpl = aptpl;
    st.pr.generation = st.pr.generation.wrapping_add(1);
    lu.persist(&st);
    lu.refresh_quiet(&st);
    Ok(Response::good(Bytes::new()))
}

fn unregister(_lu: &LogicalUnit, st: &mut crate::lu::LuState, n: &NexusId) {
    let was_holder = st.pr.is_holder(n);
    st.pr.regs.retain(|r| &r.nexus != n);
    if let Some(res) = st.pr.res.clone() {
        let release = if all_registrants(res.typ) {
            st.pr.regs.is_empty()
        } else {
            was_holder
        };
        if release {
            st.pr.res = None;
            if matches!(res.typ, WE_RO | EA_RO) {
                let others: Vec<NexusId> = st.pr.regs.iter().map(|r| r.nexus.clone()).collect();
                for o in others {
                    push_ua_for(st, &o, Sense::UA_RESERVATIONS_RELEASED);
                }
            }
        } else if all_registrants(res.typ) && &res.holder == n {
            if let Some(r) = st.pr.regs.first() {
                st.pr.res = Some(Reservation {
                    holder: r.nexus.clone(),
                    typ: res.typ,
                });
            }
        }
    }
}

fn preempt(st: &mut crate::lu::LuState, n: &NexusId, sa_key: u64, typ: u8) -> Res {
    let conflict = Ok(Response::status(Status::ReservationConflict));
    let mut removed: Vec<NexusId> = Vec::new();
    let remove_key = |st: &mut crate::lu::LuState, k: u64, removed: &mut Vec<NexusId>| {
        st.pr.regs.retain(|r| {
            if r.key == k && &r.nexus != n {
                removed.push(r.nexus.clone());
                false
            } else {
                true
            }
        });
    };
    match st.pr.res.clone() {
        None => {
            if sa_key == 0 {
                return Err(Sense::INVALID_FIELD_IN_PARAM.with_field(false, 8, None));
            }
            let before = st.pr.regs.len();
            remove_key(st, sa_key, &mut removed);
            if st.pr.regs.len() == before && !st.pr.regs.iter().any(|r| r.key == sa_key) {
                return conflict;
            }
        }
        Some(res) if all_registrants(res.typ) => {
            if sa_key == 0 {
                st.pr.regs.retain(|r| {
                    if &r.nexus != n {
                        removed.push(r.nexus.clone());
                        false
                    } else {
                        true
                    }
                });
                st.pr.res = Some(Reservation {
                    holder: n.clone(),
                    typ,
                });
            } else {
                remove_key(st, sa_key, &mut removed);
            }
        }
        Some(res) => {
            let holder_key = st.pr.reg(&res.holder).map(|r| r.key);
            if Some(sa_key) == holder_key {
                remove_key(st, sa_key, &mut removed);
                st.pr.res = Some(Reservation {
                    holder: n.clone(),
                    typ,
                });
            } else {
                if sa_key == 0 {
                    return Err(Sense::INVALID_FIELD_IN_PARAM.with_field(false, 8, None));
                }
                let before = st.pr.regs.len();
                remove_key(st, sa_key, &mut removed);
                if st.pr.regs.len() == before && !st.pr.regs.iter().any(|r| r.key == sa_key) {
                    return conflict;
                }
            }
        }
    }
    for o in removed {
        push_ua_for(st, &o, Sense::UA_REGISTRATIONS_PREEMPTED);
    }
    st.pr.generation = st.pr.generation.wrapping_add(1);
    Ok(Response::good(Bytes::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nx(i: &str) -> NexusId {
        NexusId {
            initiator: i.into(),
            isid: [0x80, 0, 0, 0, 0, 1],
            target: "iqn.t".into(),
            rel_port: 1,
        }
    }

    #[test]
    fn encode_roundtrip() {
        let mut s = PrState::default();
        s.regs.push(Registration {
            key: 7,
            nexus: nx("a"),
        });
        s.res = Some(Reservation {
            holder: nx("a"),
            typ: EA,
        });
        s.aptpl = true;
        s.generation = 3;
        assert_eq!(PrState::decode(&s.encode()), Some(s));
        assert_eq!(PrState::decode(&[1, 2]), None);
    }

    struct NoCopy;
    impl crate::lu::LunResolver for NoCopy {
        fn resolve(&self, _: &[u8]) -> Option<std::sync::Arc<LogicalUnit>> {
            None
        }
    }

    fn pr_out_cdb(sa: u8, typ: u8, len: usize) -> Vec<u8> {
        let l = (len as u32).to_be_bytes();
        vec![op::PR_OUT, sa, typ, 0, 0, l[0], l[1], l[2], l[3], 0]
    }

    fn basic(key: u64, sa_key: u64) -> Vec<u8> {
        let mut d = vec![0u8; 24];
        d[..8].copy_from_slice(&key.to_be_bytes());
        d[8..16].copy_from_slice(&sa_key.to_be_bytes());
        d
    }

    /// REGISTER AND MOVE's parameter list with an iSCSI TransportID (`port`: the
    /// initiator port name (format 01) or just the initiator name (format 00)).
    fn move_params(key: u64, sa_key: u64, unreg: bool, port: &str, format: u8) -> Vec<u8> {
        let mut d = basic(key, sa_key);
        d[17] = if unreg { 0x02 } else { 0 };
        d[18..20].copy_from_slice(&1u16.to_be_bytes());
        let len = (port.len() + 1).next_multiple_of(4);
        let mut tid = vec![(format << 6) | 5, 0, 0, len as u8];
        tid.extend_from_slice(port.as_bytes());
        tid.resize(4 + len, 0);
        d[20..24].copy_from_slice(&(tid.len() as u32).to_be_bytes());
        d.extend_from_slice(&tid);
        d
    }

    #[tokio::test]
    async fn register_and_move_hands_the_reservation_over() {
        use basalt_blockdev::MemDev;
        let lu = LogicalUnit::new(
            std::sync::Arc::new(MemDev::new(1024, 512)),
            crate::lu::LunIdentity::new(1),
            None,
        );
        let run = |n: NexusId, cdb: Vec<u8>, data: Vec<u8>| {
            let lu = &lu;
            async move { lu.execute(&n, &NoCopy, &cdb, Bytes::from(data)).await }
        };
        let (a, b) = (nx("iqn.a"), nx("iqn.b"));
        let write = vec![op::WRITE_10, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        // A registers and reserves (Exclusive Access); B is not registered.
        assert_eq!(
            run(a.clone(), pr_out_cdb(0, 0, 24), basic(0, 0xa))
                .await
                .status,
            Status::Good
        );
        assert_eq!(
            run(a.clone(), pr_out_cdb(1, EA, 24), basic(0xa, 0))
                .await
                .status,
            Status::Good
        );
        // Not the holder, wrong key, zero service action key, or moving to itself: refused.
        let p = move_params(0xb, 0xb, false, &b.initiator_port(), 1);
        assert_eq!(
            run(b.clone(), pr_out_cdb(7, EA, p.len()), p).await.status,
            Status::ReservationConflict
        );
        let p = move_params(0x9, 0xb, false, &b.initiator_port(), 1);
        assert_eq!(
            run(a.clone(), pr_out_cdb(7, EA, p.len()), p).await.status,
            Status::ReservationConflict
        );
        let p = move_params(0xa, 0, false, &b.initiator_port(), 1);
        assert_eq!(
            run(a.clone(), pr_out_cdb(7, EA, p.len()), p).await.status,
            Status::CheckCondition
        );
        let p = move_params(0xa, 0xb, false, &a.initiator_port(), 1);
        assert_eq!(
            run(a.clone(), pr_out_cdb(7, EA, p.len()), p).await.status,
            Status::CheckCondition
        );
        // A relative target port that is not ours: refused, nothing moves.
        let mut p = move_params(0xa, 0xb, false, &b.initiator_port(), 1);
        p[18..20].copy_from_slice(&7u16.to_be_bytes());
        let r = run(a.clone(), pr_out_cdb(7, EA, p.len()), p).await;
        assert_eq!(r.status, Status::CheckCondition);
        assert!(lu.lock().pr.is_holder(&a));
        assert!(lu.lock().pr.reg(&b).is_none());
        // A moves the reservation to B (format 01: B's port), unregistering itself.
        let p = move_params(0xa, 0xb, true, &b.initiator_port(), 1);
        assert_eq!(
            run(a.clone(), pr_out_cdb(7, EA, p.len()), p).await.status,
            Status::Good
        );
        {
            let st = lu.lock();
            assert!(st.pr.is_holder(&b));
            assert_eq!(st.pr.reg(&b).map(|r| r.key), Some(0xb));
            assert!(st.pr.reg(&a).is_none());
            assert_eq!(st.pr.res.as_ref().map(|r| r.typ), Some(EA));
        }
        // B writes; A now conflicts.
        assert_eq!(
            run(b.clone(), write.clone(), vec![0; 512]).await.status,
            Status::Good
        );
        assert_eq!(
            run(a.clone(), write, vec![0; 512]).await.status,
            Status::ReservationConflict
        );
        // Format 00 (name only) names the one registered port of that initiator: A
        // registers again and B moves the reservation back to it, keeping its own key.
        assert_eq!(
            run(a.clone(), pr_out_cdb(0, 0, 24), basic(0, 0xa))
                .await
                .status,
            Status::Good
        );
        let p = move_params(0xb, 0xaa, false, &a.initiator, 0);
        assert_eq!(
            run(b.clone(), pr_out_cdb(7, EA, p.len()), p).await.status,
            Status::Good
        );
        let st = lu.lock();
        assert!(st.pr.is_holder(&a));
        assert_eq!(st.pr.reg(&a).map(|r| r.key), Some(0xaa));
        assert_eq!(st.pr.reg(&b).map(|r| r.key), Some(0xb));
    }

    #[test]
    fn conflict_rules() {
        let mut s = PrState::default();
        s.regs.push(Registration {
            key: 7,
            nexus: nx("a"),
        });
        s.res = Some(Reservation {
            holder: nx("a"),
            typ: WE,
        });
        let read = [op::READ_10, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        let write = [op::WRITE_10, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        assert!(!s.conflicts(&nx("b"), &read));
        assert!(s.conflicts(&nx("b"), &write));
        assert!(!s.conflicts(&nx("a"), &write));
    }
}
