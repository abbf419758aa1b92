//! Pools and LUNs at run time: each `[[pool]]` is a RAID array over the appliance's
//! disks with a thin pool on it, and each `[[lun]]` a LUN in one of them.
//!
//! A pool comes up by assembling its array from its disks (superblocks say which disk
//! plays which role) and importing the pool's metadata from the array; a pool declared
//! for the first time on blank disks is created (array, then pool format). Nothing here
//! ever overwrites a disk that carries an array or a pool it was not asked to create:
//! those are refused while the configuration is checked, before anything changes.

use super::sections::{LunSpec, PoolSpec, ProvisioningSpec};
use crate::api::error::ApiError;
use basalt_blockdev::{IoStatsSnapshot, SharedBlockDev};
use basalt_lun::{
    FormatOptions, ImportOptions, LunOptions, Pool, Thresholds, VolumeInfo, VolumeKind,
};
use basalt_raid::{assemble, examine, Array, ArrayConfig, AssembleOptions, Device};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// A declared pool and what became of it.
pub struct PoolRuntime {
    /// The declaration in force.
    pub spec: PoolSpec,
    /// The array, when assembled.
    pub array: Option<Arc<Array>>,
    /// The pool, when imported or formatted.
    pub pool: Option<Arc<Pool>>,
    /// Why it is not up, or what went wrong last.
    pub error: Option<String>,
    /// What bringing it up found (import report, rejected disks).
    pub notes: Vec<String>,
}

/// A pool as the API lists it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolInfo {
    /// Name.
    pub name: String,
    /// `online`, `degraded`, `failed`, `offline` (not up).
    pub state: String,
    /// RAID level.
    pub raid: String,
    /// Member disks and spares as declared.
    pub disks: Vec<String>,
    /// Hot spares as declared.
    pub spares: Vec<String>,
    /// Why it is not up, or what failed last.
    pub error: Option<String>,
    /// Findings when it came up (journal replay, rejected disks).
    pub notes: Vec<String>,
    /// The array's status (members, job, last scrub), when assembled.
    #[schema(value_type = Object)]
    pub array: Option<serde_json::Value>,
    /// md-style text with a progress bar, for the CLI.
    pub md_text: Option<String>,
    /// Space and alerts, when the pool is up.
    #[schema(value_type = Object)]
    pub usage: Option<serde_json::Value>,
    /// Background jobs (rebuild, resync, scrub).
    #[schema(value_type = Object)]
    pub jobs: serde_json::Value,
}

/// A LUN or snapshot as the API lists it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LunInfo {
    /// Name.
    pub name: String,
    /// Pool.
    pub pool: String,
    /// `lun`, `snapshot` or `clone`.
    pub kind: String,
    /// `thin`, `thick` or `thick-eager`.
    pub provisioning: String,
    /// Virtual size in bytes.
    pub size_bytes: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Bytes allocated to it (own or shared).
    pub allocated_bytes: u64,
    /// Bytes only it holds.
    pub exclusive_bytes: u64,
    /// Bytes held only by its snapshots.
    pub snapshot_bytes: u64,
    /// Read-only (snapshots).
    pub read_only: bool,
    /// What it was taken or cloned from.
    pub origin: Option<String>,
    /// Stable identity (NAA identifiers derive from it).
    pub id: String,
    /// Declared in the desired state (snapshots are not).
    pub declared: bool,
}

/// Every pool, by name.
#[derive(Default)]
pub struct Storage {
    pools: RwLock<BTreeMap<String, PoolRuntime>>,
    /// One handle per volume, so that the targets see the same device object across
    /// reconfigurations (the NBD server drains an export whose device object changes).
    handles: std::sync::Mutex<BTreeMap<String, (basalt_lun::VolumeId, Arc<basalt_lun::Lun>)>>,
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

/// What the disks of a new pool hold.
pub enum DiskContents {
    /// No array superblock on any of them: the pool will be created.
    Blank,
    /// They hold this pool's array: it will be assembled and imported.
    ThisPool,
}

/// Finds what `devices` (name, device) hold, for a pool named `pool`.
pub async fn inspect_disks(
    pool: &str,
    devices: &[(String, SharedBlockDev)],
) -> Result<DiskContents, String> {
    let mut blank = 0;
    let mut ours = 0;
    let mut problems = Vec::new();
    for (name, dev) in devices {
        match examine(dev).await {
            Ok(sb) if sb.name == pool => ours += 1,
            Ok(sb) => problems.push(format!(
                "disk {name:?} belongs to array {:?} ({}); import that pool, or wipe the disk",
                sb.name, sb.array_uuid
            )),
            Err(basalt_raid::RejectReason::NoSuperblock) => blank += 1,
            Err(reason) => problems.push(format!("disk {name:?}: {reason}")),
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    match (blank, ours) {
        (_, 0) => Ok(DiskContents::Blank),
        (0, _) => Ok(DiskContents::ThisPool),
        _ => Ok(DiskContents::ThisPool),
    }
}

impl Storage {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, PoolRuntime>> {
        self.pools.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, PoolRuntime>> {
        self.pools.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The running pool called `name`.
    pub fn pool(&self, name: &str) -> Option<Arc<Pool>> {
        self.read().get(name).and_then(|p| p.pool.clone())
    }

    /// The running array of pool `name`.
    pub fn array(&self, name: &str) -> Option<Arc<Array>> {
        self.read().get(name).and_then(|p| p.array.clone())
    }

    /// The declaration of every pool that is known (up or not).
    pub fn specs(&self) -> Vec<PoolSpec> {
        self.read().values().map(|p| p.spec.clone()).collect()
    }

    /// Brings the pools in line with `wanted`: new ones come up (created on blank disks
    /// only when `create` allows it), changed ones get their new spares or replacement
    /// disks, and removed ones are exported (stopped cleanly, disks left intact).
    pub async fn reconcile_pools(
        &self,
        wanted: &[PoolSpec],
        disks: &OnlineDisks,
        create: &[String],
    ) {
        let stale: Vec<String> = self
            .read()
            .keys()
            .filter(|n| !wanted.iter().any(|p| &p.name == *n))
            .cloned()
            .collect();
        for name in stale {
            let removed = self.write().remove(&name);
            if let Some(rt) = removed {
                export(&name, rt).await;
            }
        }
        for spec in wanted {
            let current = self
                .read()
                .get(&spec.name)
                .map(|rt| (rt.spec.clone(), rt.array.clone(), rt.pool.is_some()));
            match current {
                Some((old, Some(array), true)) => {
                    if &old != spec {
                        let error = change_members(&array, &old, spec, disks).await.err();
                        if let Some(limit) = spec.rate_limit {
                            array.set_rate_limit(Some(limit.0));
                        }
                        let mut pools = self.write();
                        if let Some(rt) = pools.get_mut(&spec.name) {
                            rt.spec = spec.clone();
                            rt.error = error;
                        }
                    }
                }
                _ => {
                    let rt = bring_up(spec, disks, create.contains(&spec.name)).await;
                    self.write().insert(spec.name.clone(), rt);
                }
            }
        }
    }

    /// Brings the LUNs in line with `wanted`: creates missing ones, grows grown ones,
    /// and deletes the ones in `delete` that are no longer declared. Returns errors by
    /// LUN name.
    pub async fn reconcile_luns(
        &self,
        wanted: &[LunSpec],
        delete: &[String],
    ) -> Vec<(String, String)> {
        let mut errors = Vec::new();
        for name in delete {
            if wanted.iter().any(|l| &l.name == name) {
                continue;
            }
            if let Some((_, pool)) = self.find_lun(name) {
                if let Err(e) = pool.delete(name).await {
                    errors.push((name.clone(), e.to_string()));
                } else {
                    tracing::info!(lun = %name, "LUN deleted");
                }
            }
        }
        for spec in wanted {
            let Some(pool) = self.pool(&spec.pool) else {
                errors.push((spec.name.clone(), format!("pool {:?} is not up", spec.pool)));
                continue;
            };
            match pool.info(&spec.name) {
                Ok(info) if info.size_bytes < spec.size.0 => {
                    if let Err(e) = pool.resize(&spec.name, spec.size.0, false).await {
                        errors.push((spec.name.clone(), e.to_string()));
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    let options = LunOptions {
                        provisioning: spec.provisioning.provisioning(),
                        block_size: spec.block_size(),
                    };
                    match pool.create_lun(&spec.name, spec.size.0, options).await {
                        Ok(_) => tracing::info!(lun = %spec.name, pool = %spec.pool, "LUN created"),
                        Err(e) => errors.push((spec.name.clone(), e.to_string())),
                    }
                }
            }
        }
        errors
    }

    /// The pool holding the volume `name` (LUN, clone or snapshot).
    pub fn find_lun(&self, name: &str) -> Option<(String, Arc<Pool>)> {
        self.read().iter().find_map(|(pname, rt)| {
            let pool = rt.pool.as_ref()?;
            pool.info(name).ok().map(|_| (pname.clone(), pool.clone()))
        })
    }

    /// The volume `name` as a block device (the same handle every time).
    pub fn lun_dev(&self, name: &str) -> Option<(Arc<basalt_lun::Lun>, VolumeInfo)> {
        let (_, pool) = self.find_lun(name)?;
        let info = pool.info(name).ok()?;
        let mut handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((id, lun)) = handles.get(name) {
            if *id == info.id {
                return Some((lun.clone(), info));
            }
        }
        let lun = pool.lun(name).ok()?;
        handles.insert(name.to_string(), (info.id, lun.clone()));
        Some((lun, info))
    }

    /// Every volume of every running pool.
    pub fn volumes(&self) -> Vec<(String, VolumeInfo)> {
        let pools: Vec<(String, Arc<Pool>)> = self
            .read()
            .iter()
            .filter_map(|(n, rt)| rt.pool.clone().map(|p| (n.clone(), p)))
            .collect();
        pools
            .into_iter()
            .flat_map(|(n, p)| p.list().into_iter().map(move |v| (n.clone(), v)))
            .collect()
    }

    /// The listing of every pool.
    pub fn list(&self) -> Vec<PoolInfo> {
        self.read().values().map(info).collect()
    }

    /// The listing of one pool.
    pub fn get(&self, name: &str) -> Result<PoolInfo, ApiError> {
        self.read()
            .get(name)
            .map(info)
            .ok_or_else(|| ApiError::NotFound(format!("no pool named {name:?}")))
    }

    /// The pool that has `disk` among its disks, and the disk's role in the array.
    pub fn member(&self, disk: &str) -> Option<(String, Arc<Array>, Option<usize>)> {
        self.read().iter().find_map(|(name, rt)| {
            if !rt.spec.all_disks().any(|d| d == disk) {
                return None;
            }
            let array = rt.array.clone()?;
            let status = array.status();
            let role = status
                .members
                .iter()
                .find(|m| m.label == disk)
                .and_then(|m| m.role);
            Some((name.clone(), array, role))
        })
    }

    /// Counters for `/metrics`: per pool (array metrics, usage) and per volume.
    pub fn metrics(&self) -> StorageMetrics {
        let mut out = StorageMetrics::default();
        for (name, rt) in self.read().iter() {
            if let Some(array) = &rt.array {
                out.arrays.push((name.clone(), array.metrics()));
            }
            if let Some(pool) = &rt.pool {
                out.usage.push((name.clone(), pool.usage()));
                for v in pool.list() {
                    if let Ok(stats) = pool.volume_stats(&v.name) {
                        out.volumes.push((name.clone(), v, stats.io.snapshot()));
                    }
                }
            }
        }
        out
    }

    /// Forgets cached LUN handles (after a pool was re-imported or a volume renamed).
    pub fn forget_handles(&self) {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Takes a running pool offline, checks its metadata (repairing when asked), and
    /// imports it again. Its LUNs are unreachable meanwhile; the caller reconnects the
    /// targets afterwards.
    pub async fn check(
        &self,
        name: &str,
        repair: bool,
    ) -> Result<basalt_lun::CheckReport, ApiError> {
        let (pool, array) = {
            let mut pools = self.write();
            let rt = pools
                .get_mut(name)
                .ok_or_else(|| ApiError::NotFound(format!("no pool named {name:?}")))?;
            let array = rt
                .array
                .clone()
                .ok_or_else(|| ApiError::Conflict(format!("pool {name:?} is not up")))?;
            (rt.pool.take(), array)
        };
        self.forget_handles();
        if let Some(pool) = pool {
            pool.export().await.map_err(pool_error)?;
        }
        let dev: SharedBlockDev = array.clone();
        let report = Pool::check(dev.clone(), repair).await;
        let imported = Pool::import(dev, ImportOptions::default()).await;
        let mut pools = self.write();
        if let Some(rt) = pools.get_mut(name) {
            match imported {
                Ok((pool, _)) => {
                    rt.pool = Some(Arc::new(pool));
                    rt.error = None;
                }
                Err(e) => rt.error = Some(format!("re-import after check failed: {e}")),
            }
        }
        report.map_err(pool_error)
    }

    /// Stops every pool cleanly (at shutdown).
    pub async fn stop_all(&self) {
        let all: Vec<(String, PoolRuntime)> =
            std::mem::take(&mut *self.write()).into_iter().collect();
        for (name, rt) in all {
            export(&name, rt).await;
        }
    }
}

/// What `/metrics` needs from the storage layer.
#[derive(Default)]
pub struct StorageMetrics {
    /// Array metrics by pool.
    pub arrays: Vec<(String, basalt_raid::MetricsSnapshot)>,
    /// Pool usage by pool.
    pub usage: Vec<(String, basalt_lun::Usage)>,
    /// Volumes with their pool and I/O counters.
    pub volumes: Vec<(String, VolumeInfo, IoStatsSnapshot)>,
}

fn info(rt: &PoolRuntime) -> PoolInfo {
    let status = rt.array.as_ref().map(|a| a.status());
    let state = match (&rt.pool, &status) {
        (Some(_), Some(s)) => match s.state {
            basalt_raid::ArrayState::Failed => "failed",
            basalt_raid::ArrayState::Degraded | basalt_raid::ArrayState::Recovering => "degraded",
            _ => "online",
        },
        _ => "offline",
    };
    PoolInfo {
        name: rt.spec.name.clone(),
        state: state.to_string(),
        raid: rt.spec.raid.level().name().to_string(),
        disks: rt.spec.disks.clone(),
        spares: rt.spec.spares.clone(),
        error: rt.error.clone(),
        notes: rt.notes.clone(),
        md_text: status.as_ref().map(|s| s.md_text()),
        array: status.and_then(|s| serde_json::to_value(s).ok()),
        usage: rt
            .pool
            .as_ref()
            .and_then(|p| serde_json::to_value(p.usage()).ok()),
        jobs: rt
            .array
            .as_ref()
            .and_then(|a| serde_json::to_value(a.jobs()).ok())
            .unwrap_or(serde_json::Value::Array(Vec::new())),
    }
}

/// The listing of a volume.
pub fn lun_info(pool: &str, v: &VolumeInfo, declared: bool) -> LunInfo {
    LunInfo {
        name: v.name.clone(),
        pool: pool.to_string(),
        kind: match v.kind {
            VolumeKind::Lun => "lun",
            VolumeKind::Snapshot => "snapshot",
            VolumeKind::Clone => "clone",
        }
        .to_string(),
        provisioning: match ProvisioningSpec::from_provisioning(v.provisioning) {
            ProvisioningSpec::Thin => "thin",
            ProvisioningSpec::Thick => "thick",
            ProvisioningSpec::ThickEager => "thick-eager",
        }
        .to_string(),
        size_bytes: v.size_bytes,
        block_size: v.block_size,
        allocated_bytes: v.mapped_bytes,
        exclusive_bytes: v.exclusive_bytes,
        snapshot_bytes: v.snapshot_bytes,
        read_only: v.read_only,
        origin: v.origin.clone(),
        id: v.id.to_string(),
        declared,
    }
}

/// The online disks by name: what pools are built from.
pub type OnlineDisks = BTreeMap<String, SharedBlockDev>;

fn devices_of(names: &[String], disks: &OnlineDisks) -> Result<Vec<Device>, String> {
    names
        .iter()
        .map(|n| match disks.get(n) {
            Some(dev) => Ok(Device::new(n.clone(), dev.clone())),
            None => Err(format!("disk {n:?} is not online")),
        })
        .collect()
}

async fn bring_up(spec: &PoolSpec, disks: &OnlineDisks, create: bool) -> PoolRuntime {
    let mut rt = PoolRuntime {
        spec: spec.clone(),
        array: None,
        pool: None,
        error: None,
        notes: Vec::new(),
    };
    match try_bring_up(spec, disks, create, &mut rt.notes).await {
        Ok((array, pool)) => {
            tracing::info!(pool = %spec.name, "pool up");
            rt.array = Some(array);
            rt.pool = Some(pool);
        }
        Err(e) => {
            tracing::error!(pool = %spec.name, error = %e, "pool not up");
            rt.error = Some(e);
        }
    }
    rt
}

async fn try_bring_up(
    spec: &PoolSpec,
    disks: &OnlineDisks,
    create: bool,
    notes: &mut Vec<String>,
) -> Result<(Arc<Array>, Arc<Pool>), String> {
    // Assemble from whatever disks of the pool are online: a missing disk leaves the
    // array degraded, not down.
    let all: Vec<String> = spec.all_disks().cloned().collect();
    let online: Vec<String> = all
        .iter()
        .filter(|n| disks.contains_key(*n))
        .cloned()
        .collect();
    for missing in all.iter().filter(|n| !online.contains(n)) {
        notes.push(format!("disk {missing:?} is not online"));
    }
    let devices = devices_of(&online, disks)?;
    let pairs: Vec<(String, SharedBlockDev)> = devices
        .iter()
        .map(|d| (d.label.clone(), d.dev.clone()))
        .collect();
    let contents = inspect_disks(&spec.name, &pairs).await?;
    let array = match contents {
        DiskContents::ThisPool => {
            let options = AssembleOptions {
                rate_limit: spec.rate_limit.map(|r| r.0),
                ..AssembleOptions::default()
            };
            let assembly = assemble(devices, &options).await;
            for r in &assembly.rejected {
                notes.push(format!("disk {:?} left out: {}", r.label, r.reason));
            }
            for (_, name, e) in &assembly.not_started {
                notes.push(format!("array {name:?} not started: {e}"));
            }
            assembly
                .arrays
                .into_iter()
                .find(|a| a.name() == spec.name)
                .ok_or_else(|| {
                    format!(
                        "the array of pool {:?} did not assemble: {}",
                        spec.name,
                        notes.join("; ")
                    )
                })?
        }
        DiskContents::Blank if create => {
            let members = devices_of(&spec.disks, disks)?;
            let spares = devices_of(&spec.spares, disks)?;
            let mut config = ArrayConfig::new(spec.name.clone(), spec.raid.level());
            if let Some(chunk) = spec.chunk {
                config = config.chunk(chunk.0 as u32);
            }
            if let Some(journal) = spec.journal {
                config = config.journal(journal);
            }
            config.rate_limit = spec.rate_limit.map(|r| r.0);
            let array = Array::create(config, members, spares)
                .await
                .map_err(|e| format!("cannot create the array: {e}"))?;
            notes.push("array created".to_string());
            array
        }
        DiskContents::Blank => {
            return Err(format!(
                "none of the disks of pool {:?} carries its array; was a disk replaced or wiped?",
                spec.name
            ))
        }
    };
    let dev: SharedBlockDev = array.clone();
    let label = Pool::probe(&dev)
        .await
        .map_err(|e| format!("cannot read the pool label: {e}"))?;
    let pool = match label {
        Some(_) => {
            let (pool, report) = Pool::import(dev, ImportOptions::default())
                .await
                .map_err(|e| format!("cannot import the pool: {e}"))?;
            notes.push(format!(
                "imported: {} volumes, {} journal records replayed{}",
                report.volumes,
                report.records_replayed,
                if report.fell_back {
                    ", fell back to an older checkpoint"
                } else {
                    ""
                }
            ));
            notes.extend(report.problems.iter().cloned());
            pool
        }
        None => {
            let mut thresholds = Thresholds::default();
            if let Some(w) = spec.warn_pct {
                thresholds.data_warn_pct = w;
            }
            if let Some(c) = spec.critical_pct {
                thresholds.data_critical_pct = c;
            }
            let options = FormatOptions {
                name: spec.name.clone(),
                thresholds,
                ..FormatOptions::default()
            };
            let pool = Pool::format(dev, options)
                .await
                .map_err(|e| format!("cannot format the pool: {e}"))?;
            notes.push("pool formatted".to_string());
            pool
        }
    };
    Ok((array, Arc::new(pool)))
}

/// Applies a change of a running pool's disks: new names replace failed or missing
/// members, or become spares.
async fn change_members(
    array: &Arc<Array>,
    old: &PoolSpec,
    new: &PoolSpec,
    disks: &OnlineDisks,
) -> Result<(), String> {
    let added: Vec<String> = new
        .all_disks()
        .filter(|d| !old.all_disks().any(|o| o == *d))
        .cloned()
        .collect();
    let removed: Vec<String> = old
        .all_disks()
        .filter(|d| !new.all_disks().any(|n| n == *d))
        .cloned()
        .collect();
    let status = array.status();
    let mut replaceable: Vec<usize> = status
        .members
        .iter()
        .filter(|m| removed.contains(&m.label))
        .filter_map(|m| m.role)
        .collect();
    for name in added {
        let device = devices_of(std::slice::from_ref(&name), disks)?.remove(0);
        let result = match replaceable.pop() {
            Some(role) => array.replace_member(role, device).await,
            None => array.add_spare(device).await,
        };
        result.map_err(|e| format!("disk {name:?}: {e}"))?;
    }
    Ok(())
}

async fn export(name: &str, rt: PoolRuntime) {
    if let Some(pool) = rt.pool {
        if let Err(e) = pool.export().await {
            tracing::warn!(pool = %name, error = %e, "pool export failed");
        }
    }
    if let Some(array) = rt.array {
        if let Err(e) = array.stop().await {
            tracing::warn!(pool = %name, error = %e, "array stop failed");
        }
    }
    tracing::info!(pool = %name, "pool stopped");
}

/// Checks a LUN declaration against a running pool: what would apply cannot do.
pub fn check_lun(spec: &LunSpec, pool: &Pool) -> Option<String> {
    let info = pool.info(&spec.name).ok()?;
    if info.size_bytes > spec.size.0 {
        return Some(format!(
            "LUN {:?} is {} bytes; shrinking it to {} loses data: use `basalt lun resize --force`",
            spec.name, info.size_bytes, spec.size.0
        ));
    }
    if ProvisioningSpec::from_provisioning(info.provisioning) != spec.provisioning {
        return Some(format!(
            "LUN {:?}: provisioning cannot change after creation",
            spec.name
        ));
    }
    if info.block_size != spec.block_size() {
        return Some(format!(
            "LUN {:?}: block size cannot change after creation",
            spec.name
        ));
    }
    if info.kind == VolumeKind::Snapshot {
        return Some(format!("{:?} is a snapshot, not a LUN", spec.name));
    }
    None
}

/// `internal` is used by the API module for pool errors.
pub fn pool_error(e: basalt_lun::PoolError) -> ApiError {
    use basalt_lun::PoolError;
    match e {
        PoolError::NotFound(m) => ApiError::NotFound(m),
        PoolError::Invalid(m) => ApiError::BadRequest(m),
        e @ (PoolError::Exists(_) | PoolError::NoSpace(_) | PoolError::WouldLoseData { .. }) => {
            ApiError::Conflict(e.to_string())
        }
        other => internal(other),
    }
}
