//! NIC teaming: which uplinks of a port group are in use, given their link states, and
//! which of them carries a given port's or frame's traffic.
//!
//! A team has active uplinks and standby uplinks, each in failover order. While every
//! active uplink is up, those are used. When one fails, the first standby that is up
//! takes its place. When it recovers, `failback` decides: true returns to the active
//! uplink at once, false keeps the standby in use until it fails itself (the recovered
//! uplink then fills the next vacancy). These are vSphere's rules; link state is the
//! failure detection (no beacon probing).

use crate::definition::LoadBalancing;
use crate::frame::MacAddr;

/// A team's configuration, with uplinks as switch port numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeamConfig {
    /// Load-balancing policy.
    pub policy: LoadBalancing,
    /// Active uplinks in failover order.
    pub active: Vec<u16>,
    /// Standby uplinks in failover order.
    pub standby: Vec<u16>,
    /// Return to recovered active uplinks.
    pub failback: bool,
    /// Announce moved MAC addresses.
    pub notify_switches: bool,
}

/// A team and the uplinks it is using now.
#[derive(Debug, Clone)]
pub struct Team {
    /// The configuration.
    pub config: TeamConfig,
    /// The uplinks in use, in order (the first is the one explicit failover uses).
    pub current: Vec<u16>,
}

impl Team {
    /// A team using whatever `up` allows.
    pub fn new(config: TeamConfig, up: impl Fn(u16) -> bool) -> Team {
        let mut t = Team {
            config,
            current: Vec::new(),
        };
        t.current = t.ideal(&up);
        t
    }

    /// Up active uplinks, then as many up standby uplinks as active ones are down.
    fn ideal(&self, up: &impl Fn(u16) -> bool) -> Vec<u16> {
        let mut v: Vec<u16> = self
            .config
            .active
            .iter()
            .copied()
            .filter(|u| up(*u))
            .collect();
        let vacancies = self.config.active.len() - v.len();
        v.extend(
            self.config
                .standby
                .iter()
                .copied()
                .filter(|u| up(*u))
                .take(vacancies),
        );
        v
    }

    /// Recomputes the uplinks in use after a link state changed. Returns whether they
    /// changed.
    pub fn update(&mut self, up: impl Fn(u16) -> bool) -> bool {
        let next = if self.config.failback {
            self.ideal(&up)
        } else {
            let mut v: Vec<u16> = self.current.iter().copied().filter(|u| up(*u)).collect();
            let want = self.config.active.len().max(1);
            for u in self.config.active.iter().chain(&self.config.standby) {
                if v.len() >= want {
                    break;
                }
                if up(*u) && !v.contains(u) {
                    v.push(*u);
                }
            }
            v
        };
        let changed = next != self.current;
        self.current = next;
        changed
    }

    /// The uplink a port is pinned to: `Some(None)` when the policy decides per frame
    /// (IP hash), None when no uplink is usable.
    pub fn pin(&self, port: u16, mac: MacAddr) -> Option<Option<u16>> {
        let n = self.current.len();
        if n == 0 {
            return None;
        }
        Some(match self.config.policy {
            LoadBalancing::FailoverOrder => Some(self.current[0]),
            LoadBalancing::PortId => Some(self.current[usize::from(port) % n]),
            LoadBalancing::SrcMac => Some(self.current[mac.hash32() as usize % n]),
            LoadBalancing::IpHash => None,
        })
    }

    /// The uplink for one frame under IP hash (IPv4 source and destination; other
    /// frames use the first uplink).
    pub fn by_ip(&self, ips: Option<(u32, u32)>) -> Option<u16> {
        let n = self.current.len();
        if n == 0 {
            return None;
        }
        let h = ips.map_or(0, |(s, d)| {
            let x = s ^ d;
            (x ^ (x >> 16) ^ (x >> 8)) as usize
        });
        Some(self.current[h % n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashSet;

    fn cfg(active: &[u16], standby: &[u16], failback: bool) -> TeamConfig {
        TeamConfig {
            policy: LoadBalancing::FailoverOrder,
            active: active.to_vec(),
            standby: standby.to_vec(),
            failback,
            notify_switches: true,
        }
    }

    #[test]
    fn standby_takes_over_and_fails_back() {
        let down = RefCell::new(HashSet::new());
        let up = |u: u16| !down.borrow().contains(&u);
        let mut t = Team::new(cfg(&[1], &[2, 3], true), up);
        assert_eq!(t.current, vec![1]);
        down.borrow_mut().insert(1);
        assert!(t.update(up));
        assert_eq!(t.current, vec![2]);
        down.borrow_mut().insert(2);
        t.update(up);
        assert_eq!(t.current, vec![3]);
        down.borrow_mut().clear();
        t.update(up);
        assert_eq!(t.current, vec![1]);
        assert!(!t.update(up));
    }

    #[test]
    fn no_failback_stays_on_the_standby() {
        let down = RefCell::new(HashSet::new());
        let up = |u: u16| !down.borrow().contains(&u);
        let mut t = Team::new(cfg(&[1], &[2], false), up);
        down.borrow_mut().insert(1);
        t.update(up);
        assert_eq!(t.current, vec![2]);
        down.borrow_mut().remove(&1);
        assert!(!t.update(up));
        assert_eq!(t.current, vec![2]);
        down.borrow_mut().insert(2);
        t.update(up);
        assert_eq!(t.current, vec![1]);
    }

    #[test]
    fn port_id_spreads_and_pins() {
        let mut c = cfg(&[1, 2], &[], true);
        c.policy = LoadBalancing::PortId;
        let down = RefCell::new(HashSet::new());
        let up = |u: u16| !down.borrow().contains(&u);
        let mut t = Team::new(c, up);
        let m = MacAddr::default();
        assert_eq!(t.pin(4, m), Some(Some(1)));
        assert_eq!(t.pin(5, m), Some(Some(2)));
        down.borrow_mut().insert(2);
        t.update(up);
        assert_eq!(t.pin(5, m), Some(Some(1)));
        down.borrow_mut().insert(1);
        t.update(up);
        assert_eq!(t.pin(5, m), None);
    }
}
