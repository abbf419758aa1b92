//! The datastore: a cluster file system on a LUN holding VM folders and VMDK disks.
//!
//! This crate will own the on-disk format, per-host journals replayed by survivors, file
//! locks through `lockmgr`, VMDK files that qemu-img reads, and a FUSE view. Nothing is
//! implemented yet.
