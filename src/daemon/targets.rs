//! The targets at run time: the NBD server and the iSCSI target, both serving the
//! appliance's LUNs by name, reconfigured in place when the desired state changes.
//!
//! Persistent reservations registered with APTPL are kept in the appliance store, one
//! blob per LUN identity, so they survive restarts.

use super::storage::Storage;
use crate::api::error::ApiError;
use basalt_config::Store;
use basalt_iscsi::{ConnConfig, IscsiConfig, IscsiServer, LunHandle};
use basalt_nbd::{Devices, NbdConfig, NbdServer, TlsMode};
use basalt_scsi::{LunIdentity, PrStore};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// APTPL reservations of one LUN in the appliance store.
pub struct StorePr {
    store: Arc<Store>,
    key: String,
}

impl PrStore for StorePr {
    fn save(&self, blob: &[u8]) -> std::io::Result<()> {
        let result = if blob.is_empty() {
            self.store.delete_record(&self.key)
        } else {
            self.store.put_record(&self.key, blob)
        };
        result.map_err(std::io::Error::other)
    }

    fn load(&self) -> std::io::Result<Option<Vec<u8>>> {
        self.store.record(&self.key).map_err(std::io::Error::other)
    }
}

/// The running target servers.
#[derive(Default)]
pub struct Targets {
    nbd: Mutex<Option<NbdServer>>,
    iscsi: Mutex<Option<(IscsiServer, BTreeSet<String>)>>,
}

/// The names a configuration exports.
pub fn nbd_exports(cfg: &NbdConfig) -> Vec<String> {
    cfg.exports.keys().cloned().collect()
}

/// The LUN names an iSCSI configuration maps.
pub fn iscsi_units(cfg: &IscsiConfig) -> BTreeSet<String> {
    cfg.targets
        .iter()
        .flat_map(|t| t.luns.iter().map(|l| l.name.clone()))
        .collect()
}

fn handle(storage: &Storage, store: &Arc<Store>, name: &str) -> Option<LunHandle> {
    let (lun, info) = storage.lun_dev(name)?;
    let mut identity = LunIdentity::new(u128::from_be_bytes(info.id.0));
    identity.read_only = info.read_only;
    Some(LunHandle {
        dev: lun,
        identity,
        pr_store: Some(Arc::new(StorePr {
            store: store.clone(),
            key: format!("scsi-pr/{}", info.id),
        })),
    })
}

impl Targets {
    /// Brings the servers in line with the declared configurations.
    pub async fn reconcile(
        &self,
        nbd: Option<&NbdConfig>,
        iscsi: Option<&IscsiConfig>,
        storage: &Storage,
        store: &Arc<Store>,
        tls: Arc<rustls::ServerConfig>,
    ) -> Result<(), ApiError> {
        let mut current = self.nbd.lock().await;
        match nbd {
            None => {
                if let Some(server) = current.take() {
                    server.stop(Duration::from_secs(5)).await;
                    tracing::info!("NBD server stopped");
                }
            }
            Some(cfg) => {
                let mut devices = Devices::new();
                for name in nbd_exports(cfg) {
                    let (lun, _) = storage.lun_dev(&name).ok_or_else(|| {
                        ApiError::Conflict(format!(
                            "NBD export {name:?}: no LUN of that name is up"
                        ))
                    })?;
                    devices.insert(name, lun);
                }
                let tls = (cfg.tls != TlsMode::Off).then(|| tls.clone());
                match current.as_ref() {
                    Some(server) => server
                        .reconfigure(cfg.clone(), devices, tls)
                        .await
                        .map_err(|e| ApiError::Conflict(format!("NBD: {e}")))?,
                    None => {
                        let server = NbdServer::start(cfg.clone(), devices, tls)
                            .await
                            .map_err(|e| ApiError::Conflict(format!("NBD: {e}")))?;
                        let listen = server.local_addrs().await;
                        tracing::info!(?listen, "NBD server started");
                        *current = Some(server);
                    }
                }
            }
        }
        drop(current);

        let mut current = self.iscsi.lock().await;
        match iscsi {
            None => {
                if let Some((server, _)) = current.take() {
                    server.stop().await;
                    tracing::info!("iSCSI target stopped");
                }
            }
            Some(cfg) => {
                let wanted = iscsi_units(cfg);
                let mut units = HashMap::new();
                for name in &wanted {
                    let h = handle(storage, store, name).ok_or_else(|| {
                        ApiError::Conflict(format!("iSCSI LUN {name:?}: no LUN of that name is up"))
                    })?;
                    units.insert(name.clone(), h);
                }
                match current.as_mut() {
                    Some((server, mapped)) => {
                        for name in wanted.iter().filter(|n| !mapped.contains(*n)) {
                            if let Some(h) = units.remove(name) {
                                server.add_unit(name, h);
                            }
                        }
                        server
                            .reconfigure(cfg.clone())
                            .await
                            .map_err(|e| ApiError::Conflict(format!("iSCSI: {e}")))?;
                        for name in mapped.iter().filter(|n| !wanted.contains(*n)) {
                            server.remove_unit(name);
                        }
                        *mapped = wanted;
                    }
                    None => {
                        let server = IscsiServer::start(cfg.clone(), units, ConnConfig::default())
                            .await
                            .map_err(|e| ApiError::Conflict(format!("iSCSI: {e}")))?;
                        tracing::info!("iSCSI target started");
                        *current = Some((server, wanted));
                    }
                }
            }
        }
        Ok(())
    }

    /// The NBD server's bound addresses and counters, when it runs.
    pub async fn nbd_status(&self) -> Option<(Vec<std::net::SocketAddr>, basalt_nbd::NbdMetrics)> {
        let guard = self.nbd.lock().await;
        let server = guard.as_ref()?;
        Some((server.local_addrs().await, server.metrics()))
    }

    /// The iSCSI target's bound portals and counters, when it runs.
    pub async fn iscsi_status(
        &self,
    ) -> Option<(
        Vec<(std::net::SocketAddr, std::net::SocketAddr)>,
        basalt_iscsi::MetricsSnapshot,
    )> {
        let guard = self.iscsi.lock().await;
        let (server, _) = guard.as_ref()?;
        Some((
            server.bound_portals().into_iter().collect(),
            server.metrics(),
        ))
    }

    /// Stops both servers (at shutdown).
    pub async fn stop_all(&self) {
        if let Some(server) = self.nbd.lock().await.take() {
            server.stop(Duration::from_secs(5)).await;
        }
        if let Some((server, _)) = self.iscsi.lock().await.take() {
            server.stop().await;
        }
    }
}
