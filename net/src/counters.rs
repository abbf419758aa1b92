//! Per-port counters: plain atomics the datapath bumps and anyone may read.
//!
//! Counters are monotonic for the life of a port (a port that is removed and added
//! again starts from zero under the same name, which Prometheus treats as a reset).
//! "rx" is what the switch received from the port, "tx" what it sent to the port, as
//! OVS counts. Drops are counted on the port where the decision was made: ingress
//! checks (VLAN, forged source, loops, no uplink) on the port the frame came from,
//! egress ones (a blocked MAC change, a full output queue) on the port it was going to.
//!
//! The daemon renders a snapshot as, for example:
//!
//! ```text
//! basalt_switch_port_received_packets_total{switch="dvs0",port="vm1"} 1200
//! basalt_switch_port_received_bytes_total{switch="dvs0",port="vm1"} 180000
//! basalt_switch_port_dropped_packets_total{switch="dvs0",port="vm1",reason="forged_transmit"} 3
//! ```

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why the switch dropped a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum DropReason {
    /// Too short to be an Ethernet frame.
    Malformed = 0,
    /// Its VLAN is not allowed on the port it entered.
    Vlan,
    /// Forged transmit: its source MAC is not the port's, and the policy rejects that.
    ForgedTransmit,
    /// The destination port's guest changed its MAC address, and the policy rejects that.
    MacChange,
    /// No uplink of the port's team is up.
    NoUplink,
    /// It came back from the physical network with one of the switch's own MACs as
    /// source (a loop through two uplinks), or it would go from an uplink to an uplink.
    Loop,
    /// It arrived on an uplink that is not the destination port's uplink (a flood copy).
    WrongUplink,
    /// Nothing in its VLAN wants it.
    NoDestination,
    /// The output port's queue was full or the send failed.
    TxError,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 9] = [
        DropReason::Malformed,
        DropReason::Vlan,
        DropReason::ForgedTransmit,
        DropReason::MacChange,
        DropReason::NoUplink,
        DropReason::Loop,
        DropReason::WrongUplink,
        DropReason::NoDestination,
        DropReason::TxError,
    ];

    /// The value of the `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Vlan => "vlan",
            DropReason::ForgedTransmit => "forged_transmit",
            DropReason::MacChange => "mac_change",
            DropReason::NoUplink => "no_uplink",
            DropReason::Loop => "loop",
            DropReason::WrongUplink => "wrong_uplink",
            DropReason::NoDestination => "no_destination",
            DropReason::TxError => "tx_error",
        }
    }
}

/// The live counters of one port.
#[derive(Debug, Default)]
pub struct PortCounters {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
}

impl PortCounters {
    /// Counts a frame received from the port (its bytes from the Ethernet header on, no
    /// offload header; a segmentation-offloaded frame counts once, with its headers once).
    #[inline]
    pub fn rx(&self, bytes: usize) {
        self.rx_packets.fetch_add(1, Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Relaxed);
    }

    /// Counts a frame sent to the port.
    #[inline]
    pub fn tx(&self, bytes: usize) {
        self.tx_packets.fetch_add(1, Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Relaxed);
    }

    /// Counts a drop.
    #[inline]
    pub fn dropped(&self, why: DropReason) {
        self.drops[why as usize].fetch_add(1, Relaxed);
    }

    /// Drops so far for one reason.
    pub fn drops(&self, why: DropReason) -> u64 {
        self.drops[why as usize].load(Relaxed)
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> PortCountersSnapshot {
        PortCountersSnapshot {
            rx_packets: self.rx_packets.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
            tx_packets: self.tx_packets.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            drops: DropReason::ALL
                .iter()
                .map(|r| (r.label().to_string(), self.drops(*r)))
                .collect(),
        }
    }
}

/// A copy of one port's counters, for the API and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortCountersSnapshot {
    /// Frames the switch received from the port.
    pub rx_packets: u64,
    /// Bytes the switch received from the port.
    pub rx_bytes: u64,
    /// Frames the switch sent to the port.
    pub tx_packets: u64,
    /// Bytes the switch sent to the port.
    pub tx_bytes: u64,
    /// Dropped frames by reason label ([`DropReason::label`]); every reason is present.
    pub drops: BTreeMap<String, u64>,
}

impl PortCountersSnapshot {
    /// Total drops.
    pub fn dropped(&self) -> u64 {
        self.drops.values().sum()
    }
}
