//! The tokio driver: [`NbdServer`] owns the listeners, the live configuration and the
//! connections.
//!
//! # How the daemon drives it
//!
//! ```no_run
//! # use basalt_nbd::{NbdConfig, NbdServer, ExportConfig, TlsMode};
//! # use basalt_blockdev::{MemDev, SharedBlockDev};
//! # use std::{collections::BTreeMap, sync::Arc, time::Duration};
//! # async fn demo() -> Result<(), basalt_nbd::NbdServerError> {
//! let mut config = NbdConfig::default();
//! config.listen = vec!["127.0.0.1:10809".parse().unwrap()];
//! config.exports.insert("lun0".into(), ExportConfig::default());
//! let mut devices: BTreeMap<String, SharedBlockDev> = BTreeMap::new();
//! devices.insert("lun0".into(), Arc::new(MemDev::new(1 << 20, 512)));
//! let server = NbdServer::start(config.clone(), devices.clone(), None).await?;
//!
//! // Later: any change (exports, access, TLS, listeners) is a new whole config.
//! config.exports.get_mut("lun0").unwrap().read_only = true;
//! server.reconfigure(config, devices, None).await?;
//!
//! let metrics = server.metrics(); // render as Prometheus series
//! server.stop(Duration::from_secs(5)).await;
//! # Ok(()) }
//! ```
//!
//! # Reconfiguration
//!
//! [`NbdServer::reconfigure`] takes the whole desired state. New listen addresses are
//! bound first (a failure changes nothing); then the new state replaces the old for
//! every later handshake, and running connections are adjusted:
//! - an export removed, or given another device object: its connections drain (requests
//!   in flight finish, later ones get `ESHUTDOWN`) and close, so one export is never
//!   served by two device objects at once (the multi-conn guarantee needs one);
//! - an export made read-only: later writes on its open connections fail with `EPERM`;
//! - allowed networks changed: connections from peers no longer allowed drain and close;
//! - TLS mode or certificate changed: applies to new connections.
//!
//! [`NbdServer::stop`] stops accepting, lets every connection drain for a grace period
//! (handshakes get `NBD_REP_ERR_SHUTDOWN`), then drops what is left.

mod config;
mod connection;
mod exec;
mod metrics;

pub use config::{Cidr, CidrParseError, ExportConfig, NbdConfig, TlsMode};
use metrics::ExportMetrics;
pub use metrics::{
    CommandSnapshot, ExportMetricsSnapshot, NbdMetrics, ServerMetricsSnapshot,
    LATENCY_BUCKETS_SECONDS,
};

use crate::handshake::{Catalog, ExportInfo, Lookup, TlsPolicy};
use crate::proto::{MAX_PAYLOAD, MAX_STRING};
use basalt_blockdev::SharedBlockDev;
use connection::Signals;
use metrics::ServerCounters;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why the server could not start or take a configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdServerError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// An export has no device in the device map.
    #[error("export {0:?} has no device")]
    MissingDevice(String),
    /// An export name the protocol cannot carry (empty, over 4096 bytes, or with NUL).
    #[error("export name {0:?} is not a valid NBD export name")]
    InvalidExportName(String),
    /// `default_export` names no export.
    #[error("default export {0:?} is not an export")]
    UnknownDefaultExport(String),
    /// TLS is `allow` or `require` but no rustls configuration was given.
    #[error("TLS mode {0:?} needs a TLS server configuration")]
    TlsWithoutConfig(TlsMode),
    /// A limit is zero.
    #[error("{0} must be at least 1")]
    InvalidLimit(&'static str),
    /// A unix socket could not be bound.
    #[error("cannot listen on {}: {source}", path.display())]
    BindUnix {
        /// The socket's path.
        path: std::path::PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// Export name to device, handed in by the daemon next to the configuration.
pub type Devices = BTreeMap<String, SharedBlockDev>;

/// The live state of one export, shared by its connections.
pub(crate) struct ExportHandle {
    pub(crate) device: SharedBlockDev,
    pub(crate) read_only: AtomicBool,
    pub(crate) metrics: Arc<ExportMetrics>,
    /// Cancelled when the export is removed or its device replaced.
    pub(crate) cancel: CancellationToken,
    conns: Mutex<HashMap<u64, (IpAddr, CancellationToken)>>,
    next_conn: AtomicU64,
}

impl ExportHandle {
    fn new(device: SharedBlockDev, read_only: bool, metrics: Arc<ExportMetrics>) -> Self {
        ExportHandle {
            device,
            read_only: AtomicBool::new(read_only),
            metrics,
            cancel: CancellationToken::new(),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
        }
    }

    /// Records a connection from `ip`; returns its id and the token that drains it.
    pub(crate) fn register(&self, ip: IpAddr) -> (u64, CancellationToken) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, (ip, token.clone()));
        (id, token)
    }

    pub(crate) fn unregister(&self, id: u64) {
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// Drains the connections whose peer `allowed` rejects.
    fn drain_disallowed(&self, allowed: impl Fn(IpAddr) -> bool) {
        for (ip, token) in self
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            if !allowed(*ip) {
                token.cancel();
            }
        }
    }
}

/// One version of the desired state, swapped whole on reconfiguration.
pub(crate) struct State {
    pub(crate) config: NbdConfig,
    pub(crate) exports: BTreeMap<String, Arc<ExportHandle>>,
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
}

impl State {
    pub(crate) fn tls_policy(&self) -> TlsPolicy {
        match (self.config.tls, &self.tls) {
            (TlsMode::Allow, Some(_)) => TlsPolicy::Allow,
            (TlsMode::Require, Some(_)) => TlsPolicy::Require,
            _ => TlsPolicy::Off,
        }
    }

    fn info(&self, name: &str, handle: &ExportHandle) -> ExportInfo {
        let g = handle.device.geometry();
        let min = g.block_size.max(1);
        let preferred = g
            .physical_block_size
            .max(min)
            .max(4096)
            .checked_next_power_of_two()
            .unwrap_or(4096);
        let cfg = self.config.exports.get(name);
        ExportInfo {
            name: name.to_owned(),
            description: cfg.and_then(|c| c.description.clone()),
            size: g.capacity_bytes(),
            min_block_size: min,
            preferred_block_size: preferred,
            max_block_size: MAX_PAYLOAD,
            read_only: handle.read_only.load(Ordering::Relaxed) || g.capabilities.read_only,
            trim: g.capabilities.discard,
            multi_conn: true,
            rotational: false,
        }
    }
}

/// The exports as one peer sees them.
pub(crate) struct PeerCatalog<'a> {
    state: &'a State,
    ip: IpAddr,
}

impl<'a> PeerCatalog<'a> {
    pub(crate) fn new(state: &'a State, ip: IpAddr) -> Self {
        PeerCatalog { state, ip }
    }

    fn allowed(&self, name: &str) -> bool {
        self.state
            .config
            .exports
            .get(name)
            .is_some_and(|e| e.allows(self.ip))
    }
}

impl Catalog for PeerCatalog<'_> {
    fn list(&self) -> Vec<String> {
        self.state
            .exports
            .keys()
            .filter(|n| self.allowed(n))
            .cloned()
            .collect()
    }

    fn lookup(&self, name: &str) -> Lookup {
        let name = if name.is_empty() {
            match &self.state.config.default_export {
                Some(d) => d.as_str(),
                None => return Lookup::Unknown,
            }
        } else {
            name
        };
        let Some(handle) = self.state.exports.get(name) else {
            return Lookup::Unknown;
        };
        if !self.allowed(name) {
            handle.metrics.denied();
            return Lookup::Denied;
        }
        Lookup::Found(self.state.info(name, handle))
    }
}

/// What every task of the server shares.
pub(crate) struct Shared {
    state: RwLock<Arc<State>>,
    pub(crate) counters: ServerCounters,
}

impl Shared {
    pub(crate) fn current(&self) -> Arc<State> {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

struct Listener {
    local: SocketAddr,
    cancel: CancellationToken,
}

/// A running NBD server. See the [module docs](self).
pub struct NbdServer {
    shared: Arc<Shared>,
    listeners: tokio::sync::Mutex<BTreeMap<SocketAddr, Listener>>,
    tracker: TaskTracker,
    signals: Signals,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer").finish_non_exhaustive()
    }
}

fn validate(
    config: &NbdConfig,
    devices: &Devices,
    tls: &Option<Arc<rustls::ServerConfig>>,
) -> Result<(), NbdServerError> {
    for name in config.exports.keys() {
        if name.is_empty() || name.len() > MAX_STRING || name.contains('\0') {
            return Err(NbdServerError::InvalidExportName(name.clone()));
        }
        if !devices.contains_key(name) {
            return Err(NbdServerError::MissingDevice(name.clone()));
        }
    }
    if let Some(d) = &config.default_export {
        if !config.exports.contains_key(d) {
            return Err(NbdServerError::UnknownDefaultExport(d.clone()));
        }
    }
    if config.tls != TlsMode::Off && tls.is_none() {
        return Err(NbdServerError::TlsWithoutConfig(config.tls));
    }
    if config.max_connections == 0 {
        return Err(NbdServerError::InvalidLimit("max_connections"));
    }
    if config.max_in_flight == 0 {
        return Err(NbdServerError::InvalidLimit("max_in_flight"));
    }
    Ok(())
}

impl NbdServer {
    /// Validates `config`, binds its listen addresses and starts serving the exports in
    /// `devices` (by export name). `tls` is required when `config.tls` is not `off`.
    pub async fn start(
        config: NbdConfig,
        devices: Devices,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<NbdServer, NbdServerError> {
        validate(&config, &devices, &tls)?;
        let server = NbdServer {
            shared: Arc::new(Shared {
                state: RwLock::new(Arc::new(State {
                    config: NbdConfig {
                        listen: Vec::new(),
                        exports: BTreeMap::new(),
                        ..config.clone()
                    },
                    exports: BTreeMap::new(),
                    tls: None,
                })),
                counters: ServerCounters::default(),
            }),
            listeners: tokio::sync::Mutex::new(BTreeMap::new()),
            tracker: TaskTracker::new(),
            signals: Signals {
                stop: CancellationToken::new(),
                kill: CancellationToken::new(),
            },
        };
        server.reconfigure(config, devices, tls).await?;
        Ok(server)
    }

    /// The addresses actually bound, in the order of `config.listen` (ports resolved).
    pub async fn local_addrs(&self) -> Vec<SocketAddr> {
        let listen = self.shared.current().config.listen.clone();
        let listeners = self.listeners.lock().await;
        listen
            .iter()
            .filter_map(|a| listeners.get(a).map(|l| l.local))
            .collect()
    }

    /// Applies a new desired state. See the [module docs](self) for what happens to
    /// open connections. On error nothing changes.
    pub async fn reconfigure(
        &self,
        config: NbdConfig,
        devices: Devices,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<(), NbdServerError> {
        validate(&config, &devices, &tls)?;
        let mut listeners = self.listeners.lock().await;
        // Bind what is new before changing anything.
        let mut bound = Vec::new();
        for addr in &config.listen {
            if listeners.contains_key(addr) || bound.iter().any(|(a, _)| a == addr) {
                continue;
            }
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| NbdServerError::Bind {
                    addr: *addr,
                    source,
                })?;
            bound.push((*addr, l));
        }

        let old = self.shared.current();
        let mut exports = BTreeMap::new();
        for (name, ecfg) in &config.exports {
            let Some(device) = devices.get(name) else {
                continue;
            };
            let handle = match old.exports.get(name) {
                Some(h) if Arc::ptr_eq(&h.device, device) => {
                    h.read_only.store(ecfg.read_only, Ordering::Relaxed);
                    let e = ecfg.clone();
                    h.drain_disallowed(|ip| e.allows(ip));
                    h.clone()
                }
                Some(h) => {
                    h.cancel.cancel();
                    Arc::new(ExportHandle::new(
                        device.clone(),
                        ecfg.read_only,
                        h.metrics.clone(),
                    ))
                }
                None => Arc::new(ExportHandle::new(
                    device.clone(),
                    ecfg.read_only,
                    Arc::new(ExportMetrics::default()),
                )),
            };
            exports.insert(name.clone(), handle);
        }
        for (name, h) in &old.exports {
            if !exports.contains_key(name) {
                h.cancel.cancel();
            }
        }
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let keep: Vec<SocketAddr> = config.listen.clone();
        *self
            .shared
            .state
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(State {
            config,
            exports,
            tls: acceptor,
        });

        // Stop listeners no longer wanted, start the new ones.
        listeners.retain(|addr, l| {
            let wanted = keep.contains(addr);
            if !wanted {
                l.cancel.cancel();
            }
            wanted
        });
        for (addr, l) in bound {
            let local = l.local_addr().unwrap_or(addr);
            let cancel = self.signals.stop.child_token();
            listeners.insert(
                addr,
                Listener {
                    local,
                    cancel: cancel.clone(),
                },
            );
            self.tracker.spawn(accept_loop(
                AnyListener::Tcp(l),
                cancel,
                self.shared.clone(),
                self.tracker.clone(),
                self.signals.clone(),
            ));
        }
        Ok(())
    }

    /// Also serves on the unix socket `path` (a stale socket file there is replaced),
    /// until [`NbdServer::stop`]; the file is removed when the server stops. Unix peers
    /// count as `127.0.0.1` for `allowed_networks`; who may connect is up to the
    /// socket's file permissions (0600: the server's user only). This listener is not
    /// part of [`NbdConfig`], so a reconfiguration keeps it: the daemon uses it to hand
    /// LUNs to its own VMM processes.
    pub fn serve_unix(&self, path: &std::path::Path) -> Result<(), NbdServerError> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let err = |source| NbdServerError::BindUnix {
            path: path.to_path_buf(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if meta.file_type().is_socket() {
                std::fs::remove_file(path).map_err(err)?;
            }
        }
        let l = tokio::net::UnixListener::bind(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        self.tracker.spawn(accept_loop(
            AnyListener::Unix(l, path.to_path_buf()),
            self.signals.stop.child_token(),
            self.shared.clone(),
            self.tracker.clone(),
            self.signals.clone(),
        ));
        Ok(())
    }

    /// Counters of the server and of every export.
    pub fn metrics(&self) -> NbdMetrics {
        let state = self.shared.current();
        NbdMetrics {
            server: self.shared.counters.snapshot(),
            exports: state
                .exports
                .iter()
                .map(|(n, h)| (n.clone(), h.metrics.snapshot()))
                .collect(),
        }
    }

    /// Stops accepting, lets connections drain for up to `grace`, then closes the rest.
    pub async fn stop(self, grace: Duration) {
        self.signals.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            self.signals.kill.cancel();
            self.tracker.wait().await;
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        // Dropped without stop(): end everything at once.
        self.signals.stop.cancel();
        self.signals.kill.cancel();
    }
}

enum AnyListener {
    Tcp(TcpListener),
    /// With its path, removed when the loop ends.
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// Unix peers count as loopback.
const UNIX_PEER: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

impl AnyListener {
    async fn accept(&self) -> std::io::Result<(Accepted, SocketAddr)> {
        match self {
            AnyListener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Accepted::Tcp(s), peer))
            }
            AnyListener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                Ok((Accepted::Unix(s), UNIX_PEER))
            }
        }
    }
}

async fn accept_loop(
    listener: AnyListener,
    cancel: CancellationToken,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    signals: Signals,
) {
    loop {
        // Stop first: a client that connected as the server stopped (one that lost its
        // connection to the stop and came straight back) must not be accepted.
        let accepted = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(v) => v,
            Err(e) => {
                // Out of descriptors and the like: back off briefly.
                tracing::warn!(error = %e, "NBD accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let counters = &shared.counters;
        let max = shared.current().config.max_connections as u64;
        if counters.connections_active.load(Ordering::Relaxed) >= max {
            counters.connections_refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        counters.connections_total.fetch_add(1, Ordering::Relaxed);
        counters.connections_active.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        let signals = signals.clone();
        tracker.spawn(async move {
            match stream {
                Accepted::Tcp(s) => {
                    let lowat = connection::RecvLowat::of_tcp(&s);
                    connection::serve(s, lowat, peer, shared.clone(), signals).await
                }
                Accepted::Unix(s) => {
                    let lowat = connection::RecvLowat::none();
                    connection::serve(s, lowat, peer, shared.clone(), signals).await
                }
            }
            shared
                .counters
                .connections_active
                .fetch_sub(1, Ordering::Relaxed);
        });
    }
    if let AnyListener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
}
