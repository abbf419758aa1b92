//! The server's typed configuration (serde), as the daemon stores it and the CLI and API
//! edit it (`basalt target nbd ...`).
//!
//! ```toml
//! listen = ["0.0.0.0:10809", "[::]:10809"]
//! tls = "require"               # off | allow | require
//! default_export = "lun0"       # what the empty export name means (optional)
//!
//! [exports.lun0]
//! read_only = false
//! allowed_networks = ["10.0.0.0/8", "127.0.0.1/32", "::1/128"]
//! description = "VM images"
//! ```
//!
//! Export names are LUN names; the daemon hands the devices in separately (a map from
//! the same names to `Arc<dyn BlockDev>`), since devices are not configuration.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// The whole NBD target configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NbdConfig {
    /// Addresses to listen on (port 10809 is NBD's). Port 0 picks a free port (tests);
    /// [`NbdServer::local_addrs`](crate::NbdServer::local_addrs) tells which.
    pub listen: Vec<SocketAddr>,
    /// Exports by name (the LUN name).
    pub exports: BTreeMap<String, ExportConfig>,
    /// The export a client gets when it asks for the empty name, if any.
    pub default_export: Option<String>,
    /// TLS policy for new connections.
    pub tls: TlsMode,
    /// Most connections at once, over all listeners; more are closed at accept.
    pub max_connections: usize,
    /// Most requests in flight per connection; the server stops reading requests from a
    /// connection while it has this many.
    pub max_in_flight: usize,
    /// Seconds a client has to finish the handshake.
    pub handshake_timeout_secs: u64,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 10809))],
            exports: BTreeMap::new(),
            default_export: None,
            tls: TlsMode::Off,
            max_connections: 256,
            max_in_flight: 128,
            handshake_timeout_secs: 30,
        }
    }
}

/// One export.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportConfig {
    /// Refuse writes (`NBD_FLAG_READ_ONLY`; writes get `EPERM`).
    pub read_only: bool,
    /// Client networks allowed to use the export; empty allows every client.
    pub allowed_networks: Vec<Cidr>,
    /// Shown to clients (`NBD_INFO_DESCRIPTION`).
    pub description: Option<String>,
}

/// TLS policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// No TLS.
    #[default]
    Off,
    /// TLS when the client asks for it.
    Allow,
    /// TLS before anything else; plaintext clients are refused.
    Require,
}

/// An IP network in CIDR notation (`10.0.0.0/8`, `::1/128`); a bare address means the
/// single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a string is not a [`Cidr`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP network (expected ADDRESS or ADDRESS/PREFIX)")]
pub struct CidrParseError(String);

impl Cidr {
    /// The network `addr/prefix`; host bits are cleared.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return None;
        }
        Some(Cidr {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// True when `ip` is in the network. IPv4-mapped IPv6 addresses (from dual-stack
    /// sockets) count as their IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(ip, self.prefix) == self.addr
            }
            _ => false,
        }
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::V6((bits & m).into())
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CidrParseError(s.to_owned());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (
                a.parse::<IpAddr>().map_err(|_| err())?,
                Some(p.parse::<u8>().map_err(|_| err())?),
            ),
            None => (s.parse::<IpAddr>().map_err(|_| err())?, None),
        };
        let prefix = prefix.unwrap_or(if addr.is_ipv4() { 32 } else { 128 });
        Cidr::new(addr, prefix).ok_or_else(err)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl ExportConfig {
    /// True when a client at `ip` may use the export.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allowed_networks.is_empty() || self.allowed_networks.iter().any(|n| n.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parse_and_match() {
        let n: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(n.to_string(), "10.0.0.0/8");
        assert!(n.contains("10.200.0.1".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.0.0.9".parse().unwrap()));
        let h: Cidr = "::1".parse().unwrap();
        assert_eq!(h.to_string(), "::1/128");
        assert!(h.contains("::1".parse().unwrap()));
        assert!(!h.contains("127.0.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        for bad in ["", "10.0.0.0/33", "::/129", "host/8", "1.2.3.4/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn config_round_trips_through_json() {
        let mut c = NbdConfig::default();
        c.exports.insert(
            "lun0".into(),
            ExportConfig {
                read_only: true,
                allowed_networks: vec!["127.0.0.0/8".parse().unwrap()],
                description: Some("x".into()),
            },
        );
        c.tls = TlsMode::Require;
        let j = serde_json::to_string(&c).unwrap();
        assert!(j.contains("\"require\""));
        assert!(j.contains("127.0.0.0/8"));
        let back: NbdConfig = serde_json::from_str(&j).unwrap();
        assert_eq!(back, c);
        let partial: NbdConfig = serde_json::from_str(r#"{"tls":"allow"}"#).unwrap();
        assert_eq!(partial.max_connections, 256);
        assert!(serde_json::from_str::<NbdConfig>(r#"{"bogus":1}"#).is_err());
    }

    #[test]
    fn empty_allow_list_allows_everyone() {
        let e = ExportConfig::default();
        assert!(e.allows("192.0.2.1".parse().unwrap()));
        let e = ExportConfig {
            allowed_networks: vec!["10.0.0.0/8".parse().unwrap()],
            ..ExportConfig::default()
        };
        assert!(!e.allows("127.0.0.1".parse().unwrap()));
    }
}
