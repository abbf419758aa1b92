//! The on-disk cluster lock manager.
//!
//! Several hosts that see the same block device (a LUN shared over iSCSI) coordinate
//! through that device alone, as VMFS hosts do: no lock server in the data path. Every
//! host owns a heartbeat slot that it renews with COMPARE AND WRITE every period; locks
//! are records on the device that name their holders by slot and slot generation. A
//! host whose slot stops changing for the dead-host timeout is taken over by another
//! host (generation + 1), which recovers it and breaks its locks; a host that cannot
//! renew in time fences itself before anyone may take over. The format, the protocol
//! and the timing argument are in `lockmgr/DESIGN.md`.
//!
//! # Use
//!
//! ```no_run
//! # async fn demo(dev: basalt_blockdev::SharedBlockDev) -> Result<(), basalt_lockmgr::LockError> {
//! use basalt_lockmgr::{FormatOptions, JoinOptions, LockMode, Lockspace, ResourceId};
//! // Once, when the datastore is created:
//! Lockspace::format(&dev, 0, &FormatOptions::default()).await?;
//! // On every host:
//! let ls = Lockspace::join(dev.clone(), 0, JoinOptions::new([1; 16], "host-a")).await?;
//! let res = ResourceId::from_name("vm1/disk0.vmdk").unwrap();
//! let guard = ls.lock(res, LockMode::Exclusive).await?;
//! // Before each protected write: is the lease still good for one more I/O?
//! guard.fence().check_for(std::time::Duration::from_secs(1))?;
//! // Metadata that must never be written by a stale holder goes through the CAW path:
//! guard.write_payload(b"journal head 42").await?;
//! guard.unlock().await?;
//! # Ok(()) }
//! ```
//!
//! # Modules
//! - [`format`]: byte layouts, checksums, decoders (fuzzed).
//! - [`clock`]: the monotonic clock trait (`CLOCK_BOOTTIME` in production).
//! - [`fence`]: fencing tokens and a device wrapper that refuses writes without one.
//! - [`metrics`]: counters and histograms as plain data.
//! - `testing` (feature `test-utils`): a per-host fault link for multi-host tests.

#![deny(missing_docs)]

mod cas;
pub mod clock;
mod error;
pub mod fence;
pub mod format;
mod lockspace;
pub mod metrics;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;

pub use clock::{BootClock, Clock, SystemWallClock, TokioClock, WallClock};
pub use error::{FenceReason, LockError, LostReason};
pub use fence::{Fence, FencedDev};
pub use format::{Header, Holder, LockMode, ResourceId, SlotState, PAYLOAD_LEN};
pub use lockspace::{
    FormatOptions, HeldStatus, HolderInfo, HostState, JoinOptions, LockGuard, LockInfo, Lockspace,
    LockspaceStatus, Presumed, Recovery, RecoveryInfo, SlotStatus, TakeoverStatus, Timing, Tuning,
};
pub use metrics::{HistogramSnapshot, MetricsSnapshot};
