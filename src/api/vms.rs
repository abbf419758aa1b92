//! `/api/v1/vms`: VMs, one `basalt vmm` process each. Definitions are the VM's own
//! document (`vm.json` in its folder, `basalt_compute::definition`), not part of the
//! appliance's desired state: they live beside their disks.

use super::error::ApiError;
use super::ApiState;
use crate::daemon::vms::{ConsoleChunk, VmInfo};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

/// The VM routes.
pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/vms", get(list).post(create))
        .route("/vms/{name}", get(show).delete(remove))
        .route("/vms/{name}/start", post(start))
        .route("/vms/{name}/stop", post(stop))
        .route("/vms/{name}/kill", post(kill))
        .route("/vms/{name}/console", get(console))
}

/// Every VM with its state.
#[utoipa::path(get, path = "/api/v1/vms", responses((status = 200, body = Vec<VmInfo>)))]
pub async fn list(State(state): State<ApiState>) -> Result<Json<Vec<VmInfo>>, ApiError> {
    Ok(Json(state.vms.list().await?))
}

/// Defines a VM from its definition (JSON, as `vm.json`). An invalid definition is
/// refused with the field named (`vcpus: must be 1 to 64, got 0`).
#[utoipa::path(post, path = "/api/v1/vms", request_body(content = Object,
    content_type = "application/json"), responses((status = 201, body = VmInfo),
    (status = 400, body = super::types::ErrorBody), (status = 409, body = super::types::ErrorBody)))]
pub async fn create(
    State(state): State<ApiState>,
    body: Result<String, axum::extract::rejection::StringRejection>,
) -> Result<(StatusCode, Json<VmInfo>), ApiError> {
    let body = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    Ok((StatusCode::CREATED, Json(state.vms.create(&body).await?)))
}

/// One VM: definition and status (state, runner, pid, restarts, last exit).
#[utoipa::path(get, path = "/api/v1/vms/{name}", params(("name" = String, Path)),
    responses((status = 200, body = VmInfo), (status = 404, body = super::types::ErrorBody)))]
pub async fn show(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<VmInfo>, ApiError> {
    Ok(Json(state.vms.get(&name).await?))
}

/// Starts a VM (returns once its VMM process runs).
#[utoipa::path(post, path = "/api/v1/vms/{name}/start", params(("name" = String, Path)),
    responses((status = 200, body = VmInfo), (status = 404, body = super::types::ErrorBody),
    (status = 409, body = super::types::ErrorBody)))]
pub async fn start(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<VmInfo>, ApiError> {
    Ok(Json(state.vms.start_vm(&name).await?))
}

/// Stops a VM: the guest is asked to power off, the VMM killed after a timeout.
/// Returns the final status with the exit record.
#[utoipa::path(post, path = "/api/v1/vms/{name}/stop", params(("name" = String, Path)),
    responses((status = 200, body = VmInfo), (status = 409, body = super::types::ErrorBody)))]
pub async fn stop(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<VmInfo>, ApiError> {
    Ok(Json(state.vms.stop_vm(&name).await?))
}

/// Kills a VM's VMM process at once (SIGKILL).
#[utoipa::path(post, path = "/api/v1/vms/{name}/kill", params(("name" = String, Path)),
    responses((status = 200, body = VmInfo), (status = 409, body = super::types::ErrorBody)))]
pub async fn kill(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<VmInfo>, ApiError> {
    Ok(Json(state.vms.kill_vm(&name).await?))
}

/// Deletes a VM that is not running, with its folder (file disks included).
#[utoipa::path(delete, path = "/api/v1/vms/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = super::types::ErrorBody),
    (status = 409, body = super::types::ErrorBody)))]
pub async fn remove(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.vms.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Where to read the console log from.
#[derive(Deserialize, utoipa::IntoParams)]
pub struct ConsoleParams {
    /// Byte offset in the log: `next_offset` of the previous answer to follow it.
    #[serde(default)]
    offset: u64,
}

/// The VM's serial console as logged (`console.log`), from `offset`, at most 1 MiB.
#[utoipa::path(get, path = "/api/v1/vms/{name}/console",
    params(("name" = String, Path), ConsoleParams),
    responses((status = 200, body = ConsoleChunk), (status = 404, body = super::types::ErrorBody)))]
pub async fn console(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    params: Result<Query<ConsoleParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ConsoleChunk>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    Ok(Json(state.vms.console(&name, params.offset).await?))
}
