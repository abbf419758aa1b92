//! Configuration: the typed desired state of an appliance, its validation, and the
//! embedded RocksDB store that keeps it.
//!
//! - [`desired`]: the document administrators write (`basalt config apply FILE`) and
//!   the model it parses into, with line-accurate errors.
//! - [`store`]: the appliance store under the data directory, with a versioned schema
//!   and migrations.
//! - [`size`]: human byte sizes (`10G`).
//!
//! Pool and LUN metadata do not live here: they live on the pool's own disks, so that a
//! pool imports from its disks alone. This crate holds what belongs to the appliance.

#![deny(missing_docs)]

pub mod desired;
pub mod size;
#[cfg(feature = "store")]
pub mod store;

pub use desired::{
    check_name, ApiSettings, ApplianceSettings, ConfigError, ConfigErrors, DesiredState, DiskKind,
    DiskSpec, Section, Sections,
};
pub use size::ByteSize;
#[cfg(feature = "store")]
pub use store::{Plan, Store, StoreError};
