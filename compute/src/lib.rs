//! Compute: the KVM runner.
//!
//! This crate will own VM definitions, the per-VM `basalt vmm` process built on the
//! rust-vmm crates (direct kernel boot, serial console, virtio-blk on a BlockDev,
//! virtio-net on the vSwitch, virtio-balloon), and ESXi-style memory reclamation.
//! Nothing is implemented yet.
