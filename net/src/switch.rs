//! The `Switch` runtime: the control plane of one switch on this host.
//!
//! [`Switch::start`] opens the devices a definition names for this host (uplinks bound
//! to interfaces, TAP and internal ports, attached interfaces) and starts the datapath
//! thread. [`Switch::apply`] moves a running switch to a new definition: ports that did
//! not change keep their devices, counters and state, so their traffic flows on while
//! others are added or removed. A failing device open refuses the whole apply and leaves
//! the switch as it was. [`Switch::stop`] (or dropping the switch) closes every device;
//! TAP and internal devices disappear with it.
//!
//! Every method blocks for at most a few milliseconds (device opens and one round trip
//! to the datapath thread); an async caller should use `spawn_blocking`.

use crate::counters::{PortCounters, PortCountersSnapshot};
use crate::datapath::{self, Command, DatapathStatus, Handle, NewPort, PortIo, REPLY_TIMEOUT};
use crate::definition::{DefinitionError, PortKind, PortSpec, SwitchDefinition};
use crate::frame::MacAddr;
use crate::io::packet::{PacketOptions, PacketSocket};
use crate::io::sys;
use crate::io::tap::Tap;
use crate::pipeline::{Config, LearnedMac, PortConfig, PortId, PortRole, MAX_PORTS};
use crate::teaming::TeamConfig;
use crate::vlan::VlanMode;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

/// Where and as whom a switch runs.
#[derive(Debug, Clone)]
pub struct SwitchOptions {
    /// This host's name: selects `[hosts.NAME]` uplink bindings and the ports whose
    /// `host` is this one.
    pub host: String,
    /// A network namespace (`/run/netns/NAME`) whose devices the switch uses, instead of
    /// the caller's. Used by tests that run several "hosts" in one process.
    pub netns: Option<PathBuf>,
    /// The datapath thread's nice value (-10 by default; 0 leaves it alone). Raising
    /// priority needs CAP_SYS_NICE; without it the thread runs at the caller's.
    pub nice: i32,
}

impl Default for SwitchOptions {
    fn default() -> Self {
        SwitchOptions {
            host: sys::hostname(),
            netns: None,
            nice: -10,
        }
    }
}

/// Why a switch operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SwitchError {
    /// The definition is invalid.
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    /// A device could not be opened; nothing was changed.
    #[error("{what} {name:?}: {source}")]
    Device {
        /// "port" or "uplink".
        what: &'static str,
        /// Its name.
        name: String,
        /// The system error.
        source: io::Error,
    },
    /// The definition renames the switch.
    #[error("the definition is for switch {new:?}, but this is switch {old:?}")]
    Rename {
        /// This switch.
        old: String,
        /// The definition's.
        new: String,
    },
    /// A port with that name exists.
    #[error("port {0:?} already exists")]
    PortExists(String),
    /// No port with that name.
    #[error("no port {0:?}")]
    NoPort(String),
    /// More ports than one switch holds.
    #[error("a switch holds at most {MAX_PORTS} ports and uplinks")]
    TooManyPorts,
    /// The switch could not start its datapath.
    #[error("starting the datapath: {0}")]
    Start(io::Error),
    /// The datapath thread did not answer.
    #[error("the switch's datapath thread is not answering")]
    Datapath,
}

/// What an apply changed, by port or uplink name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    /// Ports and uplinks that were opened.
    pub added: Vec<String>,
    /// Ports and uplinks that were closed.
    pub removed: Vec<String>,
    /// Ports whose policy changed (their devices stayed open).
    pub reconfigured: Vec<String>,
}

impl Changes {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.reconfigured.is_empty()
    }
}

/// A port as the compute layer needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortInfo {
    /// The port's name.
    pub name: String,
    /// The device: the TAP's name for `tap` and `internal` ports, the interface for
    /// `netdev` ports.
    pub device: String,
    /// The MAC address the port uses (None for a `netdev` port that has sent nothing).
    pub mac: Option<MacAddr>,
}

/// A port's or uplink's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortStatus {
    /// Name.
    pub name: String,
    /// Role.
    pub role: PortRole,
    /// The device behind it.
    pub device: String,
    /// Its port group (not for uplinks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub portgroup: Option<String>,
    /// Uplinks: up and running.
    pub link_up: bool,
    /// Local ports: the MAC address in use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Local ports: the uplink carrying their traffic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
    /// Local ports: inbound traffic blocked after a rejected MAC change.
    pub blocked: bool,
}

/// A port group's team as it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeamStatus {
    /// The port group.
    pub portgroup: String,
    /// The uplinks in use now, in order.
    pub uplinks_in_use: Vec<String>,
}

/// A running switch's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchStatus {
    /// The switch.
    pub name: String,
    /// This host.
    pub host: String,
    /// Uplinks and ports.
    pub ports: Vec<PortStatus>,
    /// Teams by port group.
    pub teams: Vec<TeamStatus>,
    /// MACs learned on uplinks.
    pub learned_macs: Vec<LearnedMac>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Want {
    kind: Option<PortKind>, // None: uplink
    device: String,
    mac: Option<MacAddr>,
    portgroup: Option<String>,
}

#[derive(Debug)]
struct Bound {
    id: PortId,
    want: Want,
    mac: MacAddr,
    counters: Arc<PortCounters>,
}

struct Inner {
    def: SwitchDefinition,
    bound: BTreeMap<String, Bound>,
    dp: Handle,
}

/// A running switch on this host.
pub struct Switch {
    name: String,
    opts: SwitchOptions,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Switch")
            .field("name", &self.name)
            .field("host", &self.opts.host)
            .finish()
    }
}

impl Switch {
    /// Starts `def` on this host (named by its host name), in this network namespace.
    pub fn start(def: SwitchDefinition) -> Result<Switch, SwitchError> {
        Switch::start_with(def, SwitchOptions::default())
    }

    /// Starts `def` with explicit options.
    pub fn start_with(def: SwitchDefinition, opts: SwitchOptions) -> Result<Switch, SwitchError> {
        def.validate()?;
        let dp = datapath::spawn(&def.name, opts.netns.as_deref(), opts.nice)
            .map_err(SwitchError::Start)?;
        let sw = Switch {
            name: def.name.clone(),
            opts,
            inner: Mutex::new(Inner {
                def: SwitchDefinition::new(&def.name),
                bound: BTreeMap::new(),
                dp,
            }),
        };
        sw.apply(def)?;
        Ok(sw)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The switch's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host name this switch runs as.
    pub fn host(&self) -> &str {
        &self.opts.host
    }

    /// The definition in force (including ports added with [`Switch::add_port`]).
    pub fn definition(&self) -> SwitchDefinition {
        self.lock().def.clone()
    }

    /// Moves the switch to `def`: opens what is new, closes what is gone, reconfigures
    /// the rest in place. Either everything applies or nothing does.
    pub fn apply(&self, def: SwitchDefinition) -> Result<Changes, SwitchError> {
        def.validate()?;
        if def.name != self.name {
            return Err(SwitchError::Rename {
                old: self.name.clone(),
                new: def.name,
            });
        }
        let mut inner = self.lock();
        let host = self.opts.host.as_str();
        let mut want: BTreeMap<String, Want> = BTreeMap::new();
        for u in &def.uplinks {
            if let Some(ifname) = def.uplink_interface(&u.name, host) {
                want.insert(
                    u.name.clone(),
                    Want {
                        kind: None,
                        device: ifname.to_string(),
                        mac: None,
                        portgroup: None,
                    },
                );
            }
        }
        for p in def.ports_on(host) {
            want.insert(
                p.name.clone(),
                Want {
                    kind: Some(p.kind),
                    device: p.interface.clone().unwrap_or_else(|| p.name.clone()),
                    mac: p.mac,
                    portgroup: Some(p.portgroup.clone()),
                },
            );
        }
        // Same device and kind: keep it open. Anything else is closed and (re)opened.
        let reopen =
            |a: &Want, b: &Want| a.kind != b.kind || a.device != b.device || a.mac != b.mac;
        let mut changes = Changes::default();
        let mut remove = Vec::new();
        for (name, b) in &inner.bound {
            match want.get(name) {
                Some(w) if !reopen(&b.want, w) => {
                    let policy_changed = b.want.portgroup != w.portgroup
                        || w.portgroup.as_deref().and_then(|g| inner.def.portgroup(g))
                            != w.portgroup.as_deref().and_then(|g| def.portgroup(g));
                    if policy_changed {
                        changes.reconfigured.push(name.clone());
                    }
                }
                _ => {
                    remove.push(b.id);
                    changes.removed.push(name.clone());
                }
            }
        }
        let mut to_open: Vec<(String, Want)> = Vec::new();
        for (name, w) in &want {
            match inner.bound.get(name) {
                Some(b) if !reopen(&b.want, w) => {}
                _ => to_open.push((name.clone(), w.clone())),
            }
        }
        // Open every new device before touching the running switch.
        let opened = sys::in_netns(self.opts.netns.as_deref(), || {
            let ctl = sys::ctl_socket()?;
            let mut v = Vec::new();
            for (name, w) in &to_open {
                match open_device(ctl.as_raw_fd(), name, w) {
                    Ok(x) => v.push(Ok(x)),
                    Err(e) => {
                        v.push(Err((name.clone(), w.kind.is_none(), e)));
                        break;
                    }
                }
            }
            Ok(v)
        })
        .map_err(SwitchError::Start)?;
        let mut devices = Vec::new();
        for r in opened {
            match r {
                Ok(d) => devices.push(d),
                Err((name, uplink, source)) => {
                    return Err(SwitchError::Device {
                        what: if uplink { "uplink" } else { "port" },
                        name,
                        source,
                    })
                }
            }
        }
        // Number the ports: survivors keep theirs, new ones take the lowest free.
        let old_bound = std::mem::take(&mut inner.bound);
        let mut counters: BTreeMap<String, Arc<PortCounters>> = BTreeMap::new();
        let mut bound: BTreeMap<String, Bound> = BTreeMap::new();
        for (name, b) in old_bound {
            counters.insert(name.clone(), b.counters.clone());
            if !remove.contains(&b.id) {
                let w = want.get(&name).cloned().unwrap_or(b.want.clone());
                bound.insert(name, Bound { want: w, ..b });
            }
        }
        let mut used: BTreeSet<PortId> = bound.values().map(|b| b.id).collect();
        let mut add = Vec::new();
        for ((name, w), (io, mac)) in to_open.into_iter().zip(devices) {
            let Some(id) = (0..MAX_PORTS as PortId).find(|i| !used.contains(i)) else {
                return Err(SwitchError::TooManyPorts);
            };
            used.insert(id);
            changes.added.push(name.clone());
            let c = counters.get(&name).cloned().unwrap_or_default();
            add.push(NewPort {
                id,
                io,
                uplink: w.kind.is_none(),
            });
            bound.insert(
                name,
                Bound {
                    id,
                    want: w,
                    mac,
                    counters: c,
                },
            );
        }
        let config = build_config(&def, &bound);
        let (done, wait) = mpsc::sync_channel(1);
        inner
            .dp
            .send(Command::Update {
                config,
                add,
                remove,
                done,
            })
            .map_err(|_| SwitchError::Datapath)?;
        wait.recv_timeout(REPLY_TIMEOUT)
            .map_err(|_| SwitchError::Datapath)?;
        inner.bound = bound;
        inner.def = def;
        if !changes.is_empty() {
            tracing::info!(switch = %self.name, ?changes, "switch definition applied");
        }
        Ok(changes)
    }

    /// Adds a port (for example a VM's NIC: `PortSpec { name: "vm7-eth0", portgroup:
    /// "vm-10", kind: PortKind::Tap, .. }`) and returns its device.
    pub fn add_port(&self, spec: PortSpec) -> Result<PortInfo, SwitchError> {
        let mut def = self.definition();
        if def.ports.iter().any(|p| p.name == spec.name) {
            return Err(SwitchError::PortExists(spec.name));
        }
        let name = spec.name.clone();
        def.ports.push(spec);
        self.apply(def)?;
        self.port(&name).ok_or(SwitchError::NoPort(name))
    }

    /// Removes a port.
    pub fn remove_port(&self, name: &str) -> Result<Changes, SwitchError> {
        let mut def = self.definition();
        let before = def.ports.len();
        def.ports.retain(|p| p.name != name);
        if def.ports.len() == before {
            return Err(SwitchError::NoPort(name.to_string()));
        }
        self.apply(def)
    }

    /// A port's device and MAC address.
    pub fn port(&self, name: &str) -> Option<PortInfo> {
        let inner = self.lock();
        let b = inner.bound.get(name)?;
        b.want.kind?;
        Some(PortInfo {
            name: name.to_string(),
            device: b.want.device.clone(),
            mac: (!b.mac.is_zero()).then_some(b.mac),
        })
    }

    /// Tells the switch that a guest changed its MAC address (a VMM reports this from
    /// virtio-net's control queue; for TAP ports the switch notices by itself).
    pub fn set_guest_mac(&self, port: &str, mac: MacAddr) -> Result<(), SwitchError> {
        let inner = self.lock();
        let id = inner
            .bound
            .get(port)
            .map(|b| b.id)
            .ok_or_else(|| SwitchError::NoPort(port.to_string()))?;
        inner
            .dp
            .send(Command::GuestMac { port: id, mac })
            .map_err(|_| SwitchError::Datapath)
    }

    /// Every port's and uplink's counters, by name.
    pub fn counters(&self) -> BTreeMap<String, PortCountersSnapshot> {
        self.lock()
            .bound
            .iter()
            .map(|(n, b)| (n.clone(), b.counters.snapshot()))
            .collect()
    }

    /// The live state: links, teams, MAC addresses, learned MACs.
    pub fn status(&self) -> Result<SwitchStatus, SwitchError> {
        let inner = self.lock();
        let (reply, wait) = mpsc::sync_channel(1);
        inner
            .dp
            .send(Command::Status { reply })
            .map_err(|_| SwitchError::Datapath)?;
        let st: DatapathStatus = wait
            .recv_timeout(REPLY_TIMEOUT)
            .map_err(|_| SwitchError::Datapath)?;
        let by_id: BTreeMap<PortId, (&String, &Bound)> =
            inner.bound.iter().map(|(n, b)| (b.id, (n, b))).collect();
        let ports = st
            .ports
            .iter()
            .filter_map(|v| {
                let (name, b) = by_id.get(&v.id)?;
                Some(PortStatus {
                    name: (*name).clone(),
                    role: v.role,
                    device: b.want.device.clone(),
                    portgroup: b.want.portgroup.clone(),
                    link_up: v.link_up,
                    mac: v.mac.clone(),
                    uplink: v.uplink.clone(),
                    blocked: v.blocked,
                })
            })
            .collect();
        let teams = inner
            .def
            .portgroups
            .iter()
            .zip(st.teams.iter())
            .map(|(pg, t)| TeamStatus {
                portgroup: pg.name.clone(),
                uplinks_in_use: t
                    .iter()
                    .filter_map(|id| by_id.get(id).map(|(n, _)| (*n).clone()))
                    .collect(),
            })
            .collect();
        Ok(SwitchStatus {
            name: self.name.clone(),
            host: self.opts.host.clone(),
            ports,
            teams,
            learned_macs: st.learned,
        })
    }

    /// Stops the datapath and closes every device.
    pub fn stop(self) {
        self.lock().dp.stop();
    }
}

/// Opens the device for one port or uplink; returns it with the port's MAC address.
fn open_device(ctl: i32, name: &str, w: &Want) -> io::Result<(PortIo, MacAddr)> {
    match w.kind {
        None => {
            sys::set_up(ctl, &w.device)?;
            let s = PacketSocket::open(&w.device, PacketOptions::default())?;
            Ok((PortIo::Packet(s), MacAddr::default()))
        }
        Some(PortKind::Tap) | Some(PortKind::Internal) => {
            let t = Tap::create(name)?;
            let mac = match w.mac {
                Some(m) => {
                    sys::set_hwaddr(ctl, name, m)?;
                    m
                }
                None => sys::hwaddr(ctl, name)?,
            };
            if w.kind == Some(PortKind::Internal) {
                sys::set_up(ctl, name)?;
            }
            Ok((PortIo::Tap(t), mac))
        }
        Some(PortKind::Netdev) => {
            sys::set_up(ctl, &w.device)?;
            let s = PacketSocket::open(&w.device, PacketOptions::default())?;
            Ok((PortIo::Packet(s), w.mac.unwrap_or_default()))
        }
    }
}

fn build_config(def: &SwitchDefinition, bound: &BTreeMap<String, Bound>) -> Config {
    let len = bound
        .values()
        .map(|b| usize::from(b.id) + 1)
        .max()
        .unwrap_or(0);
    let mut cfg = Config {
        ports: vec![None; len],
        teams: Vec::new(),
    };
    let pg_index: BTreeMap<&str, usize> = def
        .portgroups
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.as_str(), i))
        .collect();
    for (name, b) in bound {
        let pc = match (
            &b.want.kind,
            b.want.portgroup.as_deref().and_then(|g| def.portgroup(g)),
        ) {
            (None, _) => PortConfig {
                name: name.clone(),
                role: PortRole::Uplink,
                vlan: VlanMode::Uplink,
                security: Default::default(),
                shaping: None,
                team: None,
                mac: MacAddr::default(),
                counters: b.counters.clone(),
            },
            (Some(kind), Some(pg)) => PortConfig {
                name: name.clone(),
                role: if *kind == PortKind::Internal {
                    PortRole::Internal
                } else {
                    PortRole::Vm
                },
                vlan: VlanMode::of_portgroup(pg),
                security: pg.security,
                shaping: pg.shaping,
                team: pg_index.get(pg.name.as_str()).copied(),
                mac: b.mac,
                counters: b.counters.clone(),
            },
            (Some(_), None) => continue,
        };
        cfg.ports[usize::from(b.id)] = Some(pc);
    }
    let uplink_id = |role: &String| {
        bound
            .get(role)
            .filter(|b| b.want.kind.is_none())
            .map(|b| b.id)
    };
    for pg in &def.portgroups {
        let t = pg.effective_teaming(&def.uplinks);
        cfg.teams.push(TeamConfig {
            policy: t.policy,
            active: t.active.iter().filter_map(uplink_id).collect(),
            standby: t.standby.iter().filter_map(uplink_id).collect(),
            failback: t.failback,
            notify_switches: t.notify_switches,
        });
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_is_shareable() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Switch>();
    }

    #[test]
    fn config_numbers_teams_by_portgroup() {
        let def = SwitchDefinition::from_toml(
            r#"
name = "s"
[[uplinks]]
name = "u1"
interface = "eth1"
[[uplinks]]
name = "u2"
[[portgroups]]
name = "a"
teaming = { policy = "failover-order", active = ["u2", "u1"] }
[[portgroups]]
name = "b"
vlan = 7
[[ports]]
name = "p"
portgroup = "b"
"#,
        )
        .unwrap();
        let mut bound = BTreeMap::new();
        let w = |kind, device: &str, pg: Option<&str>| Want {
            kind,
            device: device.to_string(),
            mac: None,
            portgroup: pg.map(str::to_string),
        };
        bound.insert(
            "u1".to_string(),
            Bound {
                id: 0,
                want: w(None, "eth1", None),
                mac: MacAddr::default(),
                counters: Arc::default(),
            },
        );
        bound.insert(
            "p".to_string(),
            Bound {
                id: 2,
                want: w(Some(PortKind::Tap), "p", Some("b")),
                mac: MacAddr([2, 0, 0, 0, 0, 1]),
                counters: Arc::default(),
            },
        );
        let cfg = build_config(&def, &bound);
        assert_eq!(cfg.ports.len(), 3);
        assert!(cfg.ports[1].is_none());
        // u2 is not bound on this host: the team uses only u1.
        assert_eq!(cfg.teams[0].active, vec![0]);
        assert_eq!(cfg.teams[1].active, vec![0]);
        let p = cfg.ports[2].as_ref().unwrap();
        assert_eq!((p.team, p.vlan.clone()), (Some(1), VlanMode::Access(7)));
    }
}
