//! The SCSI target core: SBC-3/SPC-4 command emulation over a block device, shared by
//! every SCSI transport (iSCSI now, FCoE later).
//!
//! Transport-free: a transport hands a [`LogicalUnit`] a CDB, the I_T nexus it came on
//! ([`NexusId`]) and the complete Data-Out buffer, and gets back a [`Response`]:
//! status, sense data and the Data-In bytes. The only awaits are on the
//! [`BlockDev`](basalt_blockdev::BlockDev) under the unit; there are no sockets, clocks
//! or runtimes here, so tests drive it directly with a `MemDev`.
//!
//! What the transport supplies and the core cannot know:
//! - which logical units an I_T nexus may see ([`LunResolver`]), so that EXTENDED COPY
//!   only resolves copy targets among them (LIO's CVE-2020-28374 was a copy that
//!   reached any LUN on the host);
//! - the LUN inventory for REPORT LUNS ([`report_luns`]) and the answer for a LUN that
//!   does not exist ([`no_such_lun`]);
//! - I_T nexus loss and resets ([`LogicalUnit::nexus_lost`], [`LogicalUnit::reset`]).
//!
//! Persistent reservations with APTPL are saved through a [`PrStore`] the daemon
//! implements (one opaque blob per unit).
//!
//! Module map: [`sense`] (status and sense data), [`cdb`] (classification of raw
//! CDBs), `lu` (dispatch and block commands), `spc` (INQUIRY, VPD, mode pages, REPORT
//! SUPPORTED OPERATION CODES), `pr` (reservations), `xcopy` (EXTENDED COPY).

#![deny(missing_docs)]

pub mod cdb;
mod lu;
mod pr;
pub mod sense;
mod spc;
mod xcopy;

pub use lu::{
    no_such_lun, report_luns, LogicalUnit, LunIdentity, LunResolver, NexusId, ResetKind, Response,
    MAX_TRANSFER_BYTES,
};
pub use pr::{FilePrStore, MemPrStore, PrStore};
pub use sense::{Sense, Status};
