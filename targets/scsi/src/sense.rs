//! SCSI status codes and sense data (SPC-4 4.5): wire errors as data.

use bytes::Bytes;

/// SCSI status byte (SAM-5 5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    /// The command completed.
    Good = 0x00,
    /// Sense data describes an error.
    CheckCondition = 0x02,
    /// PRE-FETCH: the range fits the cache.
    ConditionMet = 0x04,
    /// The logical unit is busy.
    Busy = 0x08,
    /// A reservation held by another I_T nexus forbids the command.
    ReservationConflict = 0x18,
    /// The task set is full.
    TaskSetFull = 0x28,
    /// The task was aborted.
    TaskAborted = 0x40,
}

/// Sense keys (SPC-4 table 49).
#[allow(missing_docs)]
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const RECOVERED_ERROR: u8 = 0x1;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const COPY_ABORTED: u8 = 0xA;
    pub const ABORTED_COMMAND: u8 = 0xB;
    pub const MISCOMPARE: u8 = 0xE;
}

/// Sense data: key, additional sense code and qualifier, optional INFORMATION field and
/// sense-key specific bytes (field pointer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// The INFORMATION field (VALID bit set when present).
    pub info: Option<u64>,
    /// Sense-key specific field pointer: (C/D bit: true for the CDB, byte, bit).
    pub field: Option<(bool, u16, Option<u8>)>,
}

macro_rules! senses {
    ($($(#[$doc:meta])* $name:ident = ($k:expr, $asc:expr, $ascq:expr);)*) => {
        impl Sense {
            $($(#[$doc])* pub const $name: Sense = Sense { key: $k, asc: $asc, ascq: $ascq, info: None, field: None };)*
        }
    };
}

senses! {
    /// 5/20/00 INVALID COMMAND OPERATION CODE.
    INVALID_OPCODE = (key::ILLEGAL_REQUEST, 0x20, 0x00);
    /// 5/21/00 LOGICAL BLOCK ADDRESS OUT OF RANGE.
    LBA_OUT_OF_RANGE = (key::ILLEGAL_REQUEST, 0x21, 0x00);
    /// 5/24/00 INVALID FIELD IN CDB.
    INVALID_FIELD_IN_CDB = (key::ILLEGAL_REQUEST, 0x24, 0x00);
    /// 5/25/00 LOGICAL UNIT NOT SUPPORTED.
    LUN_NOT_SUPPORTED = (key::ILLEGAL_REQUEST, 0x25, 0x00);
    /// 5/26/00 INVALID FIELD IN PARAMETER LIST.
    INVALID_FIELD_IN_PARAM = (key::ILLEGAL_REQUEST, 0x26, 0x00);
    /// 5/1A/00 PARAMETER LIST LENGTH ERROR.
    PARAM_LIST_LENGTH = (key::ILLEGAL_REQUEST, 0x1a, 0x00);
    /// 5/2C/00 COMMAND SEQUENCE ERROR.
    COMMAND_SEQUENCE = (key::ILLEGAL_REQUEST, 0x2c, 0x00);
    /// 5/39/00 SAVING PARAMETERS NOT SUPPORTED.
    SAVING_NOT_SUPPORTED = (key::ILLEGAL_REQUEST, 0x39, 0x00);
    /// 5/55/04 INSUFFICIENT REGISTRATION RESOURCES.
    INSUFFICIENT_REGISTRATION = (key::ILLEGAL_REQUEST, 0x55, 0x04);
    /// 5/24/00 with the misaligned-write meaning kept (used for WRITE ATOMIC limits).
    ILLEGAL_ATOMIC = (key::ILLEGAL_REQUEST, 0x24, 0x00);
    /// 7/27/00 WRITE PROTECTED.
    WRITE_PROTECTED = (key::DATA_PROTECT, 0x27, 0x00);
    /// 7/27/07 SPACE ALLOCATION FAILED WRITE PROTECT (thin pool full).
    SPACE_ALLOCATION_FAILED = (key::DATA_PROTECT, 0x27, 0x07);
    /// E/1D/00 MISCOMPARE DURING VERIFY OPERATION.
    MISCOMPARE = (key::MISCOMPARE, 0x1d, 0x00);
    /// 3/11/00 UNRECOVERED READ ERROR.
    UNRECOVERED_READ = (key::MEDIUM_ERROR, 0x11, 0x00);
    /// 3/0C/00 WRITE ERROR.
    WRITE_ERROR = (key::MEDIUM_ERROR, 0x0c, 0x00);
    /// 4/44/00 INTERNAL TARGET FAILURE.
    INTERNAL_FAILURE = (key::HARDWARE_ERROR, 0x44, 0x00);
    /// 4/08/00 LOGICAL UNIT COMMUNICATION FAILURE (device offline).
    LU_COMMUNICATION_FAILURE = (key::HARDWARE_ERROR, 0x08, 0x00);
    /// 6/29/00 POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
    UA_RESET = (key::UNIT_ATTENTION, 0x29, 0x00);
    /// 6/29/03 BUS DEVICE RESET FUNCTION OCCURRED (LUN reset).
    UA_LUN_RESET = (key::UNIT_ATTENTION, 0x29, 0x03);
    /// 6/2A/03 RESERVATIONS PREEMPTED.
    UA_RESERVATIONS_PREEMPTED = (key::UNIT_ATTENTION, 0x2a, 0x03);
    /// 6/2A/04 RESERVATIONS RELEASED.
    UA_RESERVATIONS_RELEASED = (key::UNIT_ATTENTION, 0x2a, 0x04);
    /// 6/2A/05 REGISTRATIONS PREEMPTED.
    UA_REGISTRATIONS_PREEMPTED = (key::UNIT_ATTENTION, 0x2a, 0x05);
    /// 6/2A/01 MODE PARAMETERS CHANGED.
    UA_MODE_CHANGED = (key::UNIT_ATTENTION, 0x2a, 0x01);
    /// 6/3F/0E REPORTED LUNS DATA HAS CHANGED.
    UA_LUNS_CHANGED = (key::UNIT_ATTENTION, 0x3f, 0x0e);
    /// 6/2A/09 CAPACITY DATA HAS CHANGED.
    UA_CAPACITY_CHANGED = (key::UNIT_ATTENTION, 0x2a, 0x09);
    /// B/47/05 PROTOCOL SERVICE CRC ERROR (digest failures).
    CRC_ERROR = (key::ABORTED_COMMAND, 0x47, 0x05);
    /// B/0C/0D NOT ENOUGH UNSOLICITED DATA.
    NOT_ENOUGH_UNSOLICITED = (key::ABORTED_COMMAND, 0x0c, 0x0d);
    /// B/00/00 aborted command without further detail.
    ABORTED = (key::ABORTED_COMMAND, 0x00, 0x00);
    /// B/4B/00 DATA PHASE ERROR.
    DATA_PHASE_ERROR = (key::ABORTED_COMMAND, 0x4b, 0x00);
    /// A/0D/02 COPY TARGET DEVICE NOT REACHABLE.
    COPY_TARGET_UNREACHABLE = (key::COPY_ABORTED, 0x0d, 0x02);
    /// A/26/00 invalid field in the copy's parameter list.
    COPY_INVALID_PARAM = (key::COPY_ABORTED, 0x26, 0x00);
    /// A/0D/01 THIRD PARTY DEVICE FAILURE.
    COPY_DEVICE_FAILURE = (key::COPY_ABORTED, 0x0d, 0x01);
    /// 5/26/09 TOO MANY TARGET DESCRIPTORS.
    TOO_MANY_TARGET_DESCRIPTORS = (key::ILLEGAL_REQUEST, 0x26, 0x06);
    /// 5/26/09 TOO MANY SEGMENT DESCRIPTORS.
    TOO_MANY_SEGMENT_DESCRIPTORS = (key::ILLEGAL_REQUEST, 0x26, 0x08);
    /// 5/26/07 UNSUPPORTED TARGET DESCRIPTOR TYPE CODE.
    UNSUPPORTED_TARGET_DESCRIPTOR = (key::ILLEGAL_REQUEST, 0x26, 0x07);
    /// 5/26/09 UNSUPPORTED SEGMENT DESCRIPTOR TYPE CODE.
    UNSUPPORTED_SEGMENT_DESCRIPTOR = (key::ILLEGAL_REQUEST, 0x26, 0x09);
    /// 5/0E/03 INVALID FIELD IN COMMAND INFORMATION UNIT.
    INVALID_FIELD_IN_IU = (key::ILLEGAL_REQUEST, 0x0e, 0x03);
    /// 2/3A/00 MEDIUM NOT PRESENT.
    MEDIUM_NOT_PRESENT = (key::NOT_READY, 0x3a, 0x00);
    /// 2/04/02 NOT READY, INITIALIZING COMMAND REQUIRED (stopped unit).
    NOT_READY_INIT_REQUIRED = (key::NOT_READY, 0x04, 0x02);
    /// 5/53/02 MEDIUM REMOVAL PREVENTED.
    REMOVAL_PREVENTED = (key::ILLEGAL_REQUEST, 0x53, 0x02);
    /// 5/24/00 variant for an operation in progress: OPERATION IN PROGRESS 00/16.
    OPERATION_IN_PROGRESS = (key::NOT_READY, 0x00, 0x16);
}

impl Sense {
    /// This sense with the INFORMATION field set.
    pub const fn with_info(mut self, info: u64) -> Sense {
        self.info = Some(info);
        self
    }

    /// This sense pointing at byte `byte` (bit `bit`) of the CDB (`cdb` true) or of the
    /// parameter list.
    pub const fn with_field(mut self, cdb: bool, byte: u16, bit: Option<u8>) -> Sense {
        self.field = Some((cdb, byte, bit));
        self
    }

    /// Fixed-format sense data (response code 0x70), 18 bytes.
    pub fn to_fixed(&self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70;
        b[2] = self.key & 0x0f;
        if let Some(info) = self.info {
            b[0] |= 0x80;
            // The fixed format has four bytes of INFORMATION.
            b[3..7].copy_from_slice(&(info as u32).to_be_bytes());
        }
        b[7] = 10;
        b[12] = self.asc;
        b[13] = self.ascq;
        if let Some((cdb, byte, bit)) = self.field {
            b[15] = 0x80 | if cdb { 0x40 } else { 0 };
            if let Some(bit) = bit {
                b[15] |= 0x08 | (bit & 7);
            }
            b[16..18].copy_from_slice(&byte.to_be_bytes());
        }
        b
    }

    /// Fixed-format sense data as bytes.
    pub fn to_bytes(&self) -> Bytes {
        Bytes::copy_from_slice(&self.to_fixed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_layout() {
        let s = Sense::MISCOMPARE.with_info(0x1234);
        let b = s.to_fixed();
        assert_eq!(b[0], 0xf0);
        assert_eq!(b[2], 0xe);
        assert_eq!(&b[3..7], &[0, 0, 0x12, 0x34]);
        assert_eq!((b[12], b[13]), (0x1d, 0));
        let s = Sense::INVALID_FIELD_IN_CDB
            .with_field(true, 1, Some(4))
            .to_fixed();
        assert_eq!(s[15], 0x80 | 0x40 | 0x08 | 4);
        assert_eq!(&s[16..18], &[0, 1]);
    }
}
