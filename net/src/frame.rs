//! Ethernet frames as the switch sees them: addresses, the 802.1Q tag, the virtio-net
//! header that travels in front of every frame on TAP and AF_PACKET ports, and the RARP
//! announcement the switch sends to "notify switches".
//!
//! Everything here reads and writes caller-owned byte slices; nothing allocates, so the
//! datapath parses each frame in place. [`parse`] is the one entry point for untrusted
//! bytes and is fuzzed (`fuzz/fuzz_targets/net_forward.rs`).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Length of an Ethernet header without a tag.
pub const ETH_HLEN: usize = 14;
/// Length of an 802.1Q tag.
pub const VLAN_HLEN: usize = 4;
/// The 802.1Q tag protocol identifier.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Reverse ARP, which the switch sends to announce a moved MAC address.
pub const ETHERTYPE_RARP: u16 = 0x8035;
/// The largest VLAN ID that names a VLAN (4095 is reserved).
pub const VLAN_MAX: u16 = 4094;

/// A 48-bit MAC address. Written and read as `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The broadcast address.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// Whether the group bit is set (broadcast or multicast).
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// Whether this is the all-zero address.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// Whether the address can belong to a port: not multicast, not zero.
    pub fn is_unicast(&self) -> bool {
        !self.is_multicast() && !self.is_zero()
    }

    /// A locally administered unicast address derived from `seed` (for ports that were
    /// given no MAC address).
    pub fn local_from(seed: u64) -> MacAddr {
        let b = seed.to_be_bytes();
        MacAddr([0x02, b[3] ^ b[7], b[4], b[5], b[6], b[2] ^ b[1] ^ b[0]])
    }

    /// A small, well-spread hash of the address (for source-MAC teaming).
    pub fn hash32(&self) -> u32 {
        let mut h: u32 = 0x811c_9dc5;
        for b in self.0 {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        h
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A MAC address that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six hex bytes like 52:54:00:12:34:56")]
pub struct BadMac(pub String);

impl FromStr for MacAddr {
    type Err = BadMac;
    fn from_str(s: &str) -> Result<Self, BadMac> {
        let mut out = [0u8; 6];
        let mut n = 0;
        for part in s.split([':', '-']) {
            if n == 6 || part.len() != 2 {
                return Err(BadMac(s.to_string()));
            }
            out[n] = u8::from_str_radix(part, 16).map_err(|_| BadMac(s.to_string()))?;
            n += 1;
        }
        if n != 6 {
            return Err(BadMac(s.to_string()));
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a frame could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than an Ethernet header (with its tag, if it has one).
    #[error("frame too short")]
    Short,
}

/// The parsed head of an Ethernet frame; offsets index the slice given to [`parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthHeader {
    /// Destination address.
    pub dst: MacAddr,
    /// Source address.
    pub src: MacAddr,
    /// The 802.1Q tag control information (PCP, DEI, VID), if the frame is tagged.
    pub tci: Option<u16>,
    /// The ethertype after the tag.
    pub ethertype: u16,
    /// Offset of the payload after the header and tag.
    pub payload: usize,
}

impl EthHeader {
    /// The VLAN ID of the tag (0 for untagged or priority-tagged frames).
    pub fn vid(&self) -> u16 {
        self.tci.map_or(0, |t| t & 0x0fff)
    }

    /// The priority code point of the tag (0 when untagged).
    pub fn pcp(&self) -> u8 {
        self.tci.map_or(0, |t| (t >> 13) as u8)
    }
}

/// Parses the Ethernet header of `frame`, including one 802.1Q tag.
pub fn parse(frame: &[u8]) -> Result<EthHeader, FrameError> {
    if frame.len() < ETH_HLEN {
        return Err(FrameError::Short);
    }
    let mut dst = [0u8; 6];
    let mut src = [0u8; 6];
    dst.copy_from_slice(&frame[0..6]);
    src.copy_from_slice(&frame[6..12]);
    let t = u16::from_be_bytes([frame[12], frame[13]]);
    if t == ETHERTYPE_VLAN {
        if frame.len() < ETH_HLEN + VLAN_HLEN {
            return Err(FrameError::Short);
        }
        Ok(EthHeader {
            dst: MacAddr(dst),
            src: MacAddr(src),
            tci: Some(u16::from_be_bytes([frame[14], frame[15]])),
            ethertype: u16::from_be_bytes([frame[16], frame[17]]),
            payload: ETH_HLEN + VLAN_HLEN,
        })
    } else {
        Ok(EthHeader {
            dst: MacAddr(dst),
            src: MacAddr(src),
            tci: None,
            ethertype: t,
            payload: ETH_HLEN,
        })
    }
}

/// The IPv4 source and destination of an IPv4 frame, for IP-hash teaming.
pub fn ipv4_pair(frame: &[u8], hdr: &EthHeader) -> Option<(u32, u32)> {
    if hdr.ethertype != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = frame.get(hdr.payload..hdr.payload + 20)?;
    if ip[0] >> 4 != 4 {
        return None;
    }
    let s = u32::from_be_bytes([ip[12], ip[13], ip[14], ip[15]]);
    let d = u32::from_be_bytes([ip[16], ip[17], ip[18], ip[19]]);
    Some((s, d))
}

/// Length of the virtio-net header on TAP and AF_PACKET ports (`struct virtio_net_hdr`).
pub const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum from `csum_start` is still to be done.
pub const VNET_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const VNET_GSO_NONE: u8 = 0;

/// The virtio-net header in front of a frame: checksum and segmentation offload state.
/// Offsets count from the start of the Ethernet header, so tagging or untagging a frame
/// moves them by four bytes ([`VnetHdr::shift`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    /// `VIRTIO_NET_HDR_F_*` flags.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*` type (plus the ECN bit).
    pub gso_type: u8,
    /// Length of the headers to copy into every segment.
    pub hdr_len: u16,
    /// Segment payload size.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Reads a header (little-endian, as the kernel writes it on x86 and arm64).
    pub fn read(b: &[u8; VNET_HDR_LEN]) -> VnetHdr {
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16::from_le_bytes([b[2], b[3]]),
            gso_size: u16::from_le_bytes([b[4], b[5]]),
            csum_start: u16::from_le_bytes([b[6], b[7]]),
            csum_offset: u16::from_le_bytes([b[8], b[9]]),
        }
    }

    /// Writes the header.
    pub fn write(&self, b: &mut [u8; VNET_HDR_LEN]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }

    /// Moves the frame-relative offsets by `delta` bytes (+4 when a tag is inserted, -4
    /// when one is removed).
    pub fn shift(&mut self, delta: i32) {
        let mv = |v: u16| -> u16 {
            if v == 0 {
                0
            } else {
                (i32::from(v) + delta).clamp(0, i32::from(u16::MAX)) as u16
            }
        };
        if self.flags & VNET_F_NEEDS_CSUM != 0 {
            self.csum_start = mv(self.csum_start);
        }
        if self.gso_type != VNET_GSO_NONE {
            self.hdr_len = mv(self.hdr_len);
        }
    }
}

/// Length of a RARP announcement frame (padded to the Ethernet minimum), with a tag.
pub const RARP_LEN: usize = 64;

/// Writes a RARP "request reverse" announcement from `mac` into `out` (as ESXi does to
/// notify physical switches that `mac` is now reached through another uplink), tagged
/// with `vid` unless it is 0. Returns the frame length.
pub fn write_rarp(out: &mut [u8; RARP_LEN], mac: MacAddr, vid: u16) -> usize {
    *out = [0; RARP_LEN];
    out[0..6].copy_from_slice(&MacAddr::BROADCAST.0);
    out[6..12].copy_from_slice(&mac.0);
    let mut o = 12;
    if vid != 0 {
        out[12..14].copy_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        out[14..16].copy_from_slice(&(vid & 0x0fff).to_be_bytes());
        o = 16;
    }
    out[o..o + 2].copy_from_slice(&ETHERTYPE_RARP.to_be_bytes());
    let p = &mut out[o + 2..];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    p[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&3u16.to_be_bytes()); // request reverse
    p[8..14].copy_from_slice(&mac.0);
    p[18..24].copy_from_slice(&mac.0);
    60.max(o + 2 + 28) + if vid != 0 { 4 } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn mac_round_trip() {
        let m: MacAddr = "52:54:00:ab:CD:0f".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
        assert!("52:54:00:ab:cd".parse::<MacAddr>().is_err());
        assert!("52:54:00:ab:cd:0f:11".parse::<MacAddr>().is_err());
        assert!("52:54:00:ab:cd:zz".parse::<MacAddr>().is_err());
        assert!(m.is_unicast());
        assert!(MacAddr::BROADCAST.is_multicast());
        assert!(MacAddr::local_from(7).is_unicast());
    }

    #[test]
    fn parses_tagged_and_untagged() {
        let mut f = [0u8; 64];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
        f[14..16].copy_from_slice(&((5u16 << 13) | 42).to_be_bytes());
        f[16..18].copy_from_slice(&0x0800u16.to_be_bytes());
        let h = parse(&f).unwrap();
        assert_eq!(h.vid(), 42);
        assert_eq!(h.pcp(), 5);
        assert_eq!(h.ethertype, 0x0800);
        assert_eq!(h.payload, 18);
        assert_eq!(parse(&f[..17]), Err(FrameError::Short));
        f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        let h = parse(&f).unwrap();
        assert_eq!((h.tci, h.payload, h.ethertype), (None, 14, 0x0806));
    }

    #[test]
    fn rarp_is_well_formed() {
        let mac: MacAddr = "02:00:00:00:00:05".parse().unwrap();
        let mut b = [0u8; RARP_LEN];
        let n = write_rarp(&mut b, mac, 0);
        assert_eq!(n, 60);
        let h = parse(&b[..n]).unwrap();
        assert_eq!(
            (h.src, h.dst, h.ethertype),
            (mac, MacAddr::BROADCAST, 0x8035)
        );
        let n = write_rarp(&mut b, mac, 100);
        assert_eq!(n, 64);
        let h = parse(&b[..n]).unwrap();
        assert_eq!((h.vid(), h.ethertype), (100, 0x8035));
    }

    #[test]
    fn vnet_shift_moves_offsets() {
        let mut h = VnetHdr {
            flags: VNET_F_NEEDS_CSUM,
            gso_type: 1,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        h.shift(4);
        assert_eq!((h.csum_start, h.hdr_len), (38, 70));
        let mut b = [0u8; VNET_HDR_LEN];
        h.write(&mut b);
        assert_eq!(VnetHdr::read(&b), h);
    }

    proptest! {
        #[test]
        fn parse_never_reads_past_the_end(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(h) = parse(&bytes) {
                prop_assert!(h.payload <= bytes.len());
                prop_assert_eq!(h.tci.is_some(), h.payload == 18);
            } else {
                prop_assert!(bytes.len() < 18);
            }
        }
    }
}
