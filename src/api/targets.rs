//! `/api/v1/targets`: the NBD server and the iSCSI target. Each change edits the
//! `[nbd]` or `[iscsi]` section of the desired state and goes through the checked apply.

use super::error::ApiError;
use super::types::ApplyResult;
use super::ApiState;
use crate::daemon::sections::{to_section, Typed};
use axum::extract::{Path, State};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use basalt_config::DesiredState;
use basalt_iscsi::{Acl, Chap, IscsiConfig, LunMapping, TargetConfig};
use basalt_nbd::{Cidr, ExportConfig, NbdConfig, TlsMode};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// The target routes.
pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/targets/nbd", get(nbd_show))
        .route("/targets/nbd/settings", put(nbd_settings))
        .route("/targets/nbd/exports", post(nbd_export))
        .route("/targets/nbd/exports/{lun}", delete(nbd_unexport))
        .route("/targets/iscsi", get(iscsi_show).post(iscsi_create))
        .route("/targets/iscsi/{iqn}", delete(iscsi_delete))
        .route("/targets/iscsi/{iqn}/luns", post(iscsi_map))
        .route("/targets/iscsi/{iqn}/luns/{lun}", delete(iscsi_unmap))
        .route("/targets/iscsi/{iqn}/acls", post(iscsi_acl))
        .route(
            "/targets/iscsi/{iqn}/acls/{initiator}",
            delete(iscsi_acl_remove),
        )
        .route("/targets/iscsi/{iqn}/portals", post(iscsi_portal))
        .route(
            "/targets/iscsi/{iqn}/portals/{addr}",
            delete(iscsi_portal_remove),
        )
}

fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError::BadRequest(e.to_string())
}

fn nbd_of(desired: &DesiredState) -> Result<Option<NbdConfig>, ApiError> {
    Ok(Typed::parse(desired).map_err(ApiError::InvalidConfig)?.nbd)
}

fn iscsi_of(desired: &DesiredState) -> Result<IscsiConfig, ApiError> {
    Ok(Typed::parse(desired)
        .map_err(ApiError::InvalidConfig)?
        .iscsi
        .unwrap_or_default())
}

fn store_nbd(desired: &mut DesiredState, cfg: Option<&NbdConfig>) -> Result<(), ApiError> {
    desired.sections.nbd = cfg
        .map(to_section)
        .transpose()
        .map_err(ApiError::Internal)?;
    Ok(())
}

fn store_iscsi(desired: &mut DesiredState, cfg: &IscsiConfig) -> Result<(), ApiError> {
    desired.sections.iscsi = if cfg.targets.is_empty() && cfg.discovery_chap.is_none() {
        None
    } else {
        Some(to_section(cfg).map_err(ApiError::Internal)?)
    };
    Ok(())
}

/// The NBD server: configuration, bound addresses, counters.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NbdInfo {
    /// Declared configuration (absent: the server is off).
    #[schema(value_type = Object)]
    pub config: Option<NbdConfig>,
    /// Bound addresses while running.
    pub listening: Vec<String>,
    /// Counters.
    #[schema(value_type = Object)]
    pub metrics: Option<serde_json::Value>,
}

/// The NBD server.
#[utoipa::path(get, path = "/api/v1/targets/nbd", responses((status = 200, body = NbdInfo)))]
pub async fn nbd_show(State(state): State<ApiState>) -> Result<Json<NbdInfo>, ApiError> {
    let config = nbd_of(&state.appliance.desired().await?)?;
    let status = state.appliance.targets().nbd_status().await;
    Ok(Json(NbdInfo {
        config,
        listening: status
            .as_ref()
            .map(|(a, _)| a.iter().map(|x| x.to_string()).collect())
            .unwrap_or_default(),
        metrics: status.and_then(|(_, m)| serde_json::to_value(m).ok()),
    }))
}

/// `PUT /targets/nbd/settings`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NbdSettings {
    /// Listen addresses (default 0.0.0.0:10809).
    #[serde(default)]
    pub listen: Option<Vec<String>>,
    /// off, allow or require.
    #[serde(default)]
    pub tls: Option<String>,
    /// Turn the server off (its exports are forgotten).
    #[serde(default)]
    pub disable: bool,
}

/// Sets the NBD server's addresses and TLS mode (turning it on), or turns it off.
#[utoipa::path(put, path = "/api/v1/targets/nbd/settings", request_body = NbdSettings,
    responses((status = 200, body = ApplyResult)))]
pub async fn nbd_settings(
    State(state): State<ApiState>,
    Json(req): Json<NbdSettings>,
) -> Result<Json<ApplyResult>, ApiError> {
    let listen = req
        .listen
        .map(|l| {
            l.iter()
                .map(|a| {
                    a.parse::<SocketAddr>()
                        .map_err(|_| bad(format!("{a:?} is not IP:port")))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let tls = match req.tls.as_deref() {
        None => None,
        Some("off") => Some(TlsMode::Off),
        Some("allow") => Some(TlsMode::Allow),
        Some("require") => Some(TlsMode::Require),
        Some(other) => return Err(bad(format!("tls {other:?} is not off, allow or require"))),
    };
    let result = state
        .appliance
        .update(move |desired| {
            if req.disable {
                return store_nbd(desired, None);
            }
            let mut cfg = nbd_of(desired)?.unwrap_or_default();
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(t) = tls {
                cfg.tls = t;
            }
            store_nbd(desired, Some(&cfg))
        })
        .await?;
    Ok(Json(result))
}

/// `POST /targets/nbd/exports`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NbdExport {
    /// The LUN (or snapshot) to export; the export name is the LUN name.
    pub lun: String,
    /// Refuse writes.
    #[serde(default)]
    pub read_only: bool,
    /// Client networks allowed, e.g. "10.0.0.0/8" (default: any).
    #[serde(default)]
    pub allow: Vec<String>,
}

/// Exports a LUN over NBD (turning the server on if it is off).
#[utoipa::path(post, path = "/api/v1/targets/nbd/exports", request_body = NbdExport,
    responses((status = 200, body = ApplyResult), (status = 422)))]
pub async fn nbd_export(
    State(state): State<ApiState>,
    Json(req): Json<NbdExport>,
) -> Result<Json<ApplyResult>, ApiError> {
    let allowed: Vec<Cidr> = req
        .allow
        .iter()
        .map(|c| c.parse::<Cidr>().map_err(bad))
        .collect::<Result<_, _>>()?;
    let result = state
        .appliance
        .update(move |desired| {
            let mut cfg = nbd_of(desired)?.unwrap_or_default();
            cfg.exports.insert(
                req.lun.clone(),
                ExportConfig {
                    read_only: req.read_only,
                    allowed_networks: allowed,
                    description: None,
                },
            );
            store_nbd(desired, Some(&cfg))
        })
        .await?;
    Ok(Json(result))
}

/// Stops exporting a LUN over NBD.
#[utoipa::path(delete, path = "/api/v1/targets/nbd/exports/{lun}", params(("lun" = String, Path)),
    responses((status = 200, body = ApplyResult), (status = 404)))]
pub async fn nbd_unexport(
    State(state): State<ApiState>,
    Path(lun): Path<String>,
) -> Result<Json<ApplyResult>, ApiError> {
    let result = state
        .appliance
        .update(move |desired| {
            let mut cfg = nbd_of(desired)?
                .ok_or_else(|| ApiError::NotFound("the NBD server is off".into()))?;
            if cfg.exports.remove(&lun).is_none() {
                return Err(ApiError::NotFound(format!(
                    "{lun:?} is not exported over NBD"
                )));
            }
            store_nbd(desired, Some(&cfg))
        })
        .await?;
    Ok(Json(result))
}

/// The iSCSI target: configuration, bound portals, counters.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IscsiInfo {
    /// Declared configuration.
    #[schema(value_type = Object)]
    pub config: IscsiConfig,
    /// Bound portals while running (configured, bound).
    pub portals: Vec<(String, String)>,
    /// Counters.
    #[schema(value_type = Object)]
    pub metrics: Option<serde_json::Value>,
}

/// The iSCSI target.
#[utoipa::path(get, path = "/api/v1/targets/iscsi", responses((status = 200, body = IscsiInfo)))]
pub async fn iscsi_show(State(state): State<ApiState>) -> Result<Json<IscsiInfo>, ApiError> {
    let config = iscsi_of(&state.appliance.desired().await?)?;
    let status = state.appliance.targets().iscsi_status().await;
    Ok(Json(IscsiInfo {
        config,
        portals: status
            .as_ref()
            .map(|(p, _)| {
                p.iter()
                    .map(|(c, b)| (c.to_string(), b.to_string()))
                    .collect()
            })
            .unwrap_or_default(),
        metrics: status.and_then(|(_, m)| serde_json::to_value(m).ok()),
    }))
}

/// `POST /targets/iscsi`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateIscsiTarget {
    /// Target IQN.
    pub iqn: String,
    /// Portals, e.g. "0.0.0.0:3260".
    #[serde(default)]
    pub portals: Vec<String>,
    /// Let any initiator in (no ACL). Off unless asked for.
    #[serde(default)]
    pub allow_any_initiator: bool,
}

fn edit_target(
    cfg: &mut IscsiConfig,
    iqn: &str,
    f: impl FnOnce(&mut TargetConfig) -> Result<(), ApiError>,
) -> Result<(), ApiError> {
    let t = cfg
        .targets
        .iter_mut()
        .find(|t| t.iqn.eq_ignore_ascii_case(iqn))
        .ok_or_else(|| ApiError::NotFound(format!("no iSCSI target {iqn:?}")))?;
    f(t)
}

async fn edit_iscsi(
    state: &ApiState,
    f: impl FnOnce(&mut IscsiConfig) -> Result<(), ApiError> + Send,
) -> Result<Json<ApplyResult>, ApiError> {
    let result = state
        .appliance
        .update(move |desired| {
            let mut cfg = iscsi_of(desired)?;
            f(&mut cfg)?;
            cfg.validate(|_| true).map_err(bad)?;
            store_iscsi(desired, &cfg)
        })
        .await?;
    Ok(Json(result))
}

fn addr(a: &str) -> Result<SocketAddr, ApiError> {
    a.parse()
        .map_err(|_| bad(format!("portal {a:?} is not IP:port")))
}

/// Creates an iSCSI target.
#[utoipa::path(post, path = "/api/v1/targets/iscsi", request_body = CreateIscsiTarget,
    responses((status = 200, body = ApplyResult), (status = 422)))]
pub async fn iscsi_create(
    State(state): State<ApiState>,
    Json(req): Json<CreateIscsiTarget>,
) -> Result<Json<ApplyResult>, ApiError> {
    let portals = req
        .portals
        .iter()
        .map(|p| addr(p))
        .collect::<Result<Vec<_>, _>>()?;
    edit_iscsi(&state, move |cfg| {
        if cfg
            .targets
            .iter()
            .any(|t| t.iqn.eq_ignore_ascii_case(&req.iqn))
        {
            return Err(ApiError::Conflict(format!(
                "iSCSI target {:?} exists",
                req.iqn
            )));
        }
        let mut t: TargetConfig =
            serde_json::from_value(serde_json::json!({ "iqn": req.iqn, "portals": portals }))
                .map_err(|e| ApiError::Internal(e.to_string()))?;
        t.allow_any_initiator = req.allow_any_initiator;
        cfg.targets.push(t);
        Ok(())
    })
    .await
}

/// Deletes an iSCSI target (its sessions end).
#[utoipa::path(delete, path = "/api/v1/targets/iscsi/{iqn}", params(("iqn" = String, Path)),
    responses((status = 200, body = ApplyResult), (status = 404)))]
pub async fn iscsi_delete(
    State(state): State<ApiState>,
    Path(iqn): Path<String>,
) -> Result<Json<ApplyResult>, ApiError> {
    edit_iscsi(&state, move |cfg| {
        let before = cfg.targets.len();
        cfg.targets.retain(|t| !t.iqn.eq_ignore_ascii_case(&iqn));
        if cfg.targets.len() == before {
            return Err(ApiError::NotFound(format!("no iSCSI target {iqn:?}")));
        }
        Ok(())
    })
    .await
}

/// `POST /targets/iscsi/{iqn}/luns`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MapLun {
    /// The LUN number initiators see (default: the lowest free).
    #[serde(default)]
    pub lun: Option<u64>,
    /// The LUN (by name) behind it.
    pub name: String,
}

/// Maps a LUN into a target.
#[utoipa::path(post, path = "/api/v1/targets/iscsi/{iqn}/luns", params(("iqn" = String, Path)),
    request_body = MapLun, responses((status = 200, body = ApplyResult), (status = 422)))]
pub async fn iscsi_map(
    State(state): State<ApiState>,
    Path(iqn): Path<String>,
    Json(req): Json<MapLun>,
) -> Result<Json<ApplyResult>, ApiError> {
    edit_iscsi(&state, move |cfg| {
        edit_target(cfg, &iqn, |t| {
            let number = req.lun.unwrap_or_else(|| {
                (0..)
                    .find(|n| !t.luns.iter().any(|l| l.lun == *n))
                    .unwrap_or(0)
            });
            t.luns.retain(|l| l.lun != number);
            t.luns.push(LunMapping {
                lun: number,
                name: req.name,
            });
            t.luns.sort_by_key(|l| l.lun);
            Ok(())
        })
    })
    .await
}

/// Unmaps a LUN number from a target.
#[utoipa::path(delete, path = "/api/v1/targets/iscsi/{iqn}/luns/{lun}",
    params(("iqn" = String, Path), ("lun" = u64, Path)), responses((status = 200, body = ApplyResult)))]
pub async fn iscsi_unmap(
    State(state): State<ApiState>,
    Path((iqn, lun)): Path<(String, u64)>,
) -> Result<Json<ApplyResult>, ApiError> {
    edit_iscsi(&state, move |cfg| {
        edit_target(cfg, &iqn, |t| {
            let before = t.luns.len();
            t.luns.retain(|l| l.lun != lun);
            if t.luns.len() == before {
                return Err(ApiError::NotFound(format!(
                    "target {iqn:?} has no LUN {lun}"
                )));
            }
            Ok(())
        })
    })
    .await
}

/// `POST /targets/iscsi/{iqn}/acls`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AclRequest {
    /// Initiator IQN.
    pub initiator: String,
    /// LUN numbers it may see (default: all of the target's).
    #[serde(default)]
    pub luns: Option<Vec<u64>>,
    /// CHAP user for this initiator.
    #[serde(default)]
    pub chap_user: Option<String>,
    /// CHAP secret (12 to 16 characters is what most initiators accept).
    #[serde(default)]
    pub chap_secret: Option<String>,
    /// Mutual CHAP: the target's user.
    #[serde(default)]
    pub mutual_user: Option<String>,
    /// Mutual CHAP: the target's secret.
    #[serde(default)]
    pub mutual_secret: Option<String>,
}

/// Adds or replaces an initiator's ACL entry (LUN masking and CHAP secrets).
#[utoipa::path(post, path = "/api/v1/targets/iscsi/{iqn}/acls", params(("iqn" = String, Path)),
    request_body = AclRequest, responses((status = 200, body = ApplyResult), (status = 422)))]
pub async fn iscsi_acl(
    State(state): State<ApiState>,
    Path(iqn): Path<String>,
    Json(req): Json<AclRequest>,
) -> Result<Json<ApplyResult>, ApiError> {
    let chap = match (req.chap_user, req.chap_secret) {
        (Some(user), Some(secret)) => Some(Chap {
            user,
            secret,
            mutual_user: req.mutual_user,
            mutual_secret: req.mutual_secret,
        }),
        (None, None) => None,
        _ => return Err(bad("CHAP needs both a user and a secret")),
    };
    edit_iscsi(&state, move |cfg| {
        edit_target(cfg, &iqn, |t| {
            t.acls
                .retain(|a| !a.initiator.eq_ignore_ascii_case(&req.initiator));
            t.acls.push(Acl {
                initiator: req.initiator,
                luns: req.luns,
                chap,
            });
            Ok(())
        })
    })
    .await
}

/// Removes an initiator's ACL entry.
#[utoipa::path(delete, path = "/api/v1/targets/iscsi/{iqn}/acls/{initiator}",
    params(("iqn" = String, Path), ("initiator" = String, Path)), responses((status = 200, body = ApplyResult)))]
pub async fn iscsi_acl_remove(
    State(state): State<ApiState>,
    Path((iqn, initiator)): Path<(String, String)>,
) -> Result<Json<ApplyResult>, ApiError> {
    edit_iscsi(&state, move |cfg| {
        edit_target(cfg, &iqn, |t| {
            let before = t.acls.len();
            t.acls
                .retain(|a| !a.initiator.eq_ignore_ascii_case(&initiator));
            if t.acls.len() == before {
                return Err(ApiError::NotFound(format!(
                    "target {iqn:?} has no ACL for {initiator:?}"
                )));
            }
            Ok(())
        })
    })
    .await
}

/// `POST /targets/iscsi/{iqn}/portals`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PortalRequest {
    /// IP:port.
    pub addr: String,
}

/// Adds a portal to a target.
#[utoipa::path(post, path = "/api/v1/targets/iscsi/{iqn}/portals", params(("iqn" = String, Path)),
    request_body = PortalRequest, responses((status = 200, body = ApplyResult)))]
pub async fn iscsi_portal(
    State(state): State<ApiState>,
    Path(iqn): Path<String>,
    Json(req): Json<PortalRequest>,
) -> Result<Json<ApplyResult>, ApiError> {
    let a = addr(&req.addr)?;
    edit_iscsi(&state, move |cfg| {
        edit_target(cfg, &iqn, |t| {
            if !t.portals.contains(&a) {
                t.portals.push(a);
            }
            Ok(())
        })
    })
    .await
}

/// Removes a portal from a target.
#[utoipa::path(delete, path = "/api/v1/targets/iscsi/{iqn}/portals/{addr}",
    params(("iqn" = String, Path), ("addr" = String, Path)), responses((status = 200, body = ApplyResult)))]
pub async fn iscsi_portal_remove(
    State(state): State<ApiState>,
    Path((iqn, portal)): Path<(String, String)>,
) -> Result<Json<ApplyResult>, ApiError> {
    let a = addr(&portal)?;
    edit_iscsi(&state, move |cfg| {
        edit_target(cfg, &iqn, |t| {
            let before = t.portals.len();
            t.portals.retain(|p| *p != a);
            if t.portals.len() == before {
                return Err(ApiError::NotFound(format!(
                    "target {iqn:?} has no portal {portal}"
                )));
            }
            Ok(())
        })
    })
    .await
}
