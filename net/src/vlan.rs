//! VLAN modes of ports and the two decisions the switch makes with them: which VLAN a
//! frame entering through a port belongs to, and how (or whether) a frame of a VLAN
//! leaves through a port.
//!
//! Inside the switch every frame belongs to one VLAN, 0 to 4094, where 0 is the
//! untagged network (EST: "external switch tagging", the physical network's untagged
//! VLAN). Uplinks are trunks of everything: VLAN 0 leaves them untagged, any other VLAN
//! tagged.

use crate::definition::{PortGroupSpec, VLAN_GUEST_TAGGING};
use crate::frame::VLAN_MAX;

/// A set of VLAN IDs 0-4095 as a bitmap.
#[derive(Clone, PartialEq, Eq)]
pub struct VlanSet([u64; 64]);

impl VlanSet {
    /// The empty set.
    pub fn empty() -> VlanSet {
        VlanSet([0; 64])
    }

    /// VLANs 1-4094.
    pub fn all_tagged() -> VlanSet {
        let mut s = VlanSet([u64::MAX; 64]);
        s.remove(0);
        s.remove(4095);
        s
    }

    /// Adds `vid`.
    pub fn insert(&mut self, vid: u16) {
        let v = usize::from(vid & 0x0fff);
        self.0[v / 64] |= 1 << (v % 64);
    }

    /// Removes `vid`.
    pub fn remove(&mut self, vid: u16) {
        let v = usize::from(vid & 0x0fff);
        self.0[v / 64] &= !(1 << (v % 64));
    }

    /// Whether `vid` is in the set.
    pub fn contains(&self, vid: u16) -> bool {
        let v = usize::from(vid & 0x0fff);
        self.0[v / 64] & (1 << (v % 64)) != 0
    }

    /// How many VLANs are in the set.
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The members, in order.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        (0u16..4096).filter(|v| self.contains(*v))
    }
}

impl std::fmt::Debug for VlanSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// How a port treats VLANs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VlanMode {
    /// An access port: its frames are untagged and belong to this VLAN (0 = EST,
    /// 1-4094 = VST, the switch tags on the uplinks). Tagged frames from the port are
    /// dropped, except priority tags (VID 0).
    Access(u16),
    /// A trunk port: tagged frames of the allowed VLANs pass with their tag; untagged
    /// frames belong to the native VLAN (dropped when there is none) and frames of the
    /// native VLAN leave untagged. VGT (4095) is a trunk of every VLAN with native 0.
    Trunk {
        /// VLANs carried tagged.
        allowed: Box<VlanSet>,
        /// The VLAN carried untagged.
        native: Option<u16>,
    },
    /// An uplink: VLAN 0 untagged, every other VLAN tagged.
    Uplink,
}

/// How a frame leaves a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// Without a tag.
    Untagged,
    /// With this tag control information (PCP and VID).
    Tagged(u16),
}

impl VlanMode {
    /// The mode a port group gives its ports.
    pub fn of_portgroup(pg: &PortGroupSpec) -> VlanMode {
        if let Some(ranges) = &pg.trunk {
            let mut allowed = VlanSet::empty();
            for r in ranges {
                for v in r.first..=r.last.min(VLAN_MAX) {
                    allowed.insert(v);
                }
            }
            VlanMode::Trunk {
                allowed: Box::new(allowed),
                native: pg.native_vlan,
            }
        } else if pg.vlan == VLAN_GUEST_TAGGING {
            VlanMode::Trunk {
                allowed: Box::new(VlanSet::all_tagged()),
                native: Some(pg.native_vlan.unwrap_or(0)),
            }
        } else {
            VlanMode::Access(pg.vlan)
        }
    }

    /// The VLAN of a frame entering through this port with tag `tci` (None when
    /// untagged); None when the port must drop it.
    pub fn ingress(&self, tci: Option<u16>) -> Option<u16> {
        let vid = tci.map(|t| t & 0x0fff);
        match self {
            VlanMode::Access(v) => match vid {
                None | Some(0) => Some(*v),
                Some(_) => None,
            },
            VlanMode::Trunk { allowed, native } => match vid {
                None | Some(0) => *native,
                Some(v) if allowed.contains(v) || Some(v) == *native => Some(v),
                Some(_) => None,
            },
            VlanMode::Uplink => match vid {
                Some(4095) => None,
                Some(v) => Some(v),
                None => Some(0),
            },
        }
    }

    /// How a frame of `vlan` with priority `pcp` leaves this port; None when the port is
    /// not a member of the VLAN.
    pub fn egress(&self, vlan: u16, pcp: u8) -> Option<Egress> {
        let tag = (u16::from(pcp & 7) << 13) | vlan;
        match self {
            VlanMode::Access(v) => (*v == vlan).then_some(Egress::Untagged),
            VlanMode::Trunk { allowed, native } => {
                if *native == Some(vlan) {
                    Some(Egress::Untagged)
                } else if vlan != 0 && allowed.contains(vlan) {
                    Some(Egress::Tagged(tag))
                } else {
                    None
                }
            }
            VlanMode::Uplink => Some(if vlan == 0 {
                Egress::Untagged
            } else {
                Egress::Tagged(tag)
            }),
        }
    }

    /// Whether the port is a member of `vlan`.
    pub fn member(&self, vlan: u16) -> bool {
        self.egress(vlan, 0).is_some()
    }

    /// The VLAN the port's own untagged traffic belongs to (for announcements).
    pub fn untagged_vlan(&self) -> Option<u16> {
        match self {
            VlanMode::Access(v) => Some(*v),
            VlanMode::Trunk { native, .. } => *native,
            VlanMode::Uplink => Some(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::VlanRange;

    #[test]
    fn access_modes() {
        let est = VlanMode::of_portgroup(&PortGroupSpec::new("a", 0));
        assert_eq!(est.ingress(None), Some(0));
        assert_eq!(est.ingress(Some(10)), None);
        assert_eq!(est.egress(0, 0), Some(Egress::Untagged));
        assert_eq!(est.egress(10, 0), None);
        let vst = VlanMode::of_portgroup(&PortGroupSpec::new("a", 10));
        assert_eq!(vst.ingress(None), Some(10));
        assert_eq!(vst.ingress(Some(3 << 13)), Some(10), "priority tag");
        assert_eq!(vst.ingress(Some(10)), None, "guest tags are dropped in VST");
        assert_eq!(vst.egress(10, 3), Some(Egress::Untagged));
        assert_eq!(
            VlanMode::Uplink.egress(10, 3),
            Some(Egress::Tagged((3 << 13) | 10))
        );
        assert_eq!(VlanMode::Uplink.egress(0, 0), Some(Egress::Untagged));
    }

    #[test]
    fn trunk_modes() {
        let vgt = VlanMode::of_portgroup(&PortGroupSpec::new("a", 4095));
        assert_eq!(vgt.ingress(Some(300)), Some(300));
        assert_eq!(vgt.ingress(None), Some(0));
        assert_eq!(vgt.egress(300, 0), Some(Egress::Tagged(300)));
        assert_eq!(vgt.egress(0, 0), Some(Egress::Untagged));
        let mut pg = PortGroupSpec::new("t", 0);
        pg.trunk = Some(vec![VlanRange {
            first: 20,
            last: 29,
        }]);
        pg.native_vlan = Some(5);
        let t = VlanMode::of_portgroup(&pg);
        assert_eq!(t.ingress(None), Some(5));
        assert_eq!(t.ingress(Some(25)), Some(25));
        assert_eq!(t.ingress(Some(5)), Some(5));
        assert_eq!(t.ingress(Some(30)), None);
        assert_eq!(t.egress(5, 0), Some(Egress::Untagged));
        assert_eq!(t.egress(21, 0), Some(Egress::Tagged(21)));
        assert_eq!(t.egress(30, 0), None);
        pg.native_vlan = None;
        assert_eq!(VlanMode::of_portgroup(&pg).ingress(None), None);
    }
}
