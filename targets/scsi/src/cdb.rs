//! CDB field access and classification: which opcode a CDB carries, how long it must
//! be, and how many bytes of data it moves. Total on every input (never panics), so
//! transports can use it on untrusted bytes before anything else; fuzzed as
//! `scsi_cdb`.

/// Operation codes this core implements.
#[allow(missing_docs)]
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const PREFETCH_10: u8 = 0x34;
    pub const SYNC_CACHE_10: u8 = 0x35;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const PR_IN: u8 = 0x5e;
    pub const PR_OUT: u8 = 0x5f;
    pub const EXTENDED_COPY: u8 = 0x83;
    pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8a;
    pub const ORWRITE_16: u8 = 0x8b;
    pub const WRITE_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const PREFETCH_16: u8 = 0x90;
    pub const SYNC_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const WRITE_ATOMIC_16: u8 = 0x9c;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_VERIFY_12: u8 = 0xae;
    pub const VERIFY_12: u8 = 0xaf;
    pub const READ_DEFECT_DATA_12: u8 = 0xb7;
    /// SERVICE ACTION IN(16) service actions.
    pub const SAI_READ_CAPACITY_16: u8 = 0x10;
    /// GET LBA STATUS service action.
    pub const SAI_GET_LBA_STATUS: u8 = 0x12;
    /// MAINTENANCE IN: REPORT SUPPORTED OPERATION CODES.
    pub const MI_REPORT_SUPPORTED_OPCODES: u8 = 0x0c;
}

/// Length of the CDB for `opcode` from its group code (SPC-4 4.2.5.1), `None` for the
/// vendor-specific and reserved groups.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// Big-endian field of `n` bytes at `at`; zero where the CDB is too short.
pub fn be(cdb: &[u8], at: usize, n: usize) -> u64 {
    if let Some(b) = at.checked_add(n).and_then(|end| cdb.get(at..end)) {
        return b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
    }
    (at..at.saturating_add(n)).fold(0u64, |acc, i| {
        (acc << 8) | u64::from(cdb.get(i).copied().unwrap_or(0))
    })
}

/// Byte `at` of the CDB, zero when absent.
pub fn byte(cdb: &[u8], at: usize) -> u8 {
    cdb.get(at).copied().unwrap_or(0)
}

/// Direction and size of the data a command moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Transfer {
    /// Bytes the initiator must send (Data-Out), as the CDB defines them.
    pub data_out: u64,
    /// Most bytes the target may return (Data-In).
    pub data_in: u64,
}

/// Logical block address and block count of a media-access CDB, with the transfer
/// length in blocks as the CDB states it (READ(6)'s 0 means 256).
pub fn lba_and_len(cdb: &[u8]) -> Option<(u64, u64)> {
    let opc = byte(cdb, 0);
    Some(match opc {
        op::READ_6 | op::WRITE_6 => {
            let lba = be(cdb, 1, 3) & 0x1f_ffff;
            let n = u64::from(byte(cdb, 4));
            (lba, if n == 0 { 256 } else { n })
        }
        op::READ_10
        | op::WRITE_10
        | op::WRITE_VERIFY_10
        | op::VERIFY_10
        | op::PREFETCH_10
        | op::SYNC_CACHE_10
        | op::WRITE_SAME_10 => (be(cdb, 2, 4), be(cdb, 7, 2)),
        op::READ_12 | op::WRITE_12 | op::WRITE_VERIFY_12 | op::VERIFY_12 => {
            (be(cdb, 2, 4), be(cdb, 6, 4))
        }
        op::READ_16
        | op::WRITE_16
        | op::WRITE_VERIFY_16
        | op::VERIFY_16
        | op::PREFETCH_16
        | op::SYNC_CACHE_16
        | op::WRITE_SAME_16
        | op::ORWRITE_16 => (be(cdb, 2, 8), be(cdb, 10, 4)),
        op::WRITE_ATOMIC_16 => (be(cdb, 2, 8), be(cdb, 12, 2)),
        op::COMPARE_AND_WRITE => (be(cdb, 2, 8), u64::from(byte(cdb, 13))),
        _ => return None,
    })
}

/// The data a CDB asks to move, for a logical unit of `block_size`-byte blocks: what a
/// transport compares with the initiator's expected length to compute residuals.
pub fn transfer(cdb: &[u8], block_size: u32) -> Transfer {
    let bs = u64::from(block_size);
    let opc = byte(cdb, 0);
    let blocks = |cdb: &[u8]| lba_and_len(cdb).map(|(_, n)| n).unwrap_or(0);
    let out = |n: u64| Transfer {
        data_out: n,
        data_in: 0,
    };
    let inn = |n: u64| Transfer {
        data_out: 0,
        data_in: n,
    };
    match opc {
        op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => inn(blocks(cdb) * bs),
        op::WRITE_6
        | op::WRITE_10
        | op::WRITE_12
        | op::WRITE_16
        | op::WRITE_VERIFY_10
        | op::WRITE_VERIFY_12
        | op::WRITE_VERIFY_16
        | op::ORWRITE_16
        | op::WRITE_ATOMIC_16 => out(blocks(cdb) * bs),
        op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => match (byte(cdb, 1) >> 1) & 3 {
            1 => out(blocks(cdb) * bs),
            3 => out(bs),
            _ => Transfer::default(),
        },
        op::COMPARE_AND_WRITE => out(2 * blocks(cdb) * bs),
        op::WRITE_SAME_10 => out(bs),
        op::WRITE_SAME_16 => out(if byte(cdb, 1) & 1 != 0 { 0 } else { bs }),
        op::UNMAP => out(be(cdb, 7, 2)),
        op::MODE_SELECT_6 => out(u64::from(byte(cdb, 4))),
        op::MODE_SELECT_10 => out(be(cdb, 7, 2)),
        op::PR_OUT => out(be(cdb, 5, 4)),
        op::EXTENDED_COPY => out(be(cdb, 10, 4)),
        op::INQUIRY => inn(be(cdb, 3, 2)),
        op::REQUEST_SENSE | op::MODE_SENSE_6 => inn(u64::from(byte(cdb, 4))),
        op::MODE_SENSE_10 | op::PR_IN | op::READ_DEFECT_DATA_10 => inn(be(cdb, 7, 2)),
        op::READ_CAPACITY_10 => inn(8),
        op::SERVICE_ACTION_IN_16 | op::RECEIVE_COPY_RESULTS => inn(be(cdb, 10, 4)),
        op::REPORT_LUNS => inn(be(cdb, 6, 4)),
        op::MAINTENANCE_IN | op::READ_DEFECT_DATA_12 => inn(be(cdb, 6, 4)),
        _ => Transfer::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn read6_zero_means_256() {
        assert_eq!(lba_and_len(&[0x08, 0, 0, 5, 0, 0]), Some((5, 256)));
    }

    proptest! {
        #[test]
        fn classification_is_total(cdb in proptest::collection::vec(any::<u8>(), 0..32), bs in prop::sample::select(vec![512u32, 4096])) {
            let _ = transfer(&cdb, bs);
            let _ = lba_and_len(&cdb);
            if let Some(&b) = cdb.first() { let _ = cdb_len(b); }
        }
    }
}
