//! RAID arrays: RAID 0, 1, 10, 5 and 6 over member block devices, presented as one
//! [`BlockDev`](basalt_blockdev::BlockDev).
//!
//! An [`Array`] stripes, mirrors or adds parity over any members (disks, files, remote
//! LUNs, fault injectors), keeps a superblock on every member so that it assembles from
//! its disks alone ([`assemble`]), goes on serving from redundancy when members fail,
//! takes hot spares, rebuilds, resyncs and scrubs as background jobs with progress and
//! checkpoints, and closes the RAID 5/6 write hole with a journal kept on the members.
//! See `DESIGN.md` in the crate for the on-disk formats and the reasons.
//!
//! ```no_run
//! # async fn demo(disks: Vec<basalt_blockdev::SharedBlockDev>) -> Result<(), basalt_raid::RaidError> {
//! use basalt_raid::{Array, ArrayConfig, Device, Level};
//! use basalt_blockdev::BlockDev;
//! let devices = disks
//!     .into_iter()
//!     .enumerate()
//!     .map(|(i, dev)| Device::new(format!("disk{i}"), dev))
//!     .collect();
//! let array = Array::create(ArrayConfig::new("pool0", Level::Raid6), devices, vec![]).await?;
//! let status = array.status();
//! println!("{} {} {:?}", status.name, status.level, status.state);
//! array.write(0, bytes::Bytes::from(vec![7u8; 4096]), Default::default()).await?;
//! array.stop().await?;
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

mod array;
mod assemble;
mod csum;
pub mod gf;
mod jobs;
pub mod journal;
pub mod layout;
pub mod parity;
mod repair;
mod status;
pub mod superblock;

pub use array::{Array, ArrayConfig, Device};
pub use assemble::{
    assemble, examine, AssembleOptions, Assembly, Examined, RejectReason, Rejected,
};
pub use jobs::{JobKind, JobSnapshot, JobState, ScrubReport};
pub use layout::{Layout, Level};
pub use status::{ArrayMetrics, ArrayState, ArrayStatus, MemberStatus, MetricsSnapshot};
pub use superblock::{RoleState, Uuid};

use basalt_blockdev::BlockError;

/// Why an array operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RaidError {
    /// The request or configuration is not valid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A member device failed during an administrative operation.
    #[error("device {device}: {source}")]
    Device {
        /// The device's label.
        device: String,
        /// What failed.
        #[source]
        source: BlockError,
    },
    /// The device already carries an array superblock.
    #[error("device {device} already belongs to array {array}; pass force to overwrite it")]
    InUse {
        /// The device's label.
        device: String,
        /// The array it belongs to.
        array: Uuid,
    },
    /// The array cannot run (too many members missing or faulty).
    #[error("array {array} cannot start: {reason}")]
    CannotStart {
        /// The array's name.
        array: String,
        /// Why.
        reason: String,
    },
    /// The array has failed or was stopped.
    #[error("array unavailable: {0}")]
    Unavailable(String),
    /// No such member role.
    #[error("no member role {0}")]
    NoSuchRole(usize),
    /// The operation conflicts with the array's state.
    #[error("{0}")]
    Busy(String),
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] BlockError),
}
