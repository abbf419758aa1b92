//! The iSCSI target (RFC 7143) on the Basalt SCSI core.
//!
//! - [`pdu`]: framing, `check` then `parse`, bounded lengths, CRC32C digests.
//! - [`text`]: key=value lists.
//! - [`txq`]: the outgoing queue (headers copied, data segments queued by reference).
//! - [`conn`]: the sans-IO connection: login (CHAP, mutual CHAP, negotiation),
//!   discovery, the SCSI command flow (immediate and unsolicited data, R2T, Data-In
//!   with status piggy-backing, residuals), task management, NOP, logout. ERL 0, one
//!   connection per session.
//! - [`catalog`]: what a connection asks of the configuration (ACLs, CHAP, LUN maps).
//! - [`config`]: the typed, serde configuration the daemon persists.
//! - [`server`]: the thin tokio driver ([`IscsiServer`]): portals, connections,
//!   run-time reconfiguration, stop.
//! - [`metrics`]: per target and LUN counters as plain data.
//! - `test_utils` (feature `test-utils`): a simulated initiator over the sans-IO
//!   connection, for unit tests without sockets.
//!
//! The design notes are in `DESIGN.md` beside this crate; conformance results in
//! `CONFORMANCE.md`.

#![deny(missing_docs)]

pub mod catalog;
pub mod config;
pub mod conn;
pub mod metrics;
pub mod pdu;
pub mod server;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod text;
pub mod txq;

pub use config::{Acl, Chap, IscsiConfig, LunMapping, TargetConfig};
pub use conn::{ConnConfig, Connection, Event};
pub use metrics::MetricsSnapshot;
pub use server::{IscsiServer, LunHandle, ServerError};
