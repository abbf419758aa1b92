//! The switch definition: one document (TOML or JSON) that says what a switch is.
//!
//! A definition names the switch, its uplink roles, its port groups with their policy
//! (VLAN, security, shaping, teaming) and its ports. The same document serves a standard
//! switch on one host and a distributed switch on many: uplinks are *roles* (`uplink1`,
//! `uplink2`, as in a vSphere distributed switch's uplink port group), each bound to a
//! host interface either by a default `interface` or per host under `[hosts.NAME]`.
//! Ports with a `host` belong to that host only; ports without one exist on every host
//! that applies the definition.
//!
//! ```toml
//! name = "dvs0"
//!
//! [[uplinks]]
//! name = "uplink1"
//! interface = "eth1"          # default binding
//! [[uplinks]]
//! name = "uplink2"
//!
//! [hosts.esx2.uplinks]        # host esx2 binds the roles to its own NICs
//! uplink1 = "ens4"
//! uplink2 = "ens5"
//!
//! [[portgroups]]
//! name = "vm-10"
//! vlan = 10                   # 0 untagged (EST), 1-4094 tagged by the switch (VST),
//!                             # 4095 guest tagging (VGT)
//! security = { promiscuous = "reject", mac_changes = "reject", forged_transmits = "reject" }
//! shaping = { average_bps = 100_000_000, peak_bps = 200_000_000, burst_bytes = 1_000_000 }
//! teaming = { policy = "failover-order", active = ["uplink1"], standby = ["uplink2"] }
//!
//! [[portgroups]]
//! name = "trunk"
//! trunk = [10, "20-29"]        # a trunk port group with an allowed list ...
//! native_vlan = 1             # ... and untagged frames in VLAN 1
//!
//! [[ports]]
//! name = "vm1-eth0"           # the TAP device the switch creates
//! portgroup = "vm-10"
//! mac = "52:54:00:00:00:01"
//! host = "esx1"
//! ```
//!
//! [`SwitchDefinition::from_toml`] and [`SwitchDefinition::from_json`] parse and
//! [`SwitchDefinition::validate`] checks a document; every refusal names the entity and
//! the reason ([`DefinitionError`]).

use crate::frame::{MacAddr, VLAN_MAX};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fmt;

/// VLAN ID that asks for guest tagging (VGT): the port is a trunk of every VLAN.
pub const VLAN_GUEST_TAGGING: u16 = 4095;

/// The largest interface name Linux accepts (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// A switch as an administrator declares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchDefinition {
    /// The switch's name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// Uplink roles, in their default failover order.
    #[serde(default)]
    pub uplinks: Vec<UplinkSpec>,
    /// Per-host bindings of uplink roles to interfaces (distributed switches).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hosts: BTreeMap<String, HostBinding>,
    /// Port groups: the policy ports inherit.
    #[serde(default)]
    pub portgroups: Vec<PortGroupSpec>,
    /// Ports: VM ports, internal (VMkernel) ports and attached host interfaces.
    #[serde(default)]
    pub ports: Vec<PortSpec>,
}

/// An uplink role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkSpec {
    /// The role's name, referred to by teaming policies.
    pub name: String,
    /// The host interface bound to the role on hosts without their own binding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
}

/// One host's bindings of uplink roles to its interfaces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostBinding {
    /// Uplink role name to interface name.
    #[serde(default)]
    pub uplinks: BTreeMap<String, String>,
}

/// A port group: VLAN, security, shaping and teaming policy shared by its ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortGroupSpec {
    /// The port group's name.
    pub name: String,
    /// 0 = untagged (EST), 1-4094 = the switch tags (VST), 4095 = the guest tags (VGT).
    /// Ignored when `trunk` is given.
    #[serde(default)]
    pub vlan: u16,
    /// Makes the port group a trunk carrying these VLANs tagged (single IDs or
    /// `"first-last"` ranges).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trunk: Option<Vec<VlanRange>>,
    /// On a trunk: the VLAN whose frames travel untagged. Without it untagged frames are
    /// dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native_vlan: Option<u16>,
    /// Security policy.
    #[serde(default)]
    pub security: SecurityPolicy,
    /// Traffic shaping of what the ports send into the switch; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shaping: Option<ShapingPolicy>,
    /// Teaming and failover; all uplinks active, by originating port, when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teaming: Option<TeamingPolicy>,
}

/// A VLAN ID or an inclusive range of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VlanRange {
    /// First VLAN ID.
    pub first: u16,
    /// Last VLAN ID (inclusive).
    pub last: u16,
}

impl fmt::Display for VlanRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl Serialize for VlanRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.first == self.last {
            s.serialize_u16(self.first)
        } else {
            s.collect_str(self)
        }
    }
}

impl<'de> Deserialize<'de> for VlanRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = VlanRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a VLAN ID (1-4094) or a range like \"100-199\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<VlanRange, E> {
                let v =
                    u16::try_from(v).map_err(|_| E::custom(format!("VLAN {v} is out of range")))?;
                Ok(VlanRange { first: v, last: v })
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<VlanRange, E> {
                let v =
                    u64::try_from(v).map_err(|_| E::custom(format!("VLAN {v} is out of range")))?;
                self.visit_u64(v)
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<VlanRange, E> {
                let bad =
                    || E::custom(format!("invalid VLAN range {s:?}: expected \"first-last\""));
                let (a, b) = s.split_once('-').unwrap_or((s, s));
                let first = a.trim().parse().map_err(|_| bad())?;
                let last = b.trim().parse().map_err(|_| bad())?;
                Ok(VlanRange { first, last })
            }
        }
        d.deserialize_any(V)
    }
}

/// Accept or reject, as vSphere's security settings read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Allow.
    Accept,
    /// Refuse (the default for every security setting, as on a distributed switch).
    #[default]
    Reject,
}

/// The security policy of a port group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SecurityPolicy {
    /// Accept: the port receives every frame of its VLANs, not only its own.
    #[serde(default)]
    pub promiscuous: Verdict,
    /// Reject: when the guest changes its MAC address away from the one it was given, the
    /// switch stops delivering frames to the port.
    #[serde(default)]
    pub mac_changes: Verdict,
    /// Reject: frames whose source MAC is not the port's MAC are dropped.
    #[serde(default)]
    pub forged_transmits: Verdict,
}

/// Traffic shaping of the traffic a port sends into the switch (vSphere's outbound
/// shaping): a long-term average, a peak rate and the burst the port may send at the
/// peak rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapingPolicy {
    /// Average rate, bits per second.
    pub average_bps: u64,
    /// Peak rate, bits per second; the average when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_bps: Option<u64>,
    /// Bytes the port may send above the average, at up to the peak rate; 100 ms of the
    /// average rate (at least 64 KiB) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_bytes: Option<u64>,
}

impl ShapingPolicy {
    /// The peak rate in effect.
    pub fn peak(&self) -> u64 {
        self.peak_bps.unwrap_or(self.average_bps)
    }

    /// The burst size in effect.
    pub fn burst(&self) -> u64 {
        self.burst_bytes
            .unwrap_or((self.average_bps / 80).max(65_536))
    }
}

/// How a port group spreads its ports' traffic over the active uplinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LoadBalancing {
    /// Route based on the originating virtual port: each port is pinned to one uplink.
    #[default]
    PortId,
    /// Route based on a hash of the source MAC address.
    SrcMac,
    /// Route based on a hash of the IPv4 source and destination (needs a static
    /// link aggregation on the physical switch).
    IpHash,
    /// Use explicit failover order: always the first active uplink that is up.
    FailoverOrder,
}

/// Teaming and failover policy of a port group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamingPolicy {
    /// Load-balancing policy.
    #[serde(default)]
    pub policy: LoadBalancing,
    /// Active uplinks in failover order; every uplink not listed as standby when empty.
    #[serde(default)]
    pub active: Vec<String>,
    /// Standby uplinks in failover order: used only when an active uplink fails.
    #[serde(default)]
    pub standby: Vec<String>,
    /// Return to a recovered active uplink (true) or stay on the standby (false).
    #[serde(default = "yes")]
    pub failback: bool,
    /// Send RARP announcements for the ports' MAC addresses when they move to another
    /// uplink, so physical switches learn the new path at once.
    #[serde(default = "yes")]
    pub notify_switches: bool,
}

fn yes() -> bool {
    true
}

impl Default for TeamingPolicy {
    fn default() -> Self {
        TeamingPolicy {
            policy: LoadBalancing::PortId,
            active: Vec::new(),
            standby: Vec::new(),
            failback: true,
            notify_switches: true,
        }
    }
}

/// What a port is backed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PortKind {
    /// A VM port: the switch creates a TAP device named after the port and holds its
    /// file descriptor; the device is the VM's NIC (move it into a namespace, or hand it
    /// to a guest).
    #[default]
    Tap,
    /// An internal port for the host's own stack (the VMkernel-port role: iSCSI, NFS,
    /// management). A TAP device that stays in the host and is brought up.
    Internal,
    /// An existing host interface attached through AF_PACKET (for example a VMM's own
    /// TAP device, or a veth leading to a container), treated as a VM port.
    Netdev,
}

/// A port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// The port's name; also the device name of `tap` and `internal` ports.
    pub name: String,
    /// The port group whose policy applies.
    pub portgroup: String,
    /// What backs the port.
    #[serde(default)]
    pub kind: PortKind,
    /// The MAC address assigned to the port (set on the device it creates). When absent
    /// the device's own address is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// For `netdev` ports: the interface to attach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The host this port lives on; every host applying the definition when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// Why a definition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DefinitionError {
    /// The document is not valid TOML or JSON of this shape.
    #[error("switch definition: {0}")]
    Syntax(String),
    /// A name is empty, too long or has characters other than letters, digits, `-`, `_`, `.`.
    #[error("{what} name {name:?} is invalid: use 1-{max} letters, digits, '-', '_' or '.'")]
    BadName {
        /// Which kind of entity.
        what: &'static str,
        /// The name.
        name: String,
        /// The longest allowed.
        max: usize,
    },
    /// Two entities of one kind share a name.
    #[error("duplicate {what} {name:?}")]
    Duplicate {
        /// Which kind of entity.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// A reference to something that is not defined.
    #[error("{from}: unknown {what} {name:?}")]
    Unknown {
        /// Where the reference is.
        from: String,
        /// What kind of thing it names.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// A VLAN ID out of range.
    #[error("port group {portgroup:?}: VLAN {vlan} is out of range ({range})")]
    VlanRange {
        /// The port group.
        portgroup: String,
        /// The offending VLAN ID.
        vlan: u16,
        /// The allowed range.
        range: &'static str,
    },
    /// A policy that is inconsistent.
    #[error("port group {portgroup:?}: {reason}")]
    Policy {
        /// The port group.
        portgroup: String,
        /// What is wrong.
        reason: String,
    },
    /// A port that is inconsistent.
    #[error("port {port:?}: {reason}")]
    Port {
        /// The port.
        port: String,
        /// What is wrong.
        reason: String,
    },
    /// An interface is used twice on one host.
    #[error("host {host:?}: interface {interface:?} is used by both {a:?} and {b:?}")]
    InterfaceTwice {
        /// The host ("*" for the default bindings).
        host: String,
        /// The interface.
        interface: String,
        /// First user.
        a: String,
        /// Second user.
        b: String,
    },
}

fn check_name(what: &'static str, name: &str, max: usize) -> Result<(), DefinitionError> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(DefinitionError::BadName {
            what,
            name: name.to_string(),
            max,
        })
    }
}

impl SwitchDefinition {
    /// An empty switch with this name.
    pub fn new(name: &str) -> SwitchDefinition {
        SwitchDefinition {
            name: name.to_string(),
            uplinks: Vec::new(),
            hosts: BTreeMap::new(),
            portgroups: Vec::new(),
            ports: Vec::new(),
        }
    }

    /// Parses and validates a TOML document.
    pub fn from_toml(text: &str) -> Result<SwitchDefinition, DefinitionError> {
        let def: SwitchDefinition =
            toml::from_str(text).map_err(|e| DefinitionError::Syntax(e.to_string()))?;
        def.validate()?;
        Ok(def)
    }

    /// Parses and validates a JSON document.
    pub fn from_json(text: &str) -> Result<SwitchDefinition, DefinitionError> {
        let def: SwitchDefinition =
            serde_json::from_str(text).map_err(|e| DefinitionError::Syntax(e.to_string()))?;
        def.validate()?;
        Ok(def)
    }

    /// The definition as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// The port group with this name.
    pub fn portgroup(&self, name: &str) -> Option<&PortGroupSpec> {
        self.portgroups.iter().find(|p| p.name == name)
    }

    /// The interface bound to uplink role `role` on `host`, if any.
    pub fn uplink_interface(&self, role: &str, host: &str) -> Option<&str> {
        if let Some(b) = self.hosts.get(host) {
            if let Some(i) = b.uplinks.get(role) {
                return Some(i);
            }
        }
        self.uplinks
            .iter()
            .find(|u| u.name == role)
            .and_then(|u| u.interface.as_deref())
    }

    /// The ports that exist on `host`.
    pub fn ports_on<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a PortSpec> + 'a {
        self.ports
            .iter()
            .filter(move |p| p.host.as_deref().is_none_or(|h| h == host))
    }

    /// Checks the whole definition; the first problem found is returned.
    pub fn validate(&self) -> Result<(), DefinitionError> {
        check_name("switch", &self.name, 64)?;
        let mut roles = HashSet::new();
        for u in &self.uplinks {
            check_name("uplink", &u.name, 64)?;
            if !roles.insert(u.name.as_str()) {
                return Err(DefinitionError::Duplicate {
                    what: "uplink",
                    name: u.name.clone(),
                });
            }
            if let Some(i) = &u.interface {
                check_name("interface", i, IFNAME_MAX)?;
            }
        }
        for (host, b) in &self.hosts {
            check_name("host", host, 253)?;
            for (role, ifname) in &b.uplinks {
                if !roles.contains(role.as_str()) {
                    return Err(DefinitionError::Unknown {
                        from: format!("host {host:?}"),
                        what: "uplink",
                        name: role.clone(),
                    });
                }
                check_name("interface", ifname, IFNAME_MAX)?;
            }
        }
        let mut groups = HashSet::new();
        for pg in &self.portgroups {
            check_name("port group", &pg.name, 64)?;
            if !groups.insert(pg.name.as_str()) {
                return Err(DefinitionError::Duplicate {
                    what: "port group",
                    name: pg.name.clone(),
                });
            }
            pg.validate(&roles)?;
        }
        let mut ports = HashSet::new();
        let mut macs: BTreeMap<(Option<&str>, MacAddr), &str> = BTreeMap::new();
        for p in &self.ports {
            check_name("port", &p.name, IFNAME_MAX)?;
            if !ports.insert(p.name.as_str()) || roles.contains(p.name.as_str()) {
                return Err(DefinitionError::Duplicate {
                    what: "port or uplink",
                    name: p.name.clone(),
                });
            }
            if !groups.contains(p.portgroup.as_str()) {
                return Err(DefinitionError::Unknown {
                    from: format!("port {:?}", p.name),
                    what: "port group",
                    name: p.portgroup.clone(),
                });
            }
            let bad = |reason: &str| DefinitionError::Port {
                port: p.name.clone(),
                reason: reason.to_string(),
            };
            match (p.kind, &p.interface) {
                (PortKind::Netdev, None) => {
                    return Err(bad("a netdev port needs an interface"));
                }
                (PortKind::Netdev, Some(i)) => check_name("interface", i, IFNAME_MAX)?,
                (_, Some(_)) => {
                    return Err(bad("only netdev ports take an interface; tap and internal ports create a device named after the port"));
                }
                (_, None) => {}
            }
            if let Some(m) = p.mac {
                if !m.is_unicast() {
                    return Err(bad("the MAC address must be unicast and non-zero"));
                }
                for (key_host, other) in &macs {
                    let same_host =
                        key_host.0.is_none() || p.host.is_none() || key_host.0 == p.host.as_deref();
                    if same_host && key_host.1 == m {
                        return Err(bad(&format!(
                            "MAC address {m} is also used by port {other:?}"
                        )));
                    }
                }
                macs.insert((p.host.as_deref(), m), &p.name);
            }
        }
        // An interface may serve one role or port per host.
        let mut hosts: Vec<&str> = vec!["*"];
        hosts.extend(self.hosts.keys().map(String::as_str));
        hosts.extend(self.ports.iter().filter_map(|p| p.host.as_deref()));
        for host in hosts {
            let mut used: BTreeMap<String, String> = BTreeMap::new();
            let mut claim = |ifname: &str, user: String| -> Result<(), DefinitionError> {
                if let Some(prev) = used.get(ifname) {
                    return Err(DefinitionError::InterfaceTwice {
                        host: host.to_string(),
                        interface: ifname.to_string(),
                        a: prev.clone(),
                        b: user,
                    });
                }
                used.insert(ifname.to_string(), user);
                Ok(())
            };
            for u in &self.uplinks {
                if let Some(i) = self.uplink_interface(&u.name, host) {
                    claim(i, format!("uplink {}", u.name))?;
                }
            }
            for p in self.ports_on(host) {
                let dev = p.interface.as_deref().unwrap_or(&p.name);
                claim(dev, format!("port {}", p.name))?;
            }
        }
        Ok(())
    }
}

impl PortGroupSpec {
    /// A port group with default policy on `vlan`.
    pub fn new(name: &str, vlan: u16) -> PortGroupSpec {
        PortGroupSpec {
            name: name.to_string(),
            vlan,
            trunk: None,
            native_vlan: None,
            security: SecurityPolicy::default(),
            shaping: None,
            teaming: None,
        }
    }

    fn validate(&self, roles: &HashSet<&str>) -> Result<(), DefinitionError> {
        let pg = || self.name.clone();
        let policy = |reason: String| DefinitionError::Policy {
            portgroup: self.name.clone(),
            reason,
        };
        if self.vlan > VLAN_GUEST_TAGGING {
            return Err(DefinitionError::VlanRange {
                portgroup: pg(),
                vlan: self.vlan,
                range: "0-4095",
            });
        }
        match &self.trunk {
            Some(list) => {
                if self.vlan != 0 {
                    return Err(policy("give either vlan or trunk, not both".to_string()));
                }
                if list.is_empty() {
                    return Err(policy("the trunk's VLAN list is empty".to_string()));
                }
                for r in list {
                    for v in [r.first, r.last] {
                        if !(1..=VLAN_MAX).contains(&v) {
                            return Err(DefinitionError::VlanRange {
                                portgroup: pg(),
                                vlan: v,
                                range: "1-4094 in a trunk",
                            });
                        }
                    }
                    if r.first > r.last {
                        return Err(policy(format!("VLAN range {r} is reversed")));
                    }
                }
            }
            None => {
                if self.native_vlan.is_some() && self.vlan != VLAN_GUEST_TAGGING {
                    return Err(policy(
                        "native_vlan needs a trunk (trunk = [...] or vlan = 4095)".to_string(),
                    ));
                }
            }
        }
        if let Some(n) = self.native_vlan {
            if n > VLAN_MAX {
                return Err(DefinitionError::VlanRange {
                    portgroup: pg(),
                    vlan: n,
                    range: "0-4094 for a native VLAN",
                });
            }
        }
        if let Some(s) = &self.shaping {
            if s.average_bps < 8_000 {
                return Err(policy(
                    "shaping average_bps must be at least 8000".to_string(),
                ));
            }
            if s.peak() < s.average_bps {
                return Err(policy(format!(
                    "shaping peak_bps {} is below average_bps {}",
                    s.peak(),
                    s.average_bps
                )));
            }
            if s.burst() < 1514 {
                return Err(policy(
                    "shaping burst_bytes must hold at least one frame (1514)".to_string(),
                ));
            }
        }
        if let Some(t) = &self.teaming {
            let mut seen = HashSet::new();
            for u in t.active.iter().chain(&t.standby) {
                if !roles.contains(u.as_str()) {
                    return Err(DefinitionError::Unknown {
                        from: format!("port group {:?} teaming", self.name),
                        what: "uplink",
                        name: u.clone(),
                    });
                }
                if !seen.insert(u.as_str()) {
                    return Err(policy(format!(
                        "uplink {u:?} is listed twice in the failover order"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The teaming policy in effect, with the active list filled in.
    pub fn effective_teaming(&self, uplinks: &[UplinkSpec]) -> TeamingPolicy {
        let mut t = self.teaming.clone().unwrap_or_default();
        if t.active.is_empty() {
            t.active = uplinks
                .iter()
                .map(|u| u.name.clone())
                .filter(|n| !t.standby.contains(n))
                .collect();
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"
name = "dvs0"
[[uplinks]]
name = "uplink1"
interface = "eth1"
[[uplinks]]
name = "uplink2"
interface = "eth2"
[hosts.esx2.uplinks]
uplink1 = "ens4"
[[portgroups]]
name = "vm-10"
vlan = 10
security = { forged_transmits = "accept" }
shaping = { average_bps = 100_000_000 }
teaming = { policy = "failover-order", active = ["uplink1"], standby = ["uplink2"], failback = false }
[[portgroups]]
name = "trunk"
trunk = [10, "20-29"]
native_vlan = 1
[[ports]]
name = "vm1"
portgroup = "vm-10"
mac = "52:54:00:00:00:01"
host = "esx1"
[[ports]]
name = "vmk0"
portgroup = "trunk"
kind = "internal"
"#;

    #[test]
    fn parses_and_round_trips() {
        let d = SwitchDefinition::from_toml(DOC).unwrap();
        assert_eq!(d.portgroups[0].security.forged_transmits, Verdict::Accept);
        assert_eq!(d.portgroups[0].security.mac_changes, Verdict::Reject);
        let t = d.portgroups[0].teaming.as_ref().unwrap();
        assert!(!t.failback && t.notify_switches);
        assert_eq!(
            d.portgroups[1].trunk.as_ref().unwrap()[1],
            VlanRange {
                first: 20,
                last: 29
            }
        );
        assert_eq!(d.uplink_interface("uplink1", "esx2"), Some("ens4"));
        assert_eq!(d.uplink_interface("uplink2", "esx2"), Some("eth2"));
        assert_eq!(d.uplink_interface("uplink1", "esx1"), Some("eth1"));
        assert_eq!(d.ports_on("esx2").count(), 1);
        assert_eq!(d.ports_on("esx1").count(), 2);
        let again = SwitchDefinition::from_toml(&d.to_toml()).unwrap();
        assert_eq!(again, d);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(SwitchDefinition::from_json(&json).unwrap(), d);
    }

    fn refuse(doc: &str) -> String {
        SwitchDefinition::from_toml(doc).unwrap_err().to_string()
    }

    #[test]
    fn refusals_name_the_problem() {
        let e = refuse(&DOC.replace("vlan = 10", "vlan = 5000"));
        assert!(e.contains("VLAN 5000 is out of range"), "{e}");
        let e = refuse(&DOC.replace("portgroup = \"vm-10\"", "portgroup = \"nope\""));
        assert!(e.contains("unknown port group \"nope\""), "{e}");
        let e = refuse(&DOC.replace("standby = [\"uplink2\"]", "standby = [\"uplink9\"]"));
        assert!(e.contains("unknown uplink \"uplink9\""), "{e}");
        let e = refuse(&DOC.replace("\"20-29\"", "\"29-20\""));
        assert!(e.contains("reversed"), "{e}");
        let e = refuse(&DOC.replace("\"20-29\"", "\"20-x\""));
        assert!(e.contains("invalid VLAN range"), "{e}");
        let e = refuse(&DOC.replace("name = \"vmk0\"", "name = \"vm1\""));
        assert!(e.contains("duplicate port or uplink \"vm1\""), "{e}");
        let e = refuse(&DOC.replace("interface = \"eth2\"", "interface = \"eth1\""));
        assert!(e.contains("interface \"eth1\" is used by both"), "{e}");
        let e = refuse(&DOC.replace("name = \"vmk0\"", "name = \"averyveryverylongname\""));
        assert!(e.contains("is invalid"), "{e}");
        let e = refuse(&DOC.replace(
            "average_bps = 100_000_000",
            "average_bps = 100_000_000, peak_bps = 10",
        ));
        assert!(e.contains("below average"), "{e}");
        let e = refuse(&DOC.replace("mac = \"52:54:00:00:00:01\"", "mac = \"01:00:5e:00:00:01\""));
        assert!(e.contains("unicast"), "{e}");
        let e = refuse(&DOC.replace("vlan = 10", "vlan = 10\nbogus = 1"));
        assert!(e.contains("unknown field"), "{e}");
        let e = refuse(&DOC.replace("kind = \"internal\"", "kind = \"netdev\""));
        assert!(e.contains("needs an interface"), "{e}");
    }

    #[test]
    fn default_teaming_uses_every_uplink() {
        let d = SwitchDefinition::from_toml(DOC).unwrap();
        let t = d.portgroups[1].effective_teaming(&d.uplinks);
        assert_eq!(t.active, vec!["uplink1", "uplink2"]);
        assert_eq!(t.policy, LoadBalancing::PortId);
    }
}
