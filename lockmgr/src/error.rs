use crate::format::{FormatError, Holder};
use basalt_blockdev::BlockError;
use serde::Serialize;

/// Why this host lost its lease (and fenced itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LostReason {
    /// No renewal succeeded within the lease: storage unreachable or too slow.
    LeaseExpired,
    /// Another host took the slot over (it saw this host dead: paused, partitioned).
    TakenOver,
}

/// Why a protected operation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FenceReason {
    /// The host's lease is expired or too short for the write's I/O timeout.
    LeaseExpired,
    /// The host lost its slot ([`LostReason`]).
    Lost,
    /// The lock was released by this host.
    Released,
    /// The lock entry is no longer on disk under this host's generation: it was
    /// transferred to a recovery or broken.
    Broken,
}

/// Errors of the lock manager.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// The device failed a request.
    #[error("device: {0}")]
    Io(#[from] BlockError),
    /// A request did not complete within the I/O timeout.
    #[error("{0} timed out")]
    IoTimeout(&'static str),
    /// The device has no lockspace (no valid header at the given offset).
    #[error("no lockspace here: {0}")]
    NotFormatted(FormatError),
    /// The lockspace was formatted for another sector size than the device's.
    #[error("lockspace sector size {lockspace} differs from the device block size {device}")]
    SectorMismatch {
        /// Sector size in the header.
        lockspace: u32,
        /// The device's logical block size.
        device: u32,
    },
    /// The device is too small for the requested lockspace.
    #[error("lockspace needs {needed} bytes at offset {offset}, device has {capacity}")]
    TooSmall {
        /// Bytes needed.
        needed: u64,
        /// Offset of the lockspace.
        offset: u64,
        /// Device capacity.
        capacity: u64,
    },
    /// Invalid format parameters.
    #[error("invalid lockspace parameters: {0}")]
    InvalidFormat(FormatError),
    /// A lockspace exists already and `force` was not given.
    #[error("a lockspace already exists here")]
    AlreadyFormatted,
    /// Another host is formatting this range (its claim is on the header sector), or
    /// took the range over while this host was formatting it. A claim left by a host
    /// that died mid-format is cleared with `force`.
    #[error(
        "another host is formatting this lockspace (use force to take over a format that died)"
    )]
    FormatInProgress,
    /// `format_if_blank` over a range that does not read zero.
    #[error("the range is not blank (non-zero data at byte {offset})")]
    NotBlank {
        /// First non-zero byte found.
        offset: u64,
    },
    /// A live host already uses this host id.
    #[error("host id already in use by slot {slot}")]
    DuplicateHost {
        /// The slot that holds it.
        slot: u16,
    },
    /// This host id's previous incarnation is still being recovered by another host.
    #[error("previous incarnation of this host (slot {slot}) is being recovered")]
    RecoveryPending {
        /// Its slot.
        slot: u16,
    },
    /// Every heartbeat slot is in use.
    #[error("no free heartbeat slot")]
    NoFreeSlot,
    /// This host lost its lease and fenced itself; rejoin to continue.
    #[error("host fenced: {0:?}")]
    Lost(LostReason),
    /// A protected operation was refused.
    #[error("fenced: {0:?}")]
    Fenced(FenceReason),
    /// `try_lock`: conflicting holders.
    #[error("held by {holders:?}")]
    WouldBlock {
        /// The conflicting holders.
        holders: Vec<Holder>,
    },
    /// `lock_timeout` ran out.
    #[error("timed out waiting for the lock")]
    Timeout,
    /// This host already holds the resource.
    #[error("already held by this host")]
    AlreadyHeld,
    /// Every lock record is bound to another resource.
    #[error("lock table full")]
    TableFull,
    /// A record failed to decode (torn or corrupted); it is never granted.
    #[error("lock-manager record at index {index} is corrupt: {source}")]
    Corrupt {
        /// Record (or slot) index.
        index: u32,
        /// What was wrong.
        source: FormatError,
    },
    /// The all-zero resource id, or a payload too long.
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// A slot generation would overflow (after 4 billion takeovers of one slot).
    #[error("generation overflow in slot {0}")]
    GenerationOverflow(u16),
}
