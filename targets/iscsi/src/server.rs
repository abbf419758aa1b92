//! The tokio driver: listeners on the portals, one task per connection moving bytes
//! between the socket and a sans-IO [`Connection`], running SCSI commands, and the
//! live configuration behind the [`Catalog`] the connections consult.

use crate::catalog::{Catalog, ChapSecrets, LoginDenied, LoginGrant, SessionLuns};
use crate::config::{Chap, ConfigError, IscsiConfig, TargetConfig};
use crate::conn::{ConnConfig, Connection, Event};
use crate::metrics::{LunCounters, MetricsSnapshot, TargetCounters};
use basalt_blockdev::SharedBlockDev;
use basalt_scsi::{LogicalUnit, LunIdentity, LunResolver, NexusId, PrStore};
use bytes::Buf;
use bytes::BytesMut;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
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
    inbox: mpsc::UnboundedSender<ConnMsg>,
}

/// What one connection's task asks of another.
enum ConnMsg {
    /// Abort every task on these units (another session's reset or CLEAR TASK SET);
    /// drop `ack` once they have all ended. The sender waits until every clone of
    /// `ack` is gone.
    Abort {
        units: Vec<Arc<LogicalUnit>>,
        ack: mpsc::Sender<()>,
    },
}

struct Inner {
    conn_cfg: ConnConfig,
    snap: RwLock<Arc<Snapshot>>,
    /// Bumped after every new snapshot: sessions cache LUN lookups until it changes.
    version: AtomicU64,
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
        self.version.fetch_add(1, Ordering::Release);
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

/// The LUN view of one session: looked up in the live snapshot; connections cache the
/// answers until [`Inner::version`] changes.
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

    fn version(&self) -> Option<u64> {
        Some(self.inner.version.load(Ordering::Acquire))
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
            version: AtomicU64::new(0),
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

/// Most bytes queued for the socket before the driver stops reading commands (the
/// initiator is not reading its responses; in-flight commands still finish).
const TX_HIGH_WATER: usize = 16 << 20;
/// Free space kept in the receive buffer before each read.
const RX_MIN_FREE: usize = 64 * 1024;
/// Receive buffer growth step.
const RX_CHUNK: usize = 256 * 1024;
/// I/O vector entries per write.
const MAX_IOV: usize = 128;
/// Loop turns with progress before the driver yields to other tasks.
const TURNS_BEFORE_YIELD: u32 = 64;

/// The state of one connection's task: the socket, the sans-IO connection, the
/// commands running, and what the driver needs for metrics and resets.
struct ConnDriver<F, M> {
    inner: Arc<Inner>,
    id: u64,
    conn: Connection,
    stream: TcpStream,
    rbuf: BytesMut,
    /// Makes the future of a command (a closure, so that the future's type, which
    /// has no name, can be the type parameter `F`).
    start: M,
    running: FuturesUnordered<F>,
    target_counters: Option<Arc<TargetCounters>>,
    lun_counters: Vec<(u64, Arc<LunCounters>)>,
    closing: bool,
    sleep: Pin<Box<tokio::time::Sleep>>,
    sleep_at: Option<Instant>,
    kill: Pin<Box<tokio::sync::futures::OwnedNotified>>,
    inbox: mpsc::UnboundedReceiver<ConnMsg>,
    /// Our task management functions waiting for other connections: (ticket, the
    /// receiver that ends when every connection has dropped its ack).
    resets: Vec<(u64, mpsc::Receiver<()>)>,
    /// Acks of other connections' aborts we still owe: (our ticket, ack).
    acks: Vec<(u64, mpsc::Sender<()>)>,
}

/// How a connection's task ended.
enum Exit {
    /// Closed by the protocol (logout, error) after the last bytes went out.
    Closed,
    /// The peer went away, the socket failed, or the server killed the connection.
    Dropped,
}

impl<F, M> ConnDriver<F, M>
where
    F: Future<Output = (Running, basalt_scsi::Response)>,
    M: Fn(crate::conn::Command, Running) -> F,
{
    /// Starts the commands and handles the session events the connection produced.
    fn drain_events(&mut self) {
        while let Some(ev) = self.conn.poll_event() {
            match ev {
                Event::Execute(cmd) => {
                    let meta = Running {
                        itt: cmd.itt,
                        counters: self.lun_counters(&cmd),
                        written: cmd.data_out.len() as u64,
                        start: Instant::now(),
                    };
                    self.running.push((self.start)(cmd, meta));
                }
                Event::LoggedIn { nexus, target } => {
                    if let Some(n) = nexus {
                        let c = self.inner.counters(&target);
                        c.sessions.fetch_add(1, Ordering::Relaxed);
                        c.logins.fetch_add(1, Ordering::Relaxed);
                        self.target_counters = Some(c);
                        reinstate(&self.inner, self.id, &n);
                    }
                }
                Event::Aborted(_) => {}
                Event::AbortElsewhere { ticket, units } => {
                    let (ack, done) = mpsc::channel(1);
                    for (cid, c) in lock(&self.inner.conns).iter() {
                        if *cid != self.id {
                            let _ = c.inbox.send(ConnMsg::Abort {
                                units: units.clone(),
                                ack: ack.clone(),
                            });
                        }
                    }
                    self.resets.push((ticket, done));
                }
                Event::AbortDone(ticket) => self.acks.retain(|(t, _)| *t != ticket),
                Event::TargetReset { cold } => {
                    if cold {
                        let t = self
                            .conn
                            .nexus()
                            .map(|n| n.target.clone())
                            .unwrap_or_default();
                        for (cid, c) in lock(&self.inner.conns).iter() {
                            if *cid != self.id && c.target.eq_ignore_ascii_case(&t) {
                                c.kill.notify_one();
                            }
                        }
                    }
                }
                Event::Close => self.closing = true,
            }
        }
    }

    fn lun_counters(&mut self, cmd: &crate::conn::Command) -> Arc<LunCounters> {
        if let Some((_, c)) = self.lun_counters.iter().find(|(l, _)| *l == cmd.lun) {
            return c.clone();
        }
        let Some(t) = &self.target_counters else {
            return Arc::new(LunCounters::default());
        };
        let snap = self.inner.snapshot();
        let name = snap
            .targets
            .get(&cmd.nexus.target.to_ascii_lowercase())
            .and_then(|t| t.names.get(&cmd.lun).cloned())
            .unwrap_or_default();
        let c = t.lun(cmd.lun, &name);
        self.lun_counters.push((cmd.lun, c.clone()));
        c
    }

    /// Runs the connection until it ends: reads and parses everything the socket
    /// has, starts the commands, collects their results, and writes every queued
    /// response with one vectored write, then sleeps until the socket, a command,
    /// the timer or a kill wakes it.
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<Exit> {
        let mut turns = 0;
        loop {
            let mut progress = false;
            // Read what the socket has, unless responses are piling up unread.
            if !self.closing && self.conn.outgoing().remaining() < TX_HIGH_WATER {
                if self.rbuf.capacity() - self.rbuf.len() < RX_MIN_FREE {
                    self.rbuf.reserve(RX_CHUNK);
                }
                // poll_read (not try_read) so that a short read, which drained the
                // socket, clears tokio's readiness at once instead of costing one
                // more read that would block.
                let mut rb = ReadBuf::uninit(self.rbuf.spare_capacity_mut());
                match Pin::new(&mut self.stream).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            return Poll::Ready(Exit::Dropped);
                        }
                        // SAFETY: the read initialised the first n bytes of the spare
                        // capacity (ReadBuf tracks what it filled).
                        unsafe { self.rbuf.set_len(self.rbuf.len() + n) };
                        self.conn.receive(&mut self.rbuf, Instant::now());
                        progress = true;
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(Exit::Dropped),
                    Poll::Pending => {}
                }
            }
            // Other connections' resets, and the answers to ours.
            while let Poll::Ready(Some(msg)) = self.inbox.poll_recv(cx) {
                match msg {
                    ConnMsg::Abort { units, ack } => {
                        if let Some(ticket) = self.conn.abort_for_others(&units) {
                            self.acks.push((ticket, ack));
                        }
                    }
                }
                progress = true;
            }
            let mut i = 0;
            while i < self.resets.len() {
                if let Poll::Ready(None) = self.resets[i].1.poll_recv(cx) {
                    let (ticket, _) = self.resets.swap_remove(i);
                    self.conn.abort_elsewhere_done(ticket);
                    progress = true;
                } else {
                    i += 1;
                }
            }
            // Start new commands and finish completed ones until neither happens.
            loop {
                self.drain_events();
                let mut done = false;
                while let Poll::Ready(Some((meta, r))) = self.running.poll_next_unpin(cx) {
                    finish(&mut self.conn, meta, r);
                    done = true;
                }
                if !done {
                    break;
                }
                progress = true;
            }
            // Write everything queued.
            while self.conn.has_output() {
                let q = self.conn.outgoing();
                let mut iov = [IoSlice::new(&[]); MAX_IOV];
                let n = q.chunks_vectored(&mut iov);
                match Pin::new(&mut self.stream).poll_write_vectored(cx, &iov[..n]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Exit::Dropped),
                    Poll::Ready(Ok(w)) => {
                        self.conn.outgoing().advance(w);
                        progress = true;
                    }
                    Poll::Pending => break,
                }
            }
            if self.closing && !self.conn.has_output() {
                return Poll::Ready(Exit::Closed);
            }
            if self.kill.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Exit::Dropped);
            }
            // Timers: login timeout, NOP-In keepalive.
            let at = self.conn.poll_timeout();
            if at != self.sleep_at {
                self.sleep_at = at;
                let deadline = at.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
                self.sleep
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(deadline));
            }
            if self.sleep_at.is_some() && self.sleep.as_mut().poll(cx).is_ready() {
                self.conn.handle_timeout(Instant::now());
                // The deadline moves (or the connection closes); poll it again.
                self.sleep_at = None;
                progress = true;
            }
            if !progress {
                return Poll::Pending;
            }
            turns += 1;
            if turns == TURNS_BEFORE_YIELD {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    }
}

async fn run_connection(inner: Arc<Inner>, stream: TcpStream, bound: SocketAddr) {
    let id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
    let kill = Arc::new(Notify::new());
    let (inbox_tx, inbox) = mpsc::unbounded_channel();
    lock(&inner.conns).insert(
        id,
        ConnEntry {
            target: String::new(),
            key: None,
            kill: kill.clone(),
            inbox: inbox_tx,
        },
    );
    let catalog: Arc<dyn Catalog> = Arc::new(CatalogImpl(inner.clone()));
    let conn = Connection::new(
        inner.conn_cfg.clone(),
        catalog,
        bound.to_string(),
        Instant::now(),
    );
    let mut d = ConnDriver {
        inner: inner.clone(),
        id,
        conn,
        stream,
        rbuf: BytesMut::with_capacity(RX_CHUNK),
        start: |cmd: crate::conn::Command, meta: Running| cmd.run().map(move |(_, r)| (meta, r)),
        running: FuturesUnordered::new(),
        target_counters: None,
        lun_counters: Vec::new(),
        closing: false,
        sleep: Box::pin(tokio::time::sleep(Duration::from_secs(86_400))),
        sleep_at: None,
        kill: Box::pin(kill.notified_owned()),
        inbox,
        resets: Vec::new(),
        acks: Vec::new(),
    };
    let exit = std::future::poll_fn(|cx| d.poll_run(cx)).await;
    if let Exit::Closed = exit {
        let _ = d.stream.shutdown().await;
    }
    d.conn.shutdown();
    if let Some(c) = d.target_counters.take() {
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
