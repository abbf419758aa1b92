//! Networking: an Open vSwitch-style userspace virtual switch.
//!
//! This crate will own the datapath (TAP VM ports, AF_PACKET uplinks, internal ports),
//! port groups with VLAN, security and shaping policy, NIC teaming with failover, and the
//! distributed switch definition applied on each host. Nothing is implemented yet.
