//! Networking: an Open vSwitch-style userspace virtual switch, modelled on vSphere's
//! standard and distributed switches.
//!
//! # Shape
//!
//! ```text
//!  Switch (switch.rs)          control plane: definition -> devices + Config, apply, status
//!    |  Command channel + eventfd
//!  datapath thread (datapath.rs)  epoll over ports + rtnetlink; batches; iovec queues
//!    |            \
//!  Pipeline (pipeline.rs)       io/ (tap.rs, packet.rs, netlink.rs, sys.rs)
//!  sans-IO: frame.rs, vlan.rs,   TAP with IFF_VNET_HDR + offloads, AF_PACKET with
//!  teaming.rs, shaper.rs         PACKET_VNET_HDR + recvmmsg/sendmmsg, RTMGRP_LINK
//! ```
//!
//! - [`definition`]: the typed document ([`SwitchDefinition`], TOML or JSON) with
//!   validation that names the offending entity.
//! - [`pipeline`]: the switching core without I/O: VLAN classification (EST, VST, VGT,
//!   trunks with a native VLAN), forwarding by known local MACs, learning on uplinks
//!   only, flooding within the VLAN, no uplink-to-uplink forwarding, security policy,
//!   shaping, teaming and failover with RARP announcements. Fuzzed and unit-tested.
//! - [`datapath`]: the thread that moves frames (see its docs for why a thread).
//! - [`switch`]: [`Switch::start`], [`Switch::apply`], [`Switch::status`],
//!   [`Switch::counters`], [`Switch::add_port`], [`Switch::stop`].
//! - [`counters`]: per-port atomics, rendered by the daemon as Prometheus series.
//!
//! # Driving it (the daemon)
//!
//! ```no_run
//! use basalt_net::{PortKind, PortSpec, Switch, SwitchDefinition};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let def = SwitchDefinition::from_toml(r#"
//!     name = "vs0"
//!     [[uplinks]]
//!     name = "uplink1"
//!     interface = "eth1"
//!     [[portgroups]]
//!     name = "vm-10"
//!     vlan = 10
//! "#)?;
//! let sw = Switch::start(def)?;                  // opens eth1, starts the datapath
//! let port = sw.add_port(PortSpec {             // compute asks for a VM NIC
//!     name: "vm7-eth0".into(),
//!     portgroup: "vm-10".into(),
//!     kind: PortKind::Tap,
//!     mac: Some("52:54:00:00:07:01".parse()?),
//!     interface: None,
//!     host: None,
//! })?;
//! println!("TAP {} for the guest", port.device);
//! let _status = sw.status()?;                    // links, teams, MACs (serde)
//! let _counters = sw.counters();                 // per-port packets, bytes, drops
//! let mut def = sw.definition();                 // persist this; re-apply at start
//! def.portgroups[0].vlan = 20;
//! let _changes = sw.apply(def)?;                 // in place, other traffic flows on
//! sw.stop();
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod counters;
pub mod datapath;
pub mod definition;
pub mod frame;
pub mod io;
pub mod pipeline;
pub mod shaper;
pub mod switch;
pub mod teaming;
pub mod vlan;

pub use counters::{DropReason, PortCounters, PortCountersSnapshot};
pub use definition::{
    DefinitionError, HostBinding, LoadBalancing, PortGroupSpec, PortKind, PortSpec, SecurityPolicy,
    ShapingPolicy, SwitchDefinition, TeamingPolicy, UplinkSpec, Verdict, VlanRange,
};
pub use frame::MacAddr;
pub use pipeline::{LearnedMac, PortRole};
pub use switch::{
    Changes, PortInfo, PortStatus, Switch, SwitchError, SwitchOptions, SwitchStatus, TeamStatus,
};
