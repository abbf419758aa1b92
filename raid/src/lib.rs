//! RAID arrays: RAID 0, 1, 10, 5 and 6 over member block devices, presented as one
//! block device.
//!
//! This crate will own the stripe map, P/Q parity (GF(2^8), polynomial 0x11d, the
//! syndrome Linux md computes), the per-member superblock from which an array
//! assembles on its own, degraded operation, hot spares, rebuild, resync, scrub with
//! repair, and the write-hole protection. Nothing is implemented yet.
