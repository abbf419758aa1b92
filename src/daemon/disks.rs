//! The appliance's disks at run time: each declared disk opened through io_uring and
//! wrapped in a metered device whose counters feed `/metrics`.
//!
//! A disk whose path is missing or fails to open stays declared, in state `missing` or
//! `failed`, and is retried at the next start or apply: a disk that vanished is never
//! replaced by a fresh empty file behind the administrator's back.

use crate::api::types::{DiskInfo, DiskState};
use basalt_blockdev::{
    BlockDev, IoStats, IoStatsSnapshot, MeteredDev, SharedBlockDev, UringFile, UringOptions,
};
use basalt_config::{DiskKind, DiskSpec};
use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;

/// An open disk.
pub struct OpenDisk {
    /// The device with metering, for every user of the disk.
    pub dev: SharedBlockDev,
    /// Serial number, for block devices that have one.
    pub serial: Option<String>,
    /// Whether O_DIRECT is in use.
    pub direct: bool,
}

/// One declared disk and what became of it.
pub struct DiskRuntime {
    /// The declaration.
    pub spec: DiskSpec,
    /// The open device, when online.
    pub open: Option<OpenDisk>,
    /// State.
    pub state: DiskState,
    /// Why it is not online.
    pub error: Option<String>,
    /// I/O counters; they outlive reopenings so that metrics stay monotonic.
    pub stats: Arc<IoStats>,
}

impl DiskRuntime {
    /// The listing row.
    pub fn info(&self) -> DiskInfo {
        let geometry = self.open.as_ref().map(|o| o.dev.geometry());
        DiskInfo {
            name: self.spec.name.clone(),
            path: self.spec.path.display().to_string(),
            kind: self.spec.kind.to_string(),
            size_bytes: geometry
                .map(|g| g.capacity_bytes())
                .or(self.spec.size.map(|s| s.0))
                .unwrap_or(0),
            block_size: geometry
                .map(|g| g.block_size)
                .or(self.spec.block_size)
                .unwrap_or(0),
            serial: self.open.as_ref().and_then(|o| o.serial.clone()),
            direct_io: self.open.as_ref().is_some_and(|o| o.direct),
            state: self.state,
            error: self.error.clone(),
        }
    }

    /// The counters now.
    pub fn snapshot(&self) -> IoStatsSnapshot {
        self.stats.snapshot()
    }
}

/// Opens a declared disk; never fails, the outcome is in the state.
pub fn open_disk(spec: &DiskSpec, stats: Arc<IoStats>, queue_depth: u32) -> DiskRuntime {
    let mut rt = DiskRuntime {
        spec: spec.clone(),
        open: None,
        state: DiskState::Failed,
        error: None,
        stats,
    };
    if !spec.path.exists() {
        rt.state = DiskState::Missing;
        rt.error = Some(format!("{} does not exist", spec.path.display()));
        return rt;
    }
    if let Err(e) = check_kind(&spec.path, spec.kind) {
        rt.error = Some(e);
        return rt;
    }
    let options = UringOptions {
        queue_depth,
        block_size: spec.block_size,
        ..UringOptions::default()
    };
    match UringFile::open(&spec.path, &options) {
        Ok(file) => {
            if let (DiskKind::File, Some(size)) = (spec.kind, spec.size) {
                let actual = file.geometry().capacity_bytes();
                if actual != size.0 {
                    rt.error = Some(format!(
                        "{} is {actual} bytes, but the disk is declared as {} bytes",
                        spec.path.display(),
                        size.0
                    ));
                    return rt;
                }
            }
            let serial = file.serial();
            let direct = file.is_direct();
            let file: SharedBlockDev = Arc::new(file);
            let dev: SharedBlockDev = Arc::new(MeteredDev::with_stats(file, rt.stats.clone()));
            rt.open = Some(OpenDisk {
                dev,
                serial,
                direct,
            });
            rt.state = DiskState::Online;
        }
        Err(e) => rt.error = Some(e.to_string()),
    }
    rt
}

/// Opens a declared disk off the async runtime, then reads its first block: a disk that
/// opens but cannot be read is failed now rather than at its first real use.
pub async fn open_and_probe(spec: DiskSpec, stats: Arc<IoStats>) -> DiskRuntime {
    let fallback = (spec.clone(), stats.clone());
    let mut rt = match tokio::task::spawn_blocking(move || {
        open_disk(&spec, stats, DISK_QUEUE_DEPTH)
    })
    .await
    {
        Ok(rt) => rt,
        Err(e) => DiskRuntime {
            spec: fallback.0,
            open: None,
            state: DiskState::Failed,
            error: Some(format!("open failed: {e}")),
            stats: fallback.1,
        },
    };
    if let Some(open) = &rt.open {
        let block = open.dev.geometry().block_size as usize;
        if let Err(e) = open.dev.read(0, block).await {
            rt.open = None;
            rt.state = DiskState::Failed;
            rt.error = Some(format!("cannot read the first block: {e}"));
        }
    }
    rt
}

/// Default io_uring queue depth per disk.
pub const DISK_QUEUE_DEPTH: u32 = 128;

/// Checks that `path` is what `kind` says it is.
pub fn check_kind(path: &Path, kind: DiskKind) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let ft = meta.file_type();
    match kind {
        DiskKind::File if ft.is_file() => Ok(()),
        DiskKind::Block if ft.is_block_device() => Ok(()),
        DiskKind::File => Err(format!("{} is not a regular file", path.display())),
        DiskKind::Block => Err(format!("{} is not a block device", path.display())),
    }
}

/// Every disk of the appliance, by name.
#[derive(Default)]
pub struct DiskSet {
    /// The disks.
    pub disks: BTreeMap<String, DiskRuntime>,
}
