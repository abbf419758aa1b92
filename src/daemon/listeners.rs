//! The API's listeners: HTTPS on TCP addresses from the configuration, and HTTP on a
//! unix socket in the data directory (for the local CLI).
//!
//! Each connection is served by hyper in its own task, with the TLS handshake inside
//! that task so that a slow client cannot stall the accept loop. Listeners can be
//! replaced while the daemon runs (`[api] listen` in an applied configuration); at
//! shutdown every accept loop stops and open connections get a grace period to finish.

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long open connections may run on after shutdown begins.
const GRACE: Duration = Duration::from_secs(10);

/// The set of running listeners.
pub struct Listeners {
    router: OnceLock<Router>,
    tls: TlsAcceptor,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// Configured address -> (bound address, stop token). They differ for port 0.
    tcp: Mutex<BTreeMap<SocketAddr, (SocketAddr, CancellationToken)>>,
}

impl Listeners {
    /// Listeners that will serve `router` once [`Listeners::set_router`] is called.
    pub fn new(tls: TlsAcceptor, shutdown: CancellationToken) -> Arc<Listeners> {
        Arc::new(Listeners {
            router: OnceLock::new(),
            tls,
            shutdown,
            tracker: TaskTracker::new(),
            tcp: Mutex::new(BTreeMap::new()),
        })
    }

    /// Sets the service (once; the router needs the appliance, which needs us).
    pub fn set_router(&self, router: Router) {
        let _ = self.router.set(router);
    }

    fn router(&self) -> Router {
        self.router.get().cloned().unwrap_or_default()
    }

    /// The TCP addresses being served (as bound: port 0 becomes the real port).
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.tcp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|(bound, _)| *bound)
            .collect()
    }

    fn configured(&self) -> Vec<SocketAddr> {
        self.tcp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// Binds every address of `wanted` not served yet, so that an apply that cannot
    /// listen is refused before anything changes.
    pub async fn bind_new(
        &self,
        wanted: &[SocketAddr],
    ) -> Result<Vec<(SocketAddr, TcpListener)>, String> {
        let current = self.configured();
        let mut bound = Vec::new();
        for addr in wanted.iter().filter(|a| !current.contains(a)) {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            bound.push((*addr, listener));
        }
        Ok(bound)
    }

    /// Starts serving the freshly bound listeners and stops those not in `wanted`.
    pub fn replace(&self, bound: Vec<(SocketAddr, TcpListener)>, wanted: &[SocketAddr]) {
        let stale: Vec<SocketAddr> = self
            .configured()
            .into_iter()
            .filter(|a| !wanted.contains(a))
            .collect();
        {
            let mut tcp = self.tcp.lock().unwrap_or_else(|p| p.into_inner());
            for addr in stale {
                if let Some((_, token)) = tcp.remove(&addr) {
                    token.cancel();
                    tracing::info!(%addr, "stopped listening");
                }
            }
        }
        for (addr, listener) in bound {
            self.serve_tcp(addr, listener);
        }
    }

    /// Serves HTTPS on a bound TCP listener.
    pub fn serve_tcp(&self, addr: SocketAddr, listener: TcpListener) {
        let stop = self.shutdown.child_token();
        let configured = addr;
        let addr = listener.local_addr().unwrap_or(addr);
        self.tcp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(configured, (addr, stop.clone()));
        tracing::info!(%addr, "listening (https)");
        let tls = self.tls.clone();
        let router = self.router();
        let tracker = self.tracker.clone();
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(%addr, error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let tls = tls.clone();
                let router = router.clone();
                let shutdown = shutdown.clone();
                tracker.spawn(async move {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), tls.accept(stream));
                    match handshake.await {
                        Ok(Ok(stream)) => serve_connection(stream, router, shutdown).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
    }

    /// Serves plain HTTP on the unix socket at `path` (mode 0600: only the owner, who
    /// can also read the token, may connect).
    pub fn serve_unix(&self, path: &Path) -> std::io::Result<()> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        tracing::info!(path = %path.display(), "listening (unix socket)");
        let router = self.router();
        let tracker = self.tracker.clone();
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(async move {
            loop {
                let stream = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok((s, _)) => s,
                        Err(e) => {
                            tracing::warn!(error = %e, "unix accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let router = router.clone();
                let shutdown = shutdown.clone();
                tracker.spawn(serve_connection(stream, router, shutdown));
            }
        });
        Ok(())
    }

    /// Waits until every listener and connection has finished, at most the grace period
    /// after shutdown was requested.
    pub async fn drain(&self) {
        self.tracker.close();
        if tokio::time::timeout(GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("connections still open after the grace period; closing them");
        }
    }
}

async fn serve_connection<S>(stream: S, router: Router, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            // Finish the request in flight, refuse new ones on this connection.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
