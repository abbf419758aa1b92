//! What a connection asks of the target's configuration: whether an initiator may log
//! in and how it must authenticate, which LUNs its session sees, and what discovery
//! shows it. The driver implements [`Catalog`] over its live configuration; tests
//! implement it directly.

use basalt_scsi::{LogicalUnit, LunResolver};
use std::sync::Arc;

/// CHAP secrets for one login (RFC 7143 12.1.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapSecrets {
    /// The name the initiator must present (CHAP_N).
    pub user: String,
    /// The secret the initiator proves it knows.
    pub secret: String,
    /// For mutual CHAP: the name and secret the target answers with.
    pub mutual: Option<(String, String)>,
}

/// A granted login.
#[derive(Clone)]
pub struct LoginGrant {
    /// The target's name (for discovery sessions: empty).
    pub target: String,
    /// Target portal group tag of the portal logged in through.
    pub tpgt: u16,
    /// CHAP the initiator must pass, `None` for no authentication.
    pub chap: Option<ChapSecrets>,
    /// The LUNs the session sees (`None` for discovery).
    pub luns: Option<Arc<dyn SessionLuns>>,
}

impl std::fmt::Debug for LoginGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginGrant")
            .field("target", &self.target)
            .field("tpgt", &self.tpgt)
            .field("chap", &self.chap.as_ref().map(|c| &c.user))
            .finish()
    }
}

/// Why a login is refused (mapped to login status 02/03 and 02/02).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginDenied {
    /// No such target (or not served on this portal).
    NotFound,
    /// The initiator is not in the target's ACL.
    NotAuthorized,
}

/// The LUN map of one session: the LUNs its initiator may see. Lookups happen per
/// command, so a reconfiguration (LUN added or masked) takes effect at once.
pub trait SessionLuns: LunResolver {
    /// The unit at `lun`, if mapped for this initiator.
    fn lun(&self, lun: u64) -> Option<Arc<LogicalUnit>>;
    /// Every mapped LUN number, ascending.
    fn list(&self) -> Vec<u64>;
    /// A number that changes whenever [`SessionLuns::lun`] may answer differently (a
    /// reconfiguration), so that a connection may cache its lookups until it changes;
    /// `None`, the default, forbids caching.
    fn version(&self) -> Option<u64> {
        None
    }
}

/// The configuration as connections see it.
pub trait Catalog: Send + Sync {
    /// A login by `initiator` to `target` (`None`: a discovery session) through the
    /// portal `portal` ("address:port" of the local end).
    fn login(
        &self,
        initiator: &str,
        target: Option<&str>,
        portal: &str,
    ) -> Result<LoginGrant, LoginDenied>;

    /// SendTargets: `(target name, ["address:port,tpgt", ...])` for every target the
    /// initiator may log in to (only `only`, when given).
    fn send_targets(
        &self,
        initiator: &str,
        only: Option<&str>,
        portal: &str,
    ) -> Vec<(String, Vec<String>)>;
}
