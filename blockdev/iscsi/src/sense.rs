//! SCSI sense data and status to [`BlockError`] / [`CompareOutcome`]: sans-IO, tested
//! and fuzzed on raw bytes.

use basalt_blockdev::{BlockError, CompareOutcome};
use std::io;

/// Sense key MISCOMPARE.
pub const KEY_MISCOMPARE: u8 = 0x0e;
/// Sense key ILLEGAL REQUEST.
pub const KEY_ILLEGAL_REQUEST: u8 = 0x05;
/// Sense key DATA PROTECT.
pub const KEY_DATA_PROTECT: u8 = 0x07;

/// The fields of sense data this crate acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// The INFORMATION field, when valid.
    pub information: Option<u64>,
}

/// Parses fixed-format (0x70/0x71) or descriptor-format (0x72/0x73) sense data.
pub fn parse(b: &[u8]) -> Option<Sense> {
    let code = *b.first()? & 0x7f;
    match code {
        0x70 | 0x71 => {
            if b.len() < 14 {
                // Key only, if that much is there.
                let key = b.get(2)? & 0x0f;
                return Some(Sense {
                    key,
                    asc: 0,
                    ascq: 0,
                    information: None,
                });
            }
            let valid = b[0] & 0x80 != 0;
            let info = u32::from_be_bytes([b[3], b[4], b[5], b[6]]);
            Some(Sense {
                key: b[2] & 0x0f,
                asc: b[12],
                ascq: b[13],
                information: valid.then_some(u64::from(info)),
            })
        }
        0x72 | 0x73 => {
            if b.len() < 8 {
                return None;
            }
            let mut information = None;
            let total = (8 + usize::from(b[7])).min(b.len());
            let mut at = 8;
            while at + 2 <= total {
                let ty = b[at];
                let len = usize::from(b[at + 1]);
                let end = at + 2 + len;
                if end > total {
                    break;
                }
                if ty == 0 && len >= 10 && b[at + 2] & 0x80 != 0 {
                    let mut v = [0u8; 8];
                    v.copy_from_slice(&b[at + 4..at + 12]);
                    information = Some(u64::from_be_bytes(v));
                }
                at = end;
            }
            Some(Sense {
                key: b[1] & 0x0f,
                asc: b[2],
                ascq: b[3],
                information,
            })
        }
        _ => None,
    }
}

fn other(op: &'static str, offset: u64, len: u64, msg: String) -> BlockError {
    BlockError::io(op, offset, len, io::Error::other(msg))
}

/// Maps a CHECK CONDITION with `sense` to an error (or, for compare-and-write, a
/// miscompare outcome).
pub fn to_result(
    op: &'static str,
    offset: u64,
    len: u64,
    sense: Option<Sense>,
) -> Result<CompareOutcome, BlockError> {
    let Some(s) = sense else {
        return Err(other(
            op,
            offset,
            len,
            "CHECK CONDITION without sense data".into(),
        ));
    };
    match (s.key, s.asc) {
        (KEY_MISCOMPARE, _) => Ok(CompareOutcome::Miscompare {
            offset: s.information.unwrap_or(0),
        }),
        // Invalid command operation code, invalid field in CDB: not implemented.
        (KEY_ILLEGAL_REQUEST, 0x20) | (KEY_ILLEGAL_REQUEST, 0x24) => {
            Err(BlockError::Unsupported(unsupported_name(op)))
        }
        (KEY_ILLEGAL_REQUEST, 0x21) => Err(BlockError::OutOfRange {
            offset,
            len,
            capacity: 0,
        }),
        (KEY_DATA_PROTECT, _) => Err(BlockError::ReadOnly),
        _ => Err(other(
            op,
            offset,
            len,
            format!(
                "SCSI sense key {:#x} asc {:#04x} ascq {:#04x}",
                s.key, s.asc, s.ascq
            ),
        )),
    }
}

fn unsupported_name(op: &'static str) -> &'static str {
    match op {
        "compare_and_write" => "COMPARE AND WRITE (target rejected the command)",
        "write_same" => "WRITE SAME(16) (target rejected the command)",
        "unmap" => "UNMAP (target rejected the command)",
        _ => "SCSI command rejected by the target",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_miscompare_with_information() {
        let mut b = [0u8; 18];
        b[0] = 0xf0; // valid + 0x70
        b[2] = KEY_MISCOMPARE;
        b[3..7].copy_from_slice(&37u32.to_be_bytes());
        b[7] = 10;
        b[12] = 0x1d;
        let s = parse(&b).unwrap();
        assert_eq!(s.information, Some(37));
        assert_eq!(
            to_result("compare_and_write", 0, 512, Some(s)).unwrap(),
            CompareOutcome::Miscompare { offset: 37 }
        );
    }

    #[test]
    fn descriptor_information() {
        let b = [
            0x72,
            KEY_MISCOMPARE,
            0x1d,
            0,
            0,
            0,
            0,
            12,
            0x00,
            10,
            0x80,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            1,
            2,
        ];
        assert_eq!(parse(&b).unwrap().information, Some(0x102));
    }

    #[test]
    fn illegal_request_is_unsupported() {
        let mut b = [0u8; 18];
        b[0] = 0x70;
        b[2] = KEY_ILLEGAL_REQUEST;
        b[12] = 0x20;
        let r = to_result("compare_and_write", 0, 512, parse(&b));
        assert!(matches!(r, Err(BlockError::Unsupported(_))));
    }

    #[test]
    fn garbage_never_panics() {
        let mut x = 1u64;
        for n in 0..2000usize {
            let len = n % 40;
            let b: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = to_result("read", 0, 0, parse(&b));
        }
    }
}
