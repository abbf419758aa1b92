//! EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 6.4, 6.18): VMware's XCOPY.
//!
//! Copy targets are named by NAA designators and resolved only through the
//! transport's [`LunResolver`], which knows the LUNs the issuing I_T nexus may see; a
//! designator of any other unit is "copy target device not reachable" (LIO resolved
//! against every unit on the host: CVE-2020-28374).

use crate::cdb::{be, byte};
use crate::lu::{truncate, LogicalUnit, LunResolver, NexusId, Response};
use crate::sense::Sense;
use bytes::Bytes;
use std::sync::Arc;

/// Most copy target (CSCD) descriptors in one command.
pub(crate) const MAX_CSCD: usize = 8;
/// Most segment descriptors in one command.
pub(crate) const MAX_SEGMENTS: usize = 64;
/// Longest descriptor list, bytes.
pub(crate) const MAX_DESC_LIST: usize = MAX_CSCD * 32 + MAX_SEGMENTS * 28;
/// Largest segment, bytes.
const MAX_SEGMENT_BYTES: u64 = 32 << 20;
/// Copy results kept for RECEIVE COPY RESULTS.
const MAX_RESULTS: usize = 32;

type Res = Result<Response, Sense>;

/// The result of a finished copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CopyStatus {
    ok: bool,
    segments: u16,
    blocks: u64,
}

pub(crate) async fn extended_copy(
    lu: &LogicalUnit,
    nexus: &NexusId,
    resolver: &dyn LunResolver,
    cdb: &[u8],
    data: &[u8],
) -> Res {
    let sa = byte(cdb, 1) & 0x1f;
    if sa != 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 1, None));
    }
    if data.is_empty() {
        return Ok(Response::good(Bytes::new()));
    }
    if data.len() < 16 {
        return Err(Sense::PARAM_LIST_LENGTH);
    }
    let list_id = data[0];
    let usage = (data[1] >> 3) & 3;
    if data[1] & 0x07 != 0 {
        // PRIORITY must be zero for us... accept any value but reject STR (bit 5).
    }
    let cscd_len = be(data, 2, 2) as usize;
    let seg_len = be(data, 8, 4) as usize;
    let inline_len = be(data, 12, 4) as usize;
    if inline_len != 0 {
        return Err(Sense::INVALID_FIELD_IN_PARAM.with_field(false, 12, None));
    }
    if 16 + cscd_len + seg_len > data.len() {
        return Err(Sense::PARAM_LIST_LENGTH);
    }
    if cscd_len + seg_len > MAX_DESC_LIST {
        return Err(Sense::PARAM_LIST_LENGTH);
    }
    if !cscd_len.is_multiple_of(32) {
        return Err(Sense::INVALID_FIELD_IN_PARAM.with_field(false, 2, None));
    }
    if cscd_len / 32 > MAX_CSCD {
        return Err(Sense::TOO_MANY_TARGET_DESCRIPTORS);
    }
    // Resolve CSCDs.
    let mut targets: Vec<Option<Arc<LogicalUnit>>> = Vec::new();
    for i in 0..cscd_len / 32 {
        let d = &data[16 + i * 32..16 + i * 32 + 32];
        if d[0] != 0xe4 {
            return Err(Sense::UNSUPPORTED_TARGET_DESCRIPTOR.with_field(
                false,
                (16 + i * 32) as u16,
                None,
            ));
        }
        // LU ID TYPE is ignored (as LIO does): the designator below names the unit.
        let lu_id_type = d[1] >> 6;
        let dev_type = d[1] & 0x1f;
        let nul = d[1] & 0x20 != 0;
        let _ = lu_id_type;
        if dev_type != 0 {
            return Err(Sense::INVALID_FIELD_IN_PARAM.with_field(
                false,
                (17 + i * 32) as u16,
                None,
            ));
        }
        // Designation descriptor at 4..24: codeset binary, designator type NAA.
        let dtype = d[5] & 0x0f;
        let dlen = usize::from(d[7]);
        if dtype != 3 || d[4] & 0x0f != 1 || dlen != 16 {
            return Err(Sense::INVALID_FIELD_IN_PARAM.with_field(
                false,
                (20 + i * 32) as u16,
                None,
            ));
        }
        let designator = &d[8..24];
        let bl = be(d, 29, 3);
        // NUL: the descriptor names no device; any use of it aborts the copy.
        let found = if nul {
            None
        } else {
            resolver.resolve(designator)
        };
        if let Some(t) = &found {
            if bl != u64::from(t.block_size()) {
                return Err(Sense::INVALID_FIELD_IN_PARAM.with_field(
                    false,
                    (29 + i * 32) as u16,
                    None,
                ));
            }
        }
        targets.push(found);
    }
    let segs_area = &data[16 + cscd_len..16 + cscd_len + seg_len];
    let mut segs = Vec::new();
    let mut at = 0;
    while at < segs_area.len() {
        if segs.len() >= MAX_SEGMENTS {
            return Err(Sense::TOO_MANY_SEGMENT_DESCRIPTORS);
        }
        let s = &segs_area[at..];
        if s.len() < 4 {
            return Err(Sense::PARAM_LIST_LENGTH);
        }
        let dlen = be(s, 2, 2) as usize + 4;
        if s[0] != 0x02 {
            return Err(Sense::UNSUPPORTED_SEGMENT_DESCRIPTOR.with_field(
                false,
                (16 + cscd_len + at) as u16,
                None,
            ));
        }
        if dlen != 28 || s.len() < 28 {
            return Err(Sense::INVALID_FIELD_IN_PARAM.with_field(
                false,
                (18 + cscd_len + at) as u16,
                None,
            ));
        }
        if s[1] & 0x02 != 0 {
            // DC = 1: counts in destination blocks; supported (same block size).
        }
        let src = be(s, 4, 2) as usize;
        let dst = be(s, 6, 2) as usize;
        let blocks = be(s, 10, 2);
        let src_lba = be(s, 12, 8);
        let dst_lba = be(s, 20, 8);
        segs.push((src, dst, blocks, src_lba, dst_lba));
        at += dlen;
    }
    let mut status = CopyStatus {
        ok: false,
        segments: 0,
        blocks: 0,
    };
    let result = run_segments(lu, nexus, &targets, &segs, &mut status).await;
    status.ok = result.is_ok();
    if usage != 3 {
        let mut st = lu.lock();
        st.copies
            .retain(|(n, id, _)| !(n == nexus && *id == list_id));
        if st.copies.len() >= MAX_RESULTS {
            st.copies.pop_front();
        }
        st.copies.push_back((nexus.clone(), list_id, status));
    }
    result.map(|_| Response::good(Bytes::new()))
}

async fn run_segments(
    lu: &LogicalUnit,
    nexus: &NexusId,
    targets: &[Option<Arc<LogicalUnit>>],
    segs: &[(usize, usize, u64, u64, u64)],
    status: &mut CopyStatus,
) -> Result<(), Sense> {
    for &(src, dst, blocks, src_lba, dst_lba) in segs {
        let (Some(s), Some(d)) = (targets.get(src), targets.get(dst)) else {
            return Err(Sense::COPY_TARGET_UNREACHABLE);
        };
        let (Some(s), Some(d)) = (s, d) else {
            return Err(Sense::COPY_TARGET_UNREACHABLE);
        };
        let bs = u64::from(s.block_size());
        if blocks * bs > MAX_SEGMENT_BYTES {
            return Err(Sense::INVALID_FIELD_IN_PARAM);
        }
        // Out of range: COPY ABORTED without further detail (SPC-4 6.4.3.5).
        let aborted = Sense {
            key: crate::sense::key::COPY_ABORTED,
            asc: 0,
            ascq: 0,
            info: None,
            field: None,
        };
        s.check_lba(src_lba, blocks).map_err(|_| aborted)?;
        d.check_lba(dst_lba, blocks).map_err(|_| aborted)?;
        if let Some(ws) = d.write_protected() {
            return Err(ws);
        }
        // The destination's reservations apply to the copy as to a write from this
        // nexus.
        if d.lock().pr.conflicts(nexus, &[0x2a]) {
            return Err(Sense::COPY_TARGET_UNREACHABLE);
        }
        let _ = lu;
        let chunk = (1u64 << 20) / bs;
        let mut done = 0;
        while done < blocks {
            let n = (blocks - done).min(chunk.max(1));
            let buf = s
                .read_bytes((src_lba + done) * bs, n * bs)
                .await
                .map_err(|_| Sense::COPY_DEVICE_FAILURE)?;
            d.write_bytes((dst_lba + done) * bs, buf, Default::default())
                .await
                .map_err(|e| {
                    if e == Sense::SPACE_ALLOCATION_FAILED {
                        e
                    } else {
                        Sense::COPY_DEVICE_FAILURE
                    }
                })?;
            done += n;
            status.blocks += n;
        }
        status.segments += 1;
    }
    Ok(())
}

pub(crate) fn receive_copy_results(lu: &LogicalUnit, nexus: &NexusId, cdb: &[u8]) -> Res {
    let sa = byte(cdb, 1) & 0x1f;
    let list_id = byte(cdb, 2);
    let alloc = be(cdb, 10, 4);
    match sa {
        0 => {
            let st = lu.lock();
            let Some((_, _, s)) = st
                .copies
                .iter()
                .rev()
                .find(|(n, id, _)| n == nexus && *id == list_id)
            else {
                return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 2, None));
            };
            let mut d = vec![0u8; 12];
            d[0..4].copy_from_slice(&8u32.to_be_bytes());
            d[4] = if s.ok { 0x01 } else { 0x02 };
            d[5..7].copy_from_slice(&s.segments.to_be_bytes());
            d[7] = 0xf1; // transfer count in logical blocks? use bytes? 0xF1: blocks
            d[7] = 0x00;
            d[8..12].copy_from_slice(&(s.blocks.min(u64::from(u32::MAX)) as u32).to_be_bytes());
            Ok(Response::good(truncate(d, alloc)))
        }
        3 => {
            let mut d = vec![0u8; 46];
            d[0..4].copy_from_slice(&42u32.to_be_bytes());
            d[4] = 0x01; // SNLID
            d[8..10].copy_from_slice(&(MAX_CSCD as u16).to_be_bytes());
            d[10..12].copy_from_slice(&(MAX_SEGMENTS as u16).to_be_bytes());
            d[12..16].copy_from_slice(&(MAX_DESC_LIST as u32).to_be_bytes());
            d[16..20].copy_from_slice(&(MAX_SEGMENT_BYTES as u32).to_be_bytes());
            d[20..24].copy_from_slice(&0u32.to_be_bytes());
            d[24..28].copy_from_slice(&0u32.to_be_bytes());
            d[28..32].copy_from_slice(&0u32.to_be_bytes());
            d[34..36].copy_from_slice(&1u16.to_be_bytes());
            d[36] = 1;
            d[37] = 9;
            d[38] = 0;
            d[39] = 0;
            d[43] = 2;
            d[44] = 0x02;
            d[45] = 0xe4;
            Ok(Response::good(truncate(d, alloc)))
        }
        _ => Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 1, None)),
    }
}
