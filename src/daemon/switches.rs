//! The appliance's virtual switches at run time: one `basalt_net::Switch` (with its own
//! datapath thread) per declared switch, started at boot, reconfigured in place when its
//! definition changes, stopped when it is removed.
//!
//! Switch calls block for a few milliseconds (they talk to the datapath thread), so they
//! run on the blocking pool.

use crate::api::error::ApiError;
use basalt_net::{PortCountersSnapshot, Switch, SwitchDefinition, SwitchStatus};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A declared switch and what became of it.
pub struct SwitchRuntime {
    /// The running switch, when it started.
    pub switch: Option<Arc<Switch>>,
    /// The definition as declared.
    pub definition: SwitchDefinition,
    /// Why it is not running, or why the last change failed.
    pub error: Option<String>,
}

/// The listing of one switch.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SwitchInfo {
    /// Name.
    pub name: String,
    /// Whether its datapath runs.
    pub running: bool,
    /// Why it is not running, or why the last change failed.
    pub error: Option<String>,
    /// Uplink roles.
    pub uplinks: usize,
    /// Port groups.
    pub portgroups: usize,
    /// Ports.
    pub ports: usize,
    /// Ports, uplinks and teams as they run (absent when not running).
    #[schema(value_type = Object)]
    pub status: Option<SwitchStatus>,
    /// The definition, as declared.
    #[schema(value_type = Object)]
    pub definition: SwitchDefinition,
}

/// Every switch, by name.
#[derive(Default)]
pub struct Switches {
    running: Mutex<BTreeMap<String, SwitchRuntime>>,
}

async fn block<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("switch task failed: {e}")))
}

impl Switches {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SwitchRuntime>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the running switches in line with `wanted`: starts new ones, applies changed
    /// definitions in place, stops removed ones. A switch that fails keeps its error.
    pub async fn reconcile(&self, wanted: &[SwitchDefinition]) -> Result<(), ApiError> {
        let stale: Vec<String> = self
            .lock()
            .keys()
            .filter(|n| !wanted.iter().any(|d| &d.name == *n))
            .cloned()
            .collect();
        for name in stale {
            let removed = self.lock().remove(&name);
            if let Some(SwitchRuntime {
                switch: Some(sw), ..
            }) = removed
            {
                block(move || {
                    if let Ok(sw) = Arc::try_unwrap(sw) {
                        sw.stop();
                    }
                })
                .await?;
                tracing::info!(switch = %name, "switch stopped");
            }
        }
        for def in wanted {
            let current = self
                .lock()
                .get(&def.name)
                .map(|rt| (rt.switch.clone(), rt.definition.clone()));
            let runtime = match current {
                Some((Some(_), old)) if &old == def => continue,
                Some((Some(sw), _)) => {
                    // Ports made at run time for running VMs' NICs are not declared:
                    // keep them across the change.
                    let mut d = def.clone();
                    for p in sw.definition().ports {
                        if p.name.starts_with(super::vms::VM_PORT_PREFIX)
                            && !d.ports.iter().any(|q| q.name == p.name)
                        {
                            d.ports.push(p);
                        }
                    }
                    let s = sw.clone();
                    let error = match block(move || s.apply(d)).await? {
                        Ok(changes) => {
                            tracing::info!(switch = %def.name, ?changes, "switch reconfigured");
                            None
                        }
                        Err(e) => {
                            tracing::error!(switch = %def.name, error = %e, "switch reconfiguration failed");
                            Some(e.to_string())
                        }
                    };
                    SwitchRuntime {
                        switch: Some(sw),
                        definition: def.clone(),
                        error,
                    }
                }
                _ => {
                    let d = def.clone();
                    match block(move || Switch::start(d)).await? {
                        Ok(sw) => {
                            tracing::info!(switch = %def.name, "switch started");
                            SwitchRuntime {
                                switch: Some(Arc::new(sw)),
                                definition: def.clone(),
                                error: None,
                            }
                        }
                        Err(e) => {
                            tracing::error!(switch = %def.name, error = %e, "switch did not start");
                            SwitchRuntime {
                                switch: None,
                                definition: def.clone(),
                                error: Some(e.to_string()),
                            }
                        }
                    }
                }
            };
            self.lock().insert(def.name.clone(), runtime);
        }
        Ok(())
    }

    /// Every switch with its state.
    pub async fn list(&self) -> Result<Vec<SwitchInfo>, ApiError> {
        let entries: Vec<(Option<Arc<Switch>>, SwitchDefinition, Option<String>)> = self
            .lock()
            .values()
            .map(|rt| (rt.switch.clone(), rt.definition.clone(), rt.error.clone()))
            .collect();
        let mut out = Vec::new();
        for (sw, def, error) in entries {
            let status = match sw {
                Some(sw) => block(move || sw.status().ok()).await?,
                None => None,
            };
            out.push(SwitchInfo {
                name: def.name.clone(),
                running: status.is_some(),
                error,
                uplinks: def.uplinks.len(),
                portgroups: def.portgroups.len(),
                ports: def.ports.len(),
                status,
                definition: def,
            });
        }
        Ok(out)
    }

    /// The running switch that has port group `pg` (a VM NIC's attachment).
    pub fn with_portgroup(&self, pg: &str) -> Result<Arc<Switch>, String> {
        let running = self.lock();
        let mut found = running
            .values()
            .filter(|rt| rt.definition.portgroups.iter().any(|p| p.name == pg));
        match (found.next(), found.next()) {
            (Some(rt), None) => rt.switch.clone().ok_or_else(|| {
                format!(
                    "switch {:?} (port group {pg:?}) is not running",
                    rt.definition.name
                )
            }),
            (Some(a), Some(b)) => Err(format!(
                "port group {pg:?} is on switches {:?} and {:?}; rename one",
                a.definition.name, b.definition.name
            )),
            (None, _) => Err(format!("no switch has a port group {pg:?}")),
        }
    }

    /// Port counters of every running switch, for `/metrics`.
    pub fn counters(&self) -> Vec<(String, BTreeMap<String, PortCountersSnapshot>)> {
        self.lock()
            .iter()
            .filter_map(|(name, rt)| rt.switch.as_ref().map(|sw| (name.clone(), sw.counters())))
            .collect()
    }

    /// Stops every switch (at shutdown).
    pub async fn stop_all(&self) {
        let all: Vec<Arc<Switch>> = std::mem::take(&mut *self.lock())
            .into_values()
            .filter_map(|rt| rt.switch)
            .collect();
        let _ = block(move || {
            for sw in all {
                if let Ok(sw) = Arc::try_unwrap(sw) {
                    sw.stop();
                }
            }
        })
        .await;
    }
}

/// Checks a definition against this machine before it is committed: every uplink
/// interface bound on this host and every `netdev` port's interface must exist.
pub fn check_on_this_host(def: &SwitchDefinition) -> Vec<String> {
    let host = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let exists = |iface: &str| std::path::Path::new("/sys/class/net").join(iface).exists();
    let mut problems = Vec::new();
    for u in &def.uplinks {
        if let Some(iface) = def.uplink_interface(&u.name, &host) {
            if !exists(iface) {
                problems.push(format!(
                    "switch {:?}: uplink {:?} is bound to {iface}, which this host does not have",
                    def.name, u.name
                ));
            }
        }
    }
    for p in def.ports_on(&host) {
        if let Some(iface) = &p.interface {
            if !exists(iface) {
                problems.push(format!(
                    "switch {:?}: port {:?} attaches {iface}, which this host does not have",
                    def.name, p.name
                ));
            }
        }
    }
    problems
}
