//! The on-disk cluster lock manager.
//!
//! This crate will own the heartbeat region and lock records that several hosts sharing
//! one LUN update with COMPARE AND WRITE, as VMFS does: host slots with generations,
//! leases, self-fencing when renewal fails, and takeover of a dead host's slot and locks.
//! Nothing is implemented yet.
