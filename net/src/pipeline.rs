//! The switching core, sans I/O: given a frame and the port it entered through, decide
//! where it goes and how it is tagged there. No sockets, no clock (time comes in as
//! nanoseconds), no allocation per frame; the datapath threads drive it and it is fuzzed
//! directly (`fuzz/fuzz_targets/net_forward.rs`).
//!
//! Rules, after vSphere's switches:
//! - Local ports (VM and internal) are known by their MAC address; frames between them
//!   never leave the host. The switch does not learn from local ports.
//! - A frame for a MAC the switch does not know locally goes out of the *one* uplink its
//!   port's team picks. Broadcast and multicast go to every local port of the VLAN and
//!   out of that one uplink.
//! - The switch learns source MACs on uplinks only (for status and aging), never
//!   forwards from an uplink to an uplink, and drops frames that come back from the
//!   physical network with a local MAC as source. With those rules two uplinks on one
//!   physical LAN make no loop, so there is no spanning tree.
//! - A local port takes frames from the physical network only through the uplink it is
//!   pinned to, so the flood copies a physical switch sends to every uplink arrive once.
//! - Flooding stays within the VLAN; promiscuous ports get a copy of everything in
//!   their VLANs.
//!
//! Call order: [`Pipeline::set_config`] whenever the definition changes,
//! [`Pipeline::set_link`] on every uplink state change (and once per new uplink),
//! [`Pipeline::process`] per frame, then drain [`Pipeline::poll_announce`] (RARP
//! announcements to send) and [`Pipeline::poll_mac_check`] (ports whose device MAC must be
//! read and given to [`Pipeline::device_mac`]); [`Pipeline::tick`] about once a second.

use crate::counters::{DropReason, PortCounters};
use crate::definition::{SecurityPolicy, ShapingPolicy, Verdict};
use crate::frame::{self, MacAddr};
use crate::shaper::Shaper;
use crate::teaming::{Team, TeamConfig};
use crate::vlan::{Egress, VlanMode};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// A port's number in the switch (an index into the port table).
pub type PortId = u16;

/// The most ports one switch has.
pub const MAX_PORTS: usize = 4096;

/// How long a MAC learned on an uplink stays, in nanoseconds.
pub const MAC_AGE_NS: u64 = 300 * 1_000_000_000;

/// How many MACs the uplinks' learning table holds.
pub const LEARNED_CAPACITY: usize = 16_384;

const MAC_CHECK_INTERVAL_NS: u64 = 50_000_000;

/// Trunks of at most this many VLANs are indexed per VLAN; wider ones are checked per
/// flood.
const NARROW_TRUNK: usize = 64;

/// What a port is, for forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortRole {
    /// A VM port (TAP or attached interface).
    Vm,
    /// An internal port for the host's own stack.
    Internal,
    /// An uplink to the physical network.
    Uplink,
}

/// One port's configuration as the core sees it.
#[derive(Debug, Clone)]
pub struct PortConfig {
    /// Name (for status).
    pub name: String,
    /// Role.
    pub role: PortRole,
    /// VLAN mode.
    pub vlan: VlanMode,
    /// Security policy (local ports).
    pub security: SecurityPolicy,
    /// Shaping of what the port sends (local ports).
    pub shaping: Option<ShapingPolicy>,
    /// Index of the port's team in [`Config::teams`] (local ports).
    pub team: Option<usize>,
    /// The MAC address assigned to a local port (zero for uplinks).
    pub mac: MacAddr,
    /// Where the port's counters go.
    pub counters: Arc<PortCounters>,
}

/// The whole forwarding configuration: ports by number, and teams.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Ports indexed by [`PortId`]; None for free numbers.
    pub ports: Vec<Option<PortConfig>>,
    /// Teams, one per port group.
    pub teams: Vec<TeamConfig>,
}

/// One place a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Output {
    /// The port.
    pub port: PortId,
    /// How it is tagged there.
    pub egress: Egress,
}

/// A forwarding decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward<'a> {
    /// The frame's VLAN.
    pub vlan: u16,
    /// Whether the frame as given carries its VLAN tag inline (after the source MAC);
    /// false when it was untagged or its tag came as metadata.
    pub inline_tag: bool,
    /// Where it goes (never empty, never the input port).
    pub outputs: &'a [Output],
}

/// A RARP announcement to send: "`mac` is now behind `uplink`, in VLAN `vid`".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announce {
    /// The uplink to send it on.
    pub uplink: PortId,
    /// The MAC address to announce (the frame's source).
    pub mac: MacAddr,
    /// The VLAN (0 = untagged).
    pub vid: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pin {
    /// No uplink usable.
    Nothing,
    /// Pinned to an uplink.
    Uplink(PortId),
    /// Chosen per frame (IP hash); frames from any uplink are accepted.
    PerFrame,
}

#[derive(Debug, Clone)]
struct PortState {
    cfg: PortConfig,
    link_up: bool,
    effective_mac: MacAddr,
    blocked: bool,
    pin: Pin,
    shaper: Option<Shaper>,
    last_mac_check: Option<u64>,
    check_queued: bool,
}

#[derive(Debug, Clone, Copy)]
struct Learned {
    port: PortId,
    seen: u64,
}

/// The switching core of one switch.
#[derive(Clone)]
pub struct Pipeline {
    ports: Vec<Option<PortState>>,
    teams: Vec<Team>,
    /// Local ports that are members of each VLAN, for ports of at most
    /// `NARROW_TRUNK` VLANs.
    members: Vec<Vec<PortId>>,
    /// Local ports that are members of more VLANs (VGT, wide trunks); floods check
    /// their membership one by one.
    wide: Vec<PortId>,
    /// Promiscuous local ports.
    promisc: Vec<PortId>,
    local_macs: HashMap<MacAddr, PortId>,
    learned: HashMap<(u16, MacAddr), Learned>,
    out: Vec<Output>,
    announce: VecDeque<Announce>,
    mac_checks: VecDeque<PortId>,
}

impl Default for Pipeline {
    fn default() -> Self {
        Pipeline::new()
    }
}

/// The state of a port as the core sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortView {
    /// Port number.
    pub id: PortId,
    /// Name.
    pub name: String,
    /// Role.
    pub role: PortRole,
    /// Uplinks: whether the link is up.
    pub link_up: bool,
    /// Local ports: the MAC address in use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Local ports: the uplink their traffic uses ("per-frame" under IP hash, none when
    /// no uplink is up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
    /// Local ports: inbound frames are blocked because the guest changed its MAC.
    pub blocked: bool,
}

/// A MAC address learned on an uplink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnedMac {
    /// VLAN.
    pub vlan: u16,
    /// Address.
    pub mac: String,
    /// The uplink's name.
    pub uplink: String,
    /// Seconds since last seen.
    pub age_secs: u64,
}

impl Pipeline {
    /// An empty switch.
    pub fn new() -> Pipeline {
        Pipeline {
            ports: Vec::new(),
            teams: Vec::new(),
            members: vec![Vec::new(); 4096],
            wide: Vec::new(),
            promisc: Vec::new(),
            local_macs: HashMap::new(),
            learned: HashMap::with_capacity(LEARNED_CAPACITY),
            out: Vec::with_capacity(MAX_PORTS),
            announce: VecDeque::with_capacity(1024),
            mac_checks: VecDeque::with_capacity(64),
        }
    }

    /// Installs a new configuration. Ports that keep their number, name and role keep
    /// their run-time state (link state, MAC in use, shaper buckets); new local ports are
    /// announced on their uplink.
    pub fn set_config(&mut self, cfg: Config, now: u64) {
        let mut old: Vec<Option<PortState>> = std::mem::take(&mut self.ports);
        let mut fresh = Vec::new();
        for (i, pc) in cfg.ports.into_iter().enumerate().take(MAX_PORTS) {
            let Some(pc) = pc else {
                self.ports.push(None);
                continue;
            };
            let prev = old
                .get_mut(i)
                .and_then(Option::take)
                .filter(|p| p.cfg.name == pc.cfg_name() && p.cfg.role == pc.role);
            let st = match prev {
                Some(mut p) => {
                    if p.cfg.mac != pc.mac {
                        p.effective_mac = pc.mac;
                        p.blocked = false;
                    }
                    p.shaper = match (&pc.shaping, p.shaper.take()) {
                        (Some(s), Some(old)) if old.same_policy(s) => Some(old),
                        (Some(s), _) => Some(Shaper::new(s, now)),
                        (None, _) => None,
                    };
                    p.cfg = pc;
                    p
                }
                None => {
                    if pc.role != PortRole::Uplink {
                        fresh.push(i as PortId);
                    }
                    PortState {
                        link_up: false,
                        effective_mac: pc.mac,
                        blocked: false,
                        pin: Pin::Nothing,
                        shaper: pc.shaping.as_ref().map(|s| Shaper::new(s, now)),
                        last_mac_check: None,
                        check_queued: false,
                        cfg: pc,
                    }
                }
            };
            self.ports.push(Some(st));
        }
        let old_teams = std::mem::take(&mut self.teams);
        for (i, tc) in cfg.teams.into_iter().enumerate() {
            let up = |u: PortId| self.uplink_up(u);
            let team = match old_teams.get(i) {
                Some(t) if t.config == tc => {
                    let mut t = t.clone();
                    t.update(up);
                    t
                }
                _ => Team::new(tc, up),
            };
            self.teams.push(team);
        }
        self.rebuild_indexes();
        self.repin(now);
        for id in fresh {
            self.announce_port(id);
        }
        self.learned
            .retain(|_, l| matches!(self.ports.get(usize::from(l.port)), Some(Some(p)) if p.cfg.role == PortRole::Uplink));
    }

    fn uplink_up(&self, u: PortId) -> bool {
        matches!(self.ports.get(usize::from(u)), Some(Some(p)) if p.cfg.role == PortRole::Uplink && p.link_up)
    }

    fn rebuild_indexes(&mut self) {
        for m in self.members.iter_mut() {
            m.clear();
        }
        self.wide.clear();
        self.promisc.clear();
        self.local_macs.clear();
        for (i, p) in self.ports.iter().enumerate() {
            let Some(p) = p else { continue };
            if p.cfg.role == PortRole::Uplink {
                continue;
            }
            let id = i as PortId;
            match &p.cfg.vlan {
                VlanMode::Access(v) => self.members[usize::from(*v & 0x0fff)].push(id),
                VlanMode::Trunk { allowed, native } if allowed.len() <= NARROW_TRUNK => {
                    for v in allowed.iter().chain(*native) {
                        if !self.members[usize::from(v)].contains(&id) {
                            self.members[usize::from(v)].push(id);
                        }
                    }
                }
                _ => self.wide.push(id),
            }
            if p.cfg.security.promiscuous == Verdict::Accept {
                self.promisc.push(id);
            }
            if p.effective_mac.is_unicast() {
                self.local_macs.insert(p.effective_mac, id);
            }
        }
    }

    /// Recomputes every local port's uplink; announces the ports that moved.
    fn repin(&mut self, _now: u64) {
        for i in 0..self.ports.len() {
            let Some(p) = &self.ports[i] else { continue };
            if p.cfg.role == PortRole::Uplink {
                continue;
            }
            let pin = match p.cfg.team.and_then(|t| self.teams.get(t)) {
                None => Pin::Nothing,
                Some(team) => match team.pin(i as PortId, p.effective_mac) {
                    None => Pin::Nothing,
                    Some(None) => Pin::PerFrame,
                    Some(Some(u)) => Pin::Uplink(u),
                },
            };
            let moved = pin != p.pin;
            if let Some(Some(p)) = self.ports.get_mut(i) {
                p.pin = pin;
            }
            if moved {
                self.announce_port(i as PortId);
            }
        }
    }

    fn announce_port(&mut self, id: PortId) {
        let Some(Some(p)) = self.ports.get(usize::from(id)) else {
            return;
        };
        let Pin::Uplink(u) = p.pin else { return };
        let notify = p
            .cfg
            .team
            .and_then(|t| self.teams.get(t))
            .is_some_and(|t| t.config.notify_switches);
        let Some(vid) = p.cfg.vlan.untagged_vlan() else {
            return;
        };
        if notify && p.effective_mac.is_unicast() && self.announce.len() < 4096 {
            self.announce.push_back(Announce {
                uplink: u,
                mac: p.effective_mac,
                vid,
            });
        }
    }

    /// Records an uplink's link state. Returns whether anything changed; moved ports are
    /// queued for announcement.
    pub fn set_link(&mut self, uplink: PortId, up: bool, now: u64) -> bool {
        let Some(Some(p)) = self.ports.get_mut(usize::from(uplink)) else {
            return false;
        };
        if p.cfg.role != PortRole::Uplink || p.link_up == up {
            return false;
        }
        p.link_up = up;
        let states: Vec<bool> = self
            .ports
            .iter()
            .map(|p| matches!(p, Some(p) if p.cfg.role == PortRole::Uplink && p.link_up))
            .collect();
        for t in &mut self.teams {
            t.update(|u| states.get(usize::from(u)).copied().unwrap_or(false));
        }
        if !up {
            self.learned.retain(|_, l| l.port != uplink);
        }
        self.repin(now);
        true
    }

    /// The next announcement to send, if any.
    pub fn poll_announce(&mut self) -> Option<Announce> {
        self.announce.pop_front()
    }

    /// The next port whose device MAC address the driver should read (because it sent
    /// from another address) and report through [`Pipeline::device_mac`].
    pub fn poll_mac_check(&mut self) -> Option<PortId> {
        let id = self.mac_checks.pop_front()?;
        if let Some(Some(p)) = self.ports.get_mut(usize::from(id)) {
            p.check_queued = false;
        }
        Some(id)
    }

    /// Reports the MAC address a local port's device has now. A change away from the
    /// assigned address is a guest MAC change: accepted, the port uses the new address;
    /// rejected, frames to the port are dropped until the guest changes back.
    pub fn device_mac(&mut self, port: PortId, mac: MacAddr, now: u64) {
        let Some(Some(p)) = self.ports.get_mut(usize::from(port)) else {
            return;
        };
        if p.cfg.role == PortRole::Uplink || !mac.is_unicast() {
            return;
        }
        let before = (p.effective_mac, p.blocked);
        if mac == p.cfg.mac {
            p.effective_mac = mac;
            p.blocked = false;
        } else if p.cfg.security.mac_changes == Verdict::Reject {
            p.effective_mac = p.cfg.mac;
            p.blocked = true;
        } else {
            p.effective_mac = mac;
            p.blocked = false;
        }
        if before != (p.effective_mac, p.blocked) {
            let mac_changed = before.0 != p.effective_mac;
            tracing::info!(port = %p.cfg.name, %mac, blocked = p.blocked, "guest MAC address change");
            self.rebuild_indexes();
            self.repin(now);
            if mac_changed {
                self.announce_port(port);
            }
        }
    }

    /// When a shaped port may be read again (None: now). Ports without shaping are
    /// always ready.
    pub fn ready_at(&mut self, port: PortId, now: u64) -> Option<u64> {
        match self.ports.get_mut(usize::from(port)) {
            Some(Some(PortState {
                shaper: Some(s), ..
            })) => s.ready_at(now),
            _ => None,
        }
    }

    /// Whether the port has a shaper.
    pub fn is_shaped(&self, port: PortId) -> bool {
        matches!(
            self.ports.get(usize::from(port)),
            Some(Some(PortState {
                shaper: Some(_),
                ..
            }))
        )
    }

    /// The port's counters.
    pub fn counters(&self, port: PortId) -> Option<&Arc<PortCounters>> {
        self.ports
            .get(usize::from(port))
            .and_then(|p| p.as_ref())
            .map(|p| &p.cfg.counters)
    }

    /// Ages out learned MACs. Call about once a second.
    pub fn tick(&mut self, now: u64) {
        self.learned
            .retain(|_, l| now.saturating_sub(l.seen) < MAC_AGE_NS);
    }

    /// The outputs of the last successful [`Pipeline::process`] call.
    pub fn last_outputs(&self) -> &[Output] {
        &self.out
    }

    /// Decides where a frame goes. `frame` starts at the Ethernet header; `meta_tci` is a
    /// VLAN tag that came beside the frame (AF_PACKET strips received tags into
    /// metadata), `wire_len` the bytes the frame takes on the wire (for shaping).
    ///
    /// Drops are counted on the ports' counters before the reason is returned.
    pub fn process(
        &mut self,
        in_port: PortId,
        frame: &[u8],
        meta_tci: Option<u16>,
        wire_len: u64,
        now: u64,
    ) -> Result<Forward<'_>, DropReason> {
        let r = self.decide(in_port, frame, meta_tci, wire_len, now);
        match r {
            Ok((vlan, inline_tag)) => Ok(Forward {
                vlan,
                inline_tag,
                outputs: &self.out,
            }),
            Err(why) => {
                if let Some(c) = self.counters(in_port) {
                    c.dropped(why);
                }
                Err(why)
            }
        }
    }

    fn decide(
        &mut self,
        in_port: PortId,
        frame: &[u8],
        meta_tci: Option<u16>,
        wire_len: u64,
        now: u64,
    ) -> Result<(u16, bool), DropReason> {
        self.out.clear();
        let hdr = frame::parse(frame).map_err(|_| DropReason::Malformed)?;
        let (tci, inline_tag) = match meta_tci {
            Some(t) => (Some(t), false),
            None => (hdr.tci, hdr.tci.is_some()),
        };
        let Some(Some(inp)) = self.ports.get_mut(usize::from(in_port)) else {
            return Err(DropReason::NoDestination);
        };
        let vlan = inp.cfg.vlan.ingress(tci).ok_or(DropReason::Vlan)?;
        let pcp = tci.map_or(0, |t| (t >> 13) as u8);
        if inp.cfg.role == PortRole::Uplink {
            if self.local_macs.contains_key(&hdr.src) {
                return Err(DropReason::Loop);
            }
            if hdr.src.is_unicast() {
                let key = (vlan, hdr.src);
                if let Some(l) = self.learned.get_mut(&key) {
                    l.port = in_port;
                    l.seen = now;
                } else if self.learned.len() < LEARNED_CAPACITY {
                    self.learned.insert(
                        key,
                        Learned {
                            port: in_port,
                            seen: now,
                        },
                    );
                }
            }
            let mut why = DropReason::NoDestination;
            if !hdr.dst.is_multicast() {
                if let Some(&q) = self.local_macs.get(&hdr.dst) {
                    if self.takes_from(q, in_port) {
                        self.push_local(q, vlan, pcp);
                    } else {
                        why = DropReason::WrongUplink;
                    }
                }
            } else {
                let n = self.members[usize::from(vlan)].len();
                for k in 0..n + self.wide.len() {
                    let q = if k < n {
                        self.members[usize::from(vlan)][k]
                    } else {
                        self.wide[k - n]
                    };
                    if self.takes_from(q, in_port) {
                        self.push_local(q, vlan, pcp);
                    }
                }
            }
            for k in 0..self.promisc.len() {
                let q = self.promisc[k];
                if self.takes_from(q, in_port) && !self.out.iter().any(|o| o.port == q) {
                    self.push_local(q, vlan, pcp);
                }
            }
            if self.out.is_empty() {
                return Err(why);
            }
            return Ok((vlan, inline_tag));
        }

        // From a local port.
        let mut adopted = false;
        if inp.effective_mac.is_zero() && hdr.src.is_unicast() {
            // A port given no MAC (an attached interface) takes the first one it uses.
            inp.effective_mac = hdr.src;
            inp.cfg.mac = hdr.src;
            self.local_macs.insert(hdr.src, in_port);
            adopted = true;
        }
        if let Some(s) = &mut inp.shaper {
            s.charge(wire_len, now);
        }
        if hdr.src != inp.effective_mac || inp.blocked {
            // A source that is not the port's MAC may be a guest MAC change (or, on a
            // blocked port, a change back): have the driver read the device's MAC.
            let due = inp
                .last_mac_check
                .is_none_or(|t| now.saturating_sub(t) >= MAC_CHECK_INTERVAL_NS);
            if hdr.src.is_unicast() && due && !inp.check_queued && self.mac_checks.len() < 64 {
                inp.last_mac_check = Some(now);
                inp.check_queued = true;
                self.mac_checks.push_back(in_port);
            }
            if hdr.src != inp.effective_mac && inp.cfg.security.forged_transmits == Verdict::Reject
            {
                return Err(DropReason::ForgedTransmit);
            }
        }
        let pin = inp.pin;
        let team = inp.cfg.team;
        if adopted {
            self.repin(now);
        }
        let mut to_uplink = true;
        if !hdr.dst.is_multicast() {
            if let Some(&q) = self.local_macs.get(&hdr.dst) {
                if self.is_member(q, vlan) {
                    to_uplink = false;
                    if q != in_port {
                        self.push_local(q, vlan, pcp);
                    }
                }
            }
        } else {
            let n = self.members[usize::from(vlan)].len();
            for k in 0..n + self.wide.len() {
                let q = if k < n {
                    self.members[usize::from(vlan)][k]
                } else {
                    self.wide[k - n]
                };
                if q != in_port {
                    self.push_local(q, vlan, pcp);
                }
            }
        }
        let mut why = DropReason::NoDestination;
        if to_uplink {
            let uplink = match pin {
                Pin::Uplink(u) => Some(u),
                Pin::Nothing => None,
                Pin::PerFrame => team
                    .and_then(|t| self.teams.get(t))
                    .and_then(|t| t.by_ip(frame::ipv4_pair(frame, &hdr))),
            };
            match uplink {
                Some(u) => {
                    if let Some(e) = VlanMode::Uplink.egress(vlan, pcp) {
                        self.out.push(Output { port: u, egress: e });
                    }
                }
                None => why = DropReason::NoUplink,
            }
        }
        for k in 0..self.promisc.len() {
            let q = self.promisc[k];
            if q != in_port && !self.out.iter().any(|o| o.port == q) {
                self.push_local(q, vlan, pcp);
            }
        }
        if self.out.is_empty() {
            return Err(why);
        }
        Ok((vlan, inline_tag))
    }

    fn is_member(&self, q: PortId, vlan: u16) -> bool {
        matches!(self.ports.get(usize::from(q)), Some(Some(p)) if p.cfg.vlan.member(vlan))
    }

    /// Whether local port `q` takes frames arriving on uplink `u`.
    fn takes_from(&self, q: PortId, u: PortId) -> bool {
        match self.ports.get(usize::from(q)) {
            Some(Some(p)) => match p.pin {
                Pin::Uplink(x) => x == u,
                Pin::PerFrame => true,
                Pin::Nothing => false,
            },
            _ => false,
        }
    }

    fn push_local(&mut self, q: PortId, vlan: u16, pcp: u8) {
        let Some(Some(p)) = self.ports.get(usize::from(q)) else {
            return;
        };
        let Some(egress) = p.cfg.vlan.egress(vlan, pcp) else {
            return;
        };
        if p.blocked {
            p.cfg.counters.dropped(DropReason::MacChange);
            return;
        }
        self.out.push(Output { port: q, egress });
    }

    /// The ports as the core sees them.
    pub fn ports(&self) -> Vec<PortView> {
        let name = |id: PortId| {
            self.ports
                .get(usize::from(id))
                .and_then(|p| p.as_ref())
                .map(|p| p.cfg.name.clone())
                .unwrap_or_default()
        };
        self.ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (i as PortId, p)))
            .map(|(id, p)| {
                let local = p.cfg.role != PortRole::Uplink;
                PortView {
                    id,
                    name: p.cfg.name.clone(),
                    role: p.cfg.role,
                    link_up: if local { true } else { p.link_up },
                    mac: local.then(|| p.effective_mac.to_string()),
                    uplink: local
                        .then(|| match p.pin {
                            Pin::Uplink(u) => Some(name(u)),
                            Pin::PerFrame => Some("per-frame".to_string()),
                            Pin::Nothing => None,
                        })
                        .flatten(),
                    blocked: p.blocked,
                }
            })
            .collect()
    }

    /// The uplinks each team uses now, by team index, as port numbers.
    pub fn team_uplinks(&self) -> Vec<Vec<PortId>> {
        self.teams.iter().map(|t| t.current.clone()).collect()
    }

    /// MACs learned on uplinks (at most `limit`).
    pub fn learned(&self, now: u64, limit: usize) -> Vec<LearnedMac> {
        let mut v: Vec<LearnedMac> = self
            .learned
            .iter()
            .take(limit)
            .map(|((vlan, mac), l)| LearnedMac {
                vlan: *vlan,
                mac: mac.to_string(),
                uplink: self
                    .ports
                    .get(usize::from(l.port))
                    .and_then(|p| p.as_ref())
                    .map(|p| p.cfg.name.clone())
                    .unwrap_or_default(),
                age_secs: now.saturating_sub(l.seen) / 1_000_000_000,
            })
            .collect();
        v.sort_by(|a, b| (a.vlan, &a.mac).cmp(&(b.vlan, &b.mac)));
        v
    }
}

impl PortConfig {
    fn cfg_name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::{LoadBalancing, PortGroupSpec};

    /// A switch with two uplinks (ports 0, 1) and local ports given as (vlan, mac byte,
    /// security) on ports 2.., all in one team (`policy`, both uplinks active).
    pub(crate) fn switch(
        locals: &[(u16, u8, SecurityPolicy)],
        policy: LoadBalancing,
        standby: bool,
    ) -> Pipeline {
        let mut cfg = Config::default();
        for u in 0..2 {
            cfg.ports.push(Some(PortConfig {
                name: format!("up{u}"),
                role: PortRole::Uplink,
                vlan: VlanMode::Uplink,
                security: SecurityPolicy::default(),
                shaping: None,
                team: None,
                mac: MacAddr::default(),
                counters: Arc::default(),
            }));
        }
        for (i, (vlan, m, sec)) in locals.iter().enumerate() {
            cfg.ports.push(Some(PortConfig {
                name: format!("vm{i}"),
                role: PortRole::Vm,
                vlan: VlanMode::of_portgroup(&PortGroupSpec::new("x", *vlan)),
                security: *sec,
                shaping: None,
                team: Some(0),
                mac: MacAddr([2, 0, 0, 0, 0, *m]),
                counters: Arc::default(),
            }));
        }
        cfg.teams.push(TeamConfig {
            policy,
            active: if standby { vec![0] } else { vec![0, 1] },
            standby: if standby { vec![1] } else { vec![] },
            failback: true,
            notify_switches: true,
        });
        let mut p = Pipeline::new();
        p.set_config(cfg, 0);
        p.set_link(0, true, 0);
        p.set_link(1, true, 0);
        while p.poll_announce().is_some() {}
        p
    }

    pub(crate) fn eth(dst: [u8; 6], src: [u8; 6], vid: Option<u16>) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&src);
        if let Some(v) = vid {
            f.extend_from_slice(&[0x81, 0, (v >> 8) as u8, v as u8]);
        }
        f.extend_from_slice(&[0x08, 0x00]);
        f.resize(f.len() + 46, 0);
        f
    }

    fn mac(b: u8) -> [u8; 6] {
        [2, 0, 0, 0, 0, b]
    }

    fn outs(
        p: &mut Pipeline,
        port: PortId,
        f: &[u8],
        meta: Option<u16>,
    ) -> Result<Vec<Output>, DropReason> {
        p.process(port, f, meta, f.len() as u64, 1)
            .map(|f| f.outputs.to_vec())
    }

    const OPEN: SecurityPolicy = SecurityPolicy {
        promiscuous: Verdict::Reject,
        mac_changes: Verdict::Accept,
        forged_transmits: Verdict::Accept,
    };

    #[test]
    fn local_unicast_stays_local_and_in_vlan() {
        let sec = SecurityPolicy::default();
        let mut p = switch(
            &[(10, 1, sec), (10, 2, sec), (20, 3, sec)],
            LoadBalancing::PortId,
            false,
        );
        let o = outs(&mut p, 2, &eth(mac(2), mac(1), None), None).unwrap();
        assert_eq!(
            o,
            vec![Output {
                port: 3,
                egress: Egress::Untagged
            }]
        );
        // VLAN 20's MAC is not local to VLAN 10: it goes to the uplink, tagged 10.
        let o = outs(&mut p, 2, &eth(mac(3), mac(1), None), None).unwrap();
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].egress, Egress::Tagged(10));
        assert!(o[0].port < 2);
    }

    #[test]
    fn broadcast_floods_vlan_and_one_uplink() {
        let sec = SecurityPolicy::default();
        let mut p = switch(
            &[(10, 1, sec), (10, 2, sec), (20, 3, sec), (4095, 4, sec)],
            LoadBalancing::PortId,
            false,
        );
        let o = outs(&mut p, 2, &eth([0xff; 6], mac(1), None), None).unwrap();
        let ports: Vec<_> = o.iter().map(|o| o.port).collect();
        assert!(ports.contains(&3) && ports.contains(&5));
        assert!(!ports.contains(&4), "VLAN 20 is not flooded");
        assert_eq!(ports.iter().filter(|p| **p < 2).count(), 1, "one uplink");
        let vgt = o.iter().find(|o| o.port == 5).unwrap();
        assert_eq!(vgt.egress, Egress::Tagged(10));
    }

    #[test]
    fn uplink_rules() {
        let sec = SecurityPolicy::default();
        let mut p = switch(
            &[(10, 1, sec), (10, 2, sec)],
            LoadBalancing::FailoverOrder,
            false,
        );
        // Both ports pinned to uplink 0.
        let f = eth([0xff; 6], [4, 0, 0, 0, 0, 9], Some(10));
        assert_eq!(outs(&mut p, 0, &f, None).unwrap().len(), 2);
        assert_eq!(
            outs(&mut p, 1, &f, None),
            Err(DropReason::NoDestination),
            "flood copy on the other uplink"
        );
        // Tag as metadata works the same.
        let f = eth([0xff; 6], [4, 0, 0, 0, 0, 9], None);
        assert_eq!(outs(&mut p, 0, &f, Some(10)).unwrap().len(), 2);
        // Our own MAC coming back is a loop.
        let f = eth([0xff; 6], mac(1), Some(10));
        assert_eq!(outs(&mut p, 0, &f, None), Err(DropReason::Loop));
        // Unknown unicast from the network goes nowhere (never uplink to uplink).
        let f = eth([4, 0, 0, 0, 0, 7], [4, 0, 0, 0, 0, 9], Some(10));
        assert_eq!(outs(&mut p, 0, &f, None), Err(DropReason::NoDestination));
        let f = eth(mac(2), [4, 0, 0, 0, 0, 9], Some(10));
        assert_eq!(outs(&mut p, 1, &f, None), Err(DropReason::WrongUplink));
        assert_eq!(
            outs(&mut p, 0, &f, None).unwrap(),
            vec![Output {
                port: 3,
                egress: Egress::Untagged
            }]
        );
        assert_eq!(p.learned(1, 10).len(), 1);
    }

    #[test]
    fn vlan_checks_on_ingress() {
        let sec = SecurityPolicy::default();
        let mut p = switch(
            &[(10, 1, sec), (4095, 2, sec)],
            LoadBalancing::PortId,
            false,
        );
        let f = eth([0xff; 6], mac(1), Some(10));
        assert_eq!(
            outs(&mut p, 2, &f, None),
            Err(DropReason::Vlan),
            "VST guests may not tag"
        );
        let f = eth([0xff; 6], mac(2), Some(10));
        let o = outs(&mut p, 3, &f, None).unwrap();
        assert!(o.contains(&Output {
            port: 2,
            egress: Egress::Untagged
        }));
        assert_eq!(p.counters(2).unwrap().drops(DropReason::Vlan), 1);
    }

    #[test]
    fn forged_transmits_and_mac_changes() {
        let strict = SecurityPolicy::default();
        let mut p = switch(
            &[(0, 1, strict), (0, 2, OPEN)],
            LoadBalancing::PortId,
            false,
        );
        let f = eth([0xff; 6], mac(9), None);
        assert_eq!(outs(&mut p, 2, &f, None), Err(DropReason::ForgedTransmit));
        assert_eq!(p.poll_mac_check(), Some(2));
        assert!(
            outs(&mut p, 3, &f, None).is_ok(),
            "forged transmits accepted"
        );
        assert_eq!(p.poll_mac_check(), Some(3));
        // Port 2's guest really changed its MAC: rejected, so it is blocked.
        p.device_mac(2, MacAddr(mac(9)), 2);
        assert_eq!(
            outs(&mut p, 3, &eth(mac(1), mac(2), None), None),
            Err(DropReason::NoDestination)
        );
        assert_eq!(p.counters(2).unwrap().drops(DropReason::MacChange), 1);
        p.device_mac(2, MacAddr(mac(1)), 3);
        let o = outs(&mut p, 3, &eth(mac(1), mac(2), None), None).unwrap();
        assert_eq!(
            o,
            vec![Output {
                port: 2,
                egress: Egress::Untagged
            }]
        );
        // Port 3's guest changed its MAC: accepted, the new MAC is local now.
        p.device_mac(3, MacAddr(mac(7)), 4);
        let a = p.poll_announce().unwrap();
        assert_eq!(a.mac, MacAddr(mac(7)));
        let o = outs(&mut p, 2, &eth(mac(7), mac(1), None), None).unwrap();
        assert_eq!(
            o,
            vec![Output {
                port: 3,
                egress: Egress::Untagged
            }]
        );
    }

    #[test]
    fn promiscuous_ports_see_everything_in_their_vlan() {
        let sec = SecurityPolicy::default();
        let pro = SecurityPolicy {
            promiscuous: Verdict::Accept,
            ..sec
        };
        let mut p = switch(
            &[(10, 1, sec), (10, 2, sec), (10, 3, pro), (20, 4, pro)],
            LoadBalancing::FailoverOrder,
            false,
        );
        let o = outs(&mut p, 2, &eth(mac(2), mac(1), None), None).unwrap();
        let ports: Vec<_> = o.iter().map(|o| o.port).collect();
        assert_eq!(ports, vec![3, 4]);
        let f = eth([4, 0, 0, 0, 0, 7], [4, 0, 0, 0, 0, 9], Some(10));
        let o = outs(&mut p, 0, &f, None).unwrap();
        assert_eq!(
            o,
            vec![Output {
                port: 4,
                egress: Egress::Untagged
            }]
        );
    }

    #[test]
    fn failover_moves_ports_and_announces() {
        let sec = SecurityPolicy::default();
        let mut p = switch(
            &[(10, 1, sec), (0, 2, sec)],
            LoadBalancing::FailoverOrder,
            true,
        );
        let f = eth([4, 0, 0, 0, 0, 7], mac(1), None);
        assert_eq!(outs(&mut p, 2, &f, None).unwrap()[0].port, 0);
        assert!(p.set_link(0, false, 5));
        let mut a = Vec::new();
        while let Some(x) = p.poll_announce() {
            a.push(x);
        }
        assert_eq!(
            a,
            vec![
                Announce {
                    uplink: 1,
                    mac: MacAddr(mac(1)),
                    vid: 10
                },
                Announce {
                    uplink: 1,
                    mac: MacAddr(mac(2)),
                    vid: 0
                },
            ]
        );
        assert_eq!(outs(&mut p, 2, &f, None).unwrap()[0].port, 1);
        p.set_link(1, false, 6);
        assert_eq!(outs(&mut p, 2, &f, None), Err(DropReason::NoUplink));
        p.set_link(0, true, 7);
        assert_eq!(outs(&mut p, 2, &f, None).unwrap()[0].port, 0);
        assert_eq!(p.ports()[2].uplink.as_deref(), Some("up0"));
    }

    #[test]
    fn config_update_keeps_state() {
        let sec = SecurityPolicy::default();
        let mut p = switch(&[(10, 1, sec), (10, 2, sec)], LoadBalancing::PortId, false);
        let mut cfg = Config::default();
        for st in p.ports.iter().take(3) {
            cfg.ports.push(st.as_ref().map(|s| s.cfg.clone()));
        }
        cfg.teams = p.teams.iter().map(|t| t.config.clone()).collect();
        p.set_config(cfg, 10);
        assert!(p
            .ports()
            .iter()
            .filter(|v| v.role == PortRole::Uplink)
            .all(|v| v.link_up));
        assert!(p.poll_announce().is_none(), "nothing moved");
        assert_eq!(p.ports().len(), 3);
    }
}

/// A fixed switch and a driver that feeds it operations decoded from arbitrary bytes,
/// checking the forwarding invariants after each. Shared by the cargo-fuzz target
/// (`fuzz/fuzz_targets/net_forward.rs`) and the proptest below.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;
    use crate::definition::{LoadBalancing, PortGroupSpec, VlanRange};
    use crate::frame;
    use crate::io::parse_link_messages;

    const UPLINKS: PortId = 3;

    /// Three uplinks (0-2) and local ports: VST 10, VST 10 (promiscuous), VST 20, VGT,
    /// a trunk 20-29 with native 5, EST, and one with no MAC yet.
    pub fn sample() -> Pipeline {
        let mut cfg = Config::default();
        for u in 0..UPLINKS {
            cfg.ports.push(Some(PortConfig {
                name: format!("up{u}"),
                role: PortRole::Uplink,
                vlan: VlanMode::Uplink,
                security: SecurityPolicy::default(),
                shaping: None,
                team: None,
                mac: MacAddr::default(),
                counters: Arc::default(),
            }));
        }
        let mut trunk = PortGroupSpec::new("t", 0);
        trunk.trunk = Some(vec![VlanRange {
            first: 20,
            last: 29,
        }]);
        trunk.native_vlan = Some(5);
        let open = SecurityPolicy {
            promiscuous: Verdict::Accept,
            mac_changes: Verdict::Accept,
            forged_transmits: Verdict::Accept,
        };
        let locals: [(PortGroupSpec, SecurityPolicy, usize, u8); 7] = [
            (PortGroupSpec::new("a", 10), SecurityPolicy::default(), 0, 1),
            (PortGroupSpec::new("b", 10), open, 1, 2),
            (PortGroupSpec::new("c", 20), SecurityPolicy::default(), 2, 3),
            (PortGroupSpec::new("d", 4095), open, 0, 4),
            (trunk, SecurityPolicy::default(), 1, 5),
            (PortGroupSpec::new("e", 0), SecurityPolicy::default(), 3, 6),
            (PortGroupSpec::new("f", 0), open, 2, 0),
        ];
        for (i, (pg, sec, team, m)) in locals.iter().enumerate() {
            cfg.ports.push(Some(PortConfig {
                name: format!("vm{i}"),
                role: if i == 5 {
                    PortRole::Internal
                } else {
                    PortRole::Vm
                },
                vlan: VlanMode::of_portgroup(pg),
                security: *sec,
                shaping: (i == 2).then_some(ShapingPolicy {
                    average_bps: 1_000_000,
                    peak_bps: None,
                    burst_bytes: None,
                }),
                team: Some(*team),
                mac: if *m == 0 {
                    MacAddr::default()
                } else {
                    MacAddr([2, 0, 0, 0, 0, *m])
                },
                counters: Arc::default(),
            }));
        }
        for (policy, active, standby) in [
            (LoadBalancing::FailoverOrder, vec![0], vec![1, 2]),
            (LoadBalancing::PortId, vec![0, 1, 2], vec![]),
            (LoadBalancing::SrcMac, vec![1, 2], vec![0]),
            (LoadBalancing::IpHash, vec![0, 1], vec![]),
        ] {
            cfg.teams.push(TeamConfig {
                policy,
                active,
                standby,
                failback: policy != LoadBalancing::SrcMac,
                notify_switches: true,
            });
        }
        let mut p = Pipeline::new();
        p.set_config(cfg, 0);
        for u in 0..UPLINKS {
            p.set_link(u, true, 0);
        }
        p
    }

    /// Decodes operations from `data` and applies them to [`sample`], panicking if an
    /// invariant breaks.
    pub fn run(data: &[u8]) {
        static SAMPLE: std::sync::OnceLock<Pipeline> = std::sync::OnceLock::new();
        let _ = frame::parse(data);
        parse_link_messages(data, |_| {});
        let mut p = SAMPLE.get_or_init(sample).clone();
        let nports = p.ports.len() as PortId;
        let mut now = 1u64;
        let mut d = data;
        while d.len() >= 2 {
            let (op, arg) = (d[0], d[1]);
            d = &d[2..];
            now += u64::from(arg) * 1_000_000;
            match op % 6 {
                0..=2 => {
                    let len = usize::from(arg).min(d.len());
                    let (frame, rest) = d.split_at(len);
                    d = rest;
                    let port = PortId::from(op >> 3) % nports;
                    let meta = (op & 4 != 0).then_some(u16::from(arg) * 17);
                    let is_uplink = port < UPLINKS;
                    if let Ok(f) = p.process(port, frame, meta, frame.len() as u64, now) {
                        let (vlan, outs) = (f.vlan, f.outputs.to_vec());
                        assert!(!outs.is_empty());
                        let mut uplinks = 0;
                        for (k, o) in outs.iter().enumerate() {
                            assert_ne!(o.port, port, "sent back to its input");
                            assert!(
                                outs[..k].iter().all(|x| x.port != o.port),
                                "duplicate output"
                            );
                            let st = p.ports[usize::from(o.port)]
                                .as_ref()
                                .expect("output exists");
                            if st.cfg.role == PortRole::Uplink {
                                assert!(!is_uplink, "uplink to uplink");
                                assert!(st.link_up, "output on a down uplink");
                                uplinks += 1;
                            }
                            assert_eq!(
                                Some(o.egress),
                                st.cfg.vlan.egress(
                                    vlan,
                                    match o.egress {
                                        Egress::Tagged(t) => (t >> 13) as u8,
                                        Egress::Untagged => 0,
                                    }
                                ),
                                "egress outside the VLAN"
                            );
                        }
                        assert!(uplinks <= 1, "flooded to several uplinks");
                    }
                }
                3 => {
                    p.set_link(PortId::from(arg) % UPLINKS, op & 8 != 0, now);
                    while p.poll_announce().is_some() {}
                }
                4 => {
                    while let Some(id) = p.poll_mac_check() {
                        p.device_mac(id, MacAddr([2, 0, 0, 0, 1, arg % 4]), now);
                    }
                    let _ = p.ready_at(PortId::from(arg) % nports, now);
                }
                _ => p.tick(now),
            }
        }
        let _ = p.ports();
        let _ = p.learned(now, 10);
    }

    #[cfg(test)]
    mod tests {
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            #[test]
            fn forwarding_invariants_hold(data in proptest::collection::vec(any::<u8>(), 0..600)) {
                super::run(&data);
            }
        }

        #[test]
        fn structured_traffic_holds_invariants() {
            // Broadcasts and unicasts between known MACs, from every port.
            let mut data = Vec::new();
            for port in 0..10u8 {
                for dst in [
                    [0xffu8; 6],
                    [2, 0, 0, 0, 0, 1],
                    [2, 0, 0, 0, 0, 4],
                    [4, 0, 0, 0, 0, 9],
                ] {
                    let mut f = dst.to_vec();
                    f.extend_from_slice(&[2, 0, 0, 0, 0, port]);
                    f.extend_from_slice(&[0x81, 0, 0, 20 + port % 3, 0x08, 0]);
                    f.resize(60, 0);
                    data.extend_from_slice(&[port << 3, 60]);
                    data.extend_from_slice(&f);
                }
                data.extend_from_slice(&[3, port]);
            }
            super::run(&data);
        }
    }
}
