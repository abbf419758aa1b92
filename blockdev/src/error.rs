use std::io;

/// Result of a block device operation.
pub type Result<T, E = BlockError> = std::result::Result<T, E>;

/// Why a block device operation failed.
///
/// Layers above map these to wire errors: SCSI sense data, NBD errno values.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlockError {
    /// The range is not a whole number of logical blocks.
    #[error("offset {offset} length {len} is not aligned to the {block_size}-byte block size")]
    Misaligned {
        /// Requested byte offset.
        offset: u64,
        /// Requested length in bytes.
        len: u64,
        /// The device's logical block size.
        block_size: u32,
    },
    /// The range ends past the end of the device.
    #[error("offset {offset} length {len} is beyond the device's {capacity} bytes")]
    OutOfRange {
        /// Requested byte offset.
        offset: u64,
        /// Requested length in bytes.
        len: u64,
        /// The device's capacity in bytes.
        capacity: u64,
    },
    /// Compare-and-write buffers of different lengths, or similar misuse.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The device is read-only.
    #[error("device is read-only")]
    ReadOnly,
    /// The device cannot do this operation (or cannot do it fast, for
    /// [`ZeroFlags::fast_only`](crate::ZeroFlags::fast_only)).
    #[error("operation not supported: {0}")]
    Unsupported(&'static str),
    /// A thin pool has no free space for a write that needs new blocks.
    #[error("no space left for the write")]
    NoSpace,
    /// The device is gone (removed, crashed, or failed beyond recovery) and fails every
    /// request until it is reopened.
    #[error("device offline: {0}")]
    Offline(String),
    /// The operating system failed the request.
    #[error("{op} at offset {offset} length {len}: {source}")]
    Io {
        /// The operation that failed ("read", "write", "flush", ...).
        op: &'static str,
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl BlockError {
    /// An [`BlockError::Io`] with the given operation, range and OS error.
    pub fn io(op: &'static str, offset: u64, len: u64, source: io::Error) -> Self {
        BlockError::Io {
            op,
            offset,
            len,
            source,
        }
    }

    /// True when the error says the medium or the device failed (as opposed to a bad
    /// request): the errors after which RAID marks a member faulty.
    pub fn is_device_failure(&self) -> bool {
        matches!(self, BlockError::Io { .. } | BlockError::Offline(_))
    }
}
