//! Targets: how LUNs and datastores leave the appliance.
//!
//! This crate will own one transport-free SCSI core (SBC-3/SPC-4 emulation, sense data,
//! persistent reservations, COMPARE AND WRITE, UNMAP, EXTENDED COPY) and the transports
//! on it: iSCSI (RFC 7143) and FCoE, plus an NBD server and an NFS server. Each protocol
//! core is sans-IO; thin tokio drivers move the bytes. Nothing is implemented yet.
