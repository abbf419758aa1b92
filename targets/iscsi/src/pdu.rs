//! iSCSI PDU framing (RFC 7143 11.2), split as mini-redis splits frames: [`check`] says
//! whether a whole PDU is buffered (and how long it is) without allocating, [`parse`]
//! then takes it apart. Every length is bounded before anything is allocated: the data
//! segment by the negotiated MaxRecvDataSegmentLength, the AHS by its one-byte length
//! field. Fuzzed as `iscsi_pdu`.

use crate::txq::TxQueue;
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Length of the basic header segment.
pub const BHS_LEN: usize = 48;

/// Initiator opcodes.
#[allow(missing_docs)]
pub mod opcode {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_CMD: u8 = 0x01;
    pub const TASK_MGMT: u8 = 0x02;
    pub const LOGIN: u8 = 0x03;
    pub const TEXT: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT: u8 = 0x06;
    pub const SNACK: u8 = 0x10;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RSP: u8 = 0x21;
    pub const TASK_MGMT_RSP: u8 = 0x22;
    pub const LOGIN_RSP: u8 = 0x23;
    pub const TEXT_RSP: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RSP: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// How PDUs are framed on a connection: digests and the largest data segment accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    /// CRC32C after the header.
    pub header_digest: bool,
    /// CRC32C after the data segment.
    pub data_digest: bool,
    /// Largest data segment accepted from the peer.
    pub max_data: usize,
}

impl Default for Framing {
    fn default() -> Self {
        Framing {
            header_digest: false,
            data_digest: false,
            max_data: 64 * 1024,
        }
    }
}

/// Why [`check`] or [`parse`] could not produce a PDU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// More bytes are needed (at least this many in total).
    #[error("incomplete PDU: need {0} bytes")]
    Incomplete(usize),
    /// The data segment is longer than the negotiated limit.
    #[error("data segment of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Declared length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The header digest does not match: the length fields cannot be trusted.
    #[error("header digest mismatch")]
    HeaderDigest,
    /// The data digest does not match.
    #[error("data digest mismatch")]
    DataDigest,
}

/// A parsed PDU: the basic header, any additional header segments, the data segment
/// (without padding or digests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    /// The 48-byte basic header segment.
    pub bhs: [u8; BHS_LEN],
    /// Additional header segments.
    pub ahs: Bytes,
    /// The data segment.
    pub data: Bytes,
}

fn u24(b: &[u8]) -> usize {
    (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2])
}

/// Checks whether `buf` starts with a whole PDU; returns its length on the wire.
pub fn check(buf: &[u8], f: &Framing) -> Result<usize, PduError> {
    if buf.len() < BHS_LEN {
        return Err(PduError::Incomplete(BHS_LEN));
    }
    let ahs = usize::from(buf[4]) * 4;
    let data = u24(&buf[5..8]);
    if data > f.max_data {
        return Err(PduError::TooLong {
            len: data,
            max: f.max_data,
        });
    }
    let hd = if f.header_digest { 4 } else { 0 };
    let dd = if f.data_digest && data > 0 { 4 } else { 0 };
    let total = BHS_LEN + ahs + hd + data.next_multiple_of(4) + dd;
    if buf.len() < total {
        return Err(PduError::Incomplete(total));
    }
    Ok(total)
}

/// Parses the PDU at the start of `buf` (which [`check`] accepted), consuming it.
pub fn parse(buf: &mut BytesMut, f: &Framing) -> Result<Pdu, PduError> {
    let total = check(buf, f)?;
    if total == BHS_LEN {
        // The common case (a command without data, a NOP, a task management request):
        // copy the header out, no reference to the receive buffer.
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(&buf[..BHS_LEN]);
        buf.advance(BHS_LEN);
        return Ok(Pdu {
            bhs,
            ahs: Bytes::new(),
            data: Bytes::new(),
        });
    }
    let wire = buf.split_to(total).freeze();
    let ahs_len = usize::from(wire[4]) * 4;
    let data_len = u24(&wire[5..8]);
    let mut at = BHS_LEN + ahs_len;
    if f.header_digest {
        let want = u32::from_le_bytes([wire[at], wire[at + 1], wire[at + 2], wire[at + 3]]);
        if crc32c::crc32c(&wire[..at]) != want {
            return Err(PduError::HeaderDigest);
        }
        at += 4;
    }
    let data = wire.slice(at..at + data_len);
    if f.data_digest && data_len > 0 {
        let padded = data_len.next_multiple_of(4);
        let d = at + padded;
        let want = u32::from_le_bytes([wire[d], wire[d + 1], wire[d + 2], wire[d + 3]]);
        if crc32c::crc32c(&wire[at..at + padded]) != want {
            return Err(PduError::DataDigest);
        }
    }
    let mut bhs = [0u8; BHS_LEN];
    bhs.copy_from_slice(&wire[..BHS_LEN]);
    Ok(Pdu {
        bhs,
        ahs: wire.slice(BHS_LEN..BHS_LEN + ahs_len),
        data,
    })
}

impl Pdu {
    /// A PDU with this opcode and an empty header otherwise.
    pub fn new(opcode: u8) -> Self {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode;
        Pdu {
            bhs,
            ahs: Bytes::new(),
            data: Bytes::new(),
        }
    }

    /// The opcode (without the immediate bit).
    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }

    /// The immediate-delivery bit.
    pub fn immediate(&self) -> bool {
        self.bhs[0] & 0x40 != 0
    }

    /// The final bit (byte 1, bit 7).
    pub fn final_bit(&self) -> bool {
        self.bhs[1] & 0x80 != 0
    }

    /// Big-endian u32 at byte `at` of the header.
    pub fn u32(&self, at: usize) -> u32 {
        u32::from_be_bytes([
            self.bhs[at],
            self.bhs[at + 1],
            self.bhs[at + 2],
            self.bhs[at + 3],
        ])
    }

    /// Sets a big-endian u32 at byte `at`.
    pub fn set_u32(&mut self, at: usize, v: u32) {
        self.bhs[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    /// The LUN field (bytes 8..16).
    pub fn lun_field(&self) -> [u8; 8] {
        let mut l = [0u8; 8];
        l.copy_from_slice(&self.bhs[8..16]);
        l
    }

    /// Initiator task tag.
    pub fn itt(&self) -> u32 {
        self.u32(16)
    }

    /// Queues the PDU, framed, on `q`: the header is copied, the data segment is
    /// queued as it is (no copy unless short).
    pub fn encode_to(&self, f: &Framing, q: &mut TxQueue) {
        let mut hdr = [0u8; BHS_LEN + 4];
        let mut bhs = self.bhs;
        bhs[4] = (self.ahs.len() / 4) as u8;
        let n = self.data.len();
        bhs[5] = (n >> 16) as u8;
        bhs[6] = (n >> 8) as u8;
        bhs[7] = n as u8;
        if self.ahs.is_empty() {
            hdr[..BHS_LEN].copy_from_slice(&bhs);
            let mut h = BHS_LEN;
            if f.header_digest {
                let crc = crc32c::crc32c(&bhs);
                hdr[h..h + 4].copy_from_slice(&crc.to_le_bytes());
                h += 4;
            }
            q.put_slice(&hdr[..h]);
        } else {
            q.put_slice(&bhs);
            q.put_slice(&self.ahs);
            if f.header_digest {
                let crc = crc32c::crc32c_append(crc32c::crc32c(&bhs), &self.ahs);
                q.put_slice(&crc.to_le_bytes());
            }
        }
        if n > 0 {
            let pad = n.next_multiple_of(4) - n;
            let crc = f
                .data_digest
                .then(|| crc32c::crc32c_append(crc32c::crc32c(&self.data), &[0u8; 3][..pad]));
            q.put_bytes(self.data.clone());
            let mut trailer = [0u8; 7];
            let mut t = pad;
            if let Some(crc) = crc {
                trailer[t..t + 4].copy_from_slice(&crc.to_le_bytes());
                t += 4;
            }
            if t > 0 {
                q.put_slice(&trailer[..t]);
            }
        }
    }

    /// Appends the PDU, framed, to `out`.
    pub fn encode(&self, f: &Framing, out: &mut BytesMut) {
        let mut bhs = self.bhs;
        bhs[4] = (self.ahs.len() / 4) as u8;
        let n = self.data.len();
        bhs[5] = (n >> 16) as u8;
        bhs[6] = (n >> 8) as u8;
        bhs[7] = n as u8;
        let pad = n.next_multiple_of(4) - n;
        out.reserve(BHS_LEN + self.ahs.len() + 8 + n + pad);
        let start = out.len();
        out.put_slice(&bhs);
        out.put_slice(&self.ahs);
        if f.header_digest {
            let crc = crc32c::crc32c(&out[start..]);
            out.put_u32_le(crc);
        }
        if n > 0 {
            let dstart = out.len();
            out.put_slice(&self.data);
            out.put_bytes(0, pad);
            if f.data_digest {
                let crc = crc32c::crc32c(&out[dstart..]);
                out.put_u32_le(crc);
            }
        }
    }
}

/// Decodes the SAM LUN structure (peripheral and flat addressing) to a LUN number.
pub fn decode_lun(l: [u8; 8]) -> u64 {
    match l[0] >> 6 {
        0 => u64::from(l[1]),
        1 => (u64::from(l[0] & 0x3f) << 8) | u64::from(l[1]),
        _ => u64::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn roundtrip_with_digests() {
        let f = Framing {
            header_digest: true,
            data_digest: true,
            max_data: 1024,
        };
        let mut p = Pdu::new(opcode::NOP_IN);
        p.data = Bytes::from_static(b"hello");
        p.set_u32(16, 7);
        let mut out = BytesMut::new();
        p.encode(&f, &mut out);
        assert_eq!(check(&out[..10], &f), Err(PduError::Incomplete(BHS_LEN)));
        let mut b = out.clone();
        let q = parse(&mut b, &f).unwrap();
        assert!(b.is_empty());
        assert_eq!(q.data, p.data);
        assert_eq!(q.itt(), 7);
        // Corrupt the data: digest error.
        let mut bad = out.clone();
        let i = BHS_LEN + 4;
        bad[i] ^= 1;
        assert_eq!(parse(&mut bad, &f), Err(PduError::DataDigest));
    }

    #[test]
    fn queued_encoding_matches_contiguous() {
        for (hd, dd) in [(false, false), (true, false), (false, true), (true, true)] {
            let f = Framing {
                header_digest: hd,
                data_digest: dd,
                max_data: 1 << 20,
            };
            for n in [0usize, 1, 3, 4, 511, 512, 513, 4096, 65_537] {
                let mut p = Pdu::new(opcode::DATA_IN);
                p.data = Bytes::from((0..n).map(|i| i as u8).collect::<Vec<u8>>());
                if n == 3 {
                    p.ahs = Bytes::from_static(&[0, 1, 2, 3, 4, 5, 6, 7]);
                }
                let mut a = BytesMut::new();
                p.encode(&f, &mut a);
                let mut q = TxQueue::new();
                p.encode_to(&f, &mut q);
                assert_eq!(q.take_all(), a, "n {n} hd {hd} dd {dd}");
                let mut back = a.clone();
                let got = parse(&mut back, &f).unwrap();
                assert_eq!(got.data, p.data);
            }
        }
    }

    #[test]
    fn oversized_segment_is_refused_before_buffering() {
        // Regression (the LIO isert login crash, CVE-2026-53176, was a short login PDU):
        // any prefix gives Incomplete, and a huge declared length is refused at once.
        let mut h = [0u8; BHS_LEN];
        h[0] = opcode::LOGIN;
        h[5] = 0xff;
        h[6] = 0xff;
        h[7] = 0xff;
        assert!(matches!(
            check(&h, &Framing::default()),
            Err(PduError::TooLong { .. })
        ));
        for n in 0..BHS_LEN {
            assert_eq!(
                check(&h[..n], &Framing::default()),
                Err(PduError::Incomplete(BHS_LEN))
            );
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400), hd: bool, dd: bool) {
            let f = Framing { header_digest: hd, data_digest: dd, max_data: 256 };
            let mut b = BytesMut::from(&bytes[..]);
            while let Ok(p) = parse(&mut b, &f) {
                prop_assert!(p.data.len() <= 256);
            }
        }
    }
}
