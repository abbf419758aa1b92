//! Targets: how LUNs and datastores leave the appliance.
//!
//! One transport-free SCSI core ([`scsi`]) under every SCSI transport (iSCSI, later
//! FCoE), and an NBD server ([`nbd`]) directly on block devices; NFS for datastores comes
//! later. Each protocol lives in its own crate under `targets/` so that its sans-IO core
//! can be fuzzed and tested alone and so that protocols evolve without rebuilding each
//! other; this crate gathers them for the daemon.

pub use basalt_iscsi as iscsi;
pub use basalt_nbd as nbd;
pub use basalt_scsi as scsi;
