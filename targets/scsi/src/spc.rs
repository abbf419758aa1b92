//! Primary commands (SPC-4): INQUIRY and its VPD pages, MODE SENSE/SELECT, REPORT
//! SUPPORTED OPERATION CODES, and descriptor-format sense.

use crate::cdb::{be, byte, op};
use crate::lu::{
    truncate, LogicalUnit, NexusId, Response, MAX_CAW_BLOCKS, MAX_TRANSFER_BYTES, MAX_UNMAP_BLOCKS,
    MAX_UNMAP_DESCRIPTORS,
};
use crate::sense::Sense;
use bytes::Bytes;

type Res = Result<Response, Sense>;

fn pad(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s
        .bytes()
        .filter(|b| (0x20..0x7f).contains(b))
        .take(n)
        .collect();
    v.resize(n, b' ');
    v
}

/// Descriptor-format sense data (response code 0x72).
pub(crate) fn descriptor_sense(s: &Sense) -> Vec<u8> {
    let mut d = vec![0x72, s.key & 0x0f, s.asc, s.ascq, 0, 0, 0, 0];
    if let Some(info) = s.info {
        d.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
        d.extend_from_slice(&info.to_be_bytes());
    }
    if let Some((cdb, byte, bit)) = s.field {
        let mut b = [0x02, 0x06, 0, 0, 0x80, 0, 0, 0];
        if cdb {
            b[4] |= 0x40;
        }
        if let Some(bit) = bit {
            b[4] |= 0x08 | (bit & 7);
        }
        b[5..7].copy_from_slice(&byte.to_be_bytes());
        d.extend_from_slice(&b);
    }
    d[7] = (d.len() - 8) as u8;
    d
}

const VPD_PAGES: [u8; 8] = [0x00, 0x80, 0x83, 0x86, 0x8f, 0xb0, 0xb1, 0xb2];

pub(crate) fn inquiry(lu: &LogicalUnit, nexus: &NexusId, cdb: &[u8]) -> Res {
    let evpd = byte(cdb, 1) & 1 != 0;
    let page = byte(cdb, 2);
    let alloc = be(cdb, 3, 2);
    if byte(cdb, 1) & 0x02 != 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 1, Some(1)));
    }
    if !evpd {
        if page != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 2, None));
        }
        return Ok(Response::good(truncate(standard_inquiry(lu), alloc)));
    }
    let id = lu.identity();
    let g = lu.device().geometry();
    let bs = u64::from(g.block_size);
    let body: Vec<u8> = match page {
        0x00 => VPD_PAGES.to_vec(),
        0x80 => id.serial().into_bytes(),
        0x83 => {
            let mut d = Vec::new();
            // Logical unit: NAA 6, binary.
            d.extend_from_slice(&[0x01, 0x03, 0, 16]);
            d.extend_from_slice(&id.naa());
            // Logical unit: T10 vendor id + serial, ASCII.
            let t10 = [pad(&id.vendor, 8), id.serial().into_bytes()].concat();
            d.extend_from_slice(&[0x02, 0x01, 0, t10.len() as u8]);
            d.extend_from_slice(&t10);
            // Target port: relative target port identifier (iSCSI, PIV).
            d.extend_from_slice(&[0x51, 0x94, 0, 4, 0, 0]);
            d.extend_from_slice(&nexus.rel_port.to_be_bytes());
            // Target port: SCSI name string "IQN,t,0xTPGT".
            let mut name = format!("{},t,0x{:04x}", nexus.target, nexus.rel_port).into_bytes();
            name.push(0);
            name.resize(name.len().next_multiple_of(4).min(252), 0);
            d.extend_from_slice(&[0x53, 0x98, 0, name.len() as u8]);
            d.extend_from_slice(&name);
            // Target device: SCSI name string of the target.
            let mut tname = nexus.target.clone().into_bytes();
            tname.push(0);
            tname.resize(tname.len().next_multiple_of(4).min(252), 0);
            d.extend_from_slice(&[0x53, 0xa8, 0, tname.len() as u8]);
            d.extend_from_slice(&tname);
            d
        }
        0x86 => {
            // Extended INQUIRY data: HEADSUP/ORDSUP/SIMPSUP, V_SUP; no protection.
            let mut d = vec![0u8; 60];
            d[1] = 0x07;
            d[2] = 0x01;
            d
        }
        0x8f => third_party_copy_vpd(),
        0xb0 => {
            let mut d = vec![0u8; 60];
            d[1] = MAX_CAW_BLOCKS as u8;
            let per_phys = (g.physical_block_size / g.block_size.max(1)).max(1);
            d[2..4].copy_from_slice(&(per_phys as u16).to_be_bytes());
            d[4..8].copy_from_slice(&((MAX_TRANSFER_BYTES / bs) as u32).to_be_bytes());
            let opt = if g.optimal_io_size != 0 {
                u64::from(g.optimal_io_size) / bs
            } else {
                (128 << 10) / bs
            };
            d[8..12].copy_from_slice(&(opt as u32).to_be_bytes());
            d[12..16].copy_from_slice(&((MAX_TRANSFER_BYTES / bs) as u32).to_be_bytes());
            if g.capabilities.discard {
                d[16..20].copy_from_slice(&(MAX_UNMAP_BLOCKS as u32).to_be_bytes());
                d[20..24].copy_from_slice(&(MAX_UNMAP_DESCRIPTORS as u32).to_be_bytes());
                d[24..28].copy_from_slice(&per_phys.to_be_bytes());
                d[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes());
            }
            d[32..40].copy_from_slice(&0xffff_ffffu64.to_be_bytes());
            d[40..44].copy_from_slice(&(lu.max_atomic_blocks() as u32).to_be_bytes());
            d[44..48].copy_from_slice(&1u32.to_be_bytes());
            d[48..52].copy_from_slice(&1u32.to_be_bytes());
            d
        }
        0xb1 => {
            let mut d = vec![0u8; 60];
            d[1] = 1; // non-rotating medium
            d
        }
        0xb2 => {
            let mut d = vec![0u8; 4];
            if g.capabilities.discard {
                // LBPU, LBPWS, LBPWS10; LBPRZ; thin provisioned.
                d[1] = 0x80 | 0x40 | 0x20;
                if g.capabilities.discard_zeroes {
                    d[1] |= 0x04;
                }
                d[2] = 0x02;
            }
            d
        }
        _ => return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 2, None)),
    };
    let mut d = vec![0u8, page];
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(&body);
    Ok(Response::good(truncate(d, alloc)))
}

fn standard_inquiry(lu: &LogicalUnit) -> Vec<u8> {
    let id = lu.identity();
    let mut d = vec![0u8; 96];
    d[0] = 0x00; // connected direct-access block device
    d[2] = 0x06; // SPC-4
    d[3] = 0x12; // HISUP, response data format 2
    d[4] = (d.len() - 5) as u8;
    d[5] = 0x08; // 3PC
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(&pad(&id.vendor, 8));
    d[16..32].copy_from_slice(&pad(&id.product, 16));
    d[32..36].copy_from_slice(&pad(&id.revision, 4));
    // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
    for (i, v) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

/// Third-party copy VPD page (SPC-4 7.8.17) body for EXTENDED COPY (LID1).
fn third_party_copy_vpd() -> Vec<u8> {
    let mut d = Vec::new();
    // Supported commands descriptor (0x0001): EXTENDED COPY(LID1) and RECEIVE COPY
    // RESULTS (copy status, operating parameters).
    let cmds: Vec<u8> = vec![
        op::EXTENDED_COPY,
        1,
        0x00,
        op::RECEIVE_COPY_RESULTS,
        2,
        0x00,
        0x03,
    ];
    let mut body = vec![cmds.len() as u8];
    body.extend_from_slice(&cmds);
    body.resize(body.len().next_multiple_of(4), 0);
    d.extend_from_slice(&0x0001u16.to_be_bytes());
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(&body);
    // Parameter data descriptor (0x0008).
    let mut p = vec![0u8; 28];
    p[4..6].copy_from_slice(&(crate::xcopy::MAX_CSCD as u16).to_be_bytes());
    p[6..8].copy_from_slice(&(crate::xcopy::MAX_SEGMENTS as u16).to_be_bytes());
    p[8..12].copy_from_slice(&(crate::xcopy::MAX_DESC_LIST as u32).to_be_bytes());
    p[12..16].copy_from_slice(&0u32.to_be_bytes());
    d.extend_from_slice(&0x0008u16.to_be_bytes());
    d.extend_from_slice(&(p.len() as u16).to_be_bytes());
    d.extend_from_slice(&p);
    // Supported descriptors (0x8001): block-to-block segment, identification CSCD.
    let sd = [2u8, 0x02, 0xe4, 0];
    d.extend_from_slice(&0x8001u16.to_be_bytes());
    d.extend_from_slice(&(sd.len() as u16).to_be_bytes());
    d.extend_from_slice(&sd);
    // Supported CSCD IDs (0x8002): none beyond the descriptors.
    d.extend_from_slice(&0x8002u16.to_be_bytes());
    d.extend_from_slice(&4u16.to_be_bytes());
    d.extend_from_slice(&[0, 0, 0, 0]);
    d
}

// ----- Mode pages -----

/// (page, current, changeable mask) for the pages we keep.
fn mode_pages(lu: &LogicalUnit) -> Vec<(u8, Vec<u8>, Vec<u8>)> {
    let g = lu.device().geometry();
    let st = lu.lock();
    let mut rw = vec![0u8; 12];
    rw[0] = 0x01;
    rw[1] = 10;
    rw[2] = 0x80; // AWRE
    let mut caching = vec![0u8; 20];
    caching[0] = 0x08;
    caching[1] = 18;
    if g.capabilities.volatile_cache {
        caching[2] = 0x04; // WCE
    }
    let mut control = vec![0u8; 12];
    control[0] = 0x0a;
    control[1] = 10;
    control[2] = if st.d_sense { 0x04 } else { 0 };
    control[3] = 0x10; // queue algorithm modifier 1: unrestricted reordering
    control[4] = if st.swp { 0x08 } else { 0 };
    // TAS: a task aborted by another I_T nexus's task management (LOGICAL UNIT
    // RESET, CLEAR TASK SET) ends with TASK ABORTED status (the transport does it).
    control[5] = 0x40;
    control[8..10].copy_from_slice(&0xffffu16.to_be_bytes()); // busy timeout
    let mut control_mask = vec![0u8; 12];
    control_mask[2] = 0x04;
    control_mask[4] = 0x08;
    let mut ie = vec![0u8; 12];
    ie[0] = 0x1c;
    ie[1] = 10;
    vec![
        (0x01, rw, vec![0u8; 12]),
        (0x08, caching, vec![0u8; 20]),
        (0x0a, control, control_mask),
        (0x1c, ie, vec![0u8; 12]),
    ]
}

pub(crate) fn mode_sense(lu: &LogicalUnit, cdb: &[u8]) -> Res {
    let six = byte(cdb, 0) == op::MODE_SENSE_6;
    let dbd = byte(cdb, 1) & 0x08 != 0;
    let llbaa = !six && byte(cdb, 1) & 0x10 != 0;
    let pc = byte(cdb, 2) >> 6;
    let page = byte(cdb, 2) & 0x3f;
    let subpage = byte(cdb, 3);
    let alloc = if six {
        u64::from(byte(cdb, 4))
    } else {
        be(cdb, 7, 2)
    };
    if pc == 3 {
        return Err(Sense::SAVING_NOT_SUPPORTED);
    }
    if subpage != 0 && subpage != 0xff {
        return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 3, None));
    }
    let pages = mode_pages(lu);
    let mut body = Vec::new();
    let mut found = false;
    for (code, cur, mask) in &pages {
        if page == 0x3f || page == *code {
            found = true;
            match pc {
                1 => {
                    let mut m = mask.clone();
                    m[0] = cur[0];
                    m[1] = cur[1];
                    body.extend_from_slice(&m);
                }
                2 => {
                    let mut def = cur.clone();
                    if *code == 0x0a {
                        def[2] = 0;
                        def[4] = 0;
                    }
                    body.extend_from_slice(&def);
                }
                _ => body.extend_from_slice(cur),
            }
        }
    }
    if !found {
        return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 2, Some(5)));
    }
    let g = lu.device().geometry();
    let mut dsp = 0x10u8; // DPOFUA
    if lu.write_protected().is_some() {
        dsp |= 0x80;
    }
    let bd: Vec<u8> = if dbd {
        Vec::new()
    } else if llbaa {
        let mut b = vec![0u8; 16];
        b[0..8].copy_from_slice(&g.blocks.to_be_bytes());
        b[12..16].copy_from_slice(&g.block_size.to_be_bytes());
        b
    } else {
        let mut b = vec![0u8; 8];
        let n = g.blocks.min(0xffff_ffff) as u32;
        b[0..4].copy_from_slice(&n.to_be_bytes());
        b[5..8].copy_from_slice(&g.block_size.to_be_bytes()[1..4]);
        b
    };
    let mut d = Vec::new();
    if six {
        let len = 3 + bd.len() + body.len();
        d.extend_from_slice(&[len.min(255) as u8, 0, dsp, bd.len() as u8]);
    } else {
        let len = 6 + bd.len() + body.len();
        d.extend_from_slice(&(len as u16).to_be_bytes());
        d.extend_from_slice(&[0, dsp, if llbaa { 1 } else { 0 }, 0]);
        d.extend_from_slice(&(bd.len() as u16).to_be_bytes());
    }
    d.extend_from_slice(&bd);
    d.extend_from_slice(&body);
    Ok(Response::good(truncate(d, alloc)))
}

pub(crate) fn mode_select(lu: &LogicalUnit, cdb: &[u8], data: &[u8]) -> Res {
    let six = byte(cdb, 0) == op::MODE_SELECT_6;
    if byte(cdb, 1) & 0x01 != 0 {
        // SP: no saved pages.
        return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 1, Some(0)));
    }
    if data.is_empty() {
        return Ok(Response::good(Bytes::new()));
    }
    let (hdr, bdl) = if six {
        if data.len() < 4 {
            return Err(Sense::PARAM_LIST_LENGTH);
        }
        (4usize, usize::from(data[3]))
    } else {
        if data.len() < 8 {
            return Err(Sense::PARAM_LIST_LENGTH);
        }
        (8usize, be(data, 6, 2) as usize)
    };
    let mut at = hdr + bdl;
    if at > data.len() {
        return Err(Sense::PARAM_LIST_LENGTH);
    }
    let pages = mode_pages(lu);
    let mut new_swp = None;
    let mut new_dsense = None;
    while at < data.len() {
        if data.len() - at < 2 {
            return Err(Sense::PARAM_LIST_LENGTH);
        }
        let code = data[at] & 0x3f;
        if data[at] & 0x40 != 0 {
            return Err(Sense::INVALID_FIELD_IN_PARAM.with_field(false, at as u16, None));
        }
        let len = usize::from(data[at + 1]) + 2;
        if at + len > data.len() {
            return Err(Sense::PARAM_LIST_LENGTH);
        }
        let pg = &data[at..at + len];
        let Some((_, cur, mask)) = pages.iter().find(|(c, _, _)| *c == code) else {
            return Err(Sense::INVALID_FIELD_IN_PARAM.with_field(false, at as u16, None));
        };
        if pg.len() != cur.len() {
            return Err(Sense::INVALID_FIELD_IN_PARAM.with_field(false, at as u16 + 1, None));
        }
        for i in 2..pg.len() {
            if (pg[i] ^ cur[i]) & !mask[i] != 0 {
                return Err(Sense::INVALID_FIELD_IN_PARAM.with_field(false, (at + i) as u16, None));
            }
        }
        if code == 0x0a {
            new_dsense = Some(pg[2] & 0x04 != 0);
            new_swp = Some(pg[4] & 0x08 != 0);
        }
        at += len;
    }
    let mut st = lu.lock();
    if let Some(v) = new_swp {
        st.swp = v;
    }
    if let Some(v) = new_dsense {
        st.d_sense = v;
    }
    Ok(Response::good(Bytes::new()))
}

// ----- REPORT SUPPORTED OPERATION CODES -----

/// (opcode, service action, CDB usage data).
fn supported() -> Vec<(u8, Option<u16>, Vec<u8>)> {
    let c6 = |o: u8, m: [u8; 5]| (o, None, [vec![o], m.to_vec()].concat());
    let c10 = |o: u8, m: [u8; 9]| (o, None, [vec![o], m.to_vec()].concat());
    let c12 = |o: u8, m: [u8; 11]| (o, None, [vec![o], m.to_vec()].concat());
    let c16 = |o: u8, m: [u8; 15]| (o, None, [vec![o], m.to_vec()].concat());
    let ff = 0xff;
    vec![
        c6(op::TEST_UNIT_READY, [0, 0, 0, 0, 0]),
        c6(op::REQUEST_SENSE, [0x01, 0, 0, ff, 0]),
        c6(op::READ_6, [0x1f, ff, ff, ff, 0]),
        c6(op::WRITE_6, [0x1f, ff, ff, ff, 0]),
        c6(op::INQUIRY, [0x01, ff, ff, ff, 0]),
        c6(op::MODE_SELECT_6, [0x11, 0, 0, ff, 0]),
        c6(op::RESERVE_6, [0, 0, 0, 0, 0]),
        c6(op::RELEASE_6, [0, 0, 0, 0, 0]),
        c6(op::MODE_SENSE_6, [0x08, ff, ff, ff, 0]),
        c6(op::START_STOP_UNIT, [0x01, 0x0f, 0xf7, 0, 0]),
        c6(op::PREVENT_ALLOW, [0, 0, 0x03, 0, 0]),
        c10(op::READ_CAPACITY_10, [0, 0, 0, 0, 0, 0, 0, 0, 0]),
        c10(op::READ_10, [0xfc, ff, ff, ff, ff, 0x3f, ff, ff, 0]),
        c10(op::WRITE_10, [0xfa, ff, ff, ff, ff, 0x3f, ff, ff, 0]),
        c10(op::WRITE_VERIFY_10, [0xf6, ff, ff, ff, ff, 0x3f, ff, ff, 0]),
        c10(op::VERIFY_10, [0xf6, ff, ff, ff, ff, 0x3f, ff, ff, 0]),
        c10(op::PREFETCH_10, [0x02, ff, ff, ff, ff, 0x3f, ff, ff, 0]),
        c10(op::SYNC_CACHE_10, [0x06, ff, ff, ff, ff, 0x3f, ff, ff, 0]),
        c10(op::READ_DEFECT_DATA_10, [0, 0x1f, 0, 0, 0, 0, ff, ff, 0]),
        c10(op::WRITE_SAME_10, [0xe8, ff, ff, ff, ff, 0x3f, ff, ff, 0]),
        c10(op::UNMAP, [0x00, 0, 0, 0, 0, 0x3f, ff, ff, 0]),
        c10(op::MODE_SELECT_10, [0x11, 0, 0, 0, 0, 0, ff, ff, 0]),
        c10(op::MODE_SENSE_10, [0x18, ff, ff, 0, 0, 0, ff, ff, 0]),
        (
            op::PR_IN,
            Some(0),
            vec![op::PR_IN, 0x1f, 0, 0, 0, 0, 0, ff, ff, 0],
        ),
        (
            op::PR_IN,
            Some(1),
            vec![op::PR_IN, 0x1f, 0, 0, 0, 0, 0, ff, ff, 0],
        ),
        (
            op::PR_IN,
            Some(2),
            vec![op::PR_IN, 0x1f, 0, 0, 0, 0, 0, ff, ff, 0],
        ),
        (
            op::PR_IN,
            Some(3),
            vec![op::PR_IN, 0x1f, 0, 0, 0, 0, 0, ff, ff, 0],
        ),
        (
            op::PR_OUT,
            Some(0),
            vec![op::PR_OUT, 0x1f, ff, 0, 0, ff, ff, ff, ff, 0],
        ),
        (
            op::PR_OUT,
            Some(1),
            vec![op::PR_OUT, 0x1f, ff, 0, 0, ff, ff, ff, ff, 0],
        ),
        (
            op::PR_OUT,
            Some(2),
            vec![op::PR_OUT, 0x1f, ff, 0, 0, ff, ff, ff, ff, 0],
        ),
        (
            op::PR_OUT,
            Some(3),
            vec![op::PR_OUT, 0x1f, ff, 0, 0, ff, ff, ff, ff, 0],
        ),
        (
            op::PR_OUT,
            Some(4),
            vec![op::PR_OUT, 0x1f, ff, 0, 0, ff, ff, ff, ff, 0],
        ),
        (
            op::PR_OUT,
            Some(5),
            vec![op::PR_OUT, 0x1f, ff, 0, 0, ff, ff, ff, ff, 0],
        ),
        (
            op::PR_OUT,
            Some(6),
            vec![op::PR_OUT, 0x1f, ff, 0, 0, ff, ff, ff, ff, 0],
        ),
        (
            op::PR_OUT,
            Some(7),
            vec![op::PR_OUT, 0x1f, ff, 0, 0, ff, ff, ff, ff, 0],
        ),
        (
            op::EXTENDED_COPY,
            Some(0),
            vec![
                op::EXTENDED_COPY,
                0x1f,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                ff,
                ff,
                ff,
                ff,
                0,
                0,
            ],
        ),
        (
            op::RECEIVE_COPY_RESULTS,
            Some(0),
            vec![
                op::RECEIVE_COPY_RESULTS,
                0x1f,
                ff,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                ff,
                ff,
                ff,
                ff,
                0,
                0,
            ],
        ),
        (
            op::RECEIVE_COPY_RESULTS,
            Some(3),
            vec![
                op::RECEIVE_COPY_RESULTS,
                0x1f,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                ff,
                ff,
                ff,
                ff,
                0,
                0,
            ],
        ),
        c16(
            op::READ_16,
            [
                0xfc, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, 0x3f, 0,
            ],
        ),
        c16(
            op::COMPARE_AND_WRITE,
            [0xf8, ff, ff, ff, ff, ff, ff, ff, ff, 0, 0, 0, ff, 0x3f, 0],
        ),
        c16(
            op::WRITE_16,
            [
                0xfa, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, 0x3f, 0,
            ],
        ),
        c16(
            op::ORWRITE_16,
            [
                0xf8, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, 0x3f, 0,
            ],
        ),
        c16(
            op::WRITE_VERIFY_16,
            [
                0xf6, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, 0x3f, 0,
            ],
        ),
        c16(
            op::VERIFY_16,
            [
                0xf6, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, 0x3f, 0,
            ],
        ),
        c16(
            op::PREFETCH_16,
            [
                0x02, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, 0x3f, 0,
            ],
        ),
        c16(
            op::SYNC_CACHE_16,
            [
                0x06, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, 0x3f, 0,
            ],
        ),
        c16(
            op::WRITE_SAME_16,
            [
                0xe9, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, ff, 0x3f, 0,
            ],
        ),
        c16(
            op::WRITE_ATOMIC_16,
            [0xf8, ff, ff, ff, ff, ff, ff, ff, ff, 0, 0, ff, ff, 0x3f, 0],
        ),
        (
            op::SERVICE_ACTION_IN_16,
            Some(u16::from(op::SAI_READ_CAPACITY_16)),
            vec![
                op::SERVICE_ACTION_IN_16,
                0x1f,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                ff,
                ff,
                ff,
                ff,
                0,
                0,
            ],
        ),
        (
            op::SERVICE_ACTION_IN_16,
            Some(u16::from(op::SAI_GET_LBA_STATUS)),
            vec![
                op::SERVICE_ACTION_IN_16,
                0x1f,
                ff,
                ff,
                ff,
                ff,
                ff,
                ff,
                ff,
                ff,
                ff,
                ff,
                ff,
                ff,
                0,
                0,
            ],
        ),
        (
            op::REPORT_LUNS,
            None,
            vec![op::REPORT_LUNS, 0, ff, 0, 0, 0, ff, ff, ff, ff, 0, 0],
        ),
        (
            op::MAINTENANCE_IN,
            Some(u16::from(op::MI_REPORT_SUPPORTED_OPCODES)),
            vec![
                op::MAINTENANCE_IN,
                0x1f,
                0x87,
                ff,
                ff,
                ff,
                ff,
                ff,
                ff,
                ff,
                0,
                0,
            ],
        ),
        c12(op::READ_12, [0xfc, ff, ff, ff, ff, ff, ff, ff, ff, 0x3f, 0]),
        c12(
            op::WRITE_12,
            [0xfa, ff, ff, ff, ff, ff, ff, ff, ff, 0x3f, 0],
        ),
        c12(
            op::WRITE_VERIFY_12,
            [0xf6, ff, ff, ff, ff, ff, ff, ff, ff, 0x3f, 0],
        ),
        c12(
            op::VERIFY_12,
            [0xf6, ff, ff, ff, ff, ff, ff, ff, ff, 0x3f, 0],
        ),
        c12(
            op::READ_DEFECT_DATA_12,
            [0x1f, 0, 0, 0, 0, ff, ff, ff, ff, 0, 0],
        ),
    ]
}

fn timeouts() -> [u8; 12] {
    let mut t = [0u8; 12];
    t[0..2].copy_from_slice(&10u16.to_be_bytes());
    t[4..8].copy_from_slice(&30u32.to_be_bytes());
    t[8..12].copy_from_slice(&60u32.to_be_bytes());
    t
}

pub(crate) fn report_supported_opcodes(cdb: &[u8]) -> Res {
    let rctd = byte(cdb, 2) & 0x80 != 0;
    let options = byte(cdb, 2) & 0x07;
    let req_op = byte(cdb, 3);
    let req_sa = be(cdb, 4, 2) as u16;
    let alloc = be(cdb, 6, 4);
    let table = supported();
    let mut d = Vec::new();
    match options {
        0 => {
            let mut list = Vec::new();
            for (o, sa, usage) in &table {
                list.push(*o);
                list.push(0);
                list.extend_from_slice(&sa.unwrap_or(0).to_be_bytes());
                list.push(0);
                let mut f = if sa.is_some() { 0x01 } else { 0 };
                if rctd {
                    f |= 0x02;
                }
                list.push(f);
                list.extend_from_slice(&(usage.len() as u16).to_be_bytes());
                if rctd {
                    list.extend_from_slice(&timeouts());
                }
            }
            d.extend_from_slice(&(list.len() as u32).to_be_bytes());
            d.extend_from_slice(&list);
        }
        1..=3 => {
            let has_sa = table.iter().any(|(o, sa, _)| *o == req_op && sa.is_some());
            if options == 1 && has_sa {
                return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 2, None));
            }
            let known = table.iter().any(|(o, _, _)| *o == req_op);
            if options == 2 && known && !has_sa {
                return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 2, None));
            }
            let entry = table.iter().find(|(o, sa, _)| {
                *o == req_op
                    && match sa {
                        Some(s) => (options == 2 || options == 3) && *s == req_sa,
                        None => true,
                    }
            });
            match entry {
                Some((_, _, usage)) => {
                    d.push(0);
                    d.push(if rctd { 0x83 } else { 0x03 });
                    d.extend_from_slice(&(usage.len() as u16).to_be_bytes());
                    d.extend_from_slice(usage);
                    if rctd {
                        d.extend_from_slice(&timeouts());
                    }
                }
                None => {
                    d.extend_from_slice(&[0, 0x01, 0, 0]);
                }
            }
        }
        _ => return Err(Sense::INVALID_FIELD_IN_CDB.with_field(true, 2, Some(0))),
    }
    Ok(Response::good(truncate(d, alloc)))
}
