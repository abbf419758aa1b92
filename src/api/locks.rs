//! `/api/v1/lockspaces` and `/api/v1/locks`: the cluster lockspaces this host joined,
//! their hosts and slots, and who holds which lock. Lockspaces are declared in the
//! desired state (`[[lockspace]]`); formatting an empty device is the one explicit
//! action here.

use super::error::ApiError;
use super::ApiState;
use crate::daemon::lockspaces::{LockEntry, LockspaceInfo};
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};

/// The lock routes.
pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/lockspaces", get(list_lockspaces))
        .route("/lockspaces/{name}", get(get_lockspace))
        .route("/lockspaces/{name}/locks", get(lockspace_locks))
        .route("/lockspaces/{name}/format", post(format_lockspace))
        .route("/locks", get(list_locks))
}

/// Every declared lockspace: state, this host's slot and generation, the slots with
/// their state (live, dead, recovering, free) and when they last changed, takeovers.
#[utoipa::path(get, path = "/api/v1/lockspaces",
    responses((status = 200, body = Vec<LockspaceInfo>)))]
pub async fn list_lockspaces(State(state): State<ApiState>) -> Json<Vec<LockspaceInfo>> {
    Json(state.appliance.lockspaces().list())
}

/// One lockspace.
#[utoipa::path(get, path = "/api/v1/lockspaces/{name}", params(("name" = String, Path)),
    responses((status = 200, body = LockspaceInfo), (status = 404)))]
pub async fn get_lockspace(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<LockspaceInfo>, ApiError> {
    Ok(Json(state.appliance.lockspaces().info(&name)?))
}

/// The lock records of one lockspace, read from its device: resource, mode, holders
/// (host name, slot, generation).
#[utoipa::path(get, path = "/api/v1/lockspaces/{name}/locks", params(("name" = String, Path)),
    responses((status = 200, body = Vec<LockEntry>), (status = 404), (status = 409)))]
pub async fn lockspace_locks(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<LockEntry>>, ApiError> {
    Ok(Json(state.appliance.lockspaces().locks(Some(&name)).await?))
}

/// The lock records of every joined lockspace.
#[utoipa::path(get, path = "/api/v1/locks",
    responses((status = 200, body = Vec<LockEntry>)))]
pub async fn list_locks(State(state): State<ApiState>) -> Result<Json<Vec<LockEntry>>, ApiError> {
    Ok(Json(state.appliance.lockspaces().locks(None).await?))
}

/// Formats the declared lockspace's device (refused when it holds a lockspace) and
/// joins it.
#[utoipa::path(post, path = "/api/v1/lockspaces/{name}/format", params(("name" = String, Path)),
    responses((status = 200, body = LockspaceInfo), (status = 404), (status = 409)))]
pub async fn format_lockspace(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<LockspaceInfo>, ApiError> {
    Ok(Json(state.appliance.format_lockspace(&name).await?))
}
