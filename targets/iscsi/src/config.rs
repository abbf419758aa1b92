//! Typed configuration of the iSCSI target (serde): what the daemon persists and
//! passes to [`IscsiServer::start`](crate::IscsiServer::start) and
//! [`IscsiServer::reconfigure`](crate::IscsiServer::reconfigure).

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// The whole iSCSI configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IscsiConfig {
    /// Targets.
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
    /// CHAP required of discovery sessions (none: discovery is open, but lists only
    /// the targets the initiator may log in to).
    #[serde(default)]
    pub discovery_chap: Option<Chap>,
}

/// One iSCSI target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// The target's IQN (or EUI) name.
    pub iqn: String,
    /// Portals ("address:port") the target listens on; several addresses allowed.
    pub portals: Vec<SocketAddr>,
    /// Target portal group tag (also the SCSI relative target port id).
    #[serde(default = "default_tpgt")]
    pub tpgt: u16,
    /// LUN number -> name of a unit handed to the server.
    #[serde(default)]
    pub luns: Vec<LunMapping>,
    /// Initiators allowed in, each with its LUN mask and optional CHAP.
    #[serde(default)]
    pub acls: Vec<Acl>,
    /// Let any initiator log in ("demo mode"), seeing every LUN. Off unless the admin
    /// asks for it.
    #[serde(default)]
    pub allow_any_initiator: bool,
    /// CHAP for initiators admitted by `allow_any_initiator`.
    #[serde(default)]
    pub chap: Option<Chap>,
}

fn default_tpgt() -> u16 {
    1
}

/// A LUN of a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LunMapping {
    /// LUN number (0..16383).
    pub lun: u64,
    /// Name of the unit (a key of the server's LUN table).
    pub name: String,
}

/// An initiator allowed to log in to a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acl {
    /// The initiator's IQN (compared case-insensitively).
    pub initiator: String,
    /// The LUN numbers it sees; `None` for every LUN of the target.
    #[serde(default)]
    pub luns: Option<Vec<u64>>,
    /// CHAP it must pass, if any.
    #[serde(default)]
    pub chap: Option<Chap>,
}

/// CHAP credentials (one-way, or mutual with the `mutual_*` fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chap {
    /// Name the initiator presents.
    pub user: String,
    /// Secret the initiator proves (12 to 16 characters recommended).
    pub secret: String,
    /// Name the target answers with (mutual CHAP).
    #[serde(default)]
    pub mutual_user: Option<String>,
    /// Secret the target proves (mutual CHAP).
    #[serde(default)]
    pub mutual_secret: Option<String>,
}

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Two targets with one name.
    #[error("duplicate target {0}")]
    DuplicateTarget(String),
    /// A LUN number used twice in a target.
    #[error("target {0}: duplicate LUN {1}")]
    DuplicateLun(String, u64),
    /// A LUN number out of range.
    #[error("target {0}: LUN {1} out of range (0..16383)")]
    LunRange(String, u64),
    /// A mapping to a unit the server does not have.
    #[error("target {0}: no unit named {1}")]
    UnknownUnit(String, String),
    /// A name that is not an iSCSI name.
    #[error("invalid iSCSI name {0}")]
    BadName(String),
    /// Mutual CHAP with only one of its fields.
    #[error("target {0}: mutual CHAP needs both user and secret")]
    MutualChap(String),
}

fn valid_name(n: &str) -> bool {
    (n.starts_with("iqn.") || n.starts_with("eui.") || n.starts_with("naa."))
        && n.len() <= 223
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b))
}

impl IscsiConfig {
    /// Checks the configuration against itself and the unit names `has_unit` knows.
    pub fn validate(&self, has_unit: impl Fn(&str) -> bool) -> Result<(), ConfigError> {
        let mut names = std::collections::HashSet::new();
        for t in &self.targets {
            if !valid_name(&t.iqn) {
                return Err(ConfigError::BadName(t.iqn.clone()));
            }
            if !names.insert(t.iqn.to_ascii_lowercase()) {
                return Err(ConfigError::DuplicateTarget(t.iqn.clone()));
            }
            let mut luns = std::collections::HashSet::new();
            for l in &t.luns {
                if l.lun > 16383 {
                    return Err(ConfigError::LunRange(t.iqn.clone(), l.lun));
                }
                if !luns.insert(l.lun) {
                    return Err(ConfigError::DuplicateLun(t.iqn.clone(), l.lun));
                }
                if !has_unit(&l.name) {
                    return Err(ConfigError::UnknownUnit(t.iqn.clone(), l.name.clone()));
                }
            }
            for a in &t.acls {
                if !valid_name(&a.initiator) {
                    return Err(ConfigError::BadName(a.initiator.clone()));
                }
            }
            let chaps = t
                .acls
                .iter()
                .filter_map(|a| a.chap.as_ref())
                .chain(t.chap.as_ref());
            for c in chaps {
                if c.mutual_user.is_some() != c.mutual_secret.is_some() {
                    return Err(ConfigError::MutualChap(t.iqn.clone()));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_mode_is_off_by_default() {
        let t: TargetConfig =
            serde_json::from_str(r#"{"iqn":"iqn.2026-11.test:t","portals":["127.0.0.1:3260"]}"#)
                .unwrap();
        assert!(!t.allow_any_initiator);
        assert_eq!(t.tpgt, 1);
    }

    #[test]
    fn validation() {
        let mut c = IscsiConfig::default();
        c.targets.push(TargetConfig {
            iqn: "iqn.2026-11.test:t".into(),
            portals: vec![],
            tpgt: 1,
            luns: vec![LunMapping {
                lun: 0,
                name: "a".into(),
            }],
            acls: vec![],
            allow_any_initiator: false,
            chap: None,
        });
        assert_eq!(c.validate(|n| n == "a"), Ok(()));
        assert!(matches!(
            c.validate(|_| false),
            Err(ConfigError::UnknownUnit(..))
        ));
        c.targets.push(c.targets[0].clone());
        assert!(matches!(
            c.validate(|_| true),
            Err(ConfigError::DuplicateTarget(_))
        ));
    }
}
