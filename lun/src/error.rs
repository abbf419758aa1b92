//! Errors of pool operations.

use basalt_blockdev::BlockError;

/// Why a pool operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The device failed (the message names the request).
    #[error("device: {0}")]
    Device(#[from] BlockError),
    /// The device holds no pool.
    #[error("the device holds no pool")]
    NotAPool,
    /// The device already holds a pool; format refuses it without `force`.
    #[error("the device already holds pool {name:?} ({uuid}); format with force to overwrite it")]
    AlreadyFormatted {
        /// The existing pool's name.
        name: String,
        /// The existing pool's id.
        uuid: String,
    },
    /// The pool's metadata cannot be read back; `check` says more.
    #[error("pool metadata is corrupt: {0}")]
    Corrupt(String),
    /// Not enough free space (or metadata space) for the operation.
    #[error("not enough space: {0}")]
    NoSpace(String),
    /// No volume of that name.
    #[error("no volume named {0:?}")]
    NotFound(String),
    /// The name is taken.
    #[error("a volume named {0:?} exists")]
    Exists(String),
    /// A bad argument (name, size, block size, thresholds, layout).
    #[error("{0}")]
    Invalid(String),
    /// Shrinking would drop mapped data; pass `force` to shrink anyway.
    #[error("shrinking {name:?} to {size} bytes would drop {mapped_bytes} bytes of mapped data; use force")]
    WouldLoseData {
        /// The volume.
        name: String,
        /// The size asked for.
        size: u64,
        /// Mapped bytes beyond it.
        mapped_bytes: u64,
    },
    /// Snapshots are read-only.
    #[error("volume {0:?} is a read-only snapshot")]
    ReadOnly(String),
    /// The pool has the maximum number of volumes.
    #[error("the pool holds its maximum of {0} volumes")]
    TooManyVolumes(u32),
    /// An earlier metadata write failed or the pool was exported; re-import it.
    #[error("pool is offline: {0}")]
    Offline(String),
}

impl From<PoolError> for BlockError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Device(e) => e,
            PoolError::NoSpace(_) => BlockError::NoSpace,
            PoolError::ReadOnly(_) => BlockError::ReadOnly,
            other => BlockError::Offline(other.to_string()),
        }
    }
}
