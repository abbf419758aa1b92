//! The REST API: JSON under `/api/v1`, token-authenticated, described by an OpenAPI
//! document at `/api/v1/openapi.json`; plus `/healthz` and `/metrics`, which need no
//! token so that load balancers and Prometheus can reach them.

pub mod error;
pub mod locks;
pub mod storage;
pub mod switches;
pub mod targets;
pub mod types;
pub mod vms;

use crate::daemon::appliance::Appliance;
use crate::daemon::security::token_matches;
use crate::metrics::Metrics;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use error::ApiError;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Instant;
use types::{AddDisk, ApplyResult, DiskInfo, ErrorBody, Status};
use utoipa::OpenApi;

/// Shared state of every handler.
#[derive(Clone)]
pub struct ApiState {
    /// The appliance.
    pub appliance: Arc<Appliance>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// The admin token.
    pub token: Arc<String>,
    /// VMs.
    pub vms: Arc<crate::daemon::vms::Vms>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Basalt appliance API", description = "Manage a Basalt storage appliance. \
        Every call needs `Authorization: Bearer <token>`; the token is in `<data dir>/admin.token`."),
    paths(status, list_disks, add_disk, get_disk, remove_disk, export_config, apply_config,
        switches::list, switches::show, switches::put_definition, switches::remove,
        switches::add_portgroup, switches::remove_portgroup, switches::add_uplink,
        switches::remove_uplink, switches::add_port, switches::remove_port,
        storage::list_pools, storage::get_pool, storage::create_pool, storage::import_pools,
        storage::export_pool, storage::scrub_pool, storage::check_pool, storage::list_luns,
        storage::get_lun, storage::create_lun, storage::resize_lun, storage::rename_lun, storage::delete_lun,
        storage::snapshot_lun, storage::clone_lun, storage::fail_disk, storage::replace_disk,
        storage::spare_disk, targets::nbd_show, targets::nbd_settings, targets::nbd_export,
        targets::nbd_unexport, targets::iscsi_show, targets::iscsi_create, targets::iscsi_delete,
        targets::iscsi_map, targets::iscsi_unmap, targets::iscsi_acl, targets::iscsi_acl_remove,
        targets::iscsi_portal, targets::iscsi_portal_remove,
        locks::list_lockspaces, locks::get_lockspace, locks::lockspace_locks, locks::list_locks,
        locks::format_lockspace,
        vms::list, vms::create, vms::show, vms::start, vms::stop, vms::kill, vms::remove,
        vms::console),
    components(schemas(Status, DiskInfo, AddDisk, ApplyResult, ErrorBody,
        crate::daemon::switches::SwitchInfo, crate::daemon::storage::PoolInfo,
        crate::daemon::storage::LunInfo, storage::CreatePool, storage::ImportPools,
        storage::ScrubRequest, storage::CheckRequest, storage::CreateLun, storage::ResizeLun,
        storage::NewName, storage::ReplaceDisk, storage::SpareDisk, targets::NbdInfo,
        targets::NbdSettings, targets::NbdExport, targets::IscsiInfo,
        targets::CreateIscsiTarget, targets::MapLun, targets::AclRequest,
        targets::PortalRequest,
        crate::daemon::lockspaces::LockspaceInfo, crate::daemon::lockspaces::SlotInfo,
        crate::daemon::lockspaces::HeldLock, crate::daemon::lockspaces::TakeoverInfo,
        crate::daemon::lockspaces::LockEntry, crate::daemon::lockspaces::LockHolder,
        crate::daemon::vms::VmInfo, crate::daemon::vms::ConsoleChunk)),
    modifiers(&BearerAuth),
    security(("token" = []))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// Builds the router.
pub fn router(state: ApiState) -> Router {
    let v1 = Router::new()
        .route("/status", get(status))
        .route("/disks", get(list_disks).post(add_disk))
        .route("/disks/{name}", get(get_disk).delete(remove_disk))
        .route("/config", get(export_config).put(apply_config))
        .route("/openapi.json", get(openapi_json))
        .merge(switches::routes())
        .merge(storage::routes())
        .merge(targets::routes())
        .merge(locks::routes())
        .merge(vms::routes())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .nest("/api/v1", v1)
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

async fn require_token(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(t) if token_matches(t.as_bytes(), state.token.as_bytes()) => next.run(req).await,
        _ => {
            drain(req.into_body()).await;
            ApiError::Unauthorized.into_response()
        }
    }
}

/// Reads and drops a request body (bounded) before an early error answer. Over HTTP/2,
/// answering with the body unread makes hyper reset the stream, and some clients (curl
/// 7.88) then report a framing error instead of the answer.
async fn drain(body: axum::body::Body) {
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        axum::body::to_bytes(body, 1 << 20),
    )
    .await;
}

async fn count_requests(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    // The route template, not the raw path, keeps the label set bounded.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let response = next.run(req).await;
    state.metrics.observe_request(
        method.as_str(),
        &route,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let targets = state.appliance.targets();
    let inputs = crate::metrics::Inputs {
        disks: state.appliance.disk_stats(),
        switches: state.appliance.switches().counters(),
        storage: state.appliance.storage().metrics(),
        nbd: targets.nbd_status().await.map(|(_, m)| m),
        iscsi: targets.iscsi_status().await.map(|(_, m)| m),
        lockspaces: state.appliance.lockspaces().metrics(),
        vms: state.vms.metrics().await,
    };
    let body = state.metrics.render(&inputs);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn not_found(req: Request) -> ApiError {
    drain(req.into_body()).await;
    ApiError::NotFound("no such API endpoint".to_string())
}

async fn openapi_json() -> Response {
    match openapi().to_pretty_json() {
        Ok(doc) => ([(header::CONTENT_TYPE, "application/json")], doc).into_response(),
        Err(e) => ApiError::Internal(e.to_string()).into_response(),
    }
}

/// Appliance status.
#[utoipa::path(get, path = "/api/v1/status", responses(
    (status = 200, body = Status), (status = 401, body = ErrorBody)))]
async fn status(State(state): State<ApiState>) -> Result<Json<Status>, ApiError> {
    Ok(Json(state.appliance.status().await?))
}

/// Every disk with its size, serial and state.
#[utoipa::path(get, path = "/api/v1/disks", responses(
    (status = 200, body = Vec<DiskInfo>), (status = 401, body = ErrorBody)))]
async fn list_disks(State(state): State<ApiState>) -> Json<Vec<DiskInfo>> {
    Json(state.appliance.list_disks())
}

/// Adds a disk: an existing file or block device, or a new sparse file of a given size.
#[utoipa::path(post, path = "/api/v1/disks", request_body = AddDisk, responses(
    (status = 201, body = DiskInfo), (status = 400, body = ErrorBody),
    (status = 409, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn add_disk(
    State(state): State<ApiState>,
    body: Result<Json<AddDisk>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<DiskInfo>), ApiError> {
    let Json(req) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let info = state.appliance.add_disk(req).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// One disk.
#[utoipa::path(get, path = "/api/v1/disks/{name}", params(("name" = String, Path)), responses(
    (status = 200, body = DiskInfo), (status = 404, body = ErrorBody)))]
async fn get_disk(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<DiskInfo>, ApiError> {
    Ok(Json(state.appliance.disk(&name)?))
}

/// Removes a disk from the appliance. Its file or device is left untouched.
#[utoipa::path(delete, path = "/api/v1/disks/{name}", params(("name" = String, Path)), responses(
    (status = 204), (status = 404, body = ErrorBody)))]
async fn remove_disk(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.appliance.remove_disk(name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The whole desired state as a TOML document.
#[utoipa::path(get, path = "/api/v1/config", responses(
    (status = 200, content_type = "application/toml", body = String)))]
async fn export_config(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let text = state.appliance.export_config().await?;
    Ok(([(header::CONTENT_TYPE, "application/toml")], text).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
struct ApplyParams {
    /// Check and report the changes without making them.
    #[serde(default)]
    dry_run: bool,
}

/// Applies a whole desired state (TOML). A document with any problem is refused with
/// every problem and its line, and nothing changes.
#[utoipa::path(put, path = "/api/v1/config", params(ApplyParams),
    request_body(content = String, content_type = "application/toml"), responses(
    (status = 200, body = ApplyResult), (status = 422, body = ErrorBody)))]
async fn apply_config(
    State(state): State<ApiState>,
    params: Result<Query<ApplyParams>, axum::extract::rejection::QueryRejection>,
    body: Result<String, axum::extract::rejection::StringRejection>,
) -> Result<Json<ApplyResult>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let body = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    Ok(Json(
        state.appliance.apply_config(body, params.dry_run).await?,
    ))
}
