//! VMs at run time: the daemon's side of `basalt-compute`.
//!
//! VM folders live in `<data dir>/vms` (a [`VmStore`]); a [`Supervisor`] runs one
//! `basalt vmm` process per running VM (this very binary, `current_exe()`), and
//! [`Handover`] is its [`Resolver`]: before every (re)start it turns what the definition
//! names into what this host has:
//!
//! - a disk that names a LUN (`POOL/LUN`) becomes an export of the daemon's *VM NBD
//!   server*, an NBD server of its own (not the admin's `[nbd]` target: no TCP listener,
//!   not in the desired state) that listens only on the unix socket
//!   `<data dir>/vm-nbd.sock` (mode 0600) and exports the same LUN handle the targets
//!   use; the VMM gets `nbd+unix:///LUN?socket=...`;
//! - a NIC that names a port group gets a TAP opened here (with virtio-net headers) and
//!   attached to the vSwitch that has that port group, as a `netdev` port named
//!   `bvm-XXXXXXXX` (a hash of VM and NIC) with the NIC's MAC; the VMM inherits the TAP's
//!   fd. The TAP goes away with the VMM; the next start replaces the port, unless a
//!   running VM's NIC has the same port name (a hash collision): that start is refused.
//!
//! File and NBD-URI disks need nothing from the daemon: the VMM opens them itself.

use super::appliance::Appliance;
use crate::api::error::ApiError;
use basalt_compute::definition::{DiskSource, VmDefinition};
use basalt_compute::launch::{DiskEndpoint, NicEndpoint, VmmArgs};
use basalt_compute::nbd::NbdAddress;
use basalt_compute::store::{StoreError, VmEntry, VmState, VmStatus, VmStore};
use basalt_compute::supervisor::{
    scan_vmms, Launch, Resolver, Supervisor, SupervisorConfig, SupervisorError, VmmScan,
};
use basalt_nbd::{Devices, ExportConfig, NbdConfig, NbdServer};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

/// The VM folders' directory in the data directory.
pub const VMS_DIR: &str = "vms";
/// The VM NBD server's socket in the data directory.
pub const VM_NBD_SOCKET: &str = "vm-nbd.sock";
/// Prefix of the switch ports (and TAP devices) made for VM NICs.
pub const VM_PORT_PREFIX: &str = "bvm-";
/// The most console text one call returns.
const CONSOLE_CHUNK: u64 = 1 << 20;

/// One VM as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmInfo {
    /// Name.
    pub name: String,
    /// The definition (absent when `vm.json` does not parse; see `error`).
    #[schema(value_type = Object)]
    pub definition: Option<VmDefinition>,
    /// Why the definition cannot be read.
    pub error: Option<String>,
    /// State, runner, pid, restarts, and how the last run ended (the default, "stopped",
    /// when `status_error` says it cannot be read).
    #[schema(value_type = Object)]
    pub status: VmStatus,
    /// Why the status cannot be read (`status.json` unreadable): the VM may run, and
    /// LUN and pool checks that involve it refuse until it can be read or is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_error: Option<String>,
}

/// A piece of a VM's serial console log.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConsoleChunk {
    /// Where `text` starts in the log.
    pub offset: u64,
    /// Where the next call should start (`?offset=`).
    pub next_offset: u64,
    /// The log's size now.
    pub size: u64,
    /// The text (invalid UTF-8 replaced).
    pub text: String,
}

/// The VMs of this appliance.
pub struct Vms {
    supervisor: Arc<Supervisor>,
    handover: Arc<Handover>,
    /// Restarts seen per VM, for a monotonic counter: (last `restarts`, total).
    restarts: Mutex<HashMap<String, (u32, u64)>>,
    /// The task that takes ended VMs' NIC ports off their switches.
    janitor: tokio::task::AbortHandle,
}

impl From<SupervisorError> for ApiError {
    fn from(e: SupervisorError) -> Self {
        match e {
            SupervisorError::Store(s) => s.into(),
            e @ (SupervisorError::AlreadyRunning(_)
            | SupervisorError::NotRunning(_)
            | SupervisorError::Starting(_)) => ApiError::Conflict(e.to_string()),
            e @ (SupervisorError::Resolve { .. } | SupervisorError::Unsupervised { .. }) => {
                ApiError::Conflict(e.to_string())
            }
            e => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            e @ StoreError::NotFound(_) => ApiError::NotFound(e.to_string()),
            e @ (StoreError::Exists(_) | StoreError::Running(_)) => {
                ApiError::Conflict(e.to_string())
            }
            e @ StoreError::Invalid(_) => ApiError::BadRequest(e.to_string()),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("background task failed: {e}")))?
}

impl Vms {
    /// Opens `<data dir>/vms`, and re-adopts the VMM processes that outlived the last
    /// daemon (recording the ones that died meanwhile as crashed).
    pub async fn start(data_dir: &Path, appliance: Arc<Appliance>) -> anyhow::Result<Arc<Vms>> {
        use anyhow::Context;
        let root = data_dir.join(VMS_DIR);
        let store = VmStore::open(&root)
            .with_context(|| format!("cannot open the VM folders at {}", root.display()))?;
        let exe = std::env::current_exe().context("cannot find this program for `basalt vmm`")?;
        let handover = Arc::new(Handover {
            appliance,
            socket: data_dir.join(VM_NBD_SOCKET),
            nbd: tokio::sync::Mutex::new(None),
            runtime: tokio::runtime::Handle::current(),
            nic_lock: Mutex::new(()),
            supervisor: OnceLock::new(),
        });
        let supervisor = Supervisor::new(store, SupervisorConfig::new(exe), handover.clone());
        let _ = handover.supervisor.set(Arc::downgrade(&supervisor));
        let adopted = supervisor
            .recover()
            .await
            .context("cannot recover the VMs that were running")?;
        if !adopted.is_empty() {
            tracing::info!(?adopted, "VMs still running, adopted");
            // Their LUN disks reconnect to the VM NBD server (basalt_compute::nbd): serve
            // it again at once, at the same socket path.
            handover.reexport(supervisor.store(), &adopted).await;
            // Their NICs' ports went with the last daemon's switches (which restart from
            // their declared definitions): put them back on their TAPs, which the VMMs
            // still hold.
            let (h, sup, names) = (handover.clone(), supervisor.clone(), adopted.clone());
            let _ = tokio::task::spawn_blocking(move || h.readd_ports(sup.store(), &names)).await;
        }
        // NIC ports of VMs that ended (crashed, powered off) are taken off their switches
        // now and then; stop, kill and delete do it at once.
        let (sup, h) = (supervisor.clone(), handover.clone());
        let janitor = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                // LUN handles replaced under the VM NBD server (pool check, re-import)
                // are exported again.
                h.refresh_exports().await;
                let (sup, h) = (sup.clone(), h.clone());
                let _ =
                    tokio::task::spawn_blocking(move || h.release_ports(&sup, None, false)).await;
            }
        });
        Ok(Arc::new(Vms {
            supervisor,
            handover,
            restarts: Mutex::default(),
            janitor: janitor.abort_handle(),
        }))
    }

    /// The VMs whose definition names LUN `POOL/LUN` as a disk (a LUN they use must not
    /// be deleted or renamed under them). Synchronous (a scan of the VM folders), so that
    /// it can be asked with the appliance's mutation lock held, which VM starts take
    /// around their LUN lookup too.
    ///
    /// Fails closed like [`Vms::active_on_pool`]: a VM whose definition cannot be read
    /// may use the LUN, so unless it is known to be stopped (it cannot start again
    /// before its definition parses, and that start looks the LUN up) it is an error.
    pub fn using_lun(&self, pool: &str, lun: &str) -> Result<Vec<String>, ApiError> {
        let wanted = format!("{pool}/{lun}");
        let mut users = Vec::new();
        for e in self.supervisor.store().list()? {
            match &e.definition {
                Ok(d) => {
                    if d.disks
                        .iter()
                        .any(|disk| matches!(&disk.source, DiskSource::Lun(l) if *l == wanted))
                    {
                        users.push(e.name);
                    }
                }
                Err(bad) => unknown_user(&e.name, bad, |n| vm_active(&self.supervisor, n))
                    .map_err(|why| {
                        ApiError::Conflict(format!(
                            "cannot check that no VM uses LUN {wanted:?}: {why}"
                        ))
                    })?,
            }
        }
        Ok(users)
    }

    /// The active (starting, running, ...) VMs with a disk on a LUN of pool `pool`: the
    /// pool must not be exported under them. Synchronous, as [`Vms::using_lun`].
    ///
    /// Fails closed: a VM whose state cannot be read, or an active one whose definition
    /// cannot be read, is an error rather than "not on the pool". An error (rather than
    /// counting such a VM as active) refuses the export just the same, and tells the
    /// admin the real reason instead of claiming that the VM runs.
    pub fn active_on_pool(&self, pool: &str) -> Result<Vec<String>, ApiError> {
        let prefix = format!("{pool}/");
        let list = self.supervisor.store().list()?;
        active_users(
            list,
            None,
            |d| {
                d.disks.iter().any(
                    |disk| matches!(&disk.source, DiskSource::Lun(l) if l.starts_with(&prefix)),
                )
            },
            |name| vm_active(&self.supervisor, name),
        )
        .map_err(|why| {
            ApiError::Conflict(format!(
                "cannot check that no running VM uses pool {pool:?}: {why}"
            ))
        })
    }

    /// Exports again, with the current handles, the LUNs whose handle changed under the
    /// VM NBD server (`pool check`, a re-import): the old handles fail.
    pub async fn refresh_exports(&self) {
        self.handover.refresh_exports().await;
    }

    /// `POST /vms`: a new VM folder from a definition (JSON).
    pub async fn create(&self, json: &str) -> Result<VmInfo, ApiError> {
        let def = VmDefinition::from_json(json)
            .map_err(|e| ApiError::BadRequest(format!("invalid VM definition: {e}")))?;
        let store = self.supervisor.store().clone();
        let d = def.clone();
        blocking(move || Ok(store.create(&d).map(|_| ())?)).await?;
        tracing::info!(vm = %def.name, "VM defined");
        self.get(&def.name).await
    }

    /// `GET /vms`.
    pub async fn list(&self) -> Result<Vec<VmInfo>, ApiError> {
        let sup = self.supervisor.clone();
        let listed = blocking(move || Ok(sup.list()?)).await?;
        let store = self.supervisor.store().clone();
        blocking(move || {
            Ok(listed
                .into_iter()
                .map(|(name, status)| {
                    let (definition, error) = match store.get(&name) {
                        Ok(d) => (Some(d), None),
                        Err(e) => (None, Some(e.to_string())),
                    };
                    let (status, status_error) = split_status(status);
                    VmInfo {
                        name,
                        definition,
                        error,
                        status,
                        status_error,
                    }
                })
                .collect())
        })
        .await
    }

    /// `GET /vms/{name}`.
    pub async fn get(&self, name: &str) -> Result<VmInfo, ApiError> {
        let sup = self.supervisor.clone();
        let n = name.to_string();
        blocking(move || {
            // Shown even when the status or the definition cannot be read: stop, kill
            // and delete look the VM up here first, and must work on a broken one.
            let status = match sup.status(&n) {
                Ok(s) => Ok(s),
                Err(e @ SupervisorError::Store(StoreError::NotFound(_))) => return Err(e.into()),
                Err(e) => Err(e.to_string()),
            };
            let (status, status_error) = split_status(status);
            let (definition, error) = match sup.store().get(&n) {
                Ok(d) => (Some(d), None),
                Err(StoreError::NotFound(_)) => {
                    return Err(ApiError::NotFound(format!("no VM named {n:?}")))
                }
                Err(e) => (None, Some(e.to_string())),
            };
            Ok(VmInfo {
                name: n,
                definition,
                error,
                status,
                status_error,
            })
        })
        .await
    }

    /// `POST /vms/{name}/start`: returns once the VMM process is spawned.
    pub async fn start_vm(&self, name: &str) -> Result<VmInfo, ApiError> {
        self.get(name).await?;
        let pid = self.supervisor.start(name).await?;
        tracing::info!(vm = %name, pid, "VM started");
        self.get(name).await
    }

    /// `POST /vms/{name}/stop`: SIGTERM, then SIGKILL after the stop timeout.
    pub async fn stop_vm(&self, name: &str) -> Result<VmInfo, ApiError> {
        self.get(name).await?;
        self.supervisor.stop(name).await?;
        tracing::info!(vm = %name, "VM stopped");
        self.release_ports(name).await;
        self.get(name).await
    }

    /// `POST /vms/{name}/kill`: SIGKILL at once.
    pub async fn kill_vm(&self, name: &str) -> Result<VmInfo, ApiError> {
        self.get(name).await?;
        self.supervisor.kill(name).await?;
        tracing::info!(vm = %name, "VM killed");
        self.release_ports(name).await;
        self.get(name).await
    }

    async fn release_ports(&self, name: &str) {
        let (sup, h, n) = (
            self.supervisor.clone(),
            self.handover.clone(),
            name.to_string(),
        );
        let _ = tokio::task::spawn_blocking(move || h.release_ports(&sup, Some(&n), false)).await;
    }

    /// `DELETE /vms/{name}`: a VM that is not running, with its folder (file disks
    /// included; LUNs are left alone).
    pub async fn delete(&self, name: &str) -> Result<(), ApiError> {
        self.get(name).await?;
        // The supervisor's refusals (running, starting, an unsupervised VMM found in
        // /proc) come before the ports go: they are the network of a VMM that may still
        // run. The ports need the definition, so they go before the folder does; no
        // start of the VM can come in between.
        let (sup, h, n) = (
            self.supervisor.clone(),
            self.handover.clone(),
            name.to_string(),
        );
        self.supervisor
            .delete_with(name, move || h.release_ports(&sup, Some(&n), true))
            .await?;
        self.restarts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        tracing::info!(vm = %name, "VM deleted");
        Ok(())
    }

    /// `GET /vms/{name}/console?offset=N`: the serial console log from `offset` (at most
    /// 1 MiB per call).
    pub async fn console(&self, name: &str, offset: u64) -> Result<ConsoleChunk, ApiError> {
        self.get(name).await?;
        let path = self.supervisor.console_paths(name).0;
        blocking(move || {
            let mut f = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(ConsoleChunk {
                        offset,
                        next_offset: offset,
                        size: 0,
                        text: String::new(),
                    })
                }
                Err(e) => return Err(ApiError::Internal(format!("{}: {e}", path.display()))),
            };
            let io = |e: std::io::Error| ApiError::Internal(format!("{}: {e}", path.display()));
            let size = f.metadata().map_err(io)?.len();
            // A log that was restarted (shorter than the offset) is read from its start.
            let start = if offset > size { 0 } else { offset };
            f.seek(SeekFrom::Start(start)).map_err(io)?;
            let mut buf = Vec::new();
            f.take(CONSOLE_CHUNK).read_to_end(&mut buf).map_err(io)?;
            Ok(ConsoleChunk {
                offset: start,
                next_offset: start + buf.len() as u64,
                size,
                text: String::from_utf8_lossy(&buf).into_owned(),
            })
        })
        .await
    }

    /// Every VM for `/metrics`: name, runner, status, and restarts since the daemon
    /// started (monotonic, unlike the status's restarts in a row).
    pub async fn metrics(self: &Arc<Self>) -> Vec<VmMetrics> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.metrics_now())
            .await
            .unwrap_or_default()
    }

    fn metrics_now(&self) -> Vec<VmMetrics> {
        let Ok(list) = self.supervisor.store().list() else {
            return Vec::new();
        };
        let mut seen = self.restarts.lock().unwrap_or_else(|p| p.into_inner());
        list.into_iter()
            .filter_map(|e| {
                // A VM whose state cannot be read has no state to show ("stopped" would
                // be a guess); `GET /vms` says why.
                let status = self.supervisor.status(&e.name).ok()?;
                let runner = status
                    .runner
                    .clone()
                    .unwrap_or_else(|| match &e.definition {
                        Ok(d) => serde_json::to_value(d.runner)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_else(|| "auto".into()),
                        Err(_) => "unknown".into(),
                    });
                let entry = seen.entry(e.name.clone()).or_insert((0, 0));
                let now = status.restarts;
                // The status counts restarts in a row and resets after a stable run.
                entry.1 += u64::from(if now >= entry.0 { now - entry.0 } else { now });
                entry.0 = now;
                Some(VmMetrics {
                    name: e.name,
                    runner,
                    state: status.state,
                    restarts_total: entry.1,
                })
            })
            .collect()
    }

    /// Stops the VM NBD server (at shutdown). Running VMs are left running: they are
    /// re-adopted at the next start, which serves their LUN disks again on the same
    /// socket path, and their VMMs reconnect meanwhile (their requests wait, up to the
    /// VMM's reconnect window, 60 s by default).
    pub async fn shutdown(&self) {
        self.janitor.abort();
        if let Some((server, _)) = self.handover.nbd.lock().await.take() {
            server.stop(Duration::from_secs(2)).await;
        }
    }
}

/// What `/metrics` shows of one VM.
pub struct VmMetrics {
    /// Name.
    pub name: String,
    /// Runner in use, or the definition's.
    pub runner: String,
    /// State.
    pub state: VmState,
    /// Restarts after crashes since the daemon started.
    pub restarts_total: u64,
}

/// The daemon's [`Resolver`]: LUN disks over the VM NBD server, NICs as TAPs on the
/// port group's switch. See the [module docs](self).
pub struct Handover {
    appliance: Arc<Appliance>,
    socket: PathBuf,
    /// The VM NBD server with its exports' devices.
    nbd: tokio::sync::Mutex<Option<(NbdServer, Devices)>>,
    runtime: tokio::runtime::Handle,
    /// Serializes making NIC ports (in a start) and taking them away (after a VM ended),
    /// so that a port being made for a start is never taken for a stale one.
    nic_lock: Mutex<()>,
    /// The supervisor this resolves for (set once it exists): which other VMs are active.
    supervisor: OnceLock<Weak<Supervisor>>,
}

/// The switch port (and TAP device) name of a VM's NIC: 15 characters at most.
pub fn vm_port_name(vm: &str, nic: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in vm.bytes().chain([b'/']).chain(nic.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{VM_PORT_PREFIX}{h:08x}")
}

/// The VM NBD server's configuration for `devices`: one export per LUN, unix socket only.
fn nbd_config(devices: &Devices) -> NbdConfig {
    NbdConfig {
        listen: Vec::new(),
        exports: devices
            .keys()
            .map(|n| {
                (
                    n.clone(),
                    ExportConfig {
                        description: Some("VM disk".into()),
                        ..ExportConfig::default()
                    },
                )
            })
            .collect(),
        ..NbdConfig::default()
    }
}

/// The switch port of NIC `i` (`nic`) of VM `def`: a `netdev` port on the TAP of the
/// same name, with the NIC's MAC.
fn nic_port_spec(
    def: &VmDefinition,
    i: usize,
    nic: &basalt_compute::definition::Nic,
) -> basalt_net::PortSpec {
    let name = vm_port_name(&def.name, &nic.id);
    let mac = def.nic_mac(i).map(basalt_net::MacAddr);
    basalt_net::PortSpec {
        name: name.clone(),
        portgroup: nic.port_group.clone(),
        kind: basalt_net::PortKind::Netdev,
        mac,
        interface: Some(name),
        host: None,
    }
}

/// Whether VM `other` has a disk on LUN `source` that, with a disk of ours on it
/// (`read_only` or not), makes two writers: only two read-only disks may share a LUN.
fn writes_with(other: &VmDefinition, source: &str, read_only: bool) -> bool {
    other.disks.iter().any(|d| {
        matches!(&d.source, DiskSource::Lun(l) if l == source) && !(d.read_only && read_only)
    })
}

/// A status for [`VmInfo`]: the default with the reason when it cannot be read.
fn split_status(status: Result<VmStatus, String>) -> (VmStatus, Option<String>) {
    match status {
        Ok(s) => (s, None),
        Err(e) => (VmStatus::default(), Some(e)),
    }
}

/// Whether VM `name` is active (starting, running, stopping). A VM whose folder is gone
/// is not (an active VM cannot be deleted); any other failure is an error, which the
/// checks treat as "maybe active".
fn vm_active(sup: &Supervisor, name: &str) -> Result<bool, String> {
    match sup.status(name) {
        Ok(s) => Ok(s.state.is_active()),
        Err(SupervisorError::Store(StoreError::NotFound(_))) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// The active VMs among `entries` (but `me`) whose definition `uses` accepts. Nothing
/// unknown passes as "not a user": a VM whose state cannot be read (`active` fails), or
/// an active one whose definition cannot be read, is an error, as what it uses is not
/// known. A stopped VM with an unreadable definition is no user: it cannot start until
/// its definition reads again, and that start is checked too.
fn active_users(
    entries: Vec<VmEntry>,
    me: Option<&str>,
    uses: impl Fn(&VmDefinition) -> bool,
    active: impl Fn(&str) -> Result<bool, String>,
) -> Result<Vec<String>, String> {
    let mut users = Vec::new();
    for e in entries {
        if me == Some(e.name.as_str()) {
            continue;
        }
        match &e.definition {
            Ok(d) if !uses(d) => {}
            Ok(_) => {
                let on = active(&e.name).map_err(|why| {
                    format!("cannot tell whether VM {:?} is running: {why}", e.name)
                })?;
                if on {
                    users.push(e.name);
                }
            }
            Err(bad) => unknown_user(&e.name, bad, &active)?,
        }
    }
    Ok(users)
}

/// A VM whose definition cannot be read (`bad`) may use anything: fine only if it is
/// known not to run (it cannot start again before its definition parses, and that
/// start is checked).
fn unknown_user(
    name: &str,
    bad: &impl std::fmt::Display,
    active: impl Fn(&str) -> Result<bool, String>,
) -> Result<(), String> {
    let on = active(name).map_err(|why| {
        format!(
            "VM {name:?} has an unreadable definition ({bad}) and its state cannot be \
             read: {why}"
        )
    })?;
    if on {
        return Err(format!(
            "VM {name:?} is running but its definition cannot be read ({bad}), so what it \
             uses is unknown"
        ));
    }
    Ok(())
}

/// Who a switch port named `port`, made for NIC `nic` of VM `def`, may belong to
/// besides that NIC.
#[derive(Debug, PartialEq, Eq)]
enum PortOwner {
    /// Nobody else: a port of that name is this NIC's, left from its last run.
    Free,
    /// Another NIC of this VM, or a NIC of another VM that is active.
    Other(String),
    /// Cannot tell: the VMs cannot be listed, or one that is active (or whose state
    /// cannot be read) has an unreadable definition.
    Unknown(String),
}

/// Who else has port name `port` (see [`PortOwner`]). Port names are a 32-bit hash of
/// VM and NIC (`name`, [`vm_port_name`] but in tests), so two VM/NIC pairs can share
/// one: the second must neither take the first's port off its switch nor make it its
/// own. A NIC of a VM that is not active owns no port (its TAP went with its VMM).
fn port_owner(
    def: &VmDefinition,
    nic: &str,
    port: &str,
    entries: &[VmEntry],
    name: impl Fn(&str, &str) -> String,
    active: impl Fn(&str) -> Result<bool, String>,
) -> PortOwner {
    if let Some(n) = def
        .nics
        .iter()
        .find(|n| n.id != nic && name(&def.name, &n.id) == port)
    {
        return PortOwner::Other(format!("NIC {:?} of the same VM", n.id));
    }
    let mut unknown = None;
    for e in entries.iter().filter(|e| e.name != def.name) {
        let same = match &e.definition {
            Ok(d) => match d.nics.iter().find(|n| name(&d.name, &n.id) == port) {
                Some(n) => Ok(n.id.clone()),
                None => continue,
            },
            Err(bad) => Err(bad),
        };
        match (active(&e.name), same) {
            (Ok(false), _) => {}
            (Ok(true), Ok(n)) => {
                return PortOwner::Other(format!("NIC {n:?} of VM {:?}, which is running", e.name))
            }
            (Err(why), Ok(n)) => {
                unknown.get_or_insert(format!(
                    "VM {:?} (NIC {n:?}) may be running: its state cannot be read: {why}",
                    e.name
                ));
            }
            (Ok(true), Err(bad)) => {
                unknown.get_or_insert(format!(
                    "VM {:?} is running but its definition cannot be read ({bad})",
                    e.name
                ));
            }
            (Err(why), Err(bad)) => {
                unknown.get_or_insert(format!(
                    "VM {:?} has an unreadable definition ({bad}) and state ({why})",
                    e.name
                ));
            }
        }
    }
    unknown.map_or(PortOwner::Free, PortOwner::Unknown)
}

/// The switch calls [`release_stale_ports`] makes: the appliance's switches, or a
/// stand-in in tests (a real switch needs a datapath).
trait NicPorts {
    /// Whether the running switch of port group `pg` has port `port`.
    fn has_port(&self, pg: &str, port: &str) -> bool;
    /// Takes port `port` off the switch of port group `pg`.
    fn remove_port(&self, pg: &str, port: &str) -> Result<(), String>;
}

impl NicPorts for super::switches::Switches {
    fn has_port(&self, pg: &str, port: &str) -> bool {
        self.with_portgroup(pg)
            .is_ok_and(|sw| sw.port(port).is_some())
    }

    fn remove_port(&self, pg: &str, port: &str) -> Result<(), String> {
        let sw = self.with_portgroup(pg)?;
        sw.remove_port(port).map(|_| ()).map_err(|e| e.to_string())
    }
}

/// Takes the NIC ports of VMs that do not run (all, or only `only`) off their switches;
/// a port whose name another, active VM/NIC shares (or may share) is that one's and
/// stays. The caller serializes this with the making of ports (`nic_lock`).
///
/// "Does not run" is the status (live, or as recorded) *and* the absence of a VMM
/// process for the VM in `scan` (asked once, and only if some port is there to go):
/// a VMM that nobody supervises (one that could not be adopted, or started by hand)
/// may run while `status.json` says stopped, and its ports are its network. When the
/// scan fails, no port can be told stale, and all stay.
fn release_stale_ports(
    sup: &Supervisor,
    ports: &impl NicPorts,
    only: Option<&str>,
    scan: impl Fn() -> Result<VmmScan, String>,
) {
    // Every VM, for the owner check: without the list no port can be told stale.
    let entries = match sup.store().list() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the VMs to release their NIC ports");
            return;
        }
    };
    let mut scanned = None;
    let defs = entries
        .iter()
        .filter(|e| only.is_none_or(|n| n == e.name))
        .filter_map(|e| e.definition.as_ref().ok());
    for def in defs {
        if def.nics.is_empty() || sup.status(&def.name).map_or(true, |s| s.state.is_active()) {
            continue;
        }
        for nic in &def.nics {
            let port = vm_port_name(&def.name, &nic.id);
            if !ports.has_port(&nic.port_group, &port) {
                continue;
            }
            let found = match scanned.get_or_insert_with(&scan) {
                Ok(found) => &*found,
                Err(why) => {
                    tracing::warn!(vm = %def.name, nic = %nic.id, %port, %why, "cannot tell whether a VMM runs for the VM, port kept");
                    continue;
                }
            };
            if let Some(pid) = found.pid_of(&sup.store().dir(&def.name)) {
                tracing::warn!(vm = %def.name, nic = %nic.id, %port, pid, "a VMM the daemon does not supervise runs for the VM, port kept");
                continue;
            }
            // Active as supervised or recorded, or with a VMM process all the same.
            let active =
                |n: &str| Ok(vm_active(sup, n)? || found.pid_of(&sup.store().dir(n)).is_some());
            match port_owner(def, &nic.id, &port, &entries, vm_port_name, active) {
                PortOwner::Free => {}
                PortOwner::Other(who) => {
                    tracing::debug!(vm = %def.name, nic = %nic.id, %port, %who, "port name shared, port kept");
                    continue;
                }
                PortOwner::Unknown(why) => {
                    tracing::warn!(vm = %def.name, nic = %nic.id, %port, %why, "cannot tell whose port this is, port kept");
                    continue;
                }
            }
            match ports.remove_port(&nic.port_group, &port) {
                Ok(()) => {
                    tracing::info!(vm = %def.name, nic = %nic.id, %port, "VM NIC port removed")
                }
                Err(e) => {
                    tracing::warn!(vm = %def.name, %port, error = %e, "cannot remove a VM NIC port")
                }
            }
        }
    }
}

impl Handover {
    /// Re-exports, with the handle the storage has now, every export whose LUN handle
    /// changed (the pool was checked or re-imported: the old handle fails). The server
    /// drains the old export; the VMMs' NBD clients reconnect and replay. LUNs that are
    /// not up now are left as they are (a later pass, or the next start, sees them).
    async fn refresh_exports(&self) {
        let storage = self.appliance.storage();
        let mut guard = self.nbd.lock().await;
        let Some((server, devices)) = guard.as_mut() else {
            return;
        };
        let mut fresh = devices.clone();
        let mut changed = Vec::new();
        for (name, dev) in fresh.iter_mut() {
            if let Some((now, _)) = storage.lun_dev(name) {
                let now = now as basalt_blockdev::SharedBlockDev;
                if !Arc::ptr_eq(dev, &now) {
                    *dev = now;
                    changed.push(name.clone());
                }
            }
        }
        if changed.is_empty() {
            return;
        }
        match server
            .reconfigure(nbd_config(&fresh), fresh.clone(), None)
            .await
        {
            Ok(()) => {
                tracing::info!(luns = ?changed, "VM NBD server exports the LUNs' new handles");
                *devices = fresh;
            }
            Err(e) => {
                tracing::error!(luns = ?changed, error = %e, "cannot re-export LUNs to the VMs")
            }
        }
    }

    /// Puts the NIC ports of the VMs `names` (adopted at startup) back on their
    /// switches: the same port on the TAP the VMM still holds. Blocks (switch calls).
    fn readd_ports(&self, store: &VmStore, names: &[String]) {
        let _serial = self.nic_lock.lock().unwrap_or_else(|p| p.into_inner());
        for vm in names {
            let Ok(def) = store.get(vm) else { continue };
            for (i, nic) in def.nics.iter().enumerate() {
                let spec = nic_port_spec(&def, i, nic);
                let port = spec.name.clone();
                let sw = match self.appliance.switches().with_portgroup(&nic.port_group) {
                    Ok(sw) => sw,
                    Err(e) => {
                        tracing::error!(vm = %vm, nic = %nic.id, error = %e, "NIC of a running VM has no switch");
                        continue;
                    }
                };
                if sw.port(&port).is_some() {
                    continue;
                }
                if !Path::new("/sys/class/net").join(&port).exists() {
                    tracing::error!(vm = %vm, nic = %nic.id, %port, "TAP of a running VM is gone");
                    continue;
                }
                match sw.add_port(spec) {
                    Ok(_) => tracing::info!(vm = %vm, nic = %nic.id, %port, "VM NIC port restored"),
                    Err(e) => {
                        tracing::error!(vm = %vm, nic = %nic.id, %port, error = %e, "cannot restore a VM NIC port")
                    }
                }
            }
        }
    }

    /// The other active VMs that have a disk on LUN `source` (`POOL/LUN`), unless both
    /// disks are read-only: two writers of one LUN corrupt it. An error when that cannot
    /// be known (see [`active_users`]): the start must then be refused, not let through.
    fn sharing(
        &self,
        def: &VmDefinition,
        source: &str,
        read_only: bool,
    ) -> Result<Vec<String>, String> {
        let sup = self
            .supervisor
            .get()
            .and_then(Weak::upgrade)
            .ok_or("the VM supervisor is gone")?;
        let list = sup
            .store()
            .list()
            .map_err(|e| format!("cannot list the VMs: {e}"))?;
        active_users(
            list,
            Some(&def.name),
            |other| writes_with(other, source, read_only),
            |name| vm_active(&sup, name),
        )
    }

    /// Exports `luns` (export name = LUN name) on the VM NBD server, starting it on first
    /// use; exports of LUNs that no longer exist are dropped.
    async fn export(
        &self,
        luns: Vec<(String, basalt_blockdev::SharedBlockDev)>,
    ) -> Result<(), String> {
        let storage = self.appliance.storage();
        let mut guard = self.nbd.lock().await;
        let mut devices: Devices = match guard.as_ref() {
            Some((_, d)) => d
                .iter()
                .filter(|(name, _)| storage.lun_dev(name).is_some())
                .map(|(n, d)| (n.clone(), d.clone()))
                .collect(),
            None => BTreeMap::new(),
        };
        let mut changed = guard.is_none();
        for (name, dev) in luns {
            let same = devices.get(&name).is_some_and(|d| Arc::ptr_eq(d, &dev));
            if !same {
                devices.insert(name, dev);
                changed = true;
            }
        }
        if let Some((_, old)) = guard.as_ref() {
            changed |= old.len() != devices.len();
        }
        if !changed {
            return Ok(());
        }
        let config = nbd_config(&devices);
        match guard.as_mut() {
            Some((server, d)) => {
                server
                    .reconfigure(config, devices.clone(), None)
                    .await
                    .map_err(|e| format!("VM NBD server: {e}"))?;
                *d = devices;
            }
            None => {
                let server = NbdServer::start(config, devices.clone(), None)
                    .await
                    .map_err(|e| format!("VM NBD server: {e}"))?;
                server
                    .serve_unix(&self.socket)
                    .map_err(|e| format!("VM NBD server: {e}"))?;
                tracing::info!(socket = %self.socket.display(), "VM NBD server started");
                *guard = Some((server, devices));
            }
        }
        Ok(())
    }

    /// Exports the LUN disks of the VMs `names` (adopted at startup), whose VMMs are
    /// reconnecting to the VM NBD server. A LUN that is not up is logged: that VMM's
    /// requests fail once its reconnect window passes.
    async fn reexport(&self, store: &VmStore, names: &[String]) {
        let storage = self.appliance.storage();
        let mut luns = Vec::new();
        for name in names {
            let Ok(def) = store.get(name) else { continue };
            for d in &def.disks {
                let DiskSource::Lun(source) = &d.source else {
                    continue;
                };
                let lun = source.split_once('/').map_or(source.as_str(), |(_, l)| l);
                match storage.lun_dev(lun) {
                    Some((dev, _)) => {
                        luns.push((lun.to_string(), dev as basalt_blockdev::SharedBlockDev))
                    }
                    None => {
                        tracing::error!(vm = %name, disk = %d.id, %source, "LUN of a running VM is not up")
                    }
                }
            }
        }
        if luns.is_empty() {
            return;
        }
        match self.export(luns).await {
            Ok(()) => tracing::info!("VM NBD server serving the adopted VMs' disks again"),
            Err(e) => tracing::error!(error = %e, "cannot serve the adopted VMs' disks"),
        }
    }

    /// Takes the NIC ports of VMs that do not run (all, or only `only`) off their
    /// switches (see [`release_stale_ports`]). Blocks (switch calls, a /proc scan).
    /// `deleting`: a delete's check, under the VM's hold, has just found no VMM for
    /// `only`; then a failing scan does not keep its ports, which would outlive the VM's
    /// folder where no later pass looks for them.
    fn release_ports(&self, sup: &Supervisor, only: Option<&str>, deleting: bool) {
        // Before `nic_lock`: the scan reads every process's command line and can wait on
        // one stuck in the kernel, and starts wait for `nic_lock` to make their ports. A
        // VMM that appears after the scan is one a start launched (it shows as Starting,
        // so active) or one started by hand in that instant.
        let scan = match scan_vmms() {
            Ok(found) => Ok(found),
            Err(_) if deleting => Ok(VmmScan::default()),
            Err(e) => Err(e.to_string()),
        };
        let _serial = self.nic_lock.lock().unwrap_or_else(|p| p.into_inner());
        release_stale_ports(sup, self.appliance.switches(), only, || scan.clone());
    }

    fn resolve_inner(&self, def: &VmDefinition, dir: &Path) -> Result<Launch, String> {
        let mut args = VmmArgs::new(dir);
        let mut lun_disks = Vec::new();
        for d in &def.disks {
            let DiskSource::Lun(source) = &d.source else {
                continue;
            };
            let (pool, lun) = source
                .split_once('/')
                .ok_or_else(|| format!("disk {}: LUN {source:?} must be POOL/LUN", d.id))?;
            lun_disks.push((d, source, pool, lun));
            args.disks.push((
                d.id.clone(),
                DiskEndpoint::Nbd(NbdAddress::Unix {
                    socket: self.socket.clone(),
                    export: lun.to_string(),
                }),
            ));
        }
        if !lun_disks.is_empty() {
            // The lookup and the export under the appliance's mutation lock, which LUN
            // delete, rename and pool export hold while they check for users: either
            // they see this VM starting, or this start sees the LUN gone. Outside the
            // runtime's context (see `resolve`), so this may wait.
            self.runtime.block_on(self.appliance.exclusive(|| async {
                let storage = self.appliance.storage();
                let mut luns = Vec::new();
                for (d, source, pool, lun) in lun_disks {
                    match storage.find_lun(lun) {
                        Some((p, _)) if p == pool => {}
                        Some((p, _)) => {
                            return Err(format!(
                                "disk {}: LUN {lun:?} is in pool {p:?}, not {pool:?}",
                                d.id
                            ))
                        }
                        None => {
                            return Err(format!(
                                "disk {}: no LUN {lun:?} is up in pool {pool:?}",
                                d.id
                            ))
                        }
                    }
                    match self.sharing(def, source, d.read_only) {
                        Ok(others) if others.is_empty() => {}
                        Ok(others) => {
                            return Err(format!(
                                "disk {}: LUN {source:?} is in use by VM {:?}, which is \
                                 running; two VMs may share a LUN only if both disks are \
                                 read_only",
                                d.id, others[0]
                            ))
                        }
                        Err(why) => {
                            return Err(format!(
                                "disk {}: cannot check that no other running VM writes LUN \
                                 {source:?}, so the VM is not started (two writers would \
                                 corrupt the LUN): {why}",
                                d.id
                            ))
                        }
                    }
                    let (dev, _) = storage
                        .lun_dev(lun)
                        .ok_or_else(|| format!("disk {}: LUN {source:?} is not up", d.id))?;
                    luns.push((lun.to_string(), dev as basalt_blockdev::SharedBlockDev));
                }
                self.export(luns).await
            }))?;
        }
        let mut fds = Vec::new();
        let _serial = self.nic_lock.lock().unwrap_or_else(|p| p.into_inner());
        for (i, nic) in def.nics.iter().enumerate() {
            let sw = self
                .appliance
                .switches()
                .with_portgroup(&nic.port_group)
                .map_err(|e| format!("NIC {}: {e}", nic.id))?;
            let spec = nic_port_spec(def, i, nic);
            let name = spec.name.clone();
            let nic_err = |e: &dyn std::fmt::Display| format!("NIC {}: {e}", nic.id);
            if sw.port(&name).is_some() {
                // Left from this NIC's last run (its TAP went away with that VMM), unless
                // another VM/NIC has the same name: then it is that one's, and stays.
                let sup = self
                    .supervisor
                    .get()
                    .and_then(Weak::upgrade)
                    .ok_or_else(|| nic_err(&"the VM supervisor is gone"))?;
                let owner = match sup.store().list() {
                    Ok(list) => port_owner(def, &nic.id, &name, &list, vm_port_name, |n| {
                        vm_active(&sup, n)
                    }),
                    Err(e) => PortOwner::Unknown(format!("cannot list the VMs: {e}")),
                };
                match owner {
                    PortOwner::Free => sw.remove_port(&name).map_err(|e| nic_err(&e))?,
                    PortOwner::Other(who) => {
                        return Err(nic_err(&format!(
                            "switch port {name} is also the port of {who} (port names \
                             are a hash of VM and NIC); rename this VM or NIC"
                        )))
                    }
                    PortOwner::Unknown(why) => {
                        return Err(nic_err(&format!(
                            "switch port {name} exists and cannot be told to be a leftover \
                             of this NIC, so it is left alone: {why}"
                        )))
                    }
                };
            }
            let tap = basalt_compute::vmm::virtio::net::Tap::open(&name)
                .map_err(|e| nic_err(&format!("cannot open TAP {name}: {e}")))?;
            sw.add_port(spec).map_err(|e| {
                nic_err(&format!(
                    "cannot attach TAP {name} to port group {:?}: {e}",
                    nic.port_group
                ))
            })?;
            let fd = tap.into_fd();
            args.nics
                .push((nic.id.clone(), NicEndpoint::TapFd(fd.as_raw_fd())));
            fds.push(fd);
        }
        Ok(Launch { args, fds })
    }
}

impl Resolver for Handover {
    fn resolve(&self, def: &VmDefinition, dir: &Path) -> Result<Launch, String> {
        // The supervisor asks synchronously, from a task of the daemon's multi-threaded
        // runtime; exporting and switch calls wait, so they leave the worker to others.
        tokio::task::block_in_place(|| self.resolve_inner(def, dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM definition with `disks` (`(id, POOL/LUN, read_only)`) and NICs `nics`.
    fn def(name: &str, disks: &[(&str, &str, bool)], nics: &[&str]) -> VmDefinition {
        let disks: Vec<_> = disks
            .iter()
            .map(|(id, lun, ro)| serde_json::json!({"id": id, "source": {"lun": lun}, "read_only": ro}))
            .collect();
        let nics: Vec<_> = nics
            .iter()
            .map(|id| serde_json::json!({"id": id, "port_group": "pg"}))
            .collect();
        let json = serde_json::json!({
            "name": name, "vcpus": 1, "memory_mib": 64, "runner": "builtin",
            "boot": {"kind": "kernel", "kernel": "/k", "cmdline": "console=ttyS0"},
            "disks": disks, "nics": nics,
        });
        VmDefinition::from_json(&json.to_string()).unwrap()
    }

    fn entry(name: &str, definition: Result<VmDefinition, String>) -> VmEntry {
        VmEntry {
            name: name.into(),
            dir: PathBuf::from("/nonexistent").join(name),
            definition,
            status: Ok(VmStatus::default()),
        }
    }

    /// The state of VMs: `Ok(true)` for those in `on`, an error for those in `unknown`.
    fn states<'a>(
        on: &'a [&str],
        unknown: &'a [&str],
    ) -> impl Fn(&str) -> Result<bool, String> + 'a {
        move |n| {
            if unknown.contains(&n) {
                Err("status.json: I/O error".into())
            } else {
                Ok(on.contains(&n))
            }
        }
    }

    fn lun_users(
        entries: Vec<VmEntry>,
        me: &str,
        on: &[&str],
        unknown: &[&str],
    ) -> Result<Vec<String>, String> {
        active_users(
            entries,
            Some(me),
            |d| {
                d.disks
                    .iter()
                    .any(|x| matches!(&x.source, DiskSource::Lun(l) if l == "p0/root"))
            },
            states(on, unknown),
        )
    }

    #[test]
    fn a_lun_writer_check_names_running_users_only() {
        let entries = || {
            vec![
                entry("me", Ok(def("me", &[("d", "p0/root", false)], &[]))),
                entry("a", Ok(def("a", &[("d", "p0/root", false)], &[]))),
                entry("b", Ok(def("b", &[("d", "p0/other", false)], &[]))),
            ]
        };
        assert_eq!(
            lun_users(entries(), "me", &["a", "b", "me"], &[]),
            Ok(vec!["a".to_string()])
        );
        assert_eq!(lun_users(entries(), "me", &["b", "me"], &[]), Ok(vec![]));
        // The state of a VM that does not name the LUN does not matter.
        assert_eq!(lun_users(entries(), "me", &[], &["b"]), Ok(vec![]));
    }

    #[test]
    fn a_lun_writer_check_fails_closed() {
        // A user whose state cannot be read may be running: refused, naming why.
        let entries = vec![entry("a", Ok(def("a", &[("d", "p0/root", false)], &[])))];
        let e = lun_users(entries, "me", &[], &["a"]).unwrap_err();
        assert!(e.contains("cannot tell whether VM \"a\" is running"), "{e}");
        assert!(e.contains("I/O error"), "{e}");

        // A running VM whose definition does not parse may use the LUN: refused.
        let entries = || vec![entry("a", Err("vm.json: expected value".into()))];
        let e = lun_users(entries(), "me", &["a"], &[]).unwrap_err();
        assert!(
            e.contains("VM \"a\" is running but its definition cannot be read"),
            "{e}"
        );
        assert!(e.contains("vm.json: expected value"), "{e}");
        // ... and so is one whose state cannot be read either.
        let e = lun_users(entries(), "me", &[], &["a"]).unwrap_err();
        assert!(e.contains("unreadable definition"), "{e}");
        // A stopped one cannot write: it cannot start before its definition reads again.
        assert_eq!(lun_users(entries(), "me", &[], &[]), Ok(vec![]));
    }

    /// A supervisor (that never starts anything) over a fresh store with `vms` defined.
    fn supervisor(vms: &[VmDefinition]) -> (tempfile::TempDir, Arc<Supervisor>) {
        let tmp = tempfile::tempdir().unwrap();
        let store = VmStore::open(tmp.path().join(VMS_DIR)).unwrap();
        for d in vms {
            store.create(d).unwrap();
        }
        let sup = Supervisor::new(
            store,
            SupervisorConfig::new("/nonexistent"),
            Arc::new(basalt_compute::supervisor::NoHandover),
        );
        (tmp, sup)
    }

    #[test]
    fn a_torn_status_makes_the_one_writer_check_refuse_naming_the_vm() {
        let (_tmp, sup) = supervisor(&[
            def("a", &[("d", "p0/root", false)], &[]),
            def("b", &[("d", "p0/other", false)], &[]),
        ]);
        // The record a full disk or a crash can leave: not "stopped" by default.
        std::fs::write(sup.store().dir("a").join("status.json"), "{\"state\":").unwrap();
        std::fs::write(sup.store().dir("b").join("status.json"), "{").unwrap();
        let check = || {
            active_users(
                sup.store().list().unwrap(),
                Some("me"),
                |other| writes_with(other, "p0/root", false),
                |name| vm_active(&sup, name),
            )
        };
        let e = check().unwrap_err();
        assert!(e.contains("cannot tell whether VM \"a\" is running"), "{e}");
        assert!(e.contains("status.json"), "{e}");
        // Once the record reads again (stopped), the check passes; b never mattered.
        std::fs::write(
            sup.store().dir("a").join("status.json"),
            "{\"state\":\"stopped\"}",
        )
        .unwrap();
        assert_eq!(check(), Ok(vec![]));
        std::fs::write(
            sup.store().dir("a").join("status.json"),
            "{\"state\":\"running\"}",
        )
        .unwrap();
        assert_eq!(check(), Ok(vec!["a".to_string()]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_vm_whose_definition_cannot_be_read_locks_nothing_out() {
        let (_tmp, sup) = supervisor(&[def("a", &[("d", "p0/root", false)], &[])]);
        // Not UTF-8: reading it is an I/O error, not a parse error.
        std::fs::write(sup.store().dir("a").join("vm.json"), [0xff, 0xfe]).unwrap();
        // Its state still reads (stopped): the checks pass, and it can be deleted.
        assert_eq!(vm_active(&sup, "a"), Ok(false));
        let list = sup.store().list().unwrap();
        assert!(list[0].definition.is_err());
        assert_eq!(
            active_users(list, Some("me"), |_| true, |n| vm_active(&sup, n)),
            Ok(vec![])
        );
        sup.delete("a").await.unwrap();
        assert_eq!(vm_active(&sup, "a"), Ok(false));
    }

    #[test]
    fn read_only_disks_may_share_a_lun() {
        let other = def("a", &[("d", "p0/root", true)], &[]);
        assert!(!writes_with(&other, "p0/root", true));
        assert!(writes_with(&other, "p0/root", false));
        assert!(!writes_with(&other, "p0/other", false));
        let other = def("a", &[("d", "p0/root", false)], &[]);
        assert!(writes_with(&other, "p0/root", true));
    }

    /// Every VM/NIC pair gets the same port name: a collision, forced.
    fn colliding(_: &str, _: &str) -> String {
        "bvm-00000000".into()
    }

    #[test]
    fn a_port_whose_name_another_running_vm_shares_is_not_taken() {
        let me = def("me", &[], &["eth0"]);
        let entries = || {
            vec![
                entry("me", Ok(me.clone())),
                entry("other", Ok(def("other", &[], &["eth1"]))),
            ]
        };
        let owner = |on: &[&str], unknown: &[&str]| {
            port_owner(
                &me,
                "eth0",
                "bvm-00000000",
                &entries(),
                colliding,
                states(on, unknown),
            )
        };
        assert_eq!(
            owner(&["me", "other"], &[]),
            PortOwner::Other("NIC \"eth1\" of VM \"other\", which is running".into())
        );
        assert!(
            matches!(owner(&["me"], &["other"]), PortOwner::Unknown(w) if w.contains("I/O error"))
        );
        // The other VM is stopped: its TAP went with its VMM, the port is a leftover.
        assert_eq!(owner(&["me"], &[]), PortOwner::Free);

        // With the real names these two do not collide.
        let port = vm_port_name("me", "eth0");
        assert_eq!(
            port_owner(
                &me,
                "eth0",
                &port,
                &entries(),
                vm_port_name,
                states(&["me", "other"], &[])
            ),
            PortOwner::Free
        );
    }

    #[test]
    fn a_port_name_shared_within_one_vm_or_with_an_unreadable_vm_is_not_taken() {
        let me = def("me", &[], &["eth0", "eth1"]);
        assert_eq!(
            port_owner(
                &me,
                "eth0",
                "bvm-00000000",
                &[],
                colliding,
                states(&[], &[])
            ),
            PortOwner::Other("NIC \"eth1\" of the same VM".into())
        );
        let me = def("me", &[], &["eth0"]);
        let entries = vec![entry("broken", Err("vm.json: expected value".into()))];
        assert!(matches!(
            port_owner(&me, "eth0", "bvm-00000000", &entries, colliding, states(&["broken"], &[])),
            PortOwner::Unknown(w) if w.contains("cannot be read")
        ));
        assert_eq!(
            port_owner(
                &me,
                "eth0",
                "bvm-00000000",
                &entries,
                colliding,
                states(&[], &[])
            ),
            PortOwner::Free
        );
    }

    /// Switch ports as (port group, port), without a datapath.
    #[derive(Default)]
    struct FakePorts(Mutex<std::collections::BTreeSet<(String, String)>>);

    impl FakePorts {
        fn has(&self, pg: &str, port: &str) -> bool {
            self.0
                .lock()
                .unwrap()
                .contains(&(pg.to_string(), port.to_string()))
        }
    }

    impl NicPorts for FakePorts {
        fn has_port(&self, pg: &str, port: &str) -> bool {
            self.has(pg, port)
        }

        fn remove_port(&self, pg: &str, port: &str) -> Result<(), String> {
            self.0
                .lock()
                .unwrap()
                .remove(&(pg.to_string(), port.to_string()));
            Ok(())
        }
    }

    /// A stand-in VMM of `dir` that nobody supervises: a shell blocked reading its stdin
    /// (it ends when that closes), with `--vm-dir dir` on its command line. Returned once
    /// its command line is in place (it has printed).
    fn unsupervised_vmm(dir: &Path) -> std::process::Child {
        use std::io::BufRead;
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "echo ready; read x", "fake-vmm", "--vm-dir"])
            .arg(dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "ready\n");
        child
    }

    #[test]
    fn the_janitor_keeps_the_ports_of_a_vm_whose_vmm_runs_unsupervised() {
        let (_tmp, sup) = supervisor(&[def("a", &[], &["eth0"])]);
        let port = vm_port_name("a", "eth0");
        let ports = FakePorts::default();
        ports.0.lock().unwrap().insert(("pg".into(), port.clone()));
        let real_scan = || scan_vmms().map_err(|e| e.to_string());
        let mut vmm = unsupervised_vmm(&sup.store().dir("a"));
        // No handle, and recorded as stopped: only the process scan knows better.
        assert_eq!(vm_active(&sup, "a"), Ok(false));
        release_stale_ports(&sup, &ports, None, real_scan);
        assert!(
            ports.has("pg", &port),
            "the port of a running VMM was taken"
        );
        release_stale_ports(&sup, &ports, Some("a"), real_scan);
        assert!(
            ports.has("pg", &port),
            "the port of a running VMM was taken"
        );

        drop(vmm.stdin.take());
        vmm.wait().unwrap();
        // Fails closed: a scan that fails tells nothing, and the port stays.
        release_stale_ports(&sup, &ports, None, || Err("/proc: I/O error".into()));
        assert!(ports.has("pg", &port));
        // Once the scan finds no VMM, the port is a leftover.
        release_stale_ports(&sup, &ports, None, real_scan);
        assert!(!ports.has("pg", &port));
    }

    #[test]
    fn port_names_fit_an_interface_name() {
        let n = vm_port_name(
            "a-rather-long-vm-name-of-sixty-four-characters-or-so",
            "eth0",
        );
        assert!(n.len() <= 15, "{n}");
        assert!(n.starts_with(VM_PORT_PREFIX));
    }
}
