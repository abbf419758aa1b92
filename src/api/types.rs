//! Request and response bodies of the REST API, shared by the server and the CLI so
//! that both sides agree on the wire format by construction.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `GET /api/v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Status {
    /// Appliance name.
    pub name: String,
    /// Appliance identity (UUID), made when the store was created.
    pub appliance_id: String,
    /// Basalt version.
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_seconds: u64,
    /// The data directory.
    pub data_dir: String,
    /// Schema version of the appliance store.
    pub store_schema_version: u32,
    /// Number of configuration changes committed so far.
    pub config_generation: u64,
    /// HTTPS listener addresses.
    pub listen: Vec<String>,
    /// Path of the unix socket.
    pub socket: String,
    /// Disk counts by state.
    pub disks: DiskCounts,
}

/// Disk counts by state.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct DiskCounts {
    /// All declared disks.
    pub total: usize,
    /// Disks open and serving I/O.
    pub online: usize,
    /// Disks that are missing or failed.
    pub unavailable: usize,
}

/// The state of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskState {
    /// Open and serving I/O.
    Online,
    /// Its path does not exist.
    Missing,
    /// It exists but could not be opened, or failed I/O.
    Failed,
}

impl std::fmt::Display for DiskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskState::Online => "online",
            DiskState::Missing => "missing",
            DiskState::Failed => "failed",
        })
    }
}

/// A disk as listed by `GET /api/v1/disks`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DiskInfo {
    /// Name.
    pub name: String,
    /// Path of the file or device.
    pub path: String,
    /// `file` or `block`.
    pub kind: String,
    /// Size in bytes (of the open device, else as declared; 0 when unknown).
    pub size_bytes: u64,
    /// Logical block size in bytes (0 when unknown).
    pub block_size: u32,
    /// Device serial number, when the device has one.
    pub serial: Option<String>,
    /// Whether I/O bypasses the page cache (O_DIRECT).
    pub direct_io: bool,
    /// State.
    pub state: DiskState,
    /// Why the disk is not online.
    pub error: Option<String>,
}

/// `POST /api/v1/disks`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddDisk {
    /// Name of the new disk.
    pub name: String,
    /// Absolute path of a file or block device. Default for a file disk:
    /// `<data dir>/disks/<name>.img`.
    #[serde(default)]
    pub path: Option<String>,
    /// Size of a file disk, such as `10G`; the file is created sparse if missing.
    #[serde(default)]
    pub size: Option<String>,
    /// Logical block size of a file disk: 512 (default) or 4096.
    #[serde(default)]
    pub block_size: Option<u32>,
}

/// `PUT /api/v1/config` answer: what changed (or would change, for a dry run).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ApplyResult {
    /// True when nothing was changed because `dry_run` was set.
    pub dry_run: bool,
    /// Human-readable list of changes; empty when the state already matched.
    pub changes: Vec<String>,
    /// The configuration generation after the apply.
    pub generation: u64,
    /// What was committed but could not be carried out yet (a pool whose disk failed in
    /// the meantime, ...); the next start or apply tries again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Error body of every failed API call.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable error class (`unauthorized`, `not_found`, `invalid_config`, ...).
    pub error: String,
    /// What went wrong, for people.
    pub message: String,
    /// Problems found in a configuration document, each with its line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<ErrorDetail>,
}

/// One located problem in a submitted document.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What is wrong.
    pub message: String,
}
