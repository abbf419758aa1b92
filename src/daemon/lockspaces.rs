//! Cluster lockspaces at run time: every `[[lockspace]]` is joined with `basalt-lockmgr`
//! on its device (a LUN of this appliance, or a LUN of another host reached through the
//! iSCSI initiator), heartbeats in the background, and is left cleanly when its section
//! goes away or the daemon stops.
//!
//! Formatting is never implicit over data: a device without a lockspace header stays
//! `unformatted` until `basalt lockspace format NAME`, or, with `format = true`, only
//! when the whole range the lockspace would take reads zero. A host that loses its lease
//! is logged and reported `lost` (and counted) and rejoined in the background, as is a
//! lockspace that could not be joined (a remote target down); see
//! `Appliance::new`.
//! Lock-manager counters are carried over rejoins so that the exported counters only
//! grow.

use super::sections::{LockDevice, LockspaceSpec};
use super::storage::Storage;
use crate::api::error::ApiError;
use basalt_blockdev::SharedBlockDev;
use basalt_blockdev_iscsi::{IscsiDev, IscsiOptions, IscsiUrl};
use basalt_lockmgr::{
    FormatOptions, Header, HistogramSnapshot, HostState, JoinOptions, LockError, LockMode,
    Lockspace, MetricsSnapshot, Presumed, SlotState,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Who this host is when a section does not say.
#[derive(Debug, Clone)]
pub struct HostDefaults {
    /// The appliance's UUID as a host id.
    pub id: [u8; 16],
    /// The appliance's name.
    pub name: String,
}

/// A lockspace as the API lists it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LockspaceInfo {
    /// Name on this appliance.
    pub name: String,
    /// Its device (`POOL/LUN` or the iSCSI URL without credentials).
    pub device: String,
    /// `joining`, `live`, `lost`, `unformatted`, `error`.
    pub state: String,
    /// What went wrong, when not live.
    pub error: Option<String>,
    /// The lockspace's id (hex), once read.
    pub lockspace_id: Option<String>,
    /// This host's id (hex).
    pub host_id: String,
    /// This host's name in the lockspace.
    pub host_name: String,
    /// This host's heartbeat slot, when joined.
    pub slot: Option<u16>,
    /// This host's slot generation, when joined.
    pub generation: Option<u32>,
    /// Heartbeat period from the header, milliseconds.
    pub heartbeat_ms: Option<u64>,
    /// Dead-host timeout from the header, milliseconds.
    pub dead_after_ms: Option<u64>,
    /// Lease time left, milliseconds.
    pub lease_remaining_ms: Option<u64>,
    /// Heartbeat slots in the header.
    pub max_hosts: Option<u32>,
    /// Lock records in the header.
    pub max_locks: Option<u32>,
    /// Slots by state: live, dead, recovering, free, corrupt.
    pub hosts: BTreeMap<String, u64>,
    /// Slots ever used (never-used free slots are left out).
    pub slots: Vec<SlotInfo>,
    /// Locks this host holds.
    pub held: Vec<HeldLock>,
    /// The last takeovers this host made.
    pub takeovers: Vec<TakeoverInfo>,
    /// Times this host lost its lease in this lockspace since the daemon started.
    pub lost_total: u64,
}

/// One heartbeat slot.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SlotInfo {
    /// Slot index.
    pub slot: u16,
    /// `live`, `dead`, `recovering`, `free`, `corrupt`.
    pub state: String,
    /// The owner's host id (hex).
    pub host_id: String,
    /// The owner's host name.
    pub host_name: String,
    /// Slot generation.
    pub generation: u32,
    /// Heartbeat counter.
    pub counter: u64,
    /// This host's own slot.
    pub this_host: bool,
    /// When this host last saw the slot change (RFC 3339, this host's wall clock).
    pub last_seen: String,
    /// How long the slot has been unchanged, milliseconds.
    pub unchanged_ms: u64,
}

/// A lock this host holds.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeldLock {
    /// Resource.
    pub resource: String,
    /// `exclusive`, `shared_read`, `multi_writer`.
    pub mode: String,
    /// Epoch of the grant (fencing token).
    pub epoch: u64,
}

/// A takeover of a dead host made by this host.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TakeoverInfo {
    /// The dead host's slot.
    pub slot: u16,
    /// The dead host's name.
    pub host_name: String,
    /// Generation taken over.
    pub dead_generation: u32,
    /// How long ago, milliseconds.
    pub ago_ms: u64,
}

/// A lock record as read from the device (`basalt lock list`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LockEntry {
    /// Lockspace name.
    pub lockspace: String,
    /// Resource.
    pub resource: String,
    /// Record index.
    pub index: u32,
    /// `exclusive`, `shared_read`, `multi_writer`; none when unheld.
    pub mode: Option<String>,
    /// Epoch (bumped by every grant).
    pub epoch: u64,
    /// Holders.
    pub holders: Vec<LockHolder>,
}

/// A holder of a lock.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LockHolder {
    /// Host name of the slot's owner.
    pub host_name: String,
    /// Slot.
    pub slot: u16,
    /// Generation the lock was taken under.
    pub generation: u32,
    /// Whether the entry's generation is the slot's current one.
    pub current: bool,
}

/// What `/metrics` shows of one lockspace.
pub struct LockspaceMetrics {
    /// Name.
    pub name: String,
    /// Device label.
    pub device: String,
    /// Lockspace id (hex), empty before the header was read.
    pub lockspace_id: String,
    /// This host's name.
    pub host_name: String,
    /// State name.
    pub state: &'static str,
    /// Slots by state.
    pub hosts: BTreeMap<&'static str, u64>,
    /// Lock-manager counters over every join since the daemon started.
    pub snapshot: Option<MetricsSnapshot>,
    /// Locks this host holds.
    pub locks_held: usize,
    /// Lease left, seconds.
    pub lease_remaining_seconds: f64,
    /// Lost leases since the daemon started.
    pub lost_total: u64,
}

/// Slot states as exported (bounded label set).
pub const SLOT_STATES: [&str; 5] = ["live", "dead", "recovering", "free", "corrupt"];
/// Lockspace states as exported.
pub const STATES: [&str; 5] = ["joining", "live", "lost", "unformatted", "error"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Joining,
    Joined,
    Unformatted,
    Error,
}

struct Entry {
    spec: LockspaceSpec,
    host_id: [u8; 16],
    host_name: String,
    ls: Option<Arc<Lockspace>>,
    phase: Phase,
    error: Option<String>,
    header: Option<Header>,
    carried: Option<MetricsSnapshot>,
    lost_total: Arc<AtomicU64>,
    watcher: Option<tokio::task::JoinHandle<()>>,
}

impl Entry {
    fn state(&self) -> &'static str {
        match (self.phase, self.ls.as_ref().map(|l| l.state())) {
            (Phase::Joined, Some(HostState::Live)) => "live",
            (Phase::Joined, _) => "lost",
            (Phase::Joining, _) => "joining",
            (Phase::Unformatted, _) => "unformatted",
            (Phase::Error, _) => "error",
        }
    }

    /// Takes the lock manager out (lost or being replaced), keeping its counters.
    fn retire(&mut self) -> Option<Arc<Lockspace>> {
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
        let ls = self.ls.take()?;
        self.carried = Some(match &self.carried {
            Some(c) => add(c, &ls.metrics()),
            None => ls.metrics(),
        });
        Some(ls)
    }
}

/// Every configured lockspace, by name.
#[derive(Default)]
pub struct Lockspaces {
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Serializes reconciles and formats (joins may take a dead-host timeout). This,
    /// not the appliance's mutation lock, is what joins hold: they run in the
    /// background, so that a target that is down never stalls configuration changes.
    serial: tokio::sync::Mutex<()>,
    /// The newest configuration generation reconciled: a reconcile of an older one
    /// (overtaken in the background by a later apply) is skipped.
    applied: AtomicU64,
    /// Set at shutdown: nothing is joined any more.
    stopped: std::sync::atomic::AtomicBool,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn mode_name(m: LockMode) -> &'static str {
    match m {
        LockMode::Exclusive => "exclusive",
        LockMode::SharedRead => "shared_read",
        LockMode::MultiWriter => "multi_writer",
    }
}

/// The device as shown: an iSCSI URL without its credentials.
pub fn device_label(device: &str) -> String {
    match IscsiUrl::parse(device) {
        Ok(u) if device.starts_with("iscsi://") => {
            format!("iscsi://{}/{}/{}", u.portal, u.target, u.lun)
        }
        _ => device.to_string(),
    }
}

fn identity(spec: &LockspaceSpec, host: &HostDefaults) -> ([u8; 16], String) {
    let id = spec.host_id().ok().flatten().unwrap_or(host.id);
    let name = spec.host_name.clone().unwrap_or_else(|| host.name.clone());
    (id, name)
}

fn same_identity(e: &Entry, spec: &LockspaceSpec, host: &HostDefaults) -> bool {
    let (id, name) = identity(spec, host);
    e.spec.device == spec.device
        && e.spec.initiator == spec.initiator
        && e.host_id == id
        && e.host_name == name
}

/// Checks a header against what a section declares; the problems found.
pub fn header_mismatch(spec: &LockspaceSpec, h: &Header) -> Vec<String> {
    let mut p = Vec::new();
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let fmt = |v: u64| humantime::format_duration(Duration::from_millis(v)).to_string();
    if let Ok(Some(hb)) = spec.heartbeat() {
        if ms(hb) != u64::from(h.heartbeat_ms) {
            p.push(format!(
                "heartbeat {} differs from the lockspace header's {}",
                fmt(ms(hb)),
                fmt(h.heartbeat_ms.into())
            ));
        }
    }
    if let Ok(Some(d)) = spec.dead_after() {
        if ms(d) != u64::from(h.dead_after_ms) {
            p.push(format!(
                "dead_after {} differs from the lockspace header's {}",
                fmt(ms(d)),
                fmt(h.dead_after_ms.into())
            ));
        }
    }
    if spec.max_hosts.is_some_and(|n| n != h.max_hosts) {
        p.push(format!(
            "max_hosts {} differs from the lockspace header's {}",
            spec.max_hosts.unwrap_or_default(),
            h.max_hosts
        ));
    }
    if spec.max_locks.is_some_and(|n| n != h.max_locks) {
        p.push(format!(
            "max_locks {} differs from the lockspace header's {}",
            spec.max_locks.unwrap_or_default(),
            h.max_locks
        ));
    }
    p
}

fn format_options(spec: &LockspaceSpec) -> Result<FormatOptions, String> {
    let (heartbeat, dead_after) = spec.format_timings()?;
    let d = FormatOptions::default();
    Ok(FormatOptions {
        max_hosts: spec.max_hosts.unwrap_or(d.max_hosts),
        max_locks: spec.max_locks.unwrap_or(d.max_locks),
        heartbeat,
        dead_after,
        force: false,
    })
}

/// Opens a lockspace's device.
async fn open(
    spec: &LockspaceSpec,
    storage: &Storage,
    host_id: [u8; 16],
) -> Result<SharedBlockDev, String> {
    match spec.device()? {
        LockDevice::Lun { pool, lun } => {
            match storage.find_lun(&lun) {
                Some((p, _)) if p == pool => {}
                Some((p, _)) => return Err(format!("LUN {lun:?} is in pool {p:?}, not {pool:?}")),
                None => return Err(format!("LUN {pool}/{lun} is not up")),
            }
            let (dev, _) = storage
                .lun_dev(&lun)
                .ok_or_else(|| format!("LUN {pool}/{lun} is not up"))?;
            Ok(dev)
        }
        LockDevice::Iscsi(url) => {
            let opts = IscsiOptions {
                initiator: spec
                    .initiator
                    .clone()
                    .unwrap_or_else(|| format!("iqn.2026-11.org.basalt:host-{}", hex(&host_id))),
                io_timeout: Duration::from_secs(10),
                reconnect_interval: Duration::from_secs(1),
                ..IscsiOptions::default()
            };
            let dev = tokio::time::timeout(Duration::from_secs(20), IscsiDev::connect(&url, &opts))
                .await
                .map_err(|_| format!("connecting to {} timed out", device_label(&url)))?
                .map_err(|e| e.to_string())?;
            Ok(Arc::new(dev))
        }
    }
}

/// Why a lockspace cannot be joined (the phase it stays in).
enum JoinFailure {
    Unformatted(String),
    Error(String),
}

impl Lockspaces {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The header of a joined lockspace, for checks at apply.
    pub fn joined_header(&self, name: &str) -> Option<(String, Header)> {
        let map = self.lock();
        let e = map.get(name)?;
        let ls = e.ls.as_ref()?;
        Some((e.spec.device.clone(), ls.header().clone()))
    }

    /// Brings the joined lockspaces in line with `specs`: leaves the ones gone (or
    /// whose device or identity changed), joins the new ones and rejoins lost ones.
    /// Returns what could not be joined. `generation`: the configuration generation
    /// `specs` come from; older than one reconciled already, nothing is done.
    pub async fn reconcile(
        &self,
        generation: u64,
        specs: &[LockspaceSpec],
        storage: &Storage,
        host: &HostDefaults,
    ) -> Vec<String> {
        let _serial = self.serial.lock().await;
        if self.stopped.load(Ordering::Relaxed)
            || self.applied.fetch_max(generation, Ordering::Relaxed) > generation
        {
            return Vec::new();
        }
        let leaving: Vec<(String, Entry)> = {
            let mut map = self.lock();
            let gone: Vec<String> = map
                .iter()
                .filter(|(n, e)| {
                    !specs
                        .iter()
                        .any(|s| &s.name == *n && same_identity(e, s, host))
                })
                .map(|(n, _)| n.clone())
                .collect();
            gone.into_iter()
                .filter_map(|n| map.remove(&n).map(|e| (n, e)))
                .collect()
        };
        for (name, e) in leaving {
            leave_entry(&name, e).await;
        }
        let mut warnings = Vec::new();
        for spec in specs {
            let needs_join = {
                let mut map = self.lock();
                match map.get_mut(&spec.name) {
                    Some(e) => {
                        e.spec = spec.clone();
                        e.state() != "live"
                    }
                    None => {
                        let (host_id, host_name) = identity(spec, host);
                        map.insert(
                            spec.name.clone(),
                            Entry {
                                spec: spec.clone(),
                                host_id,
                                host_name,
                                ls: None,
                                phase: Phase::Joining,
                                error: None,
                                header: None,
                                carried: None,
                                lost_total: Arc::new(AtomicU64::new(0)),
                                watcher: None,
                            },
                        );
                        true
                    }
                }
            };
            if needs_join {
                if let Err(e) = self.join(&spec.name, storage, false).await {
                    warnings.push(format!("lockspace {}: {e}", spec.name));
                }
            }
        }
        warnings
    }

    /// `basalt lockspace format NAME`: writes an empty lockspace on the declared
    /// device (refused when one is there) and joins it.
    pub async fn format(&self, name: &str, storage: &Storage) -> Result<LockspaceInfo, ApiError> {
        let _serial = self.serial.lock().await;
        {
            let map = self.lock();
            let e = map.get(name).ok_or_else(|| {
                ApiError::NotFound(format!("no lockspace named {name:?} is declared"))
            })?;
            if e.ls.is_some() {
                return Err(ApiError::Conflict(format!(
                    "lockspace {name:?} is joined: its device holds a lockspace already"
                )));
            }
        }
        self.join(name, storage, true)
            .await
            .map_err(ApiError::Conflict)?;
        self.info(name)
    }

    /// Joins (or rejoins) one declared lockspace; `format`: write an empty lockspace
    /// first (explicit admin action; refused over an existing one).
    async fn join(&self, name: &str, storage: &Storage, format: bool) -> Result<(), String> {
        let (spec, host_id, host_name, old) = {
            let mut map = self.lock();
            let e = map
                .get_mut(name)
                .ok_or_else(|| format!("no lockspace named {name:?}"))?;
            let old = e.retire();
            // The last error stays shown while rejoining (a target still down).
            e.phase = Phase::Joining;
            (e.spec.clone(), e.host_id, e.host_name.clone(), old)
        };
        drop(old);
        let outcome = self
            .try_join(&spec, storage, host_id, &host_name, format)
            .await;
        let mut map = self.lock();
        let Some(e) = map.get_mut(name) else {
            return Err(format!("lockspace {name:?} was removed meanwhile"));
        };
        match outcome {
            Ok((ls, header)) => {
                let ls = Arc::new(ls);
                let mut rx = ls.subscribe();
                let lost = e.lost_total.clone();
                let n = name.to_string();
                e.watcher = Some(tokio::spawn(async move {
                    loop {
                        if let HostState::Lost(reason) = *rx.borrow_and_update() {
                            lost.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(lockspace = %n, ?reason,
                                "lost the lockspace lease: fenced; rejoining");
                            return;
                        }
                        if rx.changed().await.is_err() {
                            return;
                        }
                    }
                }));
                tracing::info!(lockspace = %name, slot = ls.slot(), generation = ls.generation(),
                    device = %device_label(&spec.device), "joined the lockspace");
                e.ls = Some(ls);
                e.header = Some(header);
                e.phase = Phase::Joined;
                e.error = None;
                Ok(())
            }
            Err(JoinFailure::Unformatted(m)) => {
                tracing::warn!(lockspace = %name, "{m}");
                e.phase = Phase::Unformatted;
                e.error = Some(m.clone());
                Err(m)
            }
            Err(JoinFailure::Error(m)) => {
                tracing::warn!(lockspace = %name, error = %m, "cannot join the lockspace");
                e.phase = Phase::Error;
                e.error = Some(m.clone());
                Err(m)
            }
        }
    }

    async fn try_join(
        &self,
        spec: &LockspaceSpec,
        storage: &Storage,
        host_id: [u8; 16],
        host_name: &str,
        format: bool,
    ) -> Result<(Lockspace, Header), JoinFailure> {
        let dev = open(spec, storage, host_id)
            .await
            .map_err(JoinFailure::Error)?;
        let opts = format_options(spec).map_err(JoinFailure::Error)?;
        if format {
            Lockspace::format(&dev, 0, &opts)
                .await
                .map_err(|e| match e {
                    LockError::AlreadyFormatted => JoinFailure::Error(format!(
                        "{} holds a lockspace already; it was not formatted",
                        device_label(&spec.device)
                    )),
                    other => JoinFailure::Error(format!("format: {other}")),
                })?;
            tracing::info!(lockspace = %spec.name, device = %device_label(&spec.device),
                "lockspace formatted");
        }
        let header = match Lockspace::read_header(&dev, 0).await {
            Ok(h) => h,
            Err(LockError::NotFormatted(_)) if spec.format => {
                // Atomic against another host formatting the same blank device: the
                // header goes in with COMPARE AND WRITE against a zeroed sector; the
                // host that loses joins the winner's lockspace.
                match Lockspace::format_if_blank(&dev, 0, &opts).await {
                    Ok(h) => {
                        tracing::info!(lockspace = %spec.name, "blank device: lockspace formatted (format = true)");
                        h
                    }
                    Err(LockError::AlreadyFormatted) => {
                        tracing::info!(lockspace = %spec.name,
                            "blank device formatted by another host meanwhile: joining its lockspace");
                        Lockspace::read_header(&dev, 0)
                            .await
                            .map_err(|e| JoinFailure::Error(e.to_string()))?
                    }
                    Err(LockError::NotBlank { .. }) => return Err(JoinFailure::Unformatted(format!(
                        "{} holds no lockspace but is not blank: not formatted; `basalt lockspace format {}` formats it anyway",
                        device_label(&spec.device), spec.name
                    ))),
                    Err(e) => return Err(JoinFailure::Error(format!("format: {e}"))),
                }
            }
            Err(LockError::NotFormatted(_)) => {
                return Err(JoinFailure::Unformatted(format!(
                    "{} holds no lockspace: format it with `basalt lockspace format {}`",
                    device_label(&spec.device),
                    spec.name
                )))
            }
            Err(e) => return Err(JoinFailure::Error(e.to_string())),
        };
        let problems = header_mismatch(spec, &header);
        if !problems.is_empty() {
            return Err(JoinFailure::Error(problems.join("; ")));
        }
        let jo = JoinOptions::new(host_id, host_name);
        let ls = Lockspace::join(dev, 0, jo)
            .await
            .map_err(|e| JoinFailure::Error(format!("join: {e}")))?;
        Ok((ls, header))
    }

    /// Whether a lockspace is lost or failed to join (not unformatted: that waits for
    /// the administrator): the daemon retries those in the background.
    pub fn needs_retry(&self) -> bool {
        self.lock()
            .values()
            .any(|e| matches!(e.state(), "lost" | "error"))
    }

    /// Leaves every lockspace (at shutdown).
    pub async fn leave_all(&self) {
        let _serial = self.serial.lock().await;
        self.stopped.store(true, Ordering::Relaxed);
        let all: Vec<(String, Entry)> = std::mem::take(&mut *self.lock()).into_iter().collect();
        for (name, e) in all {
            leave_entry(&name, e).await;
        }
    }

    /// Every lockspace.
    pub fn list(&self) -> Vec<LockspaceInfo> {
        self.lock().iter().map(|(n, e)| info(n, e)).collect()
    }

    /// One lockspace.
    pub fn info(&self, name: &str) -> Result<LockspaceInfo, ApiError> {
        self.lock()
            .get(name)
            .map(|e| info(name, e))
            .ok_or_else(|| ApiError::NotFound(format!("no lockspace named {name:?}")))
    }

    /// The lock records of one lockspace, or of every joined one, read from the devices.
    pub async fn locks(&self, name: Option<&str>) -> Result<Vec<LockEntry>, ApiError> {
        let joined: Vec<(String, Arc<Lockspace>)> = {
            let map = self.lock();
            match name {
                Some(n) => {
                    let e = map
                        .get(n)
                        .ok_or_else(|| ApiError::NotFound(format!("no lockspace named {n:?}")))?;
                    let ls = e.ls.clone().ok_or_else(|| {
                        ApiError::Conflict(format!(
                            "lockspace {n:?} is not joined ({}{})",
                            e.state(),
                            e.error
                                .as_ref()
                                .map(|m| format!(": {m}"))
                                .unwrap_or_default()
                        ))
                    })?;
                    vec![(n.to_string(), ls)]
                }
                None => map
                    .iter()
                    .filter_map(|(n, e)| e.ls.clone().map(|l| (n.clone(), l)))
                    .collect(),
            }
        };
        let mut out = Vec::new();
        for (n, ls) in joined {
            let records = ls
                .list_locks()
                .await
                .map_err(|e| ApiError::Conflict(format!("lockspace {n:?}: {e}")))?;
            out.extend(records.into_iter().map(|r| {
                LockEntry {
                    lockspace: n.clone(),
                    resource: r.resource.to_string(),
                    index: r.index,
                    mode: r.mode.map(|m| mode_name(m).to_string()),
                    epoch: r.epoch,
                    holders: r
                        .holders
                        .into_iter()
                        .map(|h| LockHolder {
                            host_name: h.hostname,
                            slot: h.slot,
                            generation: h.generation,
                            current: h.current,
                        })
                        .collect(),
                }
            }));
        }
        Ok(out)
    }

    /// For `/metrics`.
    pub fn metrics(&self) -> Vec<LockspaceMetrics> {
        self.lock()
            .iter()
            .map(|(n, e)| {
                let status = e.ls.as_ref().map(|l| l.status());
                let mut hosts: BTreeMap<&'static str, u64> =
                    SLOT_STATES.iter().map(|s| (*s, 0)).collect();
                if let Some(st) = &status {
                    for s in &st.slots {
                        *hosts.entry(slot_state(s.presumed, s.state)).or_default() += 1;
                    }
                }
                let current = e.ls.as_ref().map(|l| l.metrics());
                let snapshot = match (&e.carried, current) {
                    (Some(c), Some(m)) => Some(add(c, &m)),
                    (Some(c), None) => Some(c.clone()),
                    (None, m) => m,
                };
                LockspaceMetrics {
                    name: n.clone(),
                    device: device_label(&e.spec.device),
                    lockspace_id: e
                        .header
                        .as_ref()
                        .map(|h| hex(&h.lockspace_id))
                        .unwrap_or_default(),
                    host_name: e.host_name.clone(),
                    state: e.state(),
                    hosts,
                    snapshot,
                    locks_held: status.as_ref().map_or(0, |s| s.held.len()),
                    lease_remaining_seconds: status
                        .as_ref()
                        .map_or(0.0, |s| s.lease_remaining.as_secs_f64()),
                    lost_total: e.lost_total.load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}

async fn leave_entry(name: &str, mut e: Entry) {
    let Some(mut ls) = e.retire() else {
        return;
    };
    // A lock listing in flight holds a reference for a moment.
    for _ in 0..50 {
        match Arc::try_unwrap(ls) {
            Ok(l) => {
                if l.state() == HostState::Live {
                    match l.leave().await {
                        Ok(()) => tracing::info!(lockspace = %name, "left the lockspace"),
                        Err(e) => {
                            tracing::warn!(lockspace = %name, error = %e, "leaving the lockspace failed")
                        }
                    }
                }
                return;
            }
            Err(back) => {
                ls = back;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    tracing::warn!(lockspace = %name,
        "lockspace still in use: stopped without leaving (its slot is taken over after the dead-host timeout)");
}

fn slot_state(presumed: Presumed, state: Option<SlotState>) -> &'static str {
    match presumed {
        Presumed::Mine => "live",
        Presumed::RecoveringByMe => "recovering",
        Presumed::Corrupt => "corrupt",
        Presumed::Free => "free",
        Presumed::Dead => "dead",
        Presumed::Alive if state == Some(SlotState::Recovering) => "recovering",
        Presumed::Alive => "live",
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn info(name: &str, e: &Entry) -> LockspaceInfo {
    let status = e.ls.as_ref().map(|l| l.status());
    let mut hosts: BTreeMap<String, u64> = SLOT_STATES.iter().map(|s| (s.to_string(), 0)).collect();
    let mut slots = Vec::new();
    if let Some(st) = &status {
        for s in &st.slots {
            let state = slot_state(s.presumed, s.state);
            *hosts.entry(state.to_string()).or_default() += 1;
            if state == "free" && s.generation == 0 {
                continue;
            }
            let this_host = s.presumed == Presumed::Mine;
            slots.push(SlotInfo {
                slot: s.slot,
                state: state.to_string(),
                host_id: s.host.clone(),
                host_name: s.hostname.clone(),
                generation: s.generation,
                counter: s.counter,
                this_host,
                last_seen: rfc3339(if this_host {
                    SystemTime::now()
                } else {
                    s.last_change
                }),
                unchanged_ms: if this_host { 0 } else { ms(s.unchanged_for) },
            });
        }
    }
    let h = e.header.as_ref();
    LockspaceInfo {
        name: name.to_string(),
        device: device_label(&e.spec.device),
        state: e.state().to_string(),
        error: e.error.clone(),
        lockspace_id: h.map(|h| hex(&h.lockspace_id)),
        host_id: hex(&e.host_id),
        host_name: e.host_name.clone(),
        slot: status.as_ref().map(|s| s.slot),
        generation: status.as_ref().map(|s| s.generation),
        heartbeat_ms: h.map(|h| h.heartbeat_ms.into()),
        dead_after_ms: h.map(|h| h.dead_after_ms.into()),
        lease_remaining_ms: status.as_ref().map(|s| ms(s.lease_remaining)),
        max_hosts: h.map(|h| h.max_hosts),
        max_locks: h.map(|h| h.max_locks),
        hosts,
        slots,
        held: status
            .as_ref()
            .map(|s| {
                s.held
                    .iter()
                    .map(|h| HeldLock {
                        resource: h.resource.to_string(),
                        mode: mode_name(h.mode).to_string(),
                        epoch: h.epoch,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        takeovers: status
            .as_ref()
            .map(|s| {
                s.takeovers
                    .iter()
                    .map(|t| TakeoverInfo {
                        slot: t.slot,
                        host_name: t.hostname.clone(),
                        dead_generation: t.dead_generation,
                        ago_ms: ms(t.decided_ago),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        lost_total: e.lost_total.load(Ordering::Relaxed),
    }
}

fn add_hist(a: &HistogramSnapshot, b: &HistogramSnapshot) -> HistogramSnapshot {
    HistogramSnapshot {
        bounds_seconds: a.bounds_seconds.clone(),
        counts: a
            .counts
            .iter()
            .zip(b.counts.iter().chain(std::iter::repeat(&0)))
            .map(|(x, y)| x + y)
            .collect(),
        sum_seconds: a.sum_seconds + b.sum_seconds,
        count: a.count + b.count,
    }
}

/// Counters of two incarnations, summed (so that exported counters never go back).
fn add(a: &MetricsSnapshot, b: &MetricsSnapshot) -> MetricsSnapshot {
    MetricsSnapshot {
        heartbeats_total: a.heartbeats_total + b.heartbeats_total,
        heartbeat_failures_total: a.heartbeat_failures_total + b.heartbeat_failures_total,
        heartbeat_latency_seconds: add_hist(
            &a.heartbeat_latency_seconds,
            &b.heartbeat_latency_seconds,
        ),
        acquires_total: a.acquires_total + b.acquires_total,
        contended_total: a.contended_total + b.contended_total,
        acquire_latency_seconds: add_hist(&a.acquire_latency_seconds, &b.acquire_latency_seconds),
        acquire_round_trips_total: a.acquire_round_trips_total + b.acquire_round_trips_total,
        releases_total: a.releases_total + b.releases_total,
        breaks_total: a.breaks_total + b.breaks_total,
        stale_cleaned_total: a.stale_cleaned_total + b.stale_cleaned_total,
        takeovers_total: a.takeovers_total + b.takeovers_total,
        recoveries_total: a.recoveries_total + b.recoveries_total,
        recoveries_failed_total: a.recoveries_failed_total + b.recoveries_failed_total,
        fencing_events_total: a.fencing_events_total + b.fencing_events_total,
        fenced_writes_refused_total: a.fenced_writes_refused_total + b.fenced_writes_refused_total,
        checksum_errors_total: a.checksum_errors_total + b.checksum_errors_total,
        torn_repairs_total: a.torn_repairs_total + b.torn_repairs_total,
        own_image_recognized_total: a.own_image_recognized_total + b.own_image_recognized_total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_labels_hide_credentials() {
        assert_eq!(
            device_label("iscsi://u%secret@10.0.0.1/iqn.2026-11.x:t/3"),
            "iscsi://10.0.0.1:3260/iqn.2026-11.x:t/3"
        );
        assert_eq!(device_label("p0/ls"), "p0/ls");
    }

    #[test]
    fn snapshots_add_up() {
        let h = HistogramSnapshot {
            bounds_seconds: vec![0.1, 1.0],
            counts: vec![1, 2, 3],
            sum_seconds: 1.5,
            count: 6,
        };
        let mut m = MetricsSnapshot {
            heartbeats_total: 2,
            heartbeat_failures_total: 0,
            heartbeat_latency_seconds: h.clone(),
            acquires_total: 1,
            contended_total: 0,
            acquire_latency_seconds: h.clone(),
            acquire_round_trips_total: 0,
            releases_total: 0,
            breaks_total: 1,
            stale_cleaned_total: 0,
            takeovers_total: 0,
            recoveries_total: 0,
            recoveries_failed_total: 0,
            fencing_events_total: 1,
            fenced_writes_refused_total: 0,
            checksum_errors_total: 0,
            torn_repairs_total: 0,
            own_image_recognized_total: 0,
        };
        m = add(&m, &m);
        assert_eq!(m.heartbeats_total, 4);
        assert_eq!(m.breaks_total, 2);
        assert_eq!(m.heartbeat_latency_seconds.counts, vec![2, 4, 6]);
        assert_eq!(m.heartbeat_latency_seconds.count, 12);
    }
}
