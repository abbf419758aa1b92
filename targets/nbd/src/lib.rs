//! The NBD server: fixed-newstyle handshake, structured replies, block status,
//! multi-conn and TLS, on any block device; a sans-IO protocol core and a thin tokio
//! driver. Nothing is implemented yet.
