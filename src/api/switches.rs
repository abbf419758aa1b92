//! `/api/v1/switches`: virtual switches. Every change edits the switch's section of the
//! desired state and applies it, so it is checked exactly as `basalt config apply` would
//! check a whole document.

use super::error::ApiError;
use super::ApiState;
use crate::daemon::sections::to_section;
use crate::daemon::switches::SwitchInfo;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use basalt_config::DesiredState;
use basalt_net::{PortGroupSpec, PortSpec, SwitchDefinition, UplinkSpec};

use super::types::ApplyResult;

/// The switch routes.
pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/switches", get(list))
        .route(
            "/switches/{name}",
            get(show).put(put_definition).delete(remove),
        )
        .route("/switches/{name}/portgroups", post(add_portgroup))
        .route(
            "/switches/{name}/portgroups/{item}",
            delete(remove_portgroup),
        )
        .route("/switches/{name}/uplinks", post(add_uplink))
        .route("/switches/{name}/uplinks/{item}", delete(remove_uplink))
        .route("/switches/{name}/ports", post(add_port))
        .route("/switches/{name}/ports/{item}", delete(remove_port))
}

fn definition_of(state: &DesiredState, name: &str) -> Result<SwitchDefinition, ApiError> {
    let section = state
        .sections
        .switch
        .iter()
        .find(|s| s.name() == Some(name))
        .ok_or_else(|| ApiError::NotFound(format!("no switch named {name:?}")))?;
    SwitchDefinition::deserialize_table(&section.table)
}

/// Deserialization of a stored section, as a trait so the call reads naturally.
trait FromTable: Sized {
    fn deserialize_table(table: &toml::Table) -> Result<Self, ApiError>;
}

impl FromTable for SwitchDefinition {
    fn deserialize_table(table: &toml::Table) -> Result<Self, ApiError> {
        use serde::Deserialize;
        SwitchDefinition::deserialize(toml::Value::Table(table.clone()))
            .map_err(|e| ApiError::Internal(format!("stored switch does not parse: {e}")))
    }
}

fn store_definition(state: &mut DesiredState, def: &SwitchDefinition) -> Result<(), ApiError> {
    let section = to_section(def).map_err(ApiError::Internal)?;
    let list = &mut state.sections.switch;
    match list
        .iter_mut()
        .find(|s| s.name() == Some(def.name.as_str()))
    {
        Some(slot) => *slot = section,
        None => list.push(section),
    }
    list.sort_by(|a, b| a.name().cmp(&b.name()));
    Ok(())
}

/// Edits one switch's definition and applies it.
async fn edit(
    state: &ApiState,
    name: String,
    f: impl FnOnce(&mut SwitchDefinition) -> Result<(), ApiError> + Send,
) -> Result<Json<ApplyResult>, ApiError> {
    let result = state
        .appliance
        .update(move |desired| {
            let mut def = definition_of(desired, &name)?;
            f(&mut def)?;
            store_definition(desired, &def)
        })
        .await?;
    Ok(Json(result))
}

/// Every switch with its ports, uplinks and teams.
#[utoipa::path(get, path = "/api/v1/switches", responses((status = 200, body = Vec<SwitchInfo>)))]
pub async fn list(State(state): State<ApiState>) -> Result<Json<Vec<SwitchInfo>>, ApiError> {
    Ok(Json(state.appliance.switches().list().await?))
}

/// One switch.
#[utoipa::path(get, path = "/api/v1/switches/{name}", params(("name" = String, Path)),
    responses((status = 200, body = SwitchInfo), (status = 404)))]
pub async fn show(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<SwitchInfo>, ApiError> {
    state
        .appliance
        .switches()
        .list()
        .await?
        .into_iter()
        .find(|s| s.name == name)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no switch named {name:?}")))
}

/// Creates or replaces a switch from a whole definition (TOML, or JSON with
/// `Content-Type: application/json`): `basalt switch apply FILE`. Several hosts applying
/// one definition make a distributed switch.
#[utoipa::path(put, path = "/api/v1/switches/{name}", params(("name" = String, Path)),
    request_body(content = String, content_type = "application/toml"),
    responses((status = 200, body = ApplyResult), (status = 422)))]
pub async fn put_definition(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Result<Json<ApplyResult>, ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let def = if json {
        SwitchDefinition::from_json(&body)
    } else {
        SwitchDefinition::from_toml(&body)
    }
    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if def.name != name {
        return Err(ApiError::BadRequest(format!(
            "the definition is for switch {:?}, not {name:?}",
            def.name
        )));
    }
    let result = state
        .appliance
        .update(move |desired| store_definition(desired, &def))
        .await?;
    Ok(Json(result))
}

/// Removes a switch (its ports and TAP devices go with it).
#[utoipa::path(delete, path = "/api/v1/switches/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404)))]
pub async fn remove(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state
        .appliance
        .update(move |desired| {
            let before = desired.sections.switch.len();
            desired
                .sections
                .switch
                .retain(|s| s.name() != Some(name.as_str()));
            if desired.sections.switch.len() == before {
                return Err(ApiError::NotFound(format!("no switch named {name:?}")));
            }
            Ok(())
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

fn not_found(what: &str, name: &str, switch: &str) -> ApiError {
    ApiError::NotFound(format!("switch {switch:?} has no {what} named {name:?}"))
}

/// Adds or replaces a port group.
#[utoipa::path(post, path = "/api/v1/switches/{name}/portgroups", params(("name" = String, Path)),
    request_body(content = Object), responses((status = 200, body = ApplyResult), (status = 422)))]
pub async fn add_portgroup(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Json(pg): Json<PortGroupSpec>,
) -> Result<Json<ApplyResult>, ApiError> {
    edit(&state, name, move |def| {
        def.portgroups.retain(|p| p.name != pg.name);
        def.portgroups.push(pg);
        Ok(())
    })
    .await
}

/// Removes a port group (refused while ports use it).
#[utoipa::path(delete, path = "/api/v1/switches/{name}/portgroups/{item}",
    params(("name" = String, Path), ("item" = String, Path)), responses((status = 200, body = ApplyResult)))]
pub async fn remove_portgroup(
    State(state): State<ApiState>,
    Path((name, item)): Path<(String, String)>,
) -> Result<Json<ApplyResult>, ApiError> {
    let sw = name.clone();
    edit(&state, name, move |def| {
        if def.ports.iter().any(|p| p.portgroup == item) {
            return Err(ApiError::Conflict(format!(
                "port group {item:?} still has ports; remove them first"
            )));
        }
        let before = def.portgroups.len();
        def.portgroups.retain(|p| p.name != item);
        if def.portgroups.len() == before {
            return Err(not_found("port group", &item, &sw));
        }
        Ok(())
    })
    .await
}

/// Adds or replaces an uplink role.
#[utoipa::path(post, path = "/api/v1/switches/{name}/uplinks", params(("name" = String, Path)),
    request_body(content = Object), responses((status = 200, body = ApplyResult), (status = 422)))]
pub async fn add_uplink(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Json(uplink): Json<UplinkSpec>,
) -> Result<Json<ApplyResult>, ApiError> {
    edit(&state, name, move |def| {
        match def.uplinks.iter_mut().find(|u| u.name == uplink.name) {
            Some(u) => *u = uplink,
            None => def.uplinks.push(uplink),
        }
        Ok(())
    })
    .await
}

/// Removes an uplink role.
#[utoipa::path(delete, path = "/api/v1/switches/{name}/uplinks/{item}",
    params(("name" = String, Path), ("item" = String, Path)), responses((status = 200, body = ApplyResult)))]
pub async fn remove_uplink(
    State(state): State<ApiState>,
    Path((name, item)): Path<(String, String)>,
) -> Result<Json<ApplyResult>, ApiError> {
    let sw = name.clone();
    edit(&state, name, move |def| {
        let before = def.uplinks.len();
        def.uplinks.retain(|u| u.name != item);
        if def.uplinks.len() == before {
            return Err(not_found("uplink", &item, &sw));
        }
        for binding in def.hosts.values_mut() {
            binding.uplinks.remove(&item);
        }
        Ok(())
    })
    .await
}

/// Adds or replaces a port (a VM's TAP, an internal port, or an attached interface).
#[utoipa::path(post, path = "/api/v1/switches/{name}/ports", params(("name" = String, Path)),
    request_body(content = Object), responses((status = 200, body = ApplyResult), (status = 422)))]
pub async fn add_port(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Json(port): Json<PortSpec>,
) -> Result<Json<ApplyResult>, ApiError> {
    edit(&state, name, move |def| {
        def.ports.retain(|p| p.name != port.name);
        def.ports.push(port);
        Ok(())
    })
    .await
}

/// Removes a port.
#[utoipa::path(delete, path = "/api/v1/switches/{name}/ports/{item}",
    params(("name" = String, Path), ("item" = String, Path)), responses((status = 200, body = ApplyResult)))]
pub async fn remove_port(
    State(state): State<ApiState>,
    Path((name, item)): Path<(String, String)>,
) -> Result<Json<ApplyResult>, ApiError> {
    let sw = name.clone();
    edit(&state, name, move |def| {
        let before = def.ports.len();
        def.ports.retain(|p| p.name != item);
        if def.ports.len() == before {
            return Err(not_found("port", &item, &sw));
        }
        Ok(())
    })
    .await
}
