//! Pools and LUNs: a thin allocator on a RAID array, and thin or thick LUNs carved from it,
//! with snapshots, clones, resize, UNMAP and block status.
//!
//! This crate will own the pool metadata (LUN table, block maps, reference counts, free
//! space), kept on the pool itself, journaled and crash-consistent, so that a pool
//! imports from its disks alone. Nothing is implemented yet.
