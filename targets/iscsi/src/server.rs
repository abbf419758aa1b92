//! The tokio driver: listeners on the portals, one task per connection moving bytes
//! between the socket and a sans-IO [`Connection`], running SCSI commands, and the
//! live configuration behind the [`Catalog`] the connections consult.

use crate::catalog::{Catalog, ChapSecrets, LoginDenied, LoginGrant, SessionLuns};
use crate::config::{Chap, ConfigError, IscsiConfig, TargetConfig};
use crate::conn::{ConnConfig, Connection, Event};
use crate::metrics::{LunCounters, MetricsSnapshot, TargetCounters};
use basalt_blockdev::SharedBlockDev;
use basalt_scsi::{LogicalUnit, LunIdentity, LunResolver, NexusId, PrStore};
use bytes::BytesMut;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// A unit to export: the device, its identity, and where its APTPL reservations live.
#[derive(Clone)]
pub struct LunHandle {
    /// The device.
    pub dev: SharedBlockDev,
    /// Identity (keep `id` stable across restarts).
    pub identity: LunIdentity,
    /// Persistence of APTPL reservations.
    pub pr_store: Option<Arc<dyn PrStore>>,
}

/// Errors of the server's control operations.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A portal could not be bound.
    #[error("binding portal {addr}: {source}")]
    Bind {
        /// The portal.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

struct TargetSnap {
    cfg: TargetConfig,
    luns: BTreeMap<u64, Arc<LogicalUnit>>,
    names: BTreeMap<u64, String>,
}

#[derive(Default)]
struct Snapshot {
    targets: HashMap<String, TargetSnap>,
    discovery_chap: Option<Chap>,
    /// Configured portal -> bound address.
    bound: HashMap<SocketAddr, SocketAddr>,
}

struct ConnEntry {
    target: String,
    key: Option<(String, [u8; 6])>,
    kill: Arc<Notify>,
}

struct Inner {
    conn_cfg: ConnConfig,
    snap: RwLock<Arc<Snapshot>>,
    units: Mutex<HashMap<String, Arc<LogicalUnit>>>,
    config: Mutex<IscsiConfig>,
    listeners: Mutex<HashMap<SocketAddr, (SocketAddr, JoinHandle<()>)>>,
    conns: Mutex<HashMap<u64, ConnEntry>>,
    next_conn: AtomicU64,
    counters: Mutex<HashMap<String, Arc<TargetCounters>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.snap
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn counters(&self, target: &str) -> Arc<TargetCounters> {
        lock(&self.counters)
            .entry(target.to_string())
            .or_default()
            .clone()
    }

    fn rebuild(&self) {
        let cfg = lock(&self.config).clone();
        let units = lock(&self.units);
        let bound = self.snapshot().bound.clone();
        let mut targets = HashMap::new();
        for t in &cfg.targets {
            let mut luns = BTreeMap::new();
            let mut names = BTreeMap::new();
            for m in &t.luns {
                if let Some(u) = units.get(&m.name) {
                    luns.insert(m.lun, u.clone());
                    names.insert(m.lun, m.name.clone());
                }
            }
            targets.insert(
                t.iqn.to_ascii_lowercase(),
                TargetSnap {
                    cfg: t.clone(),
                    luns,
                    names,
                },
            );
        }
        let snap = Snapshot {
            targets,
            discovery_chap: cfg.discovery_chap.clone(),
            bound,
        };
        *self.snap.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(snap);
    }

    fn set_bound(&self, bound: HashMap<SocketAddr, SocketAddr>) {
        let old = self.snapshot();
        let snap = Snapshot {
            targets: HashMap::new(),
            discovery_chap: old.discovery_chap.clone(),
            bound,
        };
        *self.snap.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(snap);
        self.rebuild();
    }
}

fn secrets(c: &Chap) -> ChapSecrets {
    ChapSecrets {
        user: c.user.clone(),
        secret: c.secret.clone(),
        mutual: match (&c.mutual_user, &c.mutual_secret) {
            (Some(u), Some(s)) => Some((u.clone(), s.clone())),
            _ => None,
        },
    }
}

/// The LUN view of one session: looked up in the live snapshot on every command.
struct SessionView {
    inner: Arc<Inner>,
    target: String,
    initiator: String,
}

impl SessionView {
    fn visible(&self, t: &TargetSnap, lun: u64) -> bool {
        if let Some(acl) = t
            .cfg
            .acls
            .iter()
            .find(|a| a.initiator.eq_ignore_ascii_case(&self.initiator))
        {
            return acl.luns.as_ref().is_none_or(|l| l.contains(&lun));
        }
        t.cfg.allow_any_initiator
    }
}

impl LunResolver for SessionView {
    fn resolve(&self, designator: &[u8]) -> Option<Arc<LogicalUnit>> {
        let snap = self.inner.snapshot();
        let t = snap.targets.get(&self.target)?;
        t.luns
            .iter()
            .filter(|(n, _)| self.visible(t, **n))
            .map(|(_, u)| u)
            .find(|u| u.has_designator(designator))
            .cloned()
    }
}

impl SessionLuns for SessionView {
    fn lun(&self, lun: u64) -> Option<Arc<LogicalUnit>> {
        let snap = self.inner.snapshot();
        let t = snap.targets.get(&self.target)?;
        if !self.visible(t, lun) {
            return None;
        }
        t.luns.get(&lun).cloned()
    }

    fn list(&self) -> Vec<u64> {
        let snap = self.inner.snapshot();
        let Some(t) = snap.targets.get(&self.target) else {
            return Vec::new();
        };
        t.luns
            .keys()
            .copied()
            .filter(|n| self.visible(t, *n))
            .collect()
    }
}

struct CatalogImpl(Arc<Inner>);

impl CatalogImpl {
    fn serves(snap: &Snapshot, t: &TargetSnap, portal: &str) -> bool {
        t.cfg.portals.iter().any(|p| {
            let b = snap.bound.get(p).copied().unwrap_or(*p);
            b.to_string() == portal
        })
    }
}

impl Catalog for CatalogImpl {
    fn login(
        &self,
        initiator: &str,
        target: Option<&str>,
        portal: &str,
    ) -> Result<LoginGrant, LoginDenied> {
        let snap = self.0.snapshot();
        let Some(name) = target else {
            return Ok(LoginGrant {
                target: String::new(),
                tpgt: 1,
                chap: snap.discovery_chap.as_ref().map(secrets),
                luns: None,
            });
        };
        let key = name.to_ascii_lowercase();
        let counters = self.0.counters(name);
        let Some(t) = snap
            .targets
            .get(&key)
            .filter(|t| Self::serves(&snap, t, portal))
        else {
            counters.login_failures.fetch_add(1, Ordering::Relaxed);
            return Err(LoginDenied::NotFound);
        };
        let acl = t
            .cfg
            .acls
            .iter()
            .find(|a| a.initiator.eq_ignore_ascii_case(initiator));
        let chap = match acl {
            Some(a) => a.chap.as_ref().map(secrets),
            None if t.cfg.allow_any_initiator => t.cfg.chap.as_ref().map(secrets),
            None => {
                counters.login_failures.fetch_add(1, Ordering::Relaxed);
                return Err(LoginDenied::NotAuthorized);
            }
        };
        Ok(LoginGrant {
            target: t.cfg.iqn.clone(),
            tpgt: t.cfg.tpgt,
            chap,
            luns: Some(Arc::new(SessionView {
                inner: self.0.clone(),
                target: key,
                initiator: initiator.to_string(),
            })),
        })
    }

    fn send_targets(
        &self,
        initiator: &str,
        only: Option<&str>,
        portal: &str,
    ) -> Vec<(String, Vec<String>)> {
        let snap = self.0.snapshot();
        let _ = portal;
        let mut out: Vec<(String, Vec<String>)> = snap
            .targets
            .values()
            .filter(|t| only.is_none_or(|o| o.eq_ignore_ascii_case(&t.cfg.iqn)))
            .filter(|t| {
                t.cfg.allow_any_initiator
                    || t.cfg
                        .acls
                        .iter()
                        .any(|a| a.initiator.eq_ignore_ascii_case(initiator))
            })
            .map(|t| {
                let addrs = t
                    .cfg
                    .portals
                    .iter()
                    .map(|p| {
                        let b = snap.bound.get(p).copied().unwrap_or(*p);
                        let host = match b {
                            SocketAddr::V4(a) => a.ip().to_string(),
                            SocketAddr::V6(a) => format!("[{}]", a.ip()),
                        };
                        format!("{host}:{},{}", b.port(), t.cfg.tpgt)
                    })
                    .collect();
                (t.cfg.iqn.clone(), addrs)
            })
            .collect();
        out.sort();
        out
    }
}

/// A running iSCSI target server. Cheap to clone (a handle).
#[derive(Clone)]
pub struct IscsiServer {
    inner: Arc<Inner>,
}

impl IscsiServer {
    /// Validates `config`, creates the units, binds every portal and starts serving.
    /// Must be called inside a tokio runtime.
    pub async fn start(
        config: IscsiConfig,
        units: HashMap<String, LunHandle>,
        conn_cfg: ConnConfig,
    ) -> Result<Self, ServerError> {
        config.validate(|n| units.contains_key(n))?;
        let units = units
            .into_iter()
            .map(|(k, h)| (k, Arc::new(LogicalUnit::new(h.dev, h.identity, h.pr_store))))
            .collect();
        let inner = Arc::new(Inner {
            conn_cfg,
            snap: RwLock::new(Arc::new(Snapshot::default())),
            units: Mutex::new(units),
            config: Mutex::new(config),
            listeners: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            counters: Mutex::new(HashMap::new()),
        });
        let server = IscsiServer { inner };
        server.inner.rebuild();
        server.sync_listeners().await?;
        Ok(server)
    }

    /// Replaces the configuration: targets, LUN maps, ACLs and portals change at once;
    /// new portals are bound, removed ones closed. Sessions stay up; they see LUN and
    /// ACL changes on their next command.
    pub async fn reconfigure(&self, config: IscsiConfig) -> Result<(), ServerError> {
        {
            let units = lock(&self.inner.units);
            config.validate(|n| units.contains_key(n))?;
        }
        *lock(&self.inner.config) = config;
        self.inner.rebuild();
        self.sync_listeners().await
    }

    /// The current configuration.
    pub fn config(&self) -> IscsiConfig {
        lock(&self.inner.config).clone()
    }

    /// Adds (or replaces) a unit by name; map it with [`IscsiServer::reconfigure`].
    pub fn add_unit(&self, name: &str, h: LunHandle) {
        let lu = Arc::new(LogicalUnit::new(h.dev, h.identity, h.pr_store));
        lock(&self.inner.units).insert(name.to_string(), lu);
        self.inner.rebuild();
    }

    /// Removes a unit; targets that mapped it lose that LUN at once.
    pub fn remove_unit(&self, name: &str) {
        lock(&self.inner.units).remove(name);
        self.inner.rebuild();
    }

    /// The address each configured portal is bound to (differs for port 0).
    pub fn bound_portals(&self) -> HashMap<SocketAddr, SocketAddr> {
        lock(&self.inner.listeners)
            .iter()
            .map(|(k, (b, _))| (*k, *b))
            .collect()
    }

    /// Counters of every target.
    pub fn metrics(&self) -> MetricsSnapshot {
        let c = lock(&self.inner.counters);
        let mut targets: Vec<_> = c.iter().map(|(iqn, t)| t.snapshot(iqn)).collect();
        targets.sort_by(|a, b| a.iqn.cmp(&b.iqn));
        MetricsSnapshot { targets }
    }

    /// Stops listening and closes every connection.
    pub async fn stop(&self) {
        for (_, (_, h)) in lock(&self.inner.listeners).drain() {
            h.abort();
        }
        for (_, c) in lock(&self.inner.conns).iter() {
            c.kill.notify_one();
        }
    }

    async fn sync_listeners(&self) -> Result<(), ServerError> {
        let want: Vec<SocketAddr> = {
            let cfg = lock(&self.inner.config);
            let mut v: Vec<SocketAddr> =
                cfg.targets.iter().flat_map(|t| t.portals.clone()).collect();
            v.sort();
            v.dedup();
            v
        };
        let existing: Vec<SocketAddr> = lock(&self.inner.listeners).keys().copied().collect();
        for a in existing {
            if !want.contains(&a) {
                if let Some((_, h)) = lock(&self.inner.listeners).remove(&a) {
                    h.abort();
                }
            }
        }
        for a in want {
            if lock(&self.inner.listeners).contains_key(&a) {
                continue;
            }
            let l = TcpListener::bind(a)
                .await
                .map_err(|source| ServerError::Bind { addr: a, source })?;
            let bound = l
                .local_addr()
                .map_err(|source| ServerError::Bind { addr: a, source })?;
            let inner = self.inner.clone();
            let h = tokio::spawn(accept_loop(inner, l, bound));
            lock(&self.inner.listeners).insert(a, (bound, h));
        }
        self.inner.set_bound(self.bound_portals());
        Ok(())
    }
}

async fn accept_loop(inner: Arc<Inner>, l: TcpListener, bound: SocketAddr) {
    loop {
        match l.accept().await {
            Ok((s, _peer)) => {
                let _ = s.set_nodelay(true);
                tokio::spawn(run_connection(inner.clone(), s, bound));
            }
            Err(e) => {
                tracing::warn!("iscsi accept on {bound}: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

struct Running {
    itt: u32,
    counters: Arc<LunCounters>,
    written: u64,
    start: Instant,
}

async fn run_connection(inner: Arc<Inner>, stream: TcpStream, bound: SocketAddr) {
    let id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
    let kill = Arc::new(Notify::new());
    lock(&inner.conns).insert(
        id,
        ConnEntry {
            target: String::new(),
            key: None,
            kill: kill.clone(),
        },
    );
    let catalog: Arc<dyn Catalog> = Arc::new(CatalogImpl(inner.clone()));
    let mut conn = Connection::new(
        inner.conn_cfg.clone(),
        catalog,
        bound.to_string(),
        Instant::now(),
    );
    let (mut rd, mut wr) = stream.into_split();
    let mut rbuf = BytesMut::with_capacity(512 * 1024);
    let mut running = FuturesUnordered::new();
    let mut target_counters: Option<Arc<TargetCounters>> = None;
    let mut closing = false;
    let mut lun_counters: HashMap<u64, Arc<LunCounters>> = HashMap::new();
    'outer: loop {
        while let Some(ev) = conn.poll_event() {
            match ev {
                Event::Execute(cmd) => {
                    let counters = match (&target_counters, lun_counters.get(&cmd.lun)) {
                        (_, Some(c)) => c.clone(),
                        (Some(t), None) => {
                            let snap = inner.snapshot();
                            let name = snap
                                .targets
                                .get(&cmd.nexus.target.to_ascii_lowercase())
                                .and_then(|t| t.names.get(&cmd.lun).cloned())
                                .unwrap_or_default();
                            let c = t.lun(cmd.lun, &name);
                            lun_counters.insert(cmd.lun, c.clone());
                            c
                        }
                        (None, None) => Arc::new(LunCounters::default()),
                    };
                    let meta = Running {
                        itt: cmd.itt,
                        counters,
                        written: cmd.data_out.len() as u64,
                        start: Instant::now(),
                    };
                    running.push(cmd.run().map(move |(_, r)| (meta, r)));
                }
                Event::LoggedIn { nexus, target } => {
                    if let Some(n) = nexus {
                        let c = inner.counters(&target);
                        c.sessions.fetch_add(1, Ordering::Relaxed);
                        c.logins.fetch_add(1, Ordering::Relaxed);
                        target_counters = Some(c);
                        reinstate(&inner, id, &n);
                    }
                }
                Event::Aborted(_) => {}
                Event::TargetReset { cold } => {
                    if cold {
                        let t = conn.nexus().map(|n| n.target.clone()).unwrap_or_default();
                        for (cid, c) in lock(&inner.conns).iter() {
                            if *cid != id && c.target.eq_ignore_ascii_case(&t) {
                                c.kill.notify_one();
                            }
                        }
                    }
                }
                Event::Close => closing = true,
            }
        }
        if conn.has_output() {
            let out = conn.transmit();
            if wr.write_all(&out).await.is_err() {
                break;
            }
        }
        if closing {
            break;
        }
        let timeout = conn.poll_timeout();
        tokio::select! {
            r = rd.read_buf(&mut rbuf) => {
                match r {
                    Ok(0) | Err(_) => break 'outer,
                    Ok(_) => conn.receive(&mut rbuf, Instant::now()),
                }
                if rbuf.capacity() - rbuf.len() < 64 * 1024 {
                    rbuf.reserve(256 * 1024);
                }
            }
            Some((meta, r)) = running.next(), if !running.is_empty() => {
                finish(&mut conn, meta, r);
                while let Some(Some((meta, r))) = running.next().now_or_never() {
                    finish(&mut conn, meta, r);
                }
            }
            _ = sleep_until(timeout) => conn.handle_timeout(Instant::now()),
            _ = kill.notified() => break 'outer,
        }
    }
    let _ = wr.shutdown().await;
    conn.shutdown();
    if let Some(c) = target_counters {
        c.sessions.fetch_sub(1, Ordering::Relaxed);
    }
    lock(&inner.conns).remove(&id);
}

fn finish(conn: &mut Connection, meta: Running, r: basalt_scsi::Response) {
    let nanos = meta.start.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
    meta.counters.record(
        r.data.len() as u64,
        meta.written,
        r.sense.map(|s| s.key),
        nanos,
    );
    conn.complete(meta.itt, r);
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

/// Session reinstatement (RFC 7143 6.3.5): a new session with the same initiator name
/// and ISID replaces the old one, whose connection is closed.
fn reinstate(inner: &Inner, id: u64, n: &NexusId) {
    let key = (n.initiator.clone(), n.isid);
    let mut conns = lock(&inner.conns);
    for (cid, c) in conns.iter() {
        if *cid != id && c.key.as_ref() == Some(&key) && c.target.eq_ignore_ascii_case(&n.target) {
            c.kill.notify_one();
        }
    }
    if let Some(c) = conns.get_mut(&id) {
        c.key = Some(key);
        c.target = n.target.clone();
    }
}
