//! The iSCSI target (RFC 7143): PDU framing, login and negotiation, sessions and
//! connections, on the SCSI core; a sans-IO protocol core and a thin tokio driver.
//! Nothing is implemented yet.
