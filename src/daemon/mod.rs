//! `basalt serve`: the appliance daemon.
//!
//! Start-up order: take the data directory's lock, load or make the credentials, open
//! the appliance store, open the disks, apply `--config` if given, then listen. On
//! SIGTERM or SIGINT: stop accepting, let requests in flight finish (bounded), flush the
//! disks and the store, exit 0.

pub mod appliance;
pub mod disks;
pub mod listeners;
pub mod lockspaces;
pub mod sections;
pub mod security;
pub mod storage;
pub mod switches;
pub mod targets;
pub mod vms;

use crate::api::{self, ApiState};
use crate::metrics::Metrics;
use anyhow::{bail, Context, Result};
use appliance::Appliance;
use basalt_config::Store;
use listeners::Listeners;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// File name of the unix socket in the data directory.
pub const SOCKET_FILE: &str = "basalt.sock";
/// File name of the lock that keeps a second daemon off the same data directory.
pub const LOCK_FILE: &str = "basalt.lock";
/// Directory of the appliance store in the data directory.
pub const STORE_DIR: &str = "store";

/// Options of `basalt serve`.
pub struct ServeOptions {
    /// The data directory.
    pub data_dir: PathBuf,
    /// A desired-state document to apply at start.
    pub config: Option<PathBuf>,
    /// Set up the embedded default on a fresh data directory when no `config` is given.
    pub defaults: bool,
}

/// Disks of the embedded default: sparse files, so they cost no space until written.
const DEFAULT_DISKS: usize = 4;
const DEFAULT_DISK_SIZE: &str = "8G";

/// The embedded default desired state for a fresh appliance on `data_dir`: a few
/// sparse file disks, so that a newcomer's `make run` has something to build on.
fn embedded_default(data_dir: &Path) -> String {
    let mut doc = String::from("version = 1\n");
    for i in 0..DEFAULT_DISKS {
        doc += &format!(
            "\n[[disk]]\nname = \"d{i}\"\npath = \"{}\"\nkind = \"file\"\nsize = \"{DEFAULT_DISK_SIZE}\"\n",
            data_dir.join("disks").join(format!("d{i}.img")).display()
        );
    }
    doc
}

/// Runs the daemon until a signal stops it.
pub async fn serve(opts: ServeOptions) -> Result<()> {
    let data_dir = absolute(&opts.data_dir)?;
    fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    // One spelling for every path under it: running VMMs are found again by the VM
    // folder on their command line, which must not depend on a symlink or `..` in
    // `--data-dir` (a VMM missed would be started a second time on the same disks).
    let data_dir = fs::canonicalize(&data_dir)
        .with_context(|| format!("cannot resolve data directory {}", data_dir.display()))?;
    let lock = lock_data_dir(&data_dir)?;

    let token = security::admin_token(&data_dir)?;
    let tls = security::tls_config(&data_dir, &[b"h2", b"http/1.1"])?;
    let target_tls = security::tls_config(&data_dir, &[])?;
    let store_dir = data_dir.join(STORE_DIR);
    let store = {
        let dir = store_dir.clone();
        tokio::task::spawn_blocking(move || Store::open(&dir)).await??
    };
    tracing::info!(path = %store_dir.display(), schema = store.schema_version()?, "appliance store open");

    let shutdown = CancellationToken::new();
    let listeners = Listeners::new(tokio_rustls::TlsAcceptor::from(tls), shutdown.clone());
    let socket = data_dir.join(SOCKET_FILE);
    let appliance = Appliance::new(
        data_dir.clone(),
        socket.clone(),
        store,
        listeners.clone(),
        target_tls,
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;

    let vms = vms::Vms::start(&data_dir, appliance.clone()).await?;

    // The router first: applying --config may start listeners, which serve it.
    let state = ApiState {
        vms: vms.clone(),
        appliance: appliance.clone(),
        metrics: Arc::new(Metrics::new()),
        token: Arc::new(token),
    };
    listeners.set_router(api::router(state));
    let fresh = appliance.store().generation()? == 0;
    let start_config = match &opts.config {
        Some(path) => Some((
            path.display().to_string(),
            fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?,
        )),
        None if fresh && opts.defaults => {
            fs::create_dir_all(data_dir.join("disks"))?;
            tracing::info!("fresh data directory: setting up the embedded default");
            Some((
                "the embedded default".to_string(),
                embedded_default(&data_dir),
            ))
        }
        None => None,
    };
    if let Some((path, text)) = start_config {
        match appliance.apply_config(text, false).await {
            Ok(result) => {
                for change in &result.changes {
                    tracing::info!(%change, "applied from {path}");
                }
            }
            Err(crate::api::error::ApiError::InvalidConfig(errors)) => {
                let list: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                bail!(
                    "config file {path} refused, nothing was changed:\n{}",
                    list.join("\n")
                );
            }
            Err(e) => bail!("config file {path}: {e}"),
        }
    }

    listeners
        .serve_unix(&socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    // An address that cannot be bound (taken, or no longer on this machine) must not
    // keep the appliance down: it still serves on the others and on the unix socket,
    // where `basalt status` shows what it listens on.
    for addr in appliance.store().api()?.listen {
        match listeners.bind_new(&[addr]).await {
            Ok(bound) => {
                for (addr, listener) in bound {
                    listeners.serve_tcp(addr, listener);
                }
            }
            Err(e) => tracing::error!("{e}; serving without it"),
        }
    }
    print_banner(&data_dir, &listeners);

    wait_for_signal().await?;
    tracing::info!("shutting down: no new requests; finishing those in flight");
    shutdown.cancel();
    listeners.drain().await;
    vms.shutdown().await;
    appliance.shutdown().await;
    let _ = fs::remove_file(&socket);
    drop(lock);
    tracing::info!("stopped");
    Ok(())
}

/// `path` made absolute and without `.` components, so that printed paths read well.
fn absolute(path: &Path) -> Result<PathBuf> {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .context("cannot read the current directory")?
            .join(path)
    };
    Ok(joined
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect())
}

fn lock_data_dir(data_dir: &Path) -> Result<fs::File> {
    let path = data_dir.join(LOCK_FILE);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => bail!(
            "another basalt daemon is running on {}; stop it first",
            data_dir.display()
        ),
        Err(fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

fn print_banner(data_dir: &Path, listeners: &Listeners) {
    let addrs = listeners.addresses();
    let rel = |p: PathBuf| p.display().to_string();
    println!("Basalt {} is running.", env!("CARGO_PKG_VERSION"));
    for addr in &addrs {
        println!("  API:      https://{addr}/api/v1/  (OpenAPI: /api/v1/openapi.json)");
        println!("  Metrics:  https://{addr}/metrics   Health: https://{addr}/healthz");
    }
    println!("  Token:    {}", rel(data_dir.join(security::TOKEN_FILE)));
    println!(
        "  TLS cert: {}",
        rel(data_dir.join(security::TLS_DIR).join(security::CERT_FILE))
    );
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "basalt".to_string());
    println!("  CLI:      {exe} --data-dir {} status", data_dir.display());
    if let Some(addr) = addrs.first() {
        println!(
            "  curl:     curl --cacert {} -H \"Authorization: Bearer $(cat {})\" https://{}/api/v1/status",
            rel(data_dir.join(security::TLS_DIR).join(security::CERT_FILE)),
            rel(data_dir.join(security::TOKEN_FILE)),
            if addr.ip().is_loopback() { format!("localhost:{}", addr.port()) } else { addr.to_string() }
        );
    }
    println!("Stop with Ctrl-C (SIGINT) or SIGTERM.");
}

async fn wait_for_signal() -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}
