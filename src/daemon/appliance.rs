//! The appliance core: the store, the disks, and every operation the API offers.
//!
//! HTTP handlers are thin: they decode a request, call one method here and encode the
//! answer. Mutations are serialized by one lock so that a plan checked against the
//! current state is still valid when it is committed.

use super::disks::{check_kind, open_and_probe, DiskRuntime, DiskSet};
use super::listeners::Listeners;
use super::lockspaces::{header_mismatch, HostDefaults, Lockspaces};
use super::sections::{put_named, ProvisioningSpec, Typed, DEFAULT_LUN_BLOCK_SIZE};
use super::storage::{check_lun, inspect_disks, OnlineDisks, Storage};
use super::switches::{check_on_this_host, Switches};
use super::targets::{iscsi_units, nbd_exports, Targets};
use crate::api::error::ApiError;
use crate::api::types::{AddDisk, ApplyResult, DiskCounts, DiskInfo, DiskState, Status};
use basalt_blockdev::uring::create_sparse_file;
use basalt_blockdev::{BlockDev, IoStats, IoStatsSnapshot};
use basalt_config::{
    check_name, ByteSize, ConfigError, DesiredState, DiskKind, DiskSpec, Plan, Store,
};
use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// How long an apply that changes lockspace sections waits for their joins before
/// reporting them as still joining (they go on in the background).
const APPLY_JOIN_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The running appliance.
pub struct Appliance {
    data_dir: PathBuf,
    socket: PathBuf,
    store: Arc<Store>,
    disks: RwLock<DiskSet>,
    stats: Mutex<HashMap<String, Arc<IoStats>>>,
    listeners: Arc<Listeners>,
    switches: Switches,
    storage: Storage,
    targets: Targets,
    lockspaces: Lockspaces,
    /// TLS for the NBD server (the appliance's certificate, without HTTP's ALPN).
    target_tls: Arc<rustls::ServerConfig>,
    started: Instant,
    mutation: tokio::sync::Mutex<()>,
}

/// Runs blocking work (RocksDB, open(2), fallocate) off the async runtime.
async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("background task failed: {e}")))?
}

/// After a LUN rename whose apply failed: stores the configuration that names the LUN
/// as its pool now does (`before` if the pool's rename was `undone`, else `renamed`).
/// The apply may have failed after it committed `renamed` (a switch that cannot be
/// reconciled), or before; a store that names the LUN otherwise than its pool makes the
/// next apply create an empty LUN under the declared name. Storing what the store
/// already holds changes nothing.
fn settle_failed_rename(
    store: &Store,
    old: &str,
    new: &str,
    undone: Result<(), basalt_lun::PoolError>,
    before: &DesiredState,
    renamed: &DesiredState,
) {
    let keep = match undone {
        Ok(()) => before,
        Err(undo) => {
            tracing::error!(old, new, error = %undo, "cannot undo a LUN rename; the configuration keeps the new name");
            renamed
        }
    };
    if let Err(e) = store.apply(keep) {
        tracing::error!(old, new, error = %e, "cannot store the LUN's name after a failed rename; the configuration may name it otherwise than its pool");
    }
}

impl Appliance {
    /// The appliance on an open store; opens every declared disk.
    pub async fn new(
        data_dir: PathBuf,
        socket: PathBuf,
        store: Store,
        listeners: Arc<Listeners>,
        target_tls: Arc<rustls::ServerConfig>,
    ) -> Result<Arc<Appliance>, ApiError> {
        let appliance = Arc::new(Appliance {
            data_dir,
            socket,
            store: Arc::new(store),
            disks: RwLock::new(DiskSet::default()),
            stats: Mutex::new(HashMap::new()),
            listeners,
            switches: Switches::default(),
            storage: Storage::default(),
            targets: Targets::default(),
            lockspaces: Lockspaces::default(),
            target_tls,
            started: Instant::now(),
            mutation: tokio::sync::Mutex::new(()),
        });
        let desired = appliance.desired().await?;
        for spec in &desired.disks {
            appliance.open(spec).await;
        }
        // A stored section this build cannot parse is reported, not fatal: the rest of
        // the appliance still comes up, and `basalt config export` shows what is stored.
        match Typed::parse(&desired) {
            Ok(typed) => {
                for w in appliance.reconcile_storage(&typed, &[], &[]).await {
                    tracing::error!(problem = %w, "storage not fully up");
                }
                if let Err(e) = appliance.reconcile_targets(&typed).await {
                    tracing::error!(error = %e, "targets not started");
                }
                appliance.switches.reconcile(&typed.switches).await?;
                // Joining may wait a dead-host timeout (a previous incarnation's slot):
                // in the background, so that the API comes up meanwhile.
                // Generation 0: skipped if an apply has reconciled (newer) meanwhile.
                let a = appliance.clone();
                tokio::spawn(async move {
                    for w in a.reconcile_lockspaces(0, &typed.lockspaces).await {
                        tracing::error!(problem = %w, "lockspace not joined");
                    }
                });
            }
            Err(errors) => {
                for e in errors {
                    tracing::error!(error = %e, "stored configuration section not started");
                }
            }
        }
        // Lost or unreachable lockspaces are rejoined, backing off from 5 s to
        // 5 minutes while they keep failing. Not under the mutation lock: a join can
        // take a connect timeout plus a dead-host timeout, and `Lockspaces` serializes
        // its own joins.
        let weak = Arc::downgrade(&appliance);
        tokio::spawn(async move {
            let mut pause = std::time::Duration::from_secs(5);
            loop {
                tokio::time::sleep(pause).await;
                let Some(a) = weak.upgrade() else { return };
                if !a.lockspaces.needs_retry() {
                    pause = std::time::Duration::from_secs(5);
                    continue;
                }
                let store = a.store.clone();
                // The generation first: the state read after it is at least as new.
                let read = blocking(move || Ok((store.generation()?, store.desired_state()?)));
                if let Ok((generation, desired)) = read.await {
                    if let Ok(typed) = Typed::parse(&desired) {
                        a.reconcile_lockspaces(generation, &typed.lockspaces).await;
                    }
                }
                pause = (pause * 2).min(std::time::Duration::from_secs(300));
            }
        });
        Ok(appliance)
    }

    fn stats_for(&self, name: &str) -> Arc<IoStats> {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.entry(name.to_string()).or_default().clone()
    }

    /// Opens and probes a declared disk and records the outcome.
    async fn open(&self, spec: &DiskSpec) {
        let rt = open_and_probe(spec.clone(), self.stats_for(&spec.name)).await;
        match rt.state {
            DiskState::Online => {
                tracing::info!(disk = %spec.name, path = %spec.path.display(), "disk online")
            }
            _ => tracing::warn!(disk = %spec.name, error = ?rt.error, "disk not available"),
        }
        self.disks_mut().disks.insert(spec.name.clone(), rt);
    }

    fn disks_mut(&self) -> std::sync::RwLockWriteGuard<'_, DiskSet> {
        self.disks.write().unwrap_or_else(|p| p.into_inner())
    }

    fn disks_ref(&self) -> std::sync::RwLockReadGuard<'_, DiskSet> {
        self.disks.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// `GET /status`.
    pub async fn status(&self) -> Result<Status, ApiError> {
        let store = self.store.clone();
        let (appliance, id, schema, generation) = blocking(move || {
            Ok((
                store.appliance()?,
                store.appliance_id()?,
                store.schema_version()?,
                store.generation()?,
            ))
        })
        .await?;
        let disks = self.disks_ref();
        let online = disks
            .disks
            .values()
            .filter(|d| d.state == DiskState::Online)
            .count();
        Ok(Status {
            name: appliance.name,
            appliance_id: id,
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.started.elapsed().as_secs(),
            data_dir: self.data_dir.display().to_string(),
            store_schema_version: schema,
            config_generation: generation,
            listen: self
                .listeners
                .addresses()
                .iter()
                .map(|a| a.to_string())
                .collect(),
            socket: self.socket.display().to_string(),
            disks: DiskCounts {
                total: disks.disks.len(),
                online,
                unavailable: disks.disks.len() - online,
            },
        })
    }

    /// `GET /disks`.
    pub fn list_disks(&self) -> Vec<DiskInfo> {
        self.disks_ref()
            .disks
            .values()
            .map(DiskRuntime::info)
            .collect()
    }

    /// `GET /disks/{name}`.
    pub fn disk(&self, name: &str) -> Result<DiskInfo, ApiError> {
        self.disks_ref()
            .disks
            .get(name)
            .map(DiskRuntime::info)
            .ok_or_else(|| ApiError::NotFound(format!("no disk named {name:?}")))
    }

    /// The switches.
    pub fn switches(&self) -> &Switches {
        &self.switches
    }

    /// Pools and LUNs.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The target servers.
    pub fn targets(&self) -> &Targets {
        &self.targets
    }

    /// The joined lockspaces.
    pub fn lockspaces(&self) -> &Lockspaces {
        &self.lockspaces
    }

    /// This host's default identity in lockspaces: the appliance's UUID and name.
    async fn host_defaults(&self) -> Result<HostDefaults, ApiError> {
        let store = self.store.clone();
        let (name, id) =
            blocking(move || Ok((store.appliance()?.name, store.appliance_id()?))).await?;
        let id = super::sections::parse_host_id(&id).unwrap_or_else(|_| {
            let mut b = [0u8; 16];
            for (i, x) in id.bytes().enumerate() {
                b[i % 16] ^= x.rotate_left((i / 16) as u32);
            }
            b
        });
        Ok(HostDefaults { id, name })
    }

    async fn reconcile_lockspaces(
        &self,
        generation: u64,
        specs: &[super::sections::LockspaceSpec],
    ) -> Vec<String> {
        match self.host_defaults().await {
            Ok(host) => {
                self.lockspaces
                    .reconcile(generation, specs, &self.storage, &host)
                    .await
            }
            Err(e) => vec![format!("lockspaces: {e}")],
        }
    }

    /// `basalt lockspace format NAME`: an explicit, refused over an existing lockspace.
    /// Serialized by `Lockspaces` with the joins, not under the mutation lock (a join
    /// in progress may wait a connect timeout).
    pub async fn format_lockspace(
        &self,
        name: &str,
    ) -> Result<super::lockspaces::LockspaceInfo, ApiError> {
        self.lockspaces.format(name, &self.storage).await
    }

    /// Lockspace headers against their sections: timings and sizes must be the
    /// header's. Checked where the header can be read now (joined, or on a LUN here);
    /// a remote one not joined yet is checked when it is joined.
    async fn check_lockspaces(
        &self,
        desired: &DesiredState,
        typed: &Typed,
        errors: &mut Vec<ConfigError>,
    ) {
        for spec in &typed.lockspaces {
            let line = Typed::line_of(&desired.sections, "lockspace", Some(&spec.name));
            let header = match self.lockspaces.joined_header(&spec.name) {
                Some((device, h)) if device == spec.device => Some(h),
                _ => match spec.device() {
                    Ok(super::sections::LockDevice::Lun { lun, .. }) => {
                        match self.storage.lun_dev(&lun) {
                            Some((dev, _)) => {
                                let dev: basalt_blockdev::SharedBlockDev = dev;
                                tokio::time::timeout(
                                    std::time::Duration::from_secs(5),
                                    basalt_lockmgr::Lockspace::read_header(&dev, 0),
                                )
                                .await
                                .ok()
                                .and_then(Result::ok)
                            }
                            None => None,
                        }
                    }
                    _ => None,
                },
            };
            if let Some(h) = header {
                for p in header_mismatch(spec, &h) {
                    errors.push(ConfigError::on_line(
                        line,
                        format!("lockspace {:?}: {p}", spec.name),
                    ));
                }
            }
        }
    }

    /// Counters of every disk, for `/metrics`.
    pub fn disk_stats(&self) -> Vec<(DiskInfo, IoStatsSnapshot)> {
        self.disks_ref()
            .disks
            .values()
            .map(|d| (d.info(), d.snapshot()))
            .collect()
    }

    /// `POST /disks`: declares a disk, creating a sparse file when asked to.
    pub async fn add_disk(self: &Arc<Self>, req: AddDisk) -> Result<DiskInfo, ApiError> {
        let _guard = self.mutation.lock().await;
        check_name(&req.name).map_err(ApiError::BadRequest)?;
        let size = req
            .size
            .as_deref()
            .map(|s| s.parse::<ByteSize>())
            .transpose()
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let path = match &req.path {
            Some(p) => PathBuf::from(p),
            None => {
                let dir = self.data_dir.join("disks");
                std::fs::create_dir_all(&dir).map_err(|e| {
                    ApiError::Internal(format!("cannot create {}: {e}", dir.display()))
                })?;
                dir.join(format!("{}.img", req.name))
            }
        };
        if !path.is_absolute() {
            return Err(ApiError::BadRequest(format!(
                "disk path {} must be absolute",
                path.display()
            )));
        }
        let (spec, create) = inspect_new_disk(&req.name, &path, size, req.block_size)?;
        let problems = spec.check();
        if !problems.is_empty() {
            return Err(ApiError::BadRequest(problems.join("; ")));
        }
        // Conflicts first, so a refused add never leaves a file behind.
        let store = self.store.clone();
        let s = spec.clone();
        blocking(move || {
            for existing in store.disks()? {
                if existing.name == s.name {
                    return Err(ApiError::Conflict(format!(
                        "a disk named {:?} already exists",
                        s.name
                    )));
                }
                if existing.path == s.path {
                    return Err(ApiError::Conflict(format!(
                        "{} is already disk {:?}",
                        s.path.display(),
                        existing.name
                    )));
                }
            }
            if create {
                make_file(&s)?;
            }
            Ok(())
        })
        .await?;
        let undo = |spec: &DiskSpec| {
            if create {
                let _ = std::fs::remove_file(&spec.path);
            }
        };
        let rt = open_and_probe(spec.clone(), self.stats_for(&spec.name)).await;
        if rt.state != DiskState::Online {
            undo(&spec);
            return Err(ApiError::BadRequest(format!(
                "cannot use {}: {}",
                spec.path.display(),
                rt.error.unwrap_or_default()
            )));
        }
        let store = self.store.clone();
        let s = spec.clone();
        if let Err(e) = blocking(move || Ok(store.add_disk(&s)?)).await {
            undo(&spec);
            return Err(e);
        }
        let info = rt.info();
        tracing::info!(disk = %spec.name, path = %spec.path.display(), "disk added");
        self.disks_mut().disks.insert(spec.name.clone(), rt);
        Ok(info)
    }

    /// `DELETE /disks/{name}`: forgets a disk. Its file or device is left as it is.
    pub async fn remove_disk(self: &Arc<Self>, name: String) -> Result<(), ApiError> {
        let _guard = self.mutation.lock().await;
        if let Ok(typed) = Typed::parse(&self.desired().await?) {
            if let Some(p) = typed
                .pools
                .iter()
                .find(|p| p.all_disks().any(|d| d == &name))
            {
                return Err(ApiError::Conflict(format!(
                    "disk {name:?} belongs to pool {:?}; replace it there first",
                    p.name
                )));
            }
        }
        let store = self.store.clone();
        let n = name.clone();
        let existed = blocking(move || Ok(store.remove_disk(&n)?)).await?;
        if !existed {
            return Err(ApiError::NotFound(format!("no disk named {name:?}")));
        }
        self.close(&name).await;
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&name);
        tracing::info!(disk = %name, "disk removed");
        Ok(())
    }

    async fn close(&self, name: &str) {
        let removed = self.disks_mut().disks.remove(name);
        if let Some(DiskRuntime {
            open: Some(open), ..
        }) = removed
        {
            if let Err(e) = open.dev.flush().await {
                tracing::warn!(disk = %name, error = %e, "flush at close failed");
            }
        }
    }

    /// `GET /config`: the whole desired state as TOML.
    pub async fn export_config(&self) -> Result<String, ApiError> {
        let store = self.store.clone();
        blocking(move || Ok(store.desired_state()?.to_toml())).await
    }

    /// `PUT /config`: checks a whole desired state against the document and the machine,
    /// then applies it, or changes nothing.
    pub async fn apply_config(
        self: &Arc<Self>,
        text: String,
        dry_run: bool,
    ) -> Result<ApplyResult, ApiError> {
        let _guard = self.mutation.lock().await;
        let desired =
            DesiredState::from_toml(&text).map_err(|errors| ApiError::InvalidConfig(errors.0))?;
        self.apply_state(
            desired,
            ApplyOptions {
                dry_run,
                ..ApplyOptions::default()
            },
        )
        .await
    }

    /// Changes the stored desired state with `change` and applies the result, as one
    /// mutation: the per-object API calls (`switch portgroup add`, ...) go through here,
    /// so they are checked exactly as a whole document would be.
    pub async fn update<F>(self: &Arc<Self>, change: F) -> Result<ApplyResult, ApiError>
    where
        F: FnOnce(&mut DesiredState) -> Result<(), ApiError>,
    {
        self.update_with(ApplyOptions::default(), change).await
    }

    /// As [`Appliance::update`], with options (LUNs to delete, pools to export).
    pub async fn update_with<F>(
        self: &Arc<Self>,
        opts: ApplyOptions,
        change: F,
    ) -> Result<ApplyResult, ApiError>
    where
        F: FnOnce(&mut DesiredState) -> Result<(), ApiError>,
    {
        let _guard = self.mutation.lock().await;
        let store = self.store.clone();
        let mut desired = blocking(move || Ok(store.desired_state()?)).await?;
        change(&mut desired)?;
        self.apply_state(desired, opts).await
    }

    /// Renames a LUN: in its pool first, then in the desired state, under one lock so
    /// that no apply in between finds the declared name missing (and creates an empty
    /// LUN of that name). If the configuration cannot take the new name, the pool's
    /// rename is undone. `check` (given the desired state and the LUN's pool) refuses a
    /// LUN in use; it runs under the lock, so that no VM start slips in between.
    pub async fn rename_lun(
        self: &Arc<Self>,
        old: &str,
        new: &str,
        check: impl FnOnce(&Typed, &str) -> Result<(), ApiError>,
    ) -> Result<ApplyResult, ApiError> {
        let _guard = self.mutation.lock().await;
        let store = self.store.clone();
        let mut desired = blocking(move || Ok(store.desired_state()?)).await?;
        let typed = Typed::parse(&desired).map_err(ApiError::InvalidConfig)?;
        if typed.luns.iter().any(|l| l.name == new) || self.storage.find_lun(new).is_some() {
            return Err(ApiError::Conflict(format!("a LUN named {new:?} exists")));
        }
        let (pool_name, pool) = self
            .storage
            .find_lun(old)
            .ok_or_else(|| ApiError::NotFound(format!("no LUN named {old:?}")))?;
        check(&typed, &pool_name)?;
        pool.rename(old, new)
            .await
            .map_err(super::storage::pool_error)?;
        let before = desired.clone();
        if let Some(mut spec) = typed.luns.into_iter().find(|l| l.name == old) {
            desired.sections.lun.retain(|s| s.name() != Some(old));
            spec.name = new.to_string();
            put_named(&mut desired.sections, "lun", new, &spec).map_err(ApiError::Internal)?;
        }
        match self
            .apply_state(desired.clone(), ApplyOptions::default())
            .await
        {
            Ok(mut result) => {
                result
                    .changes
                    .insert(0, format!("rename LUN {old} to {new}"));
                tracing::info!(old, new, "LUN renamed");
                Ok(result)
            }
            Err(e) => {
                let undone = pool.rename(new, old).await.map(|_| ());
                let store = self.store.clone();
                let (o, n) = (old.to_string(), new.to_string());
                let settled = blocking(move || {
                    settle_failed_rename(&store, &o, &n, undone, &before, &desired);
                    Ok(())
                })
                .await;
                if let Err(join) = settled {
                    tracing::error!(old, new, error = %join, "cannot settle a failed LUN rename");
                }
                Err(e)
            }
        }
    }

    /// Pools found on online disks outside `used`: their arrays, by superblock, as the
    /// specs that would bring them up here (`basalt pool import`).
    pub async fn find_foreign_pools(&self, used: &[String]) -> Vec<super::sections::PoolSpec> {
        let mut found: Vec<(basalt_raid::Uuid, super::sections::PoolSpec)> = Vec::new();
        for (name, dev) in self.online_disks() {
            if used.contains(&name) {
                continue;
            }
            let Ok(sb) = basalt_raid::examine(&dev).await else {
                continue;
            };
            let raid = match sb.level {
                basalt_raid::Level::Raid0 => super::sections::RaidLevel::Raid0,
                basalt_raid::Level::Raid1 => super::sections::RaidLevel::Raid1,
                basalt_raid::Level::Raid10 => super::sections::RaidLevel::Raid10,
                basalt_raid::Level::Raid5 => super::sections::RaidLevel::Raid5,
                basalt_raid::Level::Raid6 => super::sections::RaidLevel::Raid6,
            };
            match found.iter_mut().find(|(u, _)| *u == sb.array_uuid) {
                Some((_, spec)) => spec.disks.push(name),
                None => found.push((
                    sb.array_uuid,
                    super::sections::PoolSpec {
                        name: sb.name.clone(),
                        raid,
                        chunk: Some(ByteSize(u64::from(sb.chunk))),
                        disks: vec![name],
                        spares: Vec::new(),
                        journal: None,
                        rate_limit: None,
                        warn_pct: None,
                        critical_pct: None,
                    },
                )),
            }
        }
        found.into_iter().map(|(_, spec)| spec).collect()
    }

    /// `basalt pool check`: the pool goes offline for the check, then comes back and the
    /// targets reconnect to it.
    pub async fn check_pool(
        &self,
        name: &str,
        repair: bool,
    ) -> Result<basalt_lun::CheckReport, ApiError> {
        let _guard = self.mutation.lock().await;
        let report = self.storage.check(name, repair).await;
        if let Ok(typed) = Typed::parse(&self.desired().await?) {
            if let Err(e) = self.reconcile_targets(&typed).await {
                tracing::error!(error = %e, "targets after pool check");
            }
        }
        report
    }

    /// Runs `f` with the mutation lock held (operations that change run-time state
    /// only, such as snapshots, so that they do not interleave with an apply).
    pub async fn exclusive<T, Fut>(&self, f: impl FnOnce() -> Fut) -> T
    where
        Fut: std::future::Future<Output = T>,
    {
        let _guard = self.mutation.lock().await;
        f().await
    }

    /// The desired state as stored.
    pub async fn desired(&self) -> Result<DesiredState, ApiError> {
        let store = self.store.clone();
        blocking(move || Ok(store.desired_state()?)).await
    }

    async fn apply_state(
        self: &Arc<Self>,
        desired: DesiredState,
        opts: ApplyOptions,
    ) -> Result<ApplyResult, ApiError> {
        let typed = Typed::parse(&desired).map_err(ApiError::InvalidConfig)?;
        let store = self.store.clone();
        let d = desired.clone();
        let (plan, before) =
            blocking(move || Ok((store.plan(&d)?, store.desired_state()?))).await?;
        let mut errors = check_plan(&plan);
        for (section, def) in desired.sections.switch.iter().zip(&typed.switches) {
            for problem in check_on_this_host(def) {
                errors.push(ConfigError::on_line(section.line, problem));
            }
        }
        let new_pools = self
            .check_storage(&desired, &before, &typed, &opts, &mut errors)
            .await;
        check_targets(&desired, &typed, &self.storage, &mut errors);
        self.check_lockspaces(&desired, &typed, &mut errors).await;
        let new_listeners = if plan.api_changed {
            match self.listeners.bind_new(&desired.api.listen).await {
                Ok(bound) => bound,
                Err(e) => {
                    errors.push(ConfigError::on_line(None, e));
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        if !errors.is_empty() {
            errors.sort_by_key(|e| (e.line, e.column));
            return Err(ApiError::InvalidConfig(errors));
        }
        let changes = describe(&plan);
        if opts.dry_run {
            let generation = self.store.generation()?;
            return Ok(ApplyResult {
                dry_run: true,
                changes,
                generation,
                warnings: Vec::new(),
            });
        }

        let store = self.store.clone();
        let plan2 = plan.clone();
        let d = desired.clone();
        let generation = blocking(move || {
            let mut created = Vec::new();
            for spec in plan2.add_disks.iter().filter(|s| s.kind == DiskKind::File) {
                if !spec.path.exists() {
                    if let Err(e) = make_file(spec) {
                        remove_all(&created);
                        return Err(e);
                    }
                    created.push(spec.path.clone());
                }
            }
            for (old, new) in &plan2.change_disks {
                if let Err(e) = grow_file(old, new) {
                    remove_all(&created);
                    return Err(e);
                }
            }
            if let Err(e) = store.apply(&d) {
                remove_all(&created);
                return Err(e.into());
            }
            Ok(store.generation()?)
        })
        .await?;

        // Bring the running appliance in line with what was committed. What fails here
        // (a device that dies between the check and now) is reported, not rolled back:
        // the desired state stands and the next start or apply tries again.
        let mut warnings = Vec::new();
        for name in &plan.remove_disks {
            self.close(name).await;
        }
        for (_, new) in &plan.change_disks {
            self.close(&new.name).await;
            self.open(new).await;
        }
        for spec in &plan.add_disks {
            self.open(spec).await;
        }
        warnings.extend(
            self.reconcile_storage(&typed, &new_pools, &opts.delete_luns)
                .await,
        );
        if let Err(e) = self.reconcile_targets(&typed).await {
            warnings.push(e.to_string());
        }
        // Lockspaces are joined in the background: a join can take a connect timeout
        // (a remote target down) plus a dead-host timeout, and must not hold the
        // mutation lock. When the lockspace sections changed, the outcome is waited
        // for a moment so that the result reports it; past that it says "joining".
        let lockspaces_changed =
            Typed::parse(&before).map_or(true, |b| b.lockspaces != typed.lockspaces);
        let a = self.clone();
        let specs = typed.lockspaces.clone();
        let mut joins =
            tokio::spawn(async move { a.reconcile_lockspaces(generation, &specs).await });
        if lockspaces_changed {
            match tokio::time::timeout(APPLY_JOIN_WAIT, &mut joins).await {
                Ok(Ok(w)) => warnings.extend(w),
                Ok(Err(e)) => warnings.push(format!("lockspaces: {e}")),
                Err(_) => warnings.push(
                    "lockspaces: still joining in the background; see `basalt lockspace list`"
                        .to_string(),
                ),
            }
        }
        self.switches.reconcile(&typed.switches).await?;
        if plan.api_changed {
            self.listeners.replace(new_listeners, &desired.api.listen);
        }
        for w in &warnings {
            tracing::warn!(warning = %w, "applied with a problem");
        }
        tracing::info!(generation, changes = changes.len(), "configuration applied");
        Ok(ApplyResult {
            dry_run: false,
            changes,
            generation,
            warnings,
        })
    }

    fn online_disks(&self) -> OnlineDisks {
        self.disks_ref()
            .disks
            .iter()
            .filter_map(|(n, d)| d.open.as_ref().map(|o| (n.clone(), o.dev.clone())))
            .collect()
    }

    /// Pools, then LUNs; returns what failed.
    async fn reconcile_storage(
        &self,
        typed: &Typed,
        new_pools: &[String],
        delete: &[String],
    ) -> Vec<String> {
        let online = self.online_disks();
        self.storage
            .reconcile_pools(&typed.pools, &online, new_pools)
            .await;
        let mut warnings: Vec<String> = self
            .storage
            .list()
            .into_iter()
            .filter_map(|p| p.error.map(|e| format!("pool {}: {e}", p.name)))
            .collect();
        for (lun, e) in self.storage.reconcile_luns(&typed.luns, delete).await {
            warnings.push(format!("lun {lun}: {e}"));
        }
        warnings
    }

    async fn reconcile_targets(&self, typed: &Typed) -> Result<(), ApiError> {
        self.targets
            .reconcile(
                typed.nbd.as_ref(),
                typed.iscsi.as_ref(),
                &self.storage,
                &self.store,
                self.target_tls.clone(),
            )
            .await
    }

    /// Checks pools and LUNs against what runs: pools on new disks only where the disks
    /// are blank or already hold that pool, nothing that loses data (a shrink, a
    /// dropped LUN or pool) unless asked for explicitly. Returns the pools to create.
    async fn check_storage(
        &self,
        desired: &DesiredState,
        before: &DesiredState,
        typed: &Typed,
        opts: &ApplyOptions,
        errors: &mut Vec<ConfigError>,
    ) -> Vec<String> {
        let line = |kind: &str, name: &str| Typed::line_of(&desired.sections, kind, Some(name));
        let known: Vec<String> = before
            .sections
            .pool
            .iter()
            .filter_map(|s| s.name().map(String::from))
            .collect();
        let running = self.storage.specs();
        let mut new_pools = Vec::new();
        for spec in &typed.pools {
            let err = |m: String| {
                ConfigError::on_line(
                    line("pool", &spec.name),
                    format!("pool {:?}: {m}", spec.name),
                )
            };
            if let Some(old) = running.iter().find(|p| p.name == spec.name) {
                if old.raid != spec.raid || old.chunk != spec.chunk || old.journal != spec.journal {
                    errors.push(err(
                        "RAID level, chunk and journal cannot change after creation".into(),
                    ));
                }
                if let Some(array) = self.storage.array(&spec.name) {
                    let status = array.status();
                    let removed_active: Vec<&String> = status
                        .members
                        .iter()
                        .filter(|m| m.state == basalt_raid::RoleState::InSync)
                        .map(|m| &m.label)
                        .filter(|l| !spec.all_disks().any(|d| d == *l))
                        .collect();
                    let added = spec
                        .all_disks()
                        .filter(|d| !old.all_disks().any(|o| o == *d))
                        .count();
                    if !removed_active.is_empty() && added < removed_active.len() {
                        errors.push(err(format!(
                            "disk {:?} is an active member; replace it (`basalt disk replace`) rather than drop it",
                            removed_active[0]
                        )));
                    }
                }
                continue;
            }
            if known.contains(&spec.name) {
                // Declared before but not up (missing disks): it is retried, never created.
                continue;
            }
            let online = self.online_disks();
            let mut devices = Vec::new();
            // Disks that this same document adds, so that disks and the pool on them can
            // come in one apply: a file it will create is blank; one that exists already
            // is opened for a look at its superblock (and closed again).
            let mut to_create = 0;
            for d in spec.all_disks() {
                if let Some(dev) = online.get(d) {
                    devices.push((d.clone(), dev.clone()));
                    continue;
                }
                let added = desired
                    .disks
                    .iter()
                    .find(|s| &s.name == d && !before.disks.iter().any(|b| b.name == s.name));
                match added {
                    Some(ds) if ds.kind == DiskKind::File && !ds.path.exists() => to_create += 1,
                    Some(ds) => {
                        let rt = open_and_probe(ds.clone(), Arc::new(IoStats::default())).await;
                        match rt.open {
                            Some(open) => devices.push((d.clone(), open.dev)),
                            None => errors.push(err(format!(
                                "disk {d:?}: {}",
                                rt.error.unwrap_or_else(|| "cannot be opened".into())
                            ))),
                        }
                    }
                    None => errors.push(err(format!("disk {d:?} is not online"))),
                }
            }
            if devices.len() + to_create == spec.all_disks().count() {
                match inspect_disks(&spec.name, &devices).await {
                    Ok(_) => new_pools.push(spec.name.clone()),
                    Err(e) => errors.push(err(e)),
                }
            }
        }
        for old in &running {
            if !typed.pools.iter().any(|p| p.name == old.name)
                && !opts.export_pools.contains(&old.name)
            {
                errors.push(ConfigError::on_line(None, format!(
                    "pool {:?} is running; apply never stops a pool: export it with `basalt pool export {}`",
                    old.name, old.name
                )));
            }
        }

        let volumes = self.storage.volumes();
        for spec in &typed.luns {
            let err = |m: String| {
                ConfigError::on_line(line("lun", &spec.name), format!("lun {:?}: {m}", spec.name))
            };
            if let Some((pool, v)) = volumes.iter().find(|(_, v)| v.name == spec.name) {
                if pool != &spec.pool {
                    errors.push(err(format!(
                        "a volume of that name exists in pool {pool:?}"
                    )));
                } else if let Some(p) = self.storage.pool(pool) {
                    if let Some(problem) = check_lun(spec, &p) {
                        errors.push(err(problem));
                    }
                }
                let _ = v;
            } else if let Some(p) = self.storage.pool(&spec.pool) {
                let pool_block = self
                    .storage
                    .array(&spec.pool)
                    .map(|a| basalt_blockdev::BlockDev::geometry(a.as_ref()).block_size)
                    .unwrap_or(DEFAULT_LUN_BLOCK_SIZE);
                if spec.block_size() < pool_block {
                    errors.push(err(format!(
                        "block size {} is below the pool's {pool_block}",
                        spec.block_size()
                    )));
                }
                if spec.provisioning != ProvisioningSpec::Thin && p.usage().free_bytes < spec.size.0
                {
                    errors.push(err(format!(
                        "a thick LUN of {} needs that much free space; pool {:?} has {}",
                        spec.size,
                        spec.pool,
                        ByteSize(p.usage().free_bytes).human()
                    )));
                }
            }
        }
        let declared: Vec<&str> = typed.luns.iter().map(|l| l.name.as_str()).collect();
        for (pool, v) in &volumes {
            let was_declared = before
                .sections
                .lun
                .iter()
                .any(|s| s.name() == Some(v.name.as_str()));
            if was_declared
                && !declared.contains(&v.name.as_str())
                && !opts.delete_luns.contains(&v.name)
                && !opts.export_pools.contains(pool)
            {
                errors.push(ConfigError::on_line(None, format!(
                    "LUN {:?} in pool {pool:?} holds data; apply never deletes it: use `basalt lun delete {}`",
                    v.name, v.name
                )));
            }
        }
        new_pools
    }

    /// Flushes every disk and the store; called once at shutdown.
    pub async fn shutdown(&self) {
        self.lockspaces.leave_all().await;
        self.targets.stop_all().await;
        self.storage.stop_all().await;
        let devs: Vec<_> = self
            .disks_ref()
            .disks
            .values()
            .filter_map(|d| {
                d.open
                    .as_ref()
                    .map(|o| (d.spec.name.clone(), o.dev.clone()))
            })
            .collect();
        for (name, dev) in devs {
            if let Err(e) = dev.flush().await {
                tracing::warn!(disk = %name, error = %e, "flush at shutdown failed");
            }
        }
        self.disks_mut().disks.clear();
        self.switches.stop_all().await;
        if let Err(e) = self.store.flush() {
            tracing::warn!(error = %e, "store flush at shutdown failed");
        }
    }
}

/// Options of an apply: the explicit, data-losing operations it may carry out.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Check and describe, change nothing.
    pub dry_run: bool,
    /// LUNs to delete when their sections are gone (`basalt lun delete`).
    pub delete_luns: Vec<String>,
    /// Pools to stop when their sections are gone (`basalt pool export`).
    pub export_pools: Vec<String>,
}

/// Exports must name LUNs that are declared or exist (snapshots); iSCSI's own checks.
fn check_targets(
    desired: &DesiredState,
    typed: &Typed,
    storage: &Storage,
    errors: &mut Vec<ConfigError>,
) {
    let exists =
        |name: &str| typed.luns.iter().any(|l| l.name == name) || storage.find_lun(name).is_some();
    if let Some(cfg) = &typed.nbd {
        let line = desired.sections.nbd.as_ref().and_then(|s| s.line);
        for name in nbd_exports(cfg) {
            if !exists(&name) {
                errors.push(ConfigError::on_line(
                    line,
                    format!("nbd export {name:?}: no LUN of that name"),
                ));
            }
        }
    }
    if let Some(cfg) = &typed.iscsi {
        let line = desired.sections.iscsi.as_ref().and_then(|s| s.line);
        for name in iscsi_units(cfg) {
            if !exists(&name) {
                errors.push(ConfigError::on_line(
                    line,
                    format!("iscsi: LUN {name:?} does not exist"),
                ));
            }
        }
        if let Err(e) = cfg.validate(|_| true) {
            errors.push(ConfigError::on_line(line, format!("iscsi: {e}")));
        }
    }
}

/// Works out what a new disk at `path` is, and whether a file must be created.
fn inspect_new_disk(
    name: &str,
    path: &Path,
    size: Option<ByteSize>,
    block_size: Option<u32>,
) -> Result<(DiskSpec, bool), ApiError> {
    let mut spec = DiskSpec {
        name: name.to_string(),
        path: path.to_path_buf(),
        kind: DiskKind::File,
        size,
        block_size,
        line: None,
    };
    match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_block_device() => {
            if size.is_some() || block_size.is_some() {
                return Err(ApiError::BadRequest(format!(
                    "{} is a block device: it has its own size and block size; do not give them",
                    path.display()
                )));
            }
            spec.kind = DiskKind::Block;
            Ok((spec, false))
        }
        Ok(meta) if meta.is_file() => {
            if let Some(s) = size {
                if s.0 != meta.len() {
                    return Err(ApiError::BadRequest(format!(
                        "{} already exists with {} bytes, not {}; leave out the size to use it as it is",
                        path.display(),
                        meta.len(),
                        s.0
                    )));
                }
            }
            spec.size = Some(ByteSize(meta.len()));
            Ok((spec, false))
        }
        Ok(_) => Err(ApiError::BadRequest(format!(
            "{} is neither a regular file nor a block device",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if size.is_none() {
                return Err(ApiError::BadRequest(format!(
                    "no such file or device: {}; to create a file disk there, give its size",
                    path.display()
                )));
            }
            match path.parent() {
                Some(parent) if parent.is_dir() => Ok((spec, true)),
                _ => Err(ApiError::BadRequest(format!(
                    "cannot create {}: its directory does not exist",
                    path.display()
                ))),
            }
        }
        Err(e) => Err(ApiError::BadRequest(format!("{}: {e}", path.display()))),
    }
}

fn make_file(spec: &DiskSpec) -> Result<(), ApiError> {
    let size = spec.size.map(|s| s.0).unwrap_or(0);
    create_sparse_file(&spec.path, size)
        .map_err(|e| ApiError::BadRequest(format!("cannot create {}: {e}", spec.path.display())))
}

fn grow_file(old: &DiskSpec, new: &DiskSpec) -> Result<(), ApiError> {
    let new_size = new.size.map(|s| s.0).unwrap_or(0);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&new.path)
        .map_err(|e| ApiError::BadRequest(format!("{}: {e}", new.path.display())))?;
    let len = file
        .metadata()
        .map_err(|e| ApiError::BadRequest(format!("{}: {e}", new.path.display())))?
        .len();
    if len < new_size {
        file.set_len(new_size).map_err(|e| {
            ApiError::BadRequest(format!("cannot grow {}: {e}", old.path.display()))
        })?;
    }
    Ok(())
}

fn remove_all(paths: &[PathBuf]) {
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}

/// Checks a plan against the machine: paths exist or can be created, kinds match, and
/// only changes that lose nothing are asked for.
fn check_plan(plan: &Plan) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    for spec in &plan.add_disks {
        let err =
            |msg: String| ConfigError::on_line(spec.line, format!("disk {:?}: {msg}", spec.name));
        match (spec.kind, std::fs::metadata(&spec.path)) {
            (DiskKind::File, Ok(meta)) => {
                if !meta.is_file() {
                    errors.push(err(format!(
                        "{} is not a regular file",
                        spec.path.display()
                    )));
                } else if Some(meta.len()) != spec.size.map(|s| s.0) {
                    errors.push(err(format!(
                        "{} exists with {} bytes, not the declared {}",
                        spec.path.display(),
                        meta.len(),
                        spec.size.unwrap_or_default().0
                    )));
                }
            }
            (DiskKind::File, Err(_)) => {
                if !spec.path.parent().is_some_and(Path::is_dir) {
                    errors.push(err(format!(
                        "cannot create {}: its directory does not exist",
                        spec.path.display()
                    )));
                }
            }
            (DiskKind::Block, _) => {
                if let Err(e) = check_kind(&spec.path, DiskKind::Block) {
                    errors.push(err(e));
                }
            }
        }
    }
    for (old, new) in &plan.change_disks {
        let err =
            |msg: String| ConfigError::on_line(new.line, format!("disk {:?}: {msg}", new.name));
        let grows_only = old.kind == DiskKind::File
            && new.kind == DiskKind::File
            && old.path == new.path
            && old.block_size.unwrap_or(512) == new.block_size.unwrap_or(512)
            && new.size >= old.size;
        if !grows_only {
            errors.push(err(
                "only the size of a file disk can change, and only upward; remove the disk and add a new one instead"
                    .to_string(),
            ));
        }
    }
    errors
}

fn describe(plan: &Plan) -> Vec<String> {
    let mut changes = Vec::new();
    if plan.appliance_changed {
        changes.push("update appliance settings".to_string());
    }
    if plan.api_changed {
        changes.push("update API listeners".to_string());
    }
    for d in &plan.add_disks {
        changes.push(format!(
            "add disk {} ({} {})",
            d.name,
            d.kind,
            d.path.display()
        ));
    }
    for (old, new) in &plan.change_disks {
        changes.push(format!(
            "grow disk {} from {} to {}",
            new.name,
            old.size.unwrap_or_default(),
            new.size.unwrap_or_default()
        ));
    }
    for name in &plan.remove_disks {
        changes.push(format!("remove disk {name} (its file or device is kept)"));
    }
    for key in &plan.add_sections {
        changes.push(format!("add {}", key.replace('/', " ")));
    }
    for key in &plan.change_sections {
        changes.push(format!("update {}", key.replace('/', " ")));
    }
    for key in &plan.remove_sections {
        changes.push(format!("remove {}", key.replace('/', " ")));
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(lun: &str) -> DesiredState {
        DesiredState::from_toml(&format!(
            "version = 1\n[api]\nlisten = [\"127.0.0.1:0\"]\n\
             [[lun]]\nname = \"{lun}\"\npool = \"p0\"\nsize = \"16M\"\n"
        ))
        .unwrap()
    }

    fn luns(store: &Store) -> Vec<String> {
        let d = store.desired_state().unwrap();
        d.sections
            .lun
            .iter()
            .filter_map(|s| s.name().map(str::to_string))
            .collect()
    }

    #[test]
    fn a_failed_rename_leaves_the_lun_named_as_its_pool_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (before, renamed) = (doc("old"), doc("new"));
        store.apply(&before).unwrap();

        // The apply failed after it committed the new name; the pool's rename was
        // undone: the stored configuration goes back to the old name.
        store.apply(&renamed).unwrap();
        assert_eq!(luns(&store), ["new"]);
        settle_failed_rename(&store, "old", "new", Ok(()), &before, &renamed);
        assert_eq!(luns(&store), ["old"]);

        // The apply failed before it committed: nothing to put back, nothing written.
        let generation = store.generation().unwrap();
        settle_failed_rename(&store, "old", "new", Ok(()), &before, &renamed);
        assert_eq!(luns(&store), ["old"]);
        assert_eq!(store.generation().unwrap(), generation);

        // The pool keeps the new name (its undo failed): so does the configuration.
        let undo = Err(basalt_lun::PoolError::Exists("old".into()));
        settle_failed_rename(&store, "old", "new", undo, &before, &renamed);
        assert_eq!(luns(&store), ["new"]);
    }
}
