//! `/api/v1/pools`, `/api/v1/luns` and the disk operations that act on pools (`fail`,
//! `replace`, `spare`). Declarative changes edit the desired state and go through the
//! checked apply; run-time operations (snapshots, scrubs, failing a disk) act directly.

use super::error::ApiError;
use super::types::ApplyResult;
use super::ApiState;
use crate::daemon::appliance::ApplyOptions;
use crate::daemon::sections::{
    put_named, LockDevice, LunSpec, PoolSpec, ProvisioningSpec, RaidLevel, Typed,
};
use crate::daemon::storage::{lun_info, pool_error, LunInfo, PoolInfo};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use basalt_config::{ByteSize, DesiredState};
use serde::{Deserialize, Serialize};

/// The storage routes.
pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/pools", get(list_pools).post(create_pool))
        .route("/pools/import", post(import_pools))
        .route("/pools/{name}", get(get_pool))
        .route("/pools/{name}/export", post(export_pool))
        .route("/pools/{name}/scrub", post(scrub_pool))
        .route("/pools/{name}/check", post(check_pool))
        .route("/luns", get(list_luns).post(create_lun))
        .route("/luns/{name}", get(get_lun).delete(delete_lun))
        .route("/luns/{name}/resize", post(resize_lun))
        .route("/luns/{name}/rename", post(rename_lun))
        .route("/luns/{name}/snapshot", post(snapshot_lun))
        .route("/luns/{name}/clone", post(clone_lun))
        .route("/disks/{name}/fail", post(fail_disk))
        .route("/disks/{name}/replace", post(replace_disk))
        .route("/disks/{name}/spare", post(spare_disk))
}

fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError::BadRequest(e.to_string())
}

fn typed(desired: &DesiredState) -> Result<Typed, ApiError> {
    Typed::parse(desired).map_err(ApiError::InvalidConfig)
}

/// `POST /pools`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePool {
    /// Pool name.
    pub name: String,
    /// RAID level: 0, 1, 10, 5 or 6.
    pub raid: u32,
    /// Chunk size, e.g. "64K".
    #[serde(default)]
    pub chunk: Option<String>,
    /// Member disks.
    pub disks: Vec<String>,
    /// Hot spares.
    #[serde(default)]
    pub spares: Vec<String>,
    /// Journal against the write hole (default on for redundant levels).
    #[serde(default)]
    pub journal: Option<bool>,
}

/// Every pool: array state, members, jobs, space.
#[utoipa::path(get, path = "/api/v1/pools", responses((status = 200, body = Vec<PoolInfo>)))]
pub async fn list_pools(State(state): State<ApiState>) -> Json<Vec<PoolInfo>> {
    Json(state.appliance.storage().list())
}

/// One pool.
#[utoipa::path(get, path = "/api/v1/pools/{name}", params(("name" = String, Path)),
    responses((status = 200, body = PoolInfo), (status = 404)))]
pub async fn get_pool(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<PoolInfo>, ApiError> {
    Ok(Json(state.appliance.storage().get(&name)?))
}

/// Creates a pool: a RAID array on blank disks with a thin pool on it (or brings up the
/// pool those disks already hold, if it has this name).
#[utoipa::path(post, path = "/api/v1/pools", request_body = CreatePool,
    responses((status = 200, body = ApplyResult), (status = 422)))]
pub async fn create_pool(
    State(state): State<ApiState>,
    Json(req): Json<CreatePool>,
) -> Result<Json<ApplyResult>, ApiError> {
    let raid = RaidLevel::from_number(req.raid).ok_or_else(|| {
        bad(format!(
            "RAID level {} is not one of 0, 1, 10, 5, 6",
            req.raid
        ))
    })?;
    let chunk = req
        .chunk
        .as_deref()
        .map(str::parse::<ByteSize>)
        .transpose()
        .map_err(bad)?;
    let spec = PoolSpec {
        name: req.name.clone(),
        raid,
        chunk,
        disks: req.disks,
        spares: req.spares,
        journal: req.journal,
        rate_limit: None,
        warn_pct: None,
        critical_pct: None,
    };
    let result = state
        .appliance
        .update(move |desired| {
            if desired
                .sections
                .pool
                .iter()
                .any(|s| s.name() == Some(spec.name.as_str()))
            {
                return Err(ApiError::Conflict(format!(
                    "a pool named {:?} exists",
                    spec.name
                )));
            }
            put_named(&mut desired.sections, "pool", &spec.name, &spec).map_err(ApiError::Internal)
        })
        .await?;
    Ok(Json(result))
}

/// `POST /pools/import`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImportPools {
    /// Import only the pool of this name (default: every pool found).
    #[serde(default)]
    pub name: Option<String>,
}

/// Finds pools on declared disks that belong to no pool yet (disks moved from another
/// appliance) and brings them up, with their LUNs.
#[utoipa::path(post, path = "/api/v1/pools/import", request_body = ImportPools,
    responses((status = 200, body = ApplyResult)))]
pub async fn import_pools(
    State(state): State<ApiState>,
    Json(req): Json<ImportPools>,
) -> Result<Json<ApplyResult>, ApiError> {
    let desired = state.appliance.desired().await?;
    let used: Vec<String> = typed(&desired)?
        .pools
        .iter()
        .flat_map(|p| p.all_disks().cloned().collect::<Vec<_>>())
        .collect();
    let found = state.appliance.find_foreign_pools(&used).await;
    let wanted: Vec<PoolSpec> = found
        .into_iter()
        .filter(|p| req.name.as_ref().is_none_or(|n| n == &p.name))
        .collect();
    if wanted.is_empty() {
        return Err(ApiError::NotFound(match req.name {
            Some(n) => format!("no pool named {n:?} on the appliance's free disks"),
            None => "no pool on the appliance's free disks".to_string(),
        }));
    }
    let specs = wanted.clone();
    let mut result = state
        .appliance
        .update(move |desired| {
            for spec in &specs {
                if desired
                    .sections
                    .pool
                    .iter()
                    .any(|s| s.name() == Some(spec.name.as_str()))
                {
                    return Err(ApiError::Conflict(format!(
                        "a pool named {:?} already exists here; export or rename it first",
                        spec.name
                    )));
                }
                put_named(&mut desired.sections, "pool", &spec.name, spec)
                    .map_err(ApiError::Internal)?;
            }
            Ok(())
        })
        .await?;
    // Now that the pools are up, declare their LUNs (snapshots stay run-time objects).
    let storage = state.appliance.storage();
    let luns: Vec<LunSpec> = storage
        .volumes()
        .into_iter()
        .filter(|(pool, v)| wanted.iter().any(|p| &p.name == pool) && !v.read_only)
        .map(|(pool, v)| LunSpec {
            name: v.name.clone(),
            pool,
            size: ByteSize(v.size_bytes),
            provisioning: ProvisioningSpec::from_provisioning(v.provisioning),
            block_size: Some(v.block_size),
        })
        .collect();
    if !luns.is_empty() {
        let more = state
            .appliance
            .update(move |desired| {
                for l in &luns {
                    put_named(&mut desired.sections, "lun", &l.name, l)
                        .map_err(ApiError::Internal)?;
                }
                Ok(())
            })
            .await?;
        result.changes.extend(more.changes);
        result.generation = more.generation;
        result.warnings.extend(more.warnings);
    }
    // A pool imported again has new LUN handles: a VM still exporting the old ones (the
    // 5 s janitor would catch it too) gets the new ones now.
    state.vms.refresh_exports().await;
    Ok(Json(result))
}

/// Stops a pool cleanly and forgets it; its disks keep the pool, ready for `import` here
/// or on another appliance. Its LUNs must not be exported by a target.
#[utoipa::path(post, path = "/api/v1/pools/{name}/export", params(("name" = String, Path)),
    responses((status = 200, body = ApplyResult), (status = 409)))]
pub async fn export_pool(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<ApplyResult>, ApiError> {
    let opts = ApplyOptions {
        export_pools: vec![name.clone()],
        ..ApplyOptions::default()
    };
    let result = state
        .appliance
        .update_with(opts, move |desired| {
            let t = typed(desired)?;
            if !t.pools.iter().any(|p| p.name == name) {
                return Err(ApiError::NotFound(format!("no pool named {name:?}")));
            }
            let luns: Vec<String> = t
                .luns
                .iter()
                .filter(|l| l.pool == name)
                .map(|l| l.name.clone())
                .collect();
            if let Some(l) = luns.iter().find(|l| exported(&t, l)) {
                return Err(ApiError::Conflict(format!(
                    "LUN {l:?} of pool {name:?} is exported by a target; remove that export first"
                )));
            }
            // Under the mutation lock, which VM starts take around their LUN lookup.
            let vms = state.vms.active_on_pool(&name)?;
            if !vms.is_empty() {
                let vms: Vec<String> = vms.iter().map(|v| format!("VM {v:?}")).collect();
                return Err(ApiError::Conflict(format!(
                    "pool {name:?} has a LUN in use by {}, which is running; stop it first",
                    vms.join(", ")
                )));
            }
            desired
                .sections
                .pool
                .retain(|s| s.name() != Some(name.as_str()));
            desired
                .sections
                .lun
                .retain(|s| !s.name().is_some_and(|n| luns.iter().any(|l| l == n)));
            Ok(())
        })
        .await?;
    Ok(Json(result))
}

/// What uses LUN `name` (of pool `pool`): target exports, lockspaces, VM disks. A LUN in
/// use is neither deleted nor renamed. Asked with the appliance's mutation lock held
/// (VM starts take it around their LUN lookup), hence synchronous.
fn lun_users(state: &ApiState, t: &Typed, pool: &str, name: &str) -> Result<Vec<String>, ApiError> {
    let mut users = Vec::new();
    if exported(t, name) {
        users.push("a target export".to_string());
    }
    for ls in &t.lockspaces {
        if matches!(ls.device(), Ok(LockDevice::Lun { pool: p, lun }) if p == pool && lun == name) {
            users.push(format!("lockspace {:?}", ls.name));
        }
    }
    for vm in state.vms.using_lun(pool, name)? {
        users.push(format!("VM {vm:?}"));
    }
    Ok(users)
}

fn in_use(name: &str, users: &[String]) -> ApiError {
    ApiError::Conflict(format!(
        "LUN {name:?} is in use by {}; remove that use first",
        users.join(", ")
    ))
}

fn exported(t: &Typed, lun: &str) -> bool {
    t.nbd.as_ref().is_some_and(|c| c.exports.contains_key(lun))
        || t.iscsi.as_ref().is_some_and(|c| {
            c.targets
                .iter()
                .any(|tg| tg.luns.iter().any(|m| m.name == lun))
        })
}

/// `POST /pools/{name}/scrub`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScrubRequest {
    /// Repair what is found (default: report only).
    #[serde(default)]
    pub repair: bool,
}

/// Starts a scrub of the pool's array (a job: see the pool's `jobs`).
#[utoipa::path(post, path = "/api/v1/pools/{name}/scrub", params(("name" = String, Path)),
    request_body = ScrubRequest, responses((status = 202), (status = 409)))]
pub async fn scrub_pool(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Json(req): Json<ScrubRequest>,
) -> Result<StatusCode, ApiError> {
    let array = state
        .appliance
        .storage()
        .array(&name)
        .ok_or_else(|| ApiError::NotFound(format!("no running pool named {name:?}")))?;
    array
        .start_scrub(req.repair)
        .await
        .map_err(|e| ApiError::Conflict(e.to_string()))?;
    Ok(StatusCode::ACCEPTED)
}

/// `POST /pools/{name}/check`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckRequest {
    /// Repair what can be repaired.
    #[serde(default)]
    pub repair: bool,
}

/// Checks the pool's metadata offline (the pool's LUNs are unreachable meanwhile) and
/// reports, or repairs, what is wrong.
#[utoipa::path(post, path = "/api/v1/pools/{name}/check", params(("name" = String, Path)),
    request_body = CheckRequest, responses((status = 200, body = Object)))]
pub async fn check_pool(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Json(req): Json<CheckRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let report = state.appliance.check_pool(&name, req.repair).await;
    // The check exported and re-imported the pool: the VM NBD server's handles of its
    // LUNs are dead; serve the new ones (the VMMs reconnect and replay).
    state.vms.refresh_exports().await;
    let report = report?;
    serde_json::to_value(report)
        .map(Json)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// Every LUN, clone and snapshot of every running pool.
#[utoipa::path(get, path = "/api/v1/luns", responses((status = 200, body = Vec<LunInfo>)))]
pub async fn list_luns(State(state): State<ApiState>) -> Result<Json<Vec<LunInfo>>, ApiError> {
    let desired = state.appliance.desired().await?;
    let declared = |n: &str| desired.sections.lun.iter().any(|s| s.name() == Some(n));
    let mut luns: Vec<LunInfo> = state
        .appliance
        .storage()
        .volumes()
        .iter()
        .map(|(pool, v)| lun_info(pool, v, declared(&v.name)))
        .collect();
    luns.sort_by(|a, b| (&a.pool, &a.name).cmp(&(&b.pool, &b.name)));
    Ok(Json(luns))
}

/// One LUN or snapshot.
#[utoipa::path(get, path = "/api/v1/luns/{name}", params(("name" = String, Path)),
    responses((status = 200, body = LunInfo), (status = 404)))]
pub async fn get_lun(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<LunInfo>, ApiError> {
    list_luns(State(state))
        .await?
        .0
        .into_iter()
        .find(|l| l.name == name)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no LUN named {name:?}")))
}

/// `POST /luns`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateLun {
    /// LUN name.
    pub name: String,
    /// Pool.
    pub pool: String,
    /// Size, e.g. "100G".
    pub size: String,
    /// thin (default), thick or thick-eager.
    #[serde(default)]
    pub provisioning: Option<String>,
    /// 4096 (default) or 512.
    #[serde(default)]
    pub block_size: Option<u32>,
}

/// Creates a LUN.
#[utoipa::path(post, path = "/api/v1/luns", request_body = CreateLun,
    responses((status = 200, body = ApplyResult), (status = 422)))]
pub async fn create_lun(
    State(state): State<ApiState>,
    Json(req): Json<CreateLun>,
) -> Result<Json<ApplyResult>, ApiError> {
    let provisioning = match req.provisioning.as_deref() {
        None | Some("thin") => ProvisioningSpec::Thin,
        Some("thick") => ProvisioningSpec::Thick,
        Some("thick-eager") => ProvisioningSpec::ThickEager,
        Some(other) => {
            return Err(bad(format!(
                "provisioning {other:?} is not thin, thick or thick-eager"
            )))
        }
    };
    let spec = LunSpec {
        name: req.name,
        pool: req.pool,
        size: req.size.parse().map_err(bad)?,
        provisioning,
        block_size: req.block_size,
    };
    basalt_config::check_name(&spec.name).map_err(bad)?;
    let result = state
        .appliance
        .update(move |desired| {
            if desired
                .sections
                .lun
                .iter()
                .any(|s| s.name() == Some(spec.name.as_str()))
            {
                return Err(ApiError::Conflict(format!(
                    "a LUN named {:?} exists",
                    spec.name
                )));
            }
            put_named(&mut desired.sections, "lun", &spec.name, &spec).map_err(ApiError::Internal)
        })
        .await?;
    Ok(Json(result))
}

/// `POST /luns/{name}/resize`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResizeLun {
    /// New size, e.g. "200G".
    pub size: String,
    /// Allow shrinking (the data past the new end is lost).
    #[serde(default)]
    pub force: bool,
}

/// Grows a LUN, or shrinks it with `force`.
#[utoipa::path(post, path = "/api/v1/luns/{name}/resize", params(("name" = String, Path)),
    request_body = ResizeLun, responses((status = 200, body = ApplyResult), (status = 409)))]
pub async fn resize_lun(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Json(req): Json<ResizeLun>,
) -> Result<Json<ApplyResult>, ApiError> {
    let size: ByteSize = req.size.parse().map_err(bad)?;
    let storage = state.appliance.storage();
    let (_, pool) = storage
        .find_lun(&name)
        .ok_or_else(|| ApiError::NotFound(format!("no LUN named {name:?}")))?;
    let current = pool.info(&name).map_err(pool_error)?;
    if size.0 < current.size_bytes {
        if !req.force {
            return Err(ApiError::Conflict(format!(
                "shrinking {name:?} from {} to {size} loses the data past the new end; add force",
                ByteSize(current.size_bytes)
            )));
        }
        let n = name.clone();
        state
            .appliance
            .exclusive(|| async move { pool.resize(&n, size.0, true).await })
            .await
            .map_err(pool_error)?;
    }
    let result = state
        .appliance
        .update(move |desired| {
            let t = typed(desired)?;
            let mut spec = t
                .luns
                .into_iter()
                .find(|l| l.name == name)
                .ok_or_else(|| ApiError::NotFound(format!("LUN {name:?} is not declared")))?;
            spec.size = size;
            put_named(&mut desired.sections, "lun", &name, &spec).map_err(ApiError::Internal)
        })
        .await?;
    Ok(Json(result))
}

/// Deletes a LUN (its space returns to the pool) or a snapshot. Refused while a target
/// exports it.
#[utoipa::path(delete, path = "/api/v1/luns/{name}", params(("name" = String, Path)),
    responses((status = 200, body = ApplyResult), (status = 409)))]
pub async fn delete_lun(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<ApplyResult>, ApiError> {
    let desired = state.appliance.desired().await?;
    let t = typed(&desired)?;
    let pool = state.appliance.storage().find_lun(&name).map(|(p, _)| p);
    let pool = pool
        .or_else(|| {
            t.luns
                .iter()
                .find(|l| l.name == name)
                .map(|l| l.pool.clone())
        })
        .unwrap_or_default();
    if !t.luns.iter().any(|l| l.name == name) {
        // A snapshot, or a volume nobody declared: a run-time object.
        let (_, handle) = state
            .appliance
            .storage()
            .find_lun(&name)
            .ok_or_else(|| ApiError::NotFound(format!("no LUN named {name:?}")))?;
        let (n, st) = (name.clone(), state.clone());
        state
            .appliance
            .exclusive(|| async move {
                // The users under the lock: no VM start slips in between.
                let t = typed(&st.appliance.desired().await?)?;
                let users = lun_users(&st, &t, &pool, &n)?;
                if !users.is_empty() {
                    return Err(in_use(&n, &users));
                }
                handle.delete(&n).await.map_err(pool_error)
            })
            .await?;
        return Ok(Json(ApplyResult {
            changes: vec![format!("delete {name}")],
            ..ApplyResult::default()
        }));
    }
    let opts = ApplyOptions {
        delete_luns: vec![name.clone()],
        ..ApplyOptions::default()
    };
    let result = state
        .appliance
        .update_with(opts, |desired| {
            // The users under the mutation lock: no VM start slips in between.
            let t = typed(desired)?;
            let users = lun_users(&state, &t, &pool, &name)?;
            if !users.is_empty() {
                return Err(in_use(&name, &users));
            }
            desired
                .sections
                .lun
                .retain(|s| s.name() != Some(name.as_str()));
            Ok(())
        })
        .await?;
    Ok(Json(result))
}

/// Renames a LUN, in its pool and in the configuration. Refused while a target export,
/// a lockspace or a VM uses it (they name it).
#[utoipa::path(post, path = "/api/v1/luns/{name}/rename", params(("name" = String, Path)),
    request_body = NewName, responses((status = 200, body = ApplyResult), (status = 404), (status = 409)))]
pub async fn rename_lun(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Json(req): Json<NewName>,
) -> Result<Json<ApplyResult>, ApiError> {
    basalt_config::check_name(&req.name).map_err(bad)?;
    let result = state
        .appliance
        .rename_lun(&name, &req.name, |t, pool| {
            let users = lun_users(&state, t, pool, &name)?;
            if users.is_empty() {
                Ok(())
            } else {
                Err(in_use(&name, &users))
            }
        })
        .await?;
    Ok(Json(result))
}

/// `POST /luns/{name}/snapshot` and `/clone`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewName {
    /// Name of the snapshot or clone.
    pub name: String,
}

/// Takes a read-only point-in-time snapshot of a LUN.
#[utoipa::path(post, path = "/api/v1/luns/{name}/snapshot", params(("name" = String, Path)),
    request_body = NewName, responses((status = 201, body = LunInfo), (status = 409)))]
pub async fn snapshot_lun(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Json(req): Json<NewName>,
) -> Result<(StatusCode, Json<LunInfo>), ApiError> {
    basalt_config::check_name(&req.name).map_err(bad)?;
    let storage = state.appliance.storage();
    let (pool_name, pool) = storage
        .find_lun(&name)
        .ok_or_else(|| ApiError::NotFound(format!("no LUN named {name:?}")))?;
    if storage.find_lun(&req.name).is_some() {
        return Err(ApiError::Conflict(format!(
            "a volume named {:?} exists",
            req.name
        )));
    }
    let snap = req.name.clone();
    let info = state
        .appliance
        .exclusive(|| async move { pool.snapshot(&name, &snap).await })
        .await
        .map_err(pool_error)?;
    Ok((
        StatusCode::CREATED,
        Json(lun_info(&pool_name, &info, false)),
    ))
}

/// Clones a LUN or snapshot into a new writable LUN sharing its blocks.
#[utoipa::path(post, path = "/api/v1/luns/{name}/clone", params(("name" = String, Path)),
    request_body = NewName, responses((status = 200, body = ApplyResult), (status = 409)))]
pub async fn clone_lun(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Json(req): Json<NewName>,
) -> Result<Json<ApplyResult>, ApiError> {
    basalt_config::check_name(&req.name).map_err(bad)?;
    let storage = state.appliance.storage();
    let (pool_name, pool) = storage
        .find_lun(&name)
        .ok_or_else(|| ApiError::NotFound(format!("no LUN named {name:?}")))?;
    if storage.find_lun(&req.name).is_some() {
        return Err(ApiError::Conflict(format!(
            "a volume named {:?} exists",
            req.name
        )));
    }
    let new = req.name.clone();
    let info = state
        .appliance
        .exclusive(|| async move { pool.clone_lun(&name, &new).await })
        .await
        .map_err(pool_error)?;
    let spec = LunSpec {
        name: info.name.clone(),
        pool: pool_name,
        size: ByteSize(info.size_bytes),
        provisioning: ProvisioningSpec::Thin,
        block_size: Some(info.block_size),
    };
    let result = state
        .appliance
        .update(move |desired| {
            put_named(&mut desired.sections, "lun", &spec.name, &spec).map_err(ApiError::Internal)
        })
        .await?;
    Ok(Json(result))
}

/// Marks a pool member faulty (the array goes on from redundancy; a spare takes over).
#[utoipa::path(post, path = "/api/v1/disks/{name}/fail", params(("name" = String, Path)),
    responses((status = 204), (status = 409)))]
pub async fn fail_disk(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let (_, array, role) = state
        .appliance
        .storage()
        .member(&name)
        .ok_or_else(|| ApiError::NotFound(format!("disk {name:?} is in no running pool")))?;
    let role = role.ok_or_else(|| {
        ApiError::Conflict(format!("disk {name:?} is a spare, not an active member"))
    })?;
    array
        .fail_member(role)
        .await
        .map_err(|e| ApiError::Conflict(e.to_string()))?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /disks/{name}/replace`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplaceDisk {
    /// The disk that takes its place.
    pub with: String,
}

/// Replaces a pool member with another disk (rebuilt onto it as a job).
#[utoipa::path(post, path = "/api/v1/disks/{name}/replace", params(("name" = String, Path)),
    request_body = ReplaceDisk, responses((status = 200, body = ApplyResult), (status = 409)))]
pub async fn replace_disk(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Json(req): Json<ReplaceDisk>,
) -> Result<Json<ApplyResult>, ApiError> {
    let result = state
        .appliance
        .update(move |desired| {
            let t = typed(desired)?;
            let mut pool = t
                .pools
                .into_iter()
                .find(|p| p.all_disks().any(|d| d == &name))
                .ok_or_else(|| ApiError::NotFound(format!("disk {name:?} is in no pool")))?;
            for d in pool.disks.iter_mut().chain(pool.spares.iter_mut()) {
                if d == &name {
                    d.clone_from(&req.with);
                }
            }
            put_named(&mut desired.sections, "pool", &pool.name.clone(), &pool)
                .map_err(ApiError::Internal)
        })
        .await?;
    Ok(Json(result))
}

/// `POST /disks/{name}/spare`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SpareDisk {
    /// The pool the disk becomes a hot spare of.
    pub pool: String,
}

/// Makes a disk a hot spare of a pool.
#[utoipa::path(post, path = "/api/v1/disks/{name}/spare", params(("name" = String, Path)),
    request_body = SpareDisk, responses((status = 200, body = ApplyResult), (status = 409)))]
pub async fn spare_disk(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Json(req): Json<SpareDisk>,
) -> Result<Json<ApplyResult>, ApiError> {
    let result = state
        .appliance
        .update(move |desired| {
            let t = typed(desired)?;
            let mut pool = t
                .pools
                .into_iter()
                .find(|p| p.name == req.pool)
                .ok_or_else(|| ApiError::NotFound(format!("no pool named {:?}", req.pool)))?;
            pool.spares.push(name);
            put_named(&mut desired.sections, "pool", &req.pool, &pool).map_err(ApiError::Internal)
        })
        .await?;
    Ok(Json(result))
}
